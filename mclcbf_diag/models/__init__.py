"""Model adapters and loading: name the parts of a LLaVA-style model, find its tokens."""

from .adapter import ADAPTERS, LLAVA, ArchitectureAdapter
from .loading import EMBEDDED, LoadedModel, load_model, resolve_dtype
from .tokens import AnswerTokens, answer_tokens, image_positions

__all__ = ["ADAPTERS", "LLAVA", "ArchitectureAdapter", "EMBEDDED", "LoadedModel", "load_model",
           "resolve_dtype", "AnswerTokens", "answer_tokens", "image_positions"]

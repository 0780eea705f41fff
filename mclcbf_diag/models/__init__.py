"""Model adapters and loading: name the parts of a LLaVA-style model, find its tokens.

The names below load on first use, so that :mod:`.families` (the supported families, for
``mclcbf-diag models``) reads without torch or transformers.
"""

from __future__ import annotations

import importlib

_NAMES = {"ADAPTERS": ".adapter", "LLAVA": ".adapter", "ArchitectureAdapter": ".adapter", "EMBEDDED": ".loading",
          "LoadedModel": ".loading", "load_model": ".loading", "resolve_dtype": ".loading", "AnswerTokens": ".tokens",
          "answer_tokens": ".tokens", "image_positions": ".tokens"}


def __getattr__(name: str):
    if name in _NAMES:
        value = getattr(importlib.import_module(_NAMES[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ADAPTERS", "LLAVA", "ArchitectureAdapter", "EMBEDDED", "LoadedModel", "load_model",
           "resolve_dtype", "AnswerTokens", "answer_tokens", "image_positions"]

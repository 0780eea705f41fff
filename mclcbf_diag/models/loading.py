"""Load a LLaVA-style model and its processor, offline and safely.

``load_model()`` with no name loads the embedded model shipped inside the package.
Otherwise it takes a local directory or a Hugging Face cache id
(``llava-hf/llava-1.5-7b-hf``); it never downloads (``local_files_only``), reads weights
from safetensors only, never enables ``trust_remote_code`` and always asks for eager
attention, the only implementation that returns attention probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration
from transformers.utils import logging as hf_logging

from ..errors import UserError
from .adapter import ADAPTERS, ArchitectureAdapter
from .projection import LayerWeights
from .tokens import AnswerTokens, answer_tokens

EMBEDDED = Path(__file__).resolve().parent.parent / "zoo" / "weights"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    """A model, its processor, the adapter that names its parts, and its special tokens."""

    model: LlavaForConditionalGeneration
    processor: object
    adapter: ArchitectureAdapter
    tokens: AnswerTokens
    source: str

    @property
    def text_config(self):
        return self.model.config.text_config

    @property
    def n_layers(self) -> int:
        return self.text_config.num_hidden_layers

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def device(self) -> torch.device:
        return self.model.device

    def layer_weights(self, index: int) -> LayerWeights:
        """Decoder layer ``index``'s attention projections as plain tensors (see the adapter)."""
        return self.adapter.layer_weights(self.model, index)

    def final_norm(self):
        return self.model.get_submodule(self.adapter.final_norm)

    def unembed_weight(self) -> torch.Tensor:
        return self.model.get_submodule(self.adapter.unembed).weight.detach()

    def inputs(self, prompt: str, image) -> dict:
        enc = self.processor(text=prompt, images=image, return_tensors="pt")
        return {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                for k, v in enc.items()}


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name not in DTYPES:
        raise UserError(f"unknown --dtype {name!r}; choose one of {', '.join(DTYPES)}")
    if name == "float16" and str(device).startswith("cpu"):
        raise UserError("--dtype float16 was requested on the CPU, where fp16 matmuls are slow and "
                        "partly unsupported; use --dtype float32 (or bfloat16) on CPU, or --device cuda")
    return DTYPES[name]


def resolve_device(device: str) -> torch.device:
    """``device`` as a torch.device, or a UserError when it is malformed or not present here."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise UserError(f"unknown --device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device} requested, but CUDA is not available here (torch "
                            f"{torch.__version__}, CUDA build: {torch.version.cuda or 'none'}); "
                            "use --device cpu or install a CUDA build of torch on a GPU machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA "
                            f"device(s), cuda:0..cuda:{torch.cuda.device_count() - 1}; pick one of those")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {device} requested, but MPS is not available here; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {device}: unsupported device type {dev.type!r}; use cpu or cuda")
    return dev


def _locate(name_or_path: str | None) -> tuple[str, bool]:
    """(what to pass to from_pretrained, is it a local directory)."""
    if name_or_path in (None, "", "embedded"):
        if not (EMBEDDED / "config.json").is_file():
            raise UserError(f"the embedded model is missing from {EMBEDDED}; reinstall mclcbf-diag "
                            "or rebuild it with `mclcbf-diag zoo train --install`")
        return str(EMBEDDED), True
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"--model {name_or_path}: no config.json in that directory; pass a "
                            "directory saved with save_pretrained (config.json + *.safetensors)")
        if not any(path.glob("*.safetensors")):
            raise UserError(f"--model {name_or_path}: no *.safetensors weights there; mclcbf-diag "
                            "loads safetensors only (convert .bin checkpoints first)")
        return str(path), True
    if name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/", "~")):
        return name_or_path, False
    raise UserError(f"--model {name_or_path}: no such directory; pass a local checkpoint "
                    "directory or a Hugging Face id already in the local cache")


def load_model(name_or_path: str | None = None, dtype: str = "float32", device: str = "cpu",
               device_map: str | None = None) -> LoadedModel:
    """Load the embedded model (default), a local directory or a cached hub id, offline."""
    if device_map is None:
        resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    if device_map is not None:
        import importlib.util

        if importlib.util.find_spec("accelerate") is None:
            raise UserError(f"--device-map {device_map} needs the accelerate package; install it "
                            "(pip install accelerate) or drop --device-map")
    where, local = _locate(name_or_path)
    kwargs = dict(dtype=torch_dtype, attn_implementation="eager", use_safetensors=True,
                  local_files_only=True)
    try:
        config = AutoConfig.from_pretrained(where, local_files_only=True)
        architectures = set(getattr(config, "architectures", None) or [])
        if config.model_type != "llava" and not architectures & set(ADAPTERS):
            raise UserError(f"--model {where}: a {config.model_type!r} checkpoint, not a LLaVA-style "
                            f"one; mclcbf-diag supports {', '.join(ADAPTERS)}")
        processor = AutoProcessor.from_pretrained(where, local_files_only=True)
        # Checked before the weights are read, so a wrong checkpoint fails fast.
        tokens = answer_tokens(processor.tokenizer, getattr(config, "image_token_id", None), where)
        quiet = where == str(EMBEDDED) and hf_logging.is_progress_bar_enabled()
        if quiet:  # a 6 MB model loads in milliseconds: its progress bar is only noise on stderr
            hf_logging.disable_progress_bar()
        try:
            model = LlavaForConditionalGeneration.from_pretrained(
                where, device_map=device_map, **kwargs)
        finally:
            if quiet:
                hf_logging.enable_progress_bar()
    except (OSError, ValueError, SafetensorError) as exc:
        hint = ("the directory is incomplete or not a LLaVA checkpoint" if local else
                f"it is not in the local Hugging Face cache (run `hf download {where}` on a "
                "machine with network access, or pass --model DIR)")
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"could not load model {where!r}: {hint} ({first})") from exc
    if device_map is None:
        model.to(device)
    model.eval()
    adapter = ADAPTERS.get(type(model).__name__)
    if adapter is None:
        raise UserError(f"no adapter for {type(model).__name__}; supported: {', '.join(ADAPTERS)}")
    return LoadedModel(model, processor, adapter, tokens, where)

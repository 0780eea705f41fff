"""Load a LLaVA-style model and its processor, offline and safely.

``load_model()`` with no name loads the embedded model shipped inside the package.
Otherwise it takes a local directory or a Hugging Face cache id
(``llava-hf/llava-1.5-7b-hf``); it never downloads (``local_files_only``), reads weights
from safetensors only, never enables ``trust_remote_code`` and always asks for eager
attention, the only implementation that returns attention probabilities.

Loading happens in two steps so that every mistake is reported before the weights are read:

1. :func:`model_facts` reads ``config.json`` only (depth, context length, image tokens):
   enough to validate ``--set layers=…`` in milliseconds. A family, text model or vision
   tower the toolkit cannot measure exactly is refused from the same file
   (:func:`~.families.check_config`; the CLI runs it before torch is imported).
2. :func:`prepare_model` checks dtype and device, optionally verifies the files against
   ``MANIFEST.sha256`` (``--verify``), loads the config and the processor (tokenizer; InternVL's
   without its video processor, :mod:`.internvl`), and
   finds the answer tokens; :func:`check_prompt_lengths` then measures every prompt with
   the tokenizer. A prompt longer than the tokenizer's fixed/maximum length, the model's
   context or what a sliding-window layer keeps in its cache is refused with its length and
   the limit: nothing is ever cut silently (the embedded tokenizer, for one, truncates to 176
   tokens). Processor errors are one line (:mod:`.processing`), and so is an image whose
   tokens do not form its patch grid (:meth:`LoadedModel.image_grid`), before the model runs.
3. :func:`load_weights` reads the weights into its family's class (:func:`model_class`:
   ``LlavaForConditionalGeneration``, ``LlavaNextForConditionalGeneration``, ``InternVLForConditionalGeneration``,
   ``Qwen2_5_VLForConditionalGeneration`` …) and refuses a checkpoint with missing,
   unexpected or mis-shaped tensors (``output_loading_info``), which transformers would
   otherwise fill with random values.

A device map (``--device-map``: ``auto`` and the other accelerate strategies, or a JSON object
``{"model.language_model.layers.0": "cuda:0", …}``, see :func:`parse_device_map`) is handed to
``from_pretrained``, which needs the ``accelerate`` package. When it names more than one
device, or ``"disk"``, accelerate hooks every module: inputs move to each module's execution
device, and the weights of offloaded modules (``"cpu"`` entries next to a GPU, ``"disk"``
entries) stay on the ``meta`` device outside their own forward. The toolkit reads weights
outside the forward (look-ahead projections, norms, the logit lens), so
:meth:`LoadedModel.onloaded` loads them for the moment they are read; inputs go to the
model's execution device (:attr:`LoadedModel.device`), and each measurement follows the
device of the tensors it combines.
"""

from __future__ import annotations

import json
import logging
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError
from transformers import AutoConfig, LlavaForConditionalGeneration
from transformers.utils import logging as hf_logging

from .. import shipped
from ..errors import UserError, first_line
from ..storage import show, verify_manifest
from .adapter import ADAPTERS, ArchitectureAdapter
from .anyres import ImageLayout
from .families import check_config, family_of
from .processing import placeholder, processor_prompt, run_processor
from .projection import LayerWeights
from .schemes import ImageScheme, scheme_of
from .tokens import AnswerTokens, Sink, answer_tokens, find_sink

EMBEDDED = shipped.WEIGHTS
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    """A model, its processor, the adapter that names its parts, and its special tokens."""

    model: LlavaForConditionalGeneration  # or the class of another family (FAMILIES: LlavaNextForConditionalGeneration)
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
        """Where inputs go: the model's device, or under a device map the device its hooks execute on."""
        for hook in _hooks(self.model):
            if getattr(hook, "execution_device", None) is not None:
                return torch.device(hook.execution_device)
        return self.model.device

    def onloaded(self, *paths: str):
        """Context: the weights of the modules at ``paths`` loaded where a device map offloaded them."""
        return onloaded(self.model, *paths)

    def layer_weights(self, index: int) -> LayerWeights:
        """Decoder layer ``index``'s attention projections as plain tensors (see the adapter)."""
        with self.onloaded(f"{self.adapter.layers}.{index}"):
            return self.adapter.layer_weights(self.model, index)

    def final_norm(self):
        return self.model.get_submodule(self.adapter.final_norm)

    def unembed_weight(self) -> torch.Tensor:
        with self.onloaded(self.adapter.unembed):
            return self.model.get_submodule(self.adapter.unembed).weight.detach()

    def inputs(self, prompt: str, image) -> dict:
        """The processor's tensors for one prompt and image, on the model's device; one-line errors before it runs."""
        enc = run_processor(self.processor, show(self.source), prompt, image, return_tensors="pt")
        self.image_grid(enc)
        return {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                for k, v in enc.items()}

    def sink(self, input_ids: torch.Tensor, decision_rows: torch.Tensor | None = None,
             image_mask: torch.Tensor | None = None) -> Sink:
        """The prompt's attention sink: its BOS, or else the measured sink (:func:`~.tokens.find_sink`)."""
        return find_sink(input_ids, self.tokens.bos_token_id, decision_rows, image_mask)

    @cached_property
    def adds_bos(self) -> bool:
        """Whether the tokenizer starts every prompt it encodes with its BOS (Qwen2's add none)."""
        tok = getattr(self.processor, "tokenizer", self.processor)
        bos = self.tokens.bos_token_id
        return bos is not None and tok("x").input_ids[:1] == [bos]

    def prompt_sink(self, length: int, decision_rows: torch.Tensor | None = None,
                    image_mask: torch.Tensor | None = None) -> Sink:
        """The sink of a prompt of ``length`` tokens that the processor encoded (:meth:`inputs`): it starts with the
        BOS exactly when the tokenizer adds one (:attr:`adds_bos`); else the sink is measured (:meth:`sink`)."""
        ids = torch.full((length,), -1, dtype=torch.long)
        if self.adds_bos and length:
            ids[0] = self.tokens.bos_token_id
        return self.sink(ids, decision_rows, image_mask)

    def image_layout(self, enc) -> ImageLayout | None:
        """LLaVA-NeXT, LLaVA-OneVision: the anyres layout of one prompt's image (from its ``image_sizes``); None for a
        single grid."""
        return image_layout(self.model.config, enc)

    @property
    def image_scheme(self) -> ImageScheme:
        """What the family's processor and model make of one image (:mod:`.schemes`)."""
        return scheme_of(self.model.config)

    def image_grid(self, enc) -> tuple[int, int]:
        """The overlay's patch grid (rows, columns) of one prompt's image, once its image tokens are checked against
        the family's layout (:meth:`.schemes.ImageScheme.image_grid`: for LLaVA-NeXT its base grid)."""
        n = int((enc["input_ids"][0] == self.tokens.image_token_id).sum())
        return self.image_scheme.image_grid(self.model.config, enc, n, show(self.source))

    def grid_mask(self, image_mask: torch.Tensor) -> torch.Tensor:
        """The image tokens (bool mask [seq], from the detected ``image_mask``) that form the overlay's patch grid: all
        of them, or for LLaVA-NeXT and OneVision the base grid's, for InternVL the whole picture's
        (:meth:`.schemes.ImageScheme.grid_mask`)."""
        return self.image_scheme.grid_mask(self.model.config, image_mask)


def _hooks(module: torch.nn.Module) -> list:
    """The accelerate hooks on one module (a SequentialHook holds several)."""
    hook = getattr(module, "_hf_hook", None)
    return [] if hook is None else list(getattr(hook, "hooks", None) or [hook])


@contextmanager
def onloaded(model: torch.nn.Module, *paths: str):
    """Load, for the ``with`` block, the offloaded weights of the modules at ``paths`` (dotted).

    Under a device map accelerate keeps an offloaded module's weights on the ``meta`` device
    and loads them only around its forward (``AlignDevicesHook.pre_forward``); this runs the
    same pre/post steps for the modules at ``paths``, their ancestors and their submodules.
    Tensors read inside the block stay valid after it (the module gets ``meta`` ones again).
    Without offloading (no device map, or one device) it does nothing.
    """
    targets: dict[int, tuple] = {}
    for path in paths:
        parts = path.split(".") if path else []
        chain = [model.get_submodule(".".join(parts[:k])) for k in range(len(parts))]
        for module in [*chain, *model.get_submodule(path).modules()]:
            for hook in _hooks(module):
                if getattr(hook, "offload", False):
                    targets.setdefault(id(hook), (module, hook))
    with ExitStack() as stack:
        for module, hook in targets.values():
            hook.pre_forward(module)
            stack.callback(hook.post_forward, module, None)
        yield


def parse_device_map(device_map) -> str | dict | None:
    """``--device-map`` as ``from_pretrained`` takes it, or a UserError.

    A strategy (``auto``, ``balanced``, ``balanced_low_0``, ``sequential``) or a single device
    (``cpu``, ``cuda:1``) stays a string; a JSON object ``{"module path": "device", …}`` (given
    inline, or as the path of a ``.json`` file) becomes a dict, as does a dict passed in Python.
    Devices are ``cpu``, ``disk``, ``cuda:N``/``N`` or ``mps``.
    """
    if device_map is None:
        return None
    if isinstance(device_map, dict):
        mapping, what = device_map, "the device map"
    else:
        text = str(device_map).strip()
        if text.endswith(".json") and not text.startswith("{"):
            try:
                text = Path(text).expanduser().read_text(encoding="utf-8")
            except OSError as exc:
                raise UserError(f"--device-map {device_map}: cannot read that file ({exc.strerror or exc}); "
                                "pass an existing JSON file, a JSON object or a strategy such as auto") from None
        if not text.startswith("{"):
            if not text:
                raise UserError("--device-map is empty; pass auto, a device, or a JSON object of module → device")
            return text
        try:
            mapping = json.loads(text)
        except ValueError as exc:
            raise UserError(f"--device-map {device_map!r} is not valid JSON ({exc}); write it as "
                            '\'{"model.language_model.layers.0": "cpu", "lm_head": "cpu", …}\'') from None
        what = f"--device-map {device_map!r}"
    if not isinstance(mapping, dict) or not mapping:
        raise UserError(f"{what} must be a non-empty JSON object of module path → device")
    bad = [k for k, v in mapping.items() if not isinstance(k, str) or isinstance(v, bool)
           or not isinstance(v, (str, int))]
    if bad:
        raise UserError(f"{what}: entries {bad[:3]} are not 'module path': device (a string such as "
                        "\"cpu\", \"disk\" or \"cuda:0\", or a GPU index)")
    return dict(mapping)


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
                            "or rebuild it with `mclcbf-diag embedded train --install`")
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


def locate(name_or_path: str | None) -> tuple[str, bool]:
    """(what to pass to from_pretrained, is it a local directory); a UserError when neither."""
    return _locate(name_or_path)


@dataclass(frozen=True)
class ModelFacts:
    """What ``config.json`` says, read without transformers or the weights."""

    where: str
    local: bool
    n_layers: int | None
    max_positions: int | None
    image_seq_length: int | None
    model_type: str | None = None


def model_facts(name_or_path: str | None) -> ModelFacts:
    """Depth, context length and image tokens from ``config.json`` (milliseconds, no weights)."""
    where, local = _locate(name_or_path)
    cfg: dict = {}
    if local:
        path = Path(where) / "config.json"
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise UserError(f"--model {show(where)}: config.json is unreadable ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}); restore the checkpoint's "
                            "config.json") from None
        if not isinstance(cfg, dict):
            raise UserError(f"--model {show(where)}: config.json is not a JSON object; restore it")
    else:
        try:
            cfg = AutoConfig.from_pretrained(where, local_files_only=True).to_dict()
        except (OSError, ValueError) as exc:
            raise UserError(f"could not load model {where!r}: it is not in the local Hugging Face cache (run "
                            f"`hf download {where}` on a machine with network access, or pass --model DIR) "
                            f"({first_line(exc)})"
                            ) from None
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg

    def num(d, key):
        v = d.get(key)
        return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None

    return ModelFacts(where, local, num(text, "num_hidden_layers"), num(text, "max_position_embeddings"),
                      num(cfg, "image_seq_length"),
                      cfg.get("model_type") if isinstance(cfg.get("model_type"), str) else None)


@dataclass
class PreparedModel:
    """Everything but the weights: config, processor and answer tokens (see the module docstring)."""

    where: str
    local: bool
    config: object
    processor: object
    tokens: AnswerTokens
    dtype: torch.dtype
    device: str
    device_map: str | dict | None


def prepare_model(name_or_path: str | None = None, dtype: str = "float32", device: str = "cpu",
                  device_map: str | dict | None = None, verify: bool = False) -> PreparedModel:
    """Validate the options and load config + processor; the weights are not read.

    The checkpoint's config, processor and answer tokens are checked here, so a wrong checkpoint fails before its
    weights are read (:func:`load_weights` reads them).

    Args:
        name_or_path: a local model folder, a cached hub id, or None/``""``/``"embedded"`` for the embedded model.
        dtype: ``float32``, ``float16`` (not on the CPU) or ``bfloat16``.
        device: the torch device (``cpu``, ``cuda``, ``cuda:N``); checked only without ``device_map``.
        device_map: ``--device-map`` (:func:`parse_device_map`): a strategy, one device, a JSON object or its
            ``.json`` file, or a dict; needs accelerate.
        verify: check a local folder's files against its MANIFEST.sha256 first.

    Returns:
        The :class:`PreparedModel` (source, config, processor, answer tokens, dtype, device, device map).

    Raises:
        UserError: a bad option, a missing package (accelerate, a processor's), ``verify`` on a hub id, a manifest
            mismatch, or a checkpoint that cannot be read or is not supported.
    """
    device_map = parse_device_map(device_map)
    if device_map is None:
        resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    if device_map is not None:
        import importlib.util

        if importlib.util.find_spec("accelerate") is None:
            raise UserError(f"--device-map {device_map} needs the accelerate package; install it "
                            "(pip install 'mclcbf-diag[gpu]', or pip install accelerate) or drop --device-map")
    where, local = _locate(name_or_path)
    if verify:
        if not local:
            raise UserError(f"--verify checks a local model folder against its MANIFEST.sha256; {where} is a "
                            "hub id: pass --model DIR (its snapshot folder) or drop --verify")
        verify_manifest(where)
    try:
        config = AutoConfig.from_pretrained(where, local_files_only=True)
        check_config(config.to_dict(), show(where))  # the CLI ran the same check before torch loaded
        processor = scheme_of(config).load_processor(config, where)
        scheme_of(config).check_processor(config, processor, show(where))
        # Checked before the weights are read, so a wrong checkpoint fails fast.
        tokens = answer_tokens(processor.tokenizer, getattr(config, "image_token_id", None), where)
    except ImportError as exc:  # a processor class that needs an optional package (torchvision)
        first = first_line(exc)
        raise UserError(f"--model {show(where)}: its processor needs a package that is not installed ({first}); "
                        "install it (e.g. pip install torchvision)") from None
    except (OSError, ValueError, SafetensorError) as exc:
        raise _load_error(where, local, exc) from exc
    return PreparedModel(where, local, config, processor, tokens, torch_dtype, device, device_map)


def _load_error(where: str, local: bool, exc: Exception) -> UserError:
    hint = ("the directory is incomplete or not a LLaVA checkpoint" if local else
            f"it is not in the local Hugging Face cache (run `hf download {where}` on a "
            "machine with network access, or pass --model DIR)")
    first = first_line(exc)
    return UserError(f"could not load model {where!r}: {hint} ({first})")


def image_layout(config, enc) -> ImageLayout | None:
    """The anyres layout of the first image of ``enc`` (a processor's output) under a LLaVA-NeXT or OneVision
    ``config``; None for other families (one fixed grid)."""
    return scheme_of(config).layout(config, enc)


def model_class(config):
    """The transformers class of ``config``'s family (:data:`~.families.FAMILIES`)."""
    family = family_of(config.model_type)
    return getattr(transformers, family.architecture) if family is not None else LlavaForConditionalGeneration


class _HeldLoadReport(logging.Filter):
    """Holds back transformers' LOAD REPORT (its multi-line table of missing, unexpected or mis-shaped tensors, a
    warning of logger ``transformers.modeling_utils``) while ``from_pretrained`` runs: :func:`check_loading_info`
    refuses such a checkpoint in one line; a report it does not refuse for is logged after all."""

    logger = logging.getLogger("transformers.modeling_utils")

    def __init__(self):
        super().__init__()
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in record.getMessage():
            self.held.append(record)
            return False
        return True

    def __enter__(self) -> "_HeldLoadReport":
        self.logger.addFilter(self)
        return self

    def __exit__(self, *exc) -> None:
        self.logger.removeFilter(self)

    def release(self) -> None:
        """Log what was held (the checkpoint was not refused)."""
        for record in self.held:
            self.logger.handle(record)
        self.held.clear()


def load_weights(prep: PreparedModel) -> LoadedModel:
    """Read the weights of a prepared model; missing or unexpected tensors are an error (one line: transformers' own
    report of them is held back, :class:`_HeldLoadReport`)."""
    where = prep.where
    kwargs = dict(dtype=prep.dtype, attn_implementation="eager", use_safetensors=True,
                  local_files_only=True, output_loading_info=True)
    small = prep.local and sum(p.stat().st_size for p in Path(where).glob("*.safetensors")) < 256 * 2**20
    quiet = small and hf_logging.is_progress_bar_enabled()
    try:
        if quiet:  # a small model loads in milliseconds: its progress bar is only noise on stderr
            hf_logging.disable_progress_bar()
        try:
            with _HeldLoadReport() as report:
                model, info = model_class(prep.config).from_pretrained(where, device_map=prep.device_map, **kwargs)
        finally:
            if quiet:
                hf_logging.enable_progress_bar()
    except (OSError, ValueError, SafetensorError) as exc:
        first = first_line(exc)
        if prep.device_map is not None and "device" in first.lower() and "map" in first.lower():
            raise UserError(f"--device-map: {first}; give every module a device (or a parent module, e.g. "
                            "\"model\" and \"lm_head\"), or use --device-map auto") from exc
        raise _load_error(where, prep.local, exc) from exc
    check_loading_info(where, info)
    report.release()
    scheme_of(model.config).prepare(model)  # shared image features as the family's model merges them
    if prep.device_map is None:
        model.to(prep.device)
    model.eval()
    adapter = ADAPTERS.get(type(model).__name__)
    if adapter is None:
        raise UserError(f"no adapter for {type(model).__name__}; supported: {', '.join(ADAPTERS)}")
    return LoadedModel(model, prep.processor, adapter, prep.tokens, where)


def check_loading_info(where: str, info: dict) -> None:
    """A UserError when from_pretrained reported missing, unexpected or mis-shaped tensors."""
    problems = []
    for key, what in (("missing_keys", "missing"), ("unexpected_keys", "unexpected"),
                      ("mismatched_keys", "of the wrong shape")):
        names = sorted(str(k if not isinstance(k, tuple) else k[0]) for k in (info.get(key) or ()))
        if names:
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            problems.append(f"{len(names)} {what} ({shown})")
    errors = [str(e).splitlines()[0] for e in (info.get("error_msgs") or ()) if str(e).strip()]
    if errors:
        problems.append(f"load errors ({errors[0]})")
    if problems:
        raise UserError(f"--model {show(where)}: the checkpoint's tensors do not match the model: "
                        f"{'; '.join(problems)}; these would run with random weights, so it is refused: "
                        "restore the complete checkpoint (save_pretrained) or check --model")


def load_model(name_or_path: str | None = None, dtype: str = "float32", device: str = "cpu",
               device_map: str | dict | None = None, verify: bool = False) -> LoadedModel:
    """Load the embedded model (default), a local directory or a cached hub id, offline.

    Args:
        name_or_path: a local model folder, a cached hub id, or None/``""``/``"embedded"`` for the embedded model.
        dtype: ``float32``, ``float16`` (not on the CPU) or ``bfloat16``.
        device: the torch device (``cpu``, ``cuda``, ``cuda:N``); checked only without ``device_map``.
        device_map: ``--device-map`` (:func:`parse_device_map`); needs accelerate.
        verify: check a local folder's files against its MANIFEST.sha256 first.

    Returns:
        The :class:`LoadedModel` (:func:`prepare_model` then :func:`load_weights`).

    Raises:
        UserError: as :func:`prepare_model`, or when the weights have missing or unexpected tensors.
    """
    return load_weights(prepare_model(name_or_path, dtype, device, device_map, verify))


# ----------------------------------------------------------------------------- prompt lengths
_UNBOUNDED = 10**9


def token_limit(processor, config) -> tuple[int | None, str]:
    """The longest prompt (in tokens, image tokens included) that is neither cut nor out of range."""
    tok = getattr(processor, "tokenizer", processor)
    found: list[tuple[int, str]] = []
    ml = getattr(tok, "init_kwargs", {}).get("max_length")
    if isinstance(ml, int) and 0 < ml < _UNBOUNDED:
        found.append((ml, "the tokenizer's fixed length (max_length in its files)"))
    backend = getattr(tok, "backend_tokenizer", None)
    trunc = getattr(backend, "truncation", None) if backend is not None else None
    if isinstance(trunc, dict) and isinstance(trunc.get("max_length"), int):
        found.append((trunc["max_length"], "the tokenizer's truncation length (tokenizer.json)"))
    mml = getattr(tok, "model_max_length", None)
    if isinstance(mml, int) and 0 < mml < _UNBOUNDED:
        found.append((mml, "the tokenizer's model_max_length"))
    text_cfg = config.get_text_config() if hasattr(config, "get_text_config") else getattr(config, "text_config",
                                                                                           config)
    mpe = getattr(text_cfg, "max_position_embeddings", None)
    if isinstance(mpe, int) and mpe > 0:
        found.append((mpe, "the model's context (max_position_embeddings)"))
    if not found:
        return None, "no limit"
    return min(found)


def _image_token_count(processor, where: str) -> int:
    """How many tokens one ``<image>`` placeholder becomes."""
    from PIL import Image

    own = placeholder(processor)
    tok = processor.tokenizer
    size = 336
    crop = getattr(getattr(processor, "image_processor", None), "crop_size", None)
    if isinstance(crop, dict) and crop.get("height"):
        size = int(crop["height"])
    enc = run_processor(processor, where, own, Image.new("RGB", (size, size)), truncation=False)
    alone = tok(own, truncation=False).input_ids
    return len(enc["input_ids"][0]) - len(alone) + 1


def sliding_window(text_config) -> int | None:
    """The text model's sliding window, where some layer has one (Mistral: every layer; Qwen2/3: the sliding layers)."""
    window = getattr(text_config, "sliding_window", None)
    layer_types = getattr(text_config, "layer_types", None)
    if not isinstance(window, int) or (layer_types and "sliding_attention" not in layer_types):
        return None
    return window


def check_prompt_lengths(prep, prompts: list[str], names: list[str] | None = None,
                         max_new_tokens: int = 0) -> int:
    """Refuse any prompt the tokenizer would cut or the model cannot position; returns the longest length.

    A prompt's length counts each image placeholder as the most tokens one image can become. It is refused past the
    tokenizer's or context's limit, past the text model's sliding window (prompt plus new tokens), past
    ``max_position_embeddings`` (prompt plus new tokens), or when the processor itself cuts the longest prompt.

    Args:
        prep: a :class:`PreparedModel` or :class:`LoadedModel` (anything with ``processor`` and a config).
        prompts: the prompts, with the portable image placeholder.
        names: which question each prompt is (named in the error); None: "the prompt".
        max_new_tokens: the tokens to be generated after the prompt (0: the prompt alone).

    Returns:
        The longest prompt's length in tokens (0 for no prompts).

    Raises:
        UserError: a prompt that would be cut or could not be positioned, naming it and the fix.
    """
    processor = prep.processor
    config = prep.config if hasattr(prep, "config") else prep.model.config
    tok = processor.tokenizer
    where = show(getattr(prep, "where", None) or getattr(prep, "source", "the model"))
    prompts = [processor_prompt(processor, p) for p in prompts]
    own = placeholder(processor)
    per_image = scheme_of(config).token_bound(config, processor) or _image_token_count(processor, where)
    limit, what = token_limit(processor, config)
    longest, longest_at = 0, 0
    for start in range(0, len(prompts), 512):
        chunk = prompts[start:start + 512]
        ids = tok(chunk, truncation=False, padding=False).input_ids
        for j, (p, row) in enumerate(zip(chunk, ids)):
            n = len(row) + p.count(own) * (per_image - 1)
            if n > longest:
                longest, longest_at = n, start + j
    if not prompts:
        return 0
    name = names[longest_at] if names else "the prompt"
    if limit is not None and longest > limit:
        raise UserError(f"{name}: the prompt is {longest} tokens ({per_image} of them for the image), more than "
                        f"the limit of {limit} ({what}); it would be cut silently: shorten --prompt or the "
                        "question, or use a model whose tokenizer and context allow longer prompts")
    text_cfg = config.get_text_config() if hasattr(config, "get_text_config") else config.text_config
    window = sliding_window(text_cfg)
    if window is not None and longest + max_new_tokens > window - 1:
        extra = f" and {max_new_tokens} new tokens" if max_new_tokens else ""
        raise UserError(f"{name}: the prompt is {longest} tokens{extra}, more than the text model's sliding window of "
                        f"{window} tokens keeps in its KV cache ({window - 1}), so cached keys would no longer line up "
                        "with the image tokens; shorten the prompt"
                        + (" or lower --max-new-tokens/--generate" if max_new_tokens else ""))
    mpe = getattr(text_cfg, "max_position_embeddings", None)
    if max_new_tokens and isinstance(mpe, int) and longest + max_new_tokens > mpe:
        raise UserError(f"{name}: the prompt is {longest} tokens and {max_new_tokens} new tokens would reach "
                        f"position {longest + max_new_tokens}, beyond the model's context of {mpe} "
                        f"(max_position_embeddings); lower --max-new-tokens/--generate to at most {mpe - longest}")
    # The processor may still cut by a rule we did not see: compare with what it really returns.
    from PIL import Image

    probe = prompts[longest_at]
    if own in probe:
        img = Image.new("RGB", (64, 64))
        n_images = probe.count(own)
        got = len(run_processor(processor, where, probe, [img] * n_images)["input_ids"][0])
        full = len(run_processor(processor, where, probe, [img] * n_images, truncation=False)["input_ids"][0])
        if got < full:
            raise UserError(f"{name}: the prompt is {full} tokens but the processor cuts it to {got}; shorten "
                            "--prompt or the question")
    return longest

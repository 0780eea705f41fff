"""Each family's published widths at any depth, with random weights: what breaks only at real width.

:data:`LLAVA_1_5_7B` holds the published configuration of ``llava-hf/llava-1.5-7b-hf`` as data
(``llava-1.5-7b.json`` beside this file): text hidden 4096, 32 heads of 128, MLP 11008,
vocabulary 32064, CLIP ViT-L/14 at 336 px (hidden 1024, 24 layers), 576 image tokens.
:func:`llava15_7b_config` builds a :class:`~transformers.LlavaConfig` from it with the number of
language and vision layers as parameters (and optional narrower widths for tests);
:func:`build_random_llava` instantiates it with seeded random weights in any dtype, on the meta
device for shapes only. The embedded model's tokenizer and processor give llava-hf's layout
(BOS, four prefix tokens, 576 image tokens at positions 5–580), so prompts have the real
length; its image and pad ids stand in for 32000/32001 inside the full 32064-row vocabulary.

The other families' published configurations sit beside it (:data:`PUBLISHED_FILES`: the
checkpoint, every value's source and what could not be confirmed are in each file).
:func:`family_config` builds one through transformers' own config class for its ``model_type``
(``AutoConfig.for_model``) at any depth, keeping what a shallow model must still have: Gemma 3's
global layer among its sliding ones, Qwen-VL's full-attention and deepstack block indexes below
the tower's depth. :func:`stand_in_processor` gives each family its own image-token layout around
the embedded tokenizer: the family's processor at its published tile size, pinpoints, tokens per
image or pixel budget, with the family's image tokens added; :func:`stand_in_token_ids` puts the
stand-in ids where the published ones were. :func:`check_family` refuses, in one line, a family
without a kept configuration or one the toolkit does not measure (``families.FAMILIES``).
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from ..embedded.build import CHAT_TEMPLATE, build_processor, build_tokenizer, padded_vocab_size
from ..errors import UserError
from .families import FAMILIES

LLAVA_1_5_7B: dict = json.loads((Path(__file__).with_name("llava-1.5-7b.json")).read_text(encoding="utf-8"))


def llava15_7b_config(text_layers: int | None = None, vision_layers: int | None = None, *,
                      image_token_id: int | None = None, pad_token_id: int | None = None,
                      widths: dict | None = None) -> LlavaConfig:
    """LLaVA-1.5-7B's configuration, with ``text_layers``/``vision_layers`` decoder layers.

    Args:
        text_layers: the text model's decoder layers (None: 32).
        vision_layers: the vision tower's layers (None: 24).
        image_token_id: replaces 32000 when a stand-in tokenizer is used.
        pad_token_id: replaces 32001 when a stand-in tokenizer is used.
        widths: overrides text/vision fields (``{"text": {...}, "vision": {...}}``) for reduced tests.

    Returns:
        The :class:`LlavaConfig`, with eager attention.
    """
    spec = copy.deepcopy(LLAVA_1_5_7B)
    text, vision = spec["text_config"], spec["vision_config"]
    if text_layers is not None:
        text["num_hidden_layers"] = int(text_layers)
    if vision_layers is not None:
        vision["num_hidden_layers"] = int(vision_layers)
    for key, value in (widths or {}).get("text", {}).items():
        text[key] = value
    for key, value in (widths or {}).get("vision", {}).items():
        vision[key] = value
    image_id = spec["image_token_index"] if image_token_id is None else int(image_token_id)
    pad_id = spec["pad_token_id"] if pad_token_id is None else int(pad_token_id)
    text["pad_token_id"] = pad_id
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**vision), text_config=LlamaConfig(**text), image_token_index=image_id,
        pad_token_id=pad_id, projector_hidden_act=spec["projector_hidden_act"],
        vision_feature_layer=spec["vision_feature_layer"],
        vision_feature_select_strategy=spec["vision_feature_select_strategy"],
        image_seq_length=spec["image_seq_length"], tie_word_embeddings=False,
    )
    config._attn_implementation = "eager"
    return config


def build_random_llava(config: LlavaConfig, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
                       seed: int = 0) -> LlavaForConditionalGeneration:
    """A LLaVA with seeded random weights (``device="meta"``: shapes only, no memory).

    Args:
        config: its configuration (e.g. :func:`llava15_7b_config`).
        dtype: the weights' dtype (not applied on ``meta``).
        device: where the weights are made; ``"meta"``: shapes only.
        seed: the torch seed the weights are drawn with.

    Returns:
        The model in eval mode, with eager attention.
    """
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlavaForConditionalGeneration(config)
    model.config._attn_implementation = "eager"
    return model.to(dtype).eval() if device != "meta" else model.eval()


def parameter_count(config: LlavaConfig) -> int:
    """Parameters of the model a config describes (counted on the meta device)."""
    return sum(p.numel() for p in build_random_llava(config, device="meta").parameters())


# ----------------------------------------------------------------------------- every family's published widths
# Each family's published configuration, as data beside this file (the checkpoint and where every value came from are
# in the file's "_source"; what could not be confirmed, in "_unconfirmed"). A family's file is used only while
# families.FAMILIES supports the family (real_width_families).
PUBLISHED_FILES: dict[str, str] = {
    "llava": "llava-1.5-7b.json",
    "llava_next": "llava-v1.6-mistral-7b.json",
    "llava_onevision": "llava-onevision-qwen2-7b-ov.json",
    "internvl": "internvl3-1b.json",
    "gemma3": "gemma-3-4b-it.json",
    "qwen2_5_vl": "qwen2.5-vl-7b-instruct.json",
    "qwen3_vl": "qwen3-vl-8b-instruct.json",
}
# The widths a reduced build narrows, per tower: the text model keeps its heads, head_dim, key-value heads and rotary
# settings (its hidden size is heads × head_dim) and narrows only its MLP and vocabulary; the tower narrows everything.
REDUCED_TEXT = {"intermediate_size": 256}
REDUCED_VISION = {"hidden_size": 32, "intermediate_size": 64}


def published(family: str) -> dict:
    """The published configuration of ``family``'s common checkpoint, as kept in its JSON file (a fresh copy)."""
    return json.loads(Path(__file__).with_name(PUBLISHED_FILES[family]).read_text(encoding="utf-8"))


def real_width_families() -> tuple[str, ...]:
    """Families with a published configuration kept that the toolkit also supports (``families.FAMILIES``)."""
    supported = {f.name for f in FAMILIES}
    return tuple(name for name in PUBLISHED_FILES if name in supported)


def check_family(family: str) -> None:
    """A one-line UserError when ``family`` cannot be built at its real widths; None when it can."""
    known = real_width_families()
    if family in known:
        return
    listed = ", ".join(known)
    if family in PUBLISHED_FILES:
        raise UserError(f"--family {family}: its published configuration is kept (models/{PUBLISHED_FILES[family]}) "
                        f"but the toolkit does not measure the family yet; choose one of: {listed}")
    raise UserError(f"--family {family!r}: not a family with a published configuration kept; choose one of: {listed}")


def _depth_key(vision: dict) -> str:
    return "depth" if "depth" in vision else "num_hidden_layers"


def _shallow_text(family: str, text: dict, layers: int) -> None:
    """``layers`` decoder layers; Gemma 3's pattern (5 sliding, 1 global) cut short ends on a global layer."""
    text["num_hidden_layers"] = layers
    if family == "gemma3":
        every = int(text.pop("sliding_window_pattern", 6))
        kinds = ["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(layers)]
        if "full_attention" not in kinds:
            kinds[-1] = "full_attention"
        text["layer_types"] = kinds
    if "max_window_layers" in text:
        text["max_window_layers"] = min(int(text["max_window_layers"]), layers)


def _shallow_vision(vision: dict, layers: int) -> None:
    """``layers`` tower layers; the block indexes Qwen-VL names (full attention, deepstack) kept below the depth."""
    vision[_depth_key(vision)] = layers
    for key in ("fullatt_block_indexes", "deepstack_visual_indexes"):
        if key in vision:
            vision[key] = [i for i in vision[key] if i < layers] or [layers - 1]


def family_config(family: str, text_layers: int | None = None, vision_layers: int | None = None, *,
                  widths: dict | None = None, token_ids: dict | None = None):
    """``family``'s published configuration with ``text_layers``/``vision_layers`` layers (None: as published).

    Args:
        family: a key of :data:`PUBLISHED_FILES`.
        text_layers: the decoder's depth.
        vision_layers: the tower's depth.
        widths: ``{"text": {...}, "vision": {...}}`` fields to override (reduced tests).
        token_ids: fields to set from a stand-in tokenizer (:func:`stand_in_token_ids`); a ``text_config.``
            prefix sets a field of the text config.

    Returns:
        The family's transformers config (``AutoConfig.for_model``), eager attention.
    """
    spec = {k: v for k, v in published(family).items() if not k.startswith("_")}
    text, vision = spec["text_config"], spec["vision_config"]
    if text_layers is not None:
        _shallow_text(family, text, int(text_layers))
    text.pop("sliding_window_pattern", None)  # transformers 5 derives layer_types from it; kept as data only
    if vision_layers is not None:
        _shallow_vision(vision, int(vision_layers))
    for key, value in (widths or {}).get("text", {}).items():
        text[key] = value
    for key, value in (widths or {}).get("vision", {}).items():
        vision[key] = value
    for key, value in (token_ids or {}).items():
        if key.startswith("text_config."):
            text[key.removeprefix("text_config.")] = value
        else:
            spec[key] = value
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    config._attn_implementation = "eager"
    return config


def reduced_widths(family: str, vocab_size: int) -> dict:
    """Widths for a CPU test: the text model's attention as published (heads, head_dim, key-value heads, rotary), its
    MLP and vocabulary narrowed; the tower narrowed (2 heads of 16), its image geometry as published."""
    vision = published(family)["vision_config"]
    heads = "num_heads" if "num_heads" in vision else "num_attention_heads"
    narrow = {**REDUCED_VISION, heads: 2}
    if "projection_dim" in vision:
        narrow["projection_dim"] = 32
    return {"text": {**REDUCED_TEXT, "vocab_size": vocab_size}, "vision": narrow}


def architecture(family: str):
    """The transformers class ``family``'s checkpoints load as (``families.FAMILIES``; a family kept as data only:
    transformers' image-text-to-text class for its model_type)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    name = next((f.architecture for f in FAMILIES if f.name == family), None)
    return getattr(transformers, name or MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES[published(family)["model_type"]])


def build_random_model(config, family: str, *, dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0,
                       norms_away_from_one: bool = False):
    """``family``'s model with seeded random weights (``device="meta"``: shapes only).

    Args:
        config: its configuration.
        family: the family (:func:`architecture` picks its model class).
        dtype: the weights' dtype (not applied on ``meta``).
        device: where the weights are made; ``"meta"``: shapes only.
        seed: the torch seed the weights are drawn with.
        norms_away_from_one: draw every norm weight around its identity value (1, or 0 for Gemma's ``1 + w``; a
            standard deviation of 0.5), so a look-ahead that skipped or misplaced a norm would show.

    Returns:
        The model in eval mode, with eager attention.
    """
    torch.manual_seed(seed)
    with torch.device(device):
        model = architecture(family)(config)
    model.config._attn_implementation = "eager"
    if norms_away_from_one and device != "meta":
        centre = 0.0 if family == "gemma3" else 1.0
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name and name.endswith("weight"):
                    p.copy_(torch.randn_like(p) * 0.5 + centre)
    return model.to(dtype).eval() if device != "meta" else model.eval()


def family_parameter_count(family: str, config=None) -> int:
    """Parameters of ``family``'s model at ``config`` (its full published one by default), counted on the meta
    device."""
    model = build_random_model(config or family_config(family), family, device="meta")
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- stand-in processors
# The embedded model's tokenizer, with each family's image tokens added, and each family's image processor at its
# published preprocessing (tile size, pinpoints, pixel budget): prompts get the family's real image-token layout and
# length; the stand-in ids replace the published ones inside the full vocabulary (stand_in_token_ids).
QWEN_TOKENS = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"]
GEMMA3_TOKENS = {"boi_token": "<start_of_image>", "image_token": "<image_soft_token>", "eoi_token": "<end_of_image>"}
INTERNVL_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                   "video_token": "<video>"}


def _llava_next(spec: dict):
    from transformers import LlavaNextProcessor
    from transformers.models.llava_next import LlavaNextImageProcessorPil

    side = spec["vision_config"]["image_size"]
    images = LlavaNextImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                                        image_grid_pinpoints=spec["image_grid_pinpoints"], do_pad=True)
    return LlavaNextProcessor(image_processor=images, tokenizer=build_tokenizer(), chat_template=CHAT_TEMPLATE,
                              patch_size=spec["vision_config"]["patch_size"], num_additional_image_tokens=1,
                              vision_feature_select_strategy=spec["vision_feature_select_strategy"])


def _onevision(spec: dict):
    from tokenizers.processors import TemplateProcessing
    from transformers.models.llava_onevision import LlavaOnevisionImageProcessorPil

    from .onevision import OnevisionImageProcessor

    tok = build_tokenizer()  # Qwen2's tokenizers add no BOS
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="$A", pair="$A $B", special_tokens=[])
    tok.add_bos_token = False
    v = spec["vision_config"]
    images = LlavaOnevisionImageProcessorPil(size={"height": v["image_size"], "width": v["image_size"]},
                                             image_grid_pinpoints=spec["image_grid_pinpoints"], do_pad=True)
    return OnevisionImageProcessor(image_processor=images, tokenizer=tok, chat_template=CHAT_TEMPLATE,
                                   num_image_tokens=(v["image_size"] // v["patch_size"]) ** 2,
                                   vision_feature_select_strategy=spec["vision_feature_select_strategy"],
                                   vision_aspect_ratio=spec["vision_aspect_ratio"])


def _internvl(spec: dict):
    from transformers import AutoTokenizer
    from transformers.models.got_ocr2 import GotOcr2ImageProcessorPil

    from .internvl import ImageInternVLProcessor

    with tempfile.TemporaryDirectory() as tmp:
        build_tokenizer().save_pretrained(tmp)
        tok = AutoTokenizer.from_pretrained(tmp, extra_special_tokens=INTERNVL_TOKENS)
    side = spec["vision_config"]["image_size"][0]
    images = GotOcr2ImageProcessorPil(size={"height": side, "width": side}, min_patches=1, max_patches=12)
    return ImageInternVLProcessor(image_processor=images, tokenizer=tok, image_seq_length=spec["image_seq_length"],
                                  chat_template=CHAT_TEMPLATE)


def _gemma3(spec: dict):
    from transformers import Gemma3Processor

    try:
        from transformers.models.gemma3 import Gemma3ImageProcessorPil as ImageProcessor
    except ImportError:  # 5.18 names the PIL processor Gemma3ImageProcessor
        from transformers.models.gemma3 import Gemma3ImageProcessor as ImageProcessor
    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>", *GEMMA3_TOKENS.values()]})
    tok._set_model_specific_special_tokens(GEMMA3_TOKENS)  # tok.boi_token, tok.image_token_id, …
    side = spec["vision_config"]["image_size"]
    images = ImageProcessor(size={"height": side, "width": side})
    return Gemma3Processor(image_processor=images, tokenizer=tok, image_seq_length=spec["mm_tokens_per_image"],
                           chat_template=CHAT_TEMPLATE)


def _qwen_vl(spec: dict):
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>", *QWEN_TOKENS]})
    tok.chat_template = CHAT_TEMPLATE
    v = spec["vision_config"]
    images = Qwen2VLImageProcessorPil(patch_size=v["patch_size"], merge_size=v["spatial_merge_size"],
                                      temporal_patch_size=v["temporal_patch_size"])  # Qwen's published pixel budget
    return images, tok


STAND_INS = {"llava_next": _llava_next, "llava_onevision": _onevision, "internvl": _internvl, "gemma3": _gemma3,
             "qwen2_5_vl": _qwen_vl, "qwen3_vl": _qwen_vl}  # Qwen3-VL: Qwen2-VL's image processor, 16-px patches


def stand_in_processor(family: str):
    """``family``'s stand-in processor (Qwen-VL: its ``(image processor, tokenizer)``, saved side by side)."""
    if family == "llava":
        return build_processor()
    return STAND_INS[family](published(family))


def processor_tokenizer(processor):
    return processor[1] if isinstance(processor, tuple) else processor.tokenizer


def stand_in_token_ids(family: str, processor) -> dict:
    """The config fields that name tokens, set to the stand-in tokenizer's ids (see :func:`family_config`)."""
    tok = processor_tokenizer(processor)
    ids = tok.convert_tokens_to_ids
    pad = {"text_config.pad_token_id": tok.pad_token_id, "text_config.bos_token_id": tok.bos_token_id,
           "text_config.eos_token_id": tok.eos_token_id}
    if family in ("llava", "llava_next", "llava_onevision"):
        return {**pad, "image_token_index": ids("<image>"), "pad_token_id": tok.pad_token_id}
    if family == "internvl":
        return {**pad, "image_token_id": tok.context_image_token_id}
    if family == "gemma3":
        return {**pad, "image_token_index": tok.image_token_id, "boi_token_index": tok.boi_token_id,
                "eoi_token_index": tok.eoi_token_id, "eos_token_id": tok.eos_token_id}
    return {**pad, "image_token_id": ids("<|image_pad|>"), "video_token_id": ids("<|video_pad|>"),
            "vision_start_token_id": ids("<|vision_start|>"), "vision_end_token_id": ids("<|vision_end|>")}


def save_stand_in(family: str, processor, folder) -> None:
    """Save the stand-in processor as the family's checkpoints lay theirs out, so ``load_model(folder)`` reads it."""
    if isinstance(processor, tuple):  # Qwen-VL: no video processor (the toolkit measures images)
        for part in processor:
            part.save_pretrained(folder)
        return
    if family == "llava_onevision":
        from .onevision import save_processor

        save_processor(processor, folder)
        return
    processor.save_pretrained(folder)
    if family == "internvl":
        for name in ("processor_config.json", "tokenizer_config.json"):  # named as real checkpoints name it
            file = Path(folder) / name
            file.write_text(json.dumps({**json.loads(file.read_text()), "processor_class": "InternVLProcessor"}))


def stand_in_vocabulary(family: str, processor) -> int:
    """The reduced vocabulary a test gives ``family``'s stand-in tokenizer."""
    return padded_vocab_size(processor_tokenizer(processor))

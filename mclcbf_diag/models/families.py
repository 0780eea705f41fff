"""The model families the toolkit supports, and which checkpoints each covers, without torch.

One :class:`Family` per architecture the adapter knows (:data:`~mclcbf_diag.models.adapter.ADAPTERS`
is built from :data:`FAMILIES`, so a family listed here has an adapter and the reverse).
``mclcbf-diag models`` prints this table.

:func:`config_problem` decides from ``config.json`` alone (a dict: no torch, no transformers,
microseconds) whether the toolkit can measure a checkpoint exactly, and if not says why in one
line: the architecture (``model_type``), the text backbone (``text_config.model_type``, see
:data:`TEXT_BACKBONES`) and the optional packages its vision tower needs. :func:`check_config`
raises it as a UserError; the CLI applies it to ``--model``'s config.json (a local folder or a cached hub
id, :func:`config_file`) before torch loads.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError


@dataclass(frozen=True)
class Family:
    name: str  # the adapter's short name
    architecture: str  # transformers' class, config.json's "architectures"
    model_type: str  # config.json's "model_type"
    layout: str  # how a prompt looks to the model, in one line
    checked: tuple[str, ...]  # checkpoints the toolkit is run on (tests, README, notebooks)
    covers: str  # which other checkpoints share the layout
    not_covered: str = ""  # near relatives that need more than this adapter
    # what the processor gives per image, where it is not one pixel tensor [3, H, W] per image or tile (a method
    # whose view is built from that tensor, Intervention.reads_pixels, cannot run on it); "": such a tensor
    flat_pixels: str = ""


FAMILIES: tuple[Family, ...] = (
    Family(
        name="llava",
        architecture="LlavaForConditionalGeneration",
        model_type="llava",
        layout="llava-hf layout (transformers 5.x): a decoder-only text model with a CLIP-style vision tower and an "
               "MLP projector; one fixed-size image per prompt, its tokens in place of the processor's placeholder "
               "(prompts write <image>)",
        checked=("the embedded model (mclcbf_diag/embedded, the default --model; the test suite)",
                 "llava-hf/llava-1.5-7b-hf (README examples, notebooks/04_llava_7b_on_gpu.ipynb)"),
        covers="other LlavaForConditionalGeneration checkpoints whose text model is Llama, Mistral, Qwen2, Qwen3 or "
               "Gemma (tiny random checkpoints of each in the tests: the look-ahead, masses, norms and margin against "
               "plain forwards; no real weights but llava-1.5-7b have been run)",
        not_covered="Idefics3/SmolVLM, PaliGemma, "
                    "Mistral 3, Mllama and other architectures, and text models other than those above: "
                    "refused from config.json, before anything loads",
    ),
    Family(
        name="llava_next",
        architecture="LlavaNextForConditionalGeneration",
        model_type="llava_next",
        layout="LLaVA-NeXT (anyres): the llava-hf layout, with each image's tokens a base grid (the whole picture at "
               "the tower's size), then its high-resolution tiles without padding, one newline token per row "
               "(models/anyres.py); the processor adds per-image image_sizes, which batching passes on",
        checked=("a tiny random checkpoint built in the tests (trace and pope's batched, cached-prefix path against "
                 "plain forwards); no real weights have been run",),
        covers="LlavaNextForConditionalGeneration checkpoints (llava-hf/llava-v1.6-*) whose text model is one of the "
               "llava family's; the page's overlay draws the base grid",
        not_covered="LLaVA-NeXT-Video: refused from config.json",
    ),
    Family(
        name="llava_onevision",
        architecture="LlavaOnevisionForConditionalGeneration",
        model_type="llava_onevision",
        layout="LLaVA-OneVision (anyres_max_N): LLaVA-NeXT's layout (base grid, unpadded tiles, a newline per row; "
               "a SigLIP tower without CLS, so the base grid is all p² features), the tile map resized (bilinear) "
               "to about N tiles' patches when larger (models/anyres.py); batching passes image_sizes; the "
               "processor is read for images only (models/onevision.py), so torchvision is not needed",
        checked=("a tiny random checkpoint built in the tests (SigLIP tower, Qwen2 text model without a BOS: trace, "
                 "explain, flow and pope's batched, cached-prefix path against plain forwards); no real weights "
                 "have been run",),
        covers="LlavaOnevisionForConditionalGeneration checkpoints (llava-hf/llava-onevision-qwen2-*-ov-hf, "
               "-si-hf) whose text model is one of the llava family's, one image per prompt; the page's overlay "
               "draws the base grid",
        not_covered="a vision_aspect_ratio other than anyres_max_N (refused from config.json); videos and several "
                    "images in one prompt (every prompt holds one <image>)",
    ),
    Family(
        name="internvl",
        architecture="InternVLForConditionalGeneration",
        model_type="internvl",
        layout="InternVL (transformers' native form): an InternViT tower whose patch map is pixel-shuffled and "
               "projected by an MLP; an image is its tiles and, with more than one, a thumbnail: <img>, then "
               "image_seq_length <IMG_CONTEXT> tokens per tile (one grid each), then </img> (models/internvl.py); "
               "prompts write <image> for the processor's <IMG_CONTEXT>",
        checked=("a tiny random checkpoint built in the tests (Qwen2 text model; one tile and several tiles per "
                 "image: trace and pope's batched, cached-prefix path against plain forwards; explain and flow "
                 "run); no real weights have been run",),
        covers="InternVLForConditionalGeneration checkpoints (OpenGVLab/InternVL3-1B-hf and the other -hf "
               "conversions) whose text model is one of the llava family's; the page's overlay draws the whole "
               "picture's grid (the thumbnail, or the only tile); the processor loads without torchvision",
        not_covered="the remote-code InternVL checkpoints (internvl_chat) and other text models (InternLM, "
                    "GPT-OSS): refused from config.json; video inputs are never passed",
    ),
    Family(
        name="gemma3",
        architecture="Gemma3ForConditionalGeneration",
        model_type="gemma3",
        layout="Gemma 3: a SigLIP tower whose patches are average-pooled to mm_tokens_per_image soft tokens (a square "
               "grid) between <start_of_image> and <end_of_image> (prompts write <image>, the processor's "
               "<start_of_image>); the tokens of one image attend to each other both ways (the processor's "
               "token_type_ids, which batching passes on), the text causally; sliding-window layers interleaved "
               "with global ones, each type with its own rotary base",
        checked=("a tiny random checkpoint built in the tests (trace, explain, flow and pope's batched, "
                 "cached-prefix path against plain forwards); no real weights have been run",),
        covers="Gemma3ForConditionalGeneration checkpoints (google/gemma-3-4b/12b/27b-it and -pt) without "
               "pan-and-scan; the overlay draws the pooled grid",
        not_covered="pan-and-scan crops (do_pan_and_scan in preprocessor_config.json) are refused before the "
                    "weights load; attention logit soft-capping and bidirectional text attention are refused from "
                    "config.json; direct logit attribution (attribute) is refused (Gemma 3 normalises each "
                    "attention and MLP output); PaliGemma and Gemma 3n: refused",
    ),
    Family(
        name="qwen2_5_vl",
        architecture="Qwen2_5_VLForConditionalGeneration",
        model_type="qwen2_5_vl",
        flat_pixels="each image as flattened patches of a dynamic-resolution grid (pixel_values [patches, "
                    "C·T·p·p] with image_grid_thw)",
        layout="Qwen2.5-VL: dynamic-resolution images (any aspect ratio), each image's patches merged 2 × 2 into "
               "<|image_pad|> tokens in row-major order over the merged grid, between <|vision_start|> and "
               "<|vision_end|>; 3-D M-RoPE positions from the model's get_rope_index (models/mrope.py); the processor "
               "adds per-image image_grid_thw and flattened patches, which batching splits per image",
        checked=("a tiny random checkpoint built in the tests (trace, pope's batched and cached-prefix path, "
                 "explain's units, OPERA, the attention site and attribute's patching against plain forwards; explain "
                 "and flow run); no real weights have been run",),
        covers="Qwen2_5_VLForConditionalGeneration checkpoints (Qwen/Qwen2.5-VL-*-Instruct), images only (the "
               "processor is built from the image processor and tokenizer, without torchvision's video processor); "
               "the page's overlay draws the merged (h/2) × (w/2) grid; the default prompt is LLaVA's: give Instruct "
               "checkpoints their chat format with --prompt '<|im_start|>user\\n<image>{question}<|im_end|>\\n"
               "<|im_start|>assistant\\n' (<image> becomes <|vision_start|><|image_pad|><|vision_end|>)",
        not_covered="video inputs; VCD's distorted image (flattened patches: refused in one line)",
    ),
    Family(
        name="qwen2_vl",
        architecture="Qwen2VLForConditionalGeneration",
        model_type="qwen2_vl",
        flat_pixels="each image as flattened patches of a dynamic-resolution grid (pixel_values [patches, "
                    "C·T·p·p] with image_grid_thw)",
        layout="Qwen2-VL: Qwen2.5-VL's image layout and 3-D M-RoPE positions (models/mrope.py), with a "
               "full-attention vision tower",
        checked=("a tiny random checkpoint built in the tests (trace and pope's batched, cached-prefix path against "
                 "plain forwards); no real weights have been run",),
        covers="Qwen2VLForConditionalGeneration checkpoints (Qwen/Qwen2-VL-*-Instruct), images only",
        not_covered="video inputs",
    ),
    Family(
        name="qwen3_vl",
        architecture="Qwen3VLForConditionalGeneration",
        model_type="qwen3_vl",
        flat_pixels="each image as flattened patches of a dynamic-resolution grid (pixel_values [patches, "
                    "C·T·p·p] with image_grid_thw)",
        layout="Qwen3-VL: Qwen2.5-VL's image layout (16-px patches merged 2 × 2 into <|image_pad|> tokens) and 3-D "
               "M-RoPE positions (models/mrope.py; the rotary module interleaves the three axes), a Qwen3 text "
               "model (per-head q/k norms), and deepstack: features of intermediate vision layers added to the "
               "image tokens' residual after the first decoder layers, which batching and every forward fed "
               "embeddings pass on (models/deepstack.py)",
        checked=("a tiny random checkpoint built in the tests (two deepstack levels: trace, pope's batched and "
                 "cached-prefix path, explain's units, VISTA and OPERA from kept embeddings, attribute's patching "
                 "and localisation against plain forwards; explain and flow run); no real weights have been run",),
        covers="Qwen3VLForConditionalGeneration checkpoints (Qwen/Qwen3-VL-*-Instruct, -Thinking), images only; "
               "the page's overlay draws the merged grid; give Instruct checkpoints their chat format with --prompt, "
               "as for Qwen2.5-VL",
        not_covered="video inputs (timestamps); the mixture-of-experts Qwen3-VL-MoE: refused from config.json; "
                    "VCD's and CausalMM's distorted image (flattened patches): refused in one line",
    ),
)


# Text backbones whose decoder layer the look-ahead reproduces exactly (models/adapter.py TEXT_MATH:
# the norm, q/k-norm, attention scaling and sliding window of each), with the name users know them by.
TEXT_BACKBONES: dict[str, str] = {
    "llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "gemma": "Gemma",
}

# Families whose text model is their own: model_type → the text backbones it may carry (only there; the first is
# what a config.json without text_config.model_type implies: older Qwen-VL files are flat). Qwen-VL's runs on 3-D
# M-RoPE positions that only its own family computes.
OWN_BACKBONES: dict[str, dict[str, str]] = {
    "gemma3": {"gemma3_text": "Gemma 3"},
    "qwen2_5_vl": {"qwen2_5_vl_text": "Qwen2.5-VL's Qwen2"},
    "qwen2_vl": {"qwen2_vl_text": "Qwen2-VL's Qwen2"},
    "qwen3_vl": {"qwen3_vl_text": "Qwen3-VL's Qwen3"},
}

# Architectures users meet that the toolkit does not measure (yet): config.json's model_type → (name, why).
_LLAVA_LAYOUT = "a LLaVA-family layout the toolkit does not measure yet ({})"
KNOWN_UNSUPPORTED: dict[str, tuple[str, str]] = {
    "llava_next_video": ("LLaVA-NeXT-Video", _LLAVA_LAYOUT.format("anyres tiles and video frames")),
    "vipllava": ("VipLLaVA", _LLAVA_LAYOUT.format("a multi-layer vision projector")),
    "video_llava": ("Video-LLaVA", _LLAVA_LAYOUT.format("video and image towers")),
    "qwen3_vl_moe": ("Qwen3-VL-MoE", "a mixture-of-experts text model with deepstack vision features, not measured "
                                     "yet"),
    "idefics3": ("Idefics3", "image splitting with a pixel-shuffle connector, not measured yet"),
    "smolvlm": ("SmolVLM", "image splitting with a pixel-shuffle connector, not measured yet"),
    "idefics2": ("Idefics2", "a perceiver resampler, not measured yet"),
    "paligemma": ("PaliGemma", "bidirectional attention over the image and prefix, not measured yet"),
    "internvl_chat": ("InternVL (remote code)", "custom modelling code, which mclcbf-diag never runs"),
    "mistral3": ("Mistral 3", "a Pixtral tower with a patch merger, not measured yet"),
    "mllama": ("Llama 3.2 Vision (Mllama)", "cross-attention image layers instead of image tokens, "
                                            "which the image-attention measurements do not apply to"),
    "aya_vision": ("Aya Vision", "a pixel-shuffle connector with image tiles, not measured yet"),
    "llama4": ("Llama 4", "a mixture-of-experts text model with chunked attention, not measured yet"),
}
TEXT_ONLY = set(TEXT_BACKBONES) | {"phi", "phi3", "gemma2", "gemma3_text", "qwen3_moe", "qwen2_moe", "mixtral",
                                   "qwen2_5_vl_text", "qwen2_vl_text", "qwen3_vl_text"}

# Vision towers that need an optional package the core install leaves out: model_type → (package, why).
VISION_PACKAGES: dict[str, tuple[str, str]] = {
    "pixtral": ("torchvision", "the Pixtral image processor"),
}

SUPPORTED_HINT = "run `mclcbf-diag models` for the supported families"


def article(word: str) -> str:
    """``a`` or ``an`` before ``word`` (by its first letter: 'an InternVL', 'an Idefics3', 'a LLaVA-NeXT')."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def _supported() -> str:
    return ", ".join(f"{f.name} ({f.architecture}, model_type {f.model_type!r})" for f in FAMILIES)


def config_problem(cfg: dict, has_package=lambda name: importlib.util.find_spec(name) is not None) -> str | None:
    """Why the checkpoint with this ``config.json`` cannot be measured exactly (one clause), or None.

    Torch-free: reads the dict only. ``has_package`` says whether an optional package is
    installed (injectable for tests).
    """
    model_type = cfg.get("model_type")
    families = {f.model_type: f for f in FAMILIES}
    if model_type not in families:
        if model_type in KNOWN_UNSUPPORTED:
            name, why = KNOWN_UNSUPPORTED[model_type]
            return (f"{article(name)} {name} checkpoint (model_type {model_type!r}): {why}; supported today: "
                    f"{_supported()}")
        if model_type in TEXT_ONLY:
            return (f"a text-only {model_type!r} model with no vision tower; pass a vision-language checkpoint "
                    f"({_supported()})")
        shown = repr(model_type) if isinstance(model_type, str) else "missing"
        return f"config.json's model_type is {shown}, not a family mclcbf-diag knows; supported: {_supported()}"
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    allowed = OWN_BACKBONES.get(model_type, TEXT_BACKBONES)
    backbone = text.get("model_type", next(iter(allowed)))  # LlavaConfig's default: Llama; flat Qwen-VL files: theirs
    if backbone not in allowed:
        known = ", ".join(allowed.values())
        return (f"a {model_type!r} checkpoint whose text model is {backbone!r}, whose attention the look-ahead "
                f"does not reproduce exactly yet; supported text models: {known}")
    if model_type == "gemma3" and (problem := _gemma3_problem(text)):
        return problem
    vision = cfg.get("vision_config") if isinstance(cfg.get("vision_config"), dict) else {}
    if model_type == "llava_onevision" and (problem := onevision_problem(cfg)) is not None:
        return problem
    tower = vision.get("model_type")
    if tower in VISION_PACKAGES and not has_package(VISION_PACKAGES[tower][0]):
        package, why = VISION_PACKAGES[tower]
        return (f"its {tower!r} vision tower needs the {package} package ({why}), which is not installed; "
                f"install it (pip install {package})")
    return None


def onevision_problem(cfg: dict) -> str | None:
    """Why a LLaVA-OneVision ``config.json`` lays out image tokens the toolkit does not reproduce, or None."""
    from .anyres import max_patches  # the one parse of "anyres_max_N" (numpy only, no torch)

    aspect = cfg.get("vision_aspect_ratio", "anyres_max_9")
    if max_patches(aspect) is None:
        return (f"a LLaVA-OneVision checkpoint whose vision_aspect_ratio is {aspect!r}, not 'anyres_max_N', whose "
                "image-token layout the toolkit does not reproduce")
    return None


def _gemma3_problem(text: dict) -> str | None:
    """What a Gemma 3 text config switches on that the look-ahead does not reproduce (None: nothing)."""
    cap = text.get("attn_logit_softcapping")
    if cap is not None:
        return (f"a Gemma 3 checkpoint with attention logit soft-capping (attn_logit_softcapping={cap}), which the "
                "look-ahead does not reproduce; set it to null in config.json (Gemma 3's published value)")
    if text.get("use_bidirectional_attention"):
        return ("a Gemma 3 checkpoint whose text attends bidirectionally (use_bidirectional_attention), which "
                "the decision token's causal look-ahead does not reproduce; use a causal Gemma 3")
    return None


def read_config(path: Path, shown: str) -> dict:
    """``config.json`` at ``path`` as a dict, or a one-line UserError."""
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise UserError(f"--model {shown}: config.json is unreadable ({type(exc).__name__}: {first}); restore the "
                        "checkpoint's config.json") from None
    if not isinstance(cfg, dict):
        raise UserError(f"--model {shown}: config.json is not a JSON object; restore it")
    return cfg


def config_file(model: str) -> Path | None:
    """The config.json of a local folder, or of a hub id in the local cache (None: not found here)."""
    folder = Path(model).expanduser()
    if folder.is_dir():
        path = folder / "config.json"
        return path if path.is_file() else None
    if model.count("/") != 1 or model.startswith((".", "/", "~")):
        return None
    from huggingface_hub import try_to_load_from_cache  # torch-free, a tenth of a second

    found = try_to_load_from_cache(model, "config.json")
    return Path(found) if isinstance(found, str) else None


def family_of(model_type: object) -> Family | None:
    """The family of config.json's ``model_type`` (None: not one of :data:`FAMILIES`)."""
    return next((f for f in FAMILIES if f.model_type == model_type), None)


def check_config(cfg: dict, shown: str) -> None:
    """A one-line UserError when :func:`config_problem` finds one."""
    problem = config_problem(cfg)
    if problem:
        raise UserError(f"--model {shown}: {problem}; {SUPPORTED_HINT}")

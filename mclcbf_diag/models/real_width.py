"""LLaVA-1.5-7B's exact widths at any depth, with random weights: what breaks only at real width.

:data:`LLAVA_1_5_7B` holds the published configuration of ``llava-hf/llava-1.5-7b-hf`` as data
(``llava-1.5-7b.json`` beside this file): text hidden 4096, 32 heads of 128, MLP 11008,
vocabulary 32064, CLIP ViT-L/14 at 336 px (hidden 1024, 24 layers), 576 image tokens.
:func:`llava15_7b_config` builds a :class:`~transformers.LlavaConfig` from it with the number of
language and vision layers as parameters (and optional narrower widths for tests);
:func:`build_random_llava` instantiates it with seeded random weights in any dtype, on the meta
device for shapes only. The embedded model's tokenizer and processor give llava-hf's layout
(BOS, four prefix tokens, 576 image tokens at positions 5–580), so prompts have the real
length; its image and pad ids stand in for 32000/32001 inside the full 32064-row vocabulary.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

LLAVA_1_5_7B: dict = json.loads((Path(__file__).with_name("llava-1.5-7b.json")).read_text(encoding="utf-8"))


def llava15_7b_config(text_layers: int | None = None, vision_layers: int | None = None, *,
                      image_token_id: int | None = None, pad_token_id: int | None = None,
                      widths: dict | None = None) -> LlavaConfig:
    """LLaVA-1.5-7B's configuration, with ``text_layers``/``vision_layers`` decoder layers (None: 32/24).

    ``image_token_id``/``pad_token_id`` replace 32000/32001 when a stand-in tokenizer is used.
    ``widths`` overrides text/vision fields (``{"text": {...}, "vision": {...}}``) for reduced tests.
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
    """A LLaVA with seeded random weights (``device="meta"``: shapes only, no memory)."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlavaForConditionalGeneration(config)
    model.config._attn_implementation = "eager"
    return model.to(dtype).eval() if device != "meta" else model.eval()


def parameter_count(config: LlavaConfig) -> int:
    """Parameters of the model a config describes (counted on the meta device)."""
    return sum(p.numel() for p in build_random_llava(config, device="meta").parameters())

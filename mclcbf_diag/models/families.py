"""The model families the toolkit supports, and which checkpoints each covers, without torch.

One :class:`Family` per architecture the adapter knows (:data:`~mclcbf_diag.models.adapter.ADAPTERS`
is built from :data:`FAMILIES`, so a family listed here has an adapter and the reverse).
``mclcbf-diag models`` prints this table.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str  # the adapter's short name
    architecture: str  # transformers' class, config.json's "architectures"
    model_type: str  # config.json's "model_type"
    layout: str  # how a prompt looks to the model, in one line
    checked: tuple[str, ...]  # checkpoints the toolkit is run on (tests, README, notebooks)
    covers: str  # which other checkpoints share the layout
    not_covered: str = ""  # near relatives that need more than this adapter


FAMILIES: tuple[Family, ...] = (
    Family(
        name="llava",
        architecture="LlavaForConditionalGeneration",
        model_type="llava",
        layout="llava-hf layout (transformers 5.x): a Llama-family decoder with a CLIP vision tower and an MLP "
               "projector; one fixed-size image per prompt, its tokens in place of <image>",
        checked=("the embedded model (mclcbf_diag/embedded, the default --model; the test suite)",
                 "llava-hf/llava-1.5-7b-hf (README examples, notebooks/04_llava_7b_on_gpu.ipynb)"),
        covers="other llava-hf LlavaForConditionalGeneration checkpoints with a Llama-family decoder (e.g. "
               "llava-hf/llava-1.5-13b-hf): same module paths, not run here",
        not_covered="LLaVA-NeXT (LlavaNextForConditionalGeneration: per-image image_sizes) and other "
                    "architectures: refused at load with the supported list",
    ),
)

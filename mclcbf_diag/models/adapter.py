"""Where the toolkit finds each part of a LLaVA-style model.

An adapter is declarative: it names module paths (dotted, relative to the
``LlavaForConditionalGeneration`` or to one decoder layer) and nothing else. Code that
needs "layer 12's input norm" asks the adapter instead of spelling
``model.model.language_model.layers[12].input_layernorm``, so a second architecture is
one more adapter, not a change to the measurements.

:data:`LLAVA` describes llava-hf's layout in transformers 5.x, which the embedded model
shares exactly. Its processor returns one fixed-shape ``pixel_values`` image per prompt and
nothing else per image, which is what :func:`mclcbf_diag.batch.batch_inputs` batches; an
architecture whose processor adds per-image outputs (LLaVA-NeXT's ``image_sizes``) needs
its adapter and that batching step extended together, with a test on such a model.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import lru_cache

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from .families import FAMILIES
from .projection import LayerWeights

CACHE_KEYWORDS = ("cache", "past_key_values")
"""The KV cache's keyword, newest first: transformers 5.24 renamed ``past_key_values``."""


@lru_cache(maxsize=None)
def _cache_keyword(forward) -> str:
    params = inspect.signature(forward).parameters
    for name in CACHE_KEYWORDS:
        if name in params:
            return name
    raise TypeError(f"{forward.__qualname__} takes no KV cache argument ({', '.join(CACHE_KEYWORDS)})")


def cache_keyword(module: torch.nn.Module) -> str:
    """The keyword under which ``module.forward`` takes the KV cache in this transformers.

    transformers ≤ 5.23 calls it ``past_key_values``; 5.24 calls it ``cache`` (the old name
    still works, with a deprecation warning, until 5.40). The installed release's own
    signature decides, so nothing depends on parsing version numbers; model outputs use
    the same name for the cache they return.
    """
    return _cache_keyword(type(module).forward)


@dataclass(frozen=True)
class ArchitectureAdapter:
    """Module paths of one architecture (dotted; ``layer_*`` are relative to a layer)."""

    language_model: str
    layers: str
    rotary_emb: str
    final_norm: str
    unembed: str
    vision_tower: str
    projector: str
    layer_input_norm: str
    layer_attention: str
    layer_post_attention_norm: str
    layer_mlp: str
    layer_q_proj: str
    layer_k_proj: str
    layer_v_proj: str
    layer_o_proj: str
    # nnsight path to the softmax inside the layer's eager attention (post-softmax edits)
    layer_attention_softmax: str
    # the architecture's own math, for look-aheads of a layer's attention (models/projection.py)
    norm_kind: str = "rms"  # "rms" (RMSNorm, eps in .variance_epsilon) | "layer" (LayerNorm, .eps)
    rotary: object = apply_rotary_pos_emb  # (q, k, cos, sin, unsqueeze_dim) → (q, k)

    def get(self, root: torch.nn.Module, path: str) -> torch.nn.Module:
        return root.get_submodule(path)

    def decoder_layers(self, model: torch.nn.Module) -> torch.nn.ModuleList:
        return model.get_submodule(self.layers)

    def layer_part(self, model: torch.nn.Module, index: int, part: str) -> torch.nn.Module:
        """``part`` is a field name such as ``"layer_input_norm"``."""
        return self.decoder_layers(model)[index].get_submodule(getattr(self, part))

    def norm_eps(self, norm: torch.nn.Module) -> float:
        """The epsilon of a norm module of this architecture."""
        return float(norm.variance_epsilon if self.norm_kind == "rms" else norm.eps)

    def layer_weights(self, model: torch.nn.Module, index: int) -> LayerWeights:
        """Decoder layer ``index``'s input norm and q/k projections, with this architecture's math."""
        get = lambda part: self.layer_part(model, index, part)  # noqa: E731
        norm, q, k, attn = get("layer_input_norm"), get("layer_q_proj"), get("layer_k_proj"), get("layer_attention")
        cfg = model.config.get_text_config()
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        detach = lambda t: None if t is None else t.detach()  # noqa: E731
        return LayerWeights(
            ln_weight=norm.weight.detach(), ln_eps=self.norm_eps(norm),
            q_weight=q.weight.detach(), q_bias=detach(q.bias), k_weight=k.weight.detach(), k_bias=detach(k.bias),
            n_heads=cfg.num_attention_heads, n_kv_heads=cfg.num_key_value_heads, head_dim=head_dim,
            scaling=float(attn.scaling), rotary=self.rotary, norm_kind=self.norm_kind)

    # -- the KV cache, under whichever name this transformers release uses ---------------
    def layer_cache(self, model: torch.nn.Module, layer_kwargs: dict):
        """The cache a decoder layer was called with (from its keyword arguments), or None."""
        return layer_kwargs.get(cache_keyword(self.decoder_layers(model)[0]))

    def cache_kwargs(self, model: torch.nn.Module, cache) -> dict:
        """Keyword arguments that hand ``cache`` to the model's forward."""
        return {cache_keyword(model): cache}

    def output_cache(self, model: torch.nn.Module, output):
        """The cache a forward of ``model`` returned (``use_cache=True``)."""
        return getattr(output, cache_keyword(model))


LLAVA = ArchitectureAdapter(
    language_model="model.language_model",
    layers="model.language_model.layers",
    rotary_emb="model.language_model.rotary_emb",
    final_norm="model.language_model.norm",
    unembed="lm_head",
    vision_tower="model.vision_tower",
    projector="model.multi_modal_projector",
    layer_input_norm="input_layernorm",
    layer_attention="self_attn",
    layer_post_attention_norm="post_attention_layernorm",
    layer_mlp="mlp",
    layer_q_proj="self_attn.q_proj",
    layer_k_proj="self_attn.k_proj",
    layer_v_proj="self_attn.v_proj",
    layer_o_proj="self_attn.o_proj",
    layer_attention_softmax="self_attn.source.attention_interface_1.source.nn_functional_softmax_0",
)

# transformers class → adapter, one per family of families.py (mclcbf-diag models lists them)
ADAPTERS = {f.architecture: {"llava": LLAVA}[f.name] for f in FAMILIES}

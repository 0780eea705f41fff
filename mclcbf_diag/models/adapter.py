"""Where the toolkit finds each part of a LLaVA-style model.

An adapter is declarative: it names module paths (dotted, relative to the
``LlavaForConditionalGeneration`` or to one decoder layer) and nothing else. Code that
needs "layer 12's input norm" asks the adapter instead of spelling
``model.model.language_model.layers[12].input_layernorm``, so a second architecture is
one more adapter, not a change to the measurements.

:data:`LLAVA` describes llava-hf's layout in transformers 5.x, which the embedded model
shares exactly, and LLaVA-NeXT's too (its modules sit at the same paths). LLaVA's processor
returns one fixed-shape ``pixel_values`` image per prompt; LLaVA-NeXT's adds ``image_sizes``,
which :func:`mclcbf_diag.engine.batch.batch_inputs` passes on (the vision tower runs once per
distinct pixels and size) and :mod:`.anyres` turns into the image tokens' layout. InternVL's modules sit
at the same paths too; its image is several tiles, one grid each (:mod:`.internvl`). Qwen2-VL and
Qwen2.5-VL (:data:`QWEN_VL`: the text model at LLaVA's paths, the tower at ``model.visual``) add
``image_grid_thw`` and run on 3-D M-RoPE positions (:mod:`.mrope`); Qwen3-VL sits at the same paths, with
deepstack features its text model adds inside its loop (:mod:`.deepstack`). What each family's processor and
model make of an image (the overlay's grid, the token bound, shared features in a batch) is its image
scheme (:mod:`.schemes`), beside this adapter.

:data:`GEMMA3` (``Gemma3ForConditionalGeneration``) sits at the same paths. Its processor adds
``token_type_ids`` (1 on an image's soft tokens, which attend to each other both ways), which batching
pads with the ids and every forward from embeddings passes on (:func:`sequence_inputs`, the one place that keeps,
cuts and extends such per-position inputs); its image features are one stacked
tensor (:class:`~.schemes.Gemma3Scheme`); its decoder layer normalises the
attention's and the MLP's outputs before adding them (so the norm before the MLP is
``pre_feedforward_layernorm``, and direct logit attribution is refused); and its rotary module runs
once per layer type, so the look-ahead reads each layer's own ``position_embeddings``.

The text model's own math, which a look-ahead of a layer's attention must reproduce, is declared
per text backbone (``text_config.model_type``) in :data:`TEXT_MATH`, one :class:`TextMath` each:
the norm (Llama's RMSNorm, or Gemma's ``x̂·(1 + w)`` whose epsilon is ``.eps``), the per-head q/k
norms (Qwen3), the rotary function and where a sliding window comes from. The scaling is each
attention module's own ``scaling`` (Gemma's ``query_pre_attn_scalar``). A LLaVA checkpoint with
a backbone not listed is refused before it loads (:data:`~mclcbf_diag.models.families.TEXT_BACKBONES`
is the same list, torch-free).
"""

from __future__ import annotations

import dataclasses
import inspect
import pkgutil
from dataclasses import dataclass
from functools import lru_cache

import torch

from .families import FAMILIES, OWN_BACKBONES, TEXT_BACKBONES
from .projection import NORMS, LayerWeights

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


SEQUENCE_INPUTS = ("token_type_ids",)
"""A family's model inputs that run along the sequence beside ``input_ids`` and ``attention_mask`` (``[B, S]``, one
value a position; a forward fed embeddings must be given them too): Gemma 3's ``token_type_ids`` (1 on an image's
soft tokens, which attend to each other both ways; 0 on text)."""


def sequence_inputs(inputs: dict, rows=None, start: int = 0, extend: int = 0) -> dict:
    """The family's per-position inputs of ``inputs`` (:data:`SEQUENCE_INPUTS`; ``{}`` for a family without), as a
    forward of some rows, some positions or a longer sequence takes them.

    Args:
        inputs: the batch's model inputs.
        rows: keep these rows only (an index or a list; None: every row).
        start: keep the positions from ``start`` on (a continuation over a cache of the earlier ones).
        extend: append this many positions of text (generated tokens: type 0).

    Returns:
        ``{key: [B', S']}`` for each of :data:`SEQUENCE_INPUTS` that ``inputs`` holds.
    """
    out = {}
    for key in SEQUENCE_INPUTS:
        value = inputs.get(key)
        if value is None:
            continue
        value = value if rows is None else value[rows]
        value = value[:, start:] if start else value
        out[key] = torch.cat([value, value.new_zeros(len(value), extend)], -1) if extend else value
    return out


@dataclass(frozen=True)
class TextMath:
    """What one text backbone's decoder layer computes beyond Llama's, declared (see the module docstring)."""

    norm_kind: str = "rms"  # NORMS key: "rms" (Llama), "rms_offset" (Gemma: x̂·(1 + w), in float32), "layer"
    eps_attribute: str = "variance_epsilon"  # the norm module's epsilon ("eps" for Gemma)
    q_norm: str | None = None  # path (in the layer) of the per-head query norm after q_proj (Qwen3), or None
    k_norm: str | None = None
    rotary: str = "transformers.models.llama.modeling_llama.apply_rotary_pos_emb"  # module.function
    window: str | None = None  # "config": every layer has config.sliding_window (Mistral); "attention": the
    # attention module's sliding_window, set on its sliding layers only (Qwen2/Qwen3); None: no window

    def rotary_function(self):
        return pkgutil.resolve_name(self.rotary)


def _rotary(backbone: str) -> str:
    return f"transformers.models.{backbone}.modeling_{backbone}.apply_rotary_pos_emb"


TEXT_MATH: dict[str, TextMath] = {
    "llama": TextMath(),
    "mistral": TextMath(rotary=_rotary("mistral"), window="config"),
    "qwen2": TextMath(rotary=_rotary("qwen2"), window="attention"),
    "qwen3": TextMath(q_norm="self_attn.q_norm", k_norm="self_attn.k_norm", rotary=_rotary("qwen3"),
                      window="attention"),
    "gemma": TextMath(norm_kind="rms_offset", eps_attribute="eps", rotary=_rotary("gemma")),
    # Gemma 3: Gemma's norm, Qwen3's per-head q/k norms (Gemma's offset too), a window on the sliding layers only;
    # each layer type has its own rotary base, so the look-ahead takes the (cos, sin) its layer is called with
    "gemma3_text": TextMath(norm_kind="rms_offset", eps_attribute="eps", q_norm="self_attn.q_norm",
                            k_norm="self_attn.k_norm", rotary=_rotary("gemma3"), window="attention"),
    # Qwen-VL's Qwen2: its rotary module has already folded the three M-RoPE axes (mrope_section) into one cos/sin
    # [batch, seq, head_dim], which the plain rotation applies (models/mrope.py)
    "qwen2_5_vl_text": TextMath(rotary=_rotary("qwen2_5_vl"), window="attention"),
    "qwen2_vl_text": TextMath(rotary=_rotary("qwen2_vl"), window="attention"),
    # Qwen3-VL's Qwen3: Qwen3's per-head q/k norms; its rotary module interleaves the three M-RoPE axes
    # (mrope_section, every third frequency) into one cos/sin, which the plain rotation applies
    "qwen3_vl_text": TextMath(q_norm="self_attn.q_norm", k_norm="self_attn.k_norm", rotary=_rotary("qwen3_vl"),
                              window="attention"),
}
assert set(TEXT_MATH) == set(TEXT_BACKBONES).union(*OWN_BACKBONES.values()), \
    "families.TEXT_BACKBONES and OWN_BACKBONES list the backbones declared here"


def text_math(model: torch.nn.Module) -> TextMath:
    """The declared math of ``model``'s text backbone (a KeyError names an undeclared one)."""
    backbone = model.config.get_text_config().model_type
    if backbone not in TEXT_MATH:
        raise KeyError(f"text model {backbone!r} has no declared math; declared: {', '.join(TEXT_MATH)}")
    return TEXT_MATH[backbone]


def norm_eps(norm: torch.nn.Module) -> float:
    """A norm module's epsilon, under whichever attribute its class keeps it (``variance_epsilon`` or ``eps``)."""
    for name in ("variance_epsilon", "eps"):
        if isinstance(getattr(norm, name, None), (int, float)):
            return float(getattr(norm, name))
    raise AttributeError(f"{type(norm).__name__} has no epsilon attribute (variance_epsilon or eps)")


@dataclass(frozen=True)
class ArchitectureAdapter:
    """Module paths of one architecture (dotted; ``layer_*`` are relative to a layer)."""

    language_model: str
    layers: str
    rotary_emb: str | None  # None: no one (cos, sin) for all layers; each layer's own position_embeddings are read
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
    # the text model's own math (norm, q/k norms, rotary, window) is its backbone's: TEXT_MATH, text_math()
    normed_sublayer_outputs: bool = False  # Gemma 3: attention and MLP outputs are normalised before the residual
    # adds them, so the residual is not the sum of o_proj's and the MLP's outputs (direct logit attribution)

    def get(self, root: torch.nn.Module, path: str) -> torch.nn.Module:
        return root.get_submodule(path)

    def decoder_layers(self, model: torch.nn.Module) -> torch.nn.ModuleList:
        return model.get_submodule(self.layers)

    def layer_part(self, model: torch.nn.Module, index: int, part: str) -> torch.nn.Module:
        """A submodule of decoder layer ``index``.

        Args:
            model: the loaded model.
            index: the decoder layer.
            part: a field name of the adapter such as ``"layer_input_norm"`` (its value is the submodule's path).

        Returns:
            The submodule.
        """
        return self.decoder_layers(model)[index].get_submodule(getattr(self, part))

    def norm_eps(self, norm: torch.nn.Module) -> float:
        """The epsilon of a norm module of this architecture (``variance_epsilon``, or Gemma's ``eps``)."""
        return norm_eps(norm)

    def norm_gain(self, model: torch.nn.Module, norm: torch.nn.Module) -> torch.Tensor:
        """The factor an RMS norm module multiplies ``x̂`` by, in float32: its weight, or ``1 + weight`` (Gemma)."""
        weight = norm.weight.detach().float()
        return 1.0 + weight if text_math(model).norm_kind == "rms_offset" else weight

    def apply_norm(self, model: torch.nn.Module, norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``norm``'s output for ``x`` computed from its weights with the backbone's math (float64 stays float64)."""
        return NORMS[text_math(model).norm_kind](x, norm.weight.detach(), norm_eps(norm))

    def layer_weights(self, model: torch.nn.Module, index: int) -> LayerWeights:
        """Decoder layer ``index``'s input norm, q/k projections and q/k norms, with its text backbone's math."""
        get = lambda part: self.layer_part(model, index, part)  # noqa: E731
        norm, q, k, attn = get("layer_input_norm"), get("layer_q_proj"), get("layer_k_proj"), get("layer_attention")
        cfg, math = model.config.get_text_config(), text_math(model)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        detach = lambda t: None if t is None else t.detach()  # noqa: E731
        layer = self.decoder_layers(model)[index]
        q_norm = layer.get_submodule(math.q_norm) if math.q_norm else None
        k_norm = layer.get_submodule(math.k_norm) if math.k_norm else None
        return LayerWeights(
            ln_weight=norm.weight.detach(), ln_eps=float(getattr(norm, math.eps_attribute)),
            q_weight=q.weight.detach(), q_bias=detach(q.bias), k_weight=k.weight.detach(), k_bias=detach(k.bias),
            n_heads=cfg.num_attention_heads, n_kv_heads=cfg.num_key_value_heads, head_dim=head_dim,
            scaling=float(attn.scaling), rotary=math.rotary_function(), norm_kind=math.norm_kind,
            q_norm_weight=None if q_norm is None else q_norm.weight.detach(),
            k_norm_weight=None if k_norm is None else k_norm.weight.detach(),
            qk_norm_eps=0.0 if q_norm is None else float(getattr(q_norm, math.eps_attribute)),
            window=_window(math, cfg, attn))

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


def _window(math: TextMath, cfg, attention: torch.nn.Module) -> int | None:
    """The layer's sliding window, from where its backbone declares it (None: the layer sees every earlier key)."""
    if math.window == "config":
        return getattr(cfg, "sliding_window", None)
    if math.window == "attention":
        return getattr(attention, "sliding_window", None)
    return None


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

# Gemma 3 sits at LLaVA's paths, but its decoder layer normalises the attention's output (post_attention_layernorm)
# before adding it to the residual, and the MLP's input is pre_feedforward_layernorm's: that is the norm whose input is
# the residual after attention (what the other adapters' post_attention_layernorm is). Its rotary module runs once per
# layer type (a local and a global base), so the look-ahead reads the (cos, sin) each layer is called with instead of
# one module's output (rotary_emb None).
GEMMA3 = dataclasses.replace(LLAVA, layer_post_attention_norm="pre_feedforward_layernorm", rotary_emb=None,
                             normed_sublayer_outputs=True)

# Qwen2-VL / Qwen2.5-VL: the text model's parts sit where LLaVA's do; the vision tower is "visual", whose patch
# merger is the projector
QWEN_VL = dataclasses.replace(LLAVA, vision_tower="model.visual", projector="model.visual.merger")

# transformers class → adapter, one per family of families.py (mclcbf-diag models lists them)
# LLaVA-NeXT's modules sit where LLaVA's do (model.language_model, model.vision_tower, …; its image_newline
# vector is merged into the image tokens before the text model, which is all the toolkit measures)
# LLaVA-OneVision's too (a SigLIP tower at model.vision_tower, the text model at model.language_model), and InternVL's
# (model.vision_tower, model.multi_modal_projector, model.language_model, lm_head); Gemma 3 and Qwen-VL have their own
ADAPTERS = {f.architecture: {"llava": LLAVA, "llava_next": LLAVA, "llava_onevision": LLAVA, "internvl": LLAVA,
                             "gemma3": GEMMA3, "qwen2_5_vl": QWEN_VL, "qwen2_vl": QWEN_VL,
                             "qwen3_vl": QWEN_VL}[f.name] for f in FAMILIES}

"""CausalMM: contrast the answer with the same question under counterfactual attention, in the vision tower (the
released code), in the language model, or in both (knob ``level``: ``vision``, the default, ``language``, ``both``).

Paper: Zhou et al., "Mitigating Modality Prior-Induced Hallucinations in Multimodal Large Language
Models via Deciphering Attention Causality", ICLR 2025. Released code: github.com/The-Martyr/CausalMM
(LLaVA-1.5, the vision-level counterfactual only):
``llava-1.5/experiments/llava/model/multimodal_encoder/cf_encoder.py`` (``CLIPVisionTower.edit_attention``,
``apply_attention``, ``forward``), ``.../llava/model/llava_arch_cf.py`` (``encode_images``: both feature
sets through the projector), ``.../language_model/llava_llama_cf.py`` (the language model run on the
factual and the counterfactual image embeddings, the same prompt), ``llava-1.5/causalmm_cf/causalmm_sm.py``
(``causalmm_sample``: the contrast); POPE script ``experiments/scripts/llava1.5_eval.bash``
(``gamma 1``, ``epsilon 0.6``).

* **Counterfactual features** (the vision level). The vision tower runs normally on the image (nothing inside it is
  altered) and returns its hidden states and its post-softmax attention probabilities. The features are
  LLaVA's own: ``hidden_states[vision_feature_layer]`` (CLS dropped under the ``default`` strategy; layer
  −2 on LLaVA-1.5). The attention ``A`` [H, N, N] (N = patches + CLS, CLS included) is the same layer's
  (``attentions[vision_feature_layer]`` for a negative layer, as the released code indexes it).
  ``A_cf`` is one of (knob ``attention``):

  - ``random``: U(0, 1) · 2 drawn afresh, [H, N, N];
  - ``uniform``: every entry the head's mean of ``A`` (1/N);
  - ``reversed``: the head's maximum of ``A`` minus ``A``;
  - ``shuffle`` (the released default): per head, the N·N entries of ``A`` in a random order
    (one permutation per head, drawn in head order).

  The map is ``A_cf`` resized bilinearly (``align_corners=False``) to the g × g patch grid and averaged
  over the heads: one weight per patch, ``feat_cf = feat · m``. ``feat_cf`` goes through the model's
  multimodal projector, and the language model runs the same prompt with these image features (merged
  where the image tokens are, as the model merges its own).
* **Language level** (``level=language``; the paper's counterfactual of the language model's attention A_t, whose
  code is not released: the recipe below is this package's reading of it). The counterfactual forward is the same
  input (ids, image features, mask, positions) with, in every decoder layer, every query's post-softmax attention
  row replaced by a counterfactual of the same ``attention`` type, built per head over the row's visible keys
  (those the layer's mask leaves: ``0 … q`` in a causal model, padding excluded; a family's bidirectional image
  block or sliding window where it has one) in the prompt's own positions (:func:`counterfactual_rows`):

  - ``random``: U(0, 1) · 2;
  - ``uniform``: 1 on every visible key;
  - ``reversed``: the head's maximum over its visible entries minus each entry;
  - ``shuffle``: the row's visible entries in a random order (one permutation per head and query).

  Each row is then divided by its sum, so that it stays a distribution (the vision level's map is a patch
  weight and need not be; an attention row that sums to ~q would scale the values by ~q), and a row summing to
  0 (``reversed`` on a single visible key) becomes uniform. The replacement is an attention implementation
  registered with transformers (``AttentionInterface``, as eager attention: the same mask, the same float32
  softmax, then the counterfactual), used only inside :func:`counterfactual_language`; the edit is
  ``LanguageEdit``: each prompt's generator, seeded with ``seed``, draws U(0, 1) [H, L, L] once per decoder
  layer in forward order (``random``: the map; ``shuffle``: the sort keys of the permutation), so a question's
  counterfactual is the same alone and in any batch. Assumptions where the paper is not explicit: every layer
  and every query (not the decision token only), and the renormalisation.
* **Both** (``level=both``): one counterfactual forward with the counterfactual image features *and* the
  counterfactual language attention, contrasted as below: the paper's multimodal-collaboration counterfactual
  read as the two interventions made jointly (one auxiliary forward), not as a sum of two contrasts.
* **Contrast.** scores = (1 + γ)·z − γ·z_cf on the next-token logits, with the plausibility cutoff on
  the factual logits: tokens with ``z < log ε + max z`` get −inf.
* ``dose`` scales γ (a dose-response sweeps the contrast's strength; the cutoff stays).
* **Batched.** At the vision level the counterfactual forward is the same prompt with other image features: a
  runner runs it as rows of the question's own forward (:meth:`CausalMM.aux_features`, see :mod:`.decoding`).
  At the language level and ``both`` the attention inside the model differs, so it is a forward of its own,
  over every position without a cache (:meth:`CausalMM.auxiliary`); ``trace`` records no view for it.

Deviations from the released code:

* Randomness (``random``, ``shuffle``) comes from a generator seeded with ``seed`` for each image, not
  from the global RNG, so a question's counterfactual is the same alone and in any batch (every image
  of a batch gets the same permutations, as the released code's one ``randperm`` per head for the batch).
* The released code samples (temperature 1); the first-token answer here is the greedy one (the
  Yes − No sign of the scores).
* The map and ``feat · m`` are computed in float32 and cast to the model's dtype before the projector
  (the released code works in float16 throughout).
* The ``full`` strategy (CLS kept), which the released code cannot run (its map has one weight per
  patch), weights the CLS feature by the map's mean.

The vision level (and ``both``) supports only LLaVA-1.5 layouts (one image, one patch grid): the other families are
refused with their reason (:data:`NOT_ONE_GRID`), by the command line from config.json before the model loads
(:meth:`CausalMM.model_type_problem`). The language level runs on the language model alone, as eager
attention does; it is tested on the embedded (LLaVA) model only.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from ..errors import UserError
from .base import Row
from .catalog import SPECS, CausalMMKnobs  # noqa: F401 - CausalMMKnobs re-exported
from .decoding import DecodingMethod
from .views import pixels_of, row_inputs, shares_image_features

STRATEGIES = ("default", "full")


def counterfactual_map(attention: torch.Tensor, method: str, seed: int) -> torch.Tensor:
    """``A_cf`` [H, N, N] float32 of one image's attention probabilities (see the module docstring).

    Args:
        attention: one image's vision-tower attention probabilities [H, N, N].
        method: ``random`` (uniform on [0, 2)), ``uniform`` (each head's mean), ``reversed`` (each head's maximum
            minus the attention) or ``shuffle`` (each head's entries permuted).
        seed: seeds the generator that ``random`` and ``shuffle`` draw from.

    Returns:
        [H, N, N] float32 on the CPU.

    Raises:
        ValueError: an unknown method (the knobs check it first).
    """
    a = attention.detach().float().cpu()
    heads, n, _ = a.shape
    if method == "random":
        g = torch.Generator().manual_seed(int(seed))
        return torch.rand((heads, n, n), generator=g, dtype=torch.float32) * 2
    if method == "uniform":
        return a.mean(dim=(1, 2), keepdim=True).expand(heads, n, n).clone()
    if method == "reversed":
        return a.amax(dim=(1, 2), keepdim=True) - a
    if method == "shuffle":
        g = torch.Generator().manual_seed(int(seed))
        flat = a.reshape(heads, n * n)
        perms = [torch.randperm(n * n, generator=g) for _ in range(heads)]
        return torch.stack([flat[h, p] for h, p in enumerate(perms)]).reshape(heads, n, n)
    raise ValueError(f"unknown counterfactual attention {method!r}")  # checked by the knobs


def patch_weights(cf_map: torch.Tensor, grid: int) -> torch.Tensor:
    """[grid²] float32: ``cf_map`` [H, N, N] resized bilinearly to grid × grid, averaged over the heads."""
    resized = F.interpolate(cf_map[None].float(), size=(grid, grid), mode="bilinear", align_corners=False)
    return resized.mean(dim=1).reshape(grid * grid)


# why a family's image is not the one patch grid at a vision feature layer that CausalMM's map reweights
NOT_ONE_GRID = {
    "llava_next": "LLaVA-NeXT's image is several tiles",
    "llava_onevision": "OneVision's image is several tiles",
    "gemma3": "Gemma 3 reads the tower's last state, with no vision_feature_layer, and its projector average-pools "
              "the patches: one image token is k × k patches",
    "internvl": "InternVL's image is several tiles, each pixel-shuffled into fewer tokens",
    "qwen2_vl": "Qwen2-VL's vision transformer merges 2 × 2 patches into each image token",
    "qwen2_5_vl": "Qwen2.5-VL's vision transformer merges 2 × 2 patches into each image token",
    "qwen3_vl": "Qwen3-VL's vision transformer merges 2 × 2 patches into each image token",
}


def one_grid_problem(model_type: str | None) -> str | None:
    """Why the vision level cannot run on config.json's ``model_type`` (None: ``llava``, one patch grid)."""
    if model_type == "llava":
        return None
    why = NOT_ONE_GRID.get(model_type, "its image features are not one patch grid at a vision feature layer")
    return (f"the vision level runs on LLaVA-1.5 layouts (one image, one patch grid), and {model_type!r} is not one "
            f"({why}): use a LLaVA-1.5 model, --preset language, or another intervention")


def _layout(lm) -> tuple[int, str, int]:
    """``(feature layer, strategy, grid side)`` of a LLaVA-1.5 layout; a UserError for any other."""
    cfg = lm.model.config
    name = getattr(lm, "source", "this model")
    problem = one_grid_problem(cfg.model_type)
    if problem:
        raise UserError(f"--intervention causalmm on {name}: {problem}")
    layer = cfg.vision_feature_layer
    strategy = getattr(cfg, "vision_feature_select_strategy", "default")
    if not isinstance(layer, int) or strategy not in STRATEGIES:
        raise UserError(f"--intervention causalmm needs one vision feature layer and the 'default' or 'full' "
                        f"feature selection; {name} has vision_feature_layer={layer!r}, "
                        f"vision_feature_select_strategy={strategy!r}: use a LLaVA-1.5 model")
    if layer == 0:
        raise UserError(f"--intervention causalmm: {name} reads the vision tower's embeddings "
                        "(vision_feature_layer=0), which no attention map produced")
    vision = cfg.vision_config
    return layer, strategy, vision.image_size // vision.patch_size


def counterfactual_features(lm, pixels: torch.Tensor, method: str, seed: int) -> list[torch.Tensor]:
    """Per image of ``pixels``: its counterfactual image features, in the model's dtype.

    The vision tower runs once per distinct image.

    Args:
        lm: the loaded model (a LLaVA-1.5 layout: one CLIP image per prompt).
        pixels: the prompts' pixel values [B, 3, H, W].
        method: the counterfactual attention map (:func:`counterfactual_map`: ``random``, ``uniform``, ``reversed``,
            ``shuffle``).
        seed: the seed of ``random`` and ``shuffle``.

    Returns:
        One tensor per row of ``pixels``: its projected counterfactual features [tokens, d_text].

    Raises:
        UserError: not one image tensor per prompt, a vision tower that returns no attention probabilities, or a token
            count that is not a square patch grid plus CLS.
    """
    layer, strategy, grid = _layout(lm)
    if pixels.dim() != 4:
        raise UserError(f"--intervention causalmm needs one image tensor per prompt ([B, 3, H, W]); "
                        f"{getattr(lm, 'source', 'this model')} gives {list(pixels.shape)}: use a LLaVA-1.5 model")
    tower = lm.adapter.get(lm.model, lm.adapter.vision_tower)
    projector = lm.adapter.get(lm.model, lm.adapter.projector)
    uniq, inverse = torch.unique(pixels.flatten(1), dim=0, return_inverse=True)
    uniq = uniq.view(-1, *pixels.shape[1:])
    with torch.no_grad():
        out = tower(uniq, output_hidden_states=True, output_attentions=True, return_dict=True)
        attentions = getattr(out, "attentions", None)
        index = layer if layer < 0 else layer - 1  # the attention of the layer whose output the features are
        if not attentions or attentions[index] is None:
            raise UserError(f"--intervention causalmm reads the vision tower's attention probabilities, which "
                            f"{getattr(lm, 'source', 'this model')}'s vision tower did not return: load the model "
                            "with attn_implementation='eager' (mclcbf_diag.models.load_model does)")
        feats = out.hidden_states[layer]
        n_patches = grid * grid
        if feats.shape[1] != n_patches + 1:
            raise UserError(f"--intervention causalmm: the vision tower gives {feats.shape[1]} tokens, not the "
                            f"{n_patches} patches of a {grid} × {grid} grid plus CLS; use a LLaVA-1.5 model")
        per_image = []
        for j in range(uniq.shape[0]):
            m = patch_weights(counterfactual_map(attentions[index][j], method, seed), grid).to(feats.device)
            f = feats[j].float()
            if strategy == "default":
                cf = f[1:] * m[:, None]
            else:  # "full": CLS kept, weighted by the map's mean (see the module docstring)
                cf = torch.cat([f[:1] * m.mean(), f[1:] * m[:, None]])
            per_image.append(projector(cf.to(feats.dtype)[None])[0])
    return [per_image[j] for j in inverse.tolist()]


# --------------------------------------------------------------------------- the language level
LANGUAGE = "mclcbf_causalmm_language"  # the attention implementation of the counterfactual language forward


def counterfactual_rows(probs: torch.Tensor, method: str, generator: torch.Generator,
                        visible: torch.Tensor | None = None) -> torch.Tensor:
    """The counterfactual of one prompt's attention ``probs`` [H, L, L] (its own positions, no padding): [H, L, L]
    float32, each query's row a distribution over its visible keys (see the module docstring).

    Args:
        probs: [H, L, L] the post-softmax attention of one prompt.
        method: ``random``, ``uniform``, ``reversed`` or ``shuffle``.
        generator: ``random`` draws U(0, 1) [H, L, L] and ``shuffle`` U(0, 1) sort keys [H, L, L] from it (one draw
            per call, on the generator's device: a generator on ``probs``' device draws there, with no copy).
        visible: bool [L, L] the keys each query may attend to (None: causal, keys ``0 … q``).
    """
    p = probs.detach().float()
    heads, n, _ = p.shape
    if visible is None:
        visible = torch.ones(n, n, dtype=torch.bool, device=p.device).tril()
    visible = visible.to(p.device)
    if method == "random":
        cf = _draw((heads, n, n), generator).to(p.device) * 2
    elif method == "uniform":
        cf = visible.float().expand(heads, n, n)
    elif method == "reversed":  # the head's maximum over its visible entries, minus each
        cf = p.masked_fill(~visible, 0).amax(dim=(1, 2), keepdim=True) - p
    elif method == "shuffle":  # each row's visible entries in a random order: sort keys, the hidden ones last
        keys = _draw((heads, n, n), generator).to(p.device)
        order = keys.masked_fill(~visible, torch.inf).argsort(dim=-1)  # the visible keys first, in a random order
        cf = p.gather(-1, order)
        if not torch.equal(visible, torch.ones_like(visible).tril()):  # to each row's visible keys, in order
            slots = visible.sort(dim=-1, descending=True, stable=True).indices
            cf = torch.zeros_like(p).scatter(-1, slots.expand(heads, n, n), cf)
    else:
        raise ValueError(f"unknown counterfactual attention {method!r}")  # checked by the knobs
    cf = cf.masked_fill(~visible, 0)
    total = cf.sum(-1, keepdim=True)
    uniform = visible / visible.sum(-1, keepdim=True).clamp(min=1)
    return torch.where(total > 0, cf / torch.where(total > 0, total, torch.ones_like(total)), uniform)


def _draw(shape: tuple, generator: torch.Generator) -> torch.Tensor:
    """U(0, 1) float32 of ``shape`` from ``generator``, on its device."""
    return torch.rand(shape, generator=generator, dtype=torch.float32, device=generator.device)


class LanguageEdit:
    """The counterfactual edit of one forward of a left-padded batch: every row's generator, seeded with ``seed``,
    draws once per decoder layer, in forward order, so a row's counterfactual is the same alone and in any batch.

    The generators live on the device of the attention they edit (made at the first layer's call): the draws,
    H·L² numbers per layer and prompt, are made there instead of on the CPU and copied. On the CPU the numbers are
    those of a CPU generator seeded with ``seed``; on a GPU they are that device's generator's (another stream of
    the same law, so a GPU run's counterfactual differs from a CPU run's, as the device is part of a run's
    identity)."""

    def __init__(self, pads: list[int], method: str, seed: int):
        self.pads, self.method, self.seed = pads, method, int(seed)
        self.generators: list[torch.Generator] | None = None

    def __call__(self, probs: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``probs`` [B, H, T, T] (no cache: queries = keys) with each row's own block replaced; the keys a query
        sees are those ``mask`` (the layer's additive [B, 1, T, T] mask, or a bool one) leaves visible (None:
        causal)."""
        out = probs.clone()
        if self.generators is None:
            self.generators = [torch.Generator(device=probs.device).manual_seed(self.seed) for _ in self.pads]
        for b, pad in enumerate(self.pads):
            visible = None
            if mask is not None:
                own = mask[b, 0, pad:, pad:]
                visible = own if own.dtype == torch.bool else own > torch.finfo(own.dtype).min / 2
            cf = counterfactual_rows(probs[b, :, pad:, pad:], self.method, self.generators[b], visible)
            out[b, :, pad:, pad:] = cf.to(probs.dtype)
        return out


def language_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0, **kwargs):
    """Eager attention with the probabilities replaced by :func:`counterfactual_language`'s counterfactual.

    A drop-in for transformers' ``eager_attention_forward``; the forward runs every position, without a cache.

    Args:
        module: the attention module (it carries the forward's :class:`LanguageEdit`).
        query: [B, H, T, D].
        key: [B, kv heads, T, D], repeated to the query heads.
        value: [B, kv heads, T, D].
        attention_mask: an additive mask broadcast to the scores [B, H, T, T], or None.
        scaling: the scores' scale (the module's).
        dropout: unused (eval only); taken for the signature.
        **kwargs: unused; taken for the signature.

    Returns:
        ``(output [B, T, H, D], probabilities)``, the probabilities the counterfactual ones.
    """
    if query.shape[-2] != key.shape[-2]:  # programming error: the counterfactual forward runs without a cache
        raise RuntimeError("the counterfactual language forward runs every position, without a cache")
    group = query.shape[1] // key.shape[1]
    keys, values = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
    scores = torch.matmul(query, keys.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = module._mclcbf_causalmm(probs, attention_mask)
    return torch.matmul(probs, values).transpose(1, 2).contiguous(), probs


AttentionInterface.register(LANGUAGE, language_attention)
AttentionMaskInterface.register(LANGUAGE, eager_mask)  # the mask transformers builds for eager attention


@contextmanager
def counterfactual_language(lm, pads: list[int], method: str, seed: int):
    """Within the block, ``lm``'s language model attends with :func:`language_attention` (every layer, every query).

    Made for one forward of the left-padded batch; the attention implementation is restored on leaving.

    Args:
        lm: the loaded model.
        pads: each row's count of padding positions.
        method: the counterfactual attention (as :func:`counterfactual_map`).
        seed: each row's generator's seed (:class:`LanguageEdit`).

    Returns:
        A context manager.
    """
    attns = [lm.adapter.layer_part(lm.model, i, "layer_attention") for i in range(lm.n_layers)]
    config = attns[0].config
    before = config._attn_implementation
    edit = LanguageEdit(pads, method, seed)
    for a in attns:
        a._mclcbf_causalmm = edit
    config._attn_implementation = LANGUAGE
    try:
        yield
    finally:
        config._attn_implementation = before
        for a in attns:
            del a._mclcbf_causalmm


def counterfactual_logits(lm, inputs: dict, method: str, seed: int, level: str) -> torch.Tensor:
    """The last position's float32 logits of the counterfactual forward of ``inputs`` at ``level``.

    Args:
        lm: the loaded model.
        inputs: the batch's model inputs.
        method: the counterfactual attention (as :func:`counterfactual_map`).
        seed: the counterfactual's seed.
        level: ``vision`` (the counterfactual image features), ``language`` (the counterfactual language attention)
            or ``both`` (the two in one forward).

    Returns:
        [B, vocab] float32.
    """
    feed = inputs
    if level in ("vision", "both"):
        feed = {k: v for k, v in counterfactual_inputs(lm, inputs, method, seed).items() if k != "input_ids"}
    if level == "vision":
        with torch.no_grad():
            return lm.model(**feed, logits_to_keep=1).logits[:, -1].float()
    pads = (inputs["attention_mask"] == 0).sum(-1).tolist()
    with torch.no_grad(), counterfactual_language(lm, pads, method, seed):
        return lm.model(**feed, logits_to_keep=1, use_cache=False).logits[:, -1].float()


def counterfactual_inputs(lm, inputs: dict, method: str, seed: int) -> dict:
    """The model inputs of ``inputs``' prompts with their counterfactual image features (:func:`counterfactual_features`
    of their pixels: the vision level's view, which every route runs).

    Args:
        lm: the loaded model.
        inputs: the batch's model inputs.
        method: the counterfactual attention (as :func:`counterfactual_map`).
        seed: the counterfactual's seed.

    Returns:
        The model inputs, the image features replaced.
    """
    return with_features(lm, inputs, counterfactual_features(lm, pixels_of(inputs), method, seed))


def with_features(lm, inputs: dict, features: list[torch.Tensor]) -> dict:
    """Model inputs of the prompts of ``inputs`` with ``features[b]`` as row b's image features.

    ``inputs_embeds`` merged as the model merges its own (its image tokens, in order), beside the ids that say where
    they are.

    Args:
        lm: the loaded model.
        inputs: the batch's model inputs.
        features: one tensor [tokens, d_text] per row, as many tokens as the row's image tokens.

    Returns:
        The model inputs with ``inputs_embeds``.
    """
    ids = inputs["input_ids"]
    with torch.no_grad():
        embeds = lm.model.get_input_embeddings()(ids)
        image = (ids == lm.tokens.image_token_id).to(embeds.device)
        feats = torch.cat(features).to(embeds.device, embeds.dtype)
        if int(image.sum()) != feats.shape[0]:  # programming error
            raise RuntimeError(f"{int(image.sum())} image tokens for {feats.shape[0]} image features")
        embeds = embeds.masked_scatter(image[..., None], feats)
    return {"input_ids": ids, "inputs_embeds": embeds,
            **{k: inputs[k] for k in ("attention_mask", "position_ids") if k in inputs}}


class CausalMM(DecodingMethod, spec=SPECS["causalmm"]):
    cutoff_knob, strength_knob = "epsilon", "gamma"  # the default combine: (1 + γ·dose)·ℓ − γ·dose·ℓ', cut under ε
    metrics = {}

    @property
    def reads_pixels(self) -> bool:  # the language level edits the language model's attention only
        return self.knobs.level != "language"

    def model_type_problem(self, model_type: str | None) -> str | None:
        """The vision level and ``both`` read one patch grid (:func:`one_grid_problem`); the language level runs on
        any family."""
        return one_grid_problem(model_type) if self.reads_pixels and model_type is not None else None

    def auxiliary(self, lm, inputs: dict, rows: list[Row]):
        k = self.knobs
        return counterfactual_logits(lm, row_inputs(inputs, rows), k.attention, k.seed, k.level)

    def auxiliary_forwards(self) -> int | None:
        """1 at every level: the counterfactual forward. At the vision level it is B more rows of the baseline's
        forward (counted as one, as the bound counts auxiliary rows); at the language level and ``both`` a forward of
        its own over every position (the batch's three forwards: the baseline's, this one, the intervened
        continuation). That forward is not a bare one: every layer runs eager attention and replaces each
        probability row (``shuffle``: a sort of H·L² random keys per layer and prompt). On the embedded model, whose
        forward is mostly attention, that costs several bare forwards and the benchmark's bound, (1 + 1) × a bare
        forward + 10%, is not met (``benchmarks/intervention_throughput.py --only causalmm:language`` prints OVER); at
        LLaVA-1.5-7B's widths (two layers, a CPU) the level measured 2.18×, within it (docs/performance.md)."""
        return 1

    def aux_features(self, lm, inputs: dict, rows: list[Row]):
        """The counterfactual image features, for a runner that runs the view as rows of the main rows' forward
        (the same prompt, other image features); None where the inputs carry no shared image features, or where the
        counterfactual edits the language model's attention too (``level`` language or both: a forward of its own)."""
        if not shares_image_features(inputs) or self.knobs.level != "vision":
            return None
        return counterfactual_features(lm, pixels_of(row_inputs(inputs, rows)), self.knobs.attention, self.knobs.seed)

    def views(self, lm, inputs: dict, rows: list[Row]) -> dict:
        if self.knobs.level != "vision":
            return {}  # the language-level counterfactual is not a model input: it edits attention inside the model
        return {f"{self.knobs.attention} attention": counterfactual_inputs(lm, row_inputs(inputs, rows),
                                                                           self.knobs.attention, self.knobs.seed)}

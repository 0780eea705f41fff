"""Direct logit attribution, and the arithmetic of activation and attribution patching (pure functions).

Nothing here runs a model: the runner (:mod:`mclcbf_diag.runner`) captures the tensors, these
functions turn them into numbers. Everything is computed in float32 (float64 stays float64).

**Direct logit attribution (DLA) of the Yes − No margin.** The residual stream at the decision
token after the last layer is a sum of what wrote into it::

    x_final = e + Σ_ℓ (s_ℓ + a_ℓ + f_ℓ)

with ``e`` the embedding, ``s_ℓ`` whatever an intervention added to the residual entering layer ℓ
(``resid_pre − resid_pre_in``; zero in a baseline), ``a_ℓ = Σ_h W_O[:, h] z_h (+ o_proj bias)`` the
attention output (``z_h`` head h's output before ``o_proj``, ``W_O[:, h]`` its slice of the
``o_proj`` weight) and ``f_ℓ`` the MLP output. The final RMSNorm is ``γ ⊙ x / r``; holding its
scale ``r = √(mean(x_final²) + ε)`` at the value it actually had makes the margin linear in
the parts::

    margin = logit(Yes) − logit(No) = u · x_final + (b_Yes − b_No),   u = γ ⊙ (w_Yes − w_No) / r

so each part's direct contribution is ``u · part``, and they sum to the margin exactly (up to the
float32 rounding of the sums). A head's contribution splits further by where it reads: its output
is ``z_h = Σ_k p_hk v_k`` (the decision query's softmax row over keys k and the values), so the
keys of a set G give ``(W_O[:, h]ᵀ u) · Σ_{k∈G} p_hk v_k``: image keys, the sink (the first key)
and the other text keys. The image part is the margin that flows *directly* from the image
through that head.

**Patching.** A patch replaces one activation of a *destination* run by the same activation of a
*source* run (denoising: clean into corrupted; noising: corrupted into clean). Its effect is the
normalised recovery ``(m_patched − m_corrupted) / (m_clean − m_corrupted)`` of the margin: 0 is
the corrupted run's margin, 1 the clean one's, in both directions (a noising patch that changes
nothing recovers 1). Attribution patching replaces the run by its first-order estimate
``m_patched ≈ m_dest + (a_source − a_dest) · ∂m/∂a`` at the destination (one backward gives
every ``∂m/∂a``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

GROUPS = ("image", "question", "decision")
"""Token groups of a residual-stream patch: the image tokens, the text after the image up to the
decision token (the question and the template around it), and the decision (last) token. The
text before the image is the same in a clean and a corrupted input, so patching it is a no-op."""

SOURCES = ("image", "sink", "text")
"""Where a head reads from: image keys, the sink (the first key, when it is not an image token)
and every other key (:func:`mclcbf_diag.probes.attention_masses` splits the mass the same way)."""


def _f(t: torch.Tensor) -> torch.Tensor:
    return t.double() if t.dtype == torch.float64 else t.float()


def rms_scale(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``r = √(mean(x²) + ε)`` over the last dim (RMSNorm's divisor), in float32."""
    x = _f(x)
    return torch.sqrt(x.pow(2).mean(-1) + eps)


def margin_direction(x_final: torch.Tensor, norm_weight: torch.Tensor, eps: float, w_yes: torch.Tensor,
                     w_no: torch.Tensor) -> torch.Tensor:
    """``u = γ ⊙ (w_Yes − w_No) / r`` with r the final norm's actual scale at ``x_final`` ([d] → [d]).

    Args:
        x_final: [d] the residual leaving the last layer (the final norm's input).
        norm_weight: [d] the final norm's gain γ.
        eps: the final norm's ε.
        w_yes: [d] the unembedding row of the Yes token.
        w_no: [d] the unembedding row of the No token.

    Returns:
        [d] float32 (float64 for a float64 ``x_final``): the direction whose dot product with a part of
        ``x_final`` is that part's direct contribution to the margin.
    """
    x_final = _f(x_final)
    r = rms_scale(x_final, eps)
    return _f(norm_weight).to(x_final.device) * (_f(w_yes) - _f(w_no)).to(x_final.device) / r


def head_writers(o_weight: torch.Tensor, u: torch.Tensor, n_heads: int) -> torch.Tensor:
    """``W_O[:, h]ᵀ u`` for every head: [H, head_dim] (``o_weight`` is o_proj's [d, H·head_dim])."""
    return (_f(u).to(o_weight.device) @ _f(o_weight)).reshape(n_heads, -1)


def head_contributions(z: torch.Tensor, o_weight: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Each head's direct contribution ``u · W_O[:, h] z_h``: ``z`` [..., H, head_dim] → [..., H]."""
    w = head_writers(o_weight, u, z.shape[-2]).to(z.device)
    return (_f(z) * w).sum(-1)


def source_masks(image: torch.Tensor, sink_positions=(0,)) -> dict[str, torch.Tensor]:
    """Bool key masks [K] of :data:`SOURCES` from the image-token mask [K] (a sink that is an image token is image)."""
    image = image.bool()
    sink = torch.zeros_like(image)
    for p in sink_positions:
        if -len(image) <= p < len(image):
            sink[p] = True
    sink &= ~image
    return {"image": image, "sink": sink, "text": ~(image | sink)}


def head_source_split(probs: torch.Tensor, values: torch.Tensor, masks: dict[str, torch.Tensor],
                      o_weight: torch.Tensor, u: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each head's direct contribution from the keys of each mask: ``{name: [H]}``.

    The parts of one head sum to :func:`head_contributions` of its output ``Σ_k p_hk v_k`` when the
    masks partition the keys.

    Args:
        probs: [H, K] the decision query's softmax row per head.
        values: [kv heads, K, head_dim] (query head h reads kv head ``h // (H / kv heads)``).
        masks: bool [K] per source (:func:`source_masks`).
        o_weight: o_proj's weight [d, H·head_dim].
        u: [d] the margin direction (:func:`margin_direction`).

    Returns:
        ``{name: [H]}``, one entry per mask: each head's contribution to the margin from those keys.
    """
    H, K = probs.shape
    kv = values.shape[0]
    v = _f(values).repeat_interleave(H // kv, dim=0)  # [H, K, hd]
    w = head_writers(o_weight, u, H).to(v.device)  # [H, hd]
    per_key = (v * w[:, None, :]).sum(-1) * _f(probs).to(v.device)  # [H, K]: u · W_O,h p_hk v_k
    return {name: per_key[:, m.to(per_key.device)].sum(-1) for name, m in masks.items()}


@dataclass
class LayerParts:
    """What wrote into the decision token's residual at one layer (one run)."""

    step: torch.Tensor  # [d] the intervention's edit of the residual entering the layer (zeros: none)
    z: torch.Tensor  # [H, head_dim] each head's output before o_proj
    o_weight: torch.Tensor  # [d, H·head_dim]
    o_bias: torch.Tensor | None  # [d] or None
    mlp: torch.Tensor  # [d] the MLP's output
    probs: torch.Tensor | None = None  # [H, K] the decision query's attention row (for the source split)
    values: torch.Tensor | None = None  # [kv heads, K, head_dim]


@dataclass
class Attribution:
    """The DLA of one run: every part's direct contribution to the margin."""

    embed: float
    unembed_bias: float  # b_Yes − b_No (0 without a bias)
    step: torch.Tensor  # [L]
    heads: torch.Tensor  # [L, H]
    attn_bias: torch.Tensor  # [L] (zeros without an o_proj bias)
    mlp: torch.Tensor  # [L]
    sources: dict[str, torch.Tensor]  # {source: [L, H]}
    margin: float  # the model's own margin (from its logits)
    scale: float  # the final norm's r

    @property
    def total(self) -> float:
        """The sum of every part: equals :attr:`margin` up to rounding."""
        return float(self.embed + self.unembed_bias + self.step.sum() + self.heads.sum() + self.attn_bias.sum()
                     + self.mlp.sum())

    @property
    def attn(self) -> torch.Tensor:
        """[L] each layer's attention output (every head plus o_proj's bias)."""
        return self.heads.sum(-1) + self.attn_bias


def direct_logit_attribution(embed: torch.Tensor, layers: list[LayerParts], x_final: torch.Tensor,
                             norm_weight: torch.Tensor, eps: float, w_yes: torch.Tensor, w_no: torch.Tensor,
                             margin: float, unembed_bias: float = 0.0, image: torch.Tensor | None = None,
                             sink_positions=(0,)) -> Attribution:
    """The DLA of one run at the decision token (see the module docstring).

    Args:
        embed: [d] the embedding entering layer 0.
        layers: one :class:`LayerParts` per decoder layer, in order.
        x_final: [d] the residual leaving the last layer (the final norm's input), whose scale is held.
        norm_weight: [d] the final norm's gain γ.
        eps: the final norm's ε.
        w_yes: [d] the unembedding row of the Yes token.
        w_no: [d] the unembedding row of the No token.
        margin: the model's own logit(Yes) − logit(No), kept for comparison.
        unembed_bias: ``b_Yes − b_No`` of the unembedding (0 without a bias).
        image: bool [K] the image keys, for the split of each head by :data:`SOURCES` (needs ``probs``
            and ``values`` in every layer); None: no split.
        sink_positions: the sink's key positions, for that split.

    Returns:
        An :class:`Attribution` (per-layer parts [L], per-head parts [L, H], on the CPU); its ``sources``
        is empty without ``image``.
    """
    u = margin_direction(x_final, norm_weight, eps, w_yes, w_no)
    dot = lambda v: float(u @ _f(v).to(u.device))  # noqa: E731
    heads, step, bias, mlp = [], [], [], []
    sources: dict[str, list] = {s: [] for s in SOURCES}
    for p in layers:
        heads.append(head_contributions(p.z, p.o_weight, u))
        step.append(dot(p.step))
        bias.append(0.0 if p.o_bias is None else dot(p.o_bias))
        mlp.append(dot(p.mlp))
        if image is not None:
            split = head_source_split(p.probs, p.values, source_masks(image[:p.probs.shape[-1]], sink_positions),
                                      p.o_weight, u)
            for s in SOURCES:
                sources[s].append(split[s])
    t = lambda xs: torch.tensor(xs, dtype=u.dtype)  # noqa: E731
    return Attribution(embed=dot(embed), unembed_bias=float(unembed_bias), step=t(step),
                       heads=torch.stack(heads).cpu(), attn_bias=t(bias), mlp=t(mlp),
                       sources={s: torch.stack(v).cpu() for s, v in sources.items() if v}, margin=float(margin),
                       scale=float(rms_scale(x_final, eps)))


# ------------------------------------------------------------------------------------------ patching
def recovery(patched, corrupted: float, clean: float, floor: float = 0.0):
    """Normalised recovery ``(m_patched − m_corrupted) / (m_clean − m_corrupted)`` (tensor or float).

    Args:
        patched: the patched run's margin (a float, or a tensor of margins).
        corrupted: the corrupted run's margin (recovery 0).
        clean: the clean run's margin (recovery 1).
        floor: the rounding noise of the margins' difference.

    Returns:
        The recovery, of ``patched``'s type; NaN (every element, for a tensor) where the clean and corrupted
        margins differ by no more than ``floor`` (their difference is rounding: nothing to recover) or
        their difference is not finite.
    """
    gap = clean - corrupted
    if not math.isfinite(gap) or abs(gap) <= floor:
        return patched * math.nan if isinstance(patched, torch.Tensor) else math.nan
    return (patched - corrupted) / gap


def attribution_estimate(diff: torch.Tensor, grad: torch.Tensor, reduce_dims=(-1,)) -> torch.Tensor:
    """First-order effect of replacing an activation by ``a + diff``: ``Σ diff · ∂m/∂a`` over ``reduce_dims``."""
    return (_f(diff) * _f(grad).to(diff.device)).sum(dim=reduce_dims)


def group_positions(image: torch.Tensor) -> dict[str, torch.Tensor]:
    """Positions (in a prompt's own coordinates) of each of :data:`GROUPS`, from its image mask [T]."""
    T = len(image)
    img = torch.nonzero(image).flatten()
    after = torch.arange(int(img.max()) + 1, T - 1)
    return {"image": img, "question": after, "decision": torch.tensor([T - 1])}


def rank_of(scores: torch.Tensor, index) -> int:
    """1-based rank of entry ``index`` of ``scores`` by absolute value (1: the largest)."""
    flat = _f(scores).reshape(-1).abs()
    i = int(np.ravel_multi_index(index, tuple(scores.shape))) if isinstance(index, tuple) else int(index)
    return int((flat > flat[i]).sum()) + 1


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two equally shaped score sets (average ranks for ties; NaN-free entries only)."""
    a, b = a.double().reshape(-1), b.double().reshape(-1)  # ranks of float32 scores, correlated in float64
    keep = torch.isfinite(a) & torch.isfinite(b)
    a, b = a[keep], b[keep]
    if a.numel() < 2:
        return math.nan

    def ranks(x):
        order = torch.argsort(x)
        r = torch.empty_like(x)
        r[order] = torch.arange(len(x), dtype=x.dtype)
        for v in torch.unique(x):  # ties share their mean rank
            m = x == v
            if int(m.sum()) > 1:
                r[m] = r[m].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float(ra @ rb) / den if den > 0 else math.nan


__all__ = ["GROUPS", "SOURCES", "Attribution", "LayerParts", "attribution_estimate", "direct_logit_attribution",
           "group_positions", "head_contributions", "head_source_split", "head_writers", "margin_direction",
           "rank_of", "recovery", "rms_scale", "source_masks", "spearman"]

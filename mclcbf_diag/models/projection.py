"""One decoder layer's query/key projections as pure functions of plain tensors.

An intervention that reasons about attention before the layer runs (the barrier's h(x),
a look-ahead of the decision query's image mass) must compute what the layer will compute:
``input norm → q_proj/k_proj → per-head q/k norm (Qwen3) → rotary embedding``, split into heads,
then ``softmax(q·kᵀ · scaling)`` under the causal mask (and the sliding window, where the layer
has one). :class:`LayerWeights` holds exactly the tensors and the text model's own math for that:
the norm kind (:data:`NORMS`: Llama's RMSNorm, Gemma's ``x̂·(1 + w)`` computed in float32, or
LayerNorm), the rotary function, the KV-head repetition, the scaling and the window all come from
the adapter (``models/adapter.py``, :data:`~mclcbf_diag.models.adapter.TEXT_MATH`), so nothing here
assumes Llama. :func:`project_keys` and :func:`project_queries` compute in the dtype of their input.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..measurements.probes import rms_norm


def layer_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, bias: torch.Tensor | None = None) -> torch.Tensor:
    """LayerNorm over the last dimension, in ``x``'s dtype (for LayerNorm architectures).

    Args:
        x: the input [..., d].
        weight: the norm's weight [d].
        eps: the norm's epsilon.
        bias: the norm's bias [d] (None: none).

    Returns:
        The normalised ``x``, shaped as ``x``.
    """
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def rms_norm_offset(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's RMSNorm, ``x̂ · (1 + w)`` in float32 (float64 stays float64), cast back to ``x``'s dtype.

    Unlike Llama's (:func:`~mclcbf_diag.measurements.probes.rms_norm`), the product is taken before the cast.

    Args:
        x: the input [..., d].
        weight: the norm's weight w [d] (the offset from 1).
        eps: the norm's epsilon.

    Returns:
        The normalised ``x``, in ``x``'s dtype.
    """
    math_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    h = x.to(math_dtype)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h * (1.0 + weight.to(math_dtype))).to(x.dtype)


NORMS: dict[str, Callable] = {"rms": rms_norm, "rms_offset": rms_norm_offset, "layer": layer_norm}


@dataclass(frozen=True, eq=False)
class LayerWeights:
    """The tensors of one decoder layer that a look-ahead of its attention needs."""

    ln_weight: torch.Tensor  # [d]   the input norm's weight
    ln_eps: float
    q_weight: torch.Tensor  # [H*hd, d]
    q_bias: torch.Tensor | None
    k_weight: torch.Tensor  # [KV*hd, d]
    k_bias: torch.Tensor | None
    n_heads: int
    n_kv_heads: int
    head_dim: int
    scaling: float  # head_dim ** -0.5 for Llama
    rotary: Callable  # (q, k, cos, sin, unsqueeze_dim) → (q, k): the adapter's rotary function
    norm_kind: str = "rms"  # "rms" | "rms_offset" | "layer" (the adapter's, see NORMS)
    q_norm_weight: torch.Tensor | None = None  # [hd]: per-head query norm after q_proj (Qwen3), same kind
    k_norm_weight: torch.Tensor | None = None  # [hd]: per-head key norm after k_proj
    qk_norm_eps: float = 0.0
    window: int | None = None  # sliding window: a query at p sees keys k with p − k < window (None: all)

    TENSORS = ("ln_weight", "q_weight", "q_bias", "k_weight", "k_bias", "q_norm_weight", "k_norm_weight")

    def to(self, dtype: torch.dtype) -> "LayerWeights":
        """The same weights in ``dtype`` (returns self when nothing needs casting)."""
        tensors = {name: getattr(self, name) for name in self.TENSORS}
        if all(t is None or t.dtype == dtype for t in tensors.values()):
            return self
        return dataclasses.replace(self, **{k: None if t is None else t.to(dtype) for k, t in tensors.items()})

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's input norm applied to ``x`` (its own kind)."""
        return NORMS[self.norm_kind](x, self.ln_weight, self.ln_eps)

    def head_norm(self, x: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        """The per-head q/k norm over the last (head) dimension, or ``x`` itself when the layer has none."""
        return x if weight is None else NORMS[self.norm_kind](x, weight, self.qk_norm_eps)

    def expand_kv(self, keys: torch.Tensor) -> torch.Tensor:
        """Keys [KV, n, hd] → [H, n, hd] (grouped-query attention shares KV heads)."""
        if self.n_heads == self.n_kv_heads:
            return keys
        return keys.repeat_interleave(self.n_heads // self.n_kv_heads, dim=0)


def _project(x: torch.Tensor, w: LayerWeights, which: str, n_heads: int, cos, sin, normalized: bool) -> torch.Tensor:
    """norm → linear → per-head norm → rotary, split into heads: [heads, n, hd], in ``x``'s dtype."""
    w, cos, sin = w.to(x.dtype), cos.to(x.dtype), sin.to(x.dtype)
    out = F.linear(x if normalized else w.norm(x), getattr(w, f"{which}_weight"), getattr(w, f"{which}_bias"))
    out = w.head_norm(out.view(x.shape[0], n_heads, w.head_dim), getattr(w, f"{which}_norm_weight")).transpose(0, 1)
    out, _ = w.rotary(out, out, cos, sin, unsqueeze_dim=0)
    return out


def project_keys(x_seq: torch.Tensor, w: LayerWeights, cos: torch.Tensor, sin: torch.Tensor, *,
                 normalized: bool = False) -> torch.Tensor:
    """Keys [KV, seq, hd] from residuals x_seq [seq, d] (norm → k_proj → k-norm → rotary).

    Args:
        x_seq: the layer's input residuals [seq, d].
        w: the layer's weights.
        cos: [seq, hd], the rotary embedding's output for one row.
        sin: [seq, hd], likewise.
        normalized: ``x_seq`` already is the input norm's output (the norm is skipped).

    Returns:
        The keys [KV, seq, hd], one per key-value head.
    """
    return _project(x_seq, w, "k", w.n_kv_heads, cos, sin, normalized)


def project_queries(x_tok: torch.Tensor, w: LayerWeights, cos_tok: torch.Tensor, sin_tok: torch.Tensor, *,
                    normalized: bool = False) -> torch.Tensor:
    """Queries [H, n_tok, hd] from residuals x_tok [n_tok, d] (norm → q_proj → q-norm → rotary).

    Args:
        x_tok: the layer's input residuals of the query tokens [n_tok, d].
        w: the layer's weights.
        cos_tok: [n_tok, hd], the rotary embedding's output at those tokens' positions.
        sin_tok: [n_tok, hd], likewise.
        normalized: ``x_tok`` already is the input norm's output (the norm is skipped).

    Returns:
        The queries [H, n_tok, hd].
    """
    return _project(x_tok, w, "q", w.n_heads, cos_tok, sin_tok, normalized)


def attention_rows(q: torch.Tensor, keys: torch.Tensor, w: LayerWeights, query_positions) -> torch.Tensor:
    """Causal softmax rows [H, n, seq] of queries q [H, n, hd] over keys [KV, seq, hd] (and the layer's window).

    Args:
        q: the queries [H, n, hd] (:func:`project_queries`).
        keys: the keys [KV, seq, hd] (:func:`project_keys`), repeated to the query heads.
        w: the layer's weights (its scaling and sliding window).
        query_positions: the n queries' positions; keys after a query, or a window or more before it, are masked.

    Returns:
        The attention probabilities [H, n, seq].
    """
    k = w.expand_kv(keys.to(q.dtype))
    scores = torch.matmul(q, k.transpose(-1, -2)) * w.scaling
    pos = torch.as_tensor(query_positions, device=q.device).reshape(-1, 1)
    key_pos = torch.arange(k.shape[-2], device=q.device)[None, :]
    hidden = key_pos > pos
    if w.window is not None:
        hidden = hidden | (pos - key_pos >= w.window)
    scores = scores.masked_fill(hidden[None], torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=-1)

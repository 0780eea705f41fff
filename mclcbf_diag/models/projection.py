"""One decoder layer's query/key projections as pure functions of plain tensors.

An intervention that reasons about attention before the layer runs (the barrier's h(x),
a look-ahead of the decision query's image mass) must compute what the layer will compute:
``input norm → q_proj/k_proj → rotary embedding``, split into heads. :class:`LayerWeights`
holds exactly the tensors and the architecture's own functions for that (the norm kind, the
rotary function and the KV-head repetition come from the adapter, so nothing here assumes
Llama); :func:`project_keys` and :func:`project_queries` compute in the dtype of their input.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..probes import rms_norm


def layer_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, bias: torch.Tensor | None = None) -> torch.Tensor:
    """LayerNorm over the last dimension, in ``x``'s dtype (for LayerNorm architectures)."""
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


NORMS: dict[str, Callable] = {"rms": rms_norm, "layer": layer_norm}


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
    norm_kind: str = "rms"  # "rms" | "layer" (the adapter's)

    def to(self, dtype: torch.dtype) -> "LayerWeights":
        """The same weights in ``dtype`` (returns self when nothing needs casting)."""
        tensors = (self.ln_weight, self.q_weight, self.q_bias, self.k_weight, self.k_bias)
        if all(t is None or t.dtype == dtype for t in tensors):
            return self
        cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
        return dataclasses.replace(self, ln_weight=cast(self.ln_weight), q_weight=cast(self.q_weight),
                                   q_bias=cast(self.q_bias), k_weight=cast(self.k_weight), k_bias=cast(self.k_bias))

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's input norm applied to ``x`` (its own kind)."""
        return NORMS[self.norm_kind](x, self.ln_weight, self.ln_eps)

    def expand_kv(self, keys: torch.Tensor) -> torch.Tensor:
        """Keys [KV, n, hd] → [H, n, hd] (grouped-query attention shares KV heads)."""
        if self.n_heads == self.n_kv_heads:
            return keys
        return keys.repeat_interleave(self.n_heads // self.n_kv_heads, dim=0)


def _project(x: torch.Tensor, w: LayerWeights, weight: str, bias: str, n_heads: int, cos, sin,
             normalized: bool) -> torch.Tensor:
    """norm → linear → rotary, split into heads: [heads, n, hd], in ``x``'s dtype."""
    w, cos, sin = w.to(x.dtype), cos.to(x.dtype), sin.to(x.dtype)
    out = F.linear(x if normalized else w.norm(x), getattr(w, weight), getattr(w, bias))
    out = out.view(x.shape[0], n_heads, w.head_dim).transpose(0, 1)
    out, _ = w.rotary(out, out, cos, sin, unsqueeze_dim=0)
    return out


def project_keys(x_seq: torch.Tensor, w: LayerWeights, cos: torch.Tensor, sin: torch.Tensor, *,
                 normalized: bool = False) -> torch.Tensor:
    """Keys [KV, seq, hd] from residuals x_seq [seq, d] (norm → k_proj → rotary).

    ``cos``/``sin`` are [seq, hd] (the rotary embedding's output for one row).
    ``normalized=True`` means ``x_seq`` already is the input norm's output.
    """
    return _project(x_seq, w, "k_weight", "k_bias", w.n_kv_heads, cos, sin, normalized)


def project_queries(x_tok: torch.Tensor, w: LayerWeights, cos_tok: torch.Tensor, sin_tok: torch.Tensor, *,
                    normalized: bool = False) -> torch.Tensor:
    """Queries [H, n_tok, hd] from residuals x_tok [n_tok, d] (norm → q_proj → rotary)."""
    return _project(x_tok, w, "q_weight", "q_bias", w.n_heads, cos_tok, sin_tok, normalized)


def attention_rows(q: torch.Tensor, keys: torch.Tensor, w: LayerWeights, query_positions) -> torch.Tensor:
    """Causal softmax rows [H, n, seq] of queries q [H, n, hd] over keys [KV, seq, hd]."""
    k = w.expand_kv(keys.to(q.dtype))
    scores = torch.matmul(q, k.transpose(-1, -2)) * w.scaling
    pos = torch.as_tensor(query_positions, device=q.device).reshape(-1, 1)
    future = torch.arange(k.shape[-2], device=q.device)[None, :] > pos
    scores = scores.masked_fill(future[None], torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=-1)

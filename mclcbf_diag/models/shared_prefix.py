"""Attention for many rows that each continue a cached prefix, without copying the prefix.

A population run asks hundreds of small questions of one prompt: every unit (an edit, a
dose, a sweep setting) changes only the decision token or the text after the image, so all
units of a question continue the same cached prefix. Through transformers' KV cache that
means one cache row per unit: the question's prefix keys and values are gathered (copied)
for every row, and copied again when the new keys are appended. On the embedded model that
is about 5 MB per row, and those copies, not the arithmetic, set the pace.

Here the rows keep pointing at their question's prefix instead:

* **Prefix** (:class:`SharedPrefix`): per decoder layer, the keys and values of positions
  ``[0, start)`` of every question of a batch (the prefix forward's own cache tensors,
  ``[questions, kv heads, ≥ start, head dim]``, sliced, never copied), and for each row the
  question it continues (``owner``).
* **Attention** (:func:`shared_prefix_attention`, registered with transformers'
  ``AttentionInterface`` as :data:`NAME`): the forward runs without a cache over positions
  ``start …`` and each layer's attention gets the rows' own queries, keys and values. For
  each question, its rows' queries are laid out as extra query positions of one matrix
  product with that question's prefix keys (``[kv heads, rows·group·s, D] @ [kv heads, D,
  start]``, the queries scaled beforehand); the scores on the rows' own keys are computed
  as usual; the two are joined along the key axis, masked, and normalised by one
  ``nn.functional.softmax`` in float32, the call an intervention's ``attention`` site edits,
  exactly as in eager attention; the output is again a prefix product plus an own-keys
  product. Every number is eager attention's up to rounding order (≪ 1e-5 in float32).
* **Mask** (:func:`continuation_mask`): a prepared 4-D additive mask ``[rows, 1, s, start +
  s]`` (pad keys and later positions at the dtype's minimum, as transformers builds it),
  which transformers passes through unchanged.
* **Scope** (:func:`continuing`): the language model uses this attention only inside the
  context manager, which also hands each attention module the prefix; outside it the model
  is untouched (eager attention).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn
from transformers import AttentionInterface

NAME = "mclcbf_shared_prefix"


@dataclass(frozen=True)
class SharedPrefix:
    """Cached positions ``[0, start)`` of a question batch, shared by the rows that continue them."""

    keys: list  # per layer: [questions, kv heads, ≥ start, head dim]
    values: list  # per layer, likewise
    start: int
    owner: torch.Tensor  # [rows]: the question (index into keys[layer]) each row continues

    @cached_property
    def groups(self) -> list[tuple[int, slice]]:
        """Runs of consecutive rows continuing the same question: ``(question, rows)`` (computed once)."""
        owner = self.owner.tolist()
        out, lo = [], 0
        for b in range(1, len(owner) + 1):
            if b == len(owner) or owner[b] != owner[lo]:
                out.append((owner[lo], slice(lo, b)))
                lo = b
        return out


def continuation_mask(attention_mask: torch.Tensor, start: int, dtype: torch.dtype) -> torch.Tensor:
    """The additive mask ``[rows, 1, T − start, T]`` of queries ``start … T−1`` over all ``T`` keys.

    A key is visible when it is not padding (``attention_mask`` 1) and not after the query (causal); hidden keys get
    ``finfo(dtype).min``, as in transformers' eager masks.

    Args:
        attention_mask: [rows, T] 1 for a token, 0 for padding.
        start: the first query's position.
        dtype: the mask's dtype (the attention's).

    Returns:
        The mask ``[rows, 1, T − start, T]``.
    """
    T = attention_mask.shape[1]
    keys = torch.arange(T, device=attention_mask.device)
    queries = torch.arange(start, T, device=attention_mask.device)
    visible = (keys[None, :] <= queries[:, None])[None] & attention_mask[:, None, :].bool()  # [rows, s, T]
    out = torch.zeros(visible.shape, dtype=dtype, device=attention_mask.device)
    return out.masked_fill_(~visible, torch.finfo(dtype).min)[:, None]


def _heads_first(x: torch.Tensor, n_kv: int) -> torch.Tensor:
    """``[n, H, s, c]`` → ``[kv heads, n·group·s, c]`` (query head h = kv head · group + g)."""
    n, H, s, c = x.shape
    return x.reshape(n, n_kv, H // n_kv, s, c).permute(1, 0, 2, 3, 4).reshape(n_kv, -1, c)


def _rows_first(x: torch.Tensor, n: int, H: int, s: int) -> torch.Tensor:
    """The inverse of :func:`_heads_first`."""
    n_kv, _, c = x.shape
    return x.reshape(n_kv, n, H // n_kv, s, c).permute(1, 0, 2, 3, 4).reshape(n, H, s, c)


def shared_prefix_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0, **kwargs):
    """Eager attention over the shared prefix of :func:`continuing` plus the rows' own keys.

    A drop-in for transformers' ``eager_attention_forward``: the prefix's keys and values are those the module's
    shared prefix holds for its layer, shared by each group of rows.

    Args:
        module: the attention module (its ``layer_idx`` and shared prefix).
        query: the rows' queries ``[rows, H, s, D]``.
        key: the rows' own keys ``[rows, kv heads, s, D]`` (positions ``start …`` only).
        value: the rows' own values, shaped as ``key``.
        attention_mask: an additive mask, broadcast to the scores ``[rows, H, s, start + s]``; or None.
        scaling: the queries' scale (the module's).
        dropout: unused (eval only); taken for the signature.
        **kwargs: unused; taken for the signature.

    Returns:
        ``(output [rows, s, H, D], probabilities [rows, H, s, start + s])`` like ``eager_attention_forward``.
    """
    prefix: SharedPrefix = module._mclcbf_shared_prefix
    keys, values = prefix.keys[module.layer_idx], prefix.values[module.layer_idx]
    rows, H, s, _ = query.shape
    n_kv, start = key.shape[1], prefix.start
    groups = prefix.groups
    query = query * scaling  # the queries are far fewer numbers than the scores
    scores = query.new_empty(rows, H, s, start + s)
    for q, sl in groups:
        n = sl.stop - sl.start
        pre = torch.matmul(_heads_first(query[sl], n_kv), keys[q, :, :start].transpose(-1, -2))
        scores[sl, :, :, :start] = _rows_first(pre, n, H, s)
    own_keys = key.repeat_interleave(H // n_kv, dim=1)
    own_values = value.repeat_interleave(H // n_kv, dim=1)
    scores[..., start:] = torch.matmul(query, own_keys.transpose(2, 3))
    if attention_mask is not None:
        scores.add_(attention_mask)
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(probs[..., start:], own_values)
    for q, sl in groups:
        n = sl.stop - sl.start
        part = torch.matmul(_heads_first(probs[sl, :, :, :start], n_kv), values[q, :, :start])
        out[sl] += _rows_first(part, n, H, s)
    return out.transpose(1, 2).contiguous(), probs


AttentionInterface.register(NAME, shared_prefix_attention)


@contextmanager
def continuing(lm, prefix: SharedPrefix):
    """Within the block, ``lm``'s language model attends with :func:`shared_prefix_attention` to ``prefix``."""
    attns = [lm.adapter.layer_part(lm.model, i, "layer_attention") for i in range(lm.n_layers)]
    config = attns[0].config
    before = config._attn_implementation
    for a in attns:
        a._mclcbf_shared_prefix = prefix
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = before
        for a in attns:
            del a._mclcbf_shared_prefix


__all__ = ["NAME", "SharedPrefix", "continuation_mask", "continuing", "shared_prefix_attention"]

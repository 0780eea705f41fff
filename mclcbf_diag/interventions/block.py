"""Attention blocking: cut the attention edges from one token group to another in chosen layers.

After Zhang et al., "Cross-modal Information Flow in Multimodal Large Language Models"
(CVPR 2025): to ask whether information flows from a group of key positions to a group of
query positions at some depth, the queries are prevented from attending to those keys in a
window of layers. The paper masks the pre-softmax scores with −∞; here the softmax rows
are edited after the softmax, setting the blocked entries to 0 and renormalising the rest,
which is the same distribution (softmax over the unblocked keys) and so the same forward.

Groups, in llava-hf's layout (``USER: <image>\\n{question}\\nASSISTANT:``): ``image`` (the
image tokens), ``question`` (every text token after the image but the last), ``last`` (the
decision token). Edges: image → question, image → last, question → last.
"""

from __future__ import annotations

import torch

from .base import AttentionEditBase, Row, Site
from .catalog import SPECS, BlockKnobs, Group  # noqa: F401 - BlockKnobs, Group re-exported


def group_positions(row: Row, group: str) -> torch.Tensor:
    """A row's own positions of ``group``."""
    if group == "image":
        return torch.nonzero(row.image).flatten()
    if group == "last":
        return torch.tensor([row.decision])
    return torch.arange(row.last_image + 1, row.decision)  # the question: after the image, before the last


def block_rows(probs: torch.Tensor, blocked: torch.Tensor) -> torch.Tensor:
    """Softmax rows [..., K] with the keys in ``blocked`` (bool [K]) removed and the rest renormalised."""
    p = probs.to(torch.float32).masked_fill(blocked.to(probs.device), 0.0)
    return (p / p.sum(-1, keepdim=True).clamp_min(1e-30)).to(probs.dtype)


class AttentionBlock(AttentionEditBase, spec=SPECS["block"]):
    def first_edited(self, row: Row) -> int | None:
        q = group_positions(row, self.knobs.target)
        return int(q.min()) if q.numel() else None

    def attention(self, site: Site) -> None:
        if site.phase != "prefill":
            return  # the groups are prompt positions
        for row in site.rows:
            q = group_positions(row, self.knobs.target)
            present = set(site.positions(row).tolist())
            q = torch.tensor([p for p in q.tolist() if p in present], dtype=torch.long)
            if not q.numel():
                continue
            keys = torch.zeros(row.length, dtype=torch.bool)
            keys[group_positions(row, self.knobs.source)] = True
            rows = site.tensor[row.index][:, site.query_index(row, q)]
            site.set_rows(row, q, block_rows(rows, site.key_mask(row, keys)))

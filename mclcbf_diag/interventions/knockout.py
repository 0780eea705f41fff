"""Attention knockouts: set the image attention mass of chosen queries, renormalised, in every layer.

``factor`` scales each head's image mass (0 removes it, 2 doubles it, capped just below 1);
``target`` instead sets it to a fixed mass (a graded sweep sets 0, 0.1, …, 0.9). The edit
is made after the softmax by :func:`~mclcbf_diag.interventions.attention_edits.rescale_image_probs`,
which equals shifting the image-key logits, so every row still sums to one. ``tokens`` is
``"decision"`` (the last prompt token only) or ``"after_image"`` (every text token after the
image, the decision token included); ``layers`` limits the edit to a window.
"""

from __future__ import annotations

from .attention_edits import rescale_image_probs
from .base import AttentionEditBase, Row, Site
from .catalog import SPECS, KnockoutKnobs  # noqa: F401 - KnockoutKnobs re-exported


class AttentionKnockout(AttentionEditBase, spec=SPECS["knockout"]):
    def first_edited(self, row: Row) -> int | None:
        return row.decision if self.knobs.tokens == "decision" else int(row.after_image()[0])

    def attention(self, site: Site) -> None:
        probs = site.tensor
        for row in site.rows:
            if self.knobs.tokens == "decision" or site.phase == "decode":
                q = [site.current(row)]
            else:
                q = row.after_image()
            p = probs[row.index][:, site.query_index(row, q)]
            mask = site.key_mask(row, row.image)
            if self.knobs.target is not None:
                target = min(self.knobs.target, 1 - 1e-4)
            else:
                target = (p.float()[..., mask].sum(-1) * self.knobs.factor).clamp(max=1 - 1e-4)
            site.set_rows(row, q, rescale_image_probs(p, mask, target))

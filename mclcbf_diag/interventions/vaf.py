"""ClearSight / VAF: in middle layers, text queries' image-key logits ×α and prefix-key logits ×β.

Paper: Yin et al., "ClearSight: Visual Signal Enhancement for Object Hallucination
Mitigation in Multimodal Large Language Models", CVPR 2025 (Visual Amplification Fusion).
Released code: github.com/ustc-hyin/ClearSight, ``visaug/inference/AttnAdapter.py`` and
``infer_pope.py``: on ``attn_weights = q·kᵀ/√d`` (before the mask and the softmax), with
``SYS_LEN = 35`` (LLaVA's system prompt, BOS included) and ``IMG_LEN = 576``::

    prefill: attn[:, :, SYS+IMG:, SYS:SYS+IMG] *= enh_para;  attn[:, :, SYS+IMG:, :SYS] *= sup_para
    decode:  attn[:, :, :,        SYS:SYS+IMG] *= enh_para;  attn[:, :, :,        :SYS] *= sup_para

in layers ``8 < i < 15`` (9–14 of 32), POPE with ``--enh-para 1.15 --sup-para 0.95``. Here
(llava-hf, no system prompt): the queries are the text tokens after the image (the decision
token included) and, in decode, the new token; the image keys are detected from
``input_ids``; the "system" keys are every position before the image, BOS included as in the
released code (``:SYS``), ``include_bos=False`` leaves BOS alone.

On the seam: scaling a logit, a ← c·a, is the logit change δ = (c − 1)·a, which needs the
actual logit. The ``residual`` site computes the queries' logits on image and prefix keys as
a look-ahead (:func:`~mclcbf_diag.interventions.pai.lookahead_logits`, float32) and the
``attention`` site applies δ to the probability rows exactly
(:func:`~mclcbf_diag.interventions.pai.apply_logit_deltas`).
"""

from __future__ import annotations

import torch

from .base import Intervention, Row, Site
from .catalog import SPECS, VAFKnobs  # noqa: F401 - VAFKnobs re-exported
from .pai import apply_logit_deltas, lookahead_logits, published_layers


class VAF(Intervention, spec=SPECS["vaf"]):
    metrics = {"vaf_image_delta": "VAF: mean (α−1)·a added to the text queries' image-key logits (heads, queries)",
               "vaf_prefix_delta": "VAF: mean (β−1)·a added to the text queries' prefix-key logits"}
    sites = frozenset({"residual", "attention"})

    def layers(self, n_layers: int) -> tuple[int, ...]:
        return published_layers(self.knobs.layers, n_layers, 9, 15)

    def open_sites(self, steer: bool) -> frozenset[str]:
        return self.sites if steer else frozenset()

    def first_edited(self, row: Row) -> int | None:
        return int(row.after_image()[0])

    def begin(self, rows, n_layers):
        self._pending: dict[int, tuple] = {}

    def _prefix(self, row: Row) -> torch.Tensor:
        mask = torch.zeros(row.length, dtype=torch.bool)
        mask[: int(torch.nonzero(row.image).min())] = True
        if not self.knobs.include_bos:
            mask[0] = False
        return mask

    def _queries(self, site: Site, row: Row) -> torch.Tensor:
        if site.phase == "decode":
            return torch.tensor([site.current(row)])
        q = row.after_image()
        return q[q >= int(site.positions(row)[0])]  # present in this forward

    def residual(self, site: Site) -> None:
        k = self.knobs
        for row in site.rows:
            q = self._queries(site, row)
            if not q.numel():
                continue
            d = site.dose
            img = (k.alpha - 1) * d * lookahead_logits(site, row, q, row.image)
            pre = (k.beta - 1) * d * lookahead_logits(site, row, q, self._prefix(row))
            self._pending[row.index] = (q, img, pre)

    def attention(self, site: Site) -> None:
        for row in site.rows:
            if row.index not in self._pending:
                continue
            q, img, pre = self._pending.pop(row.index)
            p = site.tensor[row.index][:, site.query_index(row, q)]
            delta = torch.zeros(p.shape, dtype=torch.float64, device=p.device)
            delta[..., site.key_mask(row, row.image)] = img.to(delta)
            delta[..., site.key_mask(row, self._prefix(row))] = pre.to(delta)
            site.set_rows(row, q, apply_logit_deltas(p, delta))
            site.record(row, "vaf_image_delta", float(img.mean()))
            site.record(row, "vaf_prefix_delta", float(pre.mean()) if pre.numel() else 0.0)

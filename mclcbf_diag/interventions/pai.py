"""PAI: amplify the decision query's attention logits on image keys, a ← a + α·|a|.

Paper: Liu, Zheng, Chen et al., "Paying More Attention to Image: A Training-Free Method for
Alleviating Hallucination in LVLMs", ECCV 2024. Released code: github.com/LALBJ/PAI
(``attention.py``, ``llama_new_forward``): after ``attn_weights = q·kᵀ/√d + mask`` and
before the softmax, for the *last query row only*, all heads, image columns
``[img_start, img_end)``::

    attn_weights[:, :, -1, img] = attn_weights[:, :, -1, img].abs() * alpha + attn_weights[:, :, -1, img]

in layers ``start_layer … end_layer−1`` (README/POPE: ``--alpha 0.2 --start-layer 2
--end-layer 32``), in the prefill (the decision token) and at every generated token (the
last row is the new token). Here: image keys detected from ``input_ids``; layers 2–31 of 32
mapped by :func:`~mclcbf_diag.interventions.layers.depth_fraction`.

How it is done on the seam. The ``attention`` site holds the softmax *output*; the logit a
itself is gone (log p recovers it only up to a per-row constant, and |a| needs the real
value). So the ``residual`` site, which runs first in the same layer, computes the decision
query's image-key logits as a look-ahead from the layer's own norm, q/k projections and
RoPE (``Site.keys``, ``Site.rotary``, :func:`~mclcbf_diag.models.projection.project_queries`)
in float32, and the attention site applies the logit change δ_k = α·|a_k| on image keys to
the probability row exactly: ``p'_k = p_k·e^{δ_k} / Σ_j p_j·e^{δ_j}`` (:func:`apply_logit_deltas`;
softmax(a+δ) ∝ p·e^δ). A key whose probability rounded to exactly 0 stays 0.

The image-free contrast (``CFG.py``, ``CFGLogits``; README ``--use-cfg --gamma 1.1``) acts on
the answer's distribution (the ``logits`` site): an auxiliary forward of the same prompt with
its image tokens removed (``init_cfg_processor``'s ``neg_prompt``; the attention edit has no
image key to act on there, as the released code's ``use_cfg`` switch leaves it off) gives
log p_u, and the scores are ``γ·(log p − log p_u) + log p_u`` on the tokens with
p ≥ ``cutoff``·max p of the edited run (0.1, fixed in the released code), −inf elsewhere.
Where the runner kept the question's own forward's cache (``pope``), the image-free prompt continues
it from the first image token on (:func:`~.views.image_free_logits`): the text before the image is
the same in both. ``contrast_gamma=1`` is the attention edit alone (the ``attention-only`` preset); ``dose``
scales α and γ − 1 together.
"""

from __future__ import annotations

import torch

from ..models.projection import project_queries
from .base import Batched, Intervention, Readout, Row, Site, View
from .catalog import SPECS, PAIKnobs  # noqa: F401 - PAIKnobs re-exported
from .contrast import guidance, plausible
from .decoding import WithLogitPart, answer_from
from .layers import published_layers
from .views import image_free_inputs, image_free_logits, last_logits


def apply_logit_deltas(probs: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Softmax rows ``probs`` [..., K] after adding ``delta`` (broadcast) to their logits.

    Exact: softmax(a + δ) = p·e^δ / Σ p·e^δ (computed in float64, max-shifted); returned in
    ``probs``' dtype.
    """
    p = probs.to(torch.float64)
    d = torch.as_tensor(delta, device=p.device).to(torch.float64).expand_as(p)
    w = p * torch.exp(d - d.amax(-1, keepdim=True))
    return (w / w.sum(-1, keepdim=True)).to(probs.dtype)


def lookahead_logits(site: Site, row: Row, positions, key_mask: torch.Tensor) -> torch.Tensor:
    """Pre-softmax logits [H, n, m] of the row's queries at ``positions`` on the keys of ``key_mask``.

    As the layer will compute them (float32).

    Args:
        site: the attention site (its layer's weights, residuals and keys).
        row: the batch row.
        positions: the n query positions (the row's own).
        key_mask: the m keys (bool, over the row's own positions, all before the queries).

    Returns:
        [H, n, m] float32.
    """
    w = site.weights.to(torch.float32)
    pos = torch.as_tensor(positions, dtype=torch.long)
    x = site.tensor[row.index, site.query_index(row, pos)].float()
    cos, sin = site.rotary(row, pos)
    q = project_queries(x, w, cos.float(), sin.float())
    keys = site.keys(row).float()
    idx = torch.nonzero(key_mask[: keys.shape[-2]]).flatten().to(keys.device)
    k = w.expand_kv(keys[:, idx])
    return torch.matmul(q, k.transpose(-1, -2)) * w.scaling


class PAI(WithLogitPart, Intervention, spec=SPECS["pai"]):
    metrics = {"pai_logit_delta": "PAI: mean α·|a| added to the decision query's image-key logits (head mean)"}
    sites = frozenset({"residual", "attention"})

    def layers(self, n_layers: int) -> tuple[int, ...]:
        return published_layers(self.knobs.layers, n_layers, 2, 32)

    logit_knob, logit_off = "contrast_gamma", 1.0  # γ = 1: the attention edit alone

    def auxiliary_forwards(self) -> int | None:
        return 1 if self.logit_part_on else None  # the image-free view; without it, no logit part

    def prepare(self, lm, inputs: dict, rows: list[Row]) -> None:
        self.prepare_batched(lm, inputs, rows, Batched())

    def prepare_batched(self, lm, inputs: dict, rows: list[Row], batched: Batched) -> None:
        """The image-free logits, where PAI's logit part is on.

        They continue the main rows' cached prefix where the runner kept it (``batched.cache``,
        :func:`~.views.image_free_logits`), else come from a forward of their own.

        Args:
            lm: the loaded model.
            inputs: the batch's model inputs.
            rows: the batch rows prepared.
            batched: what the runner kept of the batch's own forwards (its ``cache``).
        """
        self._yes_no = (int(lm.tokens.yes_id), int(lm.tokens.no_id))
        self._image_free = {}
        if self.logit_part_on:
            if batched.cache is not None:
                logits = image_free_logits(lm, rows, batched.cache, inputs["attention_mask"])
            else:
                logits = last_logits(lm, image_free_inputs(lm, rows))
            self._image_free = {r.index: logits[b].cpu() for b, r in enumerate(rows)}

    def decode_views(self, lm, inputs: dict, rows: list[Row]) -> dict:
        """The image-free prompt (:func:`~.views.image_free_inputs`), a plain forward a generation loop continues by
        its own cache ({} with the contrast off)."""
        return {"image-free prompt": View(image_free_inputs(lm, rows))} if self.logit_part_on else {}

    def use_decode_views(self, lm, rows: list[Row], outputs: dict) -> None:
        """The image-free logits from the view's output."""
        free = outputs.get("image-free prompt")
        self.use_views(lm, rows, [None] * len(rows) if free is None else list(free.logits.float().cpu()))

    def view_key(self):
        """The image-free view reads no knob (the attention edit has no image key there): one per question, with the
        contrast on."""
        return (type(self), self.logit_part_on)

    def prepared_views(self, rows: list[Row]) -> list:
        """Each row's image-free logits [vocab] (None with the contrast off)."""
        return [self._image_free.get(r.index) for r in rows]

    def use_views(self, lm, rows: list[Row], views: list) -> None:
        self._yes_no = (int(lm.tokens.yes_id), int(lm.tokens.no_id))
        self._image_free = {r.index: v for r, v in zip(rows, views) if v is not None}

    def readout(self, site: Readout) -> None:
        for row in site.rows:
            logits = site.logits[row.index]
            free = self._image_free[row.index].to(logits.device)
            gamma = 1.0 + (self.knobs.contrast_gamma - 1.0) * site.dose_of(row)
            raw = guidance(logits, free, gamma)
            answer_from(site, row, raw, plausible(logits, self.knobs.cutoff), self._yes_no, free)

    def first_edited(self, row: Row) -> int | None:
        return row.decision

    def begin(self, rows, n_layers):
        self._delta: dict[int, torch.Tensor] = {}

    def residual(self, site: Site) -> None:
        for row in site.rows:
            a = lookahead_logits(site, row, [site.current(row)], row.image)  # [H, 1, m]
            self._delta[row.index] = self.knobs.alpha * site.dose * a.abs()

    def attention(self, site: Site) -> None:
        for row in site.rows:
            q = [site.current(row)]
            p = site.tensor[row.index][:, site.query_index(row, q)]
            delta = torch.zeros(p.shape, dtype=torch.float64, device=p.device)
            delta[..., site.key_mask(row, row.image)] = self._delta.pop(row.index).to(delta)
            site.set_rows(row, q, apply_logit_deltas(p, delta))
            site.record(row, "pai_logit_delta", float(delta[..., site.key_mask(row, row.image)].mean()))

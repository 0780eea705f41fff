"""Turn captured runs into tidy records: every probe family, per layer and head.

Pure post-processing: the tensors saved by :mod:`mclcbf_diag.intervene` plus the model's
weights go through the math in :mod:`mclcbf_diag.probes`; nothing here runs the model.
Attention masses always use the image span *detected* from ``input_ids`` (the truth),
whatever span the barrier was configured with; the barrier's own ``h`` uses its span.
"""

from __future__ import annotations

import math

import torch

from . import probes as P
from .intervene import LayerCapture, RunCapture, StepCapture
from .models import LoadedModel
from .records import NO_HEAD, NO_LAYER, frame

_STEP_METRICS = {  # StepResult field -> record metric
    "active": "barrier_active", "tau": "barrier_tau", "grad_norm": "grad_norm",
    "grad_norm_sq_dtype": "grad_norm_sq_dtype", "scale_unclamped": "scale_unclamped",
    "scale": "scale", "clamp_active": "clamp_active", "theta_norm": "theta_norm",
    "theta_rel": "theta_rel", "applied_norm": "applied_norm",
}
_EXTRA_METRICS = ("grad_norm_f32", "dh_predicted", "dh_recomputed", "dh_realised", "rounding_survival",
                  "barrier_active", "barrier_tau")  # the last two only where no StepResult has them


class _Rows:
    """Column-wise accumulator for the records of one (sample, condition, phase, step)."""

    def __init__(self, sample, condition, phase, step):
        self.key = {"sample": sample, "condition": condition, "phase": phase, "step": step}
        self.layer, self.head, self.metric, self.value = [], [], [], []

    def add(self, layer: int, metric: str, value, head: int = NO_HEAD) -> None:
        self.layer.append(layer)
        self.head.append(head)
        self.metric.append(metric)
        self.value.append(float(value) if value is not None else math.nan)

    def add_heads(self, layer: int, metric: str, values: torch.Tensor) -> None:
        """One row per head plus the head mean (head −1)."""
        vals = values.tolist()
        n = len(vals)
        self.layer += [layer] * (n + 1)
        self.head += list(range(n)) + [NO_HEAD]
        self.metric += [metric] * (n + 1)
        self.value += vals + [sum(vals) / n]

    @property
    def rows(self) -> dict[str, list]:
        n = len(self.value)
        return {**{k: [v] * n for k, v in self.key.items()}, "layer": self.layer, "head": self.head,
                "metric": self.metric, "value": self.value}


def _norm_params(lm: LoadedModel, i: int):
    ad = lm.adapter
    n1 = ad.layer_part(lm.model, i, "layer_input_norm")
    n2 = ad.layer_part(lm.model, i, "layer_post_attention_norm")
    return (n1.weight.detach(), n1.variance_epsilon), (n2.weight.detach(), n2.variance_epsilon)


def _gains(rows: _Rows, layer: int, name: str, x: torch.Tensor, norm, direction) -> None:
    g = P.rms_norm_gains(x.float(), norm[0].float(), norm[1], direction)
    rows.add(layer, f"{name}_gain_theta", g["gain_along"])
    rows.add(layer, f"{name}_gain_theta_backward", g["gain_along_backward"])
    rows.add(layer, f"{name}_gain_orthogonal", g["gain_orthogonal"])
    rows.add(layer, f"{name}_gain_radial", g["gain_radial"])


def _layer_rows(rows: _Rows, lm: LoadedModel, i: int, cap: LayerCapture, image_mask, final_norm,
                unembed, base: LayerCapture | None) -> None:
    ln1, ln2 = _norm_params(lm, i)
    theta = None
    if cap.step is not None and cap.step.active and cap.step.theta.dim() > 0:
        theta = cap.step.theta.float().reshape(-1, cap.resid_pre_in.shape[-1])[-1]
        if theta.norm() == 0:
            theta = None
    for site, x in (("resid_pre", cap.resid_pre), ("resid_mid", cap.resid_mid), ("resid_post", cap.resid_post)):
        rows.add(i, f"{site}_norm", x.float().norm())
    rows.add(i, "ln1_out_norm", P.rms_norm(cap.resid_pre_in.float(), ln1[0].float(), ln1[1]).norm())
    for name, x in (("ln1", cap.resid_pre_in), ("ln2", cap.resid_mid), ("ln_final", cap.resid_post)):
        rows.add(i, f"{name}_scale", x.float().pow(2).mean().add(
            (ln1 if name == "ln1" else ln2 if name == "ln2" else final_norm)[1]).sqrt())
    _gains(rows, i, "ln1", cap.resid_pre_in, ln1, theta)
    _gains(rows, i, "ln2", cap.resid_mid, ln2, theta)
    _gains(rows, i, "ln_final", cap.resid_post, final_norm, theta)
    masses = P.attention_masses(cap.attn, image_mask)
    for kind, per_head in masses.items():
        rows.add_heads(i, f"attn_{kind}_mass", per_head)
    rows.add(i, "logit_lens_margin", P.yes_no_margin(cap.resid_post.float(), final_norm[0].float(), final_norm[1],
                                                     unembed, lm.tokens.yes_id, lm.tokens.no_id))
    if cap.barrier_h is not None:
        rows.add(i, "barrier_h", cap.barrier_h)
    if cap.step is not None:
        rec = cap.step.to_record()
        for field, metric in _STEP_METRICS.items():
            rows.add(i, metric, rec[field])
    for metric in _EXTRA_METRICS:
        if metric in cap.extra and not (metric in ("barrier_active", "barrier_tau") and cap.step is not None):
            rows.add(i, metric, cap.extra[metric])
    if "logit_shift" in cap.extra:
        rows.add_heads(i, "logit_shift", cap.extra["logit_shift"])
    if base is not None:
        d = P.propagation_distance(cap.resid_post, base.resid_post)
        rows.add(i, "propagation", d)
        rows.add(i, "propagation_rel", d / max(float(base.resid_post.float().norm()), 1e-30))


def step_records(lm: LoadedModel, cap: StepCapture, image_mask: torch.Tensor, *, sample, condition: str,
                 base: StepCapture | None = None) -> dict[str, list]:
    fn = lm.final_norm()
    final_norm = (fn.weight.detach(), fn.variance_epsilon)
    unembed = lm.unembed_weight().float()
    rows = _Rows(sample, condition, cap.phase, cap.step)
    for i, layer_cap in cap.layers.items():
        _layer_rows(rows, lm, i, layer_cap, image_mask, final_norm, unembed,
                    base.layers.get(i) if base is not None else None)
    logits = cap.final_logits
    margin = float(logits[lm.tokens.yes_id] - logits[lm.tokens.no_id])
    rows.add(NO_LAYER, "final_margin", margin)
    rows.add(NO_LAYER, "answer_yes", margin > 0)
    for token, tid in {**lm.tokens.yes_variants, **lm.tokens.no_variants}.items():
        rows.add(NO_LAYER, f"final_logit:{token}", logits[tid])
    if base is not None and cap.layers:
        last = max(cap.layers)
        steered_out = P.rms_norm(cap.layers[last].resid_post.float(), final_norm[0].float(), final_norm[1])
        base_out = P.rms_norm(base.layers[last].resid_post.float(), final_norm[0].float(), final_norm[1])
        rows.add(NO_LAYER, "propagation", P.propagation_distance(steered_out, base_out))
    return rows.rows


def span_records(run: RunCapture, *, sample, condition: str) -> dict[str, list]:
    """How the configured image span matches the detected one (layer −1, prefill)."""
    rows = _Rows(sample, condition, "prefill", 0)
    conf, det = run.span.bool(), run.detected.bool()
    inter, union = int((conf & det).sum()), int((conf | det).sum())
    rows.add(NO_LAYER, "span_configured_tokens", int(conf.sum()))
    rows.add(NO_LAYER, "span_detected_tokens", int(det.sum()))
    rows.add(NO_LAYER, "span_iou", inter / union if union else 1.0)
    rows.add(NO_LAYER, "span_precision", inter / int(conf.sum()) if conf.any() else 0.0)
    rows.add(NO_LAYER, "span_recall", inter / int(det.sum()) if det.any() else 0.0)
    return rows.rows


def run_records(lm: LoadedModel, run: RunCapture, *, sample, condition: str,
                base: RunCapture | None = None):
    """All records of one run (every phase and step) as a tidy frame."""
    image_mask = run.detected
    parts = [span_records(run, sample=sample, condition=condition)] if base is not None else []
    base_steps = {(s.phase, s.step): s for s in base.steps} if base is not None else {}
    for cap in run.steps:
        parts.append(step_records(lm, cap, image_mask, sample=sample, condition=condition,
                                  base=base_steps.get((cap.phase, cap.step))))
    return frame({k: [v for part in parts for v in part[k]] for k in parts[0]})

"""Rules over tidy records → ranked causes, each with its evidence and one plain sentence.

Every rule reads one sample at one (phase, step) from the records of
:mod:`mclcbf_diag.records` (``head == −1`` rows). Layer sets: *steered* = layers with barrier
rows in condition "steered"; *active* = steered layers with ``barrier_active`` (else h < τ);
*fired* = active layers that applied a nonzero step (``applied_norm > 0``; for the attention-
logit site, which has no step vector, a nonzero per-head ``logit_shift``). Medians are over
the layers named. A rule whose evidence is missing is reported as not detected, never raised.

Causal order (the ranking). A step's life runs: it exists → it targets the image → the
barrier asks for it → the gradient is computed → the scale is set → it survives rounding into
the model's state → it is large next to x → it does what the linearisation promised → the
residual carries it → the margin moves → the attention it changes is on the causal path.
A failure early in that chain hides everything after it (a step that never happened cannot be
damped), so detected causes are ranked by this order (ties, which only a future shared stage
could produce, by strength), followed by the undetected ones in the same order:

1. ``not_applied``: no steered layer fired. Detected only when no later rule explains it: if
   h ≥ τ everywhere ``barrier_inactive`` carries it, if Σg² underflowed ``gradient_underflow``.
2. ``span_mismatch``: IoU(configured span, detected image tokens) < :data:`SPAN_IOU_MIN`.
   Strength 1 − IoU.
3. ``barrier_inactive``: fraction of steered layers with h ≥ τ > :data:`INACTIVE_FRACTION`.
4. ``gradient_underflow``: at an active layer Σg² == 0 in the gradient dtype while ‖g‖₃₂ > 0,
   or |‖g‖ − ‖g‖₃₂|/‖g‖₃₂ > :data:`GRAD_REL_ERR_MAX`. Strength = fraction of active layers.
5. ``clamp_limited``: clamp_active at an active layer; r = scale/scale_unclamped. Strength
   = (fraction clamped)·(1 − median r).
6. ``rounding_absorbed``: median over fired layers of ‖round(x+αθ*) − x‖/‖αθ*‖ <
   :data:`ROUNDING_SURVIVAL_MIN`. Strength 1 − median survival.
7. ``step_negligible``: median ‖αθ*‖/‖x‖ < :data:`STEP_REL_MIN` (the step actually added), or
   median relative change of the normalised input ‖J αθ*‖/‖RMSNorm(x)‖ = ln1_gain_theta·applied_norm/ln1_out_norm <
   :data:`STEP_REL_MIN` (either suffices: the attention only sees the normalised input).
   Strength max over both of 1 − value/threshold.
8. ``linearisation_failed``: median |Δh_rec − Δh_pred|/|Δh_pred| > :data:`LINEAR_REL_ERR_MAX`.
   Strength min(1, median error).
9. ``damped_downstream``: propagation_rel at the last layer < :data:`DAMPING_RATIO_MIN` ×
   max θ_rel over fired layers, or the distance after the final norm <
   :data:`PROPAGATION_FINAL_MIN` (bit-identical final state). Strength 1 − ratio/threshold.
10. ``margin_unmoved``: m = final_margin; Δm = m_steered − m_base; a flip needs the progress
    −Δm·sign(m_base) to exceed |m_base|. Detected iff the answer did not flip, unless
    ``barrier_not_decisive`` (the same observation, explained) is detected. Strength
    1 − max(progress, 0)/|m_base|.
11. ``barrier_not_decisive``: the barrier reached its target (median over fired layers of
    h + Δh_realised − τ ≥ −:data:`TARGET_TOLERANCE`; where τ is not recorded, as at the
    attention-logit site, the target is h + Δh_predicted, the change the site asked for) yet
    |Δm| < :data:`DECISIVE_MARGIN_FRACTION`·|m_base|. Knockout conditions, when present, add
    evidence; when removing image attention at the decision token leaves the answer while
    removing it after the image flips it (or moves the margin :data:`KNOCKOUT_DOMINANCE`×
    more), the image reaches the answer through earlier tokens. Strength 1 − |Δm|/|m_base|.
12. ``decision_token_off_path``: from the knockouts alone, whether or not the barrier fired.
    Let Δ_dec = max |Δm| over removing and doubling image attention at the decision token (all
    layers, renormalised), Δ_aft the same at every text token after the image. Detected when
    neither decision-token edit flips the answer while an after-image edit flips it or
    Δ_aft ≥ :data:`KNOCKOUT_DOMINANCE`·Δ_dec: then no steering of the decision token's image
    attention can be expected to flip it. Strength 1 − Δ_dec/Δ_aft.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .errors import UserError
from .records import NO_HEAD, NO_LAYER

__all__ = ["Cause", "ORDER", "diagnose", "causes_frame", "verdict"]

SPAN_IOU_MIN = 0.99  # |C ∩ D|/|C ∪ D| of configured C and detected D image positions
INACTIVE_FRACTION = 0.5  # #{ℓ: h_ℓ ≥ τ}/#steered above this → "most" layers are inactive
GRAD_REL_ERR_MAX = 1e-2  # |‖g‖_dtype − ‖g‖_f32|/‖g‖_f32: 1% is far above fp16's 2⁻¹¹ rounding
ROUNDING_SURVIVAL_MIN = 0.5  # ‖round(x+αθ)−x‖/‖αθ‖ below this: most of the step was rounded away
STEP_REL_MIN = 0.01  # ‖θ‖/‖x‖ (and ‖Jθ‖/‖RMSNorm(x)‖) below 1%: a negligible nudge of the state
LINEAR_REL_ERR_MAX = 0.5  # |Δh_rec − Δh_pred|/|Δh_pred| above 50%: first order is meaningless
DAMPING_RATIO_MIN = 0.5  # prop_rel(last layer)/max θ_rel below this: the residual lost half of it
PROPAGATION_FINAL_MIN = 1e-6  # ‖norm(x_L^steer) − norm(x_L^base)‖ below this: final state identical
DECISIVE_MARGIN_FRACTION = 0.1  # |Δm| < 10% of |m_base| after reaching τ: attention is not causal
TARGET_TOLERANCE = 1e-3  # h + Δh_realised ≥ τ − this counts as "reached the target"
KNOCKOUT_DOMINANCE = 3.0  # |Δm_after_image| ≥ this × |Δm_decision|: the after-image path dominates

ORDER = ("not_applied", "span_mismatch", "barrier_inactive", "gradient_underflow", "clamp_limited",
         "rounding_absorbed", "step_negligible", "linearisation_failed", "damped_downstream",
         "margin_unmoved", "barrier_not_decisive", "decision_token_off_path")
_TITLES = dict(zip(ORDER, (
    "No step was applied", "Configured image span is not the image", "Barrier inactive (h ≥ τ)",
    "Gradient underflow in the gradient dtype", "Clamp limited the step", "Rounding absorbed the step",
    "Step negligible next to the residual", "First-order prediction failed",
    "Perturbation damped downstream", "Margin not moved enough to flip",
    "Barrier reached its target but is not decisive",
    "The decision token's image attention is not on the answer's path")))
_BARRIER_METRICS = ("barrier_active", "barrier_tau", "scale", "applied_norm", "theta_norm", "dh_predicted")


@dataclass(frozen=True)
class Cause:
    id: str
    title: str
    detected: bool
    strength: float  # 0..1, how strongly present
    evidence: dict[str, float | int | str]
    threshold: str  # the rule and its threshold, human-readable
    sentence: str  # one plain sentence with the measured numbers


def _f(x: float) -> str:
    return f"{x:.3g}" if math.isfinite(x) else "n/a"


def _pct(x: float) -> str:
    return f"{100 * x:.3g}%" if math.isfinite(x) else "n/a"


def _med(values) -> float:
    vals = [v for v in values if math.isfinite(v)]
    return float(np.median(vals)) if vals else math.nan


class _View:
    """Per-(condition, metric) {layer: value} maps of one sample/phase/step (head −1, finite)."""

    def __init__(self, df: pd.DataFrame):
        head = df[df["head"] == NO_HEAD]
        self._t = {k: {int(layer): float(v) for layer, v in zip(g["layer"], g["value"]) if math.isfinite(v)}
                   for k, g in head.groupby(["condition", "metric"])}
        shift = df[(df["metric"] == "logit_shift") & (df["condition"] == "steered") & (df["layer"] >= 0)]
        self.shift = {int(layer): bool((g["value"].abs() > 0).any()) for layer, g in shift.groupby("layer")}
        self.conditions = set(df["condition"])

    def layers(self, metric: str, cond: str = "steered") -> dict[int, float]:
        return {k: v for k, v in self._t.get((cond, metric), {}).items() if k >= 0}

    def scalar(self, metric: str, cond: str = "steered") -> float | None:
        return self._t.get((cond, metric), {}).get(NO_LAYER)


def _make(cid: str, detected: bool, strength: float, evidence: dict, threshold: str, sentence: str) -> Cause:
    ev = {k: int(x) if isinstance(x, (bool, np.bool_, int, np.integer)) else x if isinstance(x, str) else float(x)
          for k, x in evidence.items()}
    ev = {k: x for k, x in ev.items() if not isinstance(x, float) or math.isfinite(x)}  # JSON-safe
    s = float(np.clip(strength, 0.0, 1.0)) if detected and math.isfinite(strength) else 0.0
    return Cause(cid, _TITLES[cid], bool(detected), s, ev, threshold, sentence)


def _skip(cid: str, threshold: str, why: str) -> Cause:
    return _make(cid, False, 0.0, {"skipped": why}, threshold, f"Not assessed: {why}.")


def _select(records: pd.DataFrame, sample, phase: str, step: int) -> pd.DataFrame:
    if sample is None:
        samples = list(dict.fromkeys(records["sample"]))
        if len(samples) > 1:
            raise UserError(f"records hold {len(samples)} samples; pass sample= one of {samples[:5]}")
        sample = samples[0] if samples else None
    df = records[(records["sample"] == sample) & (records["phase"] == phase) & (records["step"] == step)]
    if df.empty:
        raise UserError(f"no records for sample {sample!r}, phase {phase!r}, step {step}")
    return df


def diagnose(records: pd.DataFrame, sample=None, phase: str = "prefill", step: int = 0) -> list[Cause]:
    """All causes for one sample at (phase, step), ranked (see the module docstring)."""
    v = _View(_select(records, sample, phase, step))
    c: dict[str, Cause] = {}
    h, tau, act = v.layers("barrier_h"), v.layers("barrier_tau"), v.layers("barrier_active")
    applied = v.layers("applied_norm")
    steered = sorted(set().union(*(v.layers(m) for m in _BARRIER_METRICS), h, v.shift))
    active = [ly for ly in steered if (act[ly] > 0.5 if ly in act else
              (h[ly] < tau[ly] if ly in h and ly in tau else applied.get(ly, 0) > 0))]
    fired = [ly for ly in active if (applied[ly] > 0 if ly in applied else v.shift.get(ly, not v.shift))]
    tau_m = _med(tau.values())

    # 2. span
    t = f"span_iou < {SPAN_IOU_MIN}"
    cd = next((cd for cd in ("steered", *sorted(v.conditions)) if v.scalar("span_iou", cd) is not None), None)
    if cd is None:
        c["span_mismatch"] = _skip("span_mismatch", t, "no span_iou record")
    else:
        iou = v.scalar("span_iou", cd)
        ev = {k: v.scalar(f"span_{k}", cd) for k in ("iou", "precision", "recall", "configured_tokens",
                                                      "detected_tokens")}
        ev = {k: x for k, x in ev.items() if x is not None}
        s = f"The configured image span overlaps the detected image tokens with IoU {_f(iou)}"
        if {"precision", "recall", "configured_tokens", "detected_tokens"} <= ev.keys():
            s += (f": {_pct(ev['precision'])} of its {ev['configured_tokens']:.0f} positions are image tokens"
                  f" and it holds {_pct(ev['recall'])} of the {ev['detected_tokens']:.0f} image tokens")
        c["span_mismatch"] = _make("span_mismatch", iou < SPAN_IOU_MIN, 1 - iou, ev, t, s + ".")

    # 3. inactive
    t = f"fraction of steered layers with h ≥ τ > {INACTIVE_FRACTION}"
    if not steered:
        c["barrier_inactive"] = _skip("barrier_inactive", t, "no barrier records for condition 'steered'")
    else:
        frac = (len(steered) - len(active)) / len(steered)
        ev = {"fraction_inactive": frac, "n_inactive": len(steered) - len(active), "n_steered": len(steered),
              "median_h": _med(h[ly] for ly in steered if ly in h), "tau": tau_m}
        s = (f"h was already at or above τ = {_f(tau_m)} at {ev['n_inactive']} of {len(steered)} steered layers"
             f" (median h {_f(ev['median_h'])}), so the barrier did not fire there." if ev["n_inactive"] else
             f"h was below τ = {_f(tau_m)} at all {len(steered)} steered layers (median h {_f(ev['median_h'])}).")
        c["barrier_inactive"] = _make("barrier_inactive", frac > INACTIVE_FRACTION, frac, ev, t, s)

    # 4. gradient underflow
    t = ("Σg² == 0 in the gradient dtype, or "
         f"|‖g‖ − ‖g‖_f32|/‖g‖_f32 > {GRAD_REL_ERR_MAX}, at an active layer")
    sq, gn, g32 = v.layers("grad_norm_sq_dtype"), v.layers("grad_norm"), v.layers("grad_norm_f32")
    layers = [ly for ly in active if ly in sq or (ly in gn and ly in g32)]
    if not layers:
        c["gradient_underflow"] = _skip("gradient_underflow", t, "no gradient metrics at active layers")
    else:
        zero = [ly for ly in layers if sq.get(ly, 1.0) == 0 and g32.get(ly, 1.0) > 0]
        err = {ly: abs(gn[ly] - g32[ly]) / g32[ly] for ly in layers if ly in gn and g32.get(ly, 0) > 0}
        bad = sorted(set(zero) | {ly for ly, e in err.items() if e > GRAD_REL_ERR_MAX})
        ev = {"n_underflow": len(bad), "n_active": len(layers), "n_sq_zero": len(zero),
              "max_rel_err": max(err.values(), default=math.nan), "median_grad_norm_f32": _med(g32.values())}
        s = (f"In the gradient dtype Σg² was 0 at {len(zero)} and ‖g‖ was off by more than"
             f" {_pct(GRAD_REL_ERR_MAX)} at {len(bad)} of {len(layers)} active layers (max relative error"
             f" {_pct(ev['max_rel_err'])}, median float32 ‖g‖ {_f(ev['median_grad_norm_f32'])}).")
        c["gradient_underflow"] = _make("gradient_underflow", bool(bad), len(bad) / len(layers), ev, t, s)

    # 1. not applied (needs 3 and 4 to know whether it is explained)
    t = "no steered layer applied a nonzero step, and neither barrier_inactive nor gradient_underflow explains it"
    explained = next((k for k in ("barrier_inactive", "gradient_underflow") if c[k].detected), "")
    if not steered:
        reason = "there are no barrier records for condition 'steered' at this phase and step"
    elif not active:
        reason = f"h ≥ τ at all {len(steered)} steered layers"
    else:
        reason = f"the barrier was active at {len(active)} layers but every step was exactly zero"
    ev = {"n_steered": len(steered), "n_active": len(active), "n_fired": len(fired), "explained_by": explained}
    s = (f"Steps were applied at {len(fired)} of {len(steered)} steered layers." if fired else
         f"No step was applied because {reason}" + (f" (see {explained})." if explained else "."))
    c["not_applied"] = _make("not_applied", not fired and not explained, 1.0, ev, t, s)

    # 5. clamp
    t = "clamp_active at an active layer; strength = fraction clamped × (1 − median scale/scale_unclamped)"
    ca, sc, su = v.layers("clamp_active"), v.layers("scale"), v.layers("scale_unclamped")
    layers = [ly for ly in active if ly in ca]
    if not layers:
        c["clamp_limited"] = _skip("clamp_limited", t, "no clamp_active records at active layers")
    else:
        cl = [ly for ly in layers if ca[ly] > 0.5]
        ratio = _med(sc[ly] / su[ly] for ly in cl if ly in sc and su.get(ly, 0) > 0)
        ev = {"n_clamped": len(cl), "n_active": len(layers), "median_ratio": ratio,
              "median_scale": _med(sc.get(ly, math.nan) for ly in cl),
              "median_scale_unclamped": _med(su.get(ly, math.nan) for ly in cl)}
        s = (f"The clamp cut the step to {_pct(ratio)} of what the barrier asked for (scale"
             f" {_f(ev['median_scale'])} vs {_f(ev['median_scale_unclamped'])}) at {len(cl)} of {len(layers)}"
             " active layers." if cl else f"The clamp did not bind at any of {len(layers)} active layers.")
        strength = len(cl) / len(layers) * (1 - (ratio if math.isfinite(ratio) else 0.0))
        c["clamp_limited"] = _make("clamp_limited", bool(cl), strength, ev, t, s)

    def per_fired(metric: str) -> dict[int, float]:
        vals = v.layers(metric)
        return {ly: vals[ly] for ly in fired if ly in vals}

    # 6. rounding
    t = f"median rounding_survival over fired layers < {ROUNDING_SURVIVAL_MIN}"
    surv = per_fired("rounding_survival")
    if not surv:
        c["rounding_absorbed"] = _skip("rounding_absorbed", t, "no rounding_survival at fired layers")
    else:
        m = _med(surv.values())
        low = sum(x < ROUNDING_SURVIVAL_MIN for x in surv.values())
        ev = {"median_survival": m, "n_low": low, "n_fired": len(surv)}
        s = (f"Rounding x + αθ* to the model dtype kept a median {_pct(m)} of the step"
             f" ({low} of {len(surv)} fired layers below {_pct(ROUNDING_SURVIVAL_MIN)}).")
        c["rounding_absorbed"] = _make("rounding_absorbed", m < ROUNDING_SURVIVAL_MIN, 1 - m, ev, t, s)

    # 7. negligible: the step actually added, α·θ*, against ‖x‖ and through ln1
    t = (f"median ‖αθ*‖/‖x‖ < {STEP_REL_MIN}, or median ln1_gain_theta·‖αθ*‖/ln1_out_norm <"
         f" {STEP_REL_MIN}, over fired layers")
    theta_rel, tn, an = per_fired("theta_rel"), per_fired("theta_norm"), per_fired("applied_norm")
    alpha = {ly: an[ly] / tn[ly] if ly in an and tn.get(ly, 0) > 0 else 1.0 for ly in theta_rel}
    rel = _med(theta_rel[ly] * alpha[ly] for ly in theta_rel)
    gain, out = per_fired("ln1_gain_theta"), per_fired("ln1_out_norm")
    norm_rel = _med(gain[ly] * an.get(ly, tn.get(ly, math.nan)) / out[ly] for ly in gain
                    if (ly in an or ly in tn) and out.get(ly, 0) > 0)
    if not (math.isfinite(rel) or math.isfinite(norm_rel)):
        c["step_negligible"] = _skip("step_negligible", t, "no theta_rel or ln1 gain records at fired layers")
    else:
        small = [x for x in (rel, norm_rel) if math.isfinite(x)]
        ev = {"median_step_rel": rel, "median_normalised_rel": norm_rel, "n_fired": len(fired)}
        s = (f"The step was {_pct(rel)} of ‖x‖ and changed the normalised"
             f" input by {_pct(norm_rel)} (medians over {len(fired)}"
             " fired layers).")
        c["step_negligible"] = _make("step_negligible", min(small) < STEP_REL_MIN,
                                     max(1 - x / STEP_REL_MIN for x in small), ev, t, s)

    # 8. linearisation
    t = f"median |dh_recomputed − dh_predicted|/|dh_predicted| > {LINEAR_REL_ERR_MAX} over fired layers"
    pred, rec = per_fired("dh_predicted"), per_fired("dh_recomputed")
    err = {ly: abs(rec[ly] - pred[ly]) / abs(pred[ly]) for ly in pred if ly in rec and pred[ly] != 0}
    if not err:
        c["linearisation_failed"] = _skip("linearisation_failed", t, "no dh_predicted/dh_recomputed pairs")
    else:
        e = _med(err.values())
        ev = {"median_rel_err": e, "n_off": sum(x > LINEAR_REL_ERR_MAX for x in err.values()),
              "n_fired": len(err), "median_predicted": _med(pred.values()), "median_recomputed": _med(rec.values())}
        s = (f"Δh predicted to first order {_f(ev['median_predicted'])}, recomputed {_f(ev['median_recomputed'])}"
             f" (median error {_pct(e)}; off by > {_pct(LINEAR_REL_ERR_MAX)} at {ev['n_off']} of {len(err)} layers).")
        c["linearisation_failed"] = _make("linearisation_failed", e > LINEAR_REL_ERR_MAX, min(1.0, e), ev, t, s)

    # 9. damping
    t = (f"propagation_rel(last layer) < {DAMPING_RATIO_MIN} × max theta_rel over fired layers, or"
         f" propagation after the final norm < {PROPAGATION_FINAL_MIN}")
    prop, trel, final = v.layers("propagation_rel"), per_fired("theta_rel"), v.scalar("propagation")
    if not fired or (not (prop and trel) and final is None):
        c["damped_downstream"] = _skip("damped_downstream", t, "no fired layer or no propagation records")
    else:
        ev = {"first_layer": fired[0], "max_theta_rel": max(trel.values(), default=math.nan),
              "propagation_final": final if final is not None else math.nan}
        ratio = math.nan
        if prop and trel:
            last = max(prop)
            ratio = prop[last] / ev["max_theta_rel"] if ev["max_theta_rel"] > 0 else math.nan
            ev.update(last_layer=last, propagation_rel_first=prop.get(fired[0], math.nan),
                      propagation_rel_last=prop[last], ratio=ratio)
        dead = final is not None and final < PROPAGATION_FINAL_MIN
        damped = math.isfinite(ratio) and ratio < DAMPING_RATIO_MIN
        s = (f"The residual change went from θ*/‖x‖ = {_pct(ev['max_theta_rel'])} (max over fired layers) to"
             f" {_pct(ev['propagation_rel_last'])} of ‖x‖ at layer {ev['last_layer']}; " if "ratio" in ev else "")
        s += (f"after the final norm the steered state is {_f(ev['propagation_final'])} from the baseline"
              + (" (unchanged)." if dead else "."))
        s = s[0].upper() + s[1:]
        strength = 1.0 if dead else 1 - ratio / DAMPING_RATIO_MIN
        c["damped_downstream"] = _make("damped_downstream", dead or damped, strength, ev, t, s)

    # 10/11. margin
    mb, ms = v.scalar("final_margin", "baseline"), v.scalar("final_margin", "steered")
    t10 = "answer not flipped: progress −Δm·sign(m_base) < |m_base|"
    t11 = (f"median (h + dh_realised − τ) ≥ −{TARGET_TOLERANCE} over fired layers (τ ← h + dh_predicted where"
           f" τ is not recorded) and |Δm| <"
           f" {DECISIVE_MARGIN_FRACTION}·|m_base|")
    if mb is None or ms is None:
        c["margin_unmoved"] = _skip("margin_unmoved", t10, "no final_margin for baseline and steered")
        c["barrier_not_decisive"] = _skip("barrier_not_decisive", t11, "no final_margin for baseline and steered")
    else:
        yb, ys = v.scalar("answer_yes", "baseline"), v.scalar("answer_yes", "steered")
        flipped = (yb != ys) if yb is not None and ys is not None else (mb > 0) != (ms > 0)
        dm = ms - mb
        progress = -dm * math.copysign(1.0, mb)
        frac = abs(dm) / abs(mb) if mb != 0 else math.inf
        ev = {"m_base": mb, "m_steered": ms, "delta_m": dm, "answer_flipped": int(flipped)}
        # 11 first: margin_unmoved yields to it
        realised, pred = per_fired("dh_realised"), per_fired("dh_predicted")
        # target τ; where τ is not recorded (attention-logit site), the change the site asked for
        target = {ly: tau[ly] if ly in tau else h[ly] + pred[ly]
                  for ly in realised if ly in h and (ly in tau or ly in pred)}
        gap = [h[ly] + realised[ly] - target[ly] for ly in target]
        after = [h[ly] + realised[ly] for ly in target]
        reached = bool(gap) and _med(gap) >= -TARGET_TOLERANCE
        ev11 = {**ev, "median_h_after": _med(after), "median_target": _med(target.values()), "n_fired": len(fired),
                "n_reached": sum(x >= -TARGET_TOLERANCE for x in gap)}
        s11 = (f"The barrier {'reached' if reached else 'did not reach'} its target (median h after the step"
               f" {_f(ev11['median_h_after'])} vs {_f(ev11['median_target'])}, {ev11['n_reached']} of {len(gap)} fired"
               " layers),"
               f" {'yet' if reached else 'and'} the margin moved by {_f(dm)} of {_f(abs(mb))} ({_pct(frac)})")
        ko = {}
        for cond in ("knockout:decision", "knockout:after_image", "double:decision", "double:after_image"):
            km, ky = v.scalar("final_margin", cond), v.scalar("answer_yes", cond)
            if km is not None:
                key = cond.replace(":", "_")
                ko[key] = km
                ev11[f"{key}_margin"], ev11[f"{key}_delta_m"] = km, km - mb
                ev11[f"{key}_flipped"] = int((ky != yb) if ky is not None and yb is not None else (km > 0) != (mb > 0))
        if "knockout_decision" in ko and "knockout_after_image" in ko:
            d_dec, d_aft = abs(ko["knockout_decision"] - mb), abs(ko["knockout_after_image"] - mb)
            s11 += (f"; knocking out image attention at the decision token moves the margin by {_f(d_dec)},"
                    f" at every token after the image by {_f(d_aft)}")
            if not ev11["knockout_decision_flipped"] and (ev11["knockout_after_image_flipped"]
                                                           or d_aft >= KNOCKOUT_DOMINANCE * d_dec):
                s11 += (": image information reaches the answer through earlier tokens; steering the decision"
                        " token's attention cannot flip it")
        nd = reached and not flipped and frac < DECISIVE_MARGIN_FRACTION
        c["barrier_not_decisive"] = _make("barrier_not_decisive", nd, 1 - frac, ev11, t11, s11 + ".") \
            if gap else _skip("barrier_not_decisive", t11, "no barrier_h/dh_realised/target at fired layers")
        s10 = (f"The answer {'flipped' if flipped else 'did not flip'}: the margin went from {_f(mb)} to {_f(ms)}"
               f" (Δm {dm:+.3g}, {'toward' if progress > 0 else 'away from'} the boundary;"
               f" a flip needs {_f(abs(mb))}).")
        strength = 1 - max(progress, 0.0) / abs(mb) if mb != 0 else 1.0
        c["margin_unmoved"] = _make("margin_unmoved", not flipped and not nd, strength, ev, t10, s10)
    c["decision_token_off_path"] = _off_path(v)
    return sorted((c[k] for k in ORDER), key=lambda x: (not x.detected, ORDER.index(x.id), -x.strength))


def _off_path(v: "_View") -> Cause:
    """12. Knockouts alone: edits at the decision token leave the answer, edits after the image move it."""
    t = ("knockout:decision and double:decision keep the answer while an after-image edit flips it or moves "
         f"the margin ≥ {KNOCKOUT_DOMINANCE}× more")
    mb = v.scalar("final_margin", "baseline")
    edits = {cond: v.scalar("final_margin", cond) for cond in
             ("knockout:decision", "double:decision", "knockout:after_image", "double:after_image")}
    if mb is None or any(m is None for m in edits.values()):
        return _skip("decision_token_off_path", t, "no knockout conditions in the records")
    flips = {cond: (m > 0) != (mb > 0) for cond, m in edits.items()}
    moved = {cond: abs(m - mb) for cond, m in edits.items()}
    dec = max(moved["knockout:decision"], moved["double:decision"])
    aft = max(moved["knockout:after_image"], moved["double:after_image"])
    detected = (not flips["knockout:decision"] and not flips["double:decision"]
                and (flips["knockout:after_image"] or flips["double:after_image"] or aft >= KNOCKOUT_DOMINANCE * dec))
    ev = {"m_base": mb, **{f"{cond.replace(':', '_')}_margin": m for cond, m in edits.items()},
          "max_delta_decision": dec, "max_delta_after_image": aft}
    s = (f"Removing or doubling image attention at the decision token in every layer moves the margin by at most "
         f"{_f(dec)} ({'and flips' if flips['knockout:decision'] or flips['double:decision'] else 'without flipping'}"
         f" the answer); doing it at every text token after the image moves it by up to {_f(aft)}"
         f"{' and flips it' if flips['knockout:after_image'] or flips['double:after_image'] else ''}")
    if detected:
        s += (": the image reaches this answer through earlier tokens, so steering the decision token's attention"
              " cannot flip it")
    strength = 1 - dec / aft if aft > 0 else 0.0
    return _make("decision_token_off_path", detected, max(0.0, strength), ev, t, s + ".")


def causes_frame(causes: list[Cause]) -> pd.DataFrame:
    """One row per cause in the given (ranked) order; evidence as a JSON string."""
    return pd.DataFrame([{"rank": i + 1, "id": x.id, "detected": x.detected, "strength": x.strength,
                          "sentence": x.sentence, "threshold": x.threshold,
                          "evidence": json.dumps(x.evidence, sort_keys=True, ensure_ascii=False)}
                         for i, x in enumerate(causes)],
                        columns=["rank", "id", "detected", "strength", "sentence", "threshold", "evidence"])


def verdict(causes: list[Cause]) -> str:
    """A few lines: the top detected cause's sentence, the others briefly, whether the answer flipped."""
    found = [x for x in causes if x.detected]
    ev = next((x.evidence for x in causes if "answer_flipped" in x.evidence), {})
    if ev:
        flip = (f"answer_flipped: {'yes' if ev['answer_flipped'] else 'no'} (margin {_f(ev['m_base'])} →"
                f" {_f(ev['m_steered'])})")
    else:
        flip = "answer_flipped: unknown (no final_margin records)"
    if not found:
        return f"No cause detected: every rule's evidence is in its healthy range.\n{flip}"
    lines = [found[0].sentence]
    lines += [f"Also: {x.title} ({x.id}, strength {x.strength:.2f})" for x in found[1:]]
    return "\n".join([*lines, flip])

"""MC-LCBF's diagnosis rules: the causes that stop a barrier step from existing or mattering.

Each rule reads the records :mod:`mclcbf_diag.interventions.mclcbf` writes (see its
``METRICS``) through :class:`~mclcbf_diag.diagnosis.rulebook.Evidence`. Ranks place them in the causal
order of :mod:`mclcbf_diag.diagnosis.rulebook` between the generic rules of :mod:`mclcbf_diag.diagnosis.diagnose`
(1 not_applied, 6 rounding_absorbed, 10 margin_unmoved, 12 decision_token_off_path).
Layer sets: *steered* = layers with barrier rows in condition "steered"; *active* = steered
layers with ``barrier_active`` (else h < τ); *fired* = active layers that applied a nonzero
step (``applied_norm > 0``; at the attention-logit site, which has no step vector, a nonzero
per-head ``logit_shift``).

Every rule names its counterfactual, which *undoes* its cause (restores what the cause took
away, everything else kept), and the rulebook runs it to call the cause decisive or not:
``decode_only`` → steer the prefill as the decode; ``span_mismatch`` → span=detected;
``lookahead_miss`` (the look-ahead's h is not the mass the layer computed) → untestable here: the family's
adapter, not a knob, makes the look-ahead exact;
``barrier_inactive`` → τ just above every h, then larger τ (:data:`TAU_SEARCH`);
``gradient_underflow`` → grad_dtype=float32;
``guard_dominates`` (guard/(Σg² + guard) > :data:`GUARD_SHARE_MAX`: the guard, not the gradient,
sets the scale) → a guard 0.1% of the smallest float32 Σg²; ``clamp_limited`` → clamp=none
(the unclamped scale); ``step_negligible`` → a search over the step's size (the same step at
10% … 1000% of ‖x‖, :data:`STEP_SEARCH`), since no one size can stand for "the step it should
have been"; ``linearisation_failed`` → site=attn_logits (the target mass exactly). Damping
(``damped_downstream``) is the absolute deviation at the last layer per unit of applied step
(``added_norm``), with the growth of ‖x‖ shown apart, and is never claimed for a step that was
negligible or rounded away; it and ``barrier_not_decisive`` have nothing a knob restores, so
they are "untestable here" with the reason (an intervention's ``counterfactual(cause)`` hook may
give a test).

Noise floors (:mod:`mclcbf_diag.measurements.noise`): ‖g‖'s error is judged against at least the gradient
dtype's rounding (``grad_norm_floor``); a Δh predicted below its floor is left out of the
linearisation check, and the mismatch is counted beyond the floor; a ``dh_realised`` below its
floor counts as 0, and reaching τ is judged within it; damping needs the deviation plus its
floor to be small; a look-ahead miss whose floor is missing or NaN cannot be judged and is not counted (the run's
summary agrees: :func:`.report.misses_beyond_floor`). So no cause fires from a figure below its floor.
"""

from __future__ import annotations

import math

from ...diagnosis.counterfactual import Counterfactual
from ...diagnosis.rulebook import Evidence, Rule, fmt, median, pct
from ...measurements.noise import below, resolved
from .report import misses_beyond_floor, unjudged_layers

SPAN_IOU_MIN = 0.99  # |C ∩ D|/|C ∪ D| of configured C and detected D image positions
INACTIVE_FRACTION = 0.5  # #{ℓ: h_ℓ ≥ τ}/#steered above this → "most" layers are inactive
GRAD_REL_ERR_MAX = 1e-2  # |‖g‖_dtype − ‖g‖_f32|/‖g‖_f32: 1% is far above fp16's 2⁻¹¹ rounding
STEP_REL_MIN = 0.01  # ‖θ‖/‖x‖ (and ‖Jθ‖/‖RMSNorm(x)‖) below 1%: a negligible nudge of the state
LINEAR_REL_ERR_MAX = 0.5  # |Δh_rec − Δh_pred|/|Δh_pred| above 50%: first order is meaningless
DAMPING_RATIO_MIN = 0.5  # ‖Δx_L‖/Σ‖v‖ below this: the residual carried less than half of the applied step
PROPAGATION_FINAL_MIN = 1e-6  # ‖norm(x_L^steer) − norm(x_L^base)‖ below this: final state identical
DECISIVE_MARGIN_FRACTION = 0.1  # |Δm| < 10% of |m_base| after reaching τ: attention is not causal
TARGET_TOLERANCE = 1e-3  # h + Δh_realised ≥ τ − this counts as "reached the target"
GUARD_SHARE_MAX = 0.5  # guard/(Σg² + guard) above this: the guard, not the gradient, sets the scale

_BARRIER_METRICS = ("barrier_active", "barrier_tau", "scale", "applied_norm", "theta_norm", "dh_predicted")


def layer_sets(ev: Evidence) -> tuple[list[int], list[int], list[int]]:
    h, tau, act = ev.layers("barrier_h"), ev.layers("barrier_tau"), ev.layers("barrier_active")
    applied, lost = ev.layers("applied_norm"), ev.layers("step_nonfinite")
    steered = sorted(set().union(*(ev.layers(m) for m in _BARRIER_METRICS), h, ev.shift))
    active = [ly for ly in steered if (act[ly] > 0.5 if ly in act else
              (h[ly] < tau[ly] if ly in h and ly in tau else applied.get(ly, 0) > 0))]
    # a step that overflowed was recorded, not applied: it changed nothing there
    fired = [ly for ly in active if (applied[ly] > 0 if ly in applied else ev.shift.get(ly, not ev.shift))
             and not lost.get(ly, 0) > 0]
    return steered, active, fired


def _tau(ev: Evidence) -> float:
    return median(ev.layers("barrier_tau").values())


def span_mismatch(ev: Evidence, rule: Rule):
    cd = next((cd for cd in ("steered", *sorted(ev.conditions)) if ev.scalar("span_iou", cd) is not None), None)
    if cd is None:
        return ev.skip(rule, "no span_iou record")
    iou = ev.scalar("span_iou", cd)
    e = {k: ev.scalar(f"span_{k}", cd) for k in ("iou", "precision", "recall", "configured_tokens", "detected_tokens")}
    e = {k: x for k, x in e.items() if x is not None}
    s = f"The configured image span overlaps the detected image tokens with IoU {fmt(iou)}"
    if {"precision", "recall", "configured_tokens", "detected_tokens"} <= e.keys():
        s += (f": {pct(e['precision'])} of its {e['configured_tokens']:.0f} positions are image tokens"
              f" and it holds {pct(e['recall'])} of the {e['detected_tokens']:.0f} image tokens")
    if ev.scalar("span_flagged", cd):
        e["flagged"] = 1.0
        s += ("; beyond the seed's known 4-token offset (it covers the decision token or more text, or misses more "
              "of the image), so h is not the image's mass")
    return ev.make(rule, iou < SPAN_IOU_MIN, 1 - iou, e, s + ".")


def lookahead_miss(ev: Evidence, rule: Rule):
    """The look-ahead's h differs from the image mass the layer itself computed, beyond the noise floor, at some
    layer: the barrier then acts on a figure the model does not compute (a text model, mask or norm the family's
    adapter does not reproduce). Strength: the largest miss's share of 1 (a mass's whole range)."""
    cond = next((c for c in ("steered", "baseline") if ev.layers("lookahead_miss", c)), None)
    if cond is None:
        return ev.skip(rule, "no lookahead_miss records")
    miss, floor = ev.layers("lookahead_miss", cond), ev.layers("lookahead_miss_floor", cond)
    unjudged = unjudged_layers(miss, floor)
    judged = {ly: m for ly, m in miss.items() if ly not in unjudged}
    if not judged:
        return ev.skip(rule, f"the look-ahead miss cannot be judged at any layer: its noise floor (or the miss) is "
                             f"missing or NaN at all {len(miss)} layers")
    over = misses_beyond_floor(miss, floor)
    worst = max(over or judged, key=lambda ly: abs(judged[ly]))
    e = {"n_missed": len(over), "n_layers": len(judged), "n_unjudged": len(unjudged), "largest_miss": miss[worst],
         "largest_miss_layer": worst, "largest_miss_floor": floor[worst]}
    s = (f"The look-ahead's h differs from the image mass layer {worst} computed by {fmt(miss[worst])} (noise floor "
         f"{fmt(e['largest_miss_floor'])})" + (f", beyond the floor at {len(over)} of {len(judged)} layers, so the "
                                               "barrier acted on a mass the model does not compute" if over else ""))
    if unjudged:
        s += f"; {len(unjudged)} more layer(s) cannot be judged, their noise floor (or the miss) missing or NaN"
    return ev.make(rule, bool(over), abs(miss[worst]), e, s + ".")


def barrier_inactive(ev: Evidence, rule: Rule):
    """h ≥ τ at most steered layers. A layer whose h is at or above τ only because an earlier step lifted it
    (the baseline's h there is below τ) is the barrier's success, not its inactivity: it is not counted."""
    steered, active, h, tau_m = ev.steered, ev.active, ev.layers("barrier_h"), _tau(ev)
    if not steered:
        return ev.skip(rule, "no barrier records for condition 'steered'")
    h_base, tau = ev.layers("barrier_h", "baseline"), ev.layers("barrier_tau")
    lifted = [ly for ly in steered if ly not in active and ly in h_base and ly in tau and h_base[ly] < tau[ly]]
    inactive = len(steered) - len(active) - len(lifted)
    frac = inactive / len(steered)
    e = {"fraction_inactive": frac, "n_inactive": inactive, "n_steered": len(steered), "n_lifted": len(lifted),
         "median_h": median(h[ly] for ly in steered if ly in h), "tau": tau_m}
    s = (f"h was already at or above τ = {fmt(tau_m)} at {e['n_inactive']} of {len(steered)} steered layers"
         f" (median h {fmt(e['median_h'])}), so the barrier did not fire there" if e["n_inactive"] else
         f"h was below τ = {fmt(tau_m)} at all {len(steered) - len(lifted)} steered layers"
         + (" where the model left it" if lifted else "") + f" (median h {fmt(e['median_h'])})")
    if lifted:
        s += f"; at {len(lifted)} more an earlier step had already lifted h to τ (the barrier working, not idle)"
    return ev.make(rule, frac > INACTIVE_FRACTION, frac, e, s + ".")


def gradient_underflow(ev: Evidence, rule: Rule):
    sq, gn, g32 = ev.layers("grad_norm_sq_dtype"), ev.layers("grad_norm"), ev.layers("grad_norm_f32")
    layers = [ly for ly in ev.active if ly in sq or (ly in gn and ly in g32)]
    if not layers:
        return ev.skip(rule, "no gradient metrics at active layers")
    zero = [ly for ly in layers if sq.get(ly, 1.0) == 0 and g32.get(ly, 1.0) > 0]
    err = {ly: abs(gn[ly] - g32[ly]) / g32[ly] for ly in layers if ly in gn and g32.get(ly, 0) > 0}
    # the gradient dtype's own rounding of ‖g‖ is noise, not underflow: the bar is never below it
    bar = {ly: max(GRAD_REL_ERR_MAX, ev.floor("grad_norm", ly) / g32[ly]) for ly in err}
    bad = sorted(set(zero) | {ly for ly, x in err.items() if x > bar[ly]})
    e = {"n_underflow": len(bad), "n_active": len(layers), "n_sq_zero": len(zero),
         "max_rel_err": max(err.values(), default=math.nan), "median_grad_norm_f32": median(g32.values()),
         "rel_err_bar": max(bar.values(), default=GRAD_REL_ERR_MAX)}
    s = (f"In the gradient dtype Σg² was 0 at {len(zero)} and ‖g‖ was off by more than"
         f" {pct(e['rel_err_bar'])} at {len(bad)} of {len(layers)} active layers (max relative error"
         f" {pct(e['max_rel_err'])}, median float32 ‖g‖ {fmt(e['median_grad_norm_f32'])}).")
    return ev.make(rule, bool(bad), len(bad) / len(layers), e, s)


def clamp_limited(ev: Evidence, rule: Rule):
    ca, sc, su = ev.layers("clamp_active"), ev.layers("scale"), ev.layers("scale_unclamped")
    layers = [ly for ly in ev.active if ly in ca]
    if not layers:
        return ev.skip(rule, "no clamp_active records at active layers")
    cl = [ly for ly in layers if ca[ly] > 0.5]
    ratio = median(sc[ly] / su[ly] for ly in cl if ly in sc and su.get(ly, 0) > 0)
    e = {"n_clamped": len(cl), "n_active": len(layers), "median_ratio": ratio,
         "median_scale": median(sc.get(ly, math.nan) for ly in cl),
         "median_scale_unclamped": median(su.get(ly, math.nan) for ly in cl)}
    s = (f"The clamp cut the step to {pct(ratio)} of what the barrier asked for (scale"
         f" {fmt(e['median_scale'])} vs {fmt(e['median_scale_unclamped'])}) at {len(cl)} of {len(layers)}"
         " active layers." if cl else f"The clamp did not bind at any of {len(layers)} active layers.")
    strength = len(cl) / len(layers) * (1 - (ratio if math.isfinite(ratio) else 0.0))
    return ev.make(rule, bool(cl), strength, e, s)


def guard_dominates(ev: Evidence, rule: Rule):
    """Σg² far below the guard: the scale is (τ − h)/guard, set by the guard, not by the gradient."""
    share, g, sq = ev.layers("guard_share"), ev.layers("guard"), ev.layers("grad_norm_sq_dtype")
    layers = [ly for ly in ev.active if ly in share]
    if not layers:
        return ev.skip(rule, "no guard_share records at active layers")
    dom = [ly for ly in layers if share[ly] > GUARD_SHARE_MAX]
    m = median(share[ly] for ly in layers)
    e = {"n_dominated": len(dom), "n_active": len(layers), "median_guard_share": m,
         "guard": median(g.values()), "median_grad_norm_sq": median(sq.get(ly, math.nan) for ly in layers)}
    s = (f"The guard {fmt(e['guard'])} is {pct(m)} of the scale's divisor Σg² + guard (median Σg² "
         f"{fmt(e['median_grad_norm_sq'])}); at {len(dom)} of {len(layers)} active layers it exceeds "
         f"{pct(GUARD_SHARE_MAX)}, so the guard, not the gradient, sets the scale there.")
    return ev.make(rule, bool(dom), m, e, s)


def decode_only(ev: Evidence, rule: Rule):
    """Only generated tokens are steered: the first answer token is decided in the prefill."""
    pre, dec = ev.scalar("prefill_enabled"), ev.scalar("decode_enabled")
    if pre is None or dec is None:
        return ev.skip(rule, "no prefill_enabled/decode_enabled records")
    detected = pre < 0.5 and dec > 0.5
    s = ("The intervention steers only generated tokens (τ_prefill or α_prefill is 0): the Yes/No answer is the first "
         "token, decided in the prefill, which is not steered." if detected else
         "The prefill (where the answer is decided) is steered." if pre > 0.5 else "Neither phase is steered.")
    return ev.make(rule, detected, 1.0, {"prefill_enabled": pre, "decode_enabled": dec}, s)


def step_negligible(ev: Evidence, rule: Rule):
    """The step actually added, α·θ*, against ‖x‖ and through ln1."""
    theta_rel, tn, an = ev.per_fired("theta_rel"), ev.per_fired("theta_norm"), ev.per_fired("applied_norm")
    alpha = {ly: an[ly] / tn[ly] if ly in an and tn.get(ly, 0) > 0 else 1.0 for ly in theta_rel}
    rel = median(theta_rel[ly] * alpha[ly] for ly in theta_rel)
    gain, out = ev.per_fired("ln1_gain_theta"), ev.per_fired("ln1_out_norm")
    norm_rel = median(gain[ly] * an.get(ly, tn.get(ly, math.nan)) / out[ly] for ly in gain
                      if (ly in an or ly in tn) and out.get(ly, 0) > 0)
    if not (math.isfinite(rel) or math.isfinite(norm_rel)):
        return ev.skip(rule, "no theta_rel or ln1 gain records at fired layers")
    small = [x for x in (rel, norm_rel) if math.isfinite(x)]
    e = {"median_step_rel": rel, "median_normalised_rel": norm_rel, "n_fired": len(ev.fired)}
    s = (f"The step was {pct(rel)} of ‖x‖ and changed the normalised input by {pct(norm_rel)} (medians over"
         f" {len(ev.fired)} fired layers).")
    return ev.make(rule, min(small) < STEP_REL_MIN, max(1 - x / STEP_REL_MIN for x in small), e, s)


def linearisation_failed(ev: Evidence, rule: Rule):
    """First order vs recomputed Δh, at fired layers where the prediction is above its noise floor.

    The error is ``max(0, |Δh_rec − Δh_pred| − floor)/|Δh_pred|``: the part of the mismatch that
    rounding cannot explain. A layer whose predicted Δh is below the floor says nothing.
    """
    pred, rec = ev.per_fired("dh_predicted"), ev.per_fired("dh_recomputed")
    pairs = [ly for ly in pred if ly in rec and pred[ly] != 0]
    if not pairs:
        return ev.skip(rule, "no dh_predicted/dh_recomputed pairs")
    floor = {ly: max(ev.floor("dh_predicted", ly), ev.floor("dh_recomputed", ly)) for ly in pairs}
    err = {ly: max(0.0, abs(rec[ly] - pred[ly]) - floor[ly]) / abs(pred[ly]) for ly in pairs
           if not below(pred[ly], floor[ly])}
    if not err:
        return ev.skip(rule, f"Δh predicted is below its noise floor (median {fmt(median(floor.values()))}) at "
                             f"every fired layer")
    x = median(err.values())
    e = {"median_rel_err": x, "n_off": sum(v > LINEAR_REL_ERR_MAX for v in err.values()), "n_fired": len(err),
         "median_predicted": median(pred[ly] for ly in err), "median_recomputed": median(rec[ly] for ly in err),
         "n_below_noise": len(pairs) - len(err)}
    s = (f"Δh predicted to first order {fmt(e['median_predicted'])}, recomputed {fmt(e['median_recomputed'])}"
         f" (median error {pct(x)}; off by > {pct(LINEAR_REL_ERR_MAX)} at {e['n_off']} of {len(err)} layers"
         + (f"; {e['n_below_noise']} layers below the noise floor left out" if e["n_below_noise"] else "") + ").")
    return ev.make(rule, x > LINEAR_REL_ERR_MAX, min(1.0, x), e, s)


def damped_downstream(ev: Evidence, rule: Rule):
    """Absolute deviation per unit of applied step; ‖x‖'s growth shown apart; no claim for a lost step.

    carried = ‖x_L^steer − x_L^base‖ (resid_post of the last layer) / Σ‖v‖ (the vectors added at
    the decision token, before rounding). A growing ‖x‖ is not damping: the ratio is absolute.
    No claim when the step was negligible or absorbed by rounding (their own causes).
    """
    fired = ev.fired
    prop, added = ev.layers("propagation"), ev.per_fired("added_norm")
    final = ev.scalar("propagation")
    if not fired or (not (prop and added) and final is None):
        return ev.skip(rule, "no fired layer or no propagation records")
    for other in ("rounding_absorbed", "step_negligible"):
        c = ev.cause(other)
        if c is not None and c.detected:
            return ev.make(rule, False, 0.0, {"explained_by": other},
                           f"No damping claim: the step was already lost before the residual could carry it ({other}).")
    total = sum(added.values())
    norms = ev.layers("resid_post_norm")
    last = max(prop) if prop else None
    e = {"first_layer": fired[0], "applied_total": total, "propagation_final": final if final is not None else math.nan}
    ratio = bound = math.nan
    if last is not None and total > 0:
        # rounding noise may hide up to the floor: damping is claimed only if even deviation + floor is small
        noise_last = ev.floor("propagation", last)
        ratio, bound = prop[last] / total, (prop[last] + noise_last) / total
        e.update(last_layer=last, deviation_last=prop[last], carried_per_unit=ratio, deviation_floor=noise_last,
                 norm_growth=(norms.get(last, math.nan) / norms[fired[0]]) if norms.get(fired[0]) else math.nan)
    final_noise = ev.floor("propagation")
    # bitwise identical final states are exact; otherwise "unchanged" must hold with the floor added
    dead = final is not None and (final == 0 or final + final_noise < PROPAGATION_FINAL_MIN)
    damped = math.isfinite(bound) and bound < DAMPING_RATIO_MIN

    def shown(value, noise_):
        return "below noise" + (f" (floor {fmt(noise_)})" if noise_ else "") if below(value, noise_) else fmt(value)

    s = (f"The steps added {fmt(total)} in all at the decision token; "
         f"at layer {e['last_layer']} the steered residual is "
         f"{shown(e['deviation_last'], e['deviation_floor'])} from the baseline ({fmt(ratio)} per unit of applied step;"
         f" ‖x‖ grew {fmt(e['norm_growth'])}× from layer {fired[0]}, which is not damping); "
         if "deviation_last" in e else "")
    s += (f"after the final norm the steered state is {shown(e['propagation_final'], final_noise)} from the baseline"
          + (" (unchanged)." if dead else "."))
    s = s[0].upper() + s[1:]
    return ev.make(rule, dead or damped, 1.0 if dead else 1 - bound / DAMPING_RATIO_MIN, e, s)


def barrier_not_decisive(ev: Evidence, rule: Rule):
    mb, ms = ev.scalar("final_margin", "baseline"), ev.scalar("final_margin", "steered")
    if mb is None or ms is None:
        return ev.skip(rule, "no final_margin for baseline and steered")
    yb, ys = ev.scalar("answer_yes", "baseline"), ev.scalar("answer_yes", "steered")
    flipped = (yb != ys) if yb is not None and ys is not None else (mb > 0) != (ms > 0)
    dm = ms - mb
    frac = abs(dm) / abs(mb) if mb != 0 else math.inf
    label = ev.label()
    if label is not None and ev.answer("baseline") == label:
        return ev.make(rule, False, 0.0, {"m_base": mb, "m_steered": ms},
                       "The answer was right: not changing it is not a failure.")
    h, tau = ev.layers("barrier_h"), ev.layers("barrier_tau")
    realised, pred = ev.per_fired("dh_realised"), ev.per_fired("dh_predicted")
    # a realised Δh below its noise floor is no change (h stays h); one above it reaches τ within its floor
    noise_ = {ly: ev.floor("dh_realised", ly) for ly in realised}
    tol_at = {ly: TARGET_TOLERANCE if below(v, noise_[ly]) else max(TARGET_TOLERANCE, noise_[ly])
              for ly, v in realised.items()}
    realised = {ly: resolved(v, noise_[ly]) for ly, v in realised.items()}
    # target τ; where τ is not recorded (attention-logit site), the change the site asked for
    target = {ly: tau[ly] if ly in tau else h[ly] + pred[ly]
              for ly in realised if ly in h and (ly in tau or ly in pred)}
    if not target:
        return ev.skip(rule, "no barrier_h/dh_realised/target at fired layers")
    # gaps in units of each layer's tolerance: reached when the median is within it
    gap = [h[ly] + realised[ly] - target[ly] for ly in target]
    tol = median(tol_at[ly] for ly in target)
    after = [h[ly] + realised[ly] for ly in target]
    reached = median((h[ly] + realised[ly] - target[ly]) / tol_at[ly] for ly in target) >= -1
    e = {"m_base": mb, "m_steered": ms, "delta_m": dm, "answer_flipped": int(flipped),
         "median_h_after": median(after), "median_target": median(target.values()), "n_fired": len(ev.fired),
         "n_reached": sum(g >= -tol_at[ly] for g, ly in zip(gap, target)), "target_tolerance": tol}
    s = (f"The barrier {'reached' if reached else 'did not reach'} its target (median h after the step"
         f" {fmt(e['median_h_after'])} vs {fmt(e['median_target'])}, {e['n_reached']} of {len(gap)} fired layers),"
         f" {'yet' if reached else 'and'} the margin moved by {fmt(dm)} of {fmt(abs(mb))} ({pct(frac)})")
    ko = {}
    for cond in ("knockout:decision", "knockout:after_image", "double:decision", "double:after_image"):
        km, ky = ev.scalar("final_margin", cond), ev.scalar("answer_yes", cond)
        if km is not None:
            key = cond.replace(":", "_")
            ko[key] = km
            e[f"{key}_margin"], e[f"{key}_delta_m"] = km, km - mb
            e[f"{key}_flipped"] = int((ky != yb) if ky is not None and yb is not None else (km > 0) != (mb > 0))
    if "knockout_decision" in ko and "knockout_after_image" in ko:
        d_dec, d_aft = abs(ko["knockout_decision"] - mb), abs(ko["knockout_after_image"] - mb)
        s += (f"; knocking out image attention at the decision token moves the margin by {fmt(d_dec)},"
              f" at every token after the image by {fmt(d_aft)}")
        off = ev.cause("decision_token_off_path")
        if off is not None and off.detected:  # only the graded sweep may support the negative claim
            s += ("; the graded sweep finds no decision-token image mass that changes the answer: it reaches the answer"
                  " through earlier tokens")
    return ev.make(rule, reached and not flipped and frac < DECISIVE_MARGIN_FRACTION, 1 - frac, e, s + ".")


# ----------------------------------------------------------------------- counterfactuals
# Each undoes just its cause, everything else kept (knob changes, or a dose on the same step).
def _cf_knobs(why, **knobs):
    return lambda ev, cause: Counterfactual(why=why, knobs=knobs)


TAU_SEARCH = (0.2, 0.5, 0.9)  # τ_prefill values the barrier_inactive test tries above "just above every h"


def _cf_inactive(ev: Evidence, cause):
    """What an inactive barrier lacks is a τ above h: τ just above every layer's h first, then the larger
    τ of :data:`TAU_SEARCH` (smallest first), since the τ that was meant is not in the records."""
    h = [v for ly, v in ev.layers("barrier_h").items() if ly in ev.steered]
    if not h:
        return None
    first = min(1.0, max(h) + 0.05)
    taus = [first] + [t for t in TAU_SEARCH if t > first]
    return Counterfactual(why="τ_prefill from just above every layer's h up to " + fmt(taus[-1]), search=tuple(
        Counterfactual(why=f"τ_prefill = {fmt(t)}" + (", just above every layer's h" if t == first else ""),
                       knobs={"tau_prefill": t}) for t in taus))


def _cf_guard(ev: Evidence, cause):
    """A guard 0.1% of the smallest Σg² in float32: the gradient sets the scale again. Σg² in the gradient
    dtype may have underflowed to 0 (a guard of 0 would give an infinite scale: another cause, not this one)."""
    g32 = [v * v for ly, v in ev.layers("grad_norm_f32").items() if ly in ev.active and v > 0]
    sq = g32 or [v for ly, v in ev.layers("grad_norm_sq_dtype").items() if ly in ev.active and v > 0]
    if not sq:
        return None
    guard = 1e-3 * min(sq)
    return Counterfactual(why=f"guard = {fmt(guard)}, 0.1% of the smallest float32 Σg²", knobs={"guard": guard})


STEP_SEARCH = (0.1, 0.3, 1.0, 3.0, 10.0)  # step sizes (× ‖x‖) the step_negligible test tries, smallest first


def _cf_negligible(ev: Evidence, cause):
    """What a negligible step took away is its size: the same step scaled to 10%, 30%, 100%, 300% and 1000% of
    ‖x‖, smallest first (the first that changes the result decides; none: not decisive). One fixed size could
    never pass where the answer needs a step of 2‖x‖."""
    # sized by the figure that was negligible (the step against ‖x‖, or through ln1 against its output);
    # only enlargements are tried
    sizes = [v for k in ("median_step_rel", "median_normalised_rel")
             if isinstance(v := cause.evidence.get(k), float) and v > 0]
    if not sizes:
        return None
    rel = min(sizes)
    search = tuple(Counterfactual(why=f"the same step × {fmt(t / rel)}, {100 * t:g}% of ‖x‖", dose=t / rel)
                   for t in STEP_SEARCH if t > rel)
    if not search:
        return None
    sizes = ", ".join(f"{100 * t:g}%" for t in STEP_SEARCH if t > rel)
    return Counterfactual(why=f"the same step at {sizes} of ‖x‖", search=search)


def _cf_damped(ev: Evidence, cause):
    return Counterfactual(untestable="restoring what the layers after the step removed needs patching their "
                                     "outputs, which this verdict does not run")


def _cf_not_decisive(ev: Evidence, cause):
    return Counterfactual(untestable="the barrier did what it asked (h reached τ), so there is nothing of it to "
                                     "restore; the graded image-mass sweep (decision_token_off_path) tests whether "
                                     "any decision-token mass could change the answer")


def _cf_lookahead(ev: Evidence, cause):
    return Counterfactual(untestable="no knob makes the look-ahead reproduce the layer: the family's adapter "
                                     "(mclcbf_diag/models/adapter.py, its TextMath) must; site = attn_logits acts on "
                                     "the layer's own attention instead, a different intervention")


def _cf_decode_only(ev: Evidence, cause):
    return Counterfactual(why="τ_prefill, α_prefill = τ_decode, α_decode",
                          knobs_of=lambda k: {"tau_prefill": k.tau_decode, "alpha_prefill": k.alpha_decode})


RULES = [
    Rule("decode_only", "Only generated tokens are steered", 0.5,
         "prefill_enabled == 0 and decode_enabled == 1", decode_only, _cf_decode_only),
    Rule("span_mismatch", "Configured image span is not the image", 2, f"span_iou < {SPAN_IOU_MIN}", span_mismatch,
         _cf_knobs("span = detected", span="detected")),
    Rule("lookahead_miss", "The look-ahead is not the layer's image mass", 2.5,
         "|lookahead_miss| > lookahead_miss_floor at a layer (h against the mass the layer computed)",
         lookahead_miss, _cf_lookahead),
    Rule("barrier_inactive", "Barrier inactive (h ≥ τ)", 3,
         f"fraction of steered layers with h ≥ τ > {INACTIVE_FRACTION}", barrier_inactive, _cf_inactive),
    Rule("gradient_underflow", "Gradient underflow in the gradient dtype", 4,
         f"Σg² == 0 in the gradient dtype, or |‖g‖ − ‖g‖_f32|/‖g‖_f32 > max({GRAD_REL_ERR_MAX}, "
         "grad_norm_floor/‖g‖_f32), at an active layer",
         gradient_underflow, _cf_knobs("grad_dtype = float32", grad_dtype="float32")),
    Rule("guard_dominates", "The guard, not the gradient, sets the scale", 4.5,
         f"guard/(Σg² + guard) > {GUARD_SHARE_MAX} at an active layer", guard_dominates, _cf_guard),
    Rule("clamp_limited", "Clamp limited the step", 5,
         "clamp_active at an active layer; strength = fraction clamped × (1 − median scale/scale_unclamped)",
         clamp_limited, _cf_knobs("clamp = none", clamp="none")),
    Rule("step_negligible", "Step negligible next to the residual", 7,
         f"median ‖αθ*‖/‖x‖ < {STEP_REL_MIN}, or median ln1_gain_theta·‖αθ*‖/ln1_out_norm < {STEP_REL_MIN}, "
         "over fired layers", step_negligible, _cf_negligible, judged_on="answer"),
    Rule("linearisation_failed", "First-order prediction failed", 8,
         f"median max(0, |dh_recomputed − dh_predicted| − floor)/|dh_predicted| > {LINEAR_REL_ERR_MAX} over fired "
         "layers whose dh_predicted is above its noise floor",
         linearisation_failed, _cf_knobs("site = attn_logits: the target mass exactly, no linearisation",
                                         site="attn_logits"), judged_on="answer"),
    Rule("damped_downstream", "Perturbation damped downstream", 9,
         f"‖Δx‖ at the last layer < {DAMPING_RATIO_MIN} × Σ‖v‖ applied at the decision token (absolute, not relative "
         f"to a growing ‖x‖), or propagation after the final norm < {PROPAGATION_FINAL_MIN} (or exactly 0), each "
         "with its noise floor added; never when the step was negligible or absorbed", damped_downstream,
         _cf_damped, judged_on="answer"),
    Rule("barrier_not_decisive", "Barrier reached its target but is not decisive", 11,
         f"median (h + dh_realised − τ) ≥ −max({TARGET_TOLERANCE}, dh_realised_floor) over fired layers, a "
         "dh_realised below its floor counting as 0 (τ ← h + dh_predicted where τ is "
         f"not recorded) and |Δm| < {DECISIVE_MARGIN_FRACTION}·|m_base|", barrier_not_decisive, _cf_not_decisive),
]
NO_STEP_EXPLAINED_BY = ("barrier_inactive", "gradient_underflow", "decode_only", "non_finite")

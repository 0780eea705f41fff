"""Rules over tidy records → ranked causes, each with its evidence and one plain sentence.

The engine is :mod:`mclcbf_diag.rulebook` (a rule table, layer sets computed once, causal
ranking). This module holds the generic rules (1, 6, 10, 12 below: they read only what the
runner measures for every intervention) and :func:`diagnose`, which runs them together with
the intervention's own rules (MC-LCBF's by default: 2–5, 7–9, 11, in
:mod:`mclcbf_diag.interventions.mclcbf.rules`).

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

import pandas as pd

from .interventions import MCLCBF
from .rulebook import KNOCKOUT_DOMINANCE, Cause, Evidence, Rule, fmt, median, pct, run_rules, select

__all__ = ["Cause", "ORDER", "GENERIC_RULES", "diagnose", "causes_frame", "verdict"]

ROUNDING_SURVIVAL_MIN = 0.5  # ‖round(x+v)−x‖/‖v‖ below this: most of the step was rounded away


def not_applied(ev: Evidence, rule: Rule, explained_by=()) -> Cause:
    steered, active, fired = ev.steered, ev.active, ev.fired
    explained = next((k for k in explained_by if ev.cause(k) is not None and ev.cause(k).detected), "")
    if not steered:
        reason = "there are no barrier records for condition 'steered' at this phase and step"
    elif not active:
        reason = f"h ≥ τ at all {len(steered)} steered layers"
    else:
        reason = f"the barrier was active at {len(active)} layers but every step was exactly zero"
    e = {"n_steered": len(steered), "n_active": len(active), "n_fired": len(fired), "explained_by": explained}
    s = (f"Steps were applied at {len(fired)} of {len(steered)} steered layers." if fired else
         f"No step was applied because {reason}" + (f" (see {explained})." if explained else "."))
    return ev.make(rule, not fired and not explained, 1.0, e, s)


def rounding_absorbed(ev: Evidence, rule: Rule) -> Cause:
    surv = ev.per_fired("rounding_survival")
    if not surv:
        return ev.skip(rule, "no rounding_survival at fired layers")
    m = median(surv.values())
    low = sum(x < ROUNDING_SURVIVAL_MIN for x in surv.values())
    e = {"median_survival": m, "n_low": low, "n_fired": len(surv)}
    s = (f"Rounding x + αθ* to the model dtype kept a median {pct(m)} of the step"
         f" ({low} of {len(surv)} fired layers below {pct(ROUNDING_SURVIVAL_MIN)}).")
    return ev.make(rule, m < ROUNDING_SURVIVAL_MIN, 1 - m, e, s)


def margin_unmoved(ev: Evidence, rule: Rule) -> Cause:
    mb, ms = ev.scalar("final_margin", "baseline"), ev.scalar("final_margin", "steered")
    if mb is None or ms is None:
        return ev.skip(rule, "no final_margin for baseline and steered")
    yb, ys = ev.scalar("answer_yes", "baseline"), ev.scalar("answer_yes", "steered")
    flipped = (yb != ys) if yb is not None and ys is not None else (mb > 0) != (ms > 0)
    dm = ms - mb
    progress = -dm * math.copysign(1.0, mb)
    e = {"m_base": mb, "m_steered": ms, "delta_m": dm, "answer_flipped": int(flipped)}
    explained = ev.cause("barrier_not_decisive")  # the same observation, explained, wins
    s = (f"The answer {'flipped' if flipped else 'did not flip'}: the margin went from {fmt(mb)} to {fmt(ms)}"
         f" (Δm {dm:+.3g}, {'toward' if progress > 0 else 'away from'} the boundary; a flip needs {fmt(abs(mb))}).")
    strength = 1 - max(progress, 0.0) / abs(mb) if mb != 0 else 1.0
    return ev.make(rule, not flipped and not (explained is not None and explained.detected), strength, e, s)


def decision_token_off_path(ev: Evidence, rule: Rule) -> Cause:
    """Knockouts alone: edits at the decision token leave the answer, edits after the image move it."""
    mb = ev.scalar("final_margin", "baseline")
    edits = {cond: ev.scalar("final_margin", cond) for cond in
             ("knockout:decision", "double:decision", "knockout:after_image", "double:after_image")}
    if mb is None or any(m is None for m in edits.values()):
        return ev.skip(rule, "no knockout conditions in the records")
    flips = {cond: (m > 0) != (mb > 0) for cond, m in edits.items()}
    moved = {cond: abs(m - mb) for cond, m in edits.items()}
    dec = max(moved["knockout:decision"], moved["double:decision"])
    aft = max(moved["knockout:after_image"], moved["double:after_image"])
    detected = (not flips["knockout:decision"] and not flips["double:decision"]
                and (flips["knockout:after_image"] or flips["double:after_image"] or aft >= KNOCKOUT_DOMINANCE * dec))
    e = {"m_base": mb, **{f"{cond.replace(':', '_')}_margin": m for cond, m in edits.items()},
         "max_delta_decision": dec, "max_delta_after_image": aft}
    s = (f"Removing or doubling image attention at the decision token in every layer moves the margin by at most "
         f"{fmt(dec)} ({'and flips' if flips['knockout:decision'] or flips['double:decision'] else 'without flipping'}"
         f" the answer); doing it at every text token after the image moves it by up to {fmt(aft)}"
         f"{' and flips it' if flips['knockout:after_image'] or flips['double:after_image'] else ''}")
    if detected:
        s += (": the image reaches this answer through earlier tokens, so steering the decision token's attention"
              " cannot flip it")
    return ev.make(rule, detected, max(0.0, 1 - dec / aft if aft > 0 else 0.0), e, s + ".")


def _generic_rules(explained_by=()) -> list[Rule]:
    return [
        Rule("not_applied", "No step was applied", 1,
             "no steered layer applied a nonzero step, and no earlier cause (" + (", ".join(explained_by) or "none")
             + ") explains it", lambda ev, rule: not_applied(ev, rule, explained_by)),
        Rule("rounding_absorbed", "Rounding absorbed the step", 6,
             f"median rounding_survival over fired layers < {ROUNDING_SURVIVAL_MIN}", rounding_absorbed),
        Rule("margin_unmoved", "Margin not moved enough to flip", 10,
             "answer not flipped: progress −Δm·sign(m_base) < |m_base|", margin_unmoved),
        Rule("decision_token_off_path", "The decision token's image attention is not on the answer's path", 12,
             "knockout:decision and double:decision keep the answer while an after-image edit flips it or moves "
             f"the margin ≥ {KNOCKOUT_DOMINANCE}× more", decision_token_off_path),
    ]


GENERIC_RULES = _generic_rules()


def rules_for(intervention=None) -> tuple[list[Rule], object]:
    """The rule table for an intervention (default MC-LCBF) and its layer-set function."""
    iv = intervention if intervention is not None else MCLCBF()
    table = _generic_rules(iv.no_step_explained_by()) + list(iv.rules())
    return sorted(table, key=lambda r: r.rank), iv.layer_sets


ORDER = tuple(r.id for r in rules_for()[0])


def diagnose(records: pd.DataFrame, sample=None, phase: str = "prefill", step: int = 0,
             intervention=None) -> list[Cause]:
    """All causes for one sample at (phase, step), ranked (see :mod:`mclcbf_diag.rulebook`)."""
    table, layer_sets = rules_for(intervention)
    return run_rules(select(records, sample, phase, step), table, layer_sets)


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
        flip = (f"answer_flipped: {'yes' if ev['answer_flipped'] else 'no'} (margin {fmt(ev['m_base'])} →"
                f" {fmt(ev['m_steered'])})")
    else:
        flip = "answer_flipped: unknown (no final_margin records)"
    if not found:
        return f"No cause detected: every rule's evidence is in its healthy range.\n{flip}"
    lines = [found[0].sentence]
    lines += [f"Also: {x.title} ({x.id}, strength {x.strength:.2f})" for x in found[1:]]
    return "\n".join([*lines, flip])

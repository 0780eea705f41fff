"""Rules over tidy records → ranked causes, each with its evidence, one plain sentence and its test.

The engine is :mod:`mclcbf_diag.diagnosis.rulebook` (a rule table, layer sets computed once, tests by
counterfactual, ranking). This module holds the generic rules (they read only what the runner
and :mod:`mclcbf_diag.measurements.measure` record for every intervention) and :func:`diagnose`, which runs
them together with the intervention's own rules (MC-LCBF's in
:mod:`mclcbf_diag.interventions.mclcbf.rules`).

**The label sets the question.** A record ``label_yes`` (written by the trace when the
question has a label) makes a wrong answer ask "why not fixed, and what would fix it" and a
right one "kept, broken or derailed, and how far from breaking"; without it the question is
only whether the answer changed. Outcomes are those of :mod:`mclcbf_diag.measurements.outcomes`: a sign
change whose top token is not a Yes/No spelling is *derailed*, not a flip.

**A cause is a claim tested by intervention.** With a tester (explain passes
:func:`mclcbf_diag.experiments.explain.cause_tester`) each detected cause's own counterfactual is run and
compared with the unfixed intervention; it is *decisive* only if that changes the step size, the
decision token's image mass, the margin or the outcome by the amounts stated in
:data:`mclcbf_diag.diagnosis.rulebook.DECISIVE_RULE`, else "present, not decisive". "Decisive" always
comes with the counterfactual run that showed it (:class:`~mclcbf_diag.diagnosis.rulebook.CounterfactualRun`);
a cause read off the run itself (non-finite values, a derailed output) is *observed*, never
decisive; one whose test cannot succeed by construction is *untestable here*, with the reason; a
counterfactual whose run is non-finite shows no effect. The graded sweep's runs are the test of
``decision_token_off_path``. When no single cause's run reaches the label's goal, sets of causes
are undone together (:func:`mclcbf_diag.diagnosis.rulebook.joint_causes`). Ranking: decisive, then untested, then not
decisive;
each group
in causal order (a step exists → it targets the image → the barrier asks for it → the
gradient is computed → the scale is set → it survives rounding → it is large next to x → it
does what the linearisation promised → the residual carries it → the margin moves → the
answer is still an answer → the attention it changes is on the answer's path).

Generic rules (rank):

* ``non_finite`` (0): NaN/inf in the intervened run (``nonfinite_values``, including states whose
  mean square overflows float32, non-finite logits, or an intervention's ``step_nonfinite`` /
  ``residual_nonfinite`` records). Observed; the outcome is derailed (non-finite logits) or
  non_finite (a step dropped, the logits finite).
* ``not_applied`` (1): no steered layer fired, unless a named cause explains it.
* ``rounding_absorbed`` (6): median ``rounding_survival`` over fired layers <
  :data:`ROUNDING_SURVIVAL_MIN`; tested on a float32 copy of the model (same inputs and
  intervention), counting only if that run reaches the label's goal.
* ``margin_unmoved`` (10): the outcome is unchanged for a wrong (or unlabeled) answer; never a
  cause for a right answer (its sentence then says how far the margin is from breaking).
* ``output_derailed`` (10.5): the top token was a Yes/No spelling in the baseline and is not
  when intervened (``top_is_yes_no``), with the Yes/No probability masses.
* ``decision_token_off_path`` (12): only from the graded image-mass sweep
  (:mod:`mclcbf_diag.experiments.sweep`, condition ``sweep:decision`` / ``sweep:after_image``): no
  setting at the decision token (0 … 0.9, ×0.5, ×2, all layers and windows) changes the answer
  with a valid Yes/No output while some setting at every token after the image does. Two
  knockouts never support that negative claim.

A rule whose evidence is missing is reported as not detected ("skipped"), never raised.
"""

from __future__ import annotations

import json
import math

import pandas as pd

from ..interventions import resolve
from .counterfactual import Counterfactual
from .rulebook import (
    Cause,
    CounterfactualRun,
    Evidence,
    Rule,
    fmt,
    median,
    pct,
    reaches_goal,
    run_rules,
    select,
)

__all__ = ["Cause", "ORDER", "GENERIC_RULES", "diagnose", "causes_frame", "verdict_text"]

ROUNDING_SURVIVAL_MIN = 0.5  # ‖round(x+v)−x‖/‖v‖ below this: most of the step was rounded away


def not_applied(ev: Evidence, rule: Rule, explained_by=()) -> Cause:
    """Detected when the intervention applied no step at any steered layer and no other cause explains why.

    Args:
        ev: the question's evidence (its steered, active and fired layers).
        rule: this rule.
        explained_by: rule ids whose detected cause explains a missing step (the intervention's
            ``no_step_explained_by``); the first detected one is named and this cause is then not detected.

    Returns:
        The cause; its evidence counts the steered, active and fired layers.
    """
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
    # rounding_survival measures how much of the step rounding removed, not what the step would have done:
    # that needs a run (see _cf_rounding)
    return ev.make(rule, m < ROUNDING_SURVIVAL_MIN, 1 - m, e, s)


def _cf_rounding(ev: Evidence, cause: Cause) -> Counterfactual:
    """What rounding took away is the precision x + αθ* was added in: the same inputs and intervention on a
    float32 copy of the model (explain's tester; it is "untestable here" where the model already computes in
    float32, is split over devices, or answers differently in float32 without any step). The wider dtype
    moves every margin a little, so only a run that reaches the label's goal counts (``goal_only``)."""
    return Counterfactual(why="the model in float32, where x + αθ* is not rounded away (same inputs and "
                              "intervention)", dtype="float32", goal_only=True)


def non_finite(ev: Evidence, rule: Rule) -> Cause:
    """NaN/inf anywhere in the steered run: an overflowing step, or the model overflowed after it."""
    bad = ev.scalar("nonfinite_values") or 0.0
    step_bad = [ly for ly, v in ev.layers("step_nonfinite").items() if v > 0]
    resid_bad = [ly for ly, v in ev.layers("residual_nonfinite").items() if v > 0]
    fin = ev.finite("steered")
    detected = (not fin) or bool(step_bad) or bool(resid_bad)
    e = {"nonfinite_values": bad, "n_step_nonfinite": len(step_bad), "n_residual_nonfinite": len(resid_bad),
         "logits_finite": int(fin)}
    s = (f"The intervened run holds non-finite values: {bad:.0f} NaN/inf numbers in the decision token's residuals"
         f" and logits; the step overflowed at {len(step_bad)} layers (not applied) and the residual was NaN/inf at"
         f" {len(resid_bad)}. " + ("A margin computed from such values means nothing: the output is derailed."
                                   if not fin else "What ran is not the configured intervention, so its answer says "
                                   "nothing about it: the outcome is non_finite, never unchanged.")
         if detected else "Every value of the intervened run is finite.")
    # an observation of the run itself, not a counterfactual: never "decisive" (no run undoes it)
    return ev.make(rule, detected, 1.0, e, s,
                   test="observed: non-finite logits are no answer (the outcome is derailed)" if not fin else
                   "observed: an overflowing step is recorded and dropped (the outcome is non_finite)")


def output_derailed(ev: Evidence, rule: Rule) -> Cause:
    """The intervened output is no longer a Yes/No answer (its top token is another word)."""
    tb, ts = ev.scalar("top_is_yes_no", "baseline"), ev.scalar("top_is_yes_no", "steered")
    if tb is None or ts is None:
        return ev.skip(rule, "no top_is_yes_no records for baseline and steered")
    e = {"p_yes": ev.scalar("p_yes") or math.nan, "p_no": ev.scalar("p_no") or math.nan,
         "p_yes_baseline": ev.scalar("p_yes", "baseline") or math.nan,
         "p_no_baseline": ev.scalar("p_no", "baseline") or math.nan, "top_token_id": ev.scalar("top_token_id") or -1}
    detected = tb > 0.5 and ts < 0.5
    mass = e["p_yes"] + e["p_no"]
    base_mass = e["p_yes_baseline"] + e["p_no_baseline"]
    s = (f"The intervened output is not a Yes/No answer: its top token (id {e['top_token_id']:.0f}) is another "
         f"word; Yes and No spellings keep {pct(mass)} of the probability (baseline {pct(base_mass)}). The sign of "
         "Yes − No there is not an answer." if detected else
         f"The output is still a Yes/No answer (Yes + No mass {pct(mass)}, baseline {pct(base_mass)}).")
    return ev.make(rule, detected, 1 - mass if math.isfinite(mass) else 1.0, e, s,
                   test="observed: the output is no answer (the outcome is derailed)")


def margin_unmoved(ev: Evidence, rule: Rule) -> Cause:
    """A wrong (or unlabeled) answer the intervention left as it was; right answers are not a failure."""
    mb, ms = ev.scalar("final_margin", "baseline"), ev.scalar("final_margin", "steered")
    if mb is None or ms is None:
        return ev.skip(rule, "no final_margin for baseline and steered")
    label, outcome = ev.label(), ev.outcome()
    base = ev.answer("baseline")
    flipped = base != ev.answer("steered")
    dm = ms - mb
    progress = -dm * math.copysign(1.0, mb)
    e = {"m_base": mb, "m_steered": ms, "delta_m": dm, "answer_flipped": int(flipped), "outcome": str(outcome),
         "label": label or "none"}
    explained = ev.cause("barrier_not_decisive")  # the same observation, explained, wins
    right = label is not None and base == label
    if right:
        s = (f"The answer was right and is {'kept' if outcome == 'unchanged' else outcome}: the margin went from "
             f"{fmt(mb)} to {fmt(ms)} (Δm {dm:+.3g}, {'toward' if progress > 0 else 'away from'} the boundary, "
             f"{fmt(abs(ms))} from breaking).")
        return ev.make(rule, False, 0.0, e, s)
    what = "was not fixed" if label is not None else "did not change"
    s = (f"The answer {what if not flipped else 'changed'}: the margin went from {fmt(mb)} to {fmt(ms)}"
         f" (Δm {dm:+.3g}, {'toward' if progress > 0 else 'away from'} the boundary; a change needs {fmt(abs(mb))}).")
    strength = 1 - max(progress, 0.0) / abs(mb) if mb != 0 else 1.0
    return ev.make(rule, outcome == "unchanged" and not (explained is not None and explained.detected), strength, e, s,
                   test="observed: this is the outcome the causes above explain")


SWEEPS = ("sweep:decision", "sweep:after_image")


def decision_token_off_path(ev: Evidence, rule: Rule) -> Cause:
    """From the graded sweep only: no decision-token image mass changes the answer, after-image ones do."""
    got = {c: {m: ev.scalar(m, c) for m in ("sweep_runs", "sweep_changes", "sweep_min_target", "sweep_derailed")}
           for c in SWEEPS}
    if any(got[c]["sweep_runs"] is None for c in SWEEPS):
        return ev.skip(rule, "no graded image-mass sweep in the records (explain runs it)")
    dec, aft = got["sweep:decision"], got["sweep:after_image"]
    label, base = ev.label(), ev.answer("baseline")
    verb = ("fixes" if label is not None and base != label else "breaks" if label is not None else "changes")
    e = {f"{c.split(':')[1]}_{k}": v for c, d in got.items() for k, v in d.items() if v is not None}

    def part(d, where):
        n, k = int(d["sweep_runs"]), int(d["sweep_changes"] or 0)
        if k:
            return (f"at {where} {k} of {n} settings {verb} the answer with a valid Yes/No output (smallest image mass "
                    f"{fmt(d['sweep_min_target'])})") if d.get("sweep_min_target") is not None else \
                   f"at {where} {k} of {n} settings {verb} the answer with a valid Yes/No output"
        return f"at {where} none of {n} settings {verb} it ({int(d['sweep_derailed'] or 0)} derail the output)"

    detected = not dec["sweep_changes"] and bool(aft["sweep_changes"])
    s = ("Setting the image attention mass to 0, 0.1, …, 0.9, ×0.5 and ×2 (the decision token's in all layers and "
         "in layer windows, the text's after the image in all layers at once): "
         + part(dec, "the decision token") + "; " + part(aft, "every text token after the image"))
    if detected:
        s += (": the image reaches this answer through earlier tokens, so no steering of the decision token's image "
              "attention can change it")
    run = None
    if detected:  # the sweep's runs are the test: the one shown is the smallest after-image setting that changes it
        mass, margin = aft.get("sweep_min_target"), ev.scalar("sweep_example_margin", "sweep:after_image")
        what = {"fixes": "fixed", "breaks": "broken"}.get(verb, "changed")
        run = CounterfactualRun(f"image mass {fmt(mass) if mass is not None else '(a relative setting)'} at every text "
                                "token after the image, in all layers (the graded sweep)",
                                margin if margin is not None else math.nan, what)
    return ev.make(rule, detected, 1.0, e, s + ".", decisive=True if detected else None,
                   test="the graded sweep: image-mass edits after the image change the answer, at the decision token "
                        "none do", run=run)


def _generic_rules(explained_by=()) -> list[Rule]:
    return [
        Rule("not_applied", "No step was applied", 1,
             "no steered layer applied a nonzero step, and no earlier cause (" + (", ".join(explained_by) or "none")
             + ") explains it", lambda ev, rule: not_applied(ev, rule, explained_by)),
        Rule("non_finite", "Non-finite values (overflow)", 0,
             "NaN/inf in the intervened run's residuals or logits, or an overflowing step", non_finite),
        Rule("rounding_absorbed", "Rounding absorbed the step", 6,
             f"median rounding_survival over fired layers < {ROUNDING_SURVIVAL_MIN}", rounding_absorbed,
             _cf_rounding),
        Rule("margin_unmoved", "Answer not changed (wrong or unlabeled answer)", 10,
             "outcome unchanged for a wrong (or unlabeled) answer", margin_unmoved),
        Rule("output_derailed", "Output derailed (no longer a Yes/No answer)", 10.5,
             "top token at the decision position a Yes/No spelling in the baseline, another token when intervened",
             output_derailed),
        Rule("decision_token_off_path", "The decision token's image attention is not on the answer's path", 12,
             "graded sweep: no image-mass setting at the decision token (0 … 0.9, ×0.5, ×2; all layers and windows) "
             "changes the answer with a valid output, while some setting at every token after the image does",
             decision_token_off_path),
    ]


GENERIC_RULES = _generic_rules()


def rules_for(intervention=None) -> tuple[list[Rule], object]:
    """The rule table for an intervention (default: the registry's default intervention) and its layer-set
    function."""
    iv = intervention if intervention is not None else resolve()
    table = _generic_rules(iv.no_step_explained_by()) + list(iv.rules())
    return sorted(table, key=lambda r: r.rank), iv.layer_sets


ORDER = tuple(r.id for r in rules_for()[0])


def diagnose(records: pd.DataFrame, question_id=None, phase: str = "prefill", decode_step: int = 0,
             intervention=None, tester=None) -> list[Cause]:
    """All causes for one question at (phase, decode step), tested and ranked (see
    :mod:`mclcbf_diag.diagnosis.rulebook`).

    Whole-model records of other phases (the intervention's row records) are kept.

    Args:
        records: tidy records of one or more questions (baseline and steered conditions).
        question_id: the question diagnosed; None: the only question in ``records``.
        phase: the records' phase read (``"prefill"`` or ``"decode"``).
        decode_step: the decode step read (0 for the prefill).
        intervention: the intervention whose rules, layer sets and counterfactual hook are used;
            None: the registry's default intervention.
        tester: runs each detected cause's counterfactual (e.g.
            :func:`mclcbf_diag.experiments.explain.cause_tester`); None: the causes that need a run
            stay "present, not tested".

    Returns:
        Every rule's :class:`Cause`, ranked (detected first; see :func:`run_rules`).

    Raises:
        UserError: ``records`` hold several questions and no ``question_id`` is given, or none at
            (question, phase, decode step).
    """
    table, layer_sets = rules_for(intervention)
    df = select(records, question_id, phase, decode_step)
    return run_rules(df, table, layer_sets, tester=tester, intervention=intervention)


def causes_frame(causes: list[Cause]) -> pd.DataFrame:
    """One row per cause in the given (ranked) order; evidence as a JSON string."""
    return pd.DataFrame([{"rank": i + 1, "id": x.id, "detected": x.detected, "status": x.status,
                          "strength": x.strength, "sentence": x.sentence, "test": x.test, "threshold": x.threshold,
                          "evidence": json.dumps(x.evidence, sort_keys=True, ensure_ascii=False),
                          "counterfactual": _run_text(x.run)}
                         for i, x in enumerate(causes)],
                        columns=["rank", "id", "detected", "status", "strength", "sentence", "test", "threshold",
                                 "evidence", "counterfactual"])


def _run_text(run) -> str:
    """The recorded counterfactual run in one line ("" when there is none)."""
    if run is None:
        return ""
    parts = [run.change, f"margin {fmt(run.margin)}", f"outcome {run.outcome}"]
    if math.isfinite(run.step_size):
        parts.append(f"step {fmt(run.step_size)} of ‖x‖")
    if not run.finite:
        parts.append("non-finite: no effect read")
    return "; ".join(parts)


def verdict_text(causes: list[Cause]) -> str:
    """Short lines: the question the label asks, each detected cause, the ranking, the outcome.

    The first line answers the question (a wrong answer: why not fixed; a right one: kept,
    broken or derailed; no label: did it change). Then one line per detected cause in rank
    order, ``[status] sentence``, each followed by an indented line with its id, its strength
    and its test; one line says how the ranking works (with this verdict's own example when
    a weaker cause ranks above a stronger one), one what "decisive" means, and the last line
    is the outcome.
    """
    from .rulebook import DECISIVE_RULE

    found = [x for x in causes if x.detected]
    ev = next((x.evidence for x in causes if x.id == "margin_unmoved" and "m_base" in x.evidence),
              next((x.evidence for x in causes if "answer_flipped" in x.evidence), {}))
    if ev:
        outcome = ev.get("outcome", "changed" if ev["answer_flipped"] else "unchanged")
        tail = (f"outcome: {outcome} (margin {fmt(ev['m_base'])} → {fmt(ev['m_steered'])}"
                f"{', label ' + ev['label'] if ev.get('label', 'none') != 'none' else ', no label'})")
    elif any(x.id == "non_finite" and x.detected for x in causes):
        outcome, tail = "derailed", "outcome: derailed (non-finite values: the margin is not a number)"
    else:
        outcome, tail = None, "outcome: unknown (no final_margin records)"
    head = _question_line(ev, outcome)
    if not found:
        return "\n".join(x for x in (head, "No cause detected: every rule's evidence is in its healthy range.",
                                     tail) if x)
    lines = [head] if head else []
    for x in found:
        lines.append(f"[{x.status}] {x.sentence}")
        lines.append(f"  {x.id}, strength {fmt(x.strength)}" + (f"; test: {x.test.rstrip('.')}." if x.test else "."))
    lines.append(_ranking_line(found, _goal(ev)))
    if any(x.status in ("decisive", "present, not decisive") for x in found):
        lines.append(f"Decisive means: {DECISIVE_RULE}.")
    return "\n".join([*lines, tail])


_GROUP = {True: 0, None: 1, False: 2}


def _ranking_line(found: list[Cause], goal: tuple[str, ...] = ()) -> str:
    """How the causes are ordered, in one line, with this verdict's own weaker-above-stronger example."""
    line = ("Ranking: decisive causes first (those whose undoing reaches what the label asks, fixed for a wrong "
            "answer, before the others), then causes not tested by a counterfactual (observed and untestable "
            "ones included), then those present but not decisive; within each group in causal order, because an "
            "earlier failure hides later ones; strength (how far the rule's evidence is past its threshold, 0 to 1) "
            "only breaks ties")

    def group(c):
        return _GROUP[c.decisive], not reaches_goal(c, goal)

    for i, a in enumerate(found):
        b = next((b for b in found[i + 1:] if group(b) == group(a) and b.strength > a.strength), None)
        if b is not None:
            return (line + f": so {a.id} (strength {fmt(a.strength)}) ranks above {b.id} (strength {fmt(b.strength)}) "
                    "because it comes earlier in that order.")
    return line + "."


def _goal(ev: dict) -> tuple[str, ...]:
    """The outcomes the label's question asks for, from the margin evidence (none without it)."""
    from ..measurements.outcomes import GOALS, kind

    if not ev:
        return ()
    label = ev.get("label", "none")
    return GOALS[kind(label if label != "none" else None, "yes" if ev["m_base"] > 0 else "no")]


def _question_line(ev: dict, outcome) -> str:
    label = ev.get("label", "none") if ev else "none"
    if not ev:
        return ""
    base = "yes" if ev["m_base"] > 0 else "no"
    if label == "none":
        return f"No label: the question is only whether the answer changed; it is {outcome}."
    if base == label:
        return (f"The baseline answer ({base}) is right; the question is whether the intervention kept it: it is "
                f"{'kept' if outcome == 'unchanged' else outcome}.")
    return (f"The baseline answer ({base}) is wrong; the question is why the intervention did not fix it and what "
            f"would: it is {outcome}." if outcome != "fixed" else
            f"The baseline answer ({base}) is wrong and the intervention fixed it.")

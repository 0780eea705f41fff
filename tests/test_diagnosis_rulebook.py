"""rulebook.py: how a detected cause is tested, on hand-built records and fake testers (no model).

No "decisive" without a recorded counterfactual run; a test that cannot succeed is "untestable here";
a non-finite counterfactual shows no effect; a search tries sizes until one changes the result; and
when no single cause is decisive, sets of causes undone together can be (a joint cause).
"""

import math

import pytest
from test_diagnosis_diagnose import LABEL_NO, LABEL_YES, PLANTED, UNMOVED, make

from mclcbf_diag.diagnosis.diagnose import diagnose, verdict_text
from mclcbf_diag.diagnosis.rulebook import Cause, CounterfactualRun

UNFIXED = {"step_size": 0.003, "mass": 0.2, "margin": -1.5, "outcome": "unchanged", "finite": True, "dropped": False}


def _tester(effects: dict, seen: list | None = None):
    """Effects by the spec's "why" (a key ending in "*": by prefix; unlisted: the unfixed run's)."""
    def tester(spec):
        if seen is not None:
            seen.append(None if spec is None else spec.why)
        if spec is None:
            return UNFIXED
        why = spec.why
        return effects.get(why, next((v for k, v in effects.items() if k.endswith("*") and why.startswith(k[:-1])),
                                     UNFIXED))
    return tester


def test_decisive_needs_a_recorded_run():
    with pytest.raises(ValueError, match="recorded counterfactual run"):
        Cause("x", "X", True, 1.0, {}, "", "", decisive=True)
    run = CounterfactualRun("clamp = none", 1.2, "fixed")
    assert Cause("x", "X", True, 1.0, {}, "", "", decisive=True, run=run).status == "decisive"


def test_a_decisive_cause_carries_its_run():
    frame = make(step={"clamp_active": 1, "scale": 0.5, "scale_unclamped": 127.0}, final=UNMOVED, extra=[LABEL_YES])
    fixed = {**UNFIXED, "step_size": 4.9, "margin": 1.2, "outcome": "fixed"}
    by = {c.id: c for c in diagnose(frame, tester=_tester({"clamp = none": fixed}))}
    run = by["clamp_limited"].run
    assert by["clamp_limited"].decisive and run == CounterfactualRun("clamp = none", 1.2, "fixed", 4.9, 0.2, True)
    assert all(c.run is not None for c in by.values() if c.decisive)


@pytest.mark.parametrize("case, reason", [("damped_downstream", "patching"),
                                          ("barrier_not_decisive", "nothing of it to restore")])
def test_a_test_that_cannot_succeed_is_untestable_here(case, reason):
    frame = make(**PLANTED[case], extra=[LABEL_YES])
    seen = []
    cause = next(c for c in diagnose(frame, tester=_tester({}, seen)) if c.id == case)
    assert cause.status == "untestable here" and reason in cause.untestable and cause.decisive is None
    assert cause.run is None and f"untestable here: {cause.untestable}" == cause.test
    assert f"[untestable here] {cause.sentence}" in verdict_text([cause])


ROUNDING = "the model in float32, where x + αθ* is not rounded away (same inputs and intervention)"


def test_rounding_is_tested_in_float32_and_counts_only_at_the_goal():
    frame = make(**PLANTED["rounding_absorbed"], extra=[LABEL_YES])
    seen = []

    def rounding(effects):
        return next(c for c in diagnose(frame, tester=_tester(effects, seen)) if c.id == "rounding_absorbed")

    # a float32 run that moves the margin (the dtype alone does that) but keeps the answer: not decisive
    cause = rounding({ROUNDING: {**UNFIXED, "margin": -0.2}})
    assert ROUNDING in seen and cause.decisive is False and cause.run.change == ROUNDING
    assert "does not make the answer fixed" in cause.test
    cause = rounding({ROUNDING: {**UNFIXED, "margin": 0.3, "outcome": "fixed"}})
    assert cause.decisive and cause.run.outcome == "fixed"
    # the tester may find, running it, that the run cannot test the cause here (a float32 model, say)
    cause = rounding({ROUNDING: {"untestable": "the model already computes in float32"}})
    assert cause.status == "untestable here" and cause.run is None and "float32" in cause.untestable


def test_a_non_finite_counterfactual_shows_no_effect():
    # the guard's undoing overflows (an infinite scale, its step dropped): "step 0.003 → 0" is no effect
    frame = make(step=PLANTED["guard_dominates"]["step"], final=UNMOVED, extra=[LABEL_YES])
    dropped = {**UNFIXED, "step_size": 0.0, "dropped": True, "outcome": "non_finite"}
    cause = next(c for c in diagnose(frame, tester=_tester({"guard = *": dropped})) if c.id == "guard_dominates")
    assert cause.decisive is None and cause.status == "present, not tested"
    assert "non-finite run" in cause.test and cause.run is not None and not cause.run.finite
    # the same counterfactual with a NaN margin ("decisive" by the margin rule before): no effect either
    nan = {**UNFIXED, "margin": math.nan, "finite": False, "outcome": "derailed"}
    cause = next(c for c in diagnose(frame, tester=_tester({"guard = *": nan})) if c.id == "guard_dominates")
    assert cause.decisive is None and "non-finite" in cause.test


def test_a_negligible_step_is_tested_by_a_search_over_its_size():
    # the step is 0.1% of ‖x‖; sizes 10%, 30%, 100% change nothing, 300% fixes it
    frame = make(step={"theta_rel": 0.001}, final=UNMOVED, extra=[LABEL_YES])
    seen = []
    fixed = {**UNFIXED, "margin": 0.4, "outcome": "fixed"}
    cause = next(c for c in diagnose(frame, tester=_tester({"the same step × 3e+03, 300% of ‖x‖": fixed}, seen))
                 if c.id == "step_negligible")
    assert [w for w in seen if w and w.startswith("the same step ×")] == [
        "the same step × 100, 10% of ‖x‖", "the same step × 300, 30% of ‖x‖", "the same step × 1e+03, 100% of ‖x‖",
        "the same step × 3e+03, 300% of ‖x‖"]
    assert cause.decisive and cause.run.change == "the same step × 3e+03, 300% of ‖x‖" and cause.run.outcome == "fixed"
    assert cause.test.startswith("undoing it alone (the same step × 3e+03, 300% of ‖x‖) changes")
    # none of the sizes: not decisive, and the test says how many were tried
    cause = next(c for c in diagnose(frame, tester=_tester({})) if c.id == "step_negligible")
    assert cause.decisive is False and "at any of 5 settings" in cause.test and "reaches no fixed outcome" in cause.test
    # a size that moves the margin (or derails the answer) does not decide a search: only the goal does
    moved = {**UNFIXED, "margin": -0.2}
    cause = next(c for c in diagnose(frame, tester=_tester({"the same step × *": moved})) if c.id == "step_negligible")
    assert cause.decisive is False


JOINT_STEP = {**PLANTED["gradient_underflow"]["step"], "guard_share": 0.999}
GRAD, GUARD = "grad_dtype = float32", "guard = 1e-13, 0.1% of the smallest float32 Σg²"


def test_causes_that_act_only_together_are_one_joint_cause():
    # Σg² underflowed and the guard sets the scale: neither undone alone changes the answer, both together fix it
    frame = make(step=JOINT_STEP, final=UNMOVED, extra=[LABEL_YES])
    seen = []
    fixed = {**UNFIXED, "step_size": 0.4, "margin": 0.9, "outcome": "fixed"}
    infinite = {**UNFIXED, "step_size": 0.0, "dropped": True, "outcome": "non_finite"}
    causes = diagnose(frame, tester=_tester({f"{GRAD} and {GUARD}": fixed, GUARD: infinite}, seen))
    top = causes[0]
    assert top.id == "joint:gradient_underflow+guard_dominates" and top.decisive and top.status == "decisive"
    assert top.members == ("gradient_underflow", "guard_dominates") and top.run.outcome == "fixed"
    assert top.run.change == f"{GRAD} and {GUARD}" and "neither" not in top.sentence
    by = {c.id: c for c in causes}
    assert by["gradient_underflow"].decisive is False and by["guard_dominates"].decisive is None
    assert f"{GRAD} and {GUARD}" in seen
    assert "[decisive] Undoing gradient_underflow + guard_dominates together changes" in verdict_text(causes)


def test_a_cause_decisive_by_its_step_alone_still_leaves_room_for_a_joint_cause():
    # undoing the guard enlarges the step (decisive by its size) but the answer stays wrong: sets are still tried
    frame = make(step=JOINT_STEP, final=UNMOVED, extra=[LABEL_YES])
    fixed = {**UNFIXED, "step_size": 0.4, "margin": 0.9, "outcome": "fixed"}
    bigger = {**UNFIXED, "step_size": 0.2}
    causes = diagnose(frame, tester=_tester({f"{GRAD} and {GUARD}": fixed, GUARD: bigger}))
    by = {c.id: c for c in causes}
    assert by["guard_dominates"].decisive and by["guard_dominates"].run.outcome == "unchanged"
    assert causes[0].id == "joint:gradient_underflow+guard_dominates" and causes[0].run.outcome == "fixed"


def test_no_joint_search_when_a_single_cause_decides_or_the_answer_is_right():
    frame = make(step=JOINT_STEP, final=UNMOVED, extra=[LABEL_YES])
    fixed = {**UNFIXED, "margin": 0.9, "outcome": "fixed"}
    seen = []
    causes = diagnose(frame, tester=_tester({GRAD: fixed, f"{GRAD} and {GUARD}": fixed}, seen))
    assert not any(c.id.startswith("joint:") for c in causes) and f"{GRAD} and {GUARD}" not in seen
    seen = []  # a right answer kept: nothing to explain, no sets
    causes = diagnose(make(step=JOINT_STEP, final=UNMOVED, extra=[LABEL_NO]), tester=_tester({}, seen))
    assert not any(c.id.startswith("joint:") for c in causes) and not any(" and " in (w or "") for w in seen)


def test_joint_search_is_bounded_and_in_causal_order():
    # five mergeable causes, none decisive alone or together: at most JOINT_MAX_RUNS sets are run
    from mclcbf_diag.diagnosis.rulebook import JOINT_MAX_RUNS

    step = {**JOINT_STEP, "clamp_active": 1, "scale": 0.5, "scale_unclamped": 127.0}
    frame = make(step=step, final={**PLANTED["span_mismatch"]["final"], **UNMOVED}, extra=[LABEL_YES])
    seen = []
    causes = diagnose(frame, tester=_tester({}, seen))
    sets = [w for w in seen if w and " and " in w]
    assert 0 < len(sets) <= JOINT_MAX_RUNS and not any(c.id.startswith("joint:") for c in causes)
    assert sets[0].startswith("span = detected and grad_dtype = float32")  # the two earliest in causal order


def test_a_rule_answering_a_dict_is_a_programming_error():
    from mclcbf_diag.diagnosis.rulebook import Rule, run_rules

    base = make(final=UNMOVED, extra=[LABEL_YES])
    rule = Rule("x", "X", 1.0, "t", lambda ev, r: ev.make(r, True, 1.0, {}, "s"),
                counterfactual=lambda ev, cause: {"knobs": {"clamp": "none"}, "why": "old style"})
    with pytest.raises(TypeError, match="not dict"):
        run_rules(base, [rule], tester=_tester({}))


def test_the_causes_frame_shows_each_run():
    from mclcbf_diag.diagnosis.diagnose import causes_frame

    frame = make(step={"clamp_active": 1, "scale": 0.5, "scale_unclamped": 127.0}, final=UNMOVED, extra=[LABEL_YES])
    fixed = {**UNFIXED, "step_size": 4.9, "margin": 1.2, "outcome": "fixed"}
    df = causes_frame(diagnose(frame, tester=_tester({"clamp = none": fixed})))
    row = df[df.id == "clamp_limited"].iloc[0]
    assert row.counterfactual == "clamp = none; margin 1.2; outcome fixed; step 4.9 of ‖x‖"


def test_decisive_causes_that_reach_the_goal_rank_first():
    # the clamp's undoing only moves the margin, the step size's undoing fixes the wrong answer: the fix ranks
    # first although the clamp comes earlier in the causal order
    frame = make(step={"clamp_active": 1, "scale": 0.5, "scale_unclamped": 127.0, "theta_rel": 0.001},
                 final=UNMOVED, extra=[LABEL_YES])
    moved = {**UNFIXED, "margin": -0.5}
    fixed = {**UNFIXED, "margin": 0.4, "outcome": "fixed"}
    causes = diagnose(frame, tester=_tester({"clamp = none": moved, "the same step × *": fixed}))
    assert [c.id for c in causes if c.decisive] == ["step_negligible", "clamp_limited"]
    assert "those whose undoing reaches what the label asks" in verdict_text(causes)
    # a larger step that derails the wrong answer does not fix it: the search does not decide the cause
    derailed = {**UNFIXED, "margin": 0.4, "outcome": "derailed"}
    causes = diagnose(frame, tester=_tester({"clamp = none": moved, "the same step × *": derailed}))
    assert [c.id for c in causes if c.decisive] == ["clamp_limited"]


def test_against_a_non_finite_unfixed_run_only_the_goal_counts():
    # the unfixed run dropped its step (non_finite): undoing the clamp gives a finite "unchanged" run, which
    # differs in outcome but shows nothing; a run that fixes the answer does decide it
    frame = make(step={"clamp_active": 1, "scale": 0.5, "scale_unclamped": 127.0}, final=UNMOVED, extra=[LABEL_YES])
    dropped = {**UNFIXED, "dropped": True, "outcome": "non_finite"}

    def tester_with(effect):
        return lambda spec: dropped if spec is None else (effect if spec.why == "clamp = none" else dropped)

    cause = next(c for c in diagnose(frame, tester=tester_with({**UNFIXED, "margin": -1.0})) if c.id == "clamp_limited")
    assert cause.decisive is None and "the unfixed run is non-finite" in cause.test
    fixed = {**UNFIXED, "margin": 0.8, "outcome": "fixed"}
    cause = next(c for c in diagnose(frame, tester=tester_with(fixed)) if c.id == "clamp_limited")
    assert cause.decisive and "outcome non_finite → fixed" in cause.test


def test_a_search_survives_runs_that_cannot_run():
    frame = make(step={"theta_rel": 0.001}, final=UNMOVED, extra=[LABEL_YES])
    fixed = {**UNFIXED, "margin": 0.4, "outcome": "fixed"}

    def tester(spec):
        if spec is None:
            return UNFIXED
        if spec.why.startswith("the same step × 100,"):
            return None  # this size could not run
        return fixed if spec.why.startswith("the same step × 300,") else UNFIXED

    cause = next(c for c in diagnose(frame, tester=tester) if c.id == "step_negligible")
    assert cause.decisive and cause.run.change == "the same step × 300, 30% of ‖x‖"

"""Planted causes on a *wrong* answer, each with a control: the verdict names what stops the fix.

Question 71 of the shipped adversarial split (label no; the model sees a bowl that is not there, the
README's example) is answered wrong. A scan over a few configurations picks one that fixes it (the
working configuration): detected span, float32 gradient, no clamp. Each plant then breaks one thing of
that configuration, from its physics. The control is the working configuration itself: it fixes the
answer and does not show the planted cause, so the plant alone creates it. With every cause tested by
its counterfactual run (explain's tester), the planted cause must rank first and be decisive with its
run recorded, or "untestable here" with the reason; nothing is decisive without a run.
(tests/test_experiments_explain.py plants the same causes on a right answer.)
"""

import dataclasses
import itertools

import pytest
import torch
from test_experiments_explain import UndoDownstream, _question, _tested

from mclcbf_diag import barrier as B
from mclcbf_diag.diagnosis.counterfactual import Counterfactual
from mclcbf_diag.experiments.explain import cause_tester
from mclcbf_diag.experiments.trace import trace_sample
from mclcbf_diag.interventions import MCLCBF
from mclcbf_diag.models import load_model

WRONG = 71  # adversarial: "Is there a bowl in the image?", label no, answered yes


@pytest.fixture(scope="module")
def wrong():
    q, image = _question(WRONG)
    assert q.label == "no"
    return q, image


@pytest.fixture(scope="module")
def working(embedded_model, wrong):
    """The first configuration of a small scan (τ, then α) that fixes the wrong answer with a valid Yes/No."""
    q, image = wrong
    base = dataclasses.replace(B.get_preset("seed-exp6"), span="detected", grad_dtype="float32", clamp="none")
    for tau, alpha in itertools.product((0.5, 0.2), (0.5, 1.0, 0.25)):
        cfg = dataclasses.replace(base, tau_prefill=tau, alpha_prefill=alpha)
        s = trace_sample(embedded_model, q, image, cfg).summary()
        if s["outcome"] == "fixed" and s["valid_after"]:
            return cfg
    pytest.fail("no configuration of the scan fixes question 71")


class UndoAtSix(UndoDownstream):
    """The working step at layer 3 only, and the damping hook at layer 6."""

    HOOK = 6


PLANTS = {  # name → (planted cause, the change to the working configuration)
    "span shifted onto the text": ("span_mismatch", {"span": "fixed", "fixed_span": (300, 877)}),
    "τ = 0": ("barrier_inactive", {"tau_prefill": 0.0, "tau_decode": 0.0}),
    "τ below h at every steered layer": ("barrier_inactive", {"tau_prefill": 1e-8}),
    "the seed's clamp": ("clamp_limited", {"clamp": "scale"}),
    "a tiny α": ("step_negligible", {"alpha_prefill": 1e-7}),
    "a huge α": ("linearisation_failed", {"alpha_prefill": 1e6}),
    "decode only": ("decode_only", {"tau_prefill": 0.0, "tau_decode": 0.5, "alpha_decode": 0.5}),  # as the prefill was
    "a barrier that reaches τ where attention does not decide": (
        "barrier_not_decisive", {"site": "attn_logits", "layers": (1,)}),
}


def _check(causes, planted):
    assert causes and causes[0].id == planted, [(c.id, c.status) for c in causes]
    top = causes[0]
    if top.status == "untestable here":
        assert top.untestable and top.run is None and top.test == f"untestable here: {top.untestable}"
    else:
        assert top.decisive and top.run is not None and top.run.finite, (top.status, top.test)
        assert top.run.change in top.test
    assert all(c.run is not None for c in causes if c.decisive)  # nothing decisive without its run


def test_the_working_configuration_fixes_the_answer_and_shows_no_planted_cause(embedded_model, wrong, working):
    causes, result = _tested(embedded_model, wrong, working)
    assert result.summary()["outcome"] == "fixed"
    found = {c.id for c in causes}
    assert not found & {planted for planted, _ in PLANTS.values()} - {"linearisation_failed"}
    assert "gradient_underflow" not in found and "damped_downstream" not in found


@pytest.mark.parametrize("name", list(PLANTS))
def test_a_planted_cause_on_a_wrong_answer_ranks_first(embedded_model, wrong, working, name):
    planted, change = PLANTS[name]
    causes, result = _tested(embedded_model, wrong, dataclasses.replace(working, **change))
    assert result.summary()["outcome"] != "fixed"  # the plant alone stops the fix (the control fixes it)
    _check(causes, planted)


def test_a_damping_hook_on_a_wrong_answer_is_decisive(embedded_model, wrong, working):
    causes, result = _tested(embedded_model, wrong, UndoAtSix(dataclasses.replace(working, layers=(3,))))
    assert result.summary()["outcome"] == "unchanged"
    _check(causes, "damped_downstream")
    assert causes[0].run.outcome == "fixed"  # without the hook the step fixes it: the hook is what stopped it
    # the step alone (no hook) is the control
    control, result = _tested(embedded_model, wrong, MCLCBF(dataclasses.replace(working, layers=(3,))))
    assert result.summary()["outcome"] == "fixed" and "damped_downstream" not in {c.id for c in control}


def test_an_fp16_gradient_that_underflows_on_a_wrong_answer(wrong, working):
    # float16 Σg² underflows at the steered layers (Σg² ≈ 1e-8 … 1e-15 in float32), the scale becomes
    # (τ − h)/guard and the fp16 step overflows and is dropped: the outcome is non_finite, and a float32
    # gradient alone fixes the answer
    lm = load_model()
    lm.model.half()
    control, result = _tested(lm, wrong, working)  # the working configuration computes ∇h in float32
    assert result.summary()["outcome"] == "fixed" and "gradient_underflow" not in {c.id for c in control}
    causes, result = _tested(lm, wrong, dataclasses.replace(working, grad_dtype="model"))
    assert result.summary()["outcome"] == "non_finite"
    _check(causes, "gradient_underflow")
    assert causes[0].run.outcome == "fixed" and causes[0].run.change == "grad_dtype = float32"
    # the guard's own undoing overflows too: a non-finite run, no effect read from it (not "decisive")
    guard = next(c for c in causes if c.id == "guard_dominates")
    assert guard.decisive is None and not guard.run.finite


def _in(dtype: str):
    lm = load_model()
    lm.model.to(getattr(torch, dtype))  # float16 too: load_model refuses it on a CPU, the model computes in it
    return lm


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_step_rounded_away_that_would_not_have_mattered(wrong, working, dtype):
    # α = 1e-6: the step is ~1e-5 of ‖x‖, under the dtype's spacing of x's entries, so x + αθ* rounds back to x.
    # The rounding test reruns the same weights and pixels in float32, where the step survives and still
    # changes nothing: the rounding is present, tested, not decisive. The step is negligible, and a larger
    # one (its size search) fixes the answer: that decisive cause, with its run, ranks first.
    lm = _in(dtype)
    control, result = _tested(lm, wrong, working)
    assert result.summary()["outcome"] == "fixed" and "rounding_absorbed" not in {c.id for c in control}
    causes, result = _tested(lm, wrong, dataclasses.replace(working, alpha_prefill=1e-6))
    assert result.summary()["outcome"] == "unchanged"
    by = {c.id: c for c in causes}
    rounding = by["rounding_absorbed"]
    assert rounding.decisive is False and rounding.run is not None and rounding.run.outcome == "unchanged"
    assert "float32" in rounding.run.change and rounding.run.finite
    _check(causes, "step_negligible")
    assert causes[0].run.outcome == "fixed"


def test_the_rounding_test_on_a_float32_model_is_untestable(embedded_model, wrong, working):
    # nothing is wider than float32: asked directly, the tester says so instead of running anything
    q, image = wrong
    iv = MCLCBF(working)
    tester = cause_tester(embedded_model, q, image, iv)
    wide = Counterfactual(why="float32", dtype="float32", goal_only=True)
    assert "already computes in float32" in tester(wide)["untestable"]

"""Planted single causes are ranked first; dose-response, fixes and chain behave as stated.

Each planted configuration starts from a healthy one (detected span, float32 gradient, no
clamp, τ high enough that the barrier fires) and breaks exactly one thing, from its physics;
the planted cause must rank first and be decisive (its own counterfactual changes the step,
the image mass, the margin or the outcome). Controls show
the same feature present but not decisive.
"""

import dataclasses
from pathlib import Path

import pandas as pd
import pytest

from mclcbf_diag import barrier as B
from mclcbf_diag.data import load_image, load_pope, resolve_image
from mclcbf_diag.diagnosis.counterfactual import Counterfactual
from mclcbf_diag.diagnosis.diagnose import diagnose
from mclcbf_diag.engine.runner import forward
from mclcbf_diag.experiments.evidence import KNOCKOUTS
from mclcbf_diag.experiments.explain import (
    cause_chain,
    cause_tester,
    counterfactuals,
    dose_response,
    explain_sample,
)
from mclcbf_diag.experiments.trace import sample_inputs, trace_sample
from mclcbf_diag.interventions import MCLCBF, as_intervention
from mclcbf_diag.measurements.measure import run_records
from mclcbf_diag.models import load_model

POPE = Path(__file__).resolve().parents[1] / "mclcbf_diag" / "embedded" / "pope"
PLANTED_ON = 25  # adversarial: "Is there a truck …?" label no; the embedded model answers no (right)

HEALTHY = dataclasses.replace(B.get_preset("seed-exp6"), span="detected", grad_dtype="float32",
                              clamp="none", tau_prefill=0.99,
                              guard=1e-20)  # Σg² ≥ 3e-15 here: the gradient sets the scale


@pytest.fixture(scope="module")
def sample():
    q = load_pope(POPE / "embedded_pope_adversarial.json")[PLANTED_ON]
    return q, load_image(resolve_image(q, POPE / "images"))


def _question(index):
    q = load_pope(POPE / "embedded_pope_adversarial.json")[index]
    return q, load_image(resolve_image(q, POPE / "images"))


@pytest.fixture(scope="module")
def derailing():
    """Adversarial 63: label no, answered yes; the healthy configuration (no clamp, τ 0.99) derails it, and no
    single fix of the seed's settings fixes it."""
    return _question(63)


@pytest.fixture(scope="module")
def bf16_model():
    return load_model(dtype="bfloat16")


def _detected(lm, sample, config):
    q, image = sample
    result = trace_sample(lm, q, image, config)
    return [c.id for c in diagnose(result.records) if c.detected], result


def _tested(lm, sample, config):
    """Trace, then diagnose with every detected cause's counterfactual run (compared with the unfixed run)."""
    q, image = sample
    iv = as_intervention(config)
    result = trace_sample(lm, q, image, iv)
    tester = cause_tester(lm, q, image, iv)
    causes = [c for c in diagnose(result.records, intervention=iv, tester=tester) if c.detected]
    return causes, result


def test_healthy_configuration_crosses_the_margin_but_derails(embedded_model, derailing):
    # Yes − No changes sign, but the top token is neither Yes nor No: a derailment, not a fix
    ids, result = _detected(embedded_model, derailing, HEALTHY)
    s = result.summary()
    assert s["margin_before"] > 0 > s["margin_after"] and s["outcome"] == "derailed"
    assert s["top_after"] not in ("Yes", "No") and not s["valid_after"]
    assert ids[0] == "output_derailed"
    assert not {"span_mismatch", "barrier_inactive", "clamp_limited", "margin_unmoved"} & set(ids)


class UndoDownstream(MCLCBF):
    """MC-LCBF at its configured layers, and a hook at layer ``HOOK`` that puts the decision token back where the
    baseline had it (a planted damping). The baseline's state is kept on the class, so the variants a
    counterfactual builds (``replace``) restore the same state."""

    HOOK = 3
    saved = None

    def layers(self, n_layers):
        return (*super().layers(n_layers), self.HOOK)

    def residual(self, site):
        if site.layer != self.HOOK:
            return super().residual(site)
        for row in site.rows:
            x = site.tensor[row.index, site.query_index(row, [row.decision])]
            if not site.steer:
                type(self).saved = x.detach().clone()
            else:
                site.add(row, [row.decision], type(self).saved - x)

    def counterfactual(self, cause):
        if cause.id == "damped_downstream":  # undo just the hook
            return Counterfactual(why=f"without the hook at layer {self.HOOK}", intervention=MCLCBF(self.knobs))
        return None


PLANTED = {  # cause → the physics that plants it, from the healthy configuration
    "span_mismatch": {"span": "fixed"},  # the seed's literal span, shifted against the image
    "barrier_inactive": {"tau_prefill": 1e-8},  # τ just below h at every steered layer (h ≥ 1.8e-8)
    "clamp_limited": {"clamp": "scale"},  # the seed's 0.5 cap on the scale
    "guard_dominates": {"guard": 0.1},  # Σg² ≈ 3e-5 … 3e-15 ≪ guard: (τ − h)/guard sets the scale
    "step_negligible": {"alpha_prefill": 1e-7},  # a tiny α: ‖θ*‖/‖x‖ reaches 5e3 here, α·‖θ*‖/‖x‖ ≤ 5e-4
    "linearisation_failed": {"alpha_prefill": 300.0, "layers": (1,)},  # a huge α: far outside the first order
    "decode_only": {"tau_prefill": 0.0, "tau_decode": 0.99},  # only generated tokens are steered
}


@pytest.mark.parametrize("planted", sorted(PLANTED))
def test_planted_cause_ranks_first_and_is_decisive(embedded_model, sample, planted):
    causes, result = _tested(embedded_model, sample, dataclasses.replace(HEALTHY, **PLANTED[planted]))
    assert causes and causes[0].id == planted, [(c.id, c.status) for c in causes]
    assert causes[0].decisive and causes[0].run is not None, causes[0].test
    # each run undoes it alone (a negligible step's test is a search over the step's size, smallest first)
    assert causes[0].test.startswith("undoing it alone")
    assert causes[0].run.change in causes[0].test and causes[0].run.finite


def test_a_hook_that_removes_the_deviation_downstream_is_damping(embedded_model, sample):
    iv = UndoDownstream(dataclasses.replace(HEALTHY, layers=(1,)))
    causes, result = _tested(embedded_model, sample, iv)
    assert causes[0].id == "damped_downstream" and causes[0].decisive, [(c.id, c.status) for c in causes]
    assert result.summary()["outcome"] == "unchanged"
    assert causes[0].evidence["carried_per_unit"] < 1e-3


def test_explain_localises_a_damped_change_where_the_hook_removes_it(embedded_model, sample):
    # the planted damping: the step at layer 1 is put back to the baseline by the hook at layer 3. Patching the
    # intervened run's decision-token residual into the baseline (the localisation) finds the change carried
    # entering layers 1 and 2 and none of it from layer 3 on; explain cites that in the damping cause
    q, image = sample
    iv = UndoDownstream(dataclasses.replace(HEALTHY, layers=(1,)))
    ex = explain_sample(embedded_model, q, image, iv, k_max=2, bisect_steps=1, sweep=False)
    damped = next(c for c in ex.causes if c.id == "damped_downstream")
    carried = {e.layer: e.effect for e in ex.localisation.decision if e.direction == "denoise"}
    floor = ex.localisation.threshold
    assert abs(carried[1]) > 100 * floor and abs(carried[2]) > 100 * floor
    assert all(abs(carried[layer]) <= floor for layer in carried if layer >= UndoDownstream.HOOK)
    assert f"from layer {UndoDownstream.HOOK} on" in damped.sentence and "Localised by patching" in damped.sentence
    assert {"local_resid_decision", "restore_resid_decision"} <= set(ex.records.metric)
    # no cause asks for it on a plain MC-LCBF run that is not damped: nothing is localised
    plain = explain_sample(embedded_model, q, image, HEALTHY, k_max=2, bisect_steps=1, sweep=False)
    assert not any(c.id == "damped_downstream" and c.detected for c in plain.causes) and plain.localisation is None


def test_controls_present_but_not_decisive(embedded_model, sample):
    # the seed's clamp binds, so neither the guard (Σg² ≪ 1e-6 at layer 3) nor anything upstream of the clamp
    # decides the step: the guard is present, not decisive
    causes, _ = _tested(embedded_model, sample, dataclasses.replace(HEALTHY, clamp="scale", guard=1e-6))
    by = {c.id: c for c in causes}
    assert by["guard_dominates"].decisive is False and by["clamp_limited"].decisive
    # the seed on this question: h ≈ 1 under the fixed span and τ = 0.2 under the detected one at layer 1 …
    causes, result = _tested(embedded_model, sample, B.get_preset("seed-exp6"))
    by = {c.id: c for c in causes}
    assert by["span_mismatch"].status == "present, not decisive"
    assert result.summary()["outcome"] == "unchanged"


def test_knockouts_edit_only_what_they_say(embedded_model, sample):
    q, image = sample
    _, inputs = sample_inputs(embedded_model, q.text, image)
    r = pd.concat([run_records(embedded_model, forward(embedded_model, inputs, ko).captures[0],
                               question_id=q.question_id, condition=name) for name, ko in KNOCKOUTS.items()])
    mass = r.query("metric == 'attn_image_mass' and head == -1 and phase == 'prefill'")
    assert mass[mass.condition == "knockout:decision"].value.abs().max() < 1e-6
    assert mass[mass.condition == "knockout:after_image"].value.abs().max() < 1e-6
    margins = r.query("metric == 'final_margin' and layer == -1").set_index("condition").value
    assert set(margins.index) == {"knockout:decision", "knockout:after_image", "double:decision",
                                  "double:after_image"}


@pytest.fixture(scope="module")
def fixable():
    q = load_pope(POPE / "embedded_pope_adversarial.json")[75]  # label no, answered yes
    return q, load_image(resolve_image(q, POPE / "images"))


LOGITS_06 = B.apply_overrides(B.get_preset("fixed"), ["tau=0.6"])


def test_dose_response_finds_the_smallest_fixing_multiplier(embedded_model, fixable):
    q, image = fixable
    dose = dose_response(embedded_model, q, image, LOGITS_06, k_max=64, bisect_steps=5)
    assert dose.kind == "wrong" and dose.goal == ("fixed",)
    assert dose.k_star is not None
    curve = dose.curve.set_index("k")
    assert curve.loc[dose.k_star, "outcome"] == "fixed" and curve.loc[dose.k_star, "valid"]
    assert (curve[curve.index < dose.k_star].outcome != "fixed").all()  # nothing smaller on the grid fixed it
    assert "fixed" in dose.sentence()


def test_dose_response_does_not_count_a_derailment_as_a_fix(embedded_model):
    q, image = _question(49)  # label no, answered yes
    config = dataclasses.replace(HEALTHY, clamp="scale")  # θ* tiny: a multiplier first derails the output
    first = trace_sample(embedded_model, q, image, config).summary()
    assert first["answer_before"] != q.label
    dose = dose_response(embedded_model, q, image, config, k_max=1024, bisect_steps=2)
    assert dose.k_star is None and dose.k_derail is not None
    assert (dose.curve.outcome != "fixed").all() and "derails" in dose.sentence()


def test_counterfactuals_against_baseline_and_unfixed_run(embedded_model, derailing):
    q, image = derailing
    seed = dataclasses.replace(B.get_preset("seed-exp6"), tau_prefill=0.99)
    fixes = counterfactuals(embedded_model, q, image, seed)
    assert list(fixes.fix) == ["grad_dtype", "guard", "clamp", "span", "site", "tokens", "all"]
    by = fixes.set_index("fix")
    assert by.loc["grad_dtype", "applicable"].startswith("not applicable")  # fp32 model
    assert "grad_dtype" not in by.loc["all", "change"]
    assert all(str(v).startswith("Δm") or v == "same run" for v in fixes.vs_unfixed)
    assert (fixes.counts == ((fixes.outcome == "fixed") & fixes.valid)).all()
    chain = cause_chain(embedded_model, q, image, seed)
    # tested: the seed's clamp decides the step first (undoing it alone changes the outcome: it derails),
    # then the span; each link applies the next untried fix of a decisive cause
    assert list(chain.top_cause[:2]) == ["clamp_limited", "span_mismatch"]
    assert list(chain.next_fix[:2]) == ["clamp", "span"] and chain.config.iloc[1] == "clamp=none"
    assert len(chain) >= 3 and chain.outcome.iloc[1] == "derailed"


def test_right_answers_are_never_given_a_fix_that_breaks_them(embedded_model):
    q, image = _question(0)  # label yes, answered yes
    config = B.apply_overrides(B.get_preset("seed-exp6"), ["span=detected", "tau=0.99", "clamp=none"])
    first = trace_sample(embedded_model, q, image, config)
    assert first.summary()["outcome"] == "derailed"  # an object word on top, not a flip
    assert first.summary()["top_after"] not in ("Yes", "No")
    fixes = counterfactuals(embedded_model, q, image, config)
    assert not fixes.counts.any()
    chain = cause_chain(embedded_model, q, image, config)
    assert len(chain) == 1 and "nothing to fix" in chain.top_cause.iloc[0]
    dose = dose_response(embedded_model, q, image, config, k_max=4, bisect_steps=3)
    assert dose.kind == "right" and dose.goal == ("broken", "derailed") and dose.k_star is not None


def test_per_layer_doses_steer_one_layer_at_a_time(embedded_model, fixable):
    from mclcbf_diag.experiments.explain import per_layer_doses

    q, image = fixable
    table = per_layer_doses(embedded_model, q, image, LOGITS_06, k_max=64, bisect_steps=3)
    assert list(table.layer) == list(B.steered_layers(LOGITS_06, embedded_model.n_layers))
    found = table.dropna(subset=["k_star"])
    assert len(found) >= 1
    assert (found.outcome == "fixed").all()


@pytest.fixture(scope="module")
def fp16_model():
    """The embedded model in float16, as LLaVA-1.5-7B runs on a GPU.

    ``load_model`` refuses fp16 on a CPU for users (slow); the arithmetic is what matters here.
    """
    lm = load_model()
    lm.model.half()
    return lm


def test_gradient_underflow_in_fp16_is_present_but_not_decisive(fp16_model, sample):
    # In float16, a Σg² below fp16's smallest subnormal (6e-8) rounds to 0: scale = (τ − h)/(0 + guard).
    # In float32 Σg² ≈ 3e-15 … 3e-5 on this sample's steered layers, and the seed's
    # clamp binds either way: the underflow cannot change the step; the clamp does.
    config = dataclasses.replace(HEALTHY, grad_dtype="model", clamp="scale")
    causes, result = _tested(fp16_model, sample, config)
    by = {c.id: c for c in causes}
    r = result.records.query("condition == 'steered' and head == -1")
    sq = r[r.metric == "grad_norm_sq_dtype"].set_index("layer").value
    g32 = r[r.metric == "grad_norm_f32"].set_index("layer").value
    assert ((sq == 0) & (g32 > 0)).any()  # underflowed in fp16 although float32 sees a gradient
    assert by["gradient_underflow"].decisive is False, by["gradient_underflow"].test
    # without the clamp the fp16 model overflows: a non-finite run shows no effect, so the clamp is not
    # called decisive on it (its margin once read "unchanged → derailed" here)
    clamp = by["clamp_limited"]
    assert clamp.decisive is None and "non-finite" in clamp.test and not clamp.run.finite
    # what changes the answer is a larger step: the size search finds one, and its run is shown
    assert causes[0].id == "step_negligible" and causes[0].decisive and causes[0].run.step_size > 1


def test_rounding_absorption_planted_through_the_dtype_is_tested_in_float32(bf16_model, sample):
    # Σg² is tiny here, so HEALTHY's guard (1e-20) makes ‖θ*‖/‖x‖ large (≫ 1) at the fired layers: α must be
    # small enough that α·‖θ*‖/‖x‖ stays well under bfloat16's relative spacing (2⁻⁸) for x + αθ* to round
    # back to x. A larger guard would instead make the guard the first cause.
    causes, _ = _tested(bf16_model, sample, dataclasses.replace(HEALTHY, alpha_prefill=1e-7))
    by = {c.id: c for c in causes}
    # rounding is measured (survival ≪ 50%) and tested on a float32 copy of the model, where the unrounded
    # step still changes nothing: not decisive, with that run shown (it once marked itself decisive with no
    # run behind it, then "untestable here")
    rounding = by["rounding_absorbed"]
    assert rounding.decisive is False and "float32" in rounding.run.change and rounding.run.outcome == "unchanged"
    # the step is also 4e-5 of ‖x‖: a larger one changes the answer, and that run is shown
    assert causes[0].id == "step_negligible" and causes[0].decisive and causes[0].run is not None


@pytest.mark.parametrize("change, expect", [
    ({"tau_prefill": 0.0, "tau_decode": 0.0}, "inactive"),
    ({"tau_prefill": 1.0, "tau_decode": 1.0}, "fires"),
    ({"alpha_prefill": 0.0}, "zero step"),
    ({"site": "attn_logits", "tau_prefill": 1.0}, "fires"),
    ({"site": "attn_logits", "tau_prefill": 0.0}, "inactive"),
])
def test_edge_values_have_defined_behaviour(embedded_model, sample, change, expect):
    q, image = sample
    result = trace_sample(embedded_model, q, image, dataclasses.replace(HEALTHY, **change))
    s = result.summary()
    if expect == "inactive":
        assert s["layers_fired"] == [] and s["outcome"] == "unchanged"
    elif expect == "zero step":
        assert s["margin_after"] == s["margin_before"]
    else:
        assert s["layers_fired"]
    assert diagnose(result.records)  # never raises


def test_overflow_is_the_non_finite_cause_not_a_flip(embedded_model, sample):
    q, image = sample
    result = trace_sample(embedded_model, q, image, dataclasses.replace(HEALTHY, alpha_prefill=1e30))
    s = result.summary()
    assert s["outcome"] == "derailed"
    causes = [c for c in diagnose(result.records) if c.detected]
    assert causes[0].id == "non_finite" and causes[0].status == "observed"  # read off the run: never "decisive"


@pytest.mark.parametrize("index, mass_fixes", [(69, True), (63, False)])
def test_explain_sample_end_to_end(embedded_model, index, mass_fixes):
    # 69 (label no, answered yes): a decision-token image mass fixes it; 63 (the same kind of wrong
    # answer): no decision-token mass does, so the off-path cause is detected
    q, image = _question(index)
    ex = explain_sample(embedded_model, q, image, B.get_preset("seed-exp6"), k_max=8, bisect_steps=2)
    found = {c.id: c for c in ex.causes if c.detected}
    assert {"span_mismatch", "margin_unmoved"} <= set(found)
    assert found["span_mismatch"].status == "present, not decisive"
    assert {"baseline", "steered", "knockout:decision", "sweep:decision"} <= set(ex.records.condition)
    off = next(c for c in ex.causes if c.id == "decision_token_off_path")
    dec = ex.sweep[(ex.sweep.tokens == "decision") & (ex.sweep.outcome == "fixed") & ex.sweep.valid]
    assert bool(len(dec)) == mass_fixes and off.detected == (not mass_fixes)
    if mass_fixes:
        assert f"smallest target mass {dec[dec.edit == 'target'].value.min():g}" in ex.sweep_text
    assert ex.fixes.set_index("fix").loc["grad_dtype", "applicable"].startswith("not applicable")
    assert not ex.fixes.counts.any() and ex.dose.kind == "wrong"

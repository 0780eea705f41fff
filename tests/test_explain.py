"""Planted single causes are ranked first; dose-response, fixes and chain behave as stated.

Each planted configuration starts from a healthy one (detected span, float32 gradient, no
clamp, τ high enough that the barrier fires: it flips this sample) and breaks exactly one
thing.
"""

import dataclasses
from pathlib import Path

import pytest

from mclcbf_diag import barrier as B
from mclcbf_diag.diagnose import diagnose
from mclcbf_diag.data import load_image, load_pope, resolve_image
from mclcbf_diag.explain import cause_chain, counterfactuals, dose_response, explain_sample, knockouts
from mclcbf_diag.models import load_model
from mclcbf_diag.trace import sample_inputs, trace_sample

POPE = Path(__file__).resolve().parents[1] / "mclcbf_diag" / "zoo" / "pope"
HALLUCINATION = 25  # adversarial: "Is there a truck …?" label no, the model says yes

HEALTHY = dataclasses.replace(B.get_preset("seed-exp6"), span="detected", grad_dtype="float32",
                              clamp="none", tau_prefill=0.99)


@pytest.fixture(scope="module")
def sample():
    q = load_pope(POPE / "zoo_pope_adversarial.json")[HALLUCINATION]
    return q, load_image(resolve_image(q, POPE / "images"))


@pytest.fixture(scope="module")
def bf16_model():
    return load_model(dtype="bfloat16")


def _detected(lm, sample, config):
    q, image = sample
    result = trace_sample(lm, q, image, config)
    return [c.id for c in diagnose(result.records) if c.detected], result


def test_healthy_configuration_flips_and_detects_nothing_upstream(embedded_model, sample):
    ids, result = _detected(embedded_model, sample, HEALTHY)
    assert result.summary()["flipped"]
    assert ids == []


@pytest.mark.parametrize("planted, change", [
    ("span_mismatch", {"span": "fixed"}),
    ("clamp_limited", {"clamp": "scale"}),
    ("barrier_inactive", {"tau_prefill": 0.0}),
])
def test_planted_cause_ranks_first(embedded_model, sample, planted, change):
    ids, result = _detected(embedded_model, sample, dataclasses.replace(HEALTHY, **change))
    assert ids and ids[0] == planted
    assert not result.summary()["flipped"]


def test_rounding_absorption_planted_through_the_dtype(bf16_model, sample):
    # In bfloat16 a step of ~1e-5 of ‖x‖ per component is below half an ulp: rounded away.
    ids, result = _detected(bf16_model, sample, dataclasses.replace(HEALTHY, alpha_prefill=1e-5))
    assert ids[0] == "rounding_absorbed"
    survival = result.records.query("condition == 'steered' and metric == 'rounding_survival'").value
    assert survival.median() < 0.5


def test_knockouts_edit_only_what_they_say(embedded_model, sample):
    q, image = sample
    _, inputs = sample_inputs(embedded_model, q.text, image)
    r = knockouts(embedded_model, inputs, sample=q.question_id)
    mass = r.query("metric == 'attn_image_mass' and head == -1 and phase == 'prefill'")
    assert mass[mass.condition == "knockout:decision"].value.abs().max() < 1e-6
    assert mass[mass.condition == "knockout:after_image"].value.abs().max() < 1e-6
    margins = r.query("metric == 'final_margin'").set_index("condition").value
    assert set(margins.index) == {"knockout:decision", "knockout:after_image", "double:decision",
                                  "double:after_image"}


def test_dose_response_brackets_the_first_flip(embedded_model, sample):
    q, image = sample
    _, inputs = sample_inputs(embedded_model, q.text, image)
    config = dataclasses.replace(HEALTHY, clamp="scale")  # θ* tiny: needs a multiplier
    base = trace_sample(embedded_model, q, image, config).summary()["margin_before"]
    dose = dose_response(embedded_model, inputs, config, base, k_max=4096, bisect_steps=6)
    assert dose.k_star is not None and dose.k_star > 1
    curve = dose.curve.set_index("k")
    assert (curve.loc[dose.k_star, "margin"] > 0) != (base > 0)
    below = curve[curve.index < dose.k_star]
    assert ((below.margin > 0) == (base > 0)).all()  # nothing smaller on the grid flipped
    assert dose.at_k_star["theta_rel_max"] > 0


def test_counterfactuals_and_chain(embedded_model, sample):
    q, image = sample
    seed = dataclasses.replace(B.get_preset("seed-exp6"), tau_prefill=0.99)
    _, inputs = sample_inputs(embedded_model, q.text, image)
    first = trace_sample(embedded_model, q, image, seed)
    fixes = counterfactuals(embedded_model, inputs, seed, first.summary()["margin_before"])
    assert list(fixes.fix) == ["grad_dtype", "clamp", "span", "site", "tokens", "all"]
    chain = cause_chain(embedded_model, q, image, seed, first)
    assert chain.top_cause.iloc[0] == "span_mismatch"  # the seed's span hides everything else
    assert chain.next_fix.iloc[0] == "span"
    assert len(chain) >= 2


def test_explain_sample_end_to_end(embedded_model, sample):
    q, image = sample
    ex = explain_sample(embedded_model, q, image, B.get_preset("seed-exp6"), k_max=8, bisect_steps=2)
    assert ex.causes[0].id == "span_mismatch" and ex.causes[0].detected
    assert {"baseline", "steered", "knockout:decision"} <= set(ex.records.condition)


def test_per_layer_doses_steer_one_layer_at_a_time(embedded_model, sample):
    from mclcbf_diag.explain import per_layer_doses

    q, image = sample
    _, inputs = sample_inputs(embedded_model, q.text, image)
    base = trace_sample(embedded_model, q, image, HEALTHY).summary()["margin_before"]
    table = per_layer_doses(embedded_model, inputs, HEALTHY, base, k_max=64, bisect_steps=3)
    assert list(table.layer) == list(B.steered_layers(HEALTHY, embedded_model.n_layers))
    found = table.dropna(subset=["k_star"])
    assert len(found) >= 1
    assert ((found.margin > 0) != (base > 0)).all()


@pytest.fixture(scope="module")
def fp16_model():
    """The embedded model in float16, as LLaVA-1.5-7B runs on a GPU.

    ``load_model`` refuses fp16 on a CPU for users (slow); the arithmetic is what matters here.
    """
    lm = load_model()
    lm.model.half()
    return lm


def test_gradient_underflow_planted_through_fp16(fp16_model, sample):
    # In float16, Σg² of a gradient with ‖g‖ ≈ 3e-4 is ≈ 7e-8, below fp16's smallest subnormal
    # (6e-8 rounds to 0): scale = (τ − h)/(0 + 1e-6) overflows and the seed's clamp takes over.
    config = dataclasses.replace(HEALTHY, grad_dtype="model", clamp="scale")
    ids, result = _detected(fp16_model, sample, config)
    assert ids[0] == "gradient_underflow"
    r = result.records.query("condition == 'steered' and head == -1")
    sq = r[r.metric == "grad_norm_sq_dtype"].set_index("layer").value
    g32 = r[r.metric == "grad_norm_f32"].set_index("layer").value
    assert ((sq == 0) & (g32 > 0)).any()  # underflowed in fp16 although float32 sees a gradient

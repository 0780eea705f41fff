"""Every metric a run emits is documented, for every intervention the package ships."""

from pathlib import Path

import pytest

from mclcbf_diag import barrier as B
from mclcbf_diag.data import load_image, load_pope, resolve_image
from mclcbf_diag.experiments.trace import trace_sample
from mclcbf_diag.interventions import AttentionKnockout, KnockoutKnobs
from mclcbf_diag.measurements.records import COLUMNS, documented, frame, glossary

POPE = Path(__file__).resolve().parents[1] / "mclcbf_diag" / "embedded" / "pope"
CASES = {
    "mclcbf seed": B.MCLCBF(B.get_preset("seed-exp6")),
    "mclcbf resid_pre firing": B.MCLCBF(B.apply_overrides(B.get_preset("seed-exp6"), ["span=detected", "tau=0.99"])),
    "mclcbf ln1_out": B.MCLCBF(B.apply_overrides(B.get_preset("seed-exp6"), ["span=detected", "site=ln1_out"])),
    "mclcbf attn_logits": B.MCLCBF(B.apply_overrides(B.get_preset("fixed"), ["tau=0.6"])),
    "knockout": AttentionKnockout(KnockoutKnobs(0.0, tokens="after_image")),
    "mclcbf overflow": B.MCLCBF(B.apply_overrides(B.get_preset("seed-exp6"), ["span=detected", "tau=0.99",
                                                                             "clamp=none", "alpha=1e30"])),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_emitted_metric_is_documented(embedded_model, case):
    q = load_pope(POPE / "embedded_pope_adversarial.json")[3]
    iv = CASES[case]
    result = trace_sample(embedded_model, q, load_image(resolve_image(q, POPE / "images")), iv, max_new_tokens=2)
    missing = sorted({m for m in result.records.metric.unique() if not documented(m, iv)})
    assert not missing, f"undocumented metrics: {missing}"


def test_every_metric_of_a_bfloat16_run_is_documented():
    """A low-precision model adds the controller's own h (barrier_h_dtype) next to the float32 figures."""
    from mclcbf_diag.models import load_model

    q = load_pope(POPE / "embedded_pope_adversarial.json")[3]
    iv = CASES["mclcbf resid_pre firing"]
    r = trace_sample(load_model(dtype="bfloat16"), q, load_image(resolve_image(q, POPE / "images")), iv).records
    assert {"barrier_h_dtype", "dh_recomputed_floor", "dh_realised_floor", "propagation_floor"} <= set(r.metric)
    missing = sorted({m for m in r.metric.unique() if not documented(m, iv)})
    assert not missing, f"undocumented metrics: {missing}"


def test_glossary_patterns():
    assert documented("ln2_gain_radial") and documented("final_logit:Yes")
    assert not documented("ln3_gain_radial") and not documented("made_up")
    assert "barrier_h" not in glossary() and "barrier_h" in glossary(CASES["mclcbf seed"])


def test_frame_has_the_canonical_columns():
    assert COLUMNS == ["question_id", "condition", "phase", "decode_step", "layer", "head", "metric", "value"]
    f = frame({k: [1] for k in COLUMNS})
    assert list(f.columns) == COLUMNS and str(f["layer"].dtype) == "int64" and str(f["decode_step"].dtype) == "int64"


def test_pre_and_post_step_ln1_records_say_what_they_measure(embedded_model):
    q = load_pope(POPE / "embedded_pope_adversarial.json")[25]
    iv = CASES["mclcbf resid_pre firing"]
    r = trace_sample(embedded_model, q, load_image(resolve_image(q, POPE / "images")), iv).records
    r = r[(r.condition == "steered") & (r["head"] == -1) & (r.phase == "prefill")].pivot_table(
        index="layer", columns="metric", values="value")
    fired = r[r.barrier_active > 0].index
    # before the step: the norm of x entering the layer; after it: of the x the layer used
    for layer in fired:
        assert r.loc[layer, "ln1_scale"] * 128 ** 0.5 == pytest.approx(r.loc[layer, "resid_pre_in_norm"], rel=1e-4)
        assert r.loc[layer, "ln1_scale_post"] * 128 ** 0.5 == pytest.approx(r.loc[layer, "resid_pre_norm"], rel=1e-4)
    assert "BEFORE" in glossary()["ln1_scale"] and "AFTER" in glossary()["ln1_scale_post"]

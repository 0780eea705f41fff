"""Captured tensors → records (mclcbf_diag.measure), each metric against an independent reference.

The captures are built by hand (random residuals, softmax rows and logits on a tiny random
LLaVA's weights), so nothing here runs the runner. References use the model's own HF
modules: ``LlamaRMSNorm`` through ``torch.func.jacrev`` for every Jacobian gain, the final
norm and ``lm_head`` for the logit lens, plain sums and softmaxes for masses and answers.
"""

from __future__ import annotations

import math

import pytest
import torch

from mclcbf_diag.measure import row_records, run_records, step_records
from mclcbf_diag.records import METRICS, NO_HEAD, NO_LAYER, documented
from mclcbf_diag.runner import LayerCapture, RunCapture, StepCapture

TOL = 1e-5


@pytest.fixture(scope="module")
def lm(tiny_gqa_model):
    return tiny_gqa_model


def _capture(lm, seed: int, *, n_keys: int = 12, added_at=(1, 3), scale=3.0) -> StepCapture:
    g = torch.Generator().manual_seed(seed)
    d, heads = lm.text_config.hidden_size, lm.text_config.num_attention_heads
    rnd = lambda *s: scale * torch.randn(*s, generator=g)
    cap = StepCapture("prefill", 0, n_keys)
    for i in range(lm.n_layers):
        pre_in = rnd(d)
        added = rnd(d) / scale if i in added_at else None
        cap.layers[i] = LayerCapture(
            resid_pre_in=pre_in, resid_pre=pre_in + (added if added is not None else 0), resid_mid=rnd(d),
            resid_post=rnd(d), attn=torch.softmax(torch.randn(heads, n_keys, generator=g), -1),
            metrics={"rounding_survival": 0.5 + i} if added is not None else {},
            heads={}, added=added)
    cap.final_logits = torch.randn(lm.model.config.text_config.vocab_size, generator=g)
    return cap


def _values(rec: dict, metric: str, head=NO_HEAD) -> dict[int, float]:
    return {layer: v for layer, h, m, v in zip(rec["layer"], rec["head"], rec["metric"], rec["value"])
            if m == metric and h == head}


def _module(lm, i, part):
    layer = lm.model.model.language_model.layers[i]
    return getattr(layer, part)


def _gains(norm: torch.nn.Module, x: torch.Tensor, v: torch.Tensor | None):
    """‖Jv‖/‖v‖, ‖Jᵀv‖/‖v‖, the RMS gain over unit vectors ⊥ x, ‖J x̂‖ from jacrev of the HF module."""
    x = x.detach().float()
    J = torch.func.jacrev(lambda t: norm(t[None])[0])(x).detach()
    xhat = x / x.norm()
    P = torch.eye(x.numel()) - torch.outer(xhat, xhat)
    orth = math.sqrt(float(torch.trace(P @ J.T @ J @ P)) / (x.numel() - 1))
    # along x̂ the Jacobian is γ ⊙ x̂ · ε / r³ (≈ 1e-7 here, below float32 jacrev's cancellation): by hand, float64
    x64, eps = x.double(), norm.variance_epsilon
    r = math.sqrt(float(x64.pow(2).mean()) + eps)
    radial = float((norm.weight.detach().double() * x64 / x64.norm()).norm()) * eps / r**3
    out = {"gain_radial": radial, "gain_orthogonal": orth}
    if v is not None:
        out["gain_theta"] = float((J @ v).norm() / v.norm())
        out["gain_theta_backward"] = float((J.T @ v).norm() / v.norm())
    return out


@pytest.fixture(scope="module")
def measured(lm):
    cap = _capture(lm, 0)
    image = torch.zeros(cap.n_keys, dtype=torch.bool)
    image[2:7] = True
    return cap, image, step_records(lm, cap, image, question_id="s1", condition="intervened")


def test_record_keys_are_the_given_ones(measured):
    _, _, rec = measured
    n = len(rec["value"])
    assert n > 0 and all(len(v) == n for v in rec.values())
    assert set(rec["question_id"]) == {"s1"} and set(rec["condition"]) == {"intervened"}
    assert set(rec["phase"]) == {"prefill"} and set(rec["decode_step"]) == {0}
    assert list(rec) == ["question_id", "condition", "phase", "decode_step", "layer", "head", "metric", "value"]


def test_residual_norms(lm, measured):
    cap, _, rec = measured
    for site in ("resid_pre_in", "resid_pre", "resid_mid", "resid_post"):
        got = _values(rec, f"{site}_norm")
        for i, c in cap.layers.items():
            assert got[i] == pytest.approx(float(torch.linalg.vector_norm(getattr(c, site))), rel=1e-6)
    added = _values(rec, "added_norm")
    assert set(added) == {1, 3}
    for i in added:
        assert added[i] == pytest.approx(float(cap.layers[i].added.norm()), rel=1e-6)


@pytest.mark.parametrize("name, part, site", [("ln1", "input_layernorm", "resid_pre_in"),
                                              ("ln2", "post_attention_layernorm", "resid_mid"),
                                              ("ln_final", None, "resid_post")])
def test_norm_scales_and_jacobian_gains_equal_jacrev_of_the_hf_norm(lm, measured, name, part, site):
    cap, _, rec = measured
    for i, c in cap.layers.items():
        norm = lm.model.model.language_model.norm if part is None else _module(lm, i, part)
        x = getattr(c, site)
        ref = _gains(norm, x, c.added)
        eps = norm.variance_epsilon
        assert _values(rec, f"{name}_scale")[i] == pytest.approx(math.sqrt(float(x.pow(2).mean()) + eps), rel=1e-6)
        # the radial gain is ε/r² small: recorded to float32 resolution against the typical (orthogonal) gain
        assert _values(rec, f"{name}_gain_radial")[i] == pytest.approx(ref["gain_radial"],
                                                                       abs=1e-6 * ref["gain_orthogonal"])
        assert _values(rec, f"{name}_gain_orthogonal")[i] == pytest.approx(ref["gain_orthogonal"], rel=1e-5)
        along, back = _values(rec, f"{name}_gain_theta")[i], _values(rec, f"{name}_gain_theta_backward")[i]
        if c.added is None:
            assert math.isnan(along) and math.isnan(back)
        else:
            assert along == pytest.approx(ref["gain_theta"], rel=1e-5)
            assert back == pytest.approx(ref["gain_theta_backward"], rel=1e-5)


def test_ln1_outputs_before_and_after_the_step(lm, measured):
    cap, _, rec = measured
    for i, c in cap.layers.items():
        norm = _module(lm, i, "input_layernorm")
        with torch.no_grad():
            before, after = norm(c.resid_pre_in[None])[0], norm(c.resid_pre[None])[0]
        assert _values(rec, "ln1_out_norm")[i] == pytest.approx(float(before.norm()), rel=1e-5)
        assert _values(rec, "ln1_out_norm_post")[i] == pytest.approx(float(after.norm()), rel=1e-5)
        rms = math.sqrt(float(c.resid_pre.pow(2).mean()) + norm.variance_epsilon)
        assert _values(rec, "ln1_scale_post")[i] == pytest.approx(rms, rel=1e-6)


def test_attention_masses_split_image_sink_and_text(lm, measured):
    cap, _, rec = measured
    heads = lm.text_config.num_attention_heads
    for i, c in cap.layers.items():
        for h in range(heads):
            row = c.attn[h]
            assert _values(rec, "attn_image_mass", h)[i] == pytest.approx(float(row[2:7].sum()), abs=1e-6)
            assert _values(rec, "attn_sink_mass", h)[i] == pytest.approx(float(row[0]), abs=1e-6)
            text = float(row[1]) + float(row[7:].sum())
            assert _values(rec, "attn_text_mass", h)[i] == pytest.approx(text, abs=1e-6)
        mean = float(c.attn[:, 2:7].sum(-1).mean())
        assert _values(rec, "attn_image_mass")[i] == pytest.approx(mean, abs=1e-6)  # head −1: the head mean


def test_logit_lens_through_the_hf_final_norm_and_lm_head(lm, measured):
    cap, _, rec = measured
    yes, no = lm.tokens.yes_id, lm.tokens.no_id
    got = _values(rec, "logit_lens_margin")
    for i, c in cap.layers.items():
        with torch.no_grad():
            logits = lm.model.lm_head(lm.model.model.language_model.norm(c.resid_post[None]))[0]
        assert got[i] == pytest.approx(float(logits[yes] - logits[no]), abs=1e-4)


def test_final_answer_reading(lm, measured):
    cap, _, rec = measured
    logits, tok = cap.final_logits, lm.tokens
    at = lambda m: _values(rec, m)[NO_LAYER]
    margin = float(logits[tok.yes_id] - logits[tok.no_id])
    assert at("final_margin") == pytest.approx(margin, abs=1e-6)
    assert at("answer_yes") == float(margin > 0)
    p = torch.softmax(logits.double(), -1)
    assert at("p_yes") == pytest.approx(float(p[list(set(tok.yes_variants.values()))].sum()), abs=1e-6)
    assert at("p_no") == pytest.approx(float(p[list(set(tok.no_variants.values()))].sum()), abs=1e-6)
    top = int(logits.argmax())
    assert at("top_token_id") == top
    assert at("top_is_yes_no") == float(top in {*tok.yes_variants.values(), *tok.no_variants.values()})
    assert at("logits_finite") == 1.0 and at("nonfinite_values") == 0
    for name, tid in {**tok.yes_variants, **tok.no_variants}.items():
        assert at(f"final_logit:{name}") == pytest.approx(float(logits[tid]), abs=1e-6)


def test_the_interventions_records_pass_through(lm):
    cap = _capture(lm, 1)
    cap.layers[2].heads = {"h_head": torch.tensor([0.1, 0.2, 0.3, 0.6])}
    rec = step_records(lm, cap, torch.zeros(cap.n_keys, dtype=torch.bool), question_id=0, condition="intervened")
    assert _values(rec, "rounding_survival") == {1: 1.5, 3: 3.5}
    assert [_values(rec, "h_head", h)[2] for h in range(4)] == pytest.approx([0.1, 0.2, 0.3, 0.6])
    assert _values(rec, "h_head")[2] == pytest.approx(0.3)  # head −1 is the mean


def test_propagation_against_the_baseline(lm):
    base, cap = _capture(lm, 2), _capture(lm, 3)
    rec = step_records(lm, cap, torch.zeros(cap.n_keys, dtype=torch.bool), question_id=0, condition="intervened",
                       base=base)
    dist, rel = _values(rec, "propagation"), _values(rec, "propagation_rel")
    for i in cap.layers:
        d = float((cap.layers[i].resid_post - base.layers[i].resid_post).norm())
        assert dist[i] == pytest.approx(d, rel=1e-6)
        assert rel[i] == pytest.approx(d / float(base.layers[i].resid_post.norm()), rel=1e-6)
    norm, last = lm.model.model.language_model.norm, lm.n_layers - 1
    with torch.no_grad():
        out = norm(cap.layers[last].resid_post[None]) - norm(base.layers[last].resid_post[None])
    assert dist[NO_LAYER] == pytest.approx(float(out.norm()), rel=1e-5)
    assert "propagation" not in set(step_records(lm, cap, torch.zeros(12, dtype=torch.bool), question_id=0,
                                                 condition="baseline")["metric"])


def test_nonfinite_values_count_nan_inf_and_overflowing_states(lm):
    cap = _capture(lm, 4)
    cap.layers[0].resid_mid[5] = math.inf  # one non-finite number
    cap.layers[1].resid_post = torch.full_like(cap.layers[1].resid_post, 1e20)  # finite, but x² overflows float32
    cap.final_logits[7] = math.nan
    rec = step_records(lm, cap, torch.zeros(cap.n_keys, dtype=torch.bool), question_id=0, condition="intervened")
    assert _values(rec, "nonfinite_values")[NO_LAYER] == 3
    assert _values(rec, "logits_finite")[NO_LAYER] == 0.0


def test_run_records_frame_every_decode_step_and_the_row_records(lm):
    steps = [_capture(lm, 5), _capture(lm, 6)]
    steps[1].phase, steps[1].decode_step = "decode", 1
    run = RunCapture(prompt_len=12, steps=steps, detected=torch.zeros(12, dtype=torch.bool),
                     row_records={"span_overlap": 0.25})
    frame = run_records(lm, run, question_id=7, condition="intervened", base=run)
    assert set(zip(frame.phase, frame.decode_step)) == {("prefill", 0), ("decode", 1)}
    assert set(frame.question_id) == {7}
    row = frame[(frame.metric == "span_overlap")]
    assert row.layer.tolist() == [NO_LAYER] and row.value.tolist() == [0.25]
    assert (frame[frame.metric == "propagation"].value == 0).all()  # against itself: no distance
    alone = run_records(lm, run, question_id=7, condition="baseline")
    assert "span_overlap" not in set(alone.metric) and "propagation" not in set(alone.metric)
    assert row_records(run, question_id=7, condition="x")["metric"] == ["span_overlap"]


def test_every_shared_metric_is_in_the_glossary(measured):
    _, _, rec = measured
    undocumented = {m for m in rec["metric"] if not documented(m)}
    assert not undocumented and "{norm}_gain_theta" in METRICS

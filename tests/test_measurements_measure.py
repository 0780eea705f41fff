"""Captured tensors → records (mclcbf_diag.measurements.measure), each metric against an independent reference.

The captures are built by hand (random residuals, softmax rows and logits on a tiny random
LLaVA's weights), so nothing here runs the runner. References use the model's own HF
modules: ``LlamaRMSNorm`` through ``torch.func.jacrev`` for every Jacobian gain, the final
norm and ``lm_head`` for the logit lens, plain sums and softmaxes for masses and answers.

measure.py computes every layer at once (stacked reductions), the references one vector at a time, so
the two differ by their summation orders: each comparison is within the figure's float32 floor
(CONTRIBUTING.md, "Tolerances"): ``noise.floor(float32, figure, n)`` for a figure that is the end of n
roundings at its own scale (a norm of a d-vector: its d squares; a Jacobian gain through the d × d
Jacobian: the d terms of each of its reductions), ``floors.mass_floor`` for an attention mass.
"""

from __future__ import annotations

import math

import floors
import pytest
import torch

from mclcbf_diag.engine.runner import LayerCapture, RunCapture, StepCapture
from mclcbf_diag.measurements import noise
from mclcbf_diag.measurements.measure import row_records, run_records, step_records
from mclcbf_diag.measurements.records import METRICS, NO_HEAD, NO_LAYER, documented

F32 = torch.float32


def _floor(value: float, n: int) -> float:
    """The float32 floor of a figure of size ``value`` that is the end of ``n`` roundings at that scale."""
    return noise.floor(F32, value, n)


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
    d = lm.text_config.hidden_size
    for site in ("resid_pre_in", "resid_pre", "resid_mid", "resid_post"):
        got = _values(rec, f"{site}_norm")
        for i, c in cap.layers.items():
            want = float(torch.linalg.vector_norm(getattr(c, site)))
            assert got[i] == pytest.approx(want, rel=0, abs=_floor(want, d))  # a norm: d squares summed
    added = _values(rec, "added_norm")
    assert set(added) == {1, 3}
    for i in added:
        want = float(cap.layers[i].added.norm())
        assert added[i] == pytest.approx(want, rel=0, abs=_floor(want, d))  # a norm: d squares summed


@pytest.mark.parametrize("name, part, site", [("ln1", "input_layernorm", "resid_pre_in"),
                                              ("ln2", "post_attention_layernorm", "resid_mid"),
                                              ("ln_final", None, "resid_post")])
def test_norm_scales_and_jacobian_gains_equal_jacrev_of_the_hf_norm(lm, measured, name, part, site):
    cap, _, rec = measured
    d = lm.text_config.hidden_size
    for i, c in cap.layers.items():
        norm = lm.model.model.language_model.norm if part is None else _module(lm, i, part)
        x = getattr(c, site)
        ref = _gains(norm, x, c.added)
        eps = norm.variance_epsilon
        rms = math.sqrt(float(x.pow(2).mean()) + eps)
        assert _values(rec, f"{name}_scale")[i] == pytest.approx(rms, rel=0, abs=_floor(rms, d))  # d squares summed
        # the radial gain is ε/r² small: recorded to float32 resolution against the typical (orthogonal) gain, the
        # cancellation of J x̂'s two terms (each of the orthogonal gain's size, over d terms)
        assert _values(rec, f"{name}_gain_radial")[i] == pytest.approx(
            ref["gain_radial"], rel=0, abs=_floor(ref["gain_orthogonal"], d))
        # the reference: trace(P Jᵀ J P), three d × d products and a trace, d terms each
        orth = ref["gain_orthogonal"]
        assert _values(rec, f"{name}_gain_orthogonal")[i] == pytest.approx(orth, rel=0, abs=_floor(orth, 4 * d))
        along, back = _values(rec, f"{name}_gain_theta")[i], _values(rec, f"{name}_gain_theta_backward")[i]
        if c.added is None:
            assert math.isnan(along) and math.isnan(back)
        else:  # ‖J v‖/‖v‖: the Jacobian's own reduction (x·v), J v and the two norms, d terms each
            assert along == pytest.approx(ref["gain_theta"], rel=0, abs=_floor(ref["gain_theta"], 4 * d))
            assert back == pytest.approx(ref["gain_theta_backward"], rel=0,
                                         abs=_floor(ref["gain_theta_backward"], 4 * d))


def test_ln1_outputs_before_and_after_the_step(lm, measured):
    cap, _, rec = measured
    d = lm.text_config.hidden_size
    for i, c in cap.layers.items():
        norm = _module(lm, i, "input_layernorm")
        with torch.no_grad():
            before, after = norm(c.resid_pre_in[None])[0], norm(c.resid_pre[None])[0]
        # the norm of a normed vector: the rms (d squares) and the output's norm (d squares)
        for metric, y in (("ln1_out_norm", before), ("ln1_out_norm_post", after)):
            want = float(y.norm())
            assert _values(rec, metric)[i] == pytest.approx(want, rel=0, abs=_floor(want, 2 * d))
        rms = math.sqrt(float(c.resid_pre.pow(2).mean()) + norm.variance_epsilon)
        assert _values(rec, "ln1_scale_post")[i] == pytest.approx(rms, rel=0, abs=_floor(rms, d))  # d squares summed


def test_attention_masses_split_image_sink_and_text(lm, measured):
    cap, _, rec = measured
    heads = lm.text_config.num_attention_heads
    for i, c in cap.layers.items():
        for h in range(heads):  # each mass within its floor (floors.mass_floor)
            row = c.attn[h]
            image, sink = float(row[2:7].sum()), float(row[0])
            assert _values(rec, "attn_image_mass", h)[i] == pytest.approx(image, rel=0, abs=floors.mass_floor(image))
            assert _values(rec, "attn_sink_mass", h)[i] == pytest.approx(sink, rel=0, abs=floors.mass_floor(sink))
            text = float(row[1]) + float(row[7:].sum())
            assert _values(rec, "attn_text_mass", h)[i] == pytest.approx(text, rel=0, abs=floors.mass_floor(text))
        mean = float(c.attn[:, 2:7].sum(-1).mean())  # head −1: the head mean, within the floor of the mean mass
        assert _values(rec, "attn_image_mass")[i] == pytest.approx(mean, rel=0, abs=floors.mass_floor(mean))


def test_logit_lens_through_the_hf_final_norm_and_lm_head(lm, measured):
    cap, _, rec = measured
    yes, no = lm.tokens.yes_id, lm.tokens.no_id
    d = lm.text_config.hidden_size
    w = lm.unembed_weight().detach().float()
    got = _values(rec, "logit_lens_margin")
    for i, c in cap.layers.items():
        with torch.no_grad():
            y = lm.model.model.language_model.norm(c.resid_post[None])[0]
            logits = lm.model.lm_head(y[None])[0]
        # two float32 logits, each a d-term dot product at scale ‖w_row‖·‖y‖ (Cauchy–Schwarz), after the norm's
        # d squares: their floors added
        tol = sum(_floor(float(w[t].norm() * y.norm()), 2 * d) for t in (yes, no))
        assert got[i] == pytest.approx(float(logits[yes] - logits[no]), rel=0, abs=tol)


def test_final_answer_reading(lm, measured):
    cap, _, rec = measured
    logits, tok = cap.final_logits, lm.tokens
    at = lambda m: _values(rec, m)[NO_LAYER]
    margin = float(logits[tok.yes_id] - logits[tok.no_id])
    assert at("final_margin") == margin  # exact by construction: the same float32 subtraction of the same logits
    assert at("answer_yes") == float(margin > 0)
    p = torch.softmax(logits.double(), -1)
    for metric, ids in (("p_yes", tok.yes_variants), ("p_no", tok.no_variants)):
        want = float(p[list(set(ids.values()))].sum())  # a float64 softmax of the same logits: its mass floor
        assert at(metric) == pytest.approx(want, rel=0, abs=noise.mass_floor(torch.float64, want))
    top = int(logits.argmax())
    assert at("top_token_id") == top
    assert at("top_is_yes_no") == float(top in {*tok.yes_variants.values(), *tok.no_variants.values()})
    assert at("logits_finite") == 1.0 and at("nonfinite_values") == 0
    for name, tid in {**tok.yes_variants, **tok.no_variants}.items():
        assert at(f"final_logit:{name}") == float(logits[tid])  # exact by construction: the logit itself, copied


def test_the_interventions_records_pass_through(lm):
    cap = _capture(lm, 1)
    cap.layers[2].heads = {"h_head": torch.tensor([0.1, 0.2, 0.3, 0.6])}
    rec = step_records(lm, cap, torch.zeros(cap.n_keys, dtype=torch.bool), question_id=0, condition="intervened")
    assert _values(rec, "rounding_survival") == {1: 1.5, 3: 3.5}
    # not two routes: the literals' float32 copies, within approx's default rel=1e-6 (float32 rounds by eps/2 ≈ 6e-8)
    assert [_values(rec, "h_head", h)[2] for h in range(4)] == pytest.approx([0.1, 0.2, 0.3, 0.6])
    assert _values(rec, "h_head")[2] == pytest.approx(0.3)  # head −1 is the mean


def test_propagation_against_the_baseline(lm):
    base, cap = _capture(lm, 2), _capture(lm, 3)
    rec = step_records(lm, cap, torch.zeros(cap.n_keys, dtype=torch.bool), question_id=0, condition="intervened",
                       base=base)
    dist, rel = _values(rec, "propagation"), _values(rec, "propagation_rel")
    n = lm.text_config.hidden_size
    for i in cap.layers:
        # the same elementwise difference, then a norm (d squares); the ratio of two such norms: both floors
        d = float((cap.layers[i].resid_post - base.layers[i].resid_post).norm())
        assert dist[i] == pytest.approx(d, rel=0, abs=_floor(d, n))
        want = d / float(base.layers[i].resid_post.norm())
        assert rel[i] == pytest.approx(want, rel=0, abs=2 * _floor(want, n))
    norm, last = lm.model.model.language_model.norm, lm.n_layers - 1
    with torch.no_grad():
        ys, yb = norm(cap.layers[last].resid_post[None]), norm(base.layers[last].resid_post[None])
    # two normed states (each after d squares, at its own norm) subtracted, then the difference's norm (d squares)
    tol = _floor(float(ys.norm()) + float(yb.norm()), n) + _floor(float((ys - yb).norm()), n)
    assert dist[NO_LAYER] == pytest.approx(float((ys - yb).norm()), rel=0, abs=tol)
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
    assert (frame[frame.metric == "propagation"].value == 0).all()  # against itself: x − x is exactly 0
    alone = run_records(lm, run, question_id=7, condition="baseline")
    assert "span_overlap" not in set(alone.metric) and "propagation" not in set(alone.metric)
    assert row_records(run, question_id=7, condition="x")["metric"] == ["span_overlap"]


def test_every_shared_metric_is_in_the_glossary(measured):
    _, _, rec = measured
    undocumented = {m for m in rec["metric"] if not documented(m)}
    assert not undocumented and "{norm}_gain_theta" in METRICS

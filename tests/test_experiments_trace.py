"""The trace against HF's own outputs, on the embedded model and on a tiny random config.

References are independent of the toolkit's code path: HF ``output_attentions``,
``output_hidden_states``, logits and the KV cache of a plain forward.
"""

import dataclasses

import floors
import pytest
import torch

from mclcbf_diag import barrier as B
from mclcbf_diag.embedded.world import sample_scene
from mclcbf_diag.engine.runner import Keep, forward, greedy
from mclcbf_diag.experiments.trace import sample_inputs, trace_sample
from mclcbf_diag.interventions import AttentionKnockout, KnockoutKnobs

QUESTION = "Is there a frisbee in the image?"


@pytest.fixture(scope="module", params=["embedded", "tiny_gqa"])
def lm(request):
    return request.getfixturevalue(f"{request.param}_model")


@pytest.fixture(scope="module")
def image():
    return sample_scene(3, 1).image()


@pytest.fixture(scope="module")
def hf_reference(lm, image):
    _, inputs = sample_inputs(lm, QUESTION, image)
    with torch.no_grad():
        out = lm.model(**inputs, output_attentions=True, output_hidden_states=True, use_cache=True)
    return inputs, out


def _vision_layers(lm) -> int:
    """Decoder layers of the vision tower, which every language layer's input has been through."""
    return floors.depth(lm) - lm.n_layers


def _config(**kw):
    return dataclasses.replace(B.get_preset("seed-exp6"), span="detected", **kw)


def _layer_values(records, metric, condition="baseline", head=-1):
    r = records[(records.metric == metric) & (records.condition == condition) & (records["head"] == head)
                & (records.phase == "prefill")]
    return dict(zip(r.layer, r.value))


@pytest.fixture(scope="module")
def traced(lm, image):
    return trace_sample(lm, QUESTION, image, _config(tau_prefill=0.99))


def test_attention_masses_equal_hf_attentions(lm, traced, hf_reference):
    inputs, out = hf_reference
    image = inputs["input_ids"][0] == lm.tokens.image_token_id
    for i, attn in enumerate(out.attentions):
        row = attn[0, :, -1, :]
        for h in range(row.shape[0]):
            got = traced.records.query("metric == 'attn_image_mass' and condition == 'baseline' and "
                                       "layer == @i and head == @h and phase == 'prefill'").value.item()
            want = float(row[h, image].sum())
            assert got == pytest.approx(want, rel=0, abs=floors.mass_floor(want))  # a mass: its float32 floor
        sink = _layer_values(traced.records, "attn_sink_mass")[i]
        # the head mean of masses: within the floor of the largest
        assert sink == pytest.approx(float(row[:, 0].mean()), rel=0, abs=floors.mass_floor(*row[:, 0].tolist()))


def test_residual_norms_equal_hf_hidden_states(lm, traced, hf_reference):
    _, out = hf_reference
    pre = _layer_values(traced.records, "resid_pre_norm")
    post = _layer_values(traced.records, "resid_post_norm")
    n = lm.n_layers
    v = _vision_layers(lm)  # a residual's norm: floors.state_floor after the layers it has been through
    for i in range(n):
        want = out.hidden_states[i][0, -1]
        assert pre[i] == pytest.approx(float(want.norm()), rel=0, abs=floors.state_floor(want, v + i))
    for i in range(n - 1):  # HF's last hidden state is after the final norm
        want = out.hidden_states[i + 1][0, -1]
        assert post[i] == pytest.approx(float(want.norm()), rel=0, abs=floors.state_floor(want, v + i + 1))


def test_last_logit_lens_layer_equals_hf_logits(lm, traced, hf_reference):
    _, out = hf_reference
    logits = out.logits[0, -1]
    expected = float(logits[lm.tokens.yes_id] - logits[lm.tokens.no_id])
    lens = _layer_values(traced.records, "logit_lens_margin")
    tol = floors.margin_floor(lm, lm.tokens.yes_id, lm.tokens.no_id)  # a margin of two routes
    assert lens[lm.n_layers - 1] == pytest.approx(expected, rel=0, abs=tol)
    assert traced.value("final_margin", "baseline") == pytest.approx(expected, rel=0, abs=tol)


def test_alpha_zero_leaves_every_record_identical(lm, image):
    result = trace_sample(lm, QUESTION, image, _config(tau_prefill=0.99, alpha_prefill=0.0))
    r = result.records
    base = r[r.condition == "baseline"].set_index(["phase", "decode_step", "layer", "head", "metric"]).value
    steer = r[r.condition == "steered"].set_index(["phase", "decode_step", "layer", "head", "metric"]).value
    shared = base.index.intersection(steer.index)
    shared = shared[base[shared].notna().values]  # e.g. gains along θ* exist only where a θ* exists
    assert len(shared) > 100
    # exact: a step of exactly 0 leaves every tensor, so every record, bit for bit as it was
    torch.testing.assert_close(torch.tensor(steer[shared].values), torch.tensor(base[shared].values),
                               rtol=0, atol=0, equal_nan=True)
    assert (r[r.metric == "propagation"].value == 0).all()


def test_steering_moves_h_as_linearisation_predicts(lm, image):
    """A small step: the achieved Δh matches g·θ to first order, and the model realises it."""
    result = trace_sample(lm, QUESTION, image, _config(tau_prefill=0.99, clamp="none", alpha_prefill=1e-3))
    r = result.records.query("condition == 'steered' and head == -1 and phase == 'prefill'")
    wide = r.pivot_table(index="layer", columns="metric", values="value")
    fired = wide[wide.barrier_active > 0]
    assert len(fired) >= 1
    first = fired.index.min()  # later layers also see the earlier layers' changes
    pred, rec, real = fired.loc[first, ["dh_predicted", "dh_recomputed", "dh_realised"]]
    assert pred > 0
    assert rec == pytest.approx(pred, rel=0.05)  # first order: the linearisation's own error, not rounding
    # the model's mass and the float32 recomputation: one quantity by two routes, within their floors
    floor = fired.loc[first, "dh_realised_floor"] + fired.loc[first, "dh_recomputed_floor"]
    assert real == pytest.approx(rec, rel=0, abs=floor)


def test_decode_keys_equal_the_layer_cache(lm, image, hf_reference):
    """At the first generated token the look-ahead's keys are the cache before it plus its own key: what the layer
    caches when the prompt and that token run in one plain forward."""
    inputs, out = hf_reference
    cap = forward(lm, inputs, _config(tau_decode=0.99, alpha_decode=0.0, tau_prefill=0.99, alpha_prefill=0.0),
                  generate=greedy(2), keep=Keep(keys=True)).captures[0]
    decode = cap.steps[1]
    assert decode.phase == "decode"
    T = inputs["input_ids"].shape[1]
    longer = {**inputs, "input_ids": cap.generated[:, :T + 1],
              "attention_mask": torch.ones_like(cap.generated[:, :T + 1])}
    with torch.no_grad():
        whole = lm.adapter.output_cache(lm.model, lm.model(**longer, use_cache=True))
    cache = lm.adapter.output_cache(lm.model, out)
    for i, layer in decode.layers.items():
        if layer.keys is None:
            continue
        want = whole.layers[i].keys[0]
        # keys: the floor of the state entering layer i (floors.state_floor), plus its norm, projection and RoPE
        tol = floors.state_floor(want, _vision_layers(lm) + i + 1)
        assert layer.keys.shape[-2] == T + 1
        torch.testing.assert_close(layer.keys, want, rtol=0, atol=tol)
        # ... and the prefill keys the barrier projects itself are the prompt's cached keys
        torch.testing.assert_close(cap.steps[0].layers[i].keys, cache.layers[i].keys[0], rtol=0, atol=tol)
    assert any(layer.keys is not None for layer in decode.layers.values())


def test_the_look_ahead_equals_the_measured_mass_at_generated_tokens(lm, image):
    """At every decode step of the measuring run, h is the image mass the layer computes, within its floor (it
    once left out the new token's own key, which the token attends to)."""
    result = trace_sample(lm, QUESTION, image, _config(), max_new_tokens=3)
    r = result.records
    base = r[(r.condition == "baseline") & (r["head"] == -1) & (r.phase == "decode")]
    checked = 0
    for step, rows in base.groupby("decode_step"):
        per = {m: dict(zip(g.layer, g.value)) for m, g in rows.groupby("metric")}
        for layer, h in per.get("barrier_h", {}).items():
            floor = per["lookahead_miss_floor"][layer]
            assert abs(h - per["attn_image_mass"][layer]) <= floor, (step, layer)
            checked += 1
    assert checked >= 2 * len(B.steered_layers(_config(), lm.n_layers))



def test_a_look_ahead_miss_at_a_generated_token_is_printed_and_paged(embedded_model, image, monkeypatch, capsys):
    """The look-ahead check covers every decode step, not only the prompt's forward: a miss planted at one generated
    token (decode step 2, one steered layer: the measuring run's recorded look-ahead h raised by 0.05) is the only
    one the summary reports, on screen and on the page; the same run unplanted reports none."""
    from mclcbf_diag.cli.trace import print_outcome_summary
    from mclcbf_diag.interventions.base import Site
    from mclcbf_diag.report.pages import headline

    config = _config()
    clean = trace_sample(embedded_model, QUESTION, image, config, max_new_tokens=3).summary()
    assert not any(k.startswith("lookahead_miss") for k in clean)
    planted_layer = B.steered_layers(config, embedded_model.n_layers)[0]
    real = Site.record

    def record(site, row, metric, value):
        if (metric == "barrier_h" and not site.steer and site.phase == "decode" and site.decode_step == 2
                and site.layer == planted_layer):
            value += 0.05
        return real(site, row, metric, value)

    monkeypatch.setattr(Site, "record", record)
    result = trace_sample(embedded_model, QUESTION, image, config, max_new_tokens=3)
    r = result.records
    miss = r[(r.condition == "baseline") & (r.phase == "decode") & (r.decode_step == 2) & (r.layer == planted_layer)
             & (r.metric == "lookahead_miss")].value.item()
    assert miss == pytest.approx(-0.05, abs=1e-3)  # the planted 0.05, against the mass the layer computed
    s = result.summary()
    assert "lookahead_miss_layers" not in s  # the prompt's forward is exact
    assert s["lookahead_miss_decode_steps"] == [2] and s["lookahead_miss_decode_layers"] == [planted_layer]
    assert s["lookahead_miss_decode_max"] == miss
    print_outcome_summary(s, result.intervention)
    warned = [x for x in capsys.readouterr().out.splitlines() if "warning" in x]
    assert warned == [f"  warning: at the generated tokens (decode steps [2]) the barrier's look-ahead h differs "
                      f"from the image mass the model computed by up to {miss:+.3g} (noise floor "
                      f"{s['lookahead_miss_decode_floor']:.2g}) at layers [{planted_layer}]: h, its gradient and the "
                      "step are not the model's there"]
    assert any(x.startswith("Warning: At the generated tokens (decode steps [2])")
               for x in headline(s, r, result.intervention))

def test_attention_logit_site_sets_image_mass_to_tau(lm, image):
    tau = 0.6
    result = trace_sample(lm, QUESTION, image, _config(site="attn_logits", tau_prefill=tau))
    r = result.records.query("condition == 'steered' and phase == 'prefill' and head >= 0")
    for layer in B.steered_layers(result.config, lm.n_layers):
        before = result.records.query("condition == 'baseline' and phase == 'prefill' and metric == "
                                      "'barrier_h' and layer == @layer").value.item()
        if before >= tau:
            continue
        masses = r[(r.metric == "attn_image_mass") & (r.layer == layer)].value
        # heads below τ are lifted to τ, others only grow: τ within the float32 floor of a mass τ
        assert masses.min() >= tau - floors.mass_floor(tau)


def test_knockout_removes_image_attention_everywhere(lm, hf_reference):
    inputs, _ = hf_reference
    cap = forward(lm, inputs, AttentionKnockout(KnockoutKnobs(0.0, tokens="decision"))).captures[0]
    image = inputs["input_ids"][0] == lm.tokens.image_token_id
    for layer in cap.steps[0].layers.values():
        assert float(layer.attn[:, image].sum()) == 0.0  # exact: factor 0 multiplies the image probabilities by 0
        # the rescaled rows sum to 1 within the float32 floor of a mass of 1
        assert float(layer.attn.sum(-1).mean()) == pytest.approx(1.0, rel=0, abs=floors.mass_floor(1.0))


def test_records_are_deterministic(lm, image):
    a = trace_sample(lm, QUESTION, image, _config(tau_prefill=0.99)).records
    b = trace_sample(lm, QUESTION, image, _config(tau_prefill=0.99)).records
    assert a.equals(b)  # exact: the same route (kernels, inputs, order) twice


def test_barrier_gradient_on_model_weights_equals_finite_differences(lm, hf_reference):
    """∇h on the model's own layer weights and residuals (float64), against central differences."""
    inputs, out = hf_reference
    layer = B.steered_layers(_config(), lm.n_layers)[0]
    w = lm.layer_weights(layer)
    x = out.hidden_states[layer][0].double()
    seq = x.shape[0]
    rotary = lm.model.get_submodule(lm.adapter.rotary_emb)
    cos, sin = rotary(x[None].float(), torch.arange(seq)[None])
    cos, sin = cos[0].double(), sin[0].double()
    mask = inputs["input_ids"][0] == lm.tokens.image_token_id
    keys = B.project_keys(x, w, cos, sin)
    q = torch.tensor([seq - 1])
    h, g = B.barrier_gradient(x[-1:], keys, w, cos[-1:], sin[-1:], mask, q, torch.float64)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        v = torch.randn(x.shape[-1], generator=gen, dtype=torch.float64)
        eps = 1e-6 * float(x[-1].norm())
        hp, _ = B.barrier_value(x[-1:] + eps * v, keys, w, cos[-1:], sin[-1:], mask, q)
        hm, _ = B.barrier_value(x[-1:] - eps * v, keys, w, cos[-1:], sin[-1:], mask, q)
        fd = float((hp - hm) / (2 * eps))
        assert float(g[0] @ v) == pytest.approx(fd, rel=1e-5, abs=1e-10)

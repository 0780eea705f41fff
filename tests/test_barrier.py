"""barrier.py against independent references: transformers' eager LlamaAttention,
finite differences, and hand-worked controller steps."""

import json
import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

from mclcbf_diag import barrier as B
from mclcbf_diag.errors import UserError
from mclcbf_diag.interventions.attention_edits import shifted_mass

torch.set_num_threads(1)

SEQ = 12
IMG = torch.zeros(SEQ, dtype=torch.bool)
IMG[2:7] = True


def _tiny_layer(bias=False, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
        num_hidden_layers=1, vocab_size=50, attention_bias=bias, rms_norm_eps=1e-5,
    )
    cfg._attn_implementation = "eager"
    layer = LlamaDecoderLayer(cfg, layer_idx=0).to(dtype).eval()
    with torch.no_grad():
        layer.input_layernorm.weight.copy_(torch.rand(32) + 0.5)
        for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj):
            lin.weight.mul_(3.0)  # sharper attention than the default init
            if lin.bias is not None:
                lin.bias.normal_()
    rotary = LlamaRotaryEmbedding(cfg)
    return cfg, layer, rotary


def _weights(layer) -> B.LayerWeights:
    a = layer.self_attn
    return B.LayerWeights(
        ln_weight=layer.input_layernorm.weight.detach(),
        ln_eps=layer.input_layernorm.variance_epsilon,
        q_weight=a.q_proj.weight.detach(),
        q_bias=None if a.q_proj.bias is None else a.q_proj.bias.detach(),
        k_weight=a.k_proj.weight.detach(),
        k_bias=None if a.k_proj.bias is None else a.k_proj.bias.detach(),
        n_heads=a.config.num_attention_heads,
        n_kv_heads=a.config.num_key_value_heads,
        head_dim=a.head_dim,
        scaling=a.scaling,
        rotary=apply_rotary_pos_emb,
    )


def _inputs(rotary, dtype=torch.float32, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(1, SEQ, 32, generator=gen, dtype=torch.float64) * 4).to(dtype)
    pos = torch.arange(SEQ)[None]
    cos, sin = rotary(x, pos)
    return x, cos, sin


def _hf_probs(layer, x, cos, sin):
    """Eager LlamaAttention's softmax [H, q, k] with a causal mask."""
    causal = torch.full((SEQ, SEQ), torch.finfo(x.dtype).min, dtype=x.dtype).triu(1)[None, None]
    with torch.no_grad():
        normed = layer.input_layernorm(x)
        _, weights = layer.self_attn(hidden_states=normed, position_embeddings=(cos, sin), attention_mask=causal)
    assert weights is not None, "eager attention must return its weights"
    return weights[0]


@pytest.mark.parametrize("bias", [False, True])
def test_barrier_value_matches_eager_llama_attention(bias):
    _, layer, rotary = _tiny_layer(bias=bias)
    w = _weights(layer)
    x, cos, sin = _inputs(rotary)
    ref = _hf_probs(layer, x, cos, sin)  # [H, q, k]
    keys = B.project_keys(x[0], w, cos[0], sin[0])
    assert keys.shape == (2, SEQ, 8)

    # last row only (the seed's decision token)
    h, per_head = B.barrier_value(x[0, -1:], keys, w, cos[0, -1:], sin[0, -1:], IMG, torch.tensor([SEQ - 1]))
    ref_last = ref[:, -1, IMG].sum(-1)
    torch.testing.assert_close(per_head[:, 0], ref_last, atol=1e-5, rtol=1e-5)
    assert float(h) == pytest.approx(float(ref_last.mean()), abs=1e-5)
    assert 0.02 < float(h) < 0.98  # a non-degenerate case

    # several rows: exercises the causal mask (row 3 sees only keys 0..3)
    rows = torch.tensor([3, 7, SEQ - 1])
    h, per_head = B.barrier_value(x[0, rows], keys, w, cos[0, rows], sin[0, rows], IMG, rows)
    expected = ref[:, rows][:, :, IMG].sum(-1)
    torch.testing.assert_close(per_head, expected, atol=1e-5, rtol=1e-5)
    assert float(h) == pytest.approx(float(expected.mean()), abs=1e-5)


def test_barrier_value_with_keys_missing_the_current_token():
    # decode with keys read from the cache before the layer runs: the query sees only the
    # earlier keys, i.e. the eager row renormalised over them
    _, layer, rotary = _tiny_layer()
    w = _weights(layer)
    x, cos, sin = _inputs(rotary)
    ref = _hf_probs(layer, x, cos, sin)[:, -1, : SEQ - 1]
    ref = ref / ref.sum(-1, keepdim=True)
    keys = B.project_keys(x[0, : SEQ - 1], w, cos[0, : SEQ - 1], sin[0, : SEQ - 1])
    _, per_head = B.barrier_value(x[0, -1:], keys, w, cos[0, -1:], sin[0, -1:], IMG[: SEQ - 1], torch.tensor([SEQ - 1]))
    torch.testing.assert_close(per_head[:, 0], ref[:, IMG[: SEQ - 1]].sum(-1), atol=1e-5, rtol=1e-5)


def test_barrier_value_keeps_dtype_fp16():
    _, layer, rotary = _tiny_layer()
    w = _weights(layer)
    x, cos, sin = _inputs(rotary)
    keys = B.project_keys(x[0], w, cos[0], sin[0])
    args = (keys, w, cos[0, -1:], sin[0, -1:], IMG, torch.tensor([SEQ - 1]))
    h32, _ = B.barrier_value(x[0, -1:], *args)
    # float32 weights, keys and cos/sin are cast to x's dtype
    h16, ph16 = B.barrier_value(x[0, -1:].half(), *args)
    assert h16.dtype == torch.float16 and ph16.dtype == torch.float16
    assert float(h16) == pytest.approx(float(h32), abs=5e-3)


def test_barrier_gradient_finite_differences_float64():
    _, layer, rotary = _tiny_layer(bias=True)
    w = _weights(layer).to(torch.float64)
    x, cos, sin = _inputs(rotary, dtype=torch.float64)
    keys = B.project_keys(x[0], w, cos[0], sin[0])
    rows = torch.tensor([8, SEQ - 1])
    xt, ct, st = x[0, rows], cos[0, rows], sin[0, rows]

    def h_of(v):
        return float(B.barrier_value(v, keys, w, ct, st, IMG, rows)[0])

    with torch.no_grad():  # the gradient must work inside no_grad (generate)
        h, g = B.barrier_gradient(xt, keys, w, ct, st, IMG, rows, torch.float64)
    assert g.shape == xt.shape and g.dtype == torch.float64
    assert float(h) == pytest.approx(h_of(xt), abs=1e-12)
    eps = 1e-5
    gen = torch.Generator().manual_seed(5)
    dirs = [torch.zeros_like(xt) for _ in range(3)]
    dirs[0][0, 3] = 1.0
    dirs[1][1, 17] = 1.0
    dirs[2] = torch.randn(xt.shape, generator=gen, dtype=torch.float64)
    for v in dirs:
        fd = (h_of(xt + eps * v) - h_of(xt - eps * v)) / (2 * eps)
        an = float((g * v).sum())
        assert an == pytest.approx(fd, rel=1e-6, abs=1e-10)
    assert float(g.norm()) > 1e-4  # not a vacuous comparison


def test_barrier_gradient_casts_to_requested_dtype():
    _, layer, rotary = _tiny_layer()
    w = _weights(layer)
    x, cos, sin = _inputs(rotary)
    keys = B.project_keys(x[0], w, cos[0], sin[0])
    args = (keys, w, cos[0, -1:], sin[0, -1:], IMG, torch.tensor([SEQ - 1]))
    with torch.inference_mode():
        h16, g16 = B.barrier_gradient(x[0, -1:], *args, torch.float16)
    h32, g32 = B.barrier_gradient(x[0, -1:], *args, torch.float32)
    assert h16.dtype == g16.dtype == torch.float16
    assert h32.dtype == g32.dtype == torch.float32
    cos_sim = torch.nn.functional.cosine_similarity(g16.float().flatten(), g32.flatten(), dim=0)
    assert float(cos_sim) > 0.99


def test_ln1_out_site_gradient_is_gradient_before_the_norm():
    # chain rule: ∂h/∂x = Jᵀ ∂h/∂(norm x)
    from mclcbf_diag.measurements.probes import rms_norm, rms_norm_vjp

    _, layer, rotary = _tiny_layer()
    w = _weights(layer).to(torch.float64)
    x, cos, sin = _inputs(rotary, dtype=torch.float64)
    keys = B.project_keys(x[0], w, cos[0], sin[0])
    xt = x[0, -1:]
    args = (keys, w, cos[0, -1:], sin[0, -1:], IMG, torch.tensor([SEQ - 1]), torch.float64)
    _, g_x = B.barrier_gradient(xt, *args)
    _, g_n = B.barrier_gradient(rms_norm(xt, w.ln_weight, w.ln_eps), *args, normalized=True)
    torch.testing.assert_close(g_x[0], rms_norm_vjp(xt[0], w.ln_weight, w.ln_eps, g_n[0]))


# ------------------------------------------------------------------ step


def test_step_hand_worked_scale_unclamped_and_clamped():
    cfg = B.BarrierConfig()
    g = torch.tensor([3.0, 4.0])  # ‖g‖² = 25
    r = B.step(torch.tensor(0.1), g, x_norm=10.0, tau=0.2, alpha=1.0, config=cfg)
    assert r.active and not r.clamp_active
    assert r.scale_unclamped == pytest.approx(0.1 / (25 + 1e-6))
    assert r.scale == pytest.approx(0.004)
    torch.testing.assert_close(r.theta, torch.tensor([0.012, 0.016]))
    assert r.theta_norm == pytest.approx(0.02)
    assert r.theta_rel == pytest.approx(0.002)
    assert r.predicted_delta_h == pytest.approx(0.1, rel=1e-6)  # linearised step reaches τ

    g = torch.tensor([0.03, 0.04])  # ‖g‖² = 0.0025 → unclamped 40 → capped at 0.5
    r = B.step(torch.tensor(0.1), g, x_norm=10.0, tau=0.2, alpha=2.0, config=cfg)
    assert r.clamp_active and r.scale == 0.5
    assert r.scale_unclamped == pytest.approx(0.1 / (0.0025 + 1e-6), rel=1e-5)
    torch.testing.assert_close(r.applied, torch.tensor([0.03, 0.04]))  # α·0.5·g
    assert r.predicted_delta_h == pytest.approx(2 * 0.5 * 0.0025, rel=1e-5)


def test_step_inactive_when_h_at_or_above_tau():
    g = torch.tensor([1.0, 2.0])
    for h in (0.2, 0.7):
        r = B.step(torch.tensor(h), g, 5.0, tau=0.2, alpha=1.0, config=B.BarrierConfig())
        assert not r.active and r.scale == 0.0 and not r.clamp_active
        assert torch.count_nonzero(r.theta) == 0 and r.predicted_delta_h == 0.0


def test_step_norm_clamp_respects_bound():
    cfg = B.BarrierConfig(clamp="step_norm", clamp_value=0.5)
    g = torch.tensor([0.03, 0.04])  # unclamped scale 40 → ‖θ‖ = 2
    r = B.step(torch.tensor(0.0), g, x_norm=2.0, tau=0.2, alpha=4.0, config=cfg)
    assert r.clamp_active
    assert r.applied_norm == pytest.approx(0.5 * 2.0, rel=1e-5)  # ‖αθ‖ = c‖x‖
    r = B.step(torch.tensor(0.0), g, x_norm=1000.0, tau=0.2, alpha=1.0, config=cfg)
    assert not r.clamp_active and r.scale == pytest.approx(0.2 / (0.0025 + 1e-6), rel=1e-5)
    r = B.step(torch.tensor(0.0), g, x_norm=1000.0, tau=0.2, alpha=1.0, config=B.BarrierConfig(clamp="none"))
    assert not r.clamp_active and r.scale == pytest.approx(0.2 / (0.0025 + 1e-6), rel=1e-5)


def test_step_fp16_underflow_of_grad_norm():
    g = torch.full((4096,), 1e-5, dtype=torch.float16)  # Σg² = 4e-7 in exact arithmetic
    assert float((g * g).sum()) == 0.0  # g² = 1e-10 underflows to 0 in fp16
    h = torch.tensor(0.1, dtype=torch.float16)
    r = B.step(h, g, x_norm=100.0, tau=0.2, alpha=1.0, config=B.BarrierConfig())
    assert r.grad_norm_sq_dtype == 0.0
    # (τ−h)/1e-6 ≈ 1e5 overflows fp16 → inf; the cap at 0.5 takes over
    assert math.isinf(r.scale_unclamped)
    assert r.scale == 0.5 and r.clamp_active
    assert r.theta.dtype == torch.float16
    assert r.grad_norm == pytest.approx(1e-5 * 64, rel=1e-2)  # the float32 norm is not 0
    assert r.theta_rel == pytest.approx(0.5 * 1e-5 * 64 / 100.0, rel=1e-2)
    # in float32 the same step would be nearly unclamped
    r32 = B.step(h.float(), g.float(), 100.0, 0.2, 1.0, B.BarrierConfig())
    assert math.isfinite(r32.scale_unclamped) and r32.scale_unclamped == pytest.approx(0.1 / 1.41e-6, rel=1e-2)
    assert r32.scale == 0.5  # still capped: here the cap binds, not fp16


def test_step_record_is_json_able():
    r = B.step(torch.tensor(0.1), torch.tensor([3.0, 4.0]), 10.0, 0.2, 1.0, B.BarrierConfig())
    json.dumps(r.to_record())


# ------------------------------------------------------------------ selection rules


def test_steered_layers_rule_and_explicit():
    cfg = B.BarrierConfig()
    assert B.steered_layers(cfg, 32) == tuple(range(10, 28))
    assert B.steered_layers(cfg, 4) == (1, 2, 3)
    assert B.steered_layers(B.BarrierConfig(layers=(3, 1, 3)), 4) == (1, 3)
    with pytest.raises(UserError, match="out of range"):
        B.steered_layers(B.BarrierConfig(layers=(1, 4)), 4)
    with pytest.raises(UserError):
        B.BarrierConfig(layers=(-1,))


def test_image_span_mask_modes_and_error():
    ids = torch.tensor([[1, 5, 9, 9, 9, 6, 7]])
    fixed = B.image_span_mask(B.BarrierConfig(fixed_span=(1, 577)), ids, 9)
    assert fixed.tolist() == [False] + [True] * 6
    det = B.image_span_mask(B.BarrierConfig(span="detected"), ids, 9)
    assert det.tolist() == [False, False, True, True, True, False, False]
    with pytest.raises(UserError, match="no image token id 32000"):
        B.image_span_mask(B.BarrierConfig(span="detected"), ids, 32000)


def test_target_positions():
    mask = torch.tensor([False, True, True, False, False])
    assert B.target_positions(B.BarrierConfig(), mask).tolist() == [4]
    assert B.target_positions(B.BarrierConfig(tokens="after_image"), mask).tolist() == [3, 4]


# ------------------------------------------------------------------ attention edits


def test_logit_bias_reaches_tau_exactly():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 20, generator=gen, dtype=torch.float64) * 3
    img = torch.zeros(20, dtype=torch.bool)
    img[5:15] = True
    logits[:, img] -= torch.tensor([6.0, 4.0, 2.0, 0.0, -2.0, -30.0], dtype=torch.float64)[:, None]
    m = torch.softmax(logits, -1)[:, img].sum(-1)
    tau = 0.3
    delta = B.logit_bias_for_target(m, tau)
    assert (delta[m >= tau] == 0).all() and (delta[m < tau] > 0).all()
    new = torch.softmax(logits + delta.double()[:, None] * img.double(), -1)[:, img].sum(-1)
    below = m < tau
    torch.testing.assert_close(new[below], torch.full_like(new[below], tau), atol=1e-6, rtol=0)
    torch.testing.assert_close(new[~below], m[~below])
    # m = 0 stays finite
    assert B.logit_bias_for_target(torch.tensor([0.0]), 0.2).item() == 30.0


def test_rescale_image_probs_equals_shifted_softmax():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 16, generator=gen, dtype=torch.float64)
    img = torch.zeros(16, dtype=torch.bool)
    img[3:9] = True
    probs = torch.softmax(logits, -1)
    m = probs[:, img].sum(-1)
    target = torch.tensor([0.5, 0.05, 0.9, 0.3], dtype=torch.float64)
    out = B.rescale_image_probs(probs, img, target)
    delta = torch.log(target * (1 - m) / (m * (1 - target)))
    ref = torch.softmax(logits + delta[:, None] * img.double(), -1)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    # knockout and doubling
    ko = B.rescale_image_probs(probs, img, 0.0)
    assert torch.all(ko[:, img] == 0) and torch.allclose(ko.sum(-1), torch.ones(4, dtype=torch.float64))
    dbl = B.rescale_image_probs(probs, img, torch.clamp(2 * m, max=0.99))
    torch.testing.assert_close(dbl[:, img].sum(-1), torch.clamp(2 * m, max=0.99))


def test_rescale_image_probs_keeps_a_float32_row_a_distribution_when_image_mass_is_near_one():
    # A head that puts ~0.9998 of its mass on 576 image keys (as one embedded-model head does at
    # layer 1). The float32 softmax sums to 1 only up to rounding; renormalising the other keys
    # by 1 - m would divide that rounding by 2e-4. The reference is the edit written out in float64,
    # where the row sums to 1 to 1e-15 and 1 - m is exact.
    gen = torch.Generator().manual_seed(3)
    img = torch.zeros(597, dtype=torch.bool)
    img[5:581] = True
    logits = torch.randn(8, 597, generator=gen, dtype=torch.float64) + 15.0 * img.double()
    probs64 = torch.softmax(logits, -1)
    assert probs64[:, img].sum(-1).min() > 0.999
    probs = probs64.float()
    for target in (0.0, 0.5):
        out = B.rescale_image_probs(probs, img, target)
        m64 = probs64[:, img].sum(-1, keepdim=True)
        ref = torch.where(img, probs64 * target / m64, probs64 * (1 - target) / (1 - m64))
        torch.testing.assert_close(out.sum(-1), torch.ones(8), atol=1e-6, rtol=0)
        torch.testing.assert_close(out[:, img].sum(-1), torch.full((8,), target), atol=1e-6, rtol=0)
        torch.testing.assert_close(out.double(), ref, atol=1e-7, rtol=1e-5)


# ------------------------------------------------------------------ config


def test_presets():
    seed = B.get_preset("seed-exp6")
    assert seed == B.BarrierConfig()
    assert (seed.grad_dtype, seed.clamp, seed.clamp_value, seed.span, seed.fixed_span) == ("model", "scale", 0.5,
                                                                                           "fixed", (1, 577))
    assert (seed.tau_prefill, seed.alpha_prefill, seed.tau_decode, seed.alpha_decode) == (0.2, 1.0, 0.2, 0.5)
    fixed = B.get_preset("fixed")
    assert (fixed.grad_dtype, fixed.clamp, fixed.clamp_value, fixed.span, fixed.site, fixed.tokens) == (
        "float32", "step_norm", 0.5, "detected", "attn_logits", "last")
    with pytest.raises(UserError, match="seed-exp6.*fixed"):
        B.get_preset("nope")
    d = fixed.to_dict()
    assert json.loads(json.dumps(d)) == d and d["fixed_span"] == [1, 577]


def test_apply_overrides_parses_types():
    cfg = B.apply_overrides(B.BarrierConfig(), ["tau_prefill=0.5", "layers=1,2,3", "clamp=none"])
    assert cfg.tau_prefill == 0.5 and cfg.tau_decode == 0.2
    assert cfg.layers == (1, 2, 3) and cfg.clamp == "none"
    cfg = B.apply_overrides(cfg, ["tau=0.4", "alpha=4", "layers=10:13", "fixed_span=5,581"])
    assert (cfg.tau_prefill, cfg.tau_decode, cfg.alpha_prefill, cfg.alpha_decode) == (0.4, 0.4, 4.0, 4.0)
    assert cfg.layers == (10, 11, 12) and cfg.fixed_span == (5, 581)
    assert isinstance(cfg.alpha_prefill, float)
    assert B.apply_overrides(cfg, ["layers=none", "fixed_span=5:581"]).layers is None
    assert B.apply_overrides(cfg, ["fixed_span=5:581"]).fixed_span == (5, 581)


@pytest.mark.parametrize(
    "item,pattern",
    [
        ("taux=0.5", "unknown knob 'taux'.*tau_prefill"),
        ("tau_prefill", "no '='"),
        ("tau_prefill=abc", "not a number"),
        ("tau=1.5", "tau_prefill=1.5"),
        ("clamp=soft", "choose one of scale, step_norm, none"),
        ("layers=1,x", "not an integer"),
        ("fixed_span=5", "needs 2 integers"),
        ("fixed_span=9,3", "start < stop"),
    ],
)
def test_apply_overrides_errors(item, pattern):
    with pytest.raises(UserError, match=pattern):
        B.apply_overrides(B.BarrierConfig(), [item])


def test_shift_image_logits_equals_softmax_of_shifted_logits():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 2, 10, generator=gen, dtype=torch.float64)
    logits[0, :, :3] -= 4.0  # head 0: little image mass
    logits[3, :, :3] += 6.0  # head 3: image mass already above τ
    mask = torch.zeros(10, dtype=torch.bool)
    mask[:3] = True
    probs = torch.softmax(logits, -1).float()
    tau = 0.4
    edited, mass, delta, target = B.shift_image_logits(probs, mask, tau, strength=0.5)
    # delta is the shift applied: strength × the δ that would reach τ exactly
    torch.testing.assert_close(delta, 0.5 * B.logit_bias_for_target(mass, tau))
    expected = torch.softmax(logits + delta.double()[..., None] * mask.double(), -1)
    torch.testing.assert_close(edited.double(), expected, atol=1e-6, rtol=0)
    assert torch.all(delta[3] == 0) and torch.allclose(edited[3], probs[3])
    full, *_ = B.shift_image_logits(probs, mask, tau, strength=1.0)
    lifted = mass < tau
    torch.testing.assert_close(full[..., :3].sum(-1)[lifted], torch.full_like(mass[lifted], tau), atol=1e-5,
                               rtol=0)


@pytest.mark.parametrize("strength", [1.0, 100.0, 1e3, 1e4, 1e6])
def test_shift_image_logits_saturates_instead_of_overflowing(strength):
    """strength·δ far past e^709 (float64's largest exp): the mass after is finite and saturates at 1, as
    softmax of the shifted logits does in float64 (every image key's logit then dwarfs the others)."""
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 1, 12, generator=gen, dtype=torch.float64)
    logits[:, :, :4] -= 3.0  # little image mass, so every head is lifted
    mask = torch.zeros(12, dtype=torch.bool)
    mask[:4] = True
    probs = torch.softmax(logits, -1).float()
    edited, mass, delta, target = B.shift_image_logits(probs, mask, 0.5, strength=strength)
    assert torch.isfinite(edited).all() and torch.isfinite(target).all()
    reference = torch.softmax(logits + delta.double()[..., None] * mask.double(), -1)  # saturates by itself
    torch.testing.assert_close(target.double(), reference[..., :4].sum(-1), atol=1e-6, rtol=0)
    torch.testing.assert_close(edited.double(), reference, atol=1e-6, rtol=0)
    if strength >= 1e3:  # δ·strength ≥ 709: the old closed form e^δ overflowed here
        assert float(delta.min()) > 709 and torch.all(target == 1.0)


def test_shifted_mass_closed_form_and_ends():
    m = torch.tensor([0.0, 0.25, 0.5, 1.0])
    d = torch.tensor([2.0, math.log(3.0), -1e6, -5.0])
    # hand-worked: 0 stays 0; 0.25 with e^δ = 3 → 0.75/(0.75 + 0.75) = 0.5; −1e6 → 0; 1 stays 1
    assert shifted_mass(m, d).tolist() == pytest.approx([0.0, 0.5, 0.0, 1.0], abs=1e-7)

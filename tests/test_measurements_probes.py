"""probes.py against independent references (transformers' RMSNorm, autograd Jacobians).

A closed form and its reference (autograd, a full Jacobian, a matrix product) reach one figure by
different reductions, so they differ by rounding: each comparison is within the figure's floor
(CONTRIBUTING.md, "Tolerances"), ``noise.floor(dtype, scale, n)`` for a figure of that scale at the end
of n roundings (the d squares of an RMS, the d terms of a dot product), ``floors.mass_floors`` for masses.
"""

import math

import floors
import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from mclcbf_diag.measurements import noise, probes

torch.set_num_threads(1)


def _hf_norm(d, eps, weight):
    norm = LlamaRMSNorm(d, eps=eps)
    with torch.no_grad():
        norm.weight.copy_(weight)
    return norm


def _x_gamma(d=16, dtype=torch.float32, seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(d, generator=gen, dtype=torch.float64) * scale).to(dtype)
    g = (1 + 0.5 * torch.randn(d, generator=gen, dtype=torch.float64)).to(dtype)
    return x, g


def test_rms_norm_matches_llama_fp32():
    x = torch.randn(3, 5, 64) * 7
    w = torch.rand(64) + 0.5
    ref = _hf_norm(64, 1e-5, w)(x)
    out = probes.rms_norm(x, w, 1e-5)
    assert out.dtype == ref.dtype
    # each element is γ·x/rms: relative to its own size, the floor of the rms's 64 squares
    torch.testing.assert_close(out, ref, atol=0, rtol=noise.floor(torch.float32, 1.0, 64))


def test_rms_norm_matches_llama_fp16_exactly():
    x = (torch.randn(4, 64) * 30).half()
    w = (torch.rand(64) + 0.5).half()
    norm = _hf_norm(64, 1e-5, w.float()).half()
    ref = norm(x)
    out = probes.rms_norm(x, w, 1e-5)
    assert out.dtype == torch.float16
    assert torch.equal(out, ref)  # exact by construction: the same float32 ops, in the same order, then the same casts


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_jacobian_matches_autograd(dtype):
    x, g = _x_gamma(24, dtype)
    eps = 1e-2  # a visible ε, so the exact formula's ε term is tested too
    ref = torch.func.jacrev(lambda v: probes.rms_norm(v, g, eps))(x)
    J = probes.rms_norm_jacobian(x, g, eps)
    assert J.dtype == dtype
    # entries at the scale of the largest (γ/r on the diagonal), each after the rms's 24 squares and the
    # backward's 24-term reduction (x·v)
    tol = noise.floor(dtype, float(ref.abs().max()), 2 * 24)
    torch.testing.assert_close(J, ref, atol=tol, rtol=0)


def test_jvp_vjp_match_jacobian():
    x, g = _x_gamma(32, torch.float64, seed=1)
    eps = 1e-5
    J = probes.rms_norm_jacobian(x, g, eps)
    v = torch.randn(32, dtype=torch.float64)
    u = torch.randn(32, dtype=torch.float64)
    # each element a 32-term dot product at scale ‖J row‖·‖v‖ (Cauchy–Schwarz), after the rms's 32 squares
    rows = float(torch.cat([J.norm(dim=1), J.norm(dim=0)]).max())
    for got, want, w in ((probes.rms_norm_jvp(x, g, eps, v), J @ v, v),
                         (probes.rms_norm_vjp(x, g, eps, u), J.T @ u, u)):
        torch.testing.assert_close(got, want, atol=noise.floor(torch.float64, rows * float(w.norm()), 2 * 32), rtol=0)


def test_gains_against_full_jacobian():
    d = 40
    x, g = _x_gamma(d, torch.float64, seed=2, scale=20.0)
    eps = 1e-5
    J = torch.func.jacrev(lambda v: probes.rms_norm(v, g, eps))(x)
    xhat = x / x.norm()
    P = torch.eye(d, dtype=torch.float64) - torch.outer(xhat, xhat)
    expected_orth = math.sqrt(float(torch.trace(P @ J.T @ J @ P)) / (d - 1))
    v = torch.randn(d, dtype=torch.float64)
    out = probes.rms_norm_gains(x, g, eps, direction=v)
    f64 = torch.float64
    # float64 floors: the reference trace(P Jᵀ J P) is three d × d products and a trace, d terms each
    assert out["gain_orthogonal"] == pytest.approx(expected_orth, rel=0, abs=noise.floor(f64, expected_orth, 4 * d))
    # J x̂ cancels two terms of the orthogonal gain's size to ε/r³: its floor is at that scale, over d terms
    assert out["gain_radial"] == pytest.approx(float((J @ xhat).norm()), rel=0,
                                               abs=noise.floor(f64, expected_orth, 4 * d))
    assert out["gain_radial"] < 1e-6 * out["gain_orthogonal"]
    along, back = float((J @ v).norm() / v.norm()), float((J.T @ v).norm() / v.norm())
    # ‖J v‖/‖v‖: the Jacobian's reductions, J v and the two norms, d terms each
    assert out["gain_along"] == pytest.approx(along, rel=0, abs=noise.floor(f64, along, 4 * d))
    assert out["gain_along_backward"] == pytest.approx(back, rel=0, abs=noise.floor(f64, back, 4 * d))
    rms = math.sqrt(float(x.pow(2).mean()) + eps)
    assert out["rms"] == pytest.approx(rms, rel=0, abs=noise.floor(f64, rms, d))  # d squares summed


def test_gain_orthogonal_monte_carlo():
    d = 16
    x, g = _x_gamma(d, torch.float64, seed=3)
    eps = 1e-5
    J = probes.rms_norm_jacobian(x, g, eps)
    xhat = x / x.norm()
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(200_000, d, generator=gen, dtype=torch.float64)
    v = v - (v @ xhat)[:, None] * xhat
    v = v / v.norm(dim=1, keepdim=True)
    mc = float(((v @ J.T).pow(2).sum(1).mean()).sqrt())
    # not rounding but the Monte Carlo estimate's sampling error (200 000 directions): a statistical tolerance
    assert probes.rms_norm_gains(x, g, eps)["gain_orthogonal"] == pytest.approx(mc, rel=5e-3)


def test_gains_without_direction_are_nan():
    x, g = _x_gamma(8)
    out = probes.rms_norm_gains(x, g, 1e-5)
    assert math.isnan(out["gain_along"]) and math.isnan(out["gain_along_backward"])
    out = probes.rms_norm_gains(x, g, 1e-5, direction=torch.zeros(8))
    assert math.isnan(out["gain_along"])


def test_attention_masses():
    probs = torch.tensor([[0.5, 0.1, 0.2, 0.2, 0.0], [0.1, 0.3, 0.3, 0.1, 0.2]])
    mask = torch.tensor([False, True, True, False])  # shorter than keys: padded
    out = probes.attention_masses(probs, mask)

    def same_masses(got, want):  # float32 sums of the rows against the literals: each mass within its floor
        want = torch.tensor(want)
        assert ((got - want).abs() <= floors.mass_floors(want)).all(), (got, want)

    same_masses(out["image"], [0.3, 0.6])
    same_masses(out["sink"], [0.5, 0.1])
    same_masses(out["text"], [0.2, 0.3])
    # a sink position inside the image counts as image only
    out = probes.attention_masses(probs, mask, sink_positions=(0, 1))
    same_masses(out["sink"], [0.5, 0.1])


def test_logit_lens_and_margin():
    d, vocab = 16, 10
    resid = torch.randn(3, d) * 5
    w = torch.rand(d) + 0.5
    U = torch.randn(vocab, d)
    head = torch.nn.Linear(d, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(U)
    y = _hf_norm(d, 1e-5, w)(resid)
    full = head(y)
    lens = probes.logit_lens(resid, w, 1e-5, U, [7, 2])
    # a logit: a d-term dot product at scale ‖U row‖·‖y‖ (Cauchy–Schwarz), after the norm's d squares
    one = noise.floor(torch.float32, float(U[[7, 2]].norm(dim=-1).max() * y.detach().norm(dim=-1).max()), 2 * d)
    torch.testing.assert_close(lens, full[:, [7, 2]], atol=one, rtol=0)
    m = probes.yes_no_margin(resid, w, 1e-5, U, 7, 2)
    torch.testing.assert_close(m, full[:, 7] - full[:, 2], atol=2 * one, rtol=0)  # two logits' floors


def test_rounding_survival():
    x = torch.full((8,), 100.0)
    # fp16 spacing at 100 is 2^-4 = 0.0625: a step of 0.01 is rounded away entirely
    assert probes.rounding_survival(x, torch.full((8,), 0.01), torch.float16) == 0.0
    # a step of exactly one spacing survives exactly
    assert probes.rounding_survival(x, torch.full((8,), 0.0625), torch.float16) == 1.0
    # hand-worked: float32 spacing at 100 is 2^-17 ≈ 7.6e-6, so 0.01 survives to within 3.8e-4 of itself
    assert probes.rounding_survival(x, torch.full((8,), 0.01), torch.float32) == pytest.approx(1.0, rel=1e-3)
    assert math.isnan(probes.rounding_survival(x, torch.zeros(8), torch.float16))


def test_propagation_distance():
    a = torch.tensor([3.0, 0.0], dtype=torch.float16)
    b = torch.tensor([0.0, 4.0])
    assert probes.propagation_distance(a, b) == 5.0  # exact by construction: 3, 4, 25 and √25 are exact floats

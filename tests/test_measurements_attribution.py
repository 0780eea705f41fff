"""The pure math of direct logit attribution and patching (mclcbf_diag.measurements.attribution), against references.

No model runs here: random tensors, references built with plain PyTorch (an RMSNorm + linear
unembedding, ``nn.Linear`` for o_proj, ``probs @ values`` for a head's output), hand-worked
cases, and scipy's Spearman correlation. Comparisons between two float32 routes take their
tolerance from ``noise.floor(float32, scale, n)`` (a sum of n roundings at that scale).
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import spearmanr

from mclcbf_diag import noise
from mclcbf_diag.measurements import attribution as A

F32 = torch.float32


def _rms_norm(x, w, eps):  # Llama's RMSNorm in float32
    return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def test_the_margin_is_linear_in_the_residual_at_the_held_scale():
    g = torch.Generator().manual_seed(0)
    d = 64
    x, gamma, w = 5 * torch.randn(d, generator=g), 1 + torch.rand(d, generator=g), torch.randn(2, d, generator=g)
    logits = w @ _rms_norm(x, gamma, 1e-5)
    u = A.margin_direction(x, gamma, 1e-5, w[0], w[1])
    assert abs(float(u @ x) - float(logits[0] - logits[1])) <= noise.floor(F32, float(logits.abs().max()), 2 * d)
    assert float(A.rms_scale(x, 1e-5)) == pytest.approx(float(torch.sqrt(x.pow(2).mean() + 1e-5)), rel=1e-6)


@pytest.mark.parametrize("kv", [4, 2])
def test_heads_and_their_sources_sum_to_the_attention_output(kv):
    g = torch.Generator().manual_seed(1)
    H, hd, d, K = 4, 8, 32, 10
    o = torch.nn.Linear(H * hd, d, bias=False)
    with torch.no_grad():
        o.weight.copy_(torch.randn(d, H * hd, generator=g))
    probs = torch.softmax(torch.randn(H, K, generator=g), -1)
    values = torch.randn(kv, K, hd, generator=g)
    z = probs[:, None, :] @ values.repeat_interleave(H // kv, 0)  # [H, 1, hd]: eager attention's output
    z = z[:, 0]
    u = torch.randn(d, generator=g)
    with torch.no_grad():
        reference = float(u @ o(z.reshape(-1)))
        per_head_ref = torch.stack([u @ o.weight[:, h * hd:(h + 1) * hd] @ z[h] for h in range(H)])
    heads = A.head_contributions(z, o.weight.detach(), u)
    scale = float(per_head_ref.abs().max())
    assert torch.allclose(heads, per_head_ref, rtol=0, atol=noise.floor(F32, scale, d * hd))
    assert abs(float(heads.sum()) - reference) <= noise.floor(F32, scale, d * H * hd)
    image = torch.zeros(K, dtype=torch.bool)
    image[2:7] = True
    masks = A.source_masks(image)
    assert masks["sink"].tolist() == [True] + [False] * (K - 1)
    assert (masks["image"] | masks["sink"] | masks["text"]).all()
    assert not (masks["image"] & masks["text"]).any()
    split = A.head_source_split(probs, values, masks, o.weight.detach(), u)
    total = sum(split.values())
    assert torch.allclose(total, heads, rtol=0, atol=noise.floor(F32, scale, d * H * hd))
    # the image part by hand: only image keys' values, weighted by their probabilities
    v = values.repeat_interleave(H // kv, 0)
    for h in range(H):
        zi = (probs[h, image, None] * v[h, image]).sum(0)
        with torch.no_grad():
            ref = float(u @ o.weight[:, h * hd:(h + 1) * hd] @ zi)
        assert abs(float(split["image"][h]) - ref) <= noise.floor(F32, scale, d * hd)


def test_a_sink_that_is_an_image_token_counts_as_image():
    image = torch.tensor([True, True, False])
    m = A.source_masks(image)
    assert m["sink"].tolist() == [False, False, False] and m["image"].tolist() == [True, True, False]


def test_the_parts_of_a_synthetic_residual_sum_to_the_margin():
    g = torch.Generator().manual_seed(2)
    d, H, hd, L, K = 16, 2, 4, 3, 6
    embed = torch.randn(d, generator=g)
    parts, x = [], embed.clone()
    for _ in range(L):
        step = torch.randn(d, generator=g) * 0.1
        ow = torch.randn(d, H * hd, generator=g)
        ob = torch.randn(d, generator=g)
        probs = torch.softmax(torch.randn(H, K, generator=g), -1)
        values = torch.randn(H, K, hd, generator=g)
        z = torch.einsum("hk,hkd->hd", probs, values)
        mlp = torch.randn(d, generator=g)
        x = x + step + ow @ z.reshape(-1) + ob + mlp
        parts.append(A.LayerParts(step=step, z=z, o_weight=ow, o_bias=ob, mlp=mlp, probs=probs, values=values))
    gamma, w, b = 1 + torch.rand(d, generator=g), torch.randn(2, d, generator=g), torch.randn(2, generator=g)
    logits = w @ _rms_norm(x, gamma, 1e-6) + b
    margin = float(logits[0] - logits[1])
    image = torch.tensor([False, True, True, True, False, False])
    att = A.direct_logit_attribution(embed, parts, x, gamma, 1e-6, w[0], w[1], margin, float(b[0] - b[1]), image)
    scale = float(logits.abs().max())
    assert abs(att.total - margin) <= noise.floor(F32, scale, 4 * L * d)
    assert att.heads.shape == (L, H) and att.step.shape == (L,) and set(att.sources) == set(A.SOURCES)
    assert torch.allclose(sum(att.sources.values()), att.heads, rtol=0, atol=noise.floor(F32, scale, d * H * hd))
    assert torch.allclose(att.attn, att.heads.sum(-1) + att.attn_bias)


def test_recovery_by_hand():
    assert A.recovery(3.0, 1.0, 5.0) == 0.5
    assert A.recovery(1.0, 1.0, 5.0) == 0.0 and A.recovery(5.0, 1.0, 5.0) == 1.0
    assert math.isnan(A.recovery(2.0, 1.0, 1.0 + 1e-9, floor=1e-6))  # no gap beyond rounding: nothing to recover
    t = A.recovery(torch.tensor([1.0, 5.0]), 1.0, 5.0)
    assert t.tolist() == [0.0, 1.0]
    assert torch.isnan(A.recovery(torch.tensor([1.0]), 1.0, 1.0)).all()


def test_attribution_estimate_is_a_dot_product():
    diff, grad = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[0.5, -1.0], [2.0, 0.0]])
    assert A.attribution_estimate(diff, grad).tolist() == [-1.5, 6.0]
    assert float(A.attribution_estimate(diff, grad, (0, 1))) == 4.5


def test_groups_of_a_prompt():
    image = torch.tensor([False, False, True, True, True, False, False, False])
    pos = A.group_positions(image)
    assert pos["image"].tolist() == [2, 3, 4] and pos["question"].tolist() == [5, 6] and pos["decision"].tolist() == [7]


def test_rank_and_spearman_against_scipy():
    s = torch.tensor([[0.1, -3.0], [2.0, 0.5]])
    assert A.rank_of(s, (0, 1)) == 1 and A.rank_of(s, (1, 0)) == 2 and A.rank_of(s, 0) == 4
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(30, generator=g), torch.randn(30, generator=g)
    b[:10] = a[:10]
    b[5] = b[6]  # a tie
    assert A.spearman(a, b) == pytest.approx(spearmanr(a.numpy(), b.numpy()).statistic, abs=1e-12)
    a[3] = math.nan  # NaN entries are left out
    keep = torch.isfinite(a)
    assert A.spearman(a, b) == pytest.approx(spearmanr(a[keep].numpy(), b[keep].numpy()).statistic, abs=1e-12)
    assert math.isnan(A.spearman(torch.tensor([1.0]), torch.tensor([2.0])))

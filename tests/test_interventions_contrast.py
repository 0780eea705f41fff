"""The contrastive-decoding arithmetic against hand-worked cases and plain numpy."""

import math

import numpy as np
import pytest
import torch

from mclcbf_diag.interventions.contrast import contrast, cut, guidance, js_divergence, log_probs, margin, plausible


def test_plausible_keeps_the_tokens_within_beta_of_the_top_one():
    p = torch.tensor([0.5, 0.3, 0.06, 0.04, 0.1])
    logits = torch.log(p) + 7.0  # logits and log-probabilities differ by one constant
    assert plausible(logits, 0.1).tolist() == [True, True, True, False, True]  # 0.04 < 0.1·0.5 ≤ 0.06
    assert plausible(logits, 0.2).tolist() == [True, True, False, False, True]  # 0.1 ≥ 0.2·0.5
    assert plausible(logits, 0.0).all()
    assert plausible(logits[None].expand(3, -1), 0.55).sum(-1).tolist() == [2, 2, 2]  # 0.3 ≥ 0.55·0.5; rows alike


def test_cut_gives_probability_zero():
    s = cut(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([True, False, True]))
    assert s.tolist()[1] == -math.inf
    assert torch.softmax(s, -1)[1] == 0 and torch.isclose(torch.softmax(s, -1).sum(), torch.tensor(1.0))


def test_contrast_by_hand():
    z, z2 = torch.tensor([2.0, -1.0]), torch.tensor([1.0, 1.0])
    assert contrast(z, z2, 1.0).tolist() == [3.0, -3.0]  # 2·z − z2
    assert contrast(z, z2, 0.0).tolist() == z.tolist()


def test_guidance_is_classifier_free_guidance_on_log_probabilities():
    a, b = torch.tensor([1.0, 0.0, -2.0]), torch.tensor([0.0, 1.0, 0.5])
    la = np.log(np.exp([1.0, 0.0, -2.0]) / np.exp([1.0, 0.0, -2.0]).sum())
    lb = np.log(np.exp([0.0, 1.0, 0.5]) / np.exp([0.0, 1.0, 0.5]).sum())
    np.testing.assert_allclose(guidance(a, b, 1.1).numpy(), 1.1 * (la - lb) + lb, rtol=1e-6)
    np.testing.assert_allclose(guidance(a, b, 1.0).numpy(), log_probs(a).numpy(), rtol=1e-6)


def _jsd_numpy(a, b):
    p, q = np.exp(a - a.max()), np.exp(b - b.max())
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2
    return 0.5 * sum(x * math.log(x / y) for x, y in zip(p, m) if x > 0) + \
        0.5 * sum(x * math.log(x / y) for x, y in zip(q, m) if x > 0)


def test_js_divergence_against_numpy_and_its_bounds():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 50, generator=g) * 3, torch.randn(4, 50, generator=g) * 3
    got = js_divergence(a, b)
    for i in range(4):
        assert got[i].item() == pytest.approx(_jsd_numpy(a[i].double().numpy(), b[i].double().numpy()), rel=1e-9)
    assert torch.allclose(got, js_divergence(b, a))  # symmetric
    assert js_divergence(a, a).abs().max() < 1e-12
    disjoint = js_divergence(torch.tensor([0.0, -math.inf]), torch.tensor([-math.inf, 0.0]))
    assert disjoint.item() == pytest.approx(math.log(2))  # the largest JSD in nats


def test_margin_is_infinite_when_one_answer_is_ruled_out():
    s = torch.tensor([1.0, -math.inf, 0.5])
    assert margin(s, 0, 2) == 0.5
    assert margin(s, 0, 1) == math.inf and margin(s, 1, 0) == -math.inf
    assert math.isnan(margin(torch.tensor([-math.inf, -math.inf]), 0, 1))

"""Attention knockouts (mclcbf_diag.interventions.knockout) against softmaxes of shifted logits."""

import math
from types import SimpleNamespace

import pytest
import torch

from mclcbf_diag.interventions.base import Site, rows_of
from mclcbf_diag.interventions.knockout import AttentionKnockout, KnockoutKnobs

IMG = 9
IDS = torch.tensor([[0, 0, 1, IMG, IMG, 4, 5], [1, IMG, IMG, IMG, 3, 4, 5]])
MASK = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])


def _edited(knobs, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 3, 7, 7, generator=g).masked_fill(~torch.ones(7, 7, dtype=torch.bool).tril(), -torch.inf)
    probs = torch.softmax(logits, -1)
    rows = rows_of(IDS, MASK, IMG)
    site = Site(SimpleNamespace(phase="prefill", decode_step=0, rows=rows, steer=True, dose=1.0, start=0), "attention",
                0,
                probs)
    AttentionKnockout(knobs).attention(site)
    return logits, probs, rows


def _shifted(logits_row, image, mass):
    """softmax(logits + δ·image) with the δ that gives image mass ``mass`` (hand formula, float64)."""
    p = torch.softmax(logits_row.double(), -1)
    m = float(p[image].sum())
    delta = math.log(mass * (1 - m) / (m * (1 - mass)))
    return torch.softmax(logits_row.double() + delta * image, -1).float()


@pytest.mark.parametrize("knobs", [KnockoutKnobs(0.0), KnockoutKnobs(2.0), KnockoutKnobs(target=0.3),
                                   KnockoutKnobs(0.0, tokens="after_image")])
def test_knockout_equals_a_logit_shift_on_the_image_keys(knobs):
    logits, probs, rows = _edited(knobs)
    for row in rows:
        image = torch.zeros(7, dtype=torch.bool)
        image[torch.nonzero(row.image).flatten() + row.pad] = True
        queries = [row.decision] if knobs.tokens == "decision" else row.after_image().tolist()
        edited = {q + row.pad for q in queries}
        for h in range(3):
            for q in range(row.pad, 7):
                lg = logits[row.index, h, q]
                if q not in edited:
                    ref = torch.softmax(lg, -1)
                elif knobs.target is None and knobs.factor == 0:
                    ref = torch.softmax(lg.masked_fill(image, -torch.inf), -1)
                else:
                    m = float(torch.softmax(lg, -1)[image].sum())
                    ref = _shifted(lg, image, knobs.target if knobs.target is not None else min(m * knobs.factor,
                                                                                              1 - 1e-4))
                torch.testing.assert_close(probs[row.index, h, q], ref, atol=1e-6, rtol=0)


def test_knockout_first_edited():
    r0, r1 = rows_of(IDS, MASK, IMG)
    assert AttentionKnockout(KnockoutKnobs()).first_edited(r0) == r0.decision
    assert AttentionKnockout(KnockoutKnobs(tokens="after_image")).first_edited(r1) == 4

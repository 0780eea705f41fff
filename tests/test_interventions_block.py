"""Attention blocking (mclcbf_diag.interventions.block) against a softmax with −∞ on the blocked keys."""

from types import SimpleNamespace

import pytest
import torch

from mclcbf_diag.interventions.base import Site, rows_of
from mclcbf_diag.interventions.block import (
    AttentionBlock,
    BlockKnobs,
    block_rows,
    group_positions,
)

IMG = 9
IDS = torch.tensor([[0, 1, IMG, IMG, 4, 5, 6], [1, IMG, IMG, 3, 4, 5, 6]])
MASK = torch.tensor([[0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])


def test_groups_in_llava_layout():
    r0, r1 = rows_of(IDS, MASK, IMG)
    assert group_positions(r0, "image").tolist() == [1, 2]
    assert group_positions(r0, "question").tolist() == [3, 4]  # after the image, before the last
    assert group_positions(r0, "last").tolist() == [5]
    assert group_positions(r1, "question").tolist() == [3, 4, 5]


def test_block_rows_equals_softmax_over_the_unblocked_keys():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 7, generator=g)
    blocked = torch.tensor([False, True, True, False, False, True, False])
    ref = torch.softmax(logits.masked_fill(blocked, -torch.inf), -1)
    torch.testing.assert_close(block_rows(torch.softmax(logits, -1), blocked), ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("source, target", [("image", "last"), ("image", "question"), ("question", "last")])
def test_block_edits_exactly_the_target_queries(source, target):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 2, 7, 7, generator=g)
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    logits = logits.masked_fill(~causal, -torch.inf)
    rows = rows_of(IDS, MASK, IMG)
    probs = torch.softmax(logits, -1)
    site = Site(SimpleNamespace(phase="prefill", decode_step=0, rows=rows, steer=True, dose=1.0, start=0), "attention",
                0,
                probs)
    AttentionBlock(BlockKnobs(source, target)).attention(site)
    for row in rows:
        keys = torch.zeros(7, dtype=torch.bool)
        keys[group_positions(row, source) + row.pad] = True
        queries = group_positions(row, target) + row.pad
        ref = torch.softmax(logits[row.index], -1)
        ref[:, queries] = torch.softmax(logits[row.index][:, queries].masked_fill(keys, -torch.inf), -1)
        torch.testing.assert_close(probs[row.index], ref, atol=1e-6, rtol=0)


def test_block_first_edited_and_presets():
    r0, _ = rows_of(IDS, MASK, IMG)
    assert AttentionBlock(BlockKnobs("image", "last")).first_edited(r0) == 5
    assert AttentionBlock(BlockKnobs("image", "question")).first_edited(r0) == 3
    assert set(AttentionBlock.presets) == {"image-to-last", "image-to-question", "question-to-last"}
    assert AttentionBlock(BlockKnobs(layers=(1, 7))).layers(4) == (1,)  # layers beyond the model are dropped

"""The prompt's layout as pure functions (models/tokens.py): the span check and the sink, on hand-worked layouts.

Layouts (positions, half-open spans):
* llava-hf 7B: BOS, ``USER``, ``:``, ``▁``, ``\\n``-ish prefix = 5 tokens, 576 image tokens at 5–580, the question and
  ``ASSISTANT:`` after; the decision token (the last) at 593.
* a 112-px tower: 64 image tokens at 5–68, decision at 81.
* no BOS (a Qwen2 tokenizer): 576 image tokens at 4–579, decision at 592; with 64 tokens at 4–67, decision at 80.
"""

import pytest
import torch

from mclcbf_diag.models.tokens import SEED_OFFSET, Sink, find_sink, span_problem

SEED = (1, 577)


def image(first: int, n: int) -> list[int]:
    return list(range(first, first + n))


def test_the_seed_span_on_llava_hf_is_the_known_offset_and_the_detected_span_is_clean():
    assert SEED_OFFSET == 4
    assert span_problem(SEED, image(5, 576), 593) is None  # covers 1–4, misses 577–580: the known offset
    assert span_problem((5, 581), image(5, 576), 593) is None
    assert span_problem(SEED, torch.tensor(image(5, 576)), 593) is None  # a tensor of positions works alike


def test_a_span_covering_more_prefix_or_missing_more_image_tokens_is_named():
    line = span_problem((0, 581), image(5, 576), 593)
    assert line.startswith("the configured image span [0, 581) covers 5 non-image tokens (0–4), more than the "
                           "seed's known 4-token offset; the detected image tokens are 5–580")
    assert line.endswith("use the detected span (span=detected) or set fixed_span to the detected tokens")
    line = span_problem((1, 570), image(5, 576), 593)
    assert "misses 11 of the 576 image tokens (570–580)" in line and "\n" not in line


def test_the_seed_span_on_a_112_px_tower_covers_the_question_and_the_decision_token():
    line = span_problem(SEED, image(5, 64), 81)
    assert line.startswith("the configured image span [1, 577) covers the decision token (position 81) and 16 other "
                           "non-image tokens (1–4, 69–80); the detected image tokens are 5–68: use the detected span")


def test_no_bos_layouts():
    # 576 tokens one earlier: covers 1–3, misses 577–579, inside the known offset
    assert span_problem(SEED, image(4, 576), 592) is None
    line = span_problem(SEED, image(4, 64), 80)
    assert "covers the decision token (position 80) and 15 other non-image tokens (1–3, 68–79)" in line
    assert "no image token was detected" in span_problem(SEED, [], 20)


def test_the_sink_is_the_bos_where_there_is_one():
    ids = torch.tensor([[1, 7, 8, 9, 9, 9, 10]])
    rows = torch.zeros(2, 3, 7)
    rows[..., 2] = 1.0  # even where another key takes more attention
    assert find_sink(ids, 1, rows) == Sink(0, "BOS")
    assert str(find_sink(ids, 1)) == "BOS (position 0)"


def test_without_a_bos_the_sink_is_measured_and_excludes_image_tokens_and_the_decision_token():
    ids = torch.tensor([7, 8, 9, 9, 9, 10, 11])  # USER : <image>×3 question decision
    mask = ids == 9
    rows = torch.tensor([[[0.10, 0.05, 0.30, 0.20, 0.10, 0.05, 0.20]],
                         [[0.30, 0.05, 0.20, 0.10, 0.10, 0.05, 0.20]]])  # [layers, heads, seq]
    # means: 0.20, 0.05, (image), (image), (image), 0.05, (decision 0.20): position 0 wins over the image keys
    assert find_sink(ids, 1, rows, mask) == Sink(0, "measured sink")
    rows[:, :, 1] = 0.26
    assert find_sink(ids, 1, rows, mask) == Sink(1, "measured sink")
    assert find_sink(ids, None, rows, mask).kind == "measured sink"  # a tokenizer with no BOS at all
    with pytest.raises(ValueError, match="measure the sink"):
        find_sink(ids, None)

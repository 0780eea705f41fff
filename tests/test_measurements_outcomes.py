"""outcomes.py: Yes/No masses, validity and the outcome classes, as pure functions."""

import math
from types import SimpleNamespace

import pytest
import torch

from mclcbf_diag.measurements.outcomes import (
    answer_ids,
    counts,
    dropped_edit,
    outcome,
    outcome_of,
    question,
    read_batch,
    read_logits,
)

TOKENS = SimpleNamespace(yes_id=1, no_id=2, yes_variants={"Yes": 1, "▁Yes": 3}, no_variants={"No": 2})


def test_masses_cover_every_spelling_and_top_token():
    logits = torch.tensor([0.0, 2.0, 1.0, 2.0, -1.0])
    r = read_batch(logits[None], TOKENS)[0]
    p = torch.softmax(logits.double(), -1)
    assert r.p_yes == pytest.approx(float(p[1] + p[3])) and r.p_no == pytest.approx(float(p[2]))
    assert r.margin == pytest.approx(1.0) and r.answer == "yes" and r.valid
    assert answer_ids(TOKENS) == ([1, 3], [2])


def test_a_sign_change_with_another_top_token_is_derailed():
    base = read_logits(torch.tensor([0.0, 2.0, 1.0, 0.0, 0.0]), 1, 2, [1, 3], [2])
    dot = read_logits(torch.tensor([5.0, 0.0, 1.0, 0.0, 0.0]), 1, 2, [1, 3], [2])  # "." on top, No > Yes
    assert dot.answer == "no" and not dot.valid
    assert outcome_of(base, dot, "no") == "derailed" and outcome_of(base, dot, None) == "derailed"


def test_non_finite_logits_are_derailed_whatever_the_baseline():
    base = read_logits(torch.tensor([0.0, 2.0, 1.0, 0.0, 0.0]), 1, 2, [1, 3], [2])
    nan = read_logits(torch.tensor([math.nan, 2.0, 1.0, 0.0, 0.0]), 1, 2, [1, 3], [2])
    assert not nan.finite and not nan.valid and math.isnan(nan.p_yes)
    assert outcome_of(base, nan, "yes") == "derailed"
    assert outcome("no", False, "no", False, "yes", new_finite=False) == "derailed"


@pytest.mark.parametrize("base, new, label, expect", [
    ("yes", "yes", "yes", "unchanged"), ("yes", "no", "no", "fixed"), ("yes", "no", "yes", "broken"),
    ("no", "yes", None, "changed"), ("no", "no", None, "unchanged"),
])
def test_outcome_classes(base, new, label, expect):
    assert outcome(base, True, new, True, label) == expect


def test_an_invalid_baseline_counts_as_wrong_as_in_the_paired_statistics():
    assert outcome("yes", False, "no", True, "no") == "fixed"  # no Yes/No answer → the right one
    assert outcome("no", False, "no", True, "no") == "fixed"  # the same sign, but now a valid right answer
    assert outcome("yes", False, "yes", True, "no") == "unchanged"  # wrong → wrong
    assert outcome("yes", False, "no", False, "no") == "unchanged"  # still no Yes/No answer: still wrong
    assert outcome("yes", False, "no", False, None) == "changed"  # without a label: the sign rule


def test_counts_and_questions():
    assert counts(["fixed", "derailed", "fixed"]) == {"unchanged": 0, "fixed": 2, "broken": 0, "derailed": 1,
                                                      "non_finite": 0}
    assert counts(["changed"], labeled=False) == {"unchanged": 0, "changed": 1, "derailed": 0, "non_finite": 0}
    assert question("no", "yes").startswith("wrong answer") and question("yes", "yes").startswith("right answer")
    assert question(None, "yes").startswith("no label")


@pytest.mark.parametrize("base, new, label", [("yes", "yes", "yes"), ("no", "no", "yes"), ("no", "yes", "yes"),
                                              ("yes", "yes", None)])
def test_a_dropped_edit_is_non_finite_never_unchanged(base, new, label):
    # the step overflowed and was not applied: whatever the answers, the run is not the configured intervention
    assert outcome(base, True, new, True, label, new_dropped=True) == "non_finite"
    # non-finite logits stay derailed (the model itself overflowed)
    assert outcome(base, True, new, False, label, new_finite=False, new_dropped=True) == "derailed"


def test_dropped_edit_reads_the_per_layer_marks():
    assert not dropped_edit([{"scale": 2.0}, {"step_nonfinite": 0.0}])
    assert dropped_edit([{"step_nonfinite": 0.0}, {"step_nonfinite": 1.0}])
    assert dropped_edit([{"residual_nonfinite": 1.0}])
    assert not dropped_edit([{"step_nonfinite": math.nan}])  # not recorded at that layer

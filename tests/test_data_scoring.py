"""POPE's official answer parsing and metrics, checked against hand-computed values."""

import pytest

from mclcbf_diag.data import metrics_frame, parse_answer, pope_metrics
from mclcbf_diag.errors import UserError


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Yes, there is a dog.", "yes"),
        ("No.", "no"),
        ("There is not a dog", "no"),
        ("no", "no"),
        ("", "yes"),  # empty output counts as yes
        ("NO", "yes"),  # official rule is case-sensitive
        ("Not really", "yes"),  # "Not" is not in {No, not, no}
        ("Yes. No", "yes"),  # only the text before the first '.'
        ("No, there is none", "no"),  # comma removed, then "No" matches
        ("Nope", "yes"),  # whole words only
        ("Yes\nno", "yes"),  # split on single spaces only, "Yes\nno" is one word
        ("asdf qwer", "yes"),  # garbled
    ],
)
def test_parse_answer(text, expected):
    assert parse_answer(text) == expected


def test_metrics_hand_computed():
    labels = ["yes", "yes", "yes", "yes", "yes", "no", "no", "no", "no", "no"]
    preds = ["yes", "yes", "yes", "no", "yes", "yes", "no", "no", "yes", "no"]
    # pairs (label, pred): 0-2 yes/yes TP, 3 yes/no FN, 4 yes/yes TP,
    #   5 no/yes FP, 6-7 no/no TN, 8 no/yes FP, 9 no/no TN
    # tp=4, fn=1, fp=2, tn=3, n=10
    # accuracy = (4+3)/10 = 0.7
    # precision = 4/(4+2) = 2/3
    # recall = 4/(4+1) = 0.8
    # f1 = 2*(2/3)*0.8 / (2/3+0.8) = (16/15)/(22/15) = 8/11
    # yes_ratio = 6 predicted yes / 10 = 0.6
    m = pope_metrics(labels, preds)
    assert (m["tp"], m["fp"], m["tn"], m["fn"], m["n"]) == (4, 2, 3, 1, 10)
    assert m["accuracy"] == pytest.approx(0.7)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(0.8)
    assert m["f1"] == pytest.approx(8 / 11)
    assert m["yes_ratio"] == pytest.approx(0.6)
    assert set(m) == {"accuracy", "precision", "recall", "f1", "yes_ratio",
                      "tp", "fp", "tn", "fn", "n"}


def test_metrics_zero_denominators():
    # never predicts yes: tp=fp=0 -> precision 0, recall 0/2 = 0, f1 0 (p+r=0)
    m = pope_metrics(["yes", "yes", "no"], ["no", "no", "no"])
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (0, 0, 1, 2)
    assert m["precision"] == m["recall"] == m["f1"] == m["yes_ratio"] == 0.0
    assert m["accuracy"] == pytest.approx(1 / 3)
    empty = pope_metrics([], [])
    assert empty["n"] == 0 and empty["accuracy"] == 0.0


def test_metrics_perfect():
    m = pope_metrics(["yes", "no"], ["yes", "no"])
    assert m["accuracy"] == m["precision"] == m["recall"] == m["f1"] == 1.0
    assert m["yes_ratio"] == 0.5


def test_metrics_errors():
    with pytest.raises(UserError, match="2 labels but 1 predictions"):
        pope_metrics(["yes", "no"], ["yes"])
    with pytest.raises(UserError, match=r"prediction 1 .*'Yes, there is'.*parse_answer"):
        pope_metrics(["yes", "no"], ["yes", "Yes, there is"])


def test_metrics_frame():
    df = metrics_frame(["yes", "no"], ["yes", "yes"], split="random", condition="baseline")
    assert df.shape[0] == 1
    assert list(df.columns[:2]) == ["split", "condition"]
    row = df.iloc[0]
    # tp=1, fp=1: precision 0.5, recall 1, f1 = 2*0.5*1/1.5 = 2/3, accuracy 0.5, yes_ratio 1
    assert row["precision"] == 0.5 and row["recall"] == 1.0 and row["yes_ratio"] == 1.0
    assert row["f1"] == pytest.approx(2 / 3)

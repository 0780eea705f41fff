"""POPE's official scoring: parse a free-text answer to yes/no, then compute the metrics.

The parsing rule is the one in POPE's evaluation script, reproduced on purpose with its
quirks so that numbers are comparable with published ones:

* only the text before the first ``"."`` counts ("Yes. No" is "yes");
* commas are removed and the rest is split on single spaces (not on other whitespace);
* the answer is "no" if one of the words is exactly ``No``, ``not`` or ``no`` — the match
  is case-sensitive, so ``"NO"`` or ``"Not"`` alone count as "yes";
* anything else, including empty or garbled output, is "yes".

Metrics take "yes" as the positive class and are fractions in [0, 1], not percentages.
"""

from __future__ import annotations

from collections.abc import Sequence

from mclcbf_diag.errors import UserError

_NO_WORDS = frozenset({"No", "not", "no"})


def parse_answer(text: str) -> str:
    """Map a generated answer to ``"yes"`` or ``"no"`` by POPE's official rule."""
    first_sentence = text.split(".", 1)[0]
    words = first_sentence.replace(",", "").split(" ")
    return "no" if _NO_WORDS.intersection(words) else "yes"


def _ratio(num: int, den: int) -> float:
    return num / den if den else 0.0


def pope_metrics(labels: Sequence[str], predictions: Sequence[str]) -> dict:
    """Accuracy, precision, recall, F1 and yes-ratio with "yes" as positive.

    Both inputs are sequences of ``"yes"``/``"no"`` (parse text with :func:`parse_answer`
    first). A ratio whose denominator is zero is reported as 0.0 (e.g. precision when
    nothing was predicted "yes", F1 when precision + recall is 0, everything when n = 0).
    Returns floats accuracy, precision, recall, f1, yes_ratio and ints tp, fp, tn, fn, n.
    """
    labels, predictions = list(labels), list(predictions)
    if len(labels) != len(predictions):
        raise UserError(
            f"got {len(labels)} labels but {len(predictions)} predictions; "
            "score exactly one prediction per question"
        )
    for name, values in (("label", labels), ("prediction", predictions)):
        for i, value in enumerate(values):
            if value not in ("yes", "no"):
                raise UserError(
                    f"{name} {i} (0-based) is {value!r}, not 'yes'/'no'; "
                    "map free text with parse_answer() before scoring"
                )
    pairs = list(zip(labels, predictions))
    tp = pairs.count(("yes", "yes"))
    fp = pairs.count(("no", "yes"))
    tn = pairs.count(("no", "no"))
    fn = pairs.count(("yes", "no"))
    n = len(pairs)
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    return {
        "accuracy": _ratio(tp + tn, n),
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall),
        "yes_ratio": _ratio(tp + fp, n),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "n": n,
    }


def metrics_frame(labels: Sequence[str], predictions: Sequence[str], **tags):
    """:func:`pope_metrics` as a one-row DataFrame; ``tags`` (e.g. split="random",
    condition="baseline") become leading columns so rows from several runs concatenate."""
    import pandas as pd

    return pd.DataFrame([{**tags, **pope_metrics(labels, predictions)}])

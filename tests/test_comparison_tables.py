"""The comparison kept in ``reports/comparison`` (``reports/comparison.sh``'s runs and compare's tables): the docs'
table is compare's summary verbatim, that summary is the one its kept ``compare.csv`` gives, and every row of
``compare.csv`` says what its run's kept answers say, recounted here by hand (accuracy, outcome counts, the paired
change of accuracy, and the exact McNemar test written out) without the package's scoring."""

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from mclcbf_diag.pope.summary import decoding_summary, summary_markdown

REPO = Path(__file__).resolve().parent.parent
ROOT = REPO / "reports" / "comparison"
KEPT = ROOT / "compare"
QUESTIONS = 676  # each of the embedded model's POPE splits


def _table() -> pd.DataFrame:
    table = pd.read_csv(KEPT / "compare.csv", keep_default_na=False, na_values=[""])
    table["explained_by_yes_shift"] = table.explained_by_yes_shift.map(lambda v: v is True or v == "True")
    return table


def _answers(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "answers.jsonl").read_text(encoding="utf-8").splitlines()]


def test_the_docs_table_is_the_kept_summary_and_the_summary_is_the_kept_tables():
    summary = (KEPT / "compare_summary.md").read_text(encoding="utf-8")
    assert summary == summary_markdown(decoding_summary(_table())) + "\n"
    assert summary in (REPO / "docs" / "commands" / "compare.md").read_text(encoding="utf-8")


def test_every_kept_run_is_finished_and_in_the_table():
    folders = sorted(p.parent for p in ROOT.glob("*/*/run.json"))
    assert len(folders) == 3 * (21 + 19 * 3)  # three splits: 19 methods and 2 prompt controls greedy, 19 sampled ×3
    for folder in folders:
        rows = _answers(folder)
        assert len(rows) == QUESTIONS and len({r["question_id"] for r in rows}) == QUESTIONS, folder
        assert len({r["run_id"] for r in rows}) == 1, folder
    runs = {(REPO / run.split("#")[0]).resolve() for run in _table().run}  # a prompt control: RUN#prompt-control
    assert runs == {f.resolve() for f in folders}


def _mcnemar(b: int, c: int) -> float:
    n = b + c
    return 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2 ** n)


@pytest.mark.parametrize("split", ["adversarial", "popular", "random"])
def test_each_row_says_what_its_answers_say(split):
    table = _table()
    rows = table[(table.split == split) & (table.intervention != "prompt control")]
    assert len(rows) == 19 + 2 + 19 * 3  # the prompt controls' own runs are rows of MC-LCBF under another prompt
    for r in rows.itertuples():
        answers = _answers(REPO / r.run)
        # accuracy reads the margin's sign; the paired statistics count a derailed (invalid) answer as wrong
        signed_right = [a["steered_answer"] == a["label"] for a in answers]
        right_before = [a["baseline_answer"] == a["label"] and a["baseline_valid"] for a in answers]
        right_after = [a["steered_answer"] == a["label"] and a["steered_valid"] for a in answers]
        fixed = sum(not b and a for b, a in zip(right_before, right_after))
        worse = sum(b and not a for b, a in zip(right_before, right_after))
        assert r.n == len(answers) == QUESTIONS
        assert r.accuracy == pytest.approx(sum(signed_right) / QUESTIONS, abs=1e-12), r.run
        assert r.d_accuracy == pytest.approx((fixed - worse) / QUESTIONS, abs=1e-12), r.run
        assert {a["outcome"] for a in answers} <= {"unchanged", "fixed", "broken", "derailed", "non_finite"}
        for outcome in ("unchanged", "fixed", "broken", "derailed"):
            assert getattr(r, outcome) == sum(a["outcome"] == outcome for a in answers), (r.run, outcome)
        assert r.mcnemar_p == pytest.approx(_mcnemar(fixed, worse), rel=1e-9), r.run
        assert r.d_accuracy_lo <= r.d_accuracy <= r.d_accuracy_hi
        assert r.mcnemar_p_holm >= r.mcnemar_p

"""``--labels FILE`` on the command line (mclcbf_diag.cli): a relabelled run scores against the file, records
it in its identity, refuses a file that names unknown questions before loading anything, and the one-sample
commands its pages link to read the same label. The file format itself: tests/test_data_labels.py."""

from __future__ import annotations

import argparse
import json

import pytest
from cli_refusals import refused

from mclcbf_diag.cli import main
from mclcbf_diag.cli.common import relabelled
from mclcbf_diag.data import load_pope
from mclcbf_diag.shipped import POPE

ADV = POPE / "embedded_pope_adversarial.json"


def _labels(tmp_path, entries: dict, name="labels.json"):
    path = tmp_path / name
    path.write_text(json.dumps({"adversarial": entries}), encoding="utf-8")
    return path


def _flipped(qid: int) -> str:
    q = next(q for q in load_pope(ADV) if q.question_id == qid)
    return "no" if q.label == "yes" else "yes"


def test_pope_scores_against_the_labels_file_and_records_it(tmp_path):
    path = _labels(tmp_path, {"1": _flipped(1)})
    out = tmp_path / "run"
    argv = ["pope", "--split", "adversarial", "--limit", "2", "--batch-size", "2", "--out", str(out)]
    assert main([*argv, "--labels", str(path)]) == 0
    rows = {r["question_id"]: r for r in map(json.loads, (out / "answers.jsonl").read_text().splitlines())}
    originals = {q.question_id: q.label for q in load_pope(ADV)[:2]}
    assert rows[1]["label"] == _flipped(1) and rows[2]["label"] == originals[2]
    ident = json.loads((out / "run.json").read_text())["labels"]
    assert ident["file"] == str(path.resolve()) and ident["entries"] == 1 and len(ident["sha256"]) == 64
    # the same folder with another labelling is another run: refused, naming what differs
    other = _labels(tmp_path, {"2": _flipped(2)}, "other.json")
    assert main([*argv, "--labels", str(other)]) == 2
    assert main(argv) == 2  # and without the file


def test_a_labels_file_naming_unknown_questions_is_refused_before_the_model(tmp_path):
    path = _labels(tmp_path, {"999999": "yes"})
    refused(["pope", "--split", "adversarial", "--labels", str(path), "--out", str(tmp_path / "p")], tmp_path,
            "999999")
    assert not (tmp_path / "p").exists()


def test_a_sample_command_reads_the_files_label(tmp_path):
    path = _labels(tmp_path, {"72": _flipped(72)})
    q = next(q for q in load_pope(ADV) if q.question_id == 72)
    args = argparse.Namespace(labels=str(path), split="adversarial")
    assert relabelled(args, q).label == _flipped(72)
    assert relabelled(argparse.Namespace(labels=None, split="adversarial"), q) is q
    other = next(q for q in load_pope(ADV) if q.question_id == 3)
    assert relabelled(args, other).label == other.label  # not in the file: the question file's label


@pytest.mark.parametrize("command", [["pope"], ["explain"]])
def test_labels_is_an_option_of_the_whole_split_commands(command, capsys):
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    assert "--labels FILE" in capsys.readouterr().out

"""mclcbf_diag.data.labels: the relabelling file (--labels), its refusals and what it re-scores. Pure: no model."""

from __future__ import annotations

import hashlib
import json

import pytest

from mclcbf_diag import shipped
from mclcbf_diag.data import load_pope
from mclcbf_diag.data.labels import check_known, known_ids, load_labels, relabel_questions, relabel_records
from mclcbf_diag.errors import UserError
from mclcbf_diag.measurements.outcomes import outcome


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


@pytest.mark.parametrize("name,text", [
    ("flat.json", '{"1": "Yes", "2": " no "}'),
    ("list.json", '[{"question_id": 1, "label": "yes"}, {"question_id": "2", "label": "NO"}]'),
    ("plain.csv", "question_id,label\n1,yes\n2,no\n\n"),
    ("reordered.csv", "label,question_id\r\nyes,1\r\nno, 2\r\n"),
])
def test_every_layout_reads_to_the_same_entries(tmp_path, name, text):
    path = _write(tmp_path, name, text)
    labels = load_labels(path)
    assert labels.entries == {(None, "1"): "yes", (None, "2"): "no"}
    assert labels.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert labels.identity() == {"file": str(path.resolve()), "sha256": labels.sha256, "entries": 2}
    assert labels.label("random", 1) == "yes" and labels.label("popular", "2") == "no"
    assert labels.label("random", 3) is None


def test_per_split_entries_win_over_split_less_ones(tmp_path):
    nested = load_labels(_write(tmp_path, "n.json", '{"random": {"1": "no"}, "popular": {"1": "yes"}}'))
    assert nested.entries == {("random", "1"): "no", ("popular", "1"): "yes"}
    csv = load_labels(_write(tmp_path, "s.csv", "split,question_id,label\nrandom,1,no\n,1,yes\n"))
    assert csv.label("random", 1) == "no" and csv.label("adversarial", 1) == "yes"


@pytest.mark.parametrize("text,words", [
    ('{"1": "maybe"}', ["key '1'", "'maybe' is not yes/no"]),
    ('{"1": "yes", "1 ": "no"}', ["already given"]),
    ("question_id,label\n1,yes\n1,no\n", ["line 3", "already given at line 2"]),
    ("id,answer\n1,yes\n", ["needs question_id and label"]),
    ("question_id,label\n1,yes,extra\n", ["line 2", "3 fields"]),
    ('[{"question_id": 1}]', ["item 0", "question_id and label"]),
    ('[{"question_id": true, "label": "yes"}]', ["question_id True"]),
    ("{not json", ["not valid JSON"]),
    ('"yes"', ["top-level JSON is str"]),
    ("", ["is empty"]),
    ("{}", ["holds no labels"]),
])
def test_bad_files_are_refused_by_name(tmp_path, text, words):
    path = _write(tmp_path, "bad.json" if text[:1] in "{[\"" else "bad.csv", text)
    with pytest.raises(UserError) as err:
        load_labels(path)
    for w in words:
        assert w in str(err.value), (w, str(err.value))
    assert "bad." in str(err.value)


def test_a_missing_file_is_refused(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_labels(tmp_path / "none.json")


def test_unknown_and_ambiguous_ids_are_refused():
    identity = {"splits": ["random", "popular"], "pope_files": [str(shipped.pope_file("random")),
                                                                 str(shipped.pope_file("popular"))]}
    known = known_ids(identity)
    assert len(known["random"]) == 676
    from mclcbf_diag.data.labels import Labels

    ok = Labels("f.json", "0" * 64, {("random", "5"): "yes", ("adversarial", "5"): "no"})
    assert check_known(ok, known) == 1  # the adversarial entry is for a split this run does not answer: unused
    for entries, words in [({(None, "9999"): "yes"}, ["'9999'", "in no question file"]),
                           ({(None, "5"): "yes"}, ["several splits", "random, popular"]),
                           ({("random", "9999"): "no"}, ["not in split 'random'"]),
                           ({("adversarial", "5"): "no"}, ["relabels no question of this run", "(adversarial)",
                                                            "(random, popular)"])]:
        with pytest.raises(UserError) as err:
            check_known(Labels("f.json", "0" * 64, entries), known)
        assert all(w in str(err.value) for w in words), str(err.value)


def test_relabelled_questions_and_records(tmp_path):
    questions = load_pope(shipped.pope_file("adversarial"))[:4]
    flipped = {q.question_id: ("no" if q.label == "yes" else "yes") for q in questions[:2]}
    labels = load_labels(_write(tmp_path, "l.json", json.dumps({"adversarial": {str(k): v for k, v in
                                                                               flipped.items()}})))
    got = relabel_questions(questions, labels, "adversarial")
    assert [q.label for q in got] == [flipped.get(q.question_id, q.label) for q in questions]
    assert got[2] is questions[2] and relabel_questions(questions, labels, "random") == questions
    rows = [{"split": "adversarial", "question_id": q.question_id, "label": q.label, "baseline_answer": "yes",
             "steered_answer": a, "outcome": outcome("yes", True, a, True, q.label)}
            for q, a in zip(questions, ["no", "yes", "no", "no"])]
    rows[3]["outcome"] = "derailed"  # does not depend on the label: kept
    new = relabel_records(rows, labels)
    for r, n in zip(rows, new):
        lab = flipped.get(r["question_id"], r["label"])
        assert n["label"] == lab
        want = "derailed" if r["outcome"] == "derailed" else outcome("yes", True, r["steered_answer"], True, lab)
        assert n["outcome"] == want
    assert rows[0]["label"] != new[0]["label"]  # the input rows are not modified


def test_the_explain_commands_of_a_relabelled_run_carry_the_file():
    from mclcbf_diag.pope.metrics import explain_command
    from mclcbf_diag.population.outputs import explain_command as population_command

    identity = {"splits": ["adversarial"], "pope_files": [str(shipped.pope_file("adversarial"))],
                "labels": {"file": "/data/my labels.json", "sha256": "0" * 64, "entries": 3}}
    row = {"question_id": 7, "split": "adversarial"}
    assert explain_command(row, identity).endswith("--labels '/data/my labels.json'")
    assert population_command(identity, "adversarial", 7).endswith("--labels '/data/my labels.json'")
    plain = {k: v for k, v in identity.items() if k != "labels"}
    assert "--labels" not in explain_command(row, plain) + population_command(plain, "adversarial", 7)


def test_relabel_run_relabels_every_selected_job_and_checks_the_files(tmp_path):
    from mclcbf_diag.data.labels import relabel_run
    from mclcbf_diag.pope.jobs import question_files, shard_jobs

    files = question_files("all", None, None)
    all_jobs, jobs = shard_jobs(files, 4, (1, 2), "1/2")
    target = jobs[0]
    new = "no" if target.question.label == "yes" else "yes"
    path = _write(tmp_path, "l.csv", f"split,question_id,label\n{target.split},{target.question.question_id},{new}\n"
                                     "random,600,yes\n")  # question 600: in the file, not selected (unused)
    labels, all2, jobs2 = relabel_run(path, files, all_jobs, jobs)
    assert jobs2[0].question.label == new and jobs2[0].key == target.key
    assert [j.key for j in all2] == [j.key for j in all_jobs] and [j.key for j in jobs2] == [j.key for j in jobs]
    changed = [(a.key, a.question.label) for a, b in zip(all2, all_jobs) if a.question.label != b.question.label]
    assert changed == [(target.key, new)]
    assert labels.identity()["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(UserError, match="'9999' is not in split 'random'"):
        relabel_run(_write(tmp_path, "bad.csv", "split,question_id,label\nrandom,9999,no\n"), files, all_jobs, jobs)

"""``mclcbf-diag explain`` over a whole split: outputs, kill -9 and resume, refusal, shards and merge, bad inputs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from mclcbf_diag.cli import build_parser, main
from mclcbf_diag.cli import population as pop_cli
from mclcbf_diag.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
BASE = ["explain", "--split", "all", "--limit", "3", "--batch-size", "3", "--k-max", "2", "--bisect-steps", "1",
        "--set", "span=detected", "--set", "clamp=none"]
TOTAL = 9
COLS = ("label", "baseline_answer", "steered_answer", "outcome", "top_cause", "dose_k_star", "sweep",
        "sweep_decision_min_mass", "fixes_fixed", "fixes_broken", "fixes_derailed")


def run(out, *extra, on_batch=None):
    args = build_parser().parse_args([*BASE, "--out", str(out), *extra])
    return pop_cli.cmd_population(args, on_batch=on_batch)


def rows(out):
    return [json.loads(line) for line in (Path(out) / "answers.jsonl").read_text().splitlines()]


def assert_same(out, ref):
    got, want = rows(out), rows(ref)
    keys = [(r["split"], str(r["question_id"])) for r in got]
    assert len(keys) == len(set(keys)) == TOTAL, "rows lost or repeated"
    by = {(r["split"], str(r["question_id"])): r for r in got}
    for r in want:
        g = by[(r["split"], str(r["question_id"]))]
        for col in COLS:
            assert g[col] == r[col], col
        assert g["baseline_margin"] == pytest.approx(r["baseline_margin"], abs=1e-4)
    a, b = pd.read_parquet(Path(out) / "records.parquet"), pd.read_parquet(Path(ref) / "records.parquet")
    assert len(a) == len(b)
    assert set(zip(a.split, a["question_id"])) == set(zip(b.split, b["question_id"]))
    for name in ("causes.csv", "doses.csv", "fixes.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(Path(out) / name), pd.read_csv(Path(ref) / name))


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    assert run(out) == 0
    return out


def test_outputs(ref):
    for name in ("run.json", "answers.jsonl", "questions.parquet", "records.parquet", "causes.csv", "doses.csv",
                 "masses.csv", "fixes.csv", "settings.csv", "population.html", "answer.txt"):
        assert (ref / name).is_file(), name
    recs = rows(ref)
    assert {r["split"] for r in recs} == {"random", "popular", "adversarial"}
    assert {r["kind"] for r in recs} <= {"wrong", "right"}
    q = pd.read_parquet(ref / "questions.parquet")
    assert len(q) == TOTAL
    r = pd.read_parquet(ref / "records.parquet")
    assert list(r.columns) == ["split", "question_id", "condition", "phase", "decode_step", "layer", "head", "metric",
                               "value"]
    assert len(set(zip(r.split, r["question_id"]))) == TOTAL
    page = (ref / "population.html").read_text()
    assert "<script src=" not in page and "mclcbf-diag explain --split" in page and "--question-id" in page
    answer = (ref / "answer.txt").read_text()
    assert answer.strip() in page.replace("&#x27;", "'") or answer.split(".")[0] in page
    run_json = json.loads((ref / "run.json").read_text())
    assert run_json["kind"] == "explain-population" and run_json["k_max"] == 2.0


def test_the_cli_dispatches_without_a_sample(ref, capsys, monkeypatch):
    seen = {}
    monkeypatch.setattr(pop_cli, "cmd_population", lambda args: seen.setdefault("args", args) and 0)
    main(["explain", "--limit", "2"])
    assert seen["args"].limit == 2 and seen["args"].sample is None


def test_sigkill_then_resume(tmp_path, ref):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "mclcbf_diag.cli", *BASE, "--out", str(out)]
    cmd[cmd.index("--batch-size") + 1] = "1"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    answers = out / "answers.jsonl"
    try:
        deadline = time.monotonic() + 240
        while not (answers.is_file() and answers.stat().st_size > 0):
            assert proc.poll() is None, "the run ended before writing a row"
            assert time.monotonic() < deadline, "no rows after 240 s"
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert 0 < answers.read_bytes().count(b"\n") < TOTAL, "the kill should land mid-run"
    assert run(out, "--batch-size", "1") == 0  # the batch size is part of the run (#34): resumed with the killed one's
    assert_same(out, ref)


def test_resume_after_an_interruption_repeats_nothing(tmp_path, ref):
    class Stop(Exception):
        pass

    def stop(n):
        if n == 2:
            raise Stop

    with pytest.raises(Stop):
        run(tmp_path, "--batch-size", "2", on_batch=stop)
    assert len(rows(tmp_path)) == 4
    before = (tmp_path / "answers.jsonl").read_bytes()
    assert run(tmp_path, "--batch-size", "2") == 0
    assert (tmp_path / "answers.jsonl").read_bytes().startswith(before)
    assert_same(tmp_path, ref)


def test_records_parts_of_an_earlier_version_are_read_under_the_new_column_names(tmp_path):
    """A resumed run may find parts whose records columns were still named sample/step: no mixing."""
    from mclcbf_diag.population.outputs import read_parts, write_part

    def part(qid, names):
        return pd.DataFrame({"split": ["random"] * 2, names[0]: [qid] * 2, "condition": ["baseline", "steered"],
                             "phase": ["prefill"] * 2, names[1]: [0, 0], "layer": [-1, -1], "head": [-1, -1],
                             "metric": ["final_margin"] * 2, "value": [0.5, -0.25]})

    write_part(tmp_path, [("random", "1")], part("1", ("sample", "step")))  # as an earlier version wrote it
    write_part(tmp_path, [("random", "2")], part("2", ("question_id", "decode_step")))
    got = read_parts([tmp_path], {("random", "1"), ("random", "2")})
    assert list(got.columns) == ["split", "question_id", "condition", "phase", "decode_step", "layer", "head",
                                 "metric", "value"]
    assert sorted(got.question_id) == ["1", "1", "2", "2"] and got.decode_step.tolist() == [0, 0, 0, 0]
    assert got.isna().sum().sum() == 0
    assert list(read_parts([tmp_path / "none"], {("random", "1")}).columns) == list(got.columns)


def test_changed_configuration_is_refused(ref, capsys):
    assert main([*BASE, "--out", str(ref), "--set", "tau=0.5"]) == 2
    err = capsys.readouterr().err
    assert "config.tau_prefill" in err and "--out" in err and err.count("\n") == 1
    with pytest.raises(UserError, match="k_max"):
        run(ref, "--k-max", "4")
    assert main(["pope", "--split", "all", "--limit", "3", "--out", str(ref)]) == 2  # a pope run is another run


def test_shards_merge_to_the_single_process_run(tmp_path, ref, capsys):
    for i in (0, 1, 2):
        assert run(tmp_path / f"s{i}", "--shard", f"{i}/3") == 0
        assert len(rows(tmp_path / f"s{i}")) == TOTAL // 3
    capsys.readouterr()
    assert main(["merge", str(tmp_path / "m"), *(str(tmp_path / f"s{i}") for i in (2, 0, 1))]) == 0
    printed = capsys.readouterr().out
    assert "no questions missing" in printed and "population.html" in printed
    assert_same(tmp_path / "m", ref)
    assert [r["index"] for r in rows(tmp_path / "m")] == [r["index"] for r in rows(ref)]


@pytest.mark.parametrize("extra, match", [
    (["--limit", "0"], "--limit 0"),
    (["--shard", "3/3"], "--shard 3/3"),
    (["--shard", "x"], "not i/n"),
    (["--batch-size", "0"], "--batch-size 0"),
    (["--bisect-steps", "-1"], "--bisect-steps"),
    (["--k-max", "0.5"], "--k-max"),
    (["--per-layer"], "--per-layer"),
    (["--pages", "some"], "--pages some: give wrong, changed, all or a number"),
    (["--pages", "0"], "--pages 0"),
    (["--limit", "2", "--shard", "2/3"], "selects no questions"),  # 2 questions, none at position 2 mod 3
])
def test_bad_inputs_fail_before_the_model_loads(tmp_path, monkeypatch, extra, match):
    monkeypatch.setattr(pop_cli, "weights_from_args", lambda *a: pytest.fail("the model was loaded"))
    argv = ["explain", "--split", "adversarial", "--out", str(tmp_path / "o"), *extra]
    t0 = time.monotonic()
    with pytest.raises(UserError, match=match):
        args = build_parser().parse_args(argv)
        args.func(args)
    assert time.monotonic() - t0 < 30
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("extra", [["--sample", "1", "--split", "all"], ["--sample", "1", "--limit", "3"],
                                   ["--question-id", "2", "--shard", "0/2"], ["--sample", "1", "--pages", "wrong"]])
def test_whole_split_options_with_one_sample_are_refused(extra):
    args = build_parser().parse_args(["explain", *extra])
    with pytest.raises(UserError, match="whole split|--split all"):
        args.func(args)


def test_pages_wrong_writes_a_page_per_wrong_answer_linked_from_the_population_page(tmp_path, capsys):
    """explain --split adversarial --limit 24 --pages wrong: one explain page per wrong answer (the 21st question's),
    from the run's records, linked from population.html, each under 1 MB, plotly.js stored once in the folder."""
    from plotly.offline import get_plotlyjs

    out = tmp_path / "p"
    argv = ["explain", "--split", "adversarial", "--limit", "24", "--batch-size", "12", "--k-max", "2",
            "--bisect-steps", "1", "--no-sweep", "--out", str(out)]
    assert main([*argv, "--pages", "wrong"]) == 0
    assert "the pages of --pages wrong in pages/" in capsys.readouterr().out
    q = pd.read_parquet(out / "questions.parquet")
    wrong = q[q.kind == "wrong"]
    assert len(q) == 24 and len(wrong) >= 1
    pages = {p.name for p in (out / "pages").iterdir()}
    assert pages == {f"explain-adversarial-{i}.html" for i in wrong.question_id.astype(str)}
    population = (out / "population.html").read_text(encoding="utf-8")
    plotly = get_plotlyjs()
    for row in wrong.to_dict("records"):
        name = f"pages/explain-adversarial-{row['question_id']}.html"
        assert f'<a href="{name}">adversarial:{row["question_id"]}</a>' in population
        page = (out / name).read_bytes()
        assert len(page) < 1_000_000
        text = page.decode("utf-8")
        assert '<script type="text/javascript" src="../plotly.min.js"></script>' in text
        assert f"outcome {row['outcome'].upper()}" in text and row["text"] in text
        assert text.count('class="figure"') >= 3  # the prefill trace plots, from the records
    # plotly.js once: in plotly.min.js, in no page
    holders = [p for p in out.rglob("*") if p.is_file() and p.suffix in (".html", ".js")
               and plotly[1000:1200] in p.read_text(encoding="utf-8")]
    assert holders == [out / "plotly.min.js"]
    assert '<script type="text/javascript" src="plotly.min.js"></script>' in population
    # the same run, every page: nothing is recomputed, and the long id lists fold
    assert main([*argv, "--pages", "all"]) == 0
    assert len(list((out / "pages").iterdir())) == 24
    population = (out / "population.html").read_text(encoding="utf-8")
    assert all(f'href="pages/explain-adversarial-{i}.html"' in population for i in wrong.question_id.astype(str))

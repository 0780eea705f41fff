"""The resumable, sharded POPE runner (mclcbf_diag.pope, mclcbf_diag.cli.pope) on the embedded model.

The steering config flips answers on the embedded model (attention logits of every text
token after the image, τ = 0.8), so the flip matrix is not trivially zero.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import floors
import pandas as pd
import pytest

from mclcbf_diag import pope as pope_lib
from mclcbf_diag.cli import build_parser, main
from mclcbf_diag.cli import pope as pope_cli
from mclcbf_diag.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
STEER = ["--preset", "fixed", "--set", "tokens=after_image", "--set", "tau=0.8"]
BASE = ["pope", "--split", "all", "--limit", "8", "--batch-size", "4", *STEER]  # 24 questions
TOTAL = 24


def pope(out, *extra, on_batch=None):
    args = build_parser().parse_args([*BASE, "--out", str(out), *extra])
    return pope_cli.cmd_pope(args, on_batch=on_batch)


def records(out):
    return [json.loads(line) for line in (Path(out) / "answers.jsonl").read_text().splitlines()]


def by_key(recs):
    return {(r["split"], str(r["question_id"])): r for r in recs}


def assert_same_results(out, ref, lm):
    """The rows of a run against the reference run's: the same answers; margins within the Yes − No margin's
    floor (``floors.margin_floor`` of ``lm``, the model both ran), since the questions were batched differently."""
    got, want = records(out), records(ref)
    keys = [(r["split"], str(r["question_id"])) for r in got]
    assert len(keys) == len(set(keys)) == TOTAL, "rows lost or duplicated"
    got, want = by_key(got), by_key(want)
    assert got.keys() == want.keys()
    floor = floors.margin_floor(lm, lm.tokens.yes_id, lm.tokens.no_id)
    for k, r in want.items():
        g = got[k]
        for col in ("label", "baseline_answer", "steered_answer", "flipped", "layers_fired"):
            assert g[col] == r[col], (k, col)
        for col in ("baseline_margin", "steered_margin"):
            assert g[col] == pytest.approx(r[col], rel=0, abs=floor), (k, col)
    pd.testing.assert_frame_equal(pd.read_csv(Path(out) / "flips.csv"), pd.read_csv(Path(ref) / "flips.csv"))
    # metrics.csv: every figure follows from the answers (the same), except the offsets on the margins (the bias
    # control's midpoint of two margins, the best offset): each a mean of two margins, within the margin's floor
    got_m, want_m = pd.read_csv(Path(out) / "metrics.csv"), pd.read_csv(Path(ref) / "metrics.csv")
    offsets = ["bias_offset", "best_offset"]
    pd.testing.assert_frame_equal(got_m.drop(columns=offsets), want_m.drop(columns=offsets), check_exact=True)
    for col in offsets:
        assert got_m[col].tolist() == pytest.approx(want_m[col].tolist(), rel=0, abs=floor, nan_ok=True), col


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    assert pope(out) == 0
    return out


def test_run_writes_every_output(ref):
    for name in ("run.json", "answers.jsonl", "metrics.csv", "flips.csv", "summary.html"):
        assert (ref / name).is_file(), name
    recs = records(ref)
    assert len(recs) == TOTAL
    assert {r["split"] for r in recs} == {"random", "popular", "adversarial"}
    assert any(r["flipped"] for r in recs), "the steering config should flip some answers"
    for r in recs:
        assert r["outcome"] in ("unchanged", "fixed", "broken", "derailed")
        assert 0 <= r["baseline_p_yes"] + r["baseline_p_no"] <= 1 + 1e-9 and r["baseline_valid"]
        lab, b, st = r["label"], r["baseline_answer"], r["steered_answer"]
        if r["steered_valid"]:
            want = "unchanged" if b == st else "fixed" if st == lab else "broken"
            assert r["outcome"] == want
        else:
            assert r["outcome"] == "derailed"
    flips = pd.read_csv(ref / "flips.csv")
    assert {"unchanged", "fixed", "broken", "derailed"} <= set(flips.columns)
    assert (flips[["unchanged", "fixed", "broken", "derailed"]].sum(axis=1) == flips.n).all()
    assert "fixed (wrong → right)" in (ref / "summary.html").read_text()
    page = (ref / "summary.html").read_text()
    assert "<script" in page and "<script src=" not in page  # plotly.js is inline
    run = json.loads((ref / "run.json").read_text())
    assert run["config"]["site"] == "attn_logits" and run["limit"] == 8 and run["shard"] is None


def test_metrics_equal_hand_recomputation(ref):
    recs = records(ref)
    metrics = pd.read_csv(ref / "metrics.csv")
    flips = pd.read_csv(ref / "flips.csv")
    for split in ("random", "popular", "adversarial", "all"):
        sel = recs if split == "all" else [r for r in recs if r["split"] == split]
        for cond in ("baseline", "steered"):
            pred = [r[f"{cond}_answer"] for r in sel]
            lab = [r["label"] for r in sel]
            tp = sum(p == "yes" and y == "yes" for p, y in zip(pred, lab))
            fp = sum(p == "yes" and y == "no" for p, y in zip(pred, lab))
            fn = sum(p == "no" and y == "yes" for p, y in zip(pred, lab))
            prec, rec = (tp / (tp + fp) if tp + fp else 0.0), tp / (tp + fn)
            row = metrics[(metrics.split == split) & (metrics.condition == cond)].iloc[0]
            assert row.n == len(sel)
            assert row.accuracy == pytest.approx(sum(p == y for p, y in zip(pred, lab)) / len(sel))
            assert row.precision == pytest.approx(prec)
            assert row.recall == pytest.approx(rec)
            assert row.f1 == pytest.approx(2 * prec * rec / (prec + rec) if prec + rec else 0.0)
            assert row.yes_ratio == pytest.approx(pred.count("yes") / len(sel))
        f = flips[flips.split == split].iloc[0]
        assert f.flipped == sum(r["flipped"] for r in sel)
        assert f.yes_to_no == sum(r["baseline_answer"] == "yes" and r["steered_answer"] == "no" for r in sel)
        assert f.no_to_yes == sum(r["baseline_answer"] == "no" and r["steered_answer"] == "yes" for r in sel)
        assert f.right_to_wrong == sum(r["baseline_answer"] == r["label"] != r["steered_answer"] for r in sel)
        assert f.wrong_to_right == sum(r["baseline_answer"] != r["label"] == r["steered_answer"] for r in sel)
    for r in recs:  # the flag and answers agree with the margins
        assert r["baseline_answer"] == ("yes" if r["baseline_margin"] > 0 else "no")
        assert r["flipped"] == (r["baseline_answer"] != r["steered_answer"])


def test_metrics_carry_the_paired_statistics_and_the_ledger(ref):
    """The steered rows of metrics.csv: McNemar against scipy's exact binomial test on counts made here from the
    rows, Δ accuracy from the rows, the intervals those of :func:`stats.paired_records` (tested against a slow
    reference in tests/test_measurements_stats.py); the baseline rows leave them empty. flips_questions.csv: every
    changed
    question with its margins, the control's answer by its rule, and whether the change survives it."""
    from scipy.stats import binomtest

    from mclcbf_diag.measurements import stats as S

    recs = records(ref)
    metrics = pd.read_csv(ref / "metrics.csv")
    assert metrics[metrics.condition == "baseline"].mcnemar_p.isna().all()
    for split in ("random", "popular", "adversarial", "all"):
        sel = recs if split == "all" else [r for r in recs if r["split"] == split]
        row = metrics[(metrics.split == split) & (metrics.condition == "steered")].iloc[0]
        right_b = [r["baseline_valid"] and r["baseline_answer"] == r["label"] for r in sel]
        right_s = [r["steered_valid"] and r["steered_answer"] == r["label"] for r in sel]
        b = sum(not x and y for x, y in zip(right_b, right_s))
        c = sum(x and not y for x, y in zip(right_b, right_s))
        assert (row.fixed_valid, row.broken_valid) == (b, c)
        assert row.mcnemar_p == pytest.approx(binomtest(b, b + c).pvalue if b + c else 1.0, rel=1e-12)
        assert row.d_accuracy == pytest.approx((sum(right_s) - sum(right_b)) / len(sel))
        assert row.d_accuracy_lo <= row.d_accuracy <= row.d_accuracy_hi
        want = S.paired_records(sel)
        for k in ("d_accuracy_lo", "d_accuracy_hi", "d_f1_lo", "d_f1_hi", "d_yes_ratio_lo", "d_yes_ratio_hi",
                  "bias_offset", "control_accuracy", "control_f1", "gain_over_control_lo", "gain_over_control_hi",
                  "best_offset_accuracy"):
            assert row[k] == pytest.approx(want[k], rel=0, abs=1e-12), (split, k)
        assert row.bias_label == want["bias_label"] and row.resamples == S.RESAMPLES
        yes = sum(r["steered_valid"] and r["steered_answer"] == "yes" for r in sel)
        if split != "all":  # the control answers yes as often as the intervention (no tied margins here)
            ctrl_yes = sum(r["baseline_valid"] and r["baseline_margin"] + row.bias_offset > 0 for r in sel)
            assert ctrl_yes == yes and row.control_yes_ratio == pytest.approx(yes / len(sel))
    ledger = pd.read_csv(ref / "flips_questions.csv")
    changed = [r for r in recs if r["outcome"] != "unchanged"]
    assert len(ledger) == len(changed) > 0
    by = {(r["split"], r["question_id"]): r for r in recs}
    for row in ledger.itertuples():
        r = by[(row.split, row.question_id)]
        assert (row.baseline_margin, row.steered_margin, row.outcome) == (r["baseline_margin"], r["steered_margin"],
                                                                          r["outcome"])
        off = metrics[(metrics.split == row.split) & (metrics.condition == "steered")].bias_offset.iloc[0]
        assert row.bias_offset == off
        assert row.control_answer == ("yes" if r["baseline_margin"] + off > 0 else "no")
        right = r["steered_valid"] and r["steered_answer"] == r["label"]
        assert row.survives_control == (right != (row.control_answer == r["label"]))
    page = (ref / "summary.html").read_text()
    assert "Is the difference real?" in page and "exact McNemar p" in page and "bias control" in page
    assert "Each count&#x27;s questions" in page or "Each count's questions" in page
    first = ledger.iloc[0]
    assert f"{first.split}:{first.question_id}" in page and 'href="#questions-' in page


def test_summary_shows_a_partial_banner_and_escapes_split_names(tmp_path, ref, capsys):
    from mclcbf_diag.pope.metrics import write_outputs

    recs = [{**r, "split": "<i>x</i>" if r["split"] == "random" else r["split"]} for r in records(ref)][:20]
    identity = {**json.loads((ref / "run.json").read_text()), "partial": {"expected": 24, "present": 20,
                                                                          "missing_shards": ["1/2"]}}
    identity["splits"] = ["<i>x</i>", "popular", "adversarial"]
    write_outputs(tmp_path, recs, identity)
    capsys.readouterr()
    page = (tmp_path / "summary.html").read_text()
    assert "partial: 20 of 24 questions" in page and "missing shards: 1/2" in page
    assert page.index("partial: 20 of 24 questions") < page.index("Is the difference real?")
    assert "<i>x</i>" not in page and "&lt;i&gt;x&lt;/i&gt;" in page
    assert "partial: " not in (ref / "summary.html").read_text()  # a whole run has no banner


def test_resume_after_an_interruption(tmp_path, ref, embedded_model):
    class Stop(Exception):
        pass

    def stop_after_two(n):
        if n == 2:
            raise Stop

    with pytest.raises(Stop):
        pope(tmp_path, on_batch=stop_after_two)
    assert len(records(tmp_path)) == 8
    assert pope(tmp_path) == 0
    assert_same_results(tmp_path, ref, embedded_model)


def test_resume_after_a_torn_last_line(tmp_path, ref, embedded_model):
    shutil.copy(ref / "run.json", tmp_path / "run.json")
    data = (ref / "answers.jsonl").read_bytes()
    lines = data.splitlines(keepends=True)
    kept = b"".join(lines[:13]) + lines[13][: len(lines[13]) // 2]  # 13 whole rows + half a row
    (tmp_path / "answers.jsonl").write_bytes(kept)
    assert pope(tmp_path) == 0
    assert_same_results(tmp_path, ref, embedded_model)


def test_sigkill_then_resume(tmp_path, ref, embedded_model):
    """A real ``kill -9`` while the runner writes, then a rerun: nothing lost or duplicated."""
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "mclcbf_diag.cli", *BASE, "--out", str(out)]
    cmd[cmd.index("--batch-size") + 1] = "1"  # many small appends: the kill lands mid-run
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    answers = out / "answers.jsonl"
    try:
        deadline = time.monotonic() + 120
        while not (answers.is_file() and answers.stat().st_size > 0):
            assert proc.poll() is None, "the runner ended before writing a row"
            assert time.monotonic() < deadline, "no rows after 120 s"
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    rows_at_kill = answers.read_bytes().count(b"\n")
    assert 0 < rows_at_kill < TOTAL, "the kill should land mid-run"
    assert pope(out, "--batch-size", "1") == 0  # the batch size is part of the run's identity (#34)
    assert_same_results(out, ref, embedded_model)


def test_rerun_of_a_finished_run_changes_nothing(ref, capsys):
    before = (ref / "answers.jsonl").read_bytes()
    assert pope(ref) == 0
    assert (ref / "answers.jsonl").read_bytes() == before


def test_other_config_in_the_same_out_is_refused(ref, capsys):
    argv = [*BASE, "--out", str(ref), "--set", "tau=0.5"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "config.tau_prefill" in err and "config.tau_decode" in err and "--out" in err
    with pytest.raises(UserError, match="limit"):
        pope(ref, "--limit", "9")


def test_shards_merged_equal_the_unsharded_run(tmp_path, ref, capsys, embedded_model):
    for i in (0, 1):
        assert pope(tmp_path / f"s{i}", "--shard", f"{i}/2") == 0
        assert len(records(tmp_path / f"s{i}")) == TOTAL // 2
    capsys.readouterr()
    assert main(["merge", str(tmp_path / "m"), str(tmp_path / "s1"), str(tmp_path / "s0")]) == 0
    printed = capsys.readouterr().out
    assert "no questions missing" in printed and "0 duplicate rows" in printed
    assert_same_results(tmp_path / "m", ref, embedded_model)
    assert [r["index"] for r in records(tmp_path / "m")] == [r["index"] for r in records(ref)]
    # one shard alone, given twice: refused as incomplete (#34), or with --partial marked so; the missing
    # shard, the missing questions and the duplicates are reported
    assert main(["merge", str(tmp_path / "m1"), str(tmp_path / "s0"), str(tmp_path / "s0")]) == 2
    assert "shards 1/2 missing; 12 of 24 questions present" in capsys.readouterr().err
    assert not (tmp_path / "m1").exists()
    assert main(["merge", "--partial", str(tmp_path / "m1"), str(tmp_path / "s0"), str(tmp_path / "s0")]) == 0
    captured = capsys.readouterr()
    assert "shards 1/2 missing; 12 of 24 questions present" in captured.err and "more than once" in captured.err
    assert "12 duplicate rows" in captured.out


def test_merge_refuses_mixed_configs(tmp_path, capsys):
    assert pope(tmp_path / "a", "--shard", "0/2", "--limit", "2") == 0
    assert pope(tmp_path / "b", "--shard", "1/2", "--limit", "2", "--set", "tau=0.9") == 0
    capsys.readouterr()
    assert main(["merge", str(tmp_path / "m"), str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    assert "config.tau_prefill" in capsys.readouterr().err
    assert main(["merge", str(tmp_path / "a"), str(tmp_path / "a")]) == 2


@pytest.mark.parametrize("text", ["2/2", "1/0", "a/b", "3", "-1/2", "1/2/3"])
def test_bad_shard_is_a_user_error(text, tmp_path, capsys):
    with pytest.raises(UserError, match="--shard"):
        pope_lib.parse_shard(text)
    assert main([*BASE, "--out", str(tmp_path), f"--shard={text}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mclcbf-diag: error: --shard") and "\n" not in err


def test_shard_selects_positions_modulo_n():
    files = pope_lib.question_files("random", None, None)
    assert pope_lib.parse_shard("1/3") == (1, 3)
    jobs = pope_lib.select_jobs(files, 10, (1, 3))
    assert [j.position for j in jobs] == [1, 4, 7]


def test_generate_records_text_of_both_conditions(tmp_path, capsys):
    assert pope(tmp_path, "--limit", "2", "--generate", "2") == 0
    # an activation edit steers the prompt's forward only under --generate, and the run says so
    assert "note: --generate 2 under --intervention mclcbf steers the prompt's forward only" in capsys.readouterr().err
    recs = records(tmp_path)
    assert len(recs) == 6
    for r in recs:
        assert r["baseline_text"] and r["steered_text"]
        assert r["baseline_text_answer"] in ("yes", "no")
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    assert {"baseline_text", "steered_text"} <= set(metrics.condition)
    # the parsed text answers are paired too (McNemar on their own fixed/broken), without a bias control: no margins
    from scipy.stats import binomtest

    from mclcbf_diag.measurements import stats as S

    text = metrics[(metrics.condition == "steered_text") & (metrics.split == "all")].iloc[0]
    b = sum(r["baseline_text_answer"] != r["label"] == r["steered_text_answer"] for r in recs)
    c = sum(r["baseline_text_answer"] == r["label"] != r["steered_text_answer"] for r in recs)
    assert (text.fixed_valid, text.broken_valid) == (b, c)
    assert text.mcnemar_p == pytest.approx(binomtest(b, b + c).pvalue if b + c else 1.0, rel=1e-12)
    assert pd.isna(text.bias_offset) and text.bias_label in (S.NO_CHANGE, S.NO_CONTROL)
    assert metrics[metrics.condition == "baseline_text"].mcnemar_p.isna().all()


def test_bad_numbers_are_user_errors(tmp_path):
    for extra in (["--limit", "0"], ["--batch-size", "0"], ["--generate", "-1"]):
        with pytest.raises(UserError):
            pope(tmp_path, *extra)


def test_pope_file_with_split_placeholder(tmp_path):
    src = ROOT / "mclcbf_diag" / "embedded" / "pope"
    for split in ("random", "adversarial"):
        shutil.copy(src / f"embedded_pope_{split}.json", tmp_path / f"coco_pope_{split}.json")
    argv = ["--split", "all", "--pope-file", str(tmp_path / "coco_pope_{split}.json"),
            "--image-dir", str(src / "images"), "--limit", "2"]
    with pytest.raises(UserError, match="popular"):  # the popular file is missing
        pope(tmp_path / "out", *argv)
    assert pope(tmp_path / "out", *[a if a != "all" else "random" for a in argv]) == 0
    assert {r["split"] for r in records(tmp_path / "out")} == {"random"}


@pytest.mark.skipif(__import__("importlib").util.find_spec("accelerate") is not None,
                    reason="accelerate installed: --device-map would load the model")
def test_device_map_without_accelerate_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="accelerate"):
        pope(tmp_path, "--limit", "1", "--device-map", "auto")


@pytest.mark.parametrize("extra, derailed", [
    (["--set", "span=detected", "--set", "tau=0.99", "--set", "clamp=none"], "some"),
    (["--set", "alpha=1e30", "--set", "span=detected", "--set", "clamp=none"], "all"),
])
def test_derailed_outputs_are_not_flips(tmp_path, extra, derailed):
    argv = ["pope", "--split", "adversarial", "--limit", "12", "--batch-size", "6", "--preset", "seed-exp6", *extra,
            "--out", str(tmp_path)]
    assert pope_cli.cmd_pope(build_parser().parse_args(argv)) == 0
    recs = records(tmp_path)
    n = sum(r["outcome"] == "derailed" for r in recs)
    assert n == len(recs) if derailed == "all" else 0 < n
    assert all(not r["steered_valid"] for r in recs if r["outcome"] == "derailed")
    metrics = pd.read_csv(tmp_path / "metrics.csv").set_index("condition")
    assert metrics.loc["steered", "not_yes_no"] == n
    assert metrics.loc["steered", "accuracy_valid"] <= metrics.loc["steered", "accuracy"]
    flips = pd.read_csv(tmp_path / "flips.csv")
    assert int(flips.derailed.iloc[0]) == n
    # the paired test counts a derailed answer as wrong: a right answer derailed is among McNemar's c
    right_derailed = sum(r["outcome"] == "derailed" and r["baseline_answer"] == r["label"] for r in recs)
    broken = sum(r["outcome"] == "broken" for r in recs)
    assert metrics.loc["steered", "broken_valid"] == right_derailed + broken
    assert metrics.loc["steered", "d_accuracy"] == pytest.approx(
        metrics.loc["steered", "accuracy_valid"] - metrics.loc["baseline", "accuracy_valid"])


# --------------------------------------------------------------------------- image mass per layer, timing
STORED = 5e-7  # answers.jsonl keeps each image mass as round(v, 6) (pope/answer.py): half a unit of the 6th decimal


def assert_same_masses(got, want, where, stored=1):
    """Image masses per layer by two routes (batched, a plain forward, a trace): each within its float32 floor
    (``floors.mass_floor`` at the larger of the two), plus :data:`STORED` for each of the ``stored`` sides read
    back from answers.jsonl."""
    assert len(got) == len(want), where
    for layer, (g, w) in enumerate(zip(got, want)):
        assert g == pytest.approx(w, rel=0, abs=floors.mass_floor(g, w) + stored * STORED), (where, layer)


def _plain_image_mass(lm, question, image_dir):
    """Reference: a plain HF eager forward with output_attentions=True.

    Returns the last row's head-mean image mass per layer."""
    import torch

    from mclcbf_diag.data import build_prompt, load_image, resolve_image

    inputs = lm.inputs(build_prompt(question.text), load_image(resolve_image(question, image_dir)))
    with torch.no_grad():
        att = lm.model(**inputs, output_attentions=True).attentions
    image = inputs["input_ids"][0] == lm.tokens.image_token_id
    return [float(a[0, :, -1, image].sum(-1).mean()) for a in att]


def _traced_image_mass(lm, question, image_dir, iv):
    """The single-sample trace's steered attn_image_mass (head mean) per layer."""
    from mclcbf_diag.data import load_image, resolve_image
    from mclcbf_diag.experiments.trace import trace_sample

    r = trace_sample(lm, question, load_image(resolve_image(question, image_dir)), iv).records
    r = r[(r.condition == "steered") & (r.metric == "attn_image_mass") & (r["head"] == -1)]
    return r.sort_values("layer").value.tolist()


def test_answers_carry_the_baseline_image_mass_of_a_plain_forward(ref, embedded_model):
    jobs = {j.key: j for j in pope_lib.select_jobs(pope_lib.question_files("all", None, None), 8, None)}
    n = embedded_model.n_layers
    for r in records(ref):
        job = jobs[(r["split"], str(r["question_id"]))]
        want = _plain_image_mass(embedded_model, job.question, job.image_dir)
        got = [r[f"baseline_image_mass_{i}"] for i in range(n)]
        assert_same_masses(got, want, job.key)
        assert all(0 <= r[f"steered_image_mass_{i}"] <= 1 + 1e-6 for i in range(n))
    # the attention-logit barrier moves the decision token's image mass somewhere
    assert any(abs(r[f"steered_image_mass_{i}"] - r[f"baseline_image_mass_{i}"]) > 1e-3
               for r in records(ref) for i in range(n))


@pytest.mark.parametrize("name", ["pai", "vista", "mclcbf-fixed"])
def test_steered_image_mass_is_the_one_the_trace_sees(embedded_model, name):
    """The intervened row after the edits (PAI: logits), also when ``prepare`` runs extra forwards (VISTA)."""
    from mclcbf_diag.interventions import resolve

    iv = resolve("mclcbf", "fixed", ["tokens=after_image", "tau=0.8"]) if name == "mclcbf-fixed" else resolve(name)
    jobs = pope_lib.select_jobs(pope_lib.question_files("adversarial", None, None), 5, None)
    timing = {}
    rows = pope_lib.answer_jobs(embedded_model, jobs, iv, timing=timing)
    n = embedded_model.n_layers
    moved = 0.0
    for j, r in zip(jobs, rows):
        want = _traced_image_mass(embedded_model, j.question, j.image_dir, iv)
        got = [r[f"steered_image_mass_{i}"] for i in range(n)]
        assert_same_masses(got, want, j.key)
        moved = max(moved, *(abs(g - r[f"baseline_image_mass_{i}"]) for i, g in enumerate(got)))
    assert moved > 1e-4, "the intervention should move the image mass at some layer"
    assert timing["inputs_seconds"] > 0 and timing["baseline_seconds"] > 0


def test_timing_is_kept_per_session_and_is_not_identity(tmp_path, ref, embedded_model):
    class Stop(Exception):
        pass

    def stop_after_two(n):
        if n == 2:
            raise Stop

    with pytest.raises(Stop):
        pope(tmp_path, on_batch=stop_after_two)
    first = json.loads((tmp_path / "timing.json").read_text())["sessions"]
    assert [s["questions"] for s in first] == [8]  # both batches on disk were timed
    assert pope(tmp_path) == 0
    sessions = json.loads((tmp_path / "timing.json").read_text())["sessions"]
    assert [s["questions"] for s in sessions] == [8, 16]
    for s in sessions:
        assert s["seconds"] > s["inputs_seconds"] + s["baseline_seconds"] > 0
        assert s["batch_size"] == 4 and s["torch_threads"] >= 1 and s["device"] == "cpu"
    assert_same_results(tmp_path, ref, embedded_model)
    assert "timing" not in json.loads((tmp_path / "run.json").read_text())
    assert pope(tmp_path) == 0  # nothing left to answer: no new session
    assert len(json.loads((tmp_path / "timing.json").read_text())["sessions"]) == 2


def test_generate_rows_carry_the_prefill_image_mass(tmp_path, ref):
    """With --generate the masses are the prompt's (prefill), the same as without generation."""
    assert pope(tmp_path, "--limit", "2", "--generate", "2") == 0
    want = by_key(records(ref))
    for k, r in by_key(records(tmp_path)).items():
        for cond in ("baseline", "steered"):
            cols = sorted(c for c in r if c.startswith(f"{cond}_image_mass_"))
            assert cols
            assert_same_masses([r[c] for c in cols], [want[k][c] for c in cols], (k, cond), stored=2)


def test_pope_generates_under_a_decoding_level_method(tmp_path, capsys):
    """``--generate`` under VCD: both conditions run engine.decode's loop; sampled twice with a seed, the same."""
    def run(name, *extra):
        assert main(["pope", "--split", "adversarial", "--limit", "3", "--batch-size", "3", "--intervention", "vcd",
                     "--generate", "3", *extra, "--out", str(tmp_path / name)]) == 0
        return sorted((r["question_id"], r["baseline_text"], r["steered_text"]) for r in records(tmp_path / name))

    greedy = run("g")
    assert all(isinstance(t, str) for row in greedy for t in row[1:])
    assert "steers the prompt's forward only" not in capsys.readouterr().err  # the loop steers every token
    assert json.loads((tmp_path / "g" / "run.json").read_text())["generate"] == 3
    assert run("s1", "--decoding", "sample", "--temperature", "2", "--seed", "4") == \
        run("s2", "--decoding", "sample", "--temperature", "2", "--seed", "4")


def test_pope_runs_operas_beam_search_and_records_its_penalty(tmp_path):
    assert main(["pope", "--split", "adversarial", "--limit", "2", "--intervention", "opera", "--generate", "4",
                 "--decoding", "beam", "--num-beams", "3", "--out", str(tmp_path / "o")]) == 0
    rows = records(tmp_path / "o")
    for r in rows:
        assert 1 <= len(r["opera_penalty"]) <= 4 and all(-1 <= p <= 0 for p in r["opera_penalty"])  # −image share
        assert r["opera_rollbacks"] == [] and isinstance(r["steered_text"], str)  # ≤ 10 tokens: none can happen
    run = json.loads((tmp_path / "o" / "run.json").read_text())
    assert run["decoding"]["num_beams"] == 3
    assert run["config"]["scale_factor"] == 50.0 and run["config"]["threshold"] == 15


def test_a_model_folder_moved_mid_run_resumes_and_shards_at_other_paths_merge(tmp_path, capsys):
    """``--model DIR``: the folder's path is where it sits, its files' digest what it holds. A run interrupted, its
    model folder moved, resumes under the new path (run.json then names it); a shard run from a copy elsewhere (another
    node's path) merges with it; a folder whose files differ is another model."""
    from mclcbf_diag import shipped

    shutil.copytree(shipped.WEIGHTS, tmp_path / "A")
    shutil.copytree(shipped.WEIGHTS, tmp_path / "C")
    small = ["pope", "--split", "random", "--limit", "4", "--batch-size", "1"]

    def run(out, model, *extra, on_batch=None):
        args = build_parser().parse_args([*small, "--model", str(model), "--out", str(out), *extra])
        return pope_cli.cmd_pope(args, on_batch=on_batch)

    def stop(n):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "s0", tmp_path / "A", "--shard", "0/2", on_batch=stop)
    assert len(records(tmp_path / "s0")) == 1
    (tmp_path / "A").rename(tmp_path / "B")
    assert run(tmp_path / "s0", tmp_path / "B", "--shard", "0/2") == 0
    assert len(records(tmp_path / "s0")) == 2 and len({r["run_id"] for r in records(tmp_path / "s0")}) == 1
    assert json.loads((tmp_path / "s0" / "run.json").read_text())["model"] == str((tmp_path / "B").resolve())
    assert run(tmp_path / "s1", tmp_path / "C", "--shard", "1/2") == 0
    capsys.readouterr()
    assert main(["merge", str(tmp_path / "m"), str(tmp_path / "s0"), str(tmp_path / "s1")]) == 0
    assert "no questions missing" in capsys.readouterr().out
    assert len({r["run_id"] for r in records(tmp_path / "m")}) == 1 and len(records(tmp_path / "m")) == 4
    # other bytes in the folder: another model, refused as such
    (tmp_path / "C" / "generation_config.json").write_text('{"bos_token_id": 1}\n')
    with pytest.raises(UserError, match="differs in: model_files"):
        run(tmp_path / "s0", tmp_path / "C", "--shard", "0/2")


def _local_identity(model: str, labels_file: str, **extra) -> dict:
    return {"format": 2, "model": model, "model_files": "m1", "images": "i1", "limit": 4,
            "labels": {"file": labels_file, "sha256": "l1", "entries": 3}, **extra}


def test_where_a_model_folder_or_labels_file_sits_is_not_the_runs_identity(tmp_path):
    from mclcbf_diag.pope.store import model_key, run_id

    here = _local_identity("/data/llava", "/data/labels.csv")
    there = _local_identity("/scratch/node7/llava", "/home/me/labels.csv")
    assert run_id(here) == run_id(there) and model_key(here) == model_key(there)
    for changed in ({"model_files": "m2"}, {"labels": {**here["labels"], "sha256": "l2"}}, {"limit": 8}):
        assert run_id({**here, **changed}) != run_id(here)
    assert model_key({**here, "model_files": "m2"}) != model_key(here)
    # a hub id, or the embedded model, is what it names (its downloaded files' digest also compared)
    hub = {**here, "model": "llava-hf/llava-1.5-7b-hf"}
    assert run_id(hub) != run_id({**hub, "model": "llava-hf/llava-1.5-13b-hf"}) != run_id(here)
    assert model_key(hub) == "llava-hf/llava-1.5-7b-hf" and model_key({"model": "embedded"}) == "embedded"
    # without a labels file, a hub id's and the embedded model's run_id is what earlier releases stamped
    from mclcbf_diag.pope.store import earlier_run_id

    for model in ("llava-hf/llava-1.5-7b-hf", "embedded"):
        plain = {k: v for k, v in {**here, "model": model}.items() if k != "labels"}
        assert run_id(plain) == earlier_run_id(plain)
    assert run_id(here) != earlier_run_id(here)  # a local folder's path left the digest


def test_a_run_whose_rows_carry_the_earlier_path_bound_run_id_resumes_restamped(tmp_path, capsys):
    """Rows written before a model folder's path left the run_id carry the earlier digest: such a run resumes (its rows
    restamped, with a note) and its shards merge; another run's rows are still refused."""
    from plain_refs import run_folder_with_one_answer

    from mclcbf_diag.pope.store import claim_out_dir, earlier_run_id, run_id

    old = _local_identity("/data/llava", "/data/labels.csv")
    assert earlier_run_id(old) != run_id(old)
    out = run_folder_with_one_answer(tmp_path / "run", old, split="random")
    rows = records(out)
    (out / "answers.jsonl").write_text(json.dumps({**rows[0], "run_id": earlier_run_id(old)}) + "\n")
    moved = _local_identity("/new/llava", "/new/labels.csv")
    assert claim_out_dir(out, moved) is False
    assert [r["run_id"] for r in records(out)] == [run_id(moved)]
    assert "carried the run_id of an earlier release" in capsys.readouterr().err
    kept = json.loads((out / "run.json").read_text())
    assert kept["model"] == "/new/llava" and kept["labels"]["file"] == "/new/labels.csv"
    # rows of another run beside a lost run.json: refused, earlier digest or not
    (out / "run.json").unlink()
    other = _local_identity("/data/llava", "/data/labels.csv", limit=8)
    (out / "answers.jsonl").write_text(json.dumps({**rows[0], "run_id": earlier_run_id(other)}) + "\n")
    with pytest.raises(UserError, match="do not carry this run's run_id"):
        claim_out_dir(out, old)
    # ... and this run's earlier rows beside a lost run.json are its own
    (out / "answers.jsonl").write_text(json.dumps({**rows[0], "run_id": earlier_run_id(old)}) + "\n")
    assert claim_out_dir(out, old) is False and [r["run_id"] for r in records(out)] == [run_id(old)]


def test_merge_takes_shards_stamped_with_the_earlier_run_id(tmp_path):
    from plain_refs import run_folder_with_one_answer

    from mclcbf_diag.pope.store import earlier_run_id, run_id

    ids = [_local_identity(f"/node{i}/llava", "/data/labels.csv", shard=f"{i}/2") for i in (0, 1)]
    dirs = []
    for i, ident in enumerate(ids):
        d = run_folder_with_one_answer(tmp_path / f"s{i}", ident, split="random")
        row = {**records(d)[0], "question_id": i + 1, "run_id": earlier_run_id(ident)}
        (d / "answers.jsonl").write_text(json.dumps(row) + "\n")
        dirs.append(d)
    got, _ = pope_cli._shard_records(dirs, ids)
    assert [r["run_id"] for r in got] == [run_id(ids[0])] * 2
    stranger = {**records(dirs[1])[0], "run_id": earlier_run_id({**ids[1], "limit": 8})}
    (dirs[1] / "answers.jsonl").write_text(json.dumps(stranger) + "\n")
    with pytest.raises(UserError, match="rows of another run"):
        pope_cli._shard_records(dirs, ids)

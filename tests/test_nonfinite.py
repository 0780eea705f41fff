"""Non-finite is never an effect: a dropped step is the outcome non_finite, and edits saturate.

A step that overflows is recorded and not applied; the run is then not the configured intervention,
so ``trace``, ``explain`` and ``pope`` report the outcome ``non_finite``, never "unchanged". The
attention-logit site's shift saturates instead of overflowing, so a dose-response of the corrected
preset stays finite up to k = 1024.
"""

from __future__ import annotations

import json
import math

import pandas as pd
import torch

from mclcbf_diag import barrier as B
from mclcbf_diag import shipped
from mclcbf_diag.cli import main
from mclcbf_diag.data import load_image, load_pope, resolve_image
from mclcbf_diag.experiments.trace import trace_sample

OVERFLOW = ["--set", "alpha=1e300", "--set", "clamp=none"]  # α·θ* is inf in float32: every step is dropped


def test_trace_prints_the_non_finite_outcome_not_unchanged(tmp_path, capsys, embedded_model):
    assert main(["trace", "--sample", "0", *OVERFLOW, "--out", str(tmp_path / "t")]) == 0
    printed = capsys.readouterr().out
    assert "outcome  NON_FINITE" in printed and "UNCHANGED" not in printed
    assert "not applied" in printed  # the ‖θ*‖/‖x‖ line says the step as applied overflowed
    summary = json.loads((tmp_path / "t" / "config.json").read_text())["summary"]
    assert summary["outcome"] == "non_finite" and summary["layers_dropped"]
    assert summary["margin_after"] == summary["margin_before"]  # nothing was applied: the baseline's answer


def test_pope_counts_the_non_finite_outcome(tmp_path, capsys, embedded_model):
    out = tmp_path / "p"
    assert main(["pope", "--split", "adversarial", "--limit", "4", *OVERFLOW, "--out", str(out)]) == 0
    capsys.readouterr()
    rows = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines() if line.strip()]
    assert len(rows) == 4 and {r["outcome"] for r in rows} == {"non_finite"} and all(r["steered_dropped"] for r in rows)
    flips = pd.read_csv(out / "flips.csv")
    assert flips.non_finite.tolist() == [4] and flips.unchanged.tolist() == [0]
    # a step that is huge but finite still runs, and is read as what it did
    assert main(["pope", "--split", "adversarial", "--limit", "4", "--set", "alpha=1e6", "--set", "clamp=none",
                 "--out", str(tmp_path / "q")]) == 0
    capsys.readouterr()
    assert pd.read_csv(tmp_path / "q" / "flips.csv").non_finite.tolist() == [0]


def test_explain_reports_the_non_finite_outcome_and_no_survival_claim(tmp_path, capsys, embedded_model):
    assert main(["explain", "--sample", "0", *OVERFLOW, "--k-max", "4",
                 "--out", str(tmp_path / "e")]) == 0
    printed = capsys.readouterr().out
    assert "it is non_finite" in printed and "[observed] The intervened run holds non-finite values" in printed
    assert "the step overflows and is not applied, so those multipliers were not tested" in printed
    assert "survives every multiplier" not in printed


def test_the_corrected_preset_stays_finite_up_to_k_1024(embedded_model):
    # its attention-logit shift once computed e^(k·δ) and gave NaN logits from k = 64 on questions 42 and 71
    questions = load_pope(shipped.pope_file("adversarial"))
    for index in (42, 71):
        q = questions[index]
        image = load_image(resolve_image(q, shipped.IMAGES))
        for k in (64, 1024):
            result = trace_sample(embedded_model, q, image, B.get_preset("fixed"), multiplier=k)
            logits = result.steered.steps[0].final_logits
            assert bool(torch.isfinite(logits).all()), (index, k)
            assert result.summary()["outcome"] != "non_finite" and math.isfinite(result.summary()["margin_after"])

"""Benchmark: what the paired statistics and the bias control add to a ``pope`` run's time.

    python benchmarks/pope_stats.py [--n 64] [--split all] [--batch-size 16] [--threads 1] [--repeats 3]
                                    [--resamples 10000]

Runs ``mclcbf-diag pope --split SPLIT --limit N`` once (into a temporary folder, model load
included, as a user runs it), then times, on the run's own rows, everything the statistics
add to writing its outputs: the paired table of every split and the pooled one
(:func:`mclcbf_diag.pope.metrics.paired_table`, ``--resamples`` bootstrap resamples), the
per-question ledger and the page's two sections. They use the stored margins only, no
forward. Target: ratio (statistics / pope run) below 5%. The statistics' time grows with the
questions (each resample draws n indices) as the answering does, so the ratio holds at the
full split; the per-question figures are printed for that check.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from mclcbf_diag.cli import main as cli
from mclcbf_diag.measurements import stats as S
from mclcbf_diag.memory import reuse_freed_memory
from mclcbf_diag.pope import metrics as M


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=64, help="questions per split (--limit)")
    ap.add_argument("--split", default="all", choices=["random", "popular", "adversarial", "all"])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="timings of the statistics (the best counts)")
    ap.add_argument("--resamples", type=int, default=S.RESAMPLES)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    reuse_freed_memory()  # freed tensors reused, not mapped afresh (mclcbf_diag.memory)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        t0 = time.perf_counter()
        rc = cli(["pope", "--split", args.split, "--limit", str(args.n), "--batch-size", str(args.batch_size),
                  "--preset", "fixed", "--out", str(out)])
        t_run = time.perf_counter() - t0
        if rc != 0:
            sys.exit(f"pope failed (exit {rc})")
        records = [json.loads(x) for x in (out / "answers.jsonl").read_text().splitlines()]
        identity = json.loads((out / "run.json").read_text())
    splits = identity.get("splits", [])
    best = float("inf")
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        paired = M.paired_table(records, splits, resamples=args.resamples)
        ledger = M.ledger_table(records, splits)
        M.paired_section(paired)
        M.count_links(records, ledger, identity)
        best = min(best, time.perf_counter() - t0)
    n = len(records)
    print(f"{n} questions ({args.split}, --limit {args.n}), torch threads {torch.get_num_threads()}, "
          f"{args.resamples} resamples; statistics: best of {args.repeats}")
    print(f"pope run (model load, answering, outputs)  {t_run:8.2f} s  ({t_run / n * 1e3:.2f} ms/question)")
    print(f"paired statistics, bias control, ledger    {best:8.3f} s  ({best / n * 1e3:.3f} ms/question)")
    print(f"ratio statistics / pope run = {100 * best / t_run:.2f}%  (target < 5%)")


if __name__ == "__main__":
    main()

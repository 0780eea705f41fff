"""The command-line options the POPE-question benchmarks share (imported by the scripts, not run)."""

from __future__ import annotations

import argparse

from mclcbf_diag import pope


def question_options(description: str, *, repeats: int) -> argparse.ArgumentParser:
    """A parser with --model, --n questions of --split, --batch-size, --threads and --repeats."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model", default=None)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--split", default="adversarial", choices=pope.SPLITS)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=repeats)
    return ap

"""``mclcbf-diag explain`` (mclcbf_diag.cli.explain): refusals in a fresh process, and one small run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pandas as pd
import pytest

from mclcbf_diag.cli import main

FAST = 5.0  # seconds: a refusal comes before the model (and, for plain argument checks, before torch) loads
_PROBE = ("import json, sys\nfrom mclcbf_diag.cli import main\nrc = main(json.loads(sys.argv[1]))\n"
          "print('torch loaded' if 'torch' in sys.modules else 'torch not loaded')\nsys.exit(rc)")


def _refused(argv, cwd, *fragments, fast: bool = True, **env) -> tuple[str, bool]:
    """Run the CLI in a fresh process; expect status 2 and one line holding ``fragments`` (the input, the
    problem, the fix), without a traceback, in under FAST seconds unless ``fast=False``. Returns the line and
    whether torch had been imported."""
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(argv)], capture_output=True, text=True, check=False,
                          cwd=cwd, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **env})
    took = time.monotonic() - start
    err = proc.stderr
    assert proc.returncode == 2 and "Traceback" not in proc.stdout + err, (argv, proc.returncode, err)
    assert err.count("\n") == 1 and err.startswith("mclcbf-diag: error: "), err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert took < FAST or not fast, f"{argv}: refused after {took:.1f} s"
    return err.strip(), proc.stdout.strip().splitlines()[-1:] == ["torch loaded"]


@pytest.mark.parametrize("argv, fragments", [
    (["explain", "--k-max", "0"], ["--k-max 0.0", "starts at k = 1", "give a value >= 1"]),
    (["explain", "--k-max", "1e13"], ["--k-max 1", "at most 1e12"]),
    (["explain", "--preset", "bogus"], ["unknown preset 'bogus'", "valid presets", "seed-exp6"]),
    (["explain", "--set", "tau=abc"], ["tau"]),
    (["explain", "--sample", "-1"], ["--sample -1 is out of range"]),
])
def test_explain_refusals_are_one_fast_line(tmp_path, argv, fragments):
    _, torch_loaded = _refused(argv, tmp_path, *fragments)
    assert not torch_loaded and not (tmp_path / "reports").exists()


def test_explain_small_run_prints_the_verdict_and_writes_page_and_records(tmp_path, capsys):
    out = tmp_path / "e"
    assert main(["explain", "--sample", "0", "--k-max", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["explain-1.html", "explain-1.parquet"]
    for part in ("outcome", "No multiplier" if "No multiplier" in printed else "k =", "cause chain: "):
        assert part in printed
    records = pd.read_parquet(out / "explain-1.parquet")
    assert {"baseline", "steered"} <= set(records.condition)
    html = (out / "explain-1.html").read_text()
    assert "Counterfactual fixes" in html and "Dose-response" in html

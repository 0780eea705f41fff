"""``mclcbf-diag compare`` (mclcbf_diag.cli.compare): refusals in a fresh process.

A full comparison of two finished runs is in tests/test_compare.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

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


def test_compare_refuses_a_folder_that_is_no_run(tmp_path):
    (tmp_path / "empty").mkdir()
    line, torch_loaded = _refused(["compare", str(tmp_path / "empty")], tmp_path, "run.json is missing",
                                  "finished `mclcbf-diag pope` run", "Run pope into it first")
    assert "empty" in line and not torch_loaded


def test_compare_needs_a_run_folder_argument(tmp_path):
    _refused(["compare"], tmp_path, "RUN_DIR", "--help")


@pytest.mark.parametrize("damage", ["", "{not json", "[1, 2]"])
def test_compare_refuses_a_damaged_run_json(tmp_path, damage):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(damage)
    _refused(["compare", str(run)], tmp_path, "run")

"""``mclcbf-diag pope`` and ``merge`` (mclcbf_diag.cli.pope): refusals in a fresh process.

Runs, resuming, sharding and merging are in tests/test_pope.py and tests/test_distributed.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

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


def _refused_here(capsys, argv, *fragments) -> str:
    """The same refusal in this process (imports already warm): status 2, one line holding ``fragments``."""
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err
    assert err.count("\n") == 1 and err.startswith("mclcbf-diag: error: ") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err.strip()


@pytest.mark.parametrize("argv, fragments", [
    (["pope", "--batch-size", "0"], ["--batch-size 0 must be >= 1"]),
    (["pope", "--batch-size", "100000"], ["--batch-size 100000 is more than", "pass a smaller batch"]),
    (["pope", "--limit", "0"], ["--limit 0 must be >= 1"]),
    (["pope", "--generate", "100000"], ["--generate 100000", "MCLCBF_DIAG_MAX_NEW_TOKENS"]),
    (["pope", "--set", "layers=1,9"], ["layers [9] out of range", "0.."]),
    (["pope", "--shard", "2/2"], ["2/2"]),
])
def test_pope_refusals_are_one_fast_line(tmp_path, argv, fragments):
    _refused([*argv, "--out", str(tmp_path / "p")], tmp_path, *fragments)
    assert not (tmp_path / "p").exists()


def test_merge_refuses_folders_without_a_run(tmp_path):
    (tmp_path / "a").mkdir()
    _refused(["merge", str(tmp_path / "m"), str(tmp_path / "a")], tmp_path, "has no run.json",
             "mclcbf-diag pope --shard i/n --out DIR")
    assert not (tmp_path / "m").exists()


def test_merge_refuses_to_merge_into_a_shard(tmp_path):
    (tmp_path / "a").mkdir()
    _refused(["merge", str(tmp_path / "a"), str(tmp_path / "a")], tmp_path, "is one of the shard folders",
             "pass a new folder")


def test_pope_refuses_an_unknown_intervention_in_one_line(tmp_path, capsys):
    _refused_here(capsys, ["pope", "--intervention", "bogus", "--out", str(tmp_path / "p")],
                  "unknown intervention 'bogus'", "choose one of", "mclcbf")
    assert not (tmp_path / "p").exists()


def test_pope_refuses_an_unknown_intervention_before_torch_loads(tmp_path):
    _, torch_loaded = _refused(["pope", "--intervention", "bogus", "--out", str(tmp_path / "p")], tmp_path, fast=False)
    assert not torch_loaded

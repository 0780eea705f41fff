"""``mclcbf-diag flow`` (mclcbf_diag.cli.flow): refusals in a fresh process (the run: tests/test_flow.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

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


def test_flow_refuses_a_window_below_one_in_one_line(tmp_path, capsys):
    _refused_here(capsys, ["flow", "--window", "0", "--out", str(tmp_path / "o")], "--window 0",
                  "positive number of layers", "--window 2")
    assert not (tmp_path / "o").exists()


def test_flow_refuses_a_window_below_one_before_torch_loads(tmp_path):
    _, torch_loaded = _refused(["flow", "--window", "0"], tmp_path, fast=False)
    assert not torch_loaded


def test_flow_refuses_a_window_deeper_than_the_model_before_reading_the_weights(capsys, monkeypatch):
    from mclcbf_diag.models import loading

    def no_weights(*a, **k):
        raise AssertionError("the weights were read before the mistake was reported")

    monkeypatch.setattr(loading, "load_weights", no_weights)
    assert main(["flow", "--window", "99"]) == 2
    assert "deeper than the model" in capsys.readouterr().err


def test_flow_window_deeper_than_the_model_names_the_depth(tmp_path, capsys):
    from mclcbf_diag.cli.common import local_depth

    n = local_depth(None)
    _refused_here(capsys, ["flow", "--window", "99", "--out", str(tmp_path / "o")],
                  f"--window 99 is deeper than the model ({n} layers); give at most {n}")
    assert not (tmp_path / "o").exists()

"""The CLI refusal checks the tests/test_cli_*.py files share (not a test module).

A refusal is exit status 2 and one line on stderr naming the input, the problem and the fix,
without a traceback; run in a fresh process it must also come fast (before the model loads).
"""

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


def refused(argv, cwd, *fragments, fast: bool = True, **env) -> tuple[str, bool]:
    """Run the CLI in a fresh process; expect status 2 and one line holding ``fragments`` (the input, the
    problem, the fix), without a traceback, in under FAST seconds unless ``fast=False``. Returns the line and
    whether torch had been imported."""
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(argv)], capture_output=True, text=True, check=False,
                          cwd=cwd, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                                                     **env})
    took = time.monotonic() - start
    err = proc.stderr
    assert proc.returncode == 2 and "Traceback" not in proc.stdout + err, (argv, proc.returncode, err)
    assert err.count("\n") == 1 and err.startswith("mclcbf-diag: error: "), err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert took < FAST or not fast, f"{argv}: refused after {took:.1f} s"
    return err.strip(), proc.stdout.strip().splitlines()[-1:] == ["torch loaded"]


def refused_here(capsys, argv, *fragments) -> str:
    """The same refusal in this process (imports already warm): status 2, one line holding ``fragments``."""
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err
    assert err.count("\n") == 1 and err.startswith("mclcbf-diag: error: ") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err.strip()


def ran(argv, cwd) -> tuple[int, str, float, bool]:
    """Run the CLI in a fresh process that should succeed: (status, stdout less the probe's line, seconds, whether
    torch had been imported)."""
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(argv)], capture_output=True, text=True, check=False,
                          cwd=cwd, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    took = time.monotonic() - start
    *out, probe = proc.stdout.rstrip("\n").split("\n")
    return proc.returncode, "\n".join(out), took, probe == "torch loaded"


def child_cpu(call):
    """``(call(), CPU seconds)``: the user + system time of the child processes ``call`` ran and waited for, a
    command's own cost where wall time would add the wait for a core that the other test workers keep busy."""
    before = os.times()
    result = call()
    after = os.times()
    return result, after.children_user + after.children_system - before.children_user - before.children_system

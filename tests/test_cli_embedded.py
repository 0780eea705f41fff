"""``mclcbf-diag embedded`` (alias ``zoo``; mclcbf_diag.cli.embedded): refusals, and regenerating a tiny POPE set."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from mclcbf_diag.cli import main
from mclcbf_diag.data import load_pope

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
    (["embedded", "train", "--steps", "0"], ["--steps 0 must be >= 1"]),
    (["embedded", "train", "--batch-size", "0"], ["--batch-size 0 must be >= 1"]),
    (["embedded", "data", "--images", "-5"], ["--images -5 must be >= 1", "images to generate"]),
    (["embedded", "data", "--images", "0"], ["--images 0 must be >= 1"]),
    (["embedded", "bogus"], ["invalid choice", "bogus"]),
])
def test_embedded_refusals_are_one_line(tmp_path, capsys, argv, fragments):
    if argv[1] == "bogus":  # argparse's own error: exits through SystemExit
        with pytest.raises(SystemExit):
            main(argv)
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and all(f in err for f in fragments), err
        return
    _refused_here(capsys, [*argv, "--out", str(tmp_path / "o")], *fragments)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv", [["embedded", "train", "--steps", "0"], ["embedded", "data", "--images", "0"]])
def test_embedded_train_and_data_refuse_bad_numbers_before_torch_loads(tmp_path, argv):
    _, torch_loaded = _refused([*argv, "--out", str(tmp_path / "o")], tmp_path, fast=False)
    assert not torch_loaded


def test_embedded_eval_refuses_zero_images_before_torch_loads(tmp_path, capsys):
    _refused_here(capsys, ["embedded", "eval", "--images", "0"], "--images 0 must be >= 1", "held-out images")
    _, torch_loaded = _refused(["embedded", "eval", "--images", "0"], tmp_path, fast=False)
    assert not torch_loaded


def test_embedded_data_writes_a_loadable_pope_set(tmp_path, capsys):
    out = tmp_path / "pope"
    assert main(["embedded", "data", "--images", "2", "--seed", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for split in ("random", "popular", "adversarial"):
        path = out / f"embedded_pope_{split}.json"
        assert f"{split}: " in printed and path.exists()
        questions = load_pope(path)
        assert questions and {q.label for q in questions} <= {"yes", "no"}
        assert all((out / "images" / q.image).exists() or (out / q.image).exists() for q in questions)

"""``mclcbf-diag embedded`` (alias ``zoo``; mclcbf_diag.cli.embedded): refusals, and regenerating a tiny POPE set."""

from __future__ import annotations

import pytest
from cli_refusals import FAST, refused, refused_here  # noqa: F401

from mclcbf_diag.cli import main
from mclcbf_diag.data import load_pope


@pytest.mark.parametrize("argv, fragments", [
    (["embedded", "train", "--steps", "0"], ["--steps 0 must be >= 1"]),
    (["embedded", "train", "--batch-size", "0"], ["--batch-size 0 must be >= 1"]),
    (["embedded", "train", "--checkpoint-every", "-1"], ["--checkpoint-every -1 must be >= 0"]),
    (["embedded", "train", "--text-loss", "-0.5"], ["--text-loss -0.5 must be >= 0"]),
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
    refused_here(capsys, [*argv, "--out", str(tmp_path / "o")], *fragments)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv", [["embedded", "train", "--steps", "0"], ["embedded", "data", "--images", "0"]])
def test_embedded_train_and_data_refuse_bad_numbers_before_torch_loads(tmp_path, argv):
    _, torch_loaded = refused([*argv, "--out", str(tmp_path / "o")], tmp_path, fast=False)
    assert not torch_loaded


def test_the_training_module_points_to_the_command_line():
    """One entry point: ``python -m mclcbf_diag.embedded.train`` names the command instead of training."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "mclcbf_diag.embedded.train", "--out", "x"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1 and "mclcbf-diag embedded train" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_embedded_eval_refuses_zero_images_before_torch_loads(tmp_path, capsys):
    refused_here(capsys, ["embedded", "eval", "--images", "0"], "--images 0 must be >= 1", "held-out images")
    _, torch_loaded = refused(["embedded", "eval", "--images", "0"], tmp_path, fast=False)
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

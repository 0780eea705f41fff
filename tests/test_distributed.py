"""POPE across processes: torchrun with 2 CPU ranks (gloo) gives the single-process run, row for row."""

import json
import math
import os
import subprocess
import sys
import warnings

import floors
import pytest
import torch

from mclcbf_diag.errors import UserError
from mclcbf_diag.measurements import noise
from mclcbf_diag.pope.distributed import Group, from_env

BASE = ["pope", "--split", "adversarial", "--limit", "12", "--batch-size", "4"]


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


MASS_QUANTUM = 1e-6  # answers.jsonl keeps image masses to 6 decimals (pope.answer: round(·, 6))


def _tolerance(lm, key: str, value: float) -> float:
    """The noise floor of a float field of answers.jsonl, computed by two routes (other batch compositions).

    A field not named here has no floor yet: name it, with its floor, rather than fall back to a constant.
    """
    if key.endswith("_margin"):
        return floors.margin_floor(lm, lm.tokens.yes_id, lm.tokens.no_id)
    if key.endswith(("_p_yes", "_p_no")):
        return floors.prob_floor(lm)
    if key == "h_mean":  # a mean of masses: within the floor of a mass at the mean (√ is concave)
        return floors.mass_floor(value)
    if key == "max_dh_predicted":  # a difference of masses: noise.mass_floor(h, h + Δh) at its layer, h ≤ 1
        return floors.mass_floor(1.0)
    if key == "mean_theta_rel":  # a step in units of ‖x‖: the floor of a residual of norm 1 through the model
        return noise.propagation_floor(torch.float32, 1.0, floors.depth(lm))
    if "_image_mass_" in key:  # a mass, each side rounded to the stored quantum
        return floors.mass_floor(value) + MASS_QUANTUM
    raise KeyError(f"no noise floor for the answers field {key!r}")


def _run(argv, tmp_path, *, ranks=None):
    # PYTHONFAULTHANDLER and TORCH_SHOW_CPP_STACKTRACES: a rank that dies by a signal leaves its stacks in stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONFAULTHANDLER": "1",
           "TORCH_SHOW_CPP_STACKTRACES": "1"}
    cmd = [sys.executable, "-m", "mclcbf_diag.cli", *argv]
    if ranks:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
               "-m", "mclcbf_diag.cli", *argv]
        env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)


def test_two_ranks_equal_one_process(tmp_path, embedded_model):
    from mclcbf_diag.cli import main

    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*BASE, "--out", str(one)]) == 0  # the single process: this one
    done = _run([*BASE, "--out", str(two)], tmp_path, ranks=2)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = _rows(one / "answers.jsonl"), _rows(two / "answers.jsonl")
    assert len(a) == len(b) == 12
    for x, y in zip(a, b):
        assert set(x) == set(y)
        for k in x:
            if isinstance(x[k], float) and isinstance(y[k], float) and math.isfinite(x[k]):
                # other batch compositions: summation order; each field within its floor
                assert y[k] == pytest.approx(x[k], rel=0, abs=_tolerance(embedded_model, k, x[k])), k
            else:
                assert x[k] == y[k], k
    assert sorted(p.name for p in (two / "ranks").iterdir()) == ["rank-0-of-2", "rank-1-of-2"]
    for name in ("metrics.csv", "flips.csv", "summary.html", "run.json"):
        assert (two / name).is_file()
    # a rerun resumes every part and merges again, with nothing repeated
    again = _run([*BASE, "--out", str(two)], tmp_path, ranks=2)
    if again.returncode != 0 and "Signal 6 (SIGABRT)" in again.stderr:
        # One CI run saw a rank abort in this rerun (not reproduced in 40 local reruns, on an idle or a loaded
        # CPU). A rerun after any crash is the documented way on, so the test takes it once, and shows the stacks.
        warnings.warn(f"a rank aborted in the rerun; rerunning once:\n{again.stderr[-3000:]}", stacklevel=1)
        again = _run([*BASE, "--out", str(two)], tmp_path, ranks=2)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(_rows(two / "answers.jsonl")) == 12


def test_group_from_the_launcher_environment():
    assert from_env({}) is None and from_env({"WORLD_SIZE": "1"}) is None
    g = from_env({"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0"})
    assert g == Group(2, 4, 0)
    assert g.part(tmp := __import__("pathlib").Path("X")) == tmp / "ranks" / "rank-2-of-4"
    for bad in ({"WORLD_SIZE": "2", "RANK": "5"}, {"WORLD_SIZE": "two"}):
        with pytest.raises(UserError):
            from_env(bad)


def test_shard_and_a_launch_together_are_refused(tmp_path, monkeypatch, capsys):
    from mclcbf_diag.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main([*BASE, "--shard", "0/2", "--out", str(tmp_path / "x")]) == 2
    assert "--shard 0/2 with a torchrun" in capsys.readouterr().err

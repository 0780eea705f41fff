"""POPE across processes: torchrun with 2 CPU ranks (gloo) gives the single-process run, row for row."""

import json
import math
import os
import subprocess
import sys

import pytest

from mclcbf_diag.errors import UserError
from mclcbf_diag.pope.distributed import Group, from_env

BASE = ["pope", "--split", "adversarial", "--limit", "12", "--batch-size", "4"]


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _run(argv, tmp_path, *, ranks=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "mclcbf_diag.cli", *argv]
    if ranks:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
               "-m", "mclcbf_diag.cli", *argv]
        env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)


def test_two_ranks_equal_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert _run([*BASE, "--out", str(one)], tmp_path).returncode == 0
    done = _run([*BASE, "--out", str(two)], tmp_path, ranks=2)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = _rows(one / "answers.jsonl"), _rows(two / "answers.jsonl")
    assert len(a) == len(b) == 12
    for x, y in zip(a, b):
        assert set(x) == set(y)
        for k in x:
            if isinstance(x[k], float) and isinstance(y[k], float) and math.isfinite(x[k]):
                assert y[k] == pytest.approx(x[k], abs=1e-4), k  # other batch compositions: summation order
            else:
                assert x[k] == y[k], k
    assert sorted(p.name for p in (two / "ranks").iterdir()) == ["rank-0-of-2", "rank-1-of-2"]
    for name in ("metrics.csv", "flips.csv", "summary.html", "run.json"):
        assert (two / name).is_file()
    # a rerun resumes every part and merges again, with nothing repeated
    again = _run([*BASE, "--out", str(two)], tmp_path, ranks=2)
    assert again.returncode == 0 and len(_rows(two / "answers.jsonl")) == 12


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

"""``mclcbf-diag pope`` and ``merge`` (mclcbf_diag.cli.pope): refusals in a fresh process.

Runs, resuming, sharding and merging are in tests/test_pope.py and tests/test_distributed.py.
"""

from __future__ import annotations

import pytest
from cli_refusals import FAST, refused, refused_here  # noqa: F401


@pytest.mark.parametrize("argv, fragments", [
    (["pope", "--batch-size", "0"], ["--batch-size 0 must be >= 1"]),
    (["pope", "--batch-size", "100000"], ["--batch-size 100000 is more than", "pass a smaller batch"]),
    (["pope", "--limit", "0"], ["--limit 0 must be >= 1"]),
    (["pope", "--generate", "100000"], ["--generate 100000", "MCLCBF_DIAG_MAX_NEW_TOKENS"]),
    (["pope", "--set", "layers=1,9"], ["layers [9] out of range", "0.."]),
    (["pope", "--shard", "2/2"], ["2/2"]),
])
def test_pope_refusals_are_one_fast_line(tmp_path, argv, fragments):
    refused([*argv, "--out", str(tmp_path / "p")], tmp_path, *fragments)
    assert not (tmp_path / "p").exists()


def test_merge_refuses_folders_without_a_run(tmp_path):
    (tmp_path / "a").mkdir()
    refused(["merge", str(tmp_path / "m"), str(tmp_path / "a")], tmp_path, "has no run.json",
             "mclcbf-diag pope --shard i/n --out DIR")
    assert not (tmp_path / "m").exists()


def test_merge_refuses_to_merge_into_a_shard(tmp_path):
    (tmp_path / "a").mkdir()
    refused(["merge", str(tmp_path / "a"), str(tmp_path / "a")], tmp_path, "is one of the shard folders",
             "pass a new folder")


def test_pope_refuses_an_unknown_intervention_in_one_line(tmp_path, capsys):
    refused_here(capsys, ["pope", "--intervention", "bogus", "--out", str(tmp_path / "p")],
                  "unknown intervention 'bogus'", "choose one of", "mclcbf")
    assert not (tmp_path / "p").exists()


def test_pope_refuses_an_unknown_intervention_before_torch_loads(tmp_path):
    _, torch_loaded = refused(["pope", "--intervention", "bogus", "--out", str(tmp_path / "p")], tmp_path, fast=False)
    assert not torch_loaded

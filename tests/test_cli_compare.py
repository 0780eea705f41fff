"""``mclcbf-diag compare`` (mclcbf_diag.cli.compare): refusals in a fresh process.

A full comparison of two finished runs is in tests/test_compare.py.
"""

from __future__ import annotations

import pytest
from cli_refusals import FAST, refused, refused_here  # noqa: F401


def test_compare_refuses_a_folder_that_is_no_run(tmp_path):
    (tmp_path / "empty").mkdir()
    line, torch_loaded = refused(["compare", str(tmp_path / "empty")], tmp_path, "run.json is missing",
                                  "finished `mclcbf-diag pope` run", "Run pope into it first")
    assert "empty" in line and not torch_loaded


def test_compare_needs_a_run_folder_argument(tmp_path):
    refused(["compare"], tmp_path, "RUN_DIR", "--help")


@pytest.mark.parametrize("damage", ["", "{not json", "[1, 2]"])
def test_compare_refuses_a_damaged_run_json(tmp_path, damage):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(damage)
    refused(["compare", str(run)], tmp_path, "run")

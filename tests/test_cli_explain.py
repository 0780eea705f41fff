"""``mclcbf-diag explain`` (mclcbf_diag.cli.explain): refusals in a fresh process, and one small run."""

from __future__ import annotations

import pandas as pd
import pytest
from cli_refusals import FAST, refused, refused_here  # noqa: F401

from mclcbf_diag.cli import main


@pytest.mark.parametrize("argv, fragments", [
    (["explain", "--k-max", "0"], ["--k-max 0.0", "starts at k = 1", "give a value >= 1"]),
    (["explain", "--k-max", "1e13"], ["--k-max 1", "at most 1e12"]),
    (["explain", "--preset", "bogus"], ["unknown preset 'bogus'", "valid presets", "seed-exp6"]),
    (["explain", "--set", "tau=abc"], ["tau"]),
    (["explain", "--sample", "-1"], ["--sample -1 is out of range"]),
])
def test_explain_refusals_are_one_fast_line(tmp_path, argv, fragments):
    _, torch_loaded = refused(argv, tmp_path, *fragments)
    assert not torch_loaded and not (tmp_path / "reports").exists()


def test_explain_small_run_prints_the_verdict_and_writes_page_and_records(tmp_path, capsys):
    out = tmp_path / "e"
    assert main(["explain", "--sample", "0", "--k-max", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [".mclcbf-diag.lock", "explain-1.html", "explain-1.parquet"]
    for part in ("outcome", "No multiplier" if "No multiplier" in printed else "k =", "cause chain: "):
        assert part in printed
    records = pd.read_parquet(out / "explain-1.parquet")
    assert {"baseline", "steered"} <= set(records.condition)
    html = (out / "explain-1.html").read_text()
    assert "Counterfactual fixes" in html and "Dose-response" in html

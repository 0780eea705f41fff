"""mclcbf-diag compare: finished POPE runs side by side, figures read back from each run's own files."""

import pandas as pd

from mclcbf_diag.cli import main
from mclcbf_diag.pope.compare import REPORTED, compare_runs


def test_compare_reads_each_run(tmp_path, capsys):
    runs = {"seed": ["--preset", "seed-exp6"], "pai": ["--intervention", "pai"]}
    for name, opts in runs.items():
        assert main(["pope", "--split", "adversarial", "--limit", "16", *opts, "--out", str(tmp_path / name)]) == 0
    capsys.readouterr()
    table = compare_runs([tmp_path / "seed", tmp_path / "pai"])
    assert list(table.intervention) == ["mclcbf", "pai"]
    for row, name in zip(table.itertuples(), runs):
        metrics = pd.read_csv(tmp_path / name / "metrics.csv")
        flips = pd.read_csv(tmp_path / name / "flips.csv")
        assert row.accuracy == metrics[metrics.condition == "steered"].accuracy.iloc[0]
        logit = flips[flips.answer == "logit"].iloc[0]
        assert (row.unchanged, row.fixed, row.broken, row.derailed) == tuple(
            int(logit[k]) for k in ("unchanged", "fixed", "broken", "derailed"))
        assert row.unchanged + row.fixed + row.broken + row.derailed == row.n == 16
        assert row.reported_on_llava_1_5_7b == REPORTED[row.intervention]
    assert main(["compare", str(tmp_path / "seed"), str(tmp_path / "pai"), "--out", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    assert "| `pai` |" in out and (tmp_path / "cmp" / "compare.html").is_file()


def test_compare_refuses_an_unfinished_folder(tmp_path, capsys):
    assert main(["compare", str(tmp_path)]) == 2
    assert "run.json is missing" in capsys.readouterr().err

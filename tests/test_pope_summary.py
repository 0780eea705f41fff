"""The greedy-beside-sampled summary of a comparison (mclcbf_diag.pope.summary), on hand-made tables: each cell is
one of the table's numbers, or their mean and sample standard deviation over the seeds, recomputed here by hand."""

import math
import statistics

import pandas as pd
import pytest

from mclcbf_diag.pope.summary import decoding_summary, setting_of, summary_markdown


def row(name, settings, split, accuracy, d, lo, hi, fixed, broken, p_holm, derailed=0, explained=False,
        label_set="question file"):
    return {"intervention": name, "settings": settings, "split": split, "label_set": label_set,
            "accuracy": accuracy, "d_accuracy": d, "d_accuracy_lo": lo, "d_accuracy_hi": hi, "fixed": fixed,
            "broken": broken, "derailed": derailed, "mcnemar_p_holm": p_holm, "gain_over_control": d / 2,
            "gain_over_control_lo": lo / 2, "gain_over_control_hi": hi / 2, "explained_by_yes_shift": explained}


@pytest.mark.parametrize("settings, expected", [
    ("(defaults)", ("(defaults)", "", None)),
    ("--decoding sample --seed 0", ("(defaults)", "--decoding sample", "0")),
    ("--preset fixed --set tau=0.6 --decoding sample --temperature 0.7 --seed 12",
     ("--preset fixed --set tau=0.6", "--decoding sample --temperature 0.7", "12")),
    ("--decoding beam --num-beams 5", ("(defaults)", "--decoding beam --num-beams 5", None)),
    ("--prompt lean-no, baseline vs the default prompt's", ("--prompt lean-no, baseline vs the default prompt's", "",
                                                             None)),
])
def test_a_settings_cell_splits_into_setting_decoding_and_seed(settings, expected):
    assert setting_of(settings) == expected


def test_seeds_fold_beside_their_greedy_run():
    table = pd.DataFrame([
        row("vcd", "--decoding sample --seed 2", "random", 0.94, 0.022, 0.010, 0.036, 17, 2, 0.007),
        row("vcd", "(defaults)", "random", 0.947, -0.004, -0.010, 0.0, 0, 3, 1.0, explained=True),
        row("vcd", "--decoding sample --seed 0", "random", 0.938, 0.019, 0.006, 0.033, 17, 4, 0.058, explained=True),
        row("vcd", "--decoding sample --seed 1", "random", 0.936, 0.022, 0.007, 0.037, 20, 5, 0.037, derailed=1),
        row("dola", "(defaults)", "random", 0.951, 0.0, 0.0, 0.0, 0, 0, 1.0),
        row("vcd", "(defaults)", "adversarial", 0.91, -0.006, -0.012, -0.001, 0, 4, 0.92),
        row("vcd", "--decoding sample --seed 0", "adversarial", 0.91, 0.015, 0.003, 0.027, 14, 4, 0.31),
        row("vcd", "(defaults)", "random", 0.5, 0.1, 0.05, 0.15, 60, 0, 0.0, label_set="relabelled"),  # not shown
    ])
    s = decoding_summary(table).set_index(["intervention", "split"])
    assert list(s.index) == [("vcd", "random"), ("dola", "random"), ("vcd", "adversarial")]  # first appearance
    vcd = s.loc[("vcd", "random")]
    assert vcd.setting == "(defaults)" and vcd.decoding == "--decoding sample" and vcd.seeds == "0, 1, 2"
    acc, gain = [93.8, 93.6, 94.0], [1.9, 2.2, 2.2]  # seed order 0, 1, 2
    assert vcd.accuracy_mean == pytest.approx(statistics.mean(acc))
    assert vcd.accuracy_sd == pytest.approx(statistics.stdev(acc))
    assert vcd.d_accuracy_mean == pytest.approx(statistics.mean(gain))
    assert vcd.d_accuracy_sd == pytest.approx(statistics.stdev(gain))
    assert vcd.fixed_broken == "17/4, 20/5+1, 17/2"
    assert (vcd.seeds_gaining, vcd.seeds_losing, vcd.seeds_explained_by_shift) == (2, 0, 1)  # seed 0: p 0.058
    assert (vcd.greedy_accuracy, vcd.greedy_d_accuracy, vcd.greedy_broken) == (pytest.approx(94.7),
                                                                                pytest.approx(-0.4), 3)
    assert vcd.greedy_gain_over_control_hi == 0.0
    dola = s.loc[("dola", "random")]
    assert dola.greedy_accuracy == pytest.approx(95.1) and not isinstance(dola.decoding, str)
    one = s.loc[("vcd", "adversarial")]
    assert one.seeds == "0" and math.isnan(one.accuracy_sd) and one.seeds_losing == 0

    md = summary_markdown(decoding_summary(table)).splitlines()
    assert len(md) == 2 + 3
    assert md[2] == ("| `vcd` | (defaults) | random | 94.7 | -0.4 [-1.0, +0.0] | 0/3 | 1 | -0.2 [-0.5, +0.0] | "
                     "sample (0, 1, 2) | 93.8 ± 0.2 | +2.1 ± 0.2 | 17/4, 20/5+1, 17/2 | 2 / 0 | 1 |")
    assert md[3].startswith("| `dola` | (defaults) | random | 95.1 | +0.0 [+0.0, +0.0] | 0/0 | 1 |")
    assert md[3].endswith("| – | – | – | – | – | – |")
    assert "| sample (0) | 91.0 | +1.5 | 14/4 | 0 / 0 | 0 |" in md[4]


def test_a_setting_run_only_sampled_has_empty_greedy_cells_and_an_empty_table_gives_the_header():
    table = pd.DataFrame([row("opera", "--decoding sample --seed 3", "popular", 0.9, 0.0, -0.01, 0.01, 2, 2, 1.0)])
    md = summary_markdown(decoding_summary(table)).splitlines()
    assert md[2].startswith("| `opera` | (defaults) | popular | – | – | – | – | – | sample (3) | 90.0 |")
    assert summary_markdown(decoding_summary(table.iloc[:0])).count("\n") == 1

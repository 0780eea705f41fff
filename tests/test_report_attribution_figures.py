"""The attribute pages' own figures and sections (mclcbf_diag.report.attribution_figures), on hand-built results: the
numbers drawn are the numbers given, the words name the sites and sizes given, and nothing is drawn where
there is nothing to show. No model."""

from __future__ import annotations

from types import SimpleNamespace

import pandas as pd
import torch

from mclcbf_diag.experiments.attribute import (
    Grid,
    LocalEffect,
    LocalSummary,
    local_records,
    local_summary,
    records_frame,
)
from mclcbf_diag.measurements.attribution import recovery
from mclcbf_diag.report import NoFigure, render_page
from mclcbf_diag.report.attribution_figures import count_heatmaps, effect_names, restore_section, split_sections


def _counts(n_layers=2, n_heads=3):
    rows = []
    for layer in range(n_layers):
        for head in range(n_heads):
            n = layer * n_heads + head  # every cell its own number
            rows.append({"component": "head", "layer": layer, "head": head, "n_dla": n, "n_patch": n % 2,
                         "n_either": n, "n_both": n % 2, "n_wrong_yes": 6, "adhh_head": (layer, head) == (1, 2)})
        rows.append({"component": "mlp", "layer": layer, "head": -1, "n_dla": layer, "n_patch": 0, "n_either": layer,
                     "n_both": 0, "n_wrong_yes": 6, "adhh_head": False})
    return pd.DataFrame(rows)


def test_count_heatmaps_draw_the_counts_with_adhh_heads_marked():
    counts = _counts()
    fig = count_heatmaps(counts, adhh_heads=((1, 2),))
    maps = [t for t in fig.data if t.type == "heatmap"]
    marks = [t for t in fig.data if t.type == "scatter"]
    assert len(maps) == 4 and len(marks) == 3
    assert maps[0].z.tolist() == [[0, 1, 2], [3, 4, 5]]  # n_dla, layer × head
    assert maps[1].z.tolist() == [[0, 1, 0], [1, 0, 1]]  # n_patch
    assert maps[3].z.tolist() == [[0, 0, 0], [1, 0, 1]]  # MLPs: DLA, patch, either per layer
    assert list(marks[0].x) == [2] and list(marks[0].y) == [1]
    assert fig.layout.coloraxis.cmin == 0 and fig.layout.coloraxis.cmax == 6


def _summary(found=True):
    effects = (LocalEffect("head", 5, 1, "denoise", -0.45, 1.0, 2e-5), LocalEffect("head", 5, 1, "noise", -0.447,
                                                                                   0.99, 2e-5))
    against = (LocalEffect("mlp", 7, -1, "noise", 0.0133, -0.03, 2e-5),)
    return LocalSummary(0.94, 0.497 if found else 0.94, 1e-5, enters=(), arises=effects if found else (),
                        cancels=against if found else ())


def test_effect_names_group_both_directions_of_one_site():
    s = _summary()
    assert effect_names(s.arises) == "head 5.1 (-0.45 put into the baseline, -0.447 lost on restoring it)"
    assert effect_names(s.cancels) == "layer 7 MLP (+0.0133 lost on restoring it)"
    assert effect_names([]) == "none above noise"
    assert effect_names(s.arises + s.cancels, k=1).endswith("; and 1 more")


def test_the_restored_section_draws_the_records_and_says_where_the_change_arises():
    t = lambda rows: torch.tensor(rows, dtype=torch.float64)  # noqa: E731
    grid = Grid(3.0, 1.0, 0.01, margins={
        "resid:denoise": t([[1.0, 1.0, 1.0], [1.0, 1.0, 2.9]]), "heads:denoise": t([[1.0, 2.5], [0.2, 1.0]]),
        "mlp:denoise": t([1.0, 1.5]), "resid:noise": t([[3.0, 3.0, 3.0], [3.0, 3.0, 1.05]]),
        "heads:noise": t([[3.0, 1.2], [3.0, 3.0]]), "mlp:noise": t([3.0, 3.4])})
    for key, m in grid.margins.items():
        kind, d = key.split(":")
        getattr(grid, kind)[d] = recovery(m, grid.corrupted, grid.clean, grid.floor)
    result = SimpleNamespace(records=records_frame(local_records(grid, question_id="q")),
                             local_summary=local_summary(grid))
    section = restore_section(result)
    fig = section.figures[0]
    assert not isinstance(fig, NoFigure)
    heads = [tr for tr in fig.data if tr.type == "heatmap"][0]
    assert [[round(v, 6) for v in row] for row in heads.z.tolist()] == [[1.0, 0.1], [1.0, 1.0]]  # (m − 1) / 2
    text = " ".join(section.lines)
    assert "head 0.1 (+1.8 lost on restoring it, +1.5 put into the baseline)" in text
    assert "head 1.0 (-0.8 put into the baseline)" in text and "+2" in text
    assert restore_section(SimpleNamespace(local_summary=None)) is None
    quiet = restore_section(SimpleNamespace(records=None, local_summary=_summary(found=False)))
    assert quiet.figures == () and "nothing to localise" in quiet.lines[0]


def test_a_split_without_a_wrong_yes_counts_nothing():
    summary = {"questions": 3, "right": 3, "wrong_yes": 0, "wrong_no": 0, "not_yes_no": 0, "share": 0.1,
               "margin_floor": 6.7e-6, "adhh_heads": ["6.2"], "carriers": [], "adhh_heads_carrying": []}
    ivs = pd.DataFrame([{"intervention": "pai", "preset": "paper", "sites": "attention, residual", "layers": "1–7",
                         "carriers": 0, "acts_on": "none", "n_acts_on": 0,
                         "downstream_of_its_residual_edit": "none", "n_downstream": 0}])
    result = SimpleNamespace(summary=summary, counts=_counts(), interventions=ivs, adhh_heads=((6, 2),))
    sections = split_sections(result)
    assert [s.heading for s in sections] == ["Outcome", "Carriers"]
    assert "nothing to count" in sections[1].lines[0]
    assert "3 questions: 3 right" in sections[0].lines[0] and "AD-HH (preset paper) finds 6.2" in sections[0].lines[3]
    html = render_page("t", sections)
    assert "pai (paper) opens attention, residual at 1–7: its attention edit acts on none of the 0 carriers" in html


def test_what_an_intervention_does_to_the_carriers_in_words():
    from mclcbf_diag.report.attribution_figures import acts_phrase

    row = SimpleNamespace(sites="pattern, residual", n_acts_on=0, acts_on="none", carriers=3)
    assert acts_phrase(row) == "it edits no head's attention"
    row = SimpleNamespace(sites="attention, residual", n_acts_on=2, acts_on="1.1, 5.1", carriers=3)
    assert acts_phrase(row) == "its attention edit acts on 1.1, 5.1 of the 3 carriers"

"""plots.py on a hand-built records frame whose values follow simple formulas."""

import math

import numpy as np
import pandas as pd
import pytest

from mclcbf_diag import plots as P
from mclcbf_diag.records import frame as _frame


def frame(rows):
    return _frame(pd.DataFrame(rows).to_dict("list"))

LAYERS, HEADS = 4, 4
STEERED_LAYERS = (1, 2)


def _attn(cond, layer, head):
    return 0.1 * layer + 0.01 * head + (0.001 * (head + 1) * (layer + 2) if cond == "steered" else 0.0)


def _rows(sample="q1", phase="prefill", step=0, shift=0.0):
    rows = []

    def add(cond, layer, head, metric, value):
        rows.append(dict(sample=sample, condition=cond, phase=phase, step=step,
                         layer=layer, head=head, metric=metric, value=value))

    for cond in ("baseline", "steered"):
        s = 1.0 if cond == "steered" else 0.0
        for layer in range(LAYERS):
            for head in range(HEADS):
                add(cond, layer, head, "attn_image_mass", _attn(cond, layer, head))
            add(cond, layer, -1, "attn_image_mass", 99.0)  # head mean: must not enter the heatmap
            add(cond, layer, -1, "resid_pre_norm", 10.0 * (layer + 1) + s)
            add(cond, layer, -1, "resid_mid_norm", 11.0 * (layer + 1) + s)
            add(cond, layer, -1, "resid_post_norm", 12.0 * (layer + 1) + s)
            add(cond, layer, -1, "logit_lens_margin", layer - 1.5 + 0.5 * s + shift)
            add(cond, layer, -1, "ln1_gain_theta", math.nan if layer == 0 else 0.1 * layer)
            add(cond, layer, -1, "ln1_gain_orthogonal", 0.2 + 0.01 * layer)
            add(cond, layer, -1, "ln1_gain_radial", 1e-8 * (layer + 1))
            add(cond, layer, -1, "ln2_gain_theta", 0.3 + 0.01 * layer)
            add(cond, layer, -1, "ln2_gain_radial", math.nan)  # all NaN: no trace
        add(cond, -1, -1, "final_margin", -0.5 + 0.75 * s)
        add(cond, -1, -1, "answer_yes", s)
    for layer in STEERED_LAYERS:
        add("steered", layer, -1, "barrier_h", 0.1 * layer)
        add("steered", layer, -1, "barrier_tau", 0.5)
        add("steered", layer, -1, "dh_recomputed", 0.02 * layer)
        add("steered", layer, -1, "dh_realised", 0.001 * layer)
        add("steered", layer, -1, "theta_norm", 0.5 * layer)
        add("steered", layer, -1, "theta_rel", 0.5 * layer / (10.0 * (layer + 1) + 1))
    for layer in range(LAYERS):
        add("steered", layer, -1, "propagation_rel", 0.0 if layer == 0 else 10.0 ** -(4 - layer))
    return rows


@pytest.fixture
def records():
    return frame(_rows() + _rows(phase="decode", step=1, shift=100.0))


def _trace(fig, name):
    [t] = [t for t in fig.data if t.name == name]
    return t


def test_heatmaps_equal_pivoted_input(records):
    fig = P.attention_heatmaps(records)
    assert len(fig.data) == 3
    base = np.array([[_attn("baseline", l, h) for h in range(HEADS)] for l in range(LAYERS)])
    steer = np.array([[_attn("steered", l, h) for h in range(HEADS)] for l in range(LAYERS)])
    np.testing.assert_array_equal(np.asarray(fig.data[0].z), base)
    np.testing.assert_array_equal(np.asarray(fig.data[1].z), steer)
    np.testing.assert_array_equal(np.asarray(fig.data[2].z), steer - base)
    assert list(fig.data[0].x) == list(range(HEADS)) and list(fig.data[0].y) == list(range(LAYERS))
    assert 99.0 not in np.asarray(fig.data[0].z)
    assert fig.layout.coloraxis2.cmid == 0 and fig.data[2].coloraxis == "coloraxis2"
    assert fig.layout.coloraxis2.cmax == pytest.approx(np.abs(steer - base).max())


def test_heatmaps_other_metric_missing(records):
    with pytest.raises(ValueError, match="attn_sink_mass"):
        P.attention_heatmaps(records, metric="attn_sink_mass")


def test_residual_norms_traces(records):
    fig = P.residual_norms_figure(records)
    # 3 norms x 2 conditions + ‖θ*‖ + ‖θ*‖/‖x‖
    assert len(fig.data) == 8
    pre_b, pre_s = _trace(fig, "resid_pre_norm (baseline)"), _trace(fig, "resid_pre_norm (steered)")
    assert list(pre_b.y) == [10.0, 20.0, 30.0, 40.0] and list(pre_s.y) == [11.0, 21.0, 31.0, 41.0]
    assert pre_b.line.dash == "solid" and pre_s.line.dash == "dash"
    theta = _trace(fig, "‖θ*‖ (steered)")
    assert list(theta.x) == list(STEERED_LAYERS) and list(theta.y) == [0.5, 1.0]
    assert fig.layout.yaxis.type == "log"


def test_jacobian_gains_drop_nan(records):
    fig = P.jacobian_gains_figure(records)
    names = [t.name for t in fig.data]
    assert len(fig.data) == 4  # ln1 θ/orthogonal/radial, ln2 θ; ln2 radial is all NaN
    assert not any(n.startswith("ln2 radial") for n in names)
    t = _trace(fig, "ln1 along θ*")
    assert list(t.x) == [1, 2, 3] and list(t.y) == pytest.approx([0.1, 0.2, 0.3])
    for tr in fig.data:
        assert np.all(np.isfinite(np.asarray(tr.y, dtype=float)))
    assert fig.layout.yaxis.type == "log"


def test_jacobian_gains_missing(records):
    with pytest.raises(ValueError, match="gain"):
        P.jacobian_gains_figure(records[~records["metric"].str.contains("gain")])


def test_logit_lens_values(records):
    fig = P.logit_lens_figure(records)
    assert len(fig.data) == 4  # two lens lines + two final-margin markers
    assert list(_trace(fig, "logit lens (baseline)").y) == [-1.5, -0.5, 0.5, 1.5]
    assert list(_trace(fig, "logit lens (steered)").y) == [-1.0, 0.0, 1.0, 2.0]
    fb, fs = _trace(fig, "final margin (baseline)"), _trace(fig, "final margin (steered)")
    assert list(fb.y) == [-0.5] and list(fs.y) == [0.25] and list(fs.x) == [LAYERS]
    assert any(s.type == "line" and s.y0 == 0 and s.y1 == 0 for s in fig.layout.shapes)


def test_phase_and_step_selection(records):
    fig = P.logit_lens_figure(records, phase="decode", step=1)
    assert list(_trace(fig, "logit lens (baseline)").y) == [98.5, 99.5, 100.5, 101.5]
    with pytest.raises(ValueError, match="decode"):
        P.logit_lens_figure(records, phase="decode", step=7)


def test_barrier_values(records):
    fig = P.barrier_figure(records)
    assert [t.name for t in fig.data] == ["h before", "τ", "h after (recomputed)", "h after (realised)"]
    assert list(fig.data[0].x) == ["L1", "L2"]
    assert list(fig.data[0].y) == pytest.approx([0.1, 0.2])
    assert list(fig.data[1].y) == [0.5, 0.5]
    assert list(fig.data[2].y) == pytest.approx([0.12, 0.24])
    assert list(fig.data[3].y) == pytest.approx([0.101, 0.202])


def test_propagation_log(records):
    fig = P.propagation_figure(records)
    assert len(fig.data) == 1 and fig.layout.yaxis.type == "log"
    assert list(fig.data[0].y) == pytest.approx([0.0, 1e-3, 1e-2, 1e-1])


def test_missing_metric_named(records):
    no_barrier = records[records["metric"] != "barrier_h"]
    with pytest.raises(ValueError, match="barrier_h"):
        P.barrier_figure(no_barrier)
    with pytest.raises(ValueError, match="propagation_rel"):
        P.propagation_figure(records[records["metric"] != "propagation_rel"])


def test_several_samples_need_the_arg(records):
    both = pd.concat([records, frame(_rows(sample="q2", shift=7.0))], ignore_index=True)
    with pytest.raises(ValueError, match="sample"):
        P.logit_lens_figure(both)
    fig = P.logit_lens_figure(both, sample="q2")
    assert list(_trace(fig, "logit lens (baseline)").y) == [5.5, 6.5, 7.5, 8.5]
    with pytest.raises(ValueError, match="sample"):
        P.trace_figures(both)


def test_trace_figures_all_and_skipping(records):
    figs = P.trace_figures(records)
    assert list(figs) == ["attention", "residual_norms", "jacobian_gains", "logit_lens",
                          "barrier", "propagation"]
    partial = records[~records["metric"].isin(["barrier_h", "propagation_rel", "attn_image_mass"])]
    assert list(P.trace_figures(partial)) == ["residual_norms", "jacobian_gains", "logit_lens"]

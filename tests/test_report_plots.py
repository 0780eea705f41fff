"""plots.py on a hand-built records frame whose values follow simple formulas."""

import math

import numpy as np
import pandas as pd
import pytest

from mclcbf_diag.interventions.mclcbf import MCLCBF
from mclcbf_diag.interventions.mclcbf import report as R
from mclcbf_diag.measurements.records import frame as _frame
from mclcbf_diag.report import plots as P
from mclcbf_diag.report.html import NoFigure


def frame(rows):
    return _frame(pd.DataFrame(rows).to_dict("list"))

LAYERS, HEADS = 4, 4
STEERED_LAYERS = (1, 2)


def _attn(cond, layer, head):
    return 0.1 * layer + 0.01 * head + (0.001 * (head + 1) * (layer + 2) if cond == "steered" else 0.0)


def _rows(question_id="q1", phase="prefill", decode_step=0, shift=0.0):
    rows = []

    def add(cond, layer, head, metric, value):
        rows.append(dict(question_id=question_id, condition=cond, phase=phase, decode_step=decode_step,
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
        add("steered", layer, -1, "added_norm", 0.5 * layer)  # the runner's generic record of the added step
        add("steered", layer, -1, "theta_rel", 0.5 * layer / (10.0 * (layer + 1) + 1))
    for layer in range(LAYERS):
        add("steered", layer, -1, "propagation_rel", 0.0 if layer == 0 else 10.0 ** -(4 - layer))
    return rows


@pytest.fixture
def records():
    return frame(_rows() + _rows(phase="decode", decode_step=1, shift=100.0))


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
    # 3 norms x 2 conditions + the added vector ‖v‖ (the step's relative size is MC-LCBF's own figure)
    assert len(fig.data) == 7
    pre_b, pre_s = _trace(fig, "‖x‖ entering the layer (baseline)"), _trace(fig, "‖x‖ entering the layer (steered)")
    assert list(pre_b.y) == [10.0, 20.0, 30.0, 40.0] and list(pre_s.y) == [11.0, 21.0, 31.0, 41.0]
    assert pre_b.line.dash == "solid" and pre_s.line.dash == "dash"
    theta = _trace(fig, "added ‖v‖ (steered)")
    assert list(theta.x) == list(STEERED_LAYERS) and list(theta.y) == [0.5, 1.0]
    assert fig.layout.yaxis.type == "log"
    _assert_full_ticks(fig.layout.yaxis)
    # the steered layers 1–2 are one shaded band from 0.5 to 2.5
    [band] = [s for s in fig.layout.shapes if s.type == "rect"]
    assert (band.x0, band.x1) == (0.5, 2.5)


def _assert_full_ticks(axis):
    """Log-axis ticks are written-out numbers at 1, 2, 5 × 10^k (no bare minor digits)."""
    assert axis.tickmode == "array" and len(axis.tickvals) == len(axis.ticktext) >= 2
    for v, t in zip(axis.tickvals, axis.ticktext):
        assert float(t) == pytest.approx(v)
        mantissa = v / 10 ** math.floor(math.log10(v) + 1e-9)
        assert round(mantissa, 6) in (1, 2, 5)


def test_step_size_figure_and_its_empty_reason(records):
    fig = R.step_size_figure(records)
    assert list(fig.data[0].x) == list(STEERED_LAYERS)
    assert list(fig.data[0].y) == pytest.approx([0.5 * ly / (10.0 * (ly + 1) + 1) for ly in STEERED_LAYERS])
    # no step anywhere, the barrier at h ≥ τ: the figure is the reason, with the measured h and τ
    idle = records.copy()
    idle.loc[idle.metric.isin(["theta_rel", "theta_norm"]), "value"] = 0.0
    idle.loc[idle.metric == "barrier_h", "value"] = 0.9
    nf = R.step_size_figure(idle)
    assert isinstance(nf, NoFigure) and "h ≥ τ" in nf.reason and "0.9" in nf.reason and "τ = 0.5" in nf.reason


def test_attention_mass_figure_plots_image_sink_and_text(records):
    extra = frame([dict(question_id="q1", condition=c, phase="prefill", decode_step=0, layer=ly, head=-1, metric=m,
                        value=v * (ly + 1) + (0.01 if c == "steered" else 0))
                   for c in ("baseline", "steered") for ly in range(LAYERS)
                   for m, v in (("attn_sink_mass", 0.1), ("attn_text_mass", 0.05))])
    fig = P.attention_mass_figure(pd.concat([records, extra], ignore_index=True))
    assert len(fig.data) == 6
    sink = _trace(fig, "attention on the sink token (BOS, or the measured sink) (steered)")
    assert list(sink.y) == pytest.approx([0.1 * (ly + 1) + 0.01 for ly in range(LAYERS)])
    assert list(_trace(fig, "attention on image tokens (baseline)").y) == [99.0] * LAYERS  # the head means


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
    assert fig.layout.yaxis.tickvals and all(t.startswith("1e") or float(t) >= 1e-3 for t in fig.layout.yaxis.ticktext)


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


def test_phase_and_decode_step_selection(records):
    fig = P.logit_lens_figure(records, phase="decode", decode_step=1)
    assert list(_trace(fig, "logit lens (baseline)").y) == [98.5, 99.5, 100.5, 101.5]
    assert fig.layout.title.text.endswith("decode step 1)")
    with pytest.raises(ValueError, match="decode_step=7"):
        P.logit_lens_figure(records, phase="decode", decode_step=7)


def test_barrier_values(records):
    fig = R.barrier_figure(records)
    assert [t.name for t in fig.data] == ["h before", "τ", "h after (recomputed)", "h after (realised)"]
    assert list(fig.data[0].x) == ["L1", "L2"]
    assert list(fig.data[0].y) == pytest.approx([0.1, 0.2])
    assert list(fig.data[1].y) == [0.5, 0.5]
    assert list(fig.data[2].y) == pytest.approx([0.12, 0.24])
    assert list(fig.data[3].y) == pytest.approx([0.101, 0.202])


def test_propagation_log_draws_zeros_at_the_floor(records):
    fig = P.propagation_figure(records)
    assert len(fig.data) == 1 and fig.layout.yaxis.type == "log"
    # the exact 0 of layer 0 sits a decade under the smallest nonzero value (1e-3), as an open marker
    assert list(fig.data[0].y) == pytest.approx([1e-4, 1e-3, 1e-2, 1e-1])
    assert list(fig.data[0].marker.symbol) == ["circle-open", "circle", "circle", "circle"]
    assert fig.data[0].customdata[0].startswith("exactly 0")
    assert any("exactly 0" in a.text for a in fig.layout.annotations)
    still = records.copy()
    still.loc[still.metric == "propagation_rel", "value"] = 0.0
    nf = P.propagation_figure(still)
    assert isinstance(nf, NoFigure) and nf.reason.startswith("no propagation")


def test_heatmap_difference_panel_says_why_it_is_empty(records):
    same = records.copy()
    base = same[(same.condition == "baseline") & (same.metric == "attn_image_mass")]
    keep = same[~((same.condition == "steered") & (same.metric == "attn_image_mass"))]
    same = pd.concat([keep, base.assign(condition="steered")], ignore_index=True)
    same.loc[same.metric == "barrier_h", "value"] = 0.8
    fig = P.attention_heatmaps(same, idle=MCLCBF().idle_reason(same))  # why nothing changed: the barrier's words
    assert len(fig.data) == 2  # baseline and steered; no blank difference map
    [note] = [a.text for a in fig.layout.annotations if a.text.startswith("no difference")]
    assert "h ≥ τ" in note.replace("<br>", " ")
    # steered layers are named in the layer axis
    assert list(fig.layout.yaxis.ticktext) == ["0", "1 ▸ steered", "2 ▸ steered", "3"]
    assert fig.layout.coloraxis.colorbar.orientation == "h"  # below the panels: no title over the difference


def test_dose_response_flat_at_zero_step_is_said_in_words():
    curve = pd.DataFrame({"k": [1.0, 2.0, 4.0], "margin": [0.8, 0.8, 0.8], "theta_rel_max": [0.0, 0.0, 0.0]})
    nf = P.dose_response_figure(curve)
    assert isinstance(nf, NoFigure) and "k × θ* = 0" in nf.reason and "+0.8" in nf.reason
    moving = curve.assign(margin=[0.8, 0.1, -0.5], theta_rel_max=[0.01, 0.02, 0.04])
    fig = P.dose_response_figure(moving)
    assert list(fig.data[0].y) == [0.8, 0.1, -0.5] and fig.layout.xaxis.type == "log"


def test_decode_summary_one_point_per_step(records):
    fig = P.decode_summary_figure(records, {0: "':' → 'Yes'", 1: "'Yes' → 'and'"})
    mass = _trace(fig, "image mass (steered)")
    assert list(mass.x) == ["0: ':' → 'Yes'", "1: 'Yes' → 'and'"]
    assert list(mass.y) == [99.0, 99.0]  # head means over the steered layers
    assert list(_trace(fig, "final margin (steered)").y) == [0.25, 0.25]
    assert list(_trace(fig, "layers fired (steered)").y) == [2, 2]  # ‖θ*‖ > 0 at layers 1 and 2


def test_missing_metric_named(records):
    no_barrier = records[records["metric"] != "barrier_h"]
    with pytest.raises(ValueError, match="barrier_h"):
        R.barrier_figure(no_barrier)
    with pytest.raises(ValueError, match="propagation_rel"):
        P.propagation_figure(records[records["metric"] != "propagation_rel"])


def test_several_questions_need_the_arg(records):
    both = pd.concat([records, frame(_rows(question_id="q2", shift=7.0))], ignore_index=True)
    with pytest.raises(ValueError, match="2 questions .*pass question_id="):
        P.logit_lens_figure(both)
    fig = P.logit_lens_figure(both, question_id="q2")
    assert list(_trace(fig, "logit lens (baseline)").y) == [5.5, 6.5, 7.5, 8.5]
    with pytest.raises(ValueError, match="pass question_id="):
        P.trace_figures(both)
    assert list(P.trace_figures(both, question_id="q2")) == list(P.trace_figures(records))
    with pytest.raises(ValueError, match="pass question_id="):
        P.decode_summary_figure(both)


def test_trace_figures_all_and_skipping(records):
    figs = P.trace_figures(records)  # the generic figures; the intervention adds its own after the norms
    assert list(figs) == ["attention", "attention_mass", "residual_norms", "jacobian_gains", "logit_lens",
                          "propagation"]
    assert list(P.trace_figures(records, intervention=MCLCBF())) == [
        "attention", "attention_mass", "residual_norms", "step_size", "barrier", "jacobian_gains", "logit_lens",
        "propagation"]
    partial = records[~records["metric"].isin(["barrier_h", "propagation_rel", "attn_image_mass", "theta_rel"])]
    assert list(P.trace_figures(partial, intervention=MCLCBF())) == ["residual_norms", "jacobian_gains", "logit_lens"]


def test_layer_heatmaps_draw_heads_and_named_columns_on_one_scale():
    rows = []
    for layer in range(3):
        for head in range(2):
            rows.append(dict(question_id="q", condition="denoise", phase="prefill", decode_step=0, layer=layer,
                             head=head, metric="patch_head", value=layer - head))
        rows.append(dict(question_id="q", condition="denoise", phase="prefill", decode_step=0, layer=layer,
                         head=-1, metric="patch_mlp", value=10.0 * layer))
    recs = frame(rows)
    fig = P.layer_heatmaps(recs, [("heads", "denoise", "patch_head"), ("mlp", "denoise", {"MLP": "patch_mlp"})],
                           title="t", value="recovery")
    heads, mlp = fig.data
    assert np.array_equal(heads.z, [[0, -1], [1, 0], [2, 1]]) and list(heads.x) == [0, 1]
    assert np.array_equal(mlp.z, [[0], [10], [20]]) and list(mlp.x) == ["MLP"]
    assert fig.layout.coloraxis.cmid == 0 and fig.layout.coloraxis.cmax == 20  # diverging, one scale
    with pytest.raises(P.MissingDataError, match="noise"):
        P.layer_heatmaps(recs, [("x", "noise", "patch_head")], title="t", value="v")

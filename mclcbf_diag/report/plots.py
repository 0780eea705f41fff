"""Plotly figures of the tidy measurement records (see :mod:`mclcbf_diag.measurements.records`).

Every function here is pure: a records frame in, a ``plotly.graph_objects.Figure`` out,
no file IO (:mod:`mclcbf_diag.report.html` turns figures into HTML). The parameters every figure
shares are not repeated in each one's Args: ``records`` is a tidy records frame, from which it picks
one ``phase``/``decode_step`` (default the prefill decision token, ``"prefill"``/0) and one
``question_id`` (default: the only one present; with several the caller must name it) as
:func:`select` does; ``steered`` are the layers shaded as steered (None: read off the records).

Figures are meant to be read without the glossary: titles and axes say what is drawn in
words (:data:`LABELS`), the steered layers are shaded on every per-layer plot, log axes
label only full numbers (1, 2, 5, 10 … or powers of ten), and a value that a log axis cannot
show (an exact 0) is drawn at the axis floor as an open marker and said so. A figure with
nothing to draw (no step when the barrier never fired, no propagation when nothing changed)
is a :class:`~mclcbf_diag.report.html.NoFigure` carrying the reason, from :func:`trace_figures`.

A figure whose metrics are absent raises :class:`MissingDataError` (a ``ValueError``)
naming the metric; :func:`trace_figures` builds every figure the records support and
skips the rest.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .html import NoFigure

BASELINE, STEERED = "baseline", "steered"
NORMS = ("ln1", "ln2", "ln_final")
GAIN_KINDS = {"theta": "along θ*", "orthogonal": "orthogonal to x", "radial": "radial (x̂)"}
_NORM_COLOURS = {"ln1": "#1f77b4", "ln2": "#ff7f0e", "ln_final": "#2ca02c"}
_KIND_DASH = {"theta": "solid", "orthogonal": "dash", "radial": "dot"}
_NORM_NAMES = {"ln1": "input norm (ln1)", "ln2": "post-attention norm (ln2)", "ln_final": "final norm"}
STEERED_FILL = "rgba(255, 193, 7, 0.13)"

LABELS = {
    "attn_image_mass": "attention on image tokens",
    "attn_sink_mass": "attention on the sink token (BOS, or the measured sink)",
    "attn_text_mass": "attention on text tokens",
    "resid_pre_norm": "‖x‖ entering the layer",
    "resid_mid_norm": "‖x‖ after attention",
    "resid_post_norm": "‖x‖ leaving the layer",
}
_MASS_COLOURS = {"attn_image_mass": "#d62728", "attn_sink_mass": "#7f7f7f", "attn_text_mass": "#1f77b4"}
# generic records of an edit (mclcbf_diag.measurements.records); an intervention's own records mark its layers too
_STEERED_MARKERS = ("added_norm", "rounding_survival", "logit_shift")
IDLE = "the intervention changed nothing at the decision token in any layer"  # the generic reason, in words


class MissingDataError(ValueError):
    """The records lack a metric or condition a figure needs."""


# ----------------------------------------------------------------------------- selection
def select(records: pd.DataFrame, phase: str, decode_step: int, question_id=None) -> pd.DataFrame:
    """Rows of one question at one phase/decode step.

    Args:
        records: a tidy records frame.
        phase: ``"prefill"`` or ``"decode"``.
        decode_step: the decode step (0: the prefill decision token).
        question_id: the question drawn; None: the only one in ``records``.

    Returns:
        The selected rows.

    Raises:
        ValueError: ``question_id`` is None and the records hold several questions.
        MissingDataError: no row matches.
    """
    ids = list(pd.unique(records["question_id"]))
    if question_id is None:
        if len(ids) > 1:
            shown = ", ".join(map(str, ids[:5])) + (" ..." if len(ids) > 5 else "")
            raise ValueError(f"records hold {len(ids)} questions ({shown}); pass question_id=")
        question_id = ids[0] if ids else None
    df = records[(records["question_id"] == question_id) & (records["phase"] == phase)
                 & (records["decode_step"] == decode_step)]
    if df.empty:
        raise MissingDataError(f"no records for question_id={question_id!r}, phase={phase!r}, "
                               f"decode_step={decode_step}")
    return df


def require(df: pd.DataFrame, *metrics: str) -> None:
    present = set(df["metric"])
    for metric in metrics:
        if metric not in present:
            raise MissingDataError(f"records have no {metric!r} rows for this question/phase/decode step")


def by_layer(df: pd.DataFrame, metric: str, condition: str) -> pd.Series:
    """Per-layer values (head −1, layer ≥ 0) of one metric and condition, indexed by layer."""
    rows = df[(df["metric"] == metric) & (df["condition"] == condition)
              & (df["head"] == -1) & (df["layer"] >= 0)]
    if rows["layer"].duplicated().any():
        raise ValueError(f"duplicate {metric!r} rows per layer for condition {condition!r}")
    return rows.set_index("layer")["value"].sort_index()


def _whole_model(df: pd.DataFrame, metric: str, condition: str) -> float | None:
    rows = df[(df["metric"] == metric) & (df["condition"] == condition) & (df["layer"] == -1)]
    return float(rows["value"].iloc[0]) if len(rows) else None


def conditions(df: pd.DataFrame, metric: str) -> list[str]:
    """Conditions with rows of ``metric``, baseline first, then steered, then the rest."""
    found = set(df.loc[df["metric"] == metric, "condition"])
    order = [c for c in (BASELINE, STEERED) if c in found]
    return order + sorted(found - {BASELINE, STEERED})


def _layer_lines(fig: go.Figure, df: pd.DataFrame, colours: dict[str, str]) -> None:
    """One line per (metric, condition) over the layers: a colour per metric, a dash per condition."""
    for metric, colour in colours.items():
        for cond in conditions(df, metric):
            s = by_layer(df, metric, cond)
            fig.add_trace(go.Scatter(
                x=s.index, y=s.values, mode="lines+markers", name=f"{LABELS[metric]} ({cond})",
                line=dict(color=colour, dash=_dash(cond)),
                hovertemplate=f"{cond}<br>layer %{{x}}<br>{LABELS[metric]} %{{y:.4g}}<extra></extra>"))


def _dash(condition: str) -> str:
    return {BASELINE: "solid", STEERED: "dash"}.get(condition, "dot")


def steered_layers(records: pd.DataFrame) -> tuple[int, ...]:
    """Layers an intervention acted on, read off the records: the generic records of an edit, and the
    intervention's own records (metrics the shared glossary does not define), which only its layers carry."""
    from ..measurements.records import documented

    rows = records[(records["condition"] == STEERED) & (records["layer"] >= 0)]
    own = {m for m in rows["metric"].unique() if m in _STEERED_MARKERS or not documented(m)}
    return tuple(sorted({int(x) for x in rows[rows["metric"].isin(own)]["layer"]}))


def fired_layers(df: pd.DataFrame) -> tuple[int, ...]:
    """Steered layers where the intervention changed something (an added vector, a logit edit)."""
    s = df[(df["condition"] == STEERED) & (df["layer"] >= 0)]
    hit = set()
    for metric in ("added_norm",):
        rows = s[s["metric"] == metric]
        hit |= {int(ly) for ly, v in zip(rows["layer"], rows["value"]) if np.isfinite(v) and v > 0}
    rows = s[s["metric"] == "logit_shift"]
    hit |= {int(ly) for ly, v in zip(rows["layer"], rows["value"]) if np.isfinite(v) and v != 0}
    return tuple(sorted(hit))


def fmt_number(x: float) -> str:
    return f"{x:.3g}" if math.isfinite(x) else "n/a"


# ----------------------------------------------------------------------------- axes
def _runs(layers) -> list[tuple[int, int]]:
    """Contiguous runs of integers: (1, 2, 3, 7) → [(1, 3), (7, 7)]."""
    out: list[list[int]] = []
    for ly in sorted(set(int(x) for x in layers)):
        if out and ly == out[-1][1] + 1:
            out[-1][1] = ly
        else:
            out.append([ly, ly])
    return [(a, b) for a, b in out]


def mark_steered(fig: go.Figure, layers, *, rows: int = 1, label: bool = True) -> go.Figure:
    """Shade the steered layers (x = layer) on every subplot row; the first band is labelled.

    Args:
        fig: a figure whose x axis is the layer.
        layers: the steered layers (contiguous runs become one band).
        rows: how many subplot rows to shade (1: a figure without subplots).
        label: whether the first band says "steered".

    Returns:
        ``fig``, shaded.
    """
    for k, (a, b) in enumerate(_runs(layers)):
        for r in range(1, rows + 1):
            kw = dict(row=r, col=1) if rows > 1 else {}
            fig.add_vrect(x0=a - 0.5, x1=b + 0.5, fillcolor=STEERED_FILL, line_width=0, layer="below",
                          annotation_text="steered" if label and k == 0 and r == 1 else None,
                          annotation_position="top left", annotation_font_size=11, **kw)
    return fig


def _tick_text(v: float) -> str:
    if 1e-3 <= v < 1e4:
        return f"{v:g}"
    return f"1e{round(math.log10(v))}" if abs(math.log10(v) - round(math.log10(v))) < 1e-9 else f"{v:.0e}"


def log_ticks(values) -> dict:
    """Tick settings for a log axis over ``values``: full-number labels only, no bare minor digits.

    Within three decades the ticks are 1, 2, 5 × 10ᵏ written out (0.02, 0.05, 0.1 …); wider
    ranges get the powers of ten alone.
    """
    v = np.asarray([x for x in values if np.isfinite(x) and x > 0], dtype=float)
    if not v.size:
        return {}
    lo, hi = math.floor(math.log10(v.min())), math.ceil(math.log10(v.max()))
    hi = max(hi, lo + 1)
    mults = (1, 2, 5) if hi - lo <= 3 else (1,)
    ticks = [m * 10.0 ** e for e in range(lo, hi + 1) for m in mults]
    ticks = [t for t in ticks if v.min() / 1.5 <= t <= v.max() * 1.5] or [10.0 ** lo, 10.0 ** hi]
    return dict(tickmode="array", tickvals=ticks, ticktext=[_tick_text(t) for t in ticks])


def log_axis(fig: go.Figure, values, **where) -> None:
    fig.update_yaxes(type="log", **log_ticks(values), **where)


def axis_values(fig: go.Figure, row: int | None = None) -> list[float]:
    out = []
    for tr in fig.data:
        if tr.y is None:
            continue
        if row is not None and (tr.yaxis or "y") != ("y" if row == 1 else f"y{row}"):
            continue
        out += [float(y) for y in tr.y if y is not None]
    return out


# ----------------------------------------------------------------------------- figures
def attention_heatmaps(records: pd.DataFrame, metric: str = "attn_image_mass",
                       phase: str = "prefill", decode_step: int = 0, question_id=None,
                       condition: str = STEERED, steered: tuple[int, ...] | None = None,
                       idle: str | None = None) -> go.Figure:
    """Layer × head heatmaps of an attention mass: baseline, ``condition``, and their difference.

    Steered layers are marked in the layer labels; when the difference is zero everywhere the
    third panel says why instead of showing a blank map.

    Args:
        metric: the per-head attention mass drawn (``attn_image_mass``, ``attn_sink_mass``, ``attn_text_mass``).
        condition: the condition compared with the baseline.
        steered: the layers marked as steered; None: read off the records.
        idle: why nothing changed, said when the difference is zero everywhere; None: the generic reason.
    """
    df = select(records, phase, decode_step, question_id)
    require(df, metric)
    rows = df[(df["metric"] == metric) & (df["head"] >= 0) & (df["layer"] >= 0)]
    grids = {}
    for cond in (BASELINE, condition):
        sub = rows[rows["condition"] == cond]
        if sub.empty:
            raise MissingDataError(f"records have no per-head {metric!r} rows for condition {cond!r}")
        grids[cond] = sub.pivot(index="layer", columns="head", values="value")
    layers = sorted(set(grids[BASELINE].index) | set(grids[condition].index))
    heads = sorted(set(grids[BASELINE].columns) | set(grids[condition].columns))
    base, steer = (grids[c].reindex(index=layers, columns=heads) for c in (BASELINE, condition))
    diff = steer - base
    what = LABELS.get(metric, metric)
    titles = (BASELINE, condition, f"{condition} − {BASELINE}")
    fig = make_subplots(rows=1, cols=3, subplot_titles=titles, shared_yaxes=True, horizontal_spacing=0.05)
    flat = not np.nan_to_num(diff.to_numpy()).any()
    for col, (name, grid) in enumerate(zip(titles, (base, steer, diff)), start=1):
        if col == 3 and flat:
            continue
        fig.add_trace(go.Heatmap(
            z=grid.to_numpy(), x=heads, y=layers, name=name,
            coloraxis="coloraxis2" if col == 3 else "coloraxis",
            hovertemplate=f"{name}<br>layer %{{y}}, head %{{x}}<br>{what} %{{z:.4g}}<extra></extra>",
        ), row=1, col=col)
    for col in (1, 2, 3):
        fig.update_xaxes(title_text="head", dtick=1, row=1, col=col)
    steered = steered_layers(df) if steered is None else tuple(steered)
    fig.update_yaxes(title_text="layer", tickmode="array", tickvals=layers,
                     ticktext=[f"{ly} ▸ steered" if ly in steered else str(ly) for ly in layers], row=1, col=1)
    if flat:
        x0, x1 = fig.layout.xaxis3.domain
        fig.add_annotation(text="no difference:<br>" + wrap_text(idle or IDLE, 34), showarrow=False,
                           xref="paper", yref="paper", x=(x0 + x1) / 2, y=0.5, xanchor="center", font=dict(size=12))
        fig.update_xaxes(showticklabels=False, showgrid=False, row=1, col=3)
    span = float(np.nanmax(np.abs(diff.to_numpy()))) if not flat and diff.notna().any().any() else 1.0
    bar = dict(orientation="h", y=-0.3, yanchor="top", thickness=12, title=dict(side="top"))
    fig.update_layout(
        title=f"Decision token's {what}, per layer and head ({phase} step {decode_step})",
        coloraxis=dict(colorscale="Viridis", colorbar=dict(bar, title=dict(bar["title"], text="share of attention"),
                                                          x=0.33, xanchor="center", len=0.6)),
        coloraxis2=dict(colorscale="RdBu_r", cmid=0, cmin=-span, cmax=span, showscale=not flat,
                        colorbar=dict(bar, title=dict(bar["title"], text="difference"), x=0.85, xanchor="center",
                                      len=0.3)),
        margin=dict(b=130), height=480,
    )
    return fig


def wrap_text(text: str, width: int) -> str:
    words, lines, line = text.split(), [], ""
    for w in words:
        if line and len(line) + 1 + len(w) > width:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}".strip()
    return "<br>".join([*lines, line])


def attention_mass_figure(records: pd.DataFrame, phase: str = "prefill", decode_step: int = 0,
                          question_id=None, steered: tuple[int, ...] | None = None) -> go.Figure:
    """Where the decision token's attention goes per layer (mean over heads): image, sink (BOS), text.

    Args:
        records: a tidy records frame.
        phase: ``"prefill"`` or ``"decode"``.
        decode_step: the decode step (0: the prefill decision token).
        question_id: the question drawn; None: the only one in ``records``.
        steered: the layers marked as steered; None: read off the records (:func:`steered_layers`).

    Returns:
        The figure: one line per share and condition, shares of attention (0..1) per layer.

    Raises:
        ValueError: ``question_id`` is None and the records hold several questions.
        MissingDataError: no row matches, or the records have no ``attn_image_mass`` rows.
    """
    df = select(records, phase, decode_step, question_id)
    require(df, "attn_image_mass")
    fig = go.Figure()
    _layer_lines(fig, df, _MASS_COLOURS)
    mark_steered(fig, steered_layers(df) if steered is None else steered)
    fig.update_layout(title=f"Where the decision token's attention goes, per layer (mean over heads; {phase} step "
                            f"{decode_step})", xaxis_title="layer", yaxis_title="share of attention",
                      yaxis_range=[0, 1.02])
    return fig


def add_positive_markers(fig: go.Figure, df: pd.DataFrame, metric: str, name: str, marker: dict, fmt: str) -> None:
    """One marker trace per condition of ``metric`` per layer, its positive finite values only (a log axis).

    Args:
        fig: the figure the traces are added to.
        df: the selected records (:func:`select`).
        metric: the per-layer metric drawn.
        name: the traces' name (the condition is appended).
        marker: plotly's marker settings.
        fmt: the hover's number format (e.g. ``".4g"``).
    """
    for cond in conditions(df, metric):
        s = by_layer(df, metric, cond)
        s = s[np.isfinite(s.values) & (s.values > 0)]
        if len(s):
            fig.add_trace(go.Scatter(x=s.index, y=s.values, mode="markers", name=f"{name} ({cond})", marker=marker,
                                     hovertemplate=f"{cond}<br>layer %{{x}}<br>{name} %{{y:{fmt}}}<extra></extra>"))


def residual_norms_figure(records: pd.DataFrame, phase: str = "prefill", decode_step: int = 0,
                          question_id=None, steered: tuple[int, ...] | None = None) -> go.Figure:
    """‖x‖ per layer entering, after attention and leaving (baseline solid, steered dashed), and the vector an
    intervention added where nonzero.

    Args:
        records: a tidy records frame.
        phase: ``"prefill"`` or ``"decode"``.
        decode_step: the decode step (0: the prefill decision token).
        question_id: the question drawn; None: the only one in ``records``.
        steered: the layers marked as steered; None: read off the records (:func:`steered_layers`).

    Returns:
        The figure: L2 norms per layer on a log axis, ‖v‖ added as stars.

    Raises:
        ValueError: ``question_id`` is None and the records hold several questions.
        MissingDataError: no row matches, or the records have no ``resid_pre_norm`` rows.
    """
    df = select(records, phase, decode_step, question_id)
    require(df, "resid_pre_norm")
    fig = go.Figure()
    colours = {"resid_pre_norm": "#1f77b4", "resid_mid_norm": "#ff7f0e", "resid_post_norm": "#2ca02c"}
    _layer_lines(fig, df, colours)
    add_positive_markers(fig, df, "added_norm", "added ‖v‖", dict(symbol="star", size=11, color="#d62728"), ".4g")
    mark_steered(fig, steered_layers(df) if steered is None else steered)
    log_axis(fig, axis_values(fig))
    fig.update_layout(title=f"Size of the residual stream at the decision token ({phase} step {decode_step})",
                      xaxis_title="layer", yaxis_title="L2 norm (log scale)")
    return fig


def jacobian_gains_figure(records: pd.DataFrame, condition: str = STEERED, phase: str = "prefill",
                          decode_step: int = 0, question_id=None, steered: tuple[int, ...] | None = None) -> go.Figure:
    """RMSNorm Jacobian gains per layer along θ*, orthogonal and radial, for ln1/ln2/ln_final.

    Args:
        condition: the condition whose gains are drawn.
    """
    df = select(records, phase, decode_step, question_id)
    sub = df[df["condition"] == condition]
    fig = go.Figure()
    for norm in NORMS:
        for kind, label in GAIN_KINDS.items():
            metric = f"{norm}_gain_{kind}"
            s = by_layer(sub, metric, condition)
            s = s[np.isfinite(s.values) & (s.values > 0)]
            if s.empty:
                continue
            fig.add_trace(go.Scatter(
                x=s.index, y=s.values, mode="lines+markers", name=f"{norm} {label}",
                line=dict(color=_NORM_COLOURS[norm], dash=_KIND_DASH[kind]),
                hovertemplate=f"{_NORM_NAMES[norm]}, {label}<br>layer %{{x}}<br>gain %{{y:.4g}}<extra></extra>",
            ))
    if not fig.data:
        raise MissingDataError(f"records have no finite '{{norm}}_gain_*' rows for condition {condition!r}")
    mark_steered(fig, steered_layers(df) if steered is None else steered)
    log_axis(fig, axis_values(fig))
    fig.update_layout(title=f"How much each RMSNorm passes on a small change of x, {condition} "
                            f"({phase} step {decode_step})",
                      xaxis_title="layer", yaxis_title="gain ‖J v‖ / ‖v‖ (log scale)")
    return fig


def logit_lens_figure(records: pd.DataFrame, phase: str = "prefill", decode_step: int = 0,
                      question_id=None, steered: tuple[int, ...] | None = None) -> go.Figure:
    """Logit-lens margin logit(Yes) − logit(No) per layer per condition, final margins as markers.

    Args:
        records: a tidy records frame.
        phase: ``"prefill"`` or ``"decode"``.
        decode_step: the decode step (0: the prefill decision token).
        question_id: the question drawn; None: the only one in ``records``.
        steered: the layers marked as steered; None: read off the records (:func:`steered_layers`).

    Returns:
        The figure: one line per condition, the final margins at x = the number of layers.

    Raises:
        ValueError: ``question_id`` is None and the records hold several questions.
        MissingDataError: no row matches, or the records have no ``logit_lens_margin`` rows.
    """
    df = select(records, phase, decode_step, question_id)
    require(df, "logit_lens_margin")
    fig = go.Figure()
    conds = conditions(df, "logit_lens_margin")
    last = max(int(by_layer(df, "logit_lens_margin", c).index.max()) for c in conds)
    for cond in conds:
        s = by_layer(df, "logit_lens_margin", cond)
        fig.add_trace(go.Scatter(
            x=s.index, y=s.values, mode="lines+markers", name=f"logit lens ({cond})",
            line=dict(dash=_dash(cond)),
            hovertemplate=f"{cond}<br>layer %{{x}}<br>margin %{{y:.3f}}<extra></extra>",
        ))
    for cond in conditions(df, "final_margin"):
        value = _whole_model(df, "final_margin", cond)
        fig.add_trace(go.Scatter(
            x=[last + 1], y=[value], mode="markers+text", name=f"final margin ({cond})",
            marker=dict(symbol="square", size=11), text=[f"{value:+.2f}"], textposition="middle right",
            hovertemplate=f"{cond}<br>final margin %{{y:.3f}}<extra></extra>",
        ))
    fig.add_hline(y=0, line=dict(color="grey", width=1), annotation_text="above: Yes / below: No",
                  annotation_position="bottom left")
    mark_steered(fig, steered_layers(df) if steered is None else steered)
    fig.update_layout(title=f"Yes − No margin read out after each layer (logit lens; {phase} step {decode_step})",
                      xaxis_title=f"layer (x = {last + 1}: the model's final margin)",
                      yaxis_title="logit(Yes) − logit(No)")
    return fig


def propagation_figure(records: pd.DataFrame, phase: str = "prefill", decode_step: int = 0,
                       question_id=None, steered: tuple[int, ...] | None = None,
                       idle: str | None = None) -> go.Figure | NoFigure:
    """‖x_k^steered − x_k^base‖ / ‖x_k^base‖ at resid_post per layer (log scale).

    Exact zeros (layers before the first step) cannot sit on a log axis: they are drawn at the
    axis floor, a decade under the smallest nonzero value, as open markers, and the figure
    says so.

    Args:
        idle: why nothing changed, for the :class:`NoFigure`; None: the generic reason.

    Returns:
        The figure, or a :class:`NoFigure` with the reason when no value is nonzero.
    """
    df = select(records, phase, decode_step, question_id)
    require(df, "propagation_rel")
    title = "How far the change propagates: ‖x_steered − x_baseline‖ / ‖x_baseline‖ leaving each layer"
    series = {c: by_layer(df, "propagation_rel", c) for c in conditions(df, "propagation_rel")}
    positive = [v for s in series.values() for v in s.values if np.isfinite(v) and v > 0]
    if not positive:
        return NoFigure(title, "no propagation: the steered residual equals the baseline's at every layer, because "
                               f"{idle or IDLE}.")
    floor = 10.0 ** (math.floor(math.log10(min(positive))) - 1)
    fig = go.Figure()
    zeros = 0
    for cond, s in series.items():
        vals = np.asarray(s.values, dtype=float)
        is_zero = np.isfinite(vals) & (vals <= 0)
        zeros += int(is_zero.sum())
        fig.add_trace(go.Scatter(
            x=s.index, y=np.where(is_zero, floor, vals), mode="lines+markers", name=cond, line=dict(dash=_dash(cond)),
            marker=dict(symbol=["circle-open" if z else "circle" for z in is_zero], size=9),
            customdata=np.where(is_zero, "exactly 0 (drawn at the axis floor)", [f"{v:.3g}" for v in vals]),
            hovertemplate=f"{cond}<br>layer %{{x}}<br>relative change %{{customdata}}<extra></extra>"))
    mark_steered(fig, steered_layers(df) if steered is None else steered)
    log_axis(fig, [floor, *positive])
    if zeros:
        fig.add_annotation(text=f"open markers: exactly 0 (no change yet), drawn at the floor {_tick_text(floor)}",
                           showarrow=False, xref="paper", yref="paper", x=0, y=1.0, xanchor="left", yanchor="bottom",
                           font=dict(size=11))
    fig.update_layout(title=f"{title} ({phase} step {decode_step})", xaxis_title="layer",
                      yaxis_title="relative change (log scale)")
    return fig


def trace_figures(records: pd.DataFrame, phase: str = "prefill", decode_step: int = 0,
                  question_id=None, steered: tuple[int, ...] | None = None,
                  intervention=None) -> dict[str, go.Figure | NoFigure]:
    """Every figure above that the records support, keyed by slug; absent metrics are skipped.

    Args:
        steered: the intervention's layers; None: read off the records.
        intervention: adds its own figures (:meth:`~mclcbf_diag.interventions.base.Intervention.figures`,
            after the residual norms) and says why nothing changed; None: the generic figures and reason.

    Returns:
        Slug → figure, in reading order; a figure that has nothing to draw is a
        :class:`~mclcbf_diag.report.html.NoFigure` (its ``show()`` prints the reason).
    """
    question_id = select(records, phase, decode_step, question_id)["question_id"].iloc[0]
    where = {"phase": phase, "decode_step": decode_step, "question_id": question_id}
    idle = intervention.idle_reason(select(records, **where)) if intervention is not None else IDLE
    shaded = {"steered": steered}
    builders = {
        "attention": (attention_heatmaps, {**shaded, "idle": idle}), "attention_mass": (attention_mass_figure, shaded),
        "residual_norms": (residual_norms_figure, shaded), "jacobian_gains": (jacobian_gains_figure, shaded),
        "logit_lens": (logit_lens_figure, shaded), "propagation": (propagation_figure, {**shaded, "idle": idle}),
    }
    figures = {}
    for slug, (build, extra) in builders.items():
        try:
            figures[slug] = build(records, **where, **extra)
        except MissingDataError:
            continue
    if intervention is not None:  # its own, after the residual norms (the generic figures keep their order)
        own = intervention.figures(records, **where, steered=steered)
        order = ["attention", "attention_mass", "residual_norms", *own, *[k for k in figures if k not in
                                                                        ("attention", "attention_mass",
                                                                         "residual_norms")]]
        figures = {k: {**figures, **own}[k] for k in order if k in {**figures, **own}}
    for slug, fig in figures.items():
        if slug in _LAYER_AXIS and isinstance(fig, go.Figure):
            fig.update_xaxes(dtick=1)  # layers are integers
    return figures


_LAYER_AXIS = {"attention_mass", "residual_norms", "step_size", "jacobian_gains", "logit_lens", "propagation"}


def dose_response_figure(curve: pd.DataFrame) -> go.Figure | NoFigure:
    """Final Yes/No margin against the multiplier k on θ* (log x), with the zero line.

    ``curve`` has columns k, margin and optionally theta_rel_max (from explain's
    dose-response); the answer flips where the margin crosses zero. When the step is zero at
    every k (k × 0 = 0) the curve is flat by construction: a :class:`NoFigure` says so.
    """
    for col in ("k", "margin"):
        if col not in curve:
            raise MissingDataError(f"dose-response curve has no column {col!r}")
    c = curve.sort_values("k")
    title = "Dose-response: final margin against the multiplier k on the step"
    margins = c.margin.to_numpy(dtype=float)
    flat = bool(len(margins)) and np.isfinite(margins).all() and float(np.ptp(margins)) <= 1e-6 * max(
        1.0, float(np.abs(margins).max()))
    zero_step = "theta_rel_max" in c and bool((c.theta_rel_max.fillna(0).to_numpy() == 0).all())
    if flat and zero_step:
        return NoFigure(title, f"flat: the step is zero, so k × θ* = 0 for every k from {c.k.min():g} to "
                               f"{c.k.max():g}, and the margin stays at {margins[0]:+.3g}.")
    hover = [f"k={k:.3g}<br>margin={m:+.4f}" + (f"<br>‖kθ*‖/‖x‖={r:.3g}" if "theta_rel_max" in c else "")
             for k, m, r in zip(c.k, c.margin, c.get("theta_rel_max", c.k))]
    fig = go.Figure(go.Scatter(x=c.k, y=c.margin, mode="lines+markers", name="final margin",
                               hovertext=hover, hoverinfo="text"))
    fig.add_hline(y=0, line_dash="dot", line_color="grey", annotation_text="above: Yes / below: No",
                  annotation_position="bottom left")
    if flat:
        fig.add_annotation(text=f"flat: the margin is {margins[0]:+.3g} at every k", showarrow=False,
                           xref="paper", yref="paper", x=0.5, y=0.9)
    fig.update_layout(title=title, xaxis_title="k (multiplier on the step, log scale)",
                      yaxis_title="logit(Yes) − logit(No)", xaxis_type="log")
    fig.update_xaxes(**log_ticks(c.k))
    return fig


def decode_summary_figure(records: pd.DataFrame, tokens: dict | None = None, question_id=None,
                          steered: tuple[int, ...] | None = None) -> go.Figure:
    """One figure across generation steps: image mass (mean over steered layers), final margin, layers fired.

    Args:
        records: a tidy records frame with every step of the question.
        tokens: decode step → a label such as ``"'Yes' → 'and'"`` (the token read → the token generated), shown
            on the x axis; a step without one is labelled ``step N``.
        steered: the layers the image mass is averaged over; None: read off the records (every layer when none).
    """
    if question_id is None:
        ids = list(pd.unique(records["question_id"]))
        if len(ids) > 1:
            raise ValueError(f"records hold {len(ids)} questions; pass question_id=")
        question_id = ids[0]
    df = records[records["question_id"] == question_id]
    steps = sorted({(str(p), int(s)) for p, s in df[["phase", "decode_step"]].itertuples(index=False)},
                   key=lambda t: t[1])
    if not steps:
        raise MissingDataError("no records to summarise")
    layers = steered_layers(df) if steered is None else tuple(steered)
    x = [(tokens or {}).get(s, f"step {s}") for _, s in steps]
    x = [f"{s}: {label}" for (_, s), label in zip(steps, x)]
    fig = make_subplots(rows=3, cols=1, shared_xaxes=True, vertical_spacing=0.08, subplot_titles=(
        "image attention mass of the query token (mean over heads and steered layers)",
        "final margin logit(Yes) − logit(No)", "steered layers that fired"))
    for cond in (BASELINE, STEERED):
        mass, margin = [], []
        for phase, s in steps:
            sub = df[(df["phase"] == phase) & (df["decode_step"] == s) & (df["condition"] == cond)]
            m = sub[(sub["metric"] == "attn_image_mass") & (sub["head"] == -1) & (sub["layer"] >= 0)]
            if layers:
                m = m[m["layer"].isin(layers)]
            mass.append(float(m["value"].mean()) if len(m) else None)
            fm = sub[(sub["metric"] == "final_margin") & (sub["layer"] == -1)]
            margin.append(float(fm["value"].iloc[0]) if len(fm) else None)
        fig.add_trace(go.Scatter(x=x, y=mass, mode="lines+markers", name=f"image mass ({cond})",
                                 line=dict(color="#d62728", dash=_dash(cond))), row=1, col=1)
        fig.add_trace(go.Scatter(x=x, y=margin, mode="lines+markers", name=f"final margin ({cond})",
                                 line=dict(color="#1f77b4", dash=_dash(cond))), row=2, col=1)
    fired = [len(fired_layers(df[(df["phase"] == p) & (df["decode_step"] == s)])) for p, s in steps]
    fig.add_trace(go.Bar(x=x, y=fired, name="layers fired (steered)", marker_color="#ff7f0e",
                         hovertemplate="%{x}<br>%{y} layers fired<extra></extra>"), row=3, col=1)
    if not any(fired):
        x0, x1 = fig.layout.xaxis3.domain
        y0, y1 = fig.layout.yaxis3.domain
        fig.add_annotation(text="no steered layer fired at any step", showarrow=False, xref="paper", yref="paper",
                           x=(x0 + x1) / 2, y=(y0 + y1) / 2, xanchor="center", font=dict(size=12))
    fig.update_yaxes(title_text="share", row=1, col=1)
    fig.update_yaxes(title_text="margin", row=2, col=1)
    fig.update_yaxes(title_text="layers", dtick=1, rangemode="tozero", range=[0, max(len(layers), 1) + 0.5],
                     row=3, col=1)
    fig.update_layout(title="Across generation steps: query token read → token generated", height=640)
    return fig


def flow_figure(flow: pd.DataFrame, title: str = "") -> go.Figure:
    """The information-flow map: relative change of p(answer) per blocked edge and layer window.

    ``flow`` is :func:`mclcbf_diag.experiments.flow.information_flow`'s frame; x is the window's first layer.
    """
    for col in ("edge", "first_layer", "last_layer", "change"):
        if col not in flow:
            raise MissingDataError(f"flow frame has no column {col!r}")
    fig = go.Figure()
    for edge, g in flow.groupby("edge", sort=False):
        g = g.sort_values("first_layer")
        fig.add_trace(go.Scatter(
            x=g.first_layer, y=100 * g.change, mode="lines+markers", name=edge,
            hovertext=[f"{edge}, layers {a}–{b}: {100 * c:+.2f}%" for a, b, c in zip(g.first_layer, g.last_layer,
                                                                                     g.change)],
            hoverinfo="text"))
    fig.add_hline(y=0, line_dash="dot", line_color="grey")
    window = int(flow.last_layer.iloc[0] - flow.first_layer.iloc[0] + 1)
    fig.update_layout(title=title or f"Information flow: blocking an edge in a window of {window} layers",
                      xaxis_title="first layer of the blocked window",
                      yaxis_title="change of p(answer) (%)", legend_title="blocked edge")
    fig.update_xaxes(dtick=1)
    return fig


def image_attention_figure(image: np.ndarray, baseline: dict, intervened: dict | None = None,
                           title: str = "Attention of the decision token over the image") -> go.Figure:
    """The image as the model saw it, with attention per patch over it: baseline, intervened, difference.

    A slider picks the label. The heatmaps are stretched over the image (each cell one patch) and half
    transparent, so both stay visible. When the difference is zero at every label, the difference panel says so.

    Args:
        image: the image as the model saw it, [height, width, 3].
        baseline: a label ("layer 3", "steered layers", "all layers") → a patch grid [rows, columns]
            (:func:`mclcbf_diag.report.overlay.attention_maps`).
        intervened: the same for the intervened run; None: the baseline panel alone.
        title: the figure's title.
    """
    panels = [("baseline", baseline)] + ([("intervened", intervened)] if intervened is not None else [])
    if intervened is not None:
        panels.append(("difference", {k: intervened[k] - baseline[k] for k in baseline if k in intervened}))
    labels = [k for k in baseline if all(k in p for _, p in panels)]
    if not labels:
        raise MissingDataError("no attention maps to draw")
    h, w = image.shape[:2]
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[name for name, _ in panels],
                        horizontal_spacing=0.06)
    vmax = max(float(np.max(p[k])) for name, p in panels if name != "difference" for k in labels) or 1.0
    dmax = max((float(np.max(np.abs(p[k]))) for name, p in panels if name == "difference" for k in labels),
               default=0.0)
    no_diff = intervened is not None and dmax == 0.0
    dmax = dmax or 1.0
    for c, (name, maps) in enumerate(panels, start=1):
        fig.add_trace(go.Image(z=image, hoverinfo="skip"), row=1, col=c)
        for j, label in enumerate(labels):
            grid = maps[label]
            rows, cols = grid.shape[:2]  # a patch grid need not be square (Qwen-VL's follows the image's aspect)
            diff = name == "difference"
            fig.add_trace(go.Heatmap(
                z=grid, x0=w / cols / 2, dx=w / cols, y0=h / rows / 2, dy=h / rows,
                colorscale="RdBu_r" if diff else "Inferno", zmin=-dmax if diff else 0, zmax=dmax if diff else vmax,
                opacity=0.55, visible=j == 0, showscale=j == 0 and c in (1, len(panels)) and not (diff and no_diff),
                colorbar=dict(title="Δ share" if diff else "share", x=1.02 if diff else -0.12, len=0.8),
                hovertemplate=f"{name}, {label}<br>patch row %{{y:.0f}} px, col %{{x:.0f}} px<br>share %{{z:.4f}}"
                              "<extra></extra>"), row=1, col=c)
    _label_slider(fig, labels, len(panels), title)
    for c in range(1, len(panels) + 1):
        fig.update_xaxes(visible=False, row=1, col=c)
        fig.update_yaxes(visible=False, autorange="reversed", scaleanchor=f"x{'' if c == 1 else c}", row=1, col=c)
    if no_diff:
        c = len(panels)
        x0, x1 = fig.layout[f"xaxis{c}"].domain
        fig.add_annotation(text="no difference at any layer:<br>the intervention did not change<br>this token's "
                                "attention over the image", showarrow=False, xref="paper", yref="paper",
                           x=(x0 + x1) / 2, y=0.5, xanchor="center", font=dict(size=12),
                           bgcolor="rgba(255,255,255,0.85)")
    assert len(fig.data) == (1 + len(labels)) * len(panels)
    return fig


def _label_slider(fig: go.Figure, labels: list[str], n_panels: int, title: str) -> None:
    """A slider over ``labels`` (each panel: the image, then one heatmap per label); "steered layers" first shown."""
    steps = []
    for j, label in enumerate(labels):
        visible = []
        for _ in range(n_panels):
            visible += [True] + [k == j for k in range(len(labels))]
        steps.append(dict(method="update", label=label, args=[{"visible": visible}]))
    active = labels.index("steered layers") if "steered layers" in labels else 0
    for k, tr in enumerate(fig.data):
        if isinstance(tr, go.Heatmap):
            tr.visible = steps[active]["args"][0]["visible"][k]
    fig.update_layout(title=title, sliders=[dict(active=active, steps=steps, currentvalue=dict(prefix="layers: "))],
                      height=480, margin=dict(t=80))


def layer_heatmaps(records: pd.DataFrame, panels, *, title: str, value: str, question_id=None,
                   diverging: bool = True, zrange: tuple[float, float] | None = None) -> go.Figure:
    """Heatmaps side by side, layers down, on one colour scale (attribution and patching, prefill).

    Args:
        panels: ``(subtitle, condition, metric)`` draws layer × head from the metric's per-head rows;
            ``(subtitle, condition, {column: metric, …})`` draws layer × those columns from per-layer rows
            (head −1), e.g. the token groups of a residual patch.
        title: the figure's title.
        value: what the colour shows (the colour bar's title).
        diverging: a red–blue scale centred on 0; False: Viridis over ``zrange``.
        zrange: ``(low, high)`` of the Viridis scale; None: the data's range.

    Raises:
        MissingDataError: a panel has no rows.
    """
    df = select(records, "prefill", 0, question_id)
    grids = []
    for subtitle, condition, metric in panels:
        sub = df[(df["condition"] == condition) & (df["layer"] >= 0)]
        if isinstance(metric, str):
            rows = sub[(sub["metric"] == metric) & (sub["head"] >= 0)]
            if rows.empty:
                raise MissingDataError(f"records have no per-head {metric!r} rows for condition {condition!r}")
            grid = rows.pivot(index="layer", columns="head", values="value")
            x, xlabel = [int(h) for h in grid.columns], "head"
        else:
            rows = sub[sub["metric"].isin(list(metric.values())) & (sub["head"] < 0)]
            if rows.empty:
                raise MissingDataError(f"records have no rows of {sorted(metric.values())} for condition {condition!r}")
            grid = rows.pivot(index="layer", columns="metric", values="value").reindex(columns=list(metric.values()))
            x, xlabel = list(metric), ""
        grids.append((subtitle, grid, x, xlabel))
    values = np.concatenate([g.to_numpy(dtype=float).ravel() for _, g, _, _ in grids])
    finite = values[np.isfinite(values)]
    if diverging:
        span = float(np.abs(finite).max()) if finite.size and np.abs(finite).max() > 0 else 1.0
        scale = dict(colorscale="RdBu_r", cmid=0, cmin=-span, cmax=span)
    else:
        lo, hi = zrange if zrange is not None else ((float(finite.min()), float(finite.max())) if finite.size
                                                    else (0.0, 1.0))
        scale = dict(colorscale="Viridis", cmin=lo, cmax=hi if hi > lo else lo + 1)
    fig = make_subplots(rows=1, cols=len(grids), subplot_titles=[g[0] for g in grids], shared_yaxes=True,
                        horizontal_spacing=0.06)
    for col, (subtitle, grid, x, xlabel) in enumerate(grids, start=1):
        fig.add_trace(go.Heatmap(
            z=grid.to_numpy(dtype=float), x=x, y=[int(i) for i in grid.index], name=subtitle, coloraxis="coloraxis",
            hovertemplate=f"{subtitle}<br>layer %{{y}}, %{{x}}<br>{value} %{{z:.4g}}<extra></extra>"), row=1, col=col)
        fig.update_xaxes(title_text=xlabel, dtick=1 if xlabel == "head" else None, type="category" if not xlabel
                         else None, row=1, col=col)
    fig.update_yaxes(title_text="layer", dtick=1, row=1, col=1)
    fig.update_layout(title=title, height=460, margin=dict(b=120),
                      coloraxis=dict(scale, colorbar=dict(orientation="h", y=-0.28, yanchor="top", thickness=12,
                                                          len=0.5, title=dict(text=value, side="top"))))
    return fig

"""Plotly figures of the tidy measurement records (see :mod:`mclcbf_diag.records`).

Every function here is pure: a records frame in, a ``plotly.graph_objects.Figure`` out,
no file IO (:mod:`mclcbf_diag.report` turns figures into HTML). Each picks one
``phase``/``step`` (default the prefill decision token, ``"prefill"``/0) and one ``sample``
(default: the only one present; with several the caller must name it).

A figure whose metrics are absent raises :class:`MissingDataError` (a ``ValueError``)
naming the metric; :func:`trace_figures` builds every figure the records support and
skips the rest.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

BASELINE, STEERED = "baseline", "steered"
NORMS = ("ln1", "ln2", "ln_final")
GAIN_KINDS = {"theta": "along θ*", "orthogonal": "orthogonal to x", "radial": "radial (x̂)"}
_NORM_COLOURS = {"ln1": "#1f77b4", "ln2": "#ff7f0e", "ln_final": "#2ca02c"}
_KIND_DASH = {"theta": "solid", "orthogonal": "dash", "radial": "dot"}


class MissingDataError(ValueError):
    """The records lack a metric or condition a figure needs."""


# ----------------------------------------------------------------------------- selection
def _select(records: pd.DataFrame, phase: str, step: int, sample=None) -> pd.DataFrame:
    """Rows of one sample at one phase/step."""
    samples = list(pd.unique(records["sample"]))
    if sample is None:
        if len(samples) > 1:
            shown = ", ".join(map(str, samples[:5])) + (" ..." if len(samples) > 5 else "")
            raise ValueError(f"records hold {len(samples)} samples ({shown}); pass sample=")
        sample = samples[0] if samples else None
    df = records[(records["sample"] == sample) & (records["phase"] == phase)
                 & (records["step"] == step)]
    if df.empty:
        raise MissingDataError(f"no records for sample={sample!r}, phase={phase!r}, step={step}")
    return df


def _require(df: pd.DataFrame, *metrics: str) -> None:
    present = set(df["metric"])
    for metric in metrics:
        if metric not in present:
            raise MissingDataError(f"records have no {metric!r} rows for this sample/phase/step")


def _by_layer(df: pd.DataFrame, metric: str, condition: str) -> pd.Series:
    """Per-layer values (head −1, layer ≥ 0) of one metric and condition, indexed by layer."""
    rows = df[(df["metric"] == metric) & (df["condition"] == condition)
              & (df["head"] == -1) & (df["layer"] >= 0)]
    if rows["layer"].duplicated().any():
        raise ValueError(f"duplicate {metric!r} rows per layer for condition {condition!r}")
    return rows.set_index("layer")["value"].sort_index()


def _whole_model(df: pd.DataFrame, metric: str, condition: str) -> float | None:
    rows = df[(df["metric"] == metric) & (df["condition"] == condition) & (df["layer"] == -1)]
    return float(rows["value"].iloc[0]) if len(rows) else None


def _conditions(df: pd.DataFrame, metric: str) -> list[str]:
    """Conditions with rows of ``metric``, baseline first, then steered, then the rest."""
    found = set(df.loc[df["metric"] == metric, "condition"])
    order = [c for c in (BASELINE, STEERED) if c in found]
    return order + sorted(found - {BASELINE, STEERED})


def _dash(condition: str) -> str:
    return {BASELINE: "solid", STEERED: "dash"}.get(condition, "dot")


# ----------------------------------------------------------------------------- figures
def attention_heatmaps(records: pd.DataFrame, metric: str = "attn_image_mass",
                       phase: str = "prefill", step: int = 0, sample=None,
                       condition: str = STEERED) -> go.Figure:
    """Layer × head heatmaps of an attention mass: baseline, ``condition``, and their difference."""
    df = _select(records, phase, step, sample)
    _require(df, metric)
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
    titles = (BASELINE, condition, f"{condition} − {BASELINE}")
    fig = make_subplots(rows=1, cols=3, subplot_titles=titles, shared_yaxes=True,
                        horizontal_spacing=0.08)
    for col, (name, grid) in enumerate(zip(titles, (base, steer, diff)), start=1):
        fig.add_trace(go.Heatmap(
            z=grid.to_numpy(), x=heads, y=layers, name=name,
            coloraxis="coloraxis2" if col == 3 else "coloraxis",
            hovertemplate=f"{name}<br>layer %{{y}}, head %{{x}}<br>{metric} %{{z:.4g}}<extra></extra>",
        ), row=1, col=col)
        fig.update_xaxes(title_text="head", row=1, col=col)
    fig.update_yaxes(title_text="layer", row=1, col=1)
    span = float(np.nanmax(np.abs(diff.to_numpy()))) if diff.notna().any().any() else 1.0
    fig.update_layout(
        title=f"{metric} ({phase} step {step})",
        coloraxis=dict(colorscale="Viridis", colorbar=dict(title=metric, x=0.64, len=0.9)),
        coloraxis2=dict(colorscale="RdBu_r", cmid=0, cmin=-span, cmax=span,
                        colorbar=dict(title="Δ", x=1.02, len=0.9)),
    )
    return fig


def residual_norms_figure(records: pd.DataFrame, phase: str = "prefill", step: int = 0,
                          sample=None) -> go.Figure:
    """‖x‖ per layer at resid_pre/mid/post (baseline solid, steered dashed), with ‖θ*‖ beside them."""
    df = _select(records, phase, step, sample)
    _require(df, "resid_pre_norm")
    has_rel = "theta_rel" in set(df["metric"])
    fig = make_subplots(rows=2 if has_rel else 1, cols=1, shared_xaxes=True,
                        subplot_titles=("residual-stream norm", "‖θ*‖ / ‖x‖") if has_rel else None)
    colours = {"resid_pre_norm": "#1f77b4", "resid_mid_norm": "#ff7f0e", "resid_post_norm": "#2ca02c"}
    for metric, colour in colours.items():
        for cond in _conditions(df, metric):
            s = _by_layer(df, metric, cond)
            fig.add_trace(go.Scatter(
                x=s.index, y=s.values, mode="lines+markers", name=f"{metric} ({cond})",
                line=dict(color=colour, dash=_dash(cond)),
                hovertemplate=f"{cond}<br>layer %{{x}}<br>{metric} %{{y:.4g}}<extra></extra>",
            ), row=1, col=1)
    for cond in _conditions(df, "theta_norm"):
        s = _by_layer(df, "theta_norm", cond)
        fig.add_trace(go.Scatter(
            x=s.index, y=s.values, mode="markers", name=f"‖θ*‖ ({cond})",
            marker=dict(symbol="star", size=11, color="#d62728"),
            hovertemplate=f"{cond}<br>layer %{{x}}<br>‖θ*‖ %{{y:.4g}}<extra></extra>",
        ), row=1, col=1)
    if has_rel:
        for cond in _conditions(df, "theta_rel"):
            s = _by_layer(df, "theta_rel", cond)
            fig.add_trace(go.Scatter(
                x=s.index, y=s.values, mode="markers", name=f"‖θ*‖/‖x‖ ({cond})",
                marker=dict(symbol="diamond", size=9, color="#9467bd"),
                hovertemplate=f"{cond}<br>layer %{{x}}<br>‖θ*‖/‖x‖ %{{y:.3g}}<extra></extra>",
            ), row=2, col=1)
        fig.update_yaxes(type="log", title_text="ratio", row=2, col=1)
    fig.update_yaxes(type="log", title_text="L2 norm", row=1, col=1)
    fig.update_xaxes(title_text="layer", row=2 if has_rel else 1, col=1)
    fig.update_layout(title=f"Residual norms vs steering step ({phase} step {step})")
    return fig


def jacobian_gains_figure(records: pd.DataFrame, condition: str = STEERED, phase: str = "prefill",
                          step: int = 0, sample=None) -> go.Figure:
    """RMSNorm Jacobian gains per layer along θ*, orthogonal and radial, for ln1/ln2/ln_final."""
    df = _select(records, phase, step, sample)
    df = df[df["condition"] == condition]
    fig = go.Figure()
    for norm in NORMS:
        for kind, label in GAIN_KINDS.items():
            metric = f"{norm}_gain_{kind}"
            s = _by_layer(df, metric, condition)
            s = s[np.isfinite(s.values)]
            if s.empty:
                continue
            fig.add_trace(go.Scatter(
                x=s.index, y=s.values, mode="lines+markers", name=f"{norm} {label}",
                line=dict(color=_NORM_COLOURS[norm], dash=_KIND_DASH[kind]),
                hovertemplate=f"{norm}, {label}<br>layer %{{x}}<br>gain %{{y:.4g}}<extra></extra>",
            ))
    if not fig.data:
        raise MissingDataError(f"records have no finite '{{norm}}_gain_*' rows for condition {condition!r}")
    fig.update_layout(title=f"RMSNorm Jacobian gains, {condition} ({phase} step {step})",
                      xaxis_title="layer", yaxis_title="gain ‖J v‖/‖v‖")
    fig.update_yaxes(type="log")
    return fig


def logit_lens_figure(records: pd.DataFrame, phase: str = "prefill", step: int = 0,
                      sample=None) -> go.Figure:
    """Logit-lens margin logit(Yes) − logit(No) per layer per condition, final margins as markers."""
    df = _select(records, phase, step, sample)
    _require(df, "logit_lens_margin")
    fig = go.Figure()
    conds = _conditions(df, "logit_lens_margin")
    last = max(int(_by_layer(df, "logit_lens_margin", c).index.max()) for c in conds)
    for cond in conds:
        s = _by_layer(df, "logit_lens_margin", cond)
        fig.add_trace(go.Scatter(
            x=s.index, y=s.values, mode="lines+markers", name=f"logit lens ({cond})",
            line=dict(dash=_dash(cond)),
            hovertemplate=f"{cond}<br>layer %{{x}}<br>margin %{{y:.3f}}<extra></extra>",
        ))
    for cond in _conditions(df, "final_margin"):
        value = _whole_model(df, "final_margin", cond)
        fig.add_trace(go.Scatter(
            x=[last + 1], y=[value], mode="markers+text", name=f"final margin ({cond})",
            marker=dict(symbol="square", size=11), text=[f"{value:+.2f}"], textposition="middle right",
            hovertemplate=f"{cond}<br>final margin %{{y:.3f}}<extra></extra>",
        ))
    fig.add_hline(y=0, line=dict(color="grey", width=1), annotation_text="Yes ↑ / No ↓",
                  annotation_position="bottom left")
    fig.update_layout(title=f"Logit lens ({phase} step {step}); final margin at x = {last + 1}",
                      xaxis_title="layer (final margin at the right)",
                      yaxis_title="logit(Yes) − logit(No)")
    return fig


def barrier_figure(records: pd.DataFrame, condition: str = STEERED, phase: str = "prefill",
                   step: int = 0, sample=None) -> go.Figure:
    """Per steered layer: barrier h before the step, τ, and h after (recomputed and realised)."""
    df = _select(records, phase, step, sample)
    df = df[df["condition"] == condition]
    _require(df, "barrier_h")
    h = _by_layer(df, "barrier_h", condition)
    series = {"h before": (h, "circle")}
    if "barrier_tau" in set(df["metric"]):
        series["τ"] = (_by_layer(df, "barrier_tau", condition), "line-ew-open")
    for metric, name, symbol in (("dh_recomputed", "h after (recomputed)", "triangle-up"),
                                 ("dh_realised", "h after (realised)", "x")):
        if metric in set(df["metric"]):
            series[name] = ((h + _by_layer(df, metric, condition)).dropna(), symbol)
    fig = go.Figure()
    for name, (s, symbol) in series.items():
        fig.add_trace(go.Scatter(
            x=[f"L{layer}" for layer in s.index], y=s.values, mode="markers", name=name,
            marker=dict(symbol=symbol, size=12, line=dict(width=2)),
            hovertemplate=f"{name}<br>%{{x}}<br>%{{y:.4g}}<extra></extra>",
        ))
    fig.update_layout(title=f"Barrier h = image attention mass, {condition} ({phase} step {step})",
                      xaxis_title="steered layer", yaxis_title="h", scattermode="group")
    return fig


def propagation_figure(records: pd.DataFrame, phase: str = "prefill", step: int = 0,
                       sample=None) -> go.Figure:
    """‖x_k^steered − x_k^base‖ / ‖x_k^base‖ at resid_post per layer (log scale)."""
    df = _select(records, phase, step, sample)
    _require(df, "propagation_rel")
    fig = go.Figure()
    for cond in _conditions(df, "propagation_rel"):
        s = _by_layer(df, "propagation_rel", cond)
        fig.add_trace(go.Scatter(
            x=s.index, y=s.values, mode="lines+markers", name=cond, line=dict(dash=_dash(cond)),
            hovertemplate=f"{cond}<br>layer %{{x}}<br>relative change %{{y:.3g}}<extra></extra>",
        ))
    fig.update_layout(title=f"Propagation of the steering step ({phase} step {step})",
                      xaxis_title="layer", yaxis_title="‖Δx‖ / ‖x_base‖ at resid_post")
    fig.update_yaxes(type="log")
    return fig


def trace_figures(records: pd.DataFrame, phase: str = "prefill", step: int = 0,
                  sample=None) -> dict[str, go.Figure]:
    """Every figure above that the records support, keyed by slug; absent metrics are skipped."""
    sample = _select(records, phase, step, sample)["sample"].iloc[0]
    builders = {
        "attention": attention_heatmaps, "residual_norms": residual_norms_figure,
        "jacobian_gains": jacobian_gains_figure, "logit_lens": logit_lens_figure,
        "barrier": barrier_figure, "propagation": propagation_figure,
    }
    figures = {}
    for slug, build in builders.items():
        try:
            figures[slug] = build(records, phase=phase, step=step, sample=sample)
        except MissingDataError:
            continue
        if slug in _LAYER_AXIS:
            figures[slug].update_xaxes(dtick=1)  # layers are integers
    return figures


_LAYER_AXIS = {"residual_norms", "jacobian_gains", "logit_lens", "propagation"}


def dose_response_figure(curve: pd.DataFrame) -> go.Figure:
    """Final Yes/No margin against the multiplier k on θ* (log x), with the zero line.

    ``curve`` has columns k, margin and optionally theta_rel_max (from explain's
    dose-response); the answer flips where the margin crosses zero.
    """
    for col in ("k", "margin"):
        if col not in curve:
            raise MissingDataError(f"dose-response curve has no column {col!r}")
    c = curve.sort_values("k")
    hover = [f"k={k:.3g}<br>margin={m:+.4f}" + (f"<br>‖kθ*‖/‖x‖={r:.3g}" if "theta_rel_max" in c else "")
             for k, m, r in zip(c.k, c.margin, c.get("theta_rel_max", c.k))]
    fig = go.Figure(go.Scatter(x=c.k, y=c.margin, mode="lines+markers", name="final margin",
                               hovertext=hover, hoverinfo="text"))
    fig.add_hline(y=0, line_dash="dot", line_color="grey")
    fig.update_layout(title="Dose-response: final margin vs multiplier on θ*",
                      xaxis_title="k (multiplier on θ*)", yaxis_title="logit(Yes) − logit(No)", xaxis_type="log")
    return fig


def flow_figure(flow: pd.DataFrame, title: str = "") -> go.Figure:
    """The information-flow map: relative change of p(answer) per blocked edge and layer window.

    ``flow`` is :func:`mclcbf_diag.flow.information_flow`'s frame; x is the window's first layer.
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

    ``baseline``/``intervened`` map a label ("layer 3", "steered layers", "all layers") to a patch
    grid (:func:`mclcbf_diag.overlay.attention_maps`); a slider picks the label. The heatmaps are
    stretched over the image (each cell one patch) and half transparent, so both stay visible.
    """
    import numpy as np

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
               default=0.0) or 1.0
    for c, (name, maps) in enumerate(panels, start=1):
        fig.add_trace(go.Image(z=image, hoverinfo="skip"), row=1, col=c)
        for j, label in enumerate(labels):
            grid = maps[label]
            n = grid.shape[0]
            diff = name == "difference"
            fig.add_trace(go.Heatmap(
                z=grid, x0=w / n / 2, dx=w / n, y0=h / n / 2, dy=h / n,
                colorscale="RdBu_r" if diff else "Inferno", zmin=-dmax if diff else 0, zmax=dmax if diff else vmax,
                opacity=0.55, visible=j == 0, showscale=j == 0 and c in (1, len(panels)),
                colorbar=dict(title="Δ mass" if diff else "mass", x=1.02 if diff else -0.12, len=0.8),
                hovertemplate=f"{name}, {label}<br>patch row %{{y:.0f}} px, col %{{x:.0f}} px<br>mass %{{z:.4f}}"
                              "<extra></extra>"), row=1, col=c)
    n_per_panel = 1 + len(labels)
    steps = []
    for j, label in enumerate(labels):
        visible = []
        for _ in panels:
            visible += [True] + [k == j for k in range(len(labels))]
        steps.append(dict(method="update", label=label, args=[{"visible": visible}]))
    active = labels.index("steered layers") if "steered layers" in labels else 0
    for k, tr in enumerate(fig.data):
        if isinstance(tr, go.Heatmap):
            tr.visible = steps[active]["args"][0]["visible"][k]
    fig.update_layout(title=title, sliders=[dict(active=active, steps=steps, currentvalue=dict(prefix="layers: "))],
                      height=480, margin=dict(t=80))
    for c in range(1, len(panels) + 1):
        fig.update_xaxes(visible=False, row=1, col=c)
        fig.update_yaxes(visible=False, autorange="reversed", scaleanchor=f"x{'' if c == 1 else c}", row=1, col=c)
    assert len(fig.data) == n_per_panel * len(panels)
    return fig

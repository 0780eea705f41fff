"""What MC-LCBF adds to a report: its summary fields and lines, its page sentences and its figures.

The generic report (:mod:`mclcbf_diag.experiments.trace`, :mod:`mclcbf_diag.report.pages`,
:mod:`mclcbf_diag.report.plots`, ``mclcbf-diag trace``) asks the intervention for these
through :class:`~mclcbf_diag.interventions.base.Intervention`'s report methods; nothing
outside this package names the barrier's records. The figures take the parameters every figure of
:mod:`mclcbf_diag.report.plots` shares (``records``, ``phase``, ``decode_step``, ``question_id``,
``steered``), described there once.
"""

from __future__ import annotations

import math

import pandas as pd
import plotly.graph_objects as go

from ...measurements.noise import show as shown
from ...models.tokens import span_problem
from ...report.html import NoFigure, fmt_value, layer_list
from ...report.plots import (
    STEERED,
    MissingDataError,
    add_positive_markers,
    axis_values,
    by_layer,
    fired_layers,
    fmt_number,
    log_axis,
    mark_steered,
    require,
    select,
    steered_layers,
    wrap_text,
)


# ------------------------------------------------------------------------------------------ the summary
def summary_fields(per_layer: pd.DataFrame, baseline: pd.DataFrame, knobs=None) -> dict:
    """Steered and fired layers, h before and after the step (a realised Δh under its floor counts as 0), the
    largest ‖θ*‖/‖x‖, and Δh predicted, recomputed and realised (mean over fired layers, with floors); the two
    warnings (:func:`warnings_of`).

    Args:
        per_layer: the intervened run's prefill records, layer × metric (head −1).
        baseline: the measuring baseline run's, the same way (its ``barrier_h`` rows are the steered layers).
        knobs: the run's :class:`~mclcbf_diag.interventions.mclcbf.config.BarrierConfig`, for the span warning;
            None: no span warning.
    """
    empty = pd.Series(dtype=float)
    fired = per_layer.get("barrier_active", empty).fillna(0)
    h_before = baseline.get("barrier_h", empty).dropna()
    realised = per_layer.get("dh_realised", empty)
    realised = realised.where(~(realised.abs() < per_layer.get("dh_realised_floor", empty).reindex(
        realised.index)), 0.0)
    h_after = (per_layer.get("barrier_h", empty) + realised.fillna(0)).dropna()
    theta_rel = per_layer.get("theta_rel", empty).dropna()
    out = {"layers_steered": [int(i) for i in h_before.index],
           "layers_fired": [int(i) for i in fired[fired > 0].index],
           "h_before_mean": float(h_before.mean()) if len(h_before) else math.nan,
           "h_after_mean": float(h_after.mean()) if len(h_after) else math.nan,
           "max_theta_rel": float(theta_rel.max()) if len(theta_rel) else math.nan}
    for metric in ("dh_predicted", "dh_recomputed", "dh_realised"):  # a mean's floor: its layers' largest
        vals = (per_layer[metric].reindex(fired[fired > 0].index).dropna() if metric in per_layer
                else pd.Series(dtype=float))
        floors = per_layer[f"{metric}_floor"].reindex(vals.index).dropna() if f"{metric}_floor" in per_layer else []
        out[f"{metric}_mean"] = float(vals.mean()) if len(vals) else math.nan
        out[f"{metric}_floor"] = float(max(floors)) if len(floors) else math.nan
    return out | warnings_of(per_layer, baseline, knobs)


def _at(frame: pd.DataFrame, metric: str, layer: int = -1):
    if metric not in frame or layer not in frame.index:
        return None
    value = frame.at[layer, metric]
    return None if value != value else float(value)


def warnings_of(per_layer: pd.DataFrame, baseline: pd.DataFrame, knobs=None) -> dict:
    """What the run measured wrong, in one line each (absent when nothing is).

    Args:
        per_layer: the intervened run's prefill records, layer × metric (head −1).
        baseline: the measuring baseline run's, the same way.
        knobs: the run's :class:`~mclcbf_diag.interventions.mclcbf.config.BarrierConfig`; the span is checked
            only when it is ``fixed``.

    Returns:
        ``span_warning``: the configured span against the detected image tokens and the decision token
        (:func:`mclcbf_diag.models.tokens.span_problem`; the seed's known 4-token offset is not a problem).
        ``lookahead_miss_layers`` (with ``lookahead_miss_max`` and its floor): the layers of the measuring run
        where the look-ahead h and the image mass the layer computed differ by more than the noise floor.
    """
    out: dict = {}
    if _at(per_layer, "span_flagged") and knobs is not None and getattr(knobs, "span", None) == "fixed":
        first, last, decision = (_at(per_layer, f"span_{k}") for k in ("image_first", "image_last", "decision"))
        if None not in (first, last, decision):
            line = span_problem(knobs.fixed_span, range(int(first), int(last) + 1), int(decision))
            if line:
                out["span_warning"] = line
    missed = lookahead_misses(baseline)
    if missed:
        out["lookahead_miss_layers"], out["lookahead_miss_max"], out["lookahead_miss_floor"] = missed
    return out


def lookahead_misses(baseline: pd.DataFrame) -> tuple[list[int], float, float] | None:
    """The layers where the look-ahead h and the image mass the layer computed differ by more than the noise floor,
    with the largest such difference and its floor; None where none does (or nothing was recorded).

    Args:
        baseline: the measuring baseline run's records of one step (prefill or one decode step), layer × metric.
    """
    if "lookahead_miss" not in baseline or "lookahead_miss_floor" not in baseline:
        return None
    floor = baseline.lookahead_miss_floor.to_dict()
    missed = misses_beyond_floor(baseline.lookahead_miss.to_dict(), floor)
    if not missed:
        return None
    worst = max(missed, key=lambda ly: abs(missed[ly]))
    return [int(i) for i in missed], float(missed[worst]), float(floor[worst])


def misses_beyond_floor(miss: dict[int, float], floor: dict[int, float]) -> dict[int, float]:
    """The layers (≥ 0) where the look-ahead h and the image mass the layer computed differ by more than the noise
    floor: layer → the miss (h − mass), in ``miss``' order.

    A layer whose floor is missing or not finite (NaN), or whose miss is NaN, cannot be judged: how large a miss the
    noise allows is not known there, so it is never counted as a miss (:func:`unjudged_layers` names such layers).
    The rule ``lookahead_miss`` and the run's summary (:func:`lookahead_misses`) both ask this.

    Args:
        miss: layer → ``lookahead_miss``.
        floor: layer → ``lookahead_miss_floor``.
    """
    unjudged = set(unjudged_layers(miss, floor))
    return {ly: m for ly, m in miss.items() if ly >= 0 and ly not in unjudged and abs(m) > floor[ly]}


def unjudged_layers(miss: dict[int, float], floor: dict[int, float]) -> list[int]:
    """The layers (≥ 0) of ``miss`` whose look-ahead miss cannot be judged (:func:`misses_beyond_floor`): a NaN miss,
    or a floor missing or not finite."""
    return [ly for ly, m in miss.items()
            if ly >= 0 and (math.isnan(m) or floor.get(ly) is None or not math.isfinite(floor[ly]))]


def decode_warnings(baselines: dict[int, pd.DataFrame]) -> dict:
    """The look-ahead check at the generated tokens: every decode step's look-ahead h against the image mass the
    layer computed at that step (the decode steps' records are as exact as the prompt's).

    Args:
        baselines: the measuring baseline run's records at each decode step, ``{decode_step: layer × metric}``.

    Returns:
        ``lookahead_miss_decode_steps`` (the decode steps that missed), ``lookahead_miss_decode_layers`` (the
        layers that missed at any of them), ``lookahead_miss_decode_max`` (the largest miss) and its floor; empty
        when no step missed.
    """
    missed = {step: m for step, frame in sorted(baselines.items()) if (m := lookahead_misses(frame))}
    if not missed:
        return {}
    worst = max(missed.values(), key=lambda m: abs(m[1]))
    return {"lookahead_miss_decode_steps": list(missed),
            "lookahead_miss_decode_layers": sorted({ly for m in missed.values() for ly in m[0]}),
            "lookahead_miss_decode_max": worst[1], "lookahead_miss_decode_floor": worst[2]}


def warning_lines(s: dict) -> list[str]:
    """The warnings of :func:`warnings_of` and :func:`decode_warnings` as sentences (no indent, no trailing full
    stop)."""
    lines = []
    if s.get("span_warning"):
        lines.append(s["span_warning"])
    if s.get("lookahead_miss_layers"):
        lines.append(f"the barrier's look-ahead h differs from the image mass the model computed by up to "
                     f"{s['lookahead_miss_max']:+.3g} (noise floor {s['lookahead_miss_floor']:.2g}) at layers "
                     f"{s['lookahead_miss_layers']}: h, its gradient and the step are not the model's there")
    if s.get("lookahead_miss_decode_steps"):
        lines.append(f"at the generated tokens (decode steps {s['lookahead_miss_decode_steps']}) the barrier's "
                     f"look-ahead h differs from the image mass the model computed by up to "
                     f"{s['lookahead_miss_decode_max']:+.3g} (noise floor {s['lookahead_miss_decode_floor']:.2g}) at "
                     f"layers {s['lookahead_miss_decode_layers']}: h, its gradient and the step are not the model's "
                     "there")
    return lines


def summary_lines(s: dict) -> list[str]:
    """The barrier h, the step's size and Δh, as ``trace`` and ``explain`` print them."""
    lines = [f"  h        baseline {s['h_before_mean']:.4f}   steered {s['h_after_mean']:.4f}"
             f"   (mean over steered layers {s['layers_steered']}; fired at {s['layers_fired']})"]
    rel = s["max_theta_rel"]
    lost = f" (a non-finite step or state at layers {s['layers_dropped']}: not applied)" if s.get(
        "layers_dropped") else ""
    lines.append(f"  largest ‖θ*‖/‖x‖ {rel:.3g}{lost}" if rel == rel else
                 "  largest ‖θ*‖/‖x‖ n/a (no residual step at this site)")
    dh = {k: (s.get(f"dh_{k}_mean"), s.get(f"dh_{k}_floor")) for k in ("predicted", "recomputed", "realised")}
    if any(v is not None and v == v for v, _ in dh.values()):
        lines.append("  Δh       " + "   ".join(f"{k} {shown(v, f, '.3g')}" for k, (v, f) in dh.items())
                     + "   (mean over fired layers)")
    return lines + [f"  warning: {line}" for line in warning_lines(s)]


def headline(s: dict, records) -> list[str]:
    """The barrier against τ and the step's size, as sentences of the page's outcome section."""
    lines = []
    h0, h1 = s.get("h_before_mean", math.nan), s.get("h_after_mean", math.nan)
    tau = _tau(records)
    if isinstance(h0, float) and math.isfinite(h0):
        lines.append(f"Barrier h (image attention mass, mean over the steered layers "
                     f"{layer_list(s['layers_steered'])}): {fmt_value(h0)} → {fmt_value(h1)}"
                     + (f", target τ = {fmt_value(tau)}" if tau is not None else "")
                     + f"; fired at layers: {layer_list(s['layers_fired'])}.")
    rel = s.get("max_theta_rel", math.nan)
    if isinstance(rel, float) and math.isfinite(rel):
        lines.append(f"Largest step ‖θ*‖/‖x‖: {fmt_value(rel)}" + (" (no step was taken)." if rel == 0 else "."))
    return lines + [f"Warning: {line[0].upper()}{line[1:]}." for line in warning_lines(s)]


def _tau(records) -> float | None:
    if records is None:
        return None
    r = records[(records.metric == "barrier_tau") & (records.condition == "steered") & (records.phase == "prefill")]
    return float(r.value.median()) if len(r) else None


# ------------------------------------------------------------------------------------------- figures
def figures(records: pd.DataFrame, *, phase: str, decode_step: int, question_id, steered) -> dict:
    """The step's size per layer and the barrier against τ (those the records support).

    Args:
        records: a tidy records frame.
        phase: ``"prefill"`` or ``"decode"``.
        decode_step: the decode step (0: the prefill decision token).
        question_id: the question drawn; None: the only one in ``records``.
        steered: the layers shaded as steered (None: those the records show).

    Returns:
        ``{"step_size": …, "barrier": …}``, without a figure whose metrics the records lack.
    """
    out = {}
    for slug, build, extra in (("step_size", step_size_figure, {"steered": steered}), ("barrier", barrier_figure, {})):
        try:
            out[slug] = build(records, phase=phase, decode_step=decode_step, question_id=question_id, **extra)
        except MissingDataError:
            continue
    return out


def step_size_figure(records: pd.DataFrame, phase: str = "prefill", decode_step: int = 0, question_id=None,
                     steered: tuple[int, ...] | None = None) -> go.Figure | NoFigure:
    """‖θ*‖/‖x‖ per steered layer (log); a :class:`NoFigure` with the reason when no step was taken.

    Args:
        records: a tidy records frame.
        phase: ``"prefill"`` or ``"decode"``.
        decode_step: the decode step (0: the prefill decision token).
        question_id: the question drawn; None: the only one in ``records``.
        steered: the layers shaded as steered (None: those the records show).

    Returns:
        The figure, or a :class:`NoFigure` saying why no step was taken.
    """
    df = select(records, phase, decode_step, question_id)
    require(df, "theta_rel")
    title = "Size of the steering step relative to the residual, ‖θ*‖ / ‖x‖"
    fig = go.Figure()
    add_positive_markers(fig, df, "theta_rel", "‖θ*‖/‖x‖", dict(symbol="diamond", size=10, color="#9467bd"), ".3g")
    if not fig.data:
        return NoFigure(title, f"no step: ‖θ*‖ = 0 at every steered layer, because {nothing_fired_reason(df)}.")
    mark_steered(fig, steered_layers(df) if steered is None else steered)
    log_axis(fig, axis_values(fig))
    fig.update_layout(title=f"{title} ({phase} step {decode_step})", xaxis_title="layer",
                      yaxis_title="‖θ*‖ / ‖x‖ (log scale)")
    return fig


def barrier_figure(records: pd.DataFrame, condition: str = STEERED, phase: str = "prefill",
                   decode_step: int = 0, question_id=None) -> go.Figure:
    """Per steered layer: barrier h before the step, τ, and h after (recomputed and realised).

    Args:
        condition: the condition whose barrier is drawn.
    """
    df = select(records, phase, decode_step, question_id)
    sub = df[df["condition"] == condition]
    require(sub, "barrier_h")
    h = by_layer(sub, "barrier_h", condition)
    series = {"h before": (h, "circle")}
    if "barrier_tau" in set(sub["metric"]):
        series["τ"] = (by_layer(sub, "barrier_tau", condition), "line-ew-open")
    for metric, name, symbol in (("dh_recomputed", "h after (recomputed)", "triangle-up"),
                                 ("dh_realised", "h after (realised)", "x")):
        if metric in set(sub["metric"]):
            series[name] = ((h + by_layer(sub, metric, condition)).dropna(), symbol)
    fig = go.Figure()
    for name, (s, symbol) in series.items():
        fig.add_trace(go.Scatter(
            x=[f"L{layer}" for layer in s.index], y=s.values, mode="markers", name=name,
            marker=dict(symbol=symbol, size=12, line=dict(width=2)),
            hovertemplate=f"{name}<br>%{{x}}<br>%{{y:.4g}}<extra></extra>",
        ))
    if not fired_layers(df):
        fig.add_annotation(text=wrap_text(nothing_fired_reason(df).capitalize() + ": h after = h before.", 90),
                           showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5, font=dict(size=12),
                           bgcolor="rgba(255,255,255,0.85)")
    fig.update_layout(title=f"Barrier: h (the decision token's image attention mass) against the target τ, "
                            f"{condition} ({phase} step {decode_step})",
                      xaxis_title="steered layer", yaxis_title="h (share of attention on the image)",
                      scattermode="group")
    return fig


def nothing_fired_reason(df: pd.DataFrame) -> str:
    """Why the steered run equals the baseline, in words, from the barrier's records when there are any."""
    s = df[(df["condition"] == STEERED) & (df["head"] == -1)]
    h = s[(s["metric"] == "barrier_h") & (s["layer"] >= 0)]
    tau = s[(s["metric"] == "barrier_tau") & (s["layer"] >= 0)]
    layers = ", ".join(str(int(x)) for x in sorted(h["layer"]))
    if len(h) and len(tau):
        return (f"the intervention did not fire at any layer (h ≥ τ at every steered layer {layers}: h up to "
                f"{fmt_number(float(h['value'].max()))}, at least {fmt_number(float(h['value'].min()))}, τ = "
                f"{fmt_number(float(tau['value'].median()))})")
    if len(h):
        return f"the intervention did not fire at any of the steered layers {layers}"
    return "the intervention changed nothing at the decision token in any layer"


__all__ = ["barrier_figure", "figures", "headline", "nothing_fired_reason", "step_size_figure", "summary_fields",
           "summary_lines", "warning_lines", "warnings_of",
           "lookahead_misses", "decode_warnings"]

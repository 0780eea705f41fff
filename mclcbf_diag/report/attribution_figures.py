"""The figures and sections of the attribute pages that :mod:`mclcbf_diag.pages` does not draw.

* :func:`restore_section`: the second direction of the localisation (the baseline's activations restored in
  the intervened run, records ``restore_…``), layer × head and layer × token group heatmaps, and the
  :class:`~mclcbf_diag.experiments.attribute.LocalSummary` in words: where the change enters, arises and is cancelled.
* :func:`split_sections`: ``attribute --limit N``: per head (layer × head) and per MLP (layer), how many wrong
  Yes answers each carries, by direct logit attribution, by activation patching and by either, with AD-HH's
  hallucination heads marked; the table of counts and what each intervention edits.

Pure functions of the results (no model); every string shown is escaped by :mod:`mclcbf_diag.report`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from . import NoFigure, Section

GROUP_COLUMNS = {"image": "restore_resid_image", "question": "restore_resid_question",
                 "decision": "restore_resid_decision", "MLP": "restore_mlp"}


DIRECTION_WORDS = {"denoise": "put into the baseline", "noise": "lost on restoring it"}


def effect_names(effects, k: int = 3) -> str:
    """The first ``k`` sites of a list of :class:`~mclcbf_diag.experiments.attribute.LocalEffect` (objects or their
    dicts),
    each with its effect in logits from each direction that found it: ``head 5.1 (−0.45 put into the baseline,
    −0.447 lost on restoring it)``."""
    sites: dict[tuple, list] = {}
    for e in effects:
        e = e if isinstance(e, dict) else e.__dict__
        sites.setdefault((e["site"], e["layer"], e["head"]), []).append(e)
    out = []
    for (site, layer, head), found in list(sites.items())[:k]:
        group = site.removeprefix("resid_")
        tokens = "the decision token's" if group == "decision" else f"the {group} tokens'"
        where = f"head {layer}.{head}" if site == "head" else (
            f"layer {layer} MLP" if site == "mlp" else f"{tokens} residual entering layer {layer}")
        out.append(f"{where} (" + ", ".join(f"{e['effect']:+.3g} {DIRECTION_WORDS[e['direction']]}"
                                            for e in found) + ")")
    more = len(sites) - k
    return "; ".join(out) + (f"; and {more} more" if more > 0 else "") if out else "none above noise"


def restore_section(result) -> Section | None:
    """The restored direction of :func:`mclcbf_diag.experiments.attribute.localisation` (None without an
    intervention)."""
    from .plots import MissingDataError, layer_heatmaps

    found = getattr(result, "local_summary", None)
    if found is None:
        return None
    if not found.measurable:
        return Section("Where the intervention's change is made and undone", lines=[
            "The intervention leaves the margin within twice its noise floor: there is nothing to localise."])
    lines = [f"The intervention moves the margin by {found.gap:+.3g} (baseline {found.margin_baseline:+.4g}, "
             f"intervened {found.margin_intervened:+.4g}); an effect counts above {found.threshold:.3g} (twice "
             "the margin's noise floor).",
             "It enters: " + effect_names(found.enters, 6) + ".",
             "Heads and MLPs that make it: " + effect_names(found.arises) + ".",
             "Heads and MLPs that work against it (cancel part of it): " + effect_names(found.cancels) + "."]
    try:
        fig = layer_heatmaps(result.records, [
            ("heads", "steered", "restore_head"), ("residual and MLPs", "steered", GROUP_COLUMNS)],
            title="The baseline's activations restored in the intervened run", value="share of the change left",
            diverging=False)
    except MissingDataError as exc:
        fig = NoFigure("The baseline's activations restored in the intervened run", str(exc))
    return Section("Where the intervention's change is made and undone", text=(
        "The other direction of the localisation above: one baseline activation restored in the intervened run, "
        "which runs on with the intervention at every other site. The colour is the share of the intervention's "
        "change of the margin that is left: 0 where all of it goes through the site, 1 where the site is not "
        "needed, above 1 where the site worked against the change. Effects are in logits of the margin: the "
        "change a site's intervened value makes in the baseline (denoise), or what restoring it takes away "
        "(noise)."), lines=lines, figures=[fig])


# -------------------------------------------------------------------------------------------- a split
def count_heatmaps(counts: pd.DataFrame, adhh_heads=()) -> go.Figure:
    """Layer × head heatmaps of ``n_dla``, ``n_patch`` and ``n_either`` (AD-HH's heads marked ×), and a layer ×
    MLP column of each, on one colour scale (0 … the number of wrong Yes answers)."""
    heads, mlp = counts[counts.component == "head"], counts[counts.component == "mlp"]
    cols = [("n_dla", "by DLA"), ("n_patch", "by patching"), ("n_either", "by either")]
    top = max(1, int(counts["n_wrong_yes"].max()) if len(counts) else 1)
    fig = make_subplots(rows=1, cols=4, subplot_titles=[t for _, t in cols] + ["MLPs"], shared_yaxes=True,
                        horizontal_spacing=0.05, column_widths=[0.3, 0.3, 0.3, 0.1])
    for c, (col, title) in enumerate(cols, start=1):
        grid = heads.pivot(index="layer", columns="head", values=col)
        fig.add_trace(go.Heatmap(z=grid.to_numpy(dtype=float), x=[int(h) for h in grid.columns],
                                 y=[int(i) for i in grid.index], coloraxis="coloraxis", name=title,
                                 hovertemplate="layer %{y} head %{x}: %{z} wrong Yes<extra>" + title + "</extra>"),
                      row=1, col=c)
        if adhh_heads:
            fig.add_trace(go.Scatter(x=[h for _, h in adhh_heads], y=[a for a, _ in adhh_heads], mode="markers",
                                     marker=dict(symbol="x", size=12, color="white", line=dict(width=1, color="black")),
                                     name="AD-HH's heads", showlegend=c == 1), row=1, col=c)
    z = np.stack([mlp.sort_values("layer")[col].to_numpy(dtype=float) for col, _ in cols], axis=1)
    fig.add_trace(go.Heatmap(z=z, x=["DLA", "patch", "either"], y=sorted(int(i) for i in mlp.layer),
                             coloraxis="coloraxis", name="MLPs",
                             hovertemplate="layer %{y} MLP, %{x}: %{z} wrong Yes<extra></extra>"), row=1, col=4)
    fig.update_layout(title="Wrong Yes answers each head and MLP carries", height=420,
                      coloraxis=dict(colorscale="Viridis", cmin=0, cmax=top, colorbar=dict(title="answers")),
                      legend=dict(orientation="h", y=-0.15))
    fig.update_yaxes(title_text="layer", row=1, col=1, autorange="reversed")
    for c in range(1, 4):
        fig.update_xaxes(title_text="head", row=1, col=c)
    return fig


def acts_phrase(row) -> str:
    """What one row of :func:`mclcbf_diag.experiments.attribute.edited_sites` does to the carriers, in words."""
    if "attention" not in str(row.sites).split(", "):
        return "it edits no head's attention"
    if row.n_acts_on:
        return f"its attention edit acts on {row.acts_on} of the {row.carriers} carriers"
    return f"its attention edit acts on none of the {row.carriers} carriers"


def split_sections(result) -> list[Section]:
    """Every section of a split's ``attribute.html`` (:func:`mclcbf_diag.experiments.attribute.split_carriers`)."""
    s, counts = result.summary, result.counts
    lines = [f"{s['questions']} questions: {s['right']} right, {s['wrong_yes']} wrong Yes, {s['wrong_no']} wrong No, "
             f"{s['not_yes_no']} without Yes or No on top.",
             f"A head or MLP carries a wrong Yes when its direct contribution, or the recovery of its patch, is at "
             f"least {s['share']:g} of the margin and above the noise floor ({s['margin_floor']:.3g}).",
             "Carriers: " + (", ".join(s["carriers"]) or "none") + ".",
             "AD-HH (preset paper) finds " + (", ".join(s["adhh_heads"]) or "no head") + "; of these, carrying a "
             "wrong Yes here: " + (", ".join(s["adhh_heads_carrying"]) or "none") + "."]
    for row in result.interventions.itertuples():
        lines.append(f"{row.intervention} ({row.preset}) opens {row.sites or 'no site'} at {row.layers}: "
                     f"{acts_phrase(row)}" + (f"; its residual site lies before {row.downstream_of_its_residual_edit}"
                                              if row.n_downstream else "") + ".")
    sections = [Section("Outcome", lines=lines)]
    if s["wrong_yes"] == 0:
        sections.append(Section("Carriers", lines=["No wrong Yes among these questions: nothing to count."]))
        return sections
    found = counts[counts.n_either > 0].sort_values(["n_either", "layer"], ascending=[False, True])
    sections.append(Section("Carriers of the wrong Yes", text=(
        "Each cell counts the wrong Yes answers a head (left, layer × head) or an MLP (right) carries: by direct "
        "logit attribution, by activation patching (denoising, against the corruption) and by either. × marks "
        "the hallucination heads AD-HH finds on this model."), figures=[count_heatmaps(counts, result.adhh_heads)],
        table=found.drop(columns=["n_wrong_yes"]).reset_index(drop=True),
        table_note=f"of {s['wrong_yes']} wrong Yes answers; components that carry none are left out"))
    sections.append(Section("What each intervention edits", table=result.interventions))
    return sections


__all__ = ["DIRECTION_WORDS", "GROUP_COLUMNS", "acts_phrase", "count_heatmaps", "effect_names", "restore_section",
           "split_sections"]

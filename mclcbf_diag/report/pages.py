"""The trace and explain pages: what a researcher reads first, then the evidence, then the details.

Both pages open with the verdict-relevant numbers in short sentences (the outcome, the
answer and margin before and after, the barrier against τ, where it fired, the step's size)
and the image with the decision token's attention over it (:mod:`mclcbf_diag.report.overlay`),
baseline, intervened and difference. The explain page leads with the verdict
(:func:`mclcbf_diag.diagnosis.diagnose.verdict_text`, one list item per cause, with its test) and the
ranked causes, then the experiments; the trace page with the per-layer plots of the
prefill forward (decode step 0). With generated tokens (``--max-new-tokens``) one figure and
one table sum up every decode step (image mass, margin, layers fired), each decode step's
heading names the token it read and the token it generated, and its plots fold away below.

Tables are renamed here for reading (units in the headers) and shown rounded by
:func:`mclcbf_diag.report.html.display_table`; the files next to the page keep full precision.
Every function builds :class:`~mclcbf_diag.report.html.Section` objects; nothing here runs the
model except :func:`overlay_section` for chosen tokens (two prefill runs, see
:func:`mclcbf_diag.report.overlay.token_attention_maps`), and nothing writes files.
"""

from __future__ import annotations

import math

import pandas as pd

from .html import NoFigure, Section, fmt_value, layer_list
from .plots import (
    decode_summary_figure,
    dose_response_figure,
    fired_layers,
    trace_figures,
)


# ----------------------------------------------------------------------------- the first screen
def headline(summary: dict, records: pd.DataFrame | None = None, intervention=None) -> list[str]:
    """The verdict-relevant numbers of a trace, one short sentence each (3 significant digits).

    Args:
        summary: the trace's summary (:meth:`~mclcbf_diag.experiments.trace.TraceResult.summary`).
        records: the trace's records, passed to the intervention's own headline.
        intervention: the intervention whose ``headline(summary, records)`` lines are added; None: none.

    Returns:
        The sentences: the outcome, the margin and Yes/No mass, the intervention's own, the generated text.
    """
    s = summary
    label = s.get("label")
    right = "" if label not in ("yes", "no") else (" (right)" if s["answer_before"] == label else " (wrong)")
    out = s["outcome"]
    what = {"unchanged": f"the answer stays {s['answer_after']}", "fixed": "wrong → right",
            "broken": "right → wrong", "derailed": "the output is no longer a Yes/No answer",
            "changed": "the answer changed",
            "non_finite": f"the intervention's edit was non-finite and not applied at layers {s.get('layers_dropped')}"
            }.get(out, out)
    lines = [f"Outcome: {out} ({what}). Label: {label or 'none'}; baseline answer {s['answer_before']}{right}, "
             f"intervened {s['answer_after']}."]
    lines.append(f"Margin logit(Yes) − logit(No): {fmt_value(s['margin_before'], True)} → "
                 f"{fmt_value(s['margin_after'], True)}; P(Yes) + P(No): "
                 f"{fmt_value(s['p_yes_before'] + s['p_no_before'])} → {fmt_value(s['p_yes_after'] + s['p_no_after'])};"
                 f" top token {s['top_before']!r} → {s['top_after']!r}.")
    lines += intervention.headline(s, records) if intervention is not None else []
    if s.get("text_before") is not None:
        lines.append(f"Generated text: {s['text_before']!r} → {s['text_after']!r} (POPE's parser: "
                     f"{s.get('text_answer_before')} → {s.get('text_answer_after')}).")
    return lines


def summary_frame(summary: dict, intervention=None) -> pd.DataFrame:
    """The summary as a readable table: one row per quantity, baseline and intervened side by side (and the
    intervention's own rows, :meth:`~mclcbf_diag.interventions.base.Intervention.summary_rows`)."""
    s = summary
    own_pairs, own_single = intervention.summary_rows() if intervention is not None else ([], [])
    pairs = [("answer (sign of the margin)", "answer"), ("margin logit(Yes) − logit(No)", "margin"),
             ("P(Yes)", "p_yes"), ("P(No)", "p_no"), ("top token", "top"), ("valid Yes/No answer", "valid"),
             *own_pairs, ("generated text", "text"), ("POPE parser on the text", "text_answer")]
    rows = []
    for name, key in pairs:
        b = s.get(key.format("before") if "{}" in key else f"{key}_before")
        a = s.get(key.format("after") if "{}" in key else f"{key}_after")
        if b is None and a is None:
            continue
        rows.append({"quantity": name, "baseline": b, "intervened": a})
    single = [("outcome", "outcome"), ("label", "label"), ("question", "question"), ("question_id", "question_id"),
              ("index in the split (--sample)", "index"), *own_single, ("non-finite values", "nonfinite_values")]
    rows += [{"quantity": name, "baseline": s[key], "intervened": ""} for name, key in single if key in s]
    return pd.DataFrame(rows, columns=["quantity", "baseline", "intervened"])


def overlay_section(lm, result, image, template, tokens=()) -> Section:
    """The image as the model saw it with the attention of the decision token (and any ``tokens``) over it.

    Args:
        lm: the loaded model (its processor rebuilds the inputs the run saw).
        result: the trace (:class:`~mclcbf_diag.experiments.trace.TraceResult`) whose baseline and intervened
            captures are drawn.
        image: the question's image.
        template: the prompt template the trace ran with.
        tokens: token choices (:func:`mclcbf_diag.report.overlay.parse_token`: an index or a text); each gets
            its own figure, from two extra prefill runs.

    Returns:
        The section, one figure per token (the decision token's first).

    Raises:
        UserError: the prompt has no image tokens, or a token choice is not in the prompt after the image.
    """
    from ..experiments.trace import sample_inputs
    from .overlay import attention_maps, resolve_token, seen_image, token_attention_maps
    from .plots import image_attention_figure

    _, inputs = sample_inputs(lm, result.question.text if result.question else result.prompt, image, template)
    ip = lm.processor.image_processor
    picture = seen_image(lm.image_scheme.picture(inputs, ip), ip.image_mean, ip.image_std)
    layers = tuple(result.intervention.layers(lm.n_layers))
    grid, shape = lm.grid_mask(result.baseline.detected), lm.image_grid(inputs)  # LLaVA-NeXT: its base grid
    base = attention_maps(result.baseline, grid, steered=layers, shape=shape)
    new = attention_maps(result.steered, grid, steered=layers, shape=shape)
    ids = inputs["input_ids"][0]
    text = [lm.processor.tokenizer.decode([int(i)]) for i in ids]
    figures = [image_attention_figure(picture, base, new, title=f"Attention of the decision token "
                                      f"({text[-1].strip()!r}, position {len(ids) - 1}) over the image")]
    tiles = lm.image_scheme.tile_grid(lm.model.config, inputs, result.baseline.detected)
    if tiles is not None:  # LLaVA-NeXT, OneVision: the high-resolution tiles too, newline tokens left out
        figures.append(tiles_figure(tiles, result, ip, layers, f"Attention of the decision token "
                                                               f"({text[-1].strip()!r}, position {len(ids) - 1})"))
    positions = [resolve_token(t, text, result.baseline.detected) for t in tokens]
    positions = list(dict.fromkeys(p for p in positions if p != len(ids) - 1))  # the decision token is drawn
    if positions:
        maps = token_attention_maps(lm, inputs, result.intervention, positions, steered=layers, shape=shape)
        for p in positions:
            figures.append(image_attention_figure(
                picture, maps[p]["baseline"], maps[p]["intervened"],
                title=f"Attention of the token {text[p].strip()!r} (position {p}) over the image"))
    words = ("The heatmaps show, on each image patch, the share of the query token's attention (averaged over "
             "heads), drawn over the image as the model saw it (after the processor's resize and crop): baseline, "
             f"intervened and their difference. The slider picks a layer, the intervention's layers "
             f"({layer_list(layers)}) together, or all layers."
             + (" An image in tiles (LLaVA-NeXT, OneVision) is drawn twice: its base grid (the whole picture at the "
                "tower's size), then its high-resolution tiles as the processor laid them out." if tiles is not None
                else ""))
    return Section("Where the decision token looks", text=words, figures=figures)


def tiles_figure(tiles, result, image_processor, layers, title: str):
    """The decision token's attention over an image's high-resolution tiles (a
    :class:`~mclcbf_diag.models.schemes.TileGrid`), baseline and intervened, over the unpadded tiles' pixels.

    Args:
        tiles: the grid (each cell's prompt position, the pixels under it).
        result: the trace whose captures are drawn.
        image_processor: the processor's image part (its mean and std undo the normalisation).
        layers: the intervention's layers (their mean is a label).
        title: the figure's title, up to "over the …".
    """
    from .overlay import cell_maps, seen_image
    from .plots import image_attention_figure

    rows, cols = tiles.cells.shape
    ip = image_processor
    return image_attention_figure(
        seen_image(tiles.pixels, ip.image_mean, ip.image_std), cell_maps(result.baseline, tiles.cells, steered=layers),
        cell_maps(result.steered, tiles.cells, steered=layers),
        title=f"{title} over the high-resolution tiles ({rows} × {cols} tokens, padding removed, newlines left out)")


# ----------------------------------------------------------------------------- steps
def step_tokens(lm, result) -> dict[int, dict]:
    """Per decode step: the token it reads (query) and the token it generates, baseline and intervened."""
    dec = lm.processor.tokenizer.decode
    out = {}
    for name, cap in (("baseline", result.baseline), ("intervened", result.steered)):
        if cap.generated is None:
            continue
        gen = [int(t) for t in cap.generated[0, cap.prompt_len:]]
        prompt_last = int(cap.generated[0, cap.prompt_len - 1])
        for s, tok in enumerate(gen):
            entry = out.setdefault(s, {})
            entry[f"reads_{name}"] = dec([prompt_last if s == 0 else gen[s - 1]])
            entry[f"generates_{name}"] = dec([tok])
    return out


def _step_label(t: dict) -> str:
    read, gen = t.get("reads_baseline", "?"), t.get("generates_baseline", "?")
    label = f"reads {read.strip()!r}, generates {gen.strip()!r}"
    if (t.get("reads_intervened"), t.get("generates_intervened")) != (t.get("reads_baseline"), gen) and \
            "generates_intervened" in t:
        label += (f" (intervened: reads {t['reads_intervened'].strip()!r}, generates "
                  f"{t['generates_intervened'].strip()!r})")
    return label


def decode_summary(records: pd.DataFrame, tokens: dict, steered) -> tuple[object, pd.DataFrame]:
    """The across-steps figure and table: image mass, margin and layers fired per decode step.

    Args:
        records: the trace's records, every phase and decode step.
        tokens: decode step → ``{"reads_baseline", "generates_baseline", "generates_intervened"}``: the token the
            step reads and the tokens each run generates there (text).
        steered: the steered layers the image mass is averaged over; empty: every layer.

    Returns:
        ``(figure, table)``: the across-steps figure and one row per step (reads, generates, image mass and
        margin per run, layers fired).
    """
    steps = sorted({(str(p), int(s)) for p, s in records[["phase", "decode_step"]].itertuples(index=False)},
                   key=lambda t: t[1])
    short = {s: f"{t.get('reads_baseline', '?').strip()!r} → {t.get('generates_baseline', '?').strip()!r}"
             for s, t in tokens.items()}
    fig = decode_summary_figure(records, short, steered=steered)
    rows = []
    for phase, s in steps:
        sub = records[(records.phase == phase) & (records.decode_step == s)]
        row = {"decode step": s, "phase": phase, "reads": tokens.get(s, {}).get("reads_baseline", ""),
               "generates (baseline)": tokens.get(s, {}).get("generates_baseline", ""),
               "generates (intervened)": tokens.get(s, {}).get("generates_intervened", "")}
        for cond, name in (("baseline", "baseline"), ("steered", "intervened")):
            c = sub[sub.condition == cond]
            m = c[(c.metric == "attn_image_mass") & (c["head"] == -1) & (c.layer >= 0)]
            if steered:
                m = m[m.layer.isin(list(steered))]
            row[f"image mass, {name} (share)"] = float(m.value.mean()) if len(m) else math.nan
            fm = c[(c.metric == "final_margin") & (c.layer == -1)]
            row[f"margin, {name} (logit Yes − No)"] = float(fm.value.iloc[0]) if len(fm) else math.nan
        row["layers fired"] = layer_list(fired_layers(sub))
        rows.append(row)
    return fig, pd.DataFrame(rows)


def step_sections(lm, result, records: pd.DataFrame | None = None, heading: str = "Per-layer plots") -> list[Section]:
    """The per-layer plots of each decode step: prefill open, decode steps folded, with a summary across steps.

    Args:
        lm: the loaded model (to decode each step's tokens).
        result: the trace (:class:`~mclcbf_diag.experiments.trace.TraceResult`).
        records: the records plotted; None: the trace's.
        heading: the start of each step's section title.

    Returns:
        The across-steps section (only with decode steps), then one section per step.
    """
    records = result.records if records is None else records
    steered = tuple(result.intervention.layers(lm.n_layers))
    steps = sorted({(str(p), int(s)) for p, s in records[["phase", "decode_step"]].itertuples(index=False)},
                   key=lambda t: t[1])
    tokens = step_tokens(lm, result) if len(steps) > 1 else {}
    sections = []
    if len(steps) > 1:
        fig, table = decode_summary(records, tokens, steered)
        sections.append(Section("Across generation steps", text=(
            "One row per step: the token the step reads (its query), the token it generates, the query's image "
            "attention mass (mean over heads and the steered layers), the final margin, and the steered layers "
            "that fired. The per-layer plots of each step follow (the decode steps folded)."),
            figures=[fig], table=table))
    for phase, s in steps:
        figs = trace_figures(records, phase=phase, decode_step=s, steered=steered, intervention=result.intervention)
        name = "prefill (the prompt's decision token)" if phase == "prefill" else f"decode step {s}"
        if s in tokens:
            name += ": " + _step_label(tokens[s])
        sections.append(Section(f"{heading}, {name}", figures=list(figs.values()), collapsed=phase != "prefill"))
    return sections


# ----------------------------------------------------------------------------- pages
def trace_sections(lm, result, image, template, overlay_tokens=()) -> list[Section]:
    """Every section of ``trace.html``: numbers first, the overlay, the summary, the plots per step.

    Args:
        lm: the loaded model.
        result: the trace (:class:`~mclcbf_diag.experiments.trace.TraceResult`).
        image: the question's image (for the overlay).
        template: the prompt template the trace ran with.
        overlay_tokens: further token choices to draw over the image (:func:`overlay_section`).

    Returns:
        The page's sections, in order.
    """
    summary = result.summary() | _text(lm, result)
    return [Section("Outcome", lines=headline(summary, result.records, result.intervention)),
            overlay_section(lm, result, image, template, overlay_tokens),
            Section("Summary", table=summary_frame(summary, result.intervention)),
            *step_sections(lm, result)]


def _text(lm, result) -> dict:
    from ..data import parse_answer
    from ..experiments.trace import decoded

    before, after = decoded(lm, result.baseline), decoded(lm, result.steered)
    if before is None:
        return {}
    return {"text_before": before, "text_after": after, "text_answer_before": parse_answer(before),
            "text_answer_after": parse_answer(after)}


def verdict_items(text: str) -> list[str]:
    """The verdict's lines as list items: a cause and its indented detail line become one item."""
    items: list[str] = []
    for line in text.splitlines():
        if line.startswith("  ") and items:
            items[-1] += " — " + line.strip()
        elif line.strip():
            items.append(line.strip())
    return items


CAUSE_COLUMNS = {"rank": "rank", "id": "cause", "status": "status", "strength": "strength (0–1)",
                 "sentence": "what was measured", "test": "test: undo it alone",
                 "counterfactual": "the counterfactual run", "evidence": "evidence"}


def causes_table(frame: pd.DataFrame) -> pd.DataFrame:
    """The detected causes, readable: no index, evidence as "key = value" (see report.display_table)."""
    found = frame[frame.detected.astype(bool)]
    if "counterfactual" not in found:  # a frame written before runs were recorded
        found = found.assign(counterfactual="")
    return found[list(CAUSE_COLUMNS)].rename(columns=CAUSE_COLUMNS)


def fixes_sentence(fixes: pd.DataFrame, kind: str) -> str:
    """What the counterfactual fixes did, without reading "all" (all fixes together) as "every fix"."""
    if not len(fixes):
        return "No counterfactual fixes were run."
    name = {"all": "all fixes together"}
    ran = fixes[~fixes.applicable.astype(str).str.startswith("not applicable")]
    na = fixes[fixes.applicable.astype(str).str.startswith("not applicable")]
    tail = f" Not applicable (not run): {', '.join(na.fix)}." if len(na) else ""
    if kind == "right":
        hurt = ran[ran.outcome.isin(["broken", "derailed"])]
        return ("The answer is right, so no fix applies; " + (
            "these would break or derail it: " + ", ".join(f"{name.get(r.fix, r.fix)} ({r.outcome})"
                                                            for r in hurt.itertuples()) + "."
            if len(hurt) else f"none of the {len(ran)} that ran breaks or derails it.") + tail)
    good = ran[ran["counts"].astype(bool)]
    if len(good):
        return (f"{len(good)} of the {len(ran)} fixes that ran fix the answer (wrong → right, a valid Yes/No output): "
                + ", ".join(name.get(f, f) for f in good.fix) + "." + tail)
    return (f"None of the {len(ran)} fixes that ran fixes the answer (each fix alone, and all fixes together)."
            f"{tail}")


FIX_COLUMNS = {"fix": "fix", "change": "knob change", "applicable": "applicable", "margin": "margin (logit Yes − No)",
               "answer": "answer", "valid": "valid Yes/No", "outcome": "outcome vs baseline",
               "vs_unfixed": "vs the unfixed intervention", "counts": "fixes the answer"}
SWEEP_COLUMNS = {"tokens": "edited tokens", "window": "layers", "edit": "edit", "value": "image mass target or factor",
                 "margin": "margin (logit Yes − No)", "answer": "answer", "valid": "valid Yes/No", "p_yes": "P(Yes)",
                 "p_no": "P(No)", "base_margin": "baseline margin", "base_answer": "baseline answer",
                 "outcome": "outcome"}
DOSE_COLUMNS = {"k": "k (× the step)", "margin": "margin (logit Yes − No)", "answer_yes": "answer yes",
                "valid": "valid Yes/No", "p_yes": "P(Yes)", "p_no": "P(No)", "outcome": "outcome",
                "h_mean": "h, mean (share)", "theta_rel_max": "largest ‖kθ*‖/‖x‖", "yes_no_top": "top token Yes/No"}
CHAIN_COLUMNS = {"link": "link", "config": "configuration", "top_cause": "top cause", "status": "status",
                 "margin": "margin (logit Yes − No)", "outcome": "outcome", "next_fix": "next fix"}
KNOCKOUT_COLUMNS = {"condition": "run", "answer_yes": "answer yes", "final_margin": "margin (logit Yes − No)",
                    "p_yes": "P(Yes)", "p_no": "P(No)", "top_is_yes_no": "top token Yes/No"}


def _renamed(frame: pd.DataFrame, columns: dict) -> pd.DataFrame:
    keep = [c for c in frame.columns if c in columns] + [c for c in frame.columns if c not in columns]
    return frame[keep].rename(columns=columns)


def knockout_table(records: pd.DataFrame) -> pd.DataFrame:
    r = records[(records.layer == -1) & (records.metric.isin(list(KNOCKOUT_COLUMNS)))
                & (records.phase == "prefill")]
    wide = r.pivot_table(index="condition", columns="metric", values="value").reset_index()
    for col in ("answer_yes", "top_is_yes_no"):
        if col in wide:
            wide[col] = wide[col] > 0.5
    return _renamed(wide, KNOCKOUT_COLUMNS)


def explain_sections(ex, verdict_text: str, causes: pd.DataFrame, overlay: Section) -> list[Section]:
    """Every section of the explain page: the verdict, the causes, the overlay, then each experiment.

    Args:
        ex: the explanation (:class:`~mclcbf_diag.experiments.explain.Explanation`).
        verdict_text: the verdict, one item per line (:func:`verdict_items`).
        causes: every rule's finding, in rank order (:func:`~mclcbf_diag.diagnosis.diagnose.causes_frame`).
        overlay: the attention-overlay section (:func:`overlay_section`).

    Returns:
        The page's sections, in order.
    """
    summary = ex.trace.summary()
    dose_fig = dose_response_figure(ex.dose.curve)
    sections = [
        Section("Verdict", lines=verdict_items(verdict_text)),
        Section("Outcome", lines=headline(summary, ex.trace.records, ex.trace.intervention)),
        Section("Causes found, in rank order", table=causes_table(causes),
                table_note="Every rule that looked and found nothing is in the folded table below."),
        overlay,
        Section("Summary", table=summary_frame(summary, ex.trace.intervention)),
    ]
    if ex.sweep is not None:
        sections.append(Section("Graded image-mass sweep", text=ex.sweep_text, table=_renamed(ex.sweep, SWEEP_COLUMNS)))
    sections.append(Section("Dose-response", text=ex.dose.sentence(), figures=[dose_fig],
                            table=_renamed(ex.dose.curve, DOSE_COLUMNS)))
    if ex.layer_doses is not None:
        sections.append(Section("Dose-response per layer", text="Each steered layer alone: the smallest multiplier on "
                                "its step that reaches the goal the label sets (empty: none up to --k-max).",
                                table=ex.layer_doses))
    fixes = ex.fixes.assign(fix=ex.fixes.fix.replace({"all": "all fixes together"})) if len(ex.fixes) else ex.fixes
    sections += [
        Section("Counterfactual fixes", text=fixes_sentence(ex.fixes, ex.dose.kind) + "\n\nEach fix alone and all "
                "fixes together, compared with the baseline (outcome) and with the intervention as configured "
                "(vs the unfixed intervention); only a wrong answer turned right with a valid Yes/No output counts.",
                table=_renamed(fixes, FIX_COLUMNS)),
        Section("Cause chain", text="For a wrong answer: apply the fix of the top cause, diagnose again, repeat.",
                table=_renamed(ex.chain, CHAIN_COLUMNS)),
        Section("Attention knockouts (prefill)", text="The decision token's (or every after-image token's) image "
                "attention removed (×0) or doubled (×2) in every layer: two edits, no negative claim.",
                table=knockout_table(ex.records)),
        Section("Every rule, including those that found nothing", table=_renamed(causes, CAUSE_COLUMNS),
                collapsed=True),
    ]
    return sections


def _listed(v) -> str:
    return ", ".join(map(str, v)) if isinstance(v, (list, tuple)) else ("" if v is None else str(v))


def question_sections(row: dict, records: pd.DataFrame, command: str, intervention=None) -> list[Section]:
    """The explain page of one question of a whole-split run, from its verdict row and its records alone (no
    forward): the verdict, each run's answer, the prefill trace plots and the row. The attention overlay, the
    dose-response curve and the cause chain need the model: ``command`` (the single explain) gives them.

    Args:
        row: the question's row of the run (questions.csv).
        records: the question's records (every condition of its verdict).
        command: the explain command of the question alone.
        intervention: the run's intervention, for its own trace plots; None: the common plots only.

    Returns:
        The page's sections, in order.
    """
    k = row.get("dose_k_star")
    lines = [
        f"{row.get('split', '')} question_id {row.get('question_id')}: {row.get('text', '')} "
        f"(label: {row.get('label')}; a {row.get('kind', '')} answer)",
        f"outcome {str(row.get('outcome', '')).upper()}: baseline {row.get('baseline_answer')} "
        f"(margin {fmt_value(row.get('baseline_margin'), True)}), intervened {row.get('steered_answer')} "
        f"(margin {fmt_value(row.get('steered_margin'), True)})",
        "top decisive cause: " + (f"{row['top_cause']} ({row.get('top_cause_title', '')})" if row.get("top_cause")
                                  else "none (no single cause's counterfactual changed the result)"),
        f"causes detected: {_listed(row.get('detected_causes')) or 'none'}; decisive: "
        f"{_listed(row.get('decisive_causes')) or 'none'}",
        f"dose-response: smallest multiplier reaching '{row.get('dose_goal', '')}': "
        + (f"k* = {fmt_value(k)}" if k is not None and k == k
           else f"none up to k = {fmt_value(row.get('dose_k_max'))}"),
        f"counterfactual fixes that fix it: {_listed(row.get('fixes_fixed')) or 'none'}; break it: "
        f"{_listed(row.get('fixes_broken')) or 'none'}; derail it: {_listed(row.get('fixes_derailed')) or 'none'}",
    ]
    trace = records[records.condition.isin(["baseline", "steered"])]
    figures = list(trace_figures(trace, phase="prefill", decode_step=0, intervention=intervention).values()) if len(
        trace) else [
        NoFigure("Trace plots", "the run's records hold no trace of this question")]
    row_table = pd.DataFrame({"field": list(row), "value": [_listed(v) for v in row.values()]})
    return [
        Section("Verdict", lines=lines, text="From the whole-split run's records (no second forward). The attention "
                "over the image, the dose-response curve and the cause chain come from the single explain: "
                + command),
        Section("Each run's answer (prefill)", table=knockout_table(records)),
        Section("Trace plots, prefill (the prompt's decision token)", figures=figures),
        Section("The question's row (questions.csv)", table=row_table, collapsed=True),
    ]


def trace_plot_sections(lm, ex) -> list[Section]:
    """The explain page's per-layer plots (the prefill step of its trace)."""
    return step_sections(lm, ex.trace, heading="Trace plots")


__all__ = ["headline", "summary_frame", "overlay_section", "tiles_figure", "step_sections", "trace_sections",
           "explain_sections", "verdict_items", "causes_table", "fixes_sentence", "knockout_table",
           "trace_plot_sections", "question_sections",
           "NoFigure"]


# ----------------------------------------------------------------------------- attribute
def attribute_sections(result) -> list[Section]:
    """Every section of ``attribute.html`` (:func:`mclcbf_diag.experiments.attribute.attribute_sample`): the
    numbers, then the direct logit attribution, activation patching and attribution patching heatmaps."""
    sections = [Section("Outcome", lines=_attribute_lines(result.summary, result.steered is not None)),
                _dla_section(result.records, result.steered is not None), *_patching_sections(result)]
    if result.local is not None:
        sections.append(_local_section(result))
    return sections


_GROUPS = {"image": "{m}_resid_image", "question": "{m}_resid_question", "decision": "{m}_resid_decision",
           "MLP": "{m}_mlp"}  # the residual's token groups and the MLPs, as one heatmap's columns


def _attribute_lines(s: dict, steered: bool) -> list[str]:
    lines = [f"Question {s['question_id']}: {s['question']} (label: {s['label'] or 'none'})",
             f"Corruption: {s['corruption']}",
             f"Margin logit(Yes) − logit(No): clean {fmt_value(s['margin_clean'], True)}, corrupted "
             f"{fmt_value(s['margin_corrupted'], True)}"
             + (f", intervened {fmt_value(s['margin_steered'], True)}" if steered else ""),
             f"The direct contributions sum to the margin up to {abs(s['dla_sum_error']):.2g}.",
             "Heads with the largest direct contribution: " + ", ".join(s["top_heads_dla"])
             + "; read from image keys: " + ", ".join(s["top_heads_dla_image"])]
    if steered:
        lines.append("Heads the intervention moved most (direct contribution): " + ", ".join(s["top_heads_d_dla"]))
    if abs(s["margin_clean"] - s["margin_corrupted"]) <= s["margin_floor"]:
        lines.append("The clean and corrupted margins are equal up to rounding: there is nothing to recover, so "
                     "every patching recovery is undefined (NaN). Choose another corruption.")
    else:
        lines.append("Heads whose patch recovers most of the margin (denoising): " + ", ".join(
            s["top_heads_patch_denoise"]) + "; attribution patching: " + ", ".join(s["top_heads_atp_denoise"])
            + f" (Spearman ρ {fmt_value(s['spearman_heads_denoise'])} over the heads)")
    return lines


def _heatmaps(records: pd.DataFrame, *specs) -> list:
    """One layer heatmap per ``(panels, keywords)``; a figure the records cannot draw says why."""
    from .plots import MissingDataError, layer_heatmaps

    out = []
    for panels, kw in specs:
        try:
            out.append(layer_heatmaps(records, panels, **kw))
        except MissingDataError as exc:
            out.append(NoFigure(kw["title"], str(exc)))
    return out


def _dla_section(rec: pd.DataFrame, steered: bool) -> Section:
    conds = [("baseline", "baseline", "dla_head")] + ([("intervened", "steered", "dla_head")] if steered else [])
    parts = {"attention": "dla_attn", "MLP": "dla_mlp", "intervention step": "dla_step"}
    # the intervention's change on its own scale: it is often orders of magnitude below the parts themselves
    change = [((["intervened − baseline, each head", "steered", "d_dla_head"],
                ["intervened − baseline, per layer", "steered", {k: f"d_{v}" for k, v in parts.items()}]),
               dict(title="What the intervention changed in the direct contributions", value="logit difference"))
              ] if steered else []
    return Section("Direct logit attribution", text=(
        "Each head's direct contribution to logit(Yes) − logit(No) at the decision token: its output through "
        "its slice of o_proj, through the final norm with its scale held at the value it had. With the embedding, "
        "the MLPs and any residual edit of the intervention, the parts sum to the margin. The second row splits "
        "each head by the keys it read: image keys, the first (sink) key and the other text keys."),
        figures=_heatmaps(
            rec, (conds, dict(title="Direct contribution of each head", value="logit difference")),
            ([(f"{src} keys", "baseline", f"dla_head_{src}") for src in ("image", "sink", "text")],
             dict(title="Baseline, split by where each head reads", value="logit difference")),
            ([("baseline", "baseline", parts)], dict(title="Direct contribution per layer", value="logit difference")),
            *change))


_PATCHING = (
    ("patch", "Activation patching", "Each patch is one row of a batch continuing the shared prefix. "
     "Denoising: the clean activation replaces the corrupted one; noising: the reverse. The colour is the "
     "normalised recovery (m − m_corrupted)/(m_clean − m_corrupted): 1 is the clean margin, 0 the "
     "corrupted one. Heads and MLPs are patched at every text token after the image (or, with "
     "--components-at decision, at the decision token only); the residual at one token group."),
    ("atp", "Attribution patching", "Gradient × difference: the same grid to first order at the destination "
     "run (two forwards and a backward per direction). Where it and activation patching disagree by more "
     "than 0.25 the first order fails (table below)."))


def _patching_sections(result) -> list[Section]:
    sections = []
    for m, name, text in _PATCHING:
        f = _heatmaps(
            result.records,
            ([(_DIRECTION[d], d, f"{m}_head") for d in ("denoise", "noise")],
             dict(title=f"{name}: each head's output", value="recovery", diverging=False)),
            ([(_DIRECTION[d], d, {k: v.format(m=m) for k, v in _GROUPS.items()}) for d in ("denoise", "noise")],
             dict(title=f"{name}: the residual stream per token group, and the MLPs", value="recovery",
                  diverging=False)))
        table = None
        if m == "atp":
            table = pd.DataFrame([{"patches": k.split(":")[0], "direction": k.split(":")[1],
                                   "Spearman ρ with activation patching": v["spearman"],
                                   "first order fails at": ", ".join(_patch_name(k.split(":")[0], i)
                                                                     for i in v["failures"]) or "none"}
                                  for k, v in result.agreement.items()])
        sections.append(Section(name, text=text, figures=f, table=table))
    return sections


def _local_section(result) -> Section:
    s = result.summary
    if abs(s["local_gap"]) <= s["margin_floor"]:
        return Section("Where the intervention acts", lines=[
            "The intervention leaves the margin within its noise floor: there is nothing to localise."])
    return Section("Where the intervention acts", text=(
        "Each intervened activation put into the baseline run, one at a time, the rest of the run without "
        "the intervention: the colour is the share of the intervention's change of the margin it carries "
        "(1: all of it, 0: none)."), lines=["Heads that carry most of it: " + ", ".join(s["top_heads_local"])],
        figures=_heatmaps(result.records, (
            [("heads", "steered", "local_head"),
             ("residual and MLPs", "steered", {k: v.format(m="local") for k, v in _GROUPS.items()})],
            dict(title="The intervention's activations patched into the baseline", value="share of the change",
                 diverging=False))))


_DIRECTION = {"denoise": "denoising (clean into corrupted)", "noise": "noising (corrupted into clean)"}


def _patch_name(kind: str, index) -> str:
    """A patch of a grid in words: ``5.1`` (layer.head), ``layer 3 MLP``, ``layer 6 decision``."""
    from ..measurements.attribution import GROUPS

    index = list(index)
    if kind == "heads":
        return f"{index[0]}.{index[1]}"
    if kind == "mlp":
        return f"layer {index[0]} MLP"
    return f"layer {index[0]} {GROUPS[index[1]]}"

"""POPE metrics, outcome tables and the run's output files.

Every question's outcome (:mod:`mclcbf_diag.measurements.outcomes`) is unchanged, fixed, broken,
derailed or non_finite (the intervention's step overflowed and was dropped); flips.csv counts them per split beside
the bare sign changes, and metrics.csv adds
``accuracy_valid`` (a right answer must also be a Yes/No output) and ``not_yes_no``.

The steered rows of metrics.csv also carry the paired statistics against the baseline and the
bias control (:mod:`mclcbf_diag.measurements.stats`, :data:`~mclcbf_diag.measurements.stats.COLUMNS`: exact McNemar, the
seeded paired bootstrap's 95% intervals of Δaccuracy/ΔF1/Δyes-ratio, the control's offset,
accuracy and F1, the gain over it and its interval, the label), computed from the stored
margins, no forward. ``flips_questions.csv`` is the per-question ledger: every changed question
with both margins, the bias control's answer and whether the change survives the control.
"""

from __future__ import annotations

from pathlib import Path

from ..measurements import stats as S
from ..measurements.outcomes import OUTCOMES
from ..storage import atomic_write_text
from .store import flat_keys

LEDGER = "flips_questions.csv"


def paired_table(records: list[dict], splits: list[str], *, resamples: int = S.RESAMPLES,
                 seed: int = S.SEED, base: str = "baseline", new: str = "steered"):
    """Per split (and pooled "all"): the ``new`` answers paired against the ``base`` ones (:func:`.stats.paired`),
    ``condition`` = ``new``. The text answers (``base="baseline_text", new="steered_text"``) have no margins, so no
    bias control.

    Args:
        records: the run's answers rows.
        splits: the run's splits, in order (pooled ``all`` for several).
        resamples: bootstrap resamples.
        seed: the bootstrap's seed.
        base: the baseline condition's prefix in the rows.
        new: the intervened condition's prefix.

    Returns:
        A frame: ``split``, ``condition`` and the columns of :data:`~mclcbf_diag.measurements.stats.COLUMNS`.
    """
    import pandas as pd

    rows = [{"split": split, "condition": new,
             **S.paired_records(_select(records, split), base, new, resamples=resamples, seed=seed)}
            for split in _split_groups(records, splits)]
    return pd.DataFrame(rows, columns=["split", "condition", *S.COLUMNS])


def _select(records: list[dict], split: str) -> list[dict]:
    return records if split == "all" else [r for r in records if r["split"] == split]


def metrics_table(records: list[dict], splits: list[str], paired=None):
    """POPE metrics per split (and pooled "all" for several splits) and condition.

    Args:
        records: the run's answers rows.
        splits: the run's splits, in order.
        paired: :func:`paired_table` (one or several concatenated): the rows of its conditions (steered,
            steered_text) carry its columns (``n`` aside); the other rows leave them empty. None: no such columns.

    Returns:
        One row per (split, condition): counts, accuracy (and over valid answers), precision, recall, F1,
        yes ratio and the confusion counts.
    """
    import pandas as pd

    from ..data import pope_metrics

    conditions = [("baseline", "baseline_answer"), ("steered", "steered_answer")]
    if records and "baseline_text_answer" in records[0]:
        conditions += [("baseline_text", "baseline_text_answer"), ("steered_text", "steered_text_answer")]
    rows = []
    for split in _split_groups(records, splits):
        sel = records if split == "all" else [r for r in records if r["split"] == split]
        for cond, col in conditions:
            m = pope_metrics([r["label"] for r in sel], [r[col] for r in sel])
            valid = [_valid(r, cond) for r in sel]
            right = [r[col] == r["label"] and v for r, v in zip(sel, valid)]
            rows.append({"split": split, "condition": cond, **m, "not_yes_no": sum(not v for v in valid),
                         "accuracy_valid": sum(right) / len(sel) if sel else 0.0})
    cols = ["split", "condition", "n", "accuracy", "accuracy_valid", "not_yes_no", "precision", "recall", "f1",
            "yes_ratio", "tp", "fp", "tn", "fn"]
    table = pd.DataFrame(rows, columns=cols)
    if paired is None:
        return table
    extra = paired.drop(columns=["n"])
    if "condition" not in extra:
        extra = extra.assign(condition="steered")
    return table.merge(extra, on=["split", "condition"], how="left", sort=False)


def _valid(r: dict, cond: str) -> bool:
    """Whether a row's answer in a condition is a Yes/No answer (rows of older runs: assumed so)."""
    if cond.endswith("_text"):
        return True  # the official parser maps every text to yes/no
    return bool(r.get(f"{cond}_valid", True))


def row_outcome(r: dict, source: str = "logit") -> str:
    """A row's outcome class (recomputed for rows written before outcomes existed)."""
    from ..measurements.outcomes import outcome

    if source == "text":
        return r.get("text_outcome") or outcome(r["baseline_text_answer"], True, r["steered_text_answer"], True,
                                                r["label"])
    if "outcome" in r:
        return r["outcome"]
    return outcome(r["baseline_answer"], True, r["steered_answer"], True, r["label"])


def flips_table(records: list[dict], splits: list[str]):
    """Baseline → steered per split: outcome counts (:data:`~mclcbf_diag.measurements.outcomes.OUTCOMES`) and the sign
    changes.

    ``flipped``, ``yes_to_no`` … count bare changes of the answer's sign (a derailed output
    included); ``fixed``/``broken`` count only valid Yes/No answers.
    """
    import pandas as pd

    sources = [("logit", "baseline_answer", "steered_answer")]
    if records and "baseline_text_answer" in records[0]:
        sources.append(("text", "baseline_text_answer", "steered_text_answer"))
    rows = []
    for split in _split_groups(records, splits):
        sel = records if split == "all" else [r for r in records if r["split"] == split]
        for source, bcol, scol in sources:
            pairs = [(r["label"], r[bcol], r[scol]) for r in sel]
            outs = [row_outcome(r, source) for r in sel]
            rows.append({"split": split, "answer": source, "n": len(pairs),
                         **{k: outs.count(k) for k in OUTCOMES},
                         "flipped": sum(b != s for _, b, s in pairs),
                         "yes_to_no": sum(b == "yes" and s == "no" for _, b, s in pairs),
                         "no_to_yes": sum(b == "no" and s == "yes" for _, b, s in pairs),
                         "right_to_wrong": sum(b == lab and s != lab for lab, b, s in pairs),
                         "wrong_to_right": sum(b != lab and s == lab for lab, b, s in pairs)})
    return pd.DataFrame(rows)


def _split_groups(records, splits) -> list[str]:
    present = [s for s in splits if any(r["split"] == s for r in records)]
    present += sorted({r["split"] for r in records} - set(present))
    return present + (["all"] if len(present) > 1 else [])


NOISE_MARGIN = 1e-4  # |Δ margin| below this, with nothing fired, is floating-point noise (batching, op order)


def write_outputs(out: Path, records: list[dict], identity: dict) -> tuple:
    """metrics.csv, flips.csv and summary.html from the records; prints both tables.

    The page (see :func:`summary_sections`) rounds for reading; the CSV files keep full precision.
    The per-question ledger (``flips_questions.csv``) is written beside them.

    Args:
        out: the run folder.
        records: the run's answers rows.
        identity: the run's ``run.json`` (its ``splits`` order the tables).

    Returns:
        ``(metrics, flips)``: the frames written to metrics.csv (:func:`metrics_table`, paired columns
        included) and flips.csv (:func:`flips_table`).
    """
    import pandas as pd

    from ..report.html import write_page

    splits = identity.get("splits", [])
    paired = paired_table(records, splits)
    both = paired
    if records and "baseline_text_answer" in records[0]:  # --generate: the parsed text answers, paired too
        both = pd.concat([paired, paired_table(records, splits, base="baseline_text", new="steered_text")],
                         ignore_index=True)
    metrics, flips = metrics_table(records, splits, both), flips_table(records, splits)
    ledger = ledger_table(records, splits)
    atomic_write_text(out / "metrics.csv", metrics.to_csv(index=False))
    atomic_write_text(out / "flips.csv", flips.to_csv(index=False))
    atomic_write_text(out / LEDGER, ledger.to_csv(index=False))
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.float_format", "{:.4f}".format):
        print(metrics[[c for c in metrics.columns if c in _PRINTED]].to_string(index=False))
        print()
        print(flips.to_string(index=False))
        print()
        print(paired_summary(paired).to_string(index=False))
    write_page(out / "summary.html", "mclcbf-diag pope",
               summary_sections(records, identity, metrics, flips, paired=paired, ledger=ledger))
    return metrics, flips


_PRINTED = ("split", "condition", "n", "accuracy", "accuracy_valid", "not_yes_no", "f1", "yes_ratio")


def paired_summary(paired):
    """The paired statistics in a few readable columns (accuracy points, the label)."""
    import pandas as pd

    def pts(x):
        return f"{100 * x:+.1f}"

    rows = [{"split": r["split"], "fixed/broken": f"{r['fixed_valid']}/{r['broken_valid']}",
             "McNemar p": f"{r['mcnemar_p']:.3g}",
             "Δ accuracy [95%]": f"{pts(r['d_accuracy'])} [{pts(r['d_accuracy_lo'])}, {pts(r['d_accuracy_hi'])}]",
             "bias control accuracy": f"{100 * r['control_accuracy']:.1f}",
             "gain over control [95%]": f"{pts(r['gain_over_control'])} [{pts(r['gain_over_control_lo'])}, "
                                        f"{pts(r['gain_over_control_hi'])}]",
             "bias control": r["bias_label"]} for r in paired.to_dict("records") if r["n"]]
    return pd.DataFrame(rows)


def ledger_table(records: list[dict], splits: list[str]):
    """The per-question ledger: every question whose outcome is not unchanged, with both margins, its split's bias
    control's answer (``invalid`` where the baseline answer was no Yes/No answer) and whether the change survives
    the control: the intervention's answer is right where the control's is wrong or the reverse (a change the
    control reproduces is a yes/no shift's)."""
    import pandas as pd

    cols = ["split", "question_id", "label", "outcome", "baseline_answer", "steered_answer", "baseline_margin",
            "steered_margin", "steered_valid", "bias_offset", "control_answer", "control_right", "survives_control"]
    rows = []
    for split in _split_groups(records, splits):
        if split == "all":
            continue
        sel = _select(records, split)
        offset, control = S.control_of_records(sel)
        for r, c in zip(sel, control):
            out = row_outcome(r)
            if out == "unchanged":
                continue
            right = _valid(r, "steered") and r["steered_answer"] == r["label"]
            rows.append({"split": split, "question_id": r["question_id"], "label": r["label"], "outcome": out,
                         "baseline_answer": r["baseline_answer"], "steered_answer": r["steered_answer"],
                         "baseline_margin": r["baseline_margin"], "steered_margin": r["steered_margin"],
                         "steered_valid": _valid(r, "steered"), "bias_offset": offset, "control_answer": c,
                         "control_right": c == r["label"], "survives_control": right != (c == r["label"])})
    return pd.DataFrame(rows, columns=cols)


def summary_sections(records: list[dict], identity: dict, metrics, flips, paired=None, ledger=None) -> list:
    """The sections of summary.html: a banner when the run is a partial merge, counts first, whether the difference
    is real (paired statistics and the bias control), metrics zoomed to the data, one outcome partition at a
    time, the margin changes (or why they are noise), each count's questions, and every changed question with its
    explain command.

    Args:
        records: the run's answers rows.
        identity: the run's ``run.json``.
        metrics: :func:`metrics_table` of the records.
        flips: :func:`flips_table` of the records.
        paired: :func:`paired_table` of the records; None: computed here.
        ledger: :func:`ledger_table` of the records; None: computed here.

    Returns:
        The page's :class:`~mclcbf_diag.report.html.Section` list, in order.
    """
    import pandas as pd

    from ..report.html import Section

    if paired is None:
        paired = paired_table(records, identity.get("splits", []))
    if ledger is None:
        ledger = ledger_table(records, identity.get("splits", []))

    outs = [row_outcome(r) for r in records]
    n = {k: outs.count(k) for k in OUTCOMES}
    info = pd.DataFrame({"setting": list(flat_keys(identity)), "value": [str(v) for v in flat_keys(identity).values()]})
    noise_text, fig_d = margin_changes(records)
    changed = changed_questions(records, identity)
    head = [partial_section(identity)] if identity.get("partial") else []
    return head + [
        Section("Run", lines=[f"{len(records)} questions: {n['unchanged']} unchanged, {n['fixed']} fixed (wrong → "
                              f"right), {n['broken']} broken (right → wrong), {n['derailed']} derailed (no longer a "
                              "Yes/No answer)" + (f", {n['non_finite']} non-finite (the intervention's step overflowed "
                              "and was not applied)" if n["non_finite"] else "") + ".", noise_text], table=info),
        Section("Metrics", text="Answers are read from the first-token logits (margin > 0 → yes); 'accuracy, valid' "
                "counts an answer right only when the top token is a Yes/No spelling ('not Yes/No': how many are "
                "not); *_text conditions score the generated text with POPE's parser. Each panel's axis is zoomed "
                "to its values.", figures=[metrics_figure(metrics)], table=_metric_columns(metrics)),
        paired_section(paired),
        Section("Outcomes", text="Each question falls in exactly one class of a partition; the buttons switch "
                "between the outcome classes (unchanged / fixed / broken / derailed) and the bare sign changes of "
                "logit Yes − No (derailed outputs included), for each kind of answer.",
                figures=[partition_figure(flips)], table=flips),
        Section("Margins", text=noise_text, figures=[fig_d] if fig_d is not None else []),
        Section("Each count's questions", text="Every count of the outcome partition and of the bias control, per "
                "split; each links to its questions (split:question_id). flips_questions.csv has them with both "
                "margins and the bias control's answer.", html=count_links(records, ledger, identity)),
        Section(f"Changed questions ({len(changed)})", text=(
            "Every question whose outcome is not 'unchanged', with the command that explains it." if len(changed) else
            "No question changed its outcome."), table=changed if len(changed) else None),
    ]


def partial_section(identity: dict):
    """The banner of a partial merge (``identity["partial"]``: expected, present, missing_shards)."""
    from ..report.html import Section

    part = identity.get("partial") or {}
    missing = part.get("missing_shards") or []
    return Section(f"partial: {part.get('present', '?')} of {part.get('expected', '?')} questions",
                   lines=[f"This run is a partial merge: {part.get('present', '?')} of the {part.get('expected', '?')} "
                          "questions are answered" + (f"; missing shards: {', '.join(map(str, missing))}" if missing
                                                      else "") + ". Every figure below covers only those questions."])


def paired_section(paired):
    """Whether the difference is real: one paragraph per split (:func:`.stats.describe`) and the table."""
    from ..report.html import Section

    lines = [f"{r['split']}: {S.describe(r)}" for r in paired.to_dict("records") if r["n"]]
    return Section("Is the difference real? Paired tests and the bias control", text=(
        "Each question is paired with itself (baseline, intervened). McNemar: the exact two-sided binomial test on "
        "the fixed and the broken answers (a derailed answer counts as wrong). The intervals: 95% percentile "
        f"intervals of a paired bootstrap ({S.RESAMPLES:,} resamples of the questions, seed {S.SEED}), in accuracy "
        "points. The bias control adds one constant to every baseline Yes − No margin, chosen so that the baseline "
        "answers yes as often as the intervention; an intervention whose gain over its control has an interval "
        f"reaching 0 or below is labelled '{S.EXPLAINED}'. The best constant offset {S.BEST_OFFSET_NOTE}. Computed "
        "from the stored margins: no extra forward."), lines=lines, table=paired_summary(paired))


def count_links(records: list[dict], ledger, identity: dict) -> str:
    """A trusted HTML fragment: per split, each outcome count (and the bias control's) links to a folded list.

    Each list holds its questions; every text is escaped, anchors are made from indices only.

    Args:
        records: the run's answer rows.
        ledger: the bias-control ledger (a frame with split, question_id, survives_control; empty: none).
        identity: the run's identity (its ``splits`` order the groups).

    Returns:
        The HTML fragment.
    """
    import html

    groups = [s for s in _split_groups(records, identity.get("splits", [])) if s != "all"]
    table, lists = [], []
    kinds = [*OUTCOMES, "survives the bias control", "reproduced by the bias control"]
    for i, split in enumerate(groups):
        sel = _select(records, split)
        led = ledger[ledger.split == split] if len(ledger) else ledger
        members = {k: [r["question_id"] for r in sel if row_outcome(r) == k] for k in OUTCOMES}
        if len(led):
            members[kinds[-2]] = led.question_id[led.survives_control.astype(bool)].tolist()
            members[kinds[-1]] = led.question_id[~led.survives_control.astype(bool)].tolist()
        cells = []
        for j, k in enumerate(kinds):
            ids = members.get(k, [])
            if not ids:
                cells.append("<td>0</td>")
                continue
            anchor = f"questions-{i}-{j}"
            cells.append(f'<td><a href="#{anchor}">{len(ids)}</a></td>')
            lists.append(f'<details id="{anchor}"><summary>{html.escape(split)}, {html.escape(k)}: {len(ids)} '
                         f'question(s)</summary><p>{html.escape(", ".join(f"{split}:{q}" for q in ids))}</p></details>')
        table.append(f"<tr><td class=\"text\">{html.escape(split)}</td>{''.join(cells)}</tr>")
    head = "".join(f"<th>{html.escape(k)}</th>" for k in ["split", *kinds])
    return (f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(table) + "\n</tbody>\n</table>\n"
            + "\n".join(lists))


_METRIC_NAMES = {"split": "split", "condition": "condition", "n": "questions", "accuracy": "accuracy (fraction)",
                 "accuracy_valid": "accuracy, valid (fraction)", "not_yes_no": "not Yes/No", "precision": "precision",
                 "recall": "recall", "f1": "F1", "yes_ratio": "yes-ratio (fraction)", "tp": "TP", "fp": "FP",
                 "tn": "TN",
                 "fn": "FN"}


def _metric_columns(metrics):
    """The metrics for reading (the paired statistics have their own section)."""
    return metrics[[c for c in metrics.columns if c in _METRIC_NAMES]].rename(columns=_METRIC_NAMES)


def metrics_figure(metrics):
    """Accuracy, F1 and yes-ratio (%) per split and condition; each panel's axis spans its values, not 0–100."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    panels = [("accuracy", "accuracy (%)"), ("f1", "F1 (%)"), ("yes_ratio", "yes-ratio (%)")]
    fig = make_subplots(rows=1, cols=3, subplot_titles=[t for _, t in panels], horizontal_spacing=0.08)
    colours = ["#636efa", "#ef553b", "#00cc96", "#ab63fa"]
    for c, (col, _) in enumerate(panels, start=1):
        vals = 100 * metrics[col].astype(float)
        for j, (cond, g) in enumerate(metrics.groupby("condition", sort=False)):
            fig.add_trace(go.Bar(x=g.split, y=100 * g[col].astype(float), name=cond, marker_color=colours[j % 4],
                                 legendgroup=cond, showlegend=c == 1, text=[f"{100 * v:.1f}" for v in g[col]],
                                 textposition="outside",
                                 hovertemplate=f"{cond}, %{{x}}<br>{col} %{{y:.2f}}%<extra></extra>"), row=1, col=c)
        lo, hi = float(vals.min()), float(vals.max())
        pad = max((hi - lo) * 0.6, 0.5)
        fig.update_yaxes(range=[max(lo - pad, 0), min(hi + pad, 100)], title_text="%" if c == 1 else None, row=1, col=c)
    fig.update_layout(title="POPE metrics by condition (axes zoomed to the values)", barmode="group", height=420)
    return fig


def partition_figure(flips):
    """One partition of the questions at a time (buttons): outcome classes or sign changes, per answer kind."""
    import plotly.graph_objects as go

    parts = {"outcome": [o for o in OUTCOMES if o in flips],  # flips.csv of older runs has no non_finite
             "sign change": ["yes_to_no", "no_to_yes"]}
    colours = {"unchanged": "#bbbbbb", "fixed": "#2ca02c", "broken": "#d62728", "derailed": "#9467bd",
               "non_finite": "#000000",
               "yes_to_no": "#1f77b4", "no_to_yes": "#ff7f0e"}
    fig = go.Figure()
    views = []
    for answer, g in flips.groupby("answer", sort=False):
        for part, cols in parts.items():
            first = len(fig.data)
            for col in cols:
                y = g[col].astype(int).tolist()
                fig.add_trace(go.Bar(x=g.split, y=y, name=col.replace("_", " "), marker_color=colours[col],
                                     text=y, textposition="auto", visible=not views,
                                     hovertemplate=f"{answer} answers, %{{x}}<br>{col.replace('_', ' ')}: %{{y}}"
                                                   "<extra></extra>"))
            if part == "sign change":  # the rest of the partition: no sign change
                y = (g["n"] - g["flipped"]).astype(int).tolist()
                fig.add_trace(go.Bar(x=g.split, y=y, name="same sign", marker_color="#bbbbbb", text=y,
                                     textposition="auto", visible=not views))
            views.append((f"{part} ({answer} answers)", first, len(fig.data)))
    n = len(fig.data)
    buttons = [dict(label=label, method="update", args=[{"visible": [a <= k < b for k in range(n)]},
                                                         {"title": f"Questions by {label}"}])
               for label, a, b in views]
    fig.update_layout(barmode="stack", title=f"Questions by {views[0][0]}", yaxis_title="questions",
                      xaxis_title="split", updatemenus=[dict(type="buttons", direction="right", buttons=buttons,
                                                             x=0, xanchor="left", y=1.03, yanchor="bottom")],
                      margin=dict(t=130), title_y=0.95)
    return fig


def margin_changes(records: list[dict]):
    """(sentence, figure or None): the steered − baseline margins, or why they are floating-point noise."""
    import numpy as np
    import pandas as pd
    import plotly.express as px

    frame = pd.DataFrame(records)
    dm = (frame.steered_margin - frame.baseline_margin).to_numpy(dtype=float)
    finite = dm[np.isfinite(dm)]
    fired = sum(bool(r.get("layers_fired")) for r in records) if any("layers_fired" in r for r in records) else None
    big = np.abs(finite) >= NOISE_MARGIN
    largest = float(np.abs(finite).max()) if finite.size else 0.0
    if not big.any() and not fired:
        return (f"Every margin change is below {NOISE_MARGIN:g} (largest |Δ margin| {largest:.2g}): changes below "
                f"{NOISE_MARGIN:g} are floating-point noise; nothing fired"
                + (" at any question." if fired == 0 else "."), None)
    frame["margin_change"] = dm
    fig = px.histogram(frame[np.abs(dm) >= NOISE_MARGIN], x="margin_change", color="split", barmode="overlay",
                       nbins=60, title=f"Δ margin (steered − baseline logit Yes − No), the {int(big.sum())} questions "
                                       f"with |Δ margin| ≥ {NOISE_MARGIN:g}")
    fig.update_layout(xaxis_title="Δ margin (logit Yes − No)", yaxis_title="questions")
    note = (f"{int((~big).sum())} of {len(finite)} margin changes are below {NOISE_MARGIN:g} (floating-point noise) "
            f"and are left out of the histogram; the largest |Δ margin| is {largest:.3g}"
            + (f"; the intervention fired at {fired} questions." if fired is not None else "."))
    return note, fig


def explain_command(row: dict, identity: dict) -> str:
    """The ``mclcbf-diag explain`` command that reproduces one question of this run."""
    import shlex

    from .. import shipped
    from ..data import LLAVA_PROMPT

    argv = ["mclcbf-diag", "explain", "--question-id", str(row["question_id"])]
    split = row.get("split")
    files = dict(zip(identity.get("splits", []), identity.get("pope_files", [])))
    path = files.get(split)
    if path is not None and split in ("random", "popular", "adversarial") and \
            Path(path).resolve() == shipped.pope_file(split).resolve():
        if split != "adversarial":
            argv += ["--split", split]
    elif path is not None:
        argv += ["--pope-file", str(path), "--image-dir", str(Path(path).parent if not identity.get("image_dirs") else
                                                              _image_dir(identity, path))]
    if identity.get("model") not in (None, "embedded"):
        argv += ["--model", str(identity["model"])]
    if identity.get("dtype") not in (None, "float32"):
        argv += ["--dtype", str(identity["dtype"])]
    if identity.get("intervention") not in (None, "mclcbf"):
        argv += ["--intervention", str(identity["intervention"])]
    if identity.get("preset"):
        argv += ["--preset", str(identity["preset"])]
    for o in identity.get("overrides", []):
        argv += ["--set", str(o)]
    if identity.get("prompt") not in (None, LLAVA_PROMPT):
        argv += ["--prompt", str(identity["prompt"])]
    if isinstance(identity.get("labels"), dict) and identity["labels"].get("file"):  # a relabelled run (--labels)
        argv += ["--labels", str(identity["labels"]["file"])]
    return " ".join(shlex.quote(a) for a in argv)


def _image_dir(identity: dict, path) -> str:
    dirs = identity.get("image_dirs", [])
    return dirs[0] if len(dirs) == 1 else str(Path(path).parent)


def changed_questions(records: list[dict], identity: dict):
    """One row per question whose outcome is not unchanged: what changed, and the command that explains it."""
    import pandas as pd

    rows = []
    for r in records:
        out = row_outcome(r)
        text = row_outcome(r, "text") if "baseline_text_answer" in r else None
        if out == "unchanged" and text in (None, "unchanged"):
            continue
        rows.append({"split": r["split"], "question_id": r["question_id"], "question": r.get("text", ""),
                     "label": r["label"], "answer (baseline → steered)": f"{r['baseline_answer']} → "
                                                                          f"{r['steered_answer']}",
                     "margin (baseline → steered)": f"{r['baseline_margin']:+.3g} → {r['steered_margin']:+.3g}",
                     "outcome": out + (f" (text: {text})" if text is not None else ""),
                     "explain it": explain_command(r, identity)})
    return pd.DataFrame(rows)

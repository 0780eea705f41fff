"""The population run's self-contained page: the plain answer first, then the counts, plots and questions."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from ..report.html import Section
from ..report.html import write_page as _write

_COLORS = {"fixed": "#2a9d8f", "broken": "#e76f51", "derailed": "#8d99ae", "unchanged": "#cccccc"}


def _bars(df: pd.DataFrame, x: str, title: str) -> go.Figure:
    fig = go.Figure()
    for group in ("wrong", "right"):
        g = df[df.group == group]
        fig.add_bar(x=g[x].astype(str), y=g["count"], name=f"{group} answers")
    fig.update_layout(title=title, barmode="group", yaxis_title="questions", height=420)
    return fig


def _fix_figure(fixes: pd.DataFrame) -> go.Figure:
    fig = go.Figure()
    for what, cols in (("fixed", ["wrong_fixed"]), ("broken", ["right_broken"]),
                       ("derailed", ["wrong_derailed", "right_derailed"])):
        fig.add_bar(x=fixes.fix, y=fixes[cols].sum(axis=1), name=what, marker_color=_COLORS[what])
    fig.add_scatter(x=fixes.fix, y=fixes.net, mode="markers", name="net (fixed − broken − derailed right)",
                    marker={"size": 12, "symbol": "diamond", "color": "#222"})
    fig.update_layout(title="Counterfactual fixes over the split", barmode="group", yaxis_title="questions",
                      height=440)
    return fig


def _setting_figure(settings: pd.DataFrame) -> go.Figure:
    s = settings[(settings.edit == "target")]
    fig = go.Figure()
    for tokens in ("decision", "after_image"):
        t = s[s.tokens == tokens]
        if not len(t):
            continue
        best = t.sort_values("net", ascending=False, kind="stable").groupby("value", sort=True).head(1)
        best = best.sort_values("value")
        fig.add_scatter(x=best.value, y=best.fixed, mode="lines+markers", name=f"{tokens}: fixed (best window)")
        fig.add_scatter(x=best.value, y=best.broken, mode="lines+markers", name=f"{tokens}: broken (same window)",
                        line={"dash": "dot"})
    fig.update_layout(title="Graded sweep over the split: target image mass → answers fixed and broken",
                      xaxis_title="target image mass", yaxis_title="questions", height=440)
    return fig


def _question_list(df: pd.DataFrame, command, limit: int) -> pd.DataFrame:
    cols = ["split", "question_id", "label", "baseline_answer", "outcome", "top_cause", "dose_k_star",
            "sweep_decision_min_mass", "sweep_after_image_changes_it", "fixes_fixed", "fixes_broken"]
    sel = df[[c for c in cols if c in df.columns]].head(limit).copy()
    sel["command"] = [command(s, q) for s, q in zip(sel.split, sel.question_id)]
    for c in ("fixes_fixed", "fixes_broken"):
        if c in sel:
            sel[c] = sel[c].map(lambda v: ", ".join(v) if isinstance(v, list) else v)
    return sel


FIRST_IDS = 10  # question ids shown before a list folds ("… and N more", the rest behind "show all")


def id_list(ids: list[str], links: dict | None = None, first: int = FIRST_IDS) -> str:
    """A trusted HTML fragment: question ids, each linked to its page where ``links`` has one.

    Args:
        ids: the question ids (``split:question_id``).
        links: ``split:question_id`` → relative path of its page; None: no links.
        first: ids shown before the list folds (the count and the rest behind "show all").

    Returns:
        The fragment (ids and paths escaped).
    """
    import html

    def one(key: str) -> str:
        target = (links or {}).get(key)
        text = html.escape(key)
        return f'<a href="{html.escape(target)}">{text}</a>' if target else text

    ids = [str(i) for i in ids if str(i)]
    head = ", ".join(one(k) for k in ids[:first])
    if len(ids) <= first:
        return f"<p>{head}</p>"
    return (f"<p>{head}, … and {len(ids) - first} more</p><details><summary>show all {len(ids)}</summary>"
            f"<p>{', '.join(one(k) for k in ids)}</p></details>")


def _counted(table: pd.DataFrame, label: list[str], links: dict | None, what: str = "questions"):
    """``table`` without its list of question ids, and those ids as a trusted fragment: per row its label and count,
    then the ids (each linked to its page where ``links`` has one; long lists folded behind "show all")."""
    import html

    if what not in table:
        return table, None
    parts = []
    for r in table.to_dict("records"):
        ids = [i for i in str(r[what] or "").split(", ") if i]
        if ids:
            name = " · ".join(html.escape(str(r[c])) for c in label if c in r)
            parts.append(f"<p><b>{name}</b> ({len(ids)}):</p>{id_list(ids, links)}")
    return table.drop(columns=[what]), "".join(parts) or None


def _paired_links(paired: pd.DataFrame, links: dict | None = None) -> str:
    """A trusted HTML fragment: per split, the fixed and broken counts of the paired test, each linking to a folded
    list of its questions (every text escaped; anchors from indices only; each id linked to its page where
    ``links`` has one)."""
    import html

    rows, lists = [], []
    for i, r in enumerate(paired.to_dict("records")):
        cells = []
        for j, (count, ids) in enumerate(((r["fixed_valid"], r["fixed_questions"]),
                                          (r["broken_valid"], r["broken_questions"]))):
            if not count:
                cells.append("<td>0</td>")
                continue
            anchor = f"paired-{i}-{j}"
            what = "fixed" if j == 0 else "broken or derailed"
            cells.append(f'<td><a href="#{anchor}">{int(count)}</a></td>')
            lists.append(f'<details id="{anchor}"><summary>{html.escape(str(r["split"]))}, {what}: {int(count)} '
                         f'question(s)</summary>{id_list(str(ids).split(", "), links)}</details>')
        rows.append(f'<tr><td class="text">{html.escape(str(r["split"]))}</td>{"".join(cells)}'
                    f'<td class="text">{html.escape(str(r["bias_label"]))}</td></tr>')
    head = "".join(f"<th>{h}</th>" for h in ("split", "fixed", "broken or derailed", "bias control"))
    return (f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(rows) + "\n</tbody>\n</table>\n"
            + "\n".join(lists))


def _paired_section(paired: pd.DataFrame, links: dict | None = None) -> Section:
    from ..measurements import stats as S

    cols = ["split", "n", "fixed_valid", "broken_valid", "mcnemar_p", "d_accuracy", "d_accuracy_lo", "d_accuracy_hi",
            "bias_offset", "control_accuracy", "gain_over_control", "gain_over_control_lo", "gain_over_control_hi",
            "control_shares_fixes", "bias_label", "best_offset_accuracy"]
    return Section("Is the difference real?", text=(
        "The intervention as configured against the baseline, question by question: the exact McNemar test on the "
        "fixed and the broken answers (a derailed answer counts as wrong), the 95% interval of Δ accuracy from a "
        f"paired bootstrap ({S.RESAMPLES:,} resamples, seed {S.SEED}), and the bias control: one constant on the "
        "baseline's Yes − No margin giving the intervention's yes-ratio. A gain over the control whose interval "
        f"reaches 0 or below is labelled '{S.EXPLAINED}'. best_offset_accuracy {S.BEST_OFFSET_NOTE}. Each count "
        "links to its questions."), lines=[f"{r['split']}: {S.describe(r)}" for r in paired.to_dict("records")],
        table=paired[[c for c in cols if c in paired]], html=_paired_links(paired, links))


def _table_and_ids(table: pd.DataFrame, label: list[str], links: dict | None) -> dict:
    """A section's ``table`` and ``html``: the counts, then each row's questions (:func:`_counted`)."""
    rest, fragment = _counted(table, label, links)
    return {"table": rest, "html": fragment}


def _keys(df: pd.DataFrame) -> list[str]:
    return [f"{s}:{q}" for s, q in zip(df["split"], df["question_id"])]


def write_page(path, t: dict, identity: dict, command, limit: int, links: dict | None = None,
               plotlyjs: str | None = None):
    """``population.html``.

    Args:
        path: where the page is written.
        t: the run's tables (:func:`~mclcbf_diag.population.outputs.tables`).
        identity: the run's ``run.json`` (its splits name the page).
        command: ``command(split, question_id)`` → the explain command of one question.
        limit: how many questions the wrong and changed lists show with their command.
        links: ``split:question_id`` → a question's page, to link the question ids; None: no links.
        plotlyjs: load plotly.js from the folder's shared copy at this path instead of inlining it.
    """
    df = t["questions"]
    cmd = command(df.split.iloc[0], df.question_id.iloc[0]) if len(df) else ""
    wrong, right = df[df.kind == "wrong"], df[df.kind == "right"]
    sections = [
        Section("The answer", text=t["answer"] + "\n\nEvery number below lists the questions behind it (split:"
                "question_id); each question's own verdict is one explain command away, e.g. " + cmd + "."),
        *([_paired_section(t["paired"], links)] if len(t.get("paired", ())) else []),
        Section("Decisive causes", text="The top decisive cause of each question: the first cause in explain's "
                "ranking whose own counterfactual (undo just that cause) changes the step size, the decision token's "
                "image mass, the margin or the outcome.", figures=[_bars(t["causes"], "cause", "Top decisive cause")],
                **_table_and_ids(t["causes"], ["group", "cause"], links)),
        Section("Dose-response", text="The smallest multiplier k on the intervention's change that fixes a wrong "
                "answer (or breaks or derails a right one), by bracket of the doubling grid.",
                figures=[_bars(t["doses"], "k_star", "Smallest k reaching the goal")],
                **_table_and_ids(t["doses"], ["group", "k_star"], links)),
        Section("Decision-token image mass", text="The smallest target image mass of the decision token (graded "
                "sweep: 0 … 0.9, in all layers and in layer windows) that fixes a wrong answer (breaks a right "
                "one) with a valid Yes/No output.", figures=[_bars(t["masses"], "decision_min_mass",
                                                                    "Smallest decision-token image mass")],
                **_table_and_ids(t["masses"], ["group", "decision_min_mass"], links)),
        Section("Counterfactual fixes", text="The intervention as configured and each fix alone (and all together): "
                "outcomes among wrong and right answers, and the net change of right answers.",
                figures=[_fix_figure(t["fixes"])], **_table_and_ids(t["fixes"], ["fix"], links)),
    ]
    if len(t["settings"]):
        top = t["settings"].sort_values("net", ascending=False, kind="stable").head(25)
        sections.append(Section("Graded sweep over the split", text="Each image-mass setting applied to every "
                                "question: answers fixed, broken and derailed (the 25 with the largest net gain; "
                                "settings.csv has all).", figures=[_setting_figure(t["settings"])], table=top))
    changed = right[(right.outcome != "unchanged") | right.fixes_broken.map(bool) | right.fixes_derailed.map(bool)]
    pages = " Each question id links to its page." if links else ""
    sections += [
        Section(f"Wrong answers ({len(wrong)})", text=f"The first {limit} with the command that explains each."
                + pages, table=_question_list(wrong, command, limit), html=id_list(_keys(wrong), links)),
        Section("Right answers the intervention or a fix changes", text=pages.strip(),
                table=_question_list(changed, command, limit), html=id_list(_keys(changed), links)),
    ]
    splits = ", ".join(identity.get("splits", []))
    return _write(path, f"mclcbf-diag explain: {len(df)} questions ({splits})", sections, plotlyjs)

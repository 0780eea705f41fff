"""The answer over a POPE split: the per-question verdicts counted, separately for wrong and right answers.

Everything here is a pure function of the per-question rows (:func:`.verdict.question_row`,
one dict per question) and, for the sweep, of the settings list the run used. A baseline
answer is *wrong* or *right* against the label; each count keeps the question ids behind it.

* :func:`cause_table`: per group, the top decisive cause (the first decisive one in explain's
  ranking; "(none decisive)" when no cause's own counterfactual changes the result), count
  and share.
* :func:`dose_table`: per group, the smallest multiplier k on the intervention's change that
  reaches the label's goal (fixed for a wrong answer, broken or derailed for a right one),
  binned by the doubling grid (k ≤ 1, 1 < k ≤ 2, …), or none up to k_max.
* :func:`mass_table`: per group, the smallest decision-token image mass of the graded sweep
  that changes the answer with a valid Yes/No output (fixes a wrong one, breaks a right one),
  or none; and how many only a change at every text token after the image changes.
* :func:`fix_table`: the intervention as configured and each counterfactual fix: outcome
  counts among wrong and right answers and the net change of right answers
  (fixed − broken − derailed right answers), in questions and in accuracy points.
* :func:`setting_table`: each graded-sweep setting across the split, fixed / broken /
  derailed and net: what one image-mass edit would do to the whole split.
* :func:`paired_table`: per split (and pooled "all" for several), the intervention as configured
  paired against the baseline (:func:`mclcbf_diag.measurements.stats.paired`): fixed vs broken (a derailed
  answer counts as wrong) with the exact McNemar p, the paired bootstrap interval of Δ accuracy,
  the bias control and its label, and the questions behind the fixed and broken counts.
* :func:`answer`: the plain-language answer computed from these tables.
"""

from __future__ import annotations

import math

import pandas as pd

from ..experiments.evidence import doubling_grid
from ..experiments.verdict import CODES
from ..measurements.outcomes import OUTCOMES

GROUPS = ("wrong", "right")
OUTCOME_COLS = OUTCOMES
NONE_DECISIVE = "(none decisive)"
_DECODE = {v: k for k, v in CODES.items()}


def _ids(df: pd.DataFrame) -> str:
    return ", ".join(f"{s}:{q}" for s, q in zip(df["split"], df["question_id"]))


def frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows)


def cause_table(df: pd.DataFrame, titles: dict | None = None) -> pd.DataFrame:
    out = []
    for group in GROUPS:
        g = df[df.kind == group]
        top = g.top_cause.where(g.top_cause.astype(bool), NONE_DECISIVE)
        for cause, count in top.value_counts().items():
            sel = g[top == cause]
            title = (titles or {}).get(cause, "") if not cause.startswith("joint:") else (
                "joint cause: " + " + ".join(cause[len("joint:"):].split("+")))
            out.append({"group": group, "cause": cause, "title": title, "count": int(count),
                        "share": count / len(g), "questions": _ids(sel)})
    return pd.DataFrame(out, columns=["group", "cause", "title", "count", "share", "questions"])


def dose_table(df: pd.DataFrame, k_max: float) -> pd.DataFrame:
    grid, out = doubling_grid(k_max), []  # the brackets are the dose-response's own grid
    for group in GROUPS:
        g = df[df.kind == group]
        k = pd.to_numeric(g.dose_k_star, errors="coerce")
        lo = 0.0
        for hi in grid:
            sel = g[(k > lo) & (k <= hi)]
            out.append({"group": group, "k_star": f"{lo:g} < k ≤ {hi:g}", "count": len(sel), "questions": _ids(sel)})
            lo = hi
        sel = g[k.isna()]
        out.append({"group": group, "k_star": f"none up to {k_max:g}", "count": len(sel), "questions": _ids(sel)})
    return pd.DataFrame(out, columns=["group", "k_star", "count", "questions"])


def mass_table(df: pd.DataFrame) -> pd.DataFrame:
    out = []
    for group in GROUPS:
        g = df[df.kind == group]
        m = pd.to_numeric(g.sweep_decision_min_mass, errors="coerce")
        for value in sorted(m.dropna().unique()):
            sel = g[m == value]
            out.append({"group": group, "decision_min_mass": f"{value:g}", "count": len(sel), "questions": _ids(sel)})
        other = g[m.isna() & (g.sweep_decision_changes > 0)]
        if len(other):
            out.append({"group": group, "decision_min_mass": "only a ×0.5/×2 scaling", "count": len(other),
                        "questions": _ids(other)})
        none = g[g.sweep_decision_changes == 0]
        out.append({"group": group, "decision_min_mass": "none", "count": len(none), "questions": _ids(none)})
        after = none[none.sweep_after_image_changes_it.astype(bool)]
        out.append({"group": group, "decision_min_mass": "none at the decision token, some after the image",
                    "count": len(after), "questions": _ids(after)})
    return pd.DataFrame(out, columns=["group", "decision_min_mass", "count", "questions"])


def _outcome_counts(name: str, outcomes: pd.Series, df: pd.DataFrame, n_total: int) -> dict:
    row = {"fix": name}
    for group in GROUPS:
        sel = outcomes[df.kind == group]
        for o in OUTCOME_COLS:
            row[f"{group}_{o}"] = int((sel == o).sum())
        row[f"{group}_n/a"] = int((sel == "n/a").sum())
    net = row["wrong_fixed"] - row["right_broken"] - row["right_derailed"]
    row["net"] = net
    row["net_accuracy_points"] = 100 * net / n_total if n_total else math.nan
    changed = df[outcomes.isin(["fixed", "broken", "derailed"])]
    row["questions"] = _ids(changed)
    return row


def fix_table(df: pd.DataFrame) -> pd.DataFrame:
    fixes = [c[4:] for c in df.columns if c.startswith("fix:")]
    rows = [_outcome_counts("(as configured)", df.outcome, df, len(df))]
    rows += [_outcome_counts(f, df[f"fix:{f}"].fillna("n/a"), df, len(df)) for f in fixes]
    return pd.DataFrame(rows)


def setting_table(df: pd.DataFrame, settings: list) -> pd.DataFrame:
    """One row per sweep setting ``(tokens, window, edit, value)``: fixed, broken, derailed, net over the split."""
    if not settings or not len(df) or not df.sweep.astype(bool).any():
        return pd.DataFrame(columns=["tokens", "window", "edit", "value", "fixed", "broken", "derailed", "net",
                                     "fixed_questions", "broken_questions"])
    codes = df.sweep.tolist()
    keys = list(zip(df.split, df.question_id))
    out = []
    for i, (tokens, window, edit, value) in enumerate(settings):
        got = [_DECODE.get(c[i], "?") if i < len(c) else "?" for c in codes]
        fixed = [k for k, o in zip(keys, got) if o == "fixed"]
        broken = [k for k, o in zip(keys, got) if o == "broken"]
        derailed_right = sum(o == "derailed" and kind == "right" for o, kind in zip(got, df.kind))
        out.append({"tokens": tokens, "window": "all" if window is None else ",".join(map(str, window)),
                    "edit": edit, "value": value, "fixed": len(fixed), "broken": len(broken),
                    "derailed": sum(o == "derailed" for o in got), "net": len(fixed) - len(broken) - derailed_right,
                    "fixed_questions": ", ".join(f"{s}:{q}" for s, q in fixed),
                    "broken_questions": ", ".join(f"{s}:{q}" for s, q in broken)})
    return pd.DataFrame(out)


def best_setting(settings: pd.DataFrame, tokens: str = "decision") -> dict | None:
    """The target-mass setting at ``tokens`` with the largest net gain (ties: smaller mass, then fewer layers)."""
    s = settings[(settings.tokens == tokens) & (settings.edit == "target")] if len(settings) else settings
    s = s[s.fixed > 0] if len(s) else s
    if not len(s):
        return None
    s = s.assign(_w=s.window.map(lambda w: 99 if w == "all" else len(w.split(","))))
    return s.sort_values(["net", "value", "_w"], ascending=[False, True, True], kind="stable").iloc[0].to_dict()


def paired_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per split (and pooled "all" for several): :func:`mclcbf_diag.measurements.stats.paired` of the rows with a
    yes/no label,
    with ``fixed_questions`` and ``broken_questions`` (split:question_id; derailed right answers among the broken)."""
    from ..measurements import stats as S

    cols = ["split", *S.COLUMNS, "fixed_questions", "broken_questions"]
    if not len(df) or "baseline_margin" not in df:
        return pd.DataFrame(columns=cols)
    lab = df[df.label.isin(["yes", "no"])] if "label" in df else df.iloc[:0]
    splits = list(dict.fromkeys(lab.split))
    out = []
    for split in [*splits, *(["all"] if len(splits) > 1 else [])]:
        g = lab if split == "all" else lab[lab.split == split]
        recs = g.to_dict("records")
        rec = S.paired_records(recs)
        right_b = [bool(S.answer_valid(r, "baseline")) and r["baseline_answer"] == r["label"] for r in recs]
        right_s = [bool(S.answer_valid(r, "steered")) and r["steered_answer"] == r["label"] for r in recs]
        fixed = g[[not b and s for b, s in zip(right_b, right_s)]]
        broken = g[[b and not s for b, s in zip(right_b, right_s)]]
        out.append({"split": split, **rec, "fixed_questions": _ids(fixed), "broken_questions": _ids(broken)})
    return pd.DataFrame(out, columns=cols)


def fix_paired(df: pd.DataFrame, fix: str) -> dict | None:
    """:func:`mclcbf_diag.measurements.stats.paired` of one counterfactual fix against the baseline, over the labelled
    questions it applies to, from each question's outcome under it (``fix:NAME``): unchanged keeps the baseline's
    answer, fixed or broken flips it, derailed or non-finite is no Yes/No answer. None without such questions."""
    from ..measurements import stats as S

    col = f"fix:{fix}"
    if col not in df or "label" not in df:
        return None
    g = df[df.label.isin(["yes", "no"]) & df[col].isin(["unchanged", "fixed", "broken", "derailed", "non_finite"])]
    if not len(g):
        return None
    flip = {"yes": "no", "no": "yes"}
    new = [flip.get(b, b) if o in ("fixed", "broken") else b for b, o in zip(g.baseline_answer, g[col])]
    valid = [o in ("unchanged", "fixed", "broken") for o in g[col]]
    base_valid = g.baseline_valid if "baseline_valid" in g else [True] * len(g)
    return S.paired(list(g.label), list(g.baseline_answer), list(base_valid), list(g.baseline_margin), new, valid)


def paired_sentence(row: dict, what: str = "the intervention") -> str:
    """The population answer's sentence on whether the change is real (one pooled row of :func:`paired_table`)."""
    from ..measurements import stats as S

    pts = lambda x: f"{100 * x:+.1f}"  # noqa: E731
    s = (f"Is it real: paired over the {row['n']} questions, {what} fixes {row['fixed_valid']} and breaks or derails "
         f"{row['broken_valid']} (exact McNemar p = {row['mcnemar_p']:.3g}); Δ accuracy {pts(row['d_accuracy'])} "
         f"points (95% paired bootstrap interval {pts(row['d_accuracy_lo'])} to {pts(row['d_accuracy_hi'])}, "
         f"{row['resamples']:,} resamples, seed {row['seed']}).")
    if row["bias_label"] == S.NO_CHANGE:
        return s + " It changes no answer: there is no shift to control for."
    return s + " " + S.control_sentence(row)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _causes_sentence(c: pd.DataFrame, label: str) -> str:
    """One sentence on the decisive causes of one group's answers (a slice of :func:`cause_table`)."""
    joint = c[c.cause.str.startswith("joint:")]
    named = c[(c.cause != NONE_DECISIVE) & ~c.cause.str.startswith("joint:")]
    none = c[c.cause == NONE_DECISIVE]["count"].sum()
    together = (f"; {joint['count'].sum()} by a joint cause, several causes that change it only when undone "
                "together (" + "; ".join(f"{r['count']} by {r.cause[len('joint:'):]}" for _, r in
                                         joint.head(3).iterrows()) + ")") if len(joint) else ""
    if len(named):
        listed = "; ".join(f"{r['count']} by {r.title or r.cause} ({r.cause})" for _, r in named.head(3).iterrows())
        return (f"Of the {label}, decided by one cause (its own counterfactual changes the result): {listed}"
                + together + (f"; {none} by no single decisive cause." if none else "."))
    if len(joint):
        return (f"Of the {label}, none is decided by a single cause{together}"
                + (f"; {none} by no decisive cause." if none else "."))
    return f"None of the {label} is decided by a single cause whose own counterfactual changes it."


def answer(df: pd.DataFrame, causes: pd.DataFrame, doses: pd.DataFrame, fixes: pd.DataFrame,
           settings: pd.DataFrame, k_max: float, what: str = "the intervention",
           paired: pd.DataFrame | None = None) -> str:
    """A few plain sentences, every number read off the tables.

    Args:
        df: the question frame (:func:`frame`).
        causes: :func:`cause_table` of ``df``.
        doses: :func:`dose_table` of ``df``.
        fixes: :func:`fix_table` of ``df``.
        settings: :func:`setting_table` of ``df`` (empty without a sweep).
        k_max: the dose-response's largest multiplier k.
        what: how the sentences name the intervention.
        paired: :func:`paired_table` of ``df``: whether the change is real, from its last (pooled) row; None: not
            said.

    Returns:
        The sentences, joined by spaces.
    """
    wrong, right = df[df.kind == "wrong"], df[df.kind == "right"]
    conf = fixes[fixes.fix == "(as configured)"].iloc[0] if len(fixes) else None
    parts = [f"{len(df)} questions: the model answers {len(right)} right and {len(wrong)} wrong."]
    if conf is not None:
        parts.append(f"Of the {_plural(len(wrong), 'wrong answer')}, {what} fixes {conf.wrong_fixed}"
                     + (f" and derails {conf.wrong_derailed}" if conf.wrong_derailed else "")
                     + f"; of the {_plural(len(right), 'right answer')} it breaks {conf.right_broken} and derails "
                     f"{conf.right_derailed}.")
    parts += [_causes_sentence(causes[causes.group == group], label) for group, label in
              (("wrong", "wrong answers"), ("right", "right answers")) if len(causes[causes.group == group])]
    for group, goal in (("wrong", "fixes"), ("right", "breaks or derails")):
        d = doses[doses.group == group]
        if not len(d) or not len(df[df.kind == group]):
            continue
        reached = int(d[~d.k_star.str.startswith("none")]["count"].sum())
        first = d[(~d.k_star.str.startswith("none")) & (d["count"] > 0)]
        where = f" (the smallest bracket: {first.iloc[0].k_star}, {first.iloc[0]['count']})" if len(first) else ""
        parts.append(f"A larger step (k × the intervention's change, k up to {k_max:g}) {goal} {reached} of the "
                     f"{group} answers{where}.")
    best = best_setting(settings)
    if best is not None:
        win = "all layers" if best["window"] == "all" else f"layers {best['window']}"
        parts.append(f"Setting the decision token's image mass to {best['value']:g} in {win} would fix "
                     f"{best['fixed']} and break {best['broken']} (derail {best['derailed']}; net {best['net']:+d}).")
    elif len(settings):
        parts.append("No decision-token image-mass setting of the graded sweep fixes a wrong answer.")
    only_after = wrong[(wrong.sweep_decision_changes == 0) & wrong.sweep_after_image_changes_it.astype(bool)]
    if len(settings) and len(wrong):
        # a wrong answer's valid change is its fix: no decision-token setting fixes these, some after-image one does
        parts.append(f"{len(only_after)} of the wrong answers are fixed only when every text token after the image "
                     "is steered, by no decision-token setting.")
    rest = fixes[fixes.fix != "(as configured)"]
    ran = rest[rest[[f"{g}_{o}" for g in GROUPS for o in OUTCOME_COLS]].sum(axis=1) > 0] if len(rest) else rest
    moved = ran[(ran.wrong_fixed + ran.right_broken + ran.wrong_derailed + ran.right_derailed) > 0] if len(ran) else ran
    if len(ran) and not len(moved):
        parts.append(f"None of the {len(ran)} counterfactual fixes that apply changes any answer.")
    elif len(moved):
        top = moved.sort_values("net", ascending=False, kind="stable").iloc[0]
        stat = fix_paired(df, top.fix)
        real = "" if stat is None else (
            f"; paired over the {stat['n']} labelled questions it applies to, Δ accuracy "
            f"{100 * stat['d_accuracy']:+.1f} points, 95% paired bootstrap interval {100 * stat['d_accuracy_lo']:+.1f} "
            f"to {100 * stat['d_accuracy_hi']:+.1f}, exact McNemar p = {stat['mcnemar_p']:.3g}")
        parts.append(f"Of the counterfactual fixes, the best is {top.fix}: it fixes {top.wrong_fixed}, breaks "
                     f"{top.right_broken} and derails {top.wrong_derailed + top.right_derailed} (net {top.net:+d}, "
                     f"{top.net_accuracy_points:+.2f} accuracy points{real}).")
    if paired is not None and len(paired):
        pooled = paired.iloc[-1].to_dict()  # "all" when several splits, else the one split
        parts.append(paired_sentence(pooled, what))
    return " ".join(parts)


__all__ = [
    "GROUPS",
    "NONE_DECISIVE",
    "answer",
    "best_setting",
    "cause_table",
    "dose_table",
    "fix_table",
    "frame",
    "mass_table",
    "paired_sentence",
    "paired_table",
    "setting_table",
]

"""POPE metrics, outcome tables and the run's output files.

Every question's outcome (:mod:`mclcbf_diag.outcomes`) is unchanged, fixed, broken or
derailed; flips.csv counts them per split beside the bare sign changes, and metrics.csv adds
``accuracy_valid`` (a right answer must also be a Yes/No output) and ``not_yes_no``.
"""

from __future__ import annotations

from pathlib import Path

from ..storage import atomic_write_text
from .store import _flat


def metrics_table(records: list[dict], splits: list[str]):
    """POPE metrics per split (and pooled "all" for several splits) and condition."""
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
    return pd.DataFrame(rows, columns=cols)


def _valid(r: dict, cond: str) -> bool:
    """Whether a row's answer in a condition is a Yes/No answer (rows of older runs: assumed so)."""
    if cond.endswith("_text"):
        return True  # the official parser maps every text to yes/no
    return bool(r.get(f"{cond}_valid", True))


def row_outcome(r: dict, source: str = "logit") -> str:
    """A row's outcome class (recomputed for rows written before outcomes existed)."""
    from ..outcomes import outcome

    if source == "text":
        return r.get("text_outcome") or outcome(r["baseline_text_answer"], True, r["steered_text_answer"], True,
                                                r["label"])
    if "outcome" in r:
        return r["outcome"]
    return outcome(r["baseline_answer"], True, r["steered_answer"], True, r["label"])


def flips_table(records: list[dict], splits: list[str]):
    """Baseline → steered per split: outcome counts (unchanged, fixed, broken, derailed) and the sign changes.

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
                         **{k: outs.count(k) for k in ("unchanged", "fixed", "broken", "derailed")},
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


def write_outputs(out: Path, records: list[dict], identity: dict) -> tuple:
    """metrics.csv, flips.csv and summary.html from the records; prints both tables."""
    import pandas as pd
    import plotly.express as px

    from ..report import Section, write_page

    splits = identity.get("splits", [])
    metrics, flips = metrics_table(records, splits), flips_table(records, splits)
    atomic_write_text(out / "metrics.csv", metrics.to_csv(index=False))
    atomic_write_text(out / "flips.csv", flips.to_csv(index=False))
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.float_format", "{:.4f}".format):
        print(metrics.drop(columns=["tp", "fp", "tn", "fn", "precision", "recall"]).to_string(index=False))
        print()
        print(flips.to_string(index=False))
    long = metrics.melt(id_vars=["split", "condition"], value_vars=["accuracy", "f1", "yes_ratio"], var_name="metric")
    fig_m = px.bar(long, x="split", y="value", color="condition", barmode="group", facet_col="metric",
                   title="POPE metrics by condition", range_y=[0, 1])
    counts = flips.melt(id_vars=["split", "answer"], value_vars=["fixed", "broken", "derailed"], var_name="outcome")
    fig_f = px.bar(counts, x="split", y="value", color="outcome", barmode="group", facet_col="answer",
                   title="Outcomes of steering (baseline → steered): fixed, broken, derailed")
    frame = pd.DataFrame(records)
    frame["margin_change"] = frame.steered_margin - frame.baseline_margin
    fig_d = px.histogram(frame, x="margin_change", color="split", barmode="overlay", nbins=60,
                         title="Δ margin (steered − baseline logit Yes − No)")
    info = pd.DataFrame({"setting": list(_flat(identity)), "value": [str(v) for v in _flat(identity).values()]})
    outs = [row_outcome(r) for r in records]
    n = {k: outs.count(k) for k in ("unchanged", "fixed", "broken", "derailed")}
    sections = [
        Section("Run", text=f"{len(frame)} questions: {n['unchanged']} unchanged, {n['fixed']} fixed (wrong → right), "
                f"{n['broken']} broken (right → wrong), {n['derailed']} derailed (no longer a Yes/No answer).",
                table=info),
        Section("Metrics", text="Answers are read from the first-token logits (margin > 0 → yes); accuracy_valid "
                "counts an answer right only when the top token is a Yes/No spelling (not_yes_no: how many are "
                "not); *_text conditions score the generated text with POPE's parser.", figures=[fig_m], table=metrics),
        Section("Outcomes", text="unchanged / fixed / broken / derailed per question; flipped and the *_to_* "
                "columns count bare sign changes of logit Yes − No, derailed outputs included.",
                figures=[fig_f], table=flips),
        Section("Margins", figures=[fig_d]),
    ]
    write_page(out / "summary.html", "mclcbf-diag pope", sections)
    return metrics, flips

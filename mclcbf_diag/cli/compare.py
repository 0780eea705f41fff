"""``mclcbf-diag compare RUN_DIR…``: finished POPE runs side by side, as a table (Markdown, CSV, a page)."""

from __future__ import annotations

from .common import out_dir, show, write_frame


def _layer_figure(layers):
    import plotly.express as px

    frame = layers.assign(condition=layers.intervention + " " + layers.settings + " · " + layers.split)
    fig = px.line(frame, x="layer", y="d_image_mass", color="condition", markers=True,
                  title="Δ image mass of the decision token per layer (intervened − baseline, mean over questions)")
    fig.add_hline(y=0, line_color="#999999", line_width=1)
    return fig.update_layout(xaxis={"dtick": 1}, yaxis_title="Δ head-mean image mass", height=460)


def stats_view(table):
    """The statistics for reading: one row per run and split, in the table's order (by the interval), in points."""
    import math

    import pandas as pd

    def pts(x):
        return "n/a" if math.isnan(x) else f"{100 * x:+.1f}"

    def span(r, name):
        return f"{pts(r[name])} [{pts(r[name + '_lo'])}, {pts(r[name + '_hi'])}]"

    rows = []
    for r in table.to_dict("records"):
        rows.append({"labels": r["label_set"], "rank": r["rank"], "rank change": r["rank_change"],
                     "intervention": r["intervention"], "settings": r["settings"],
                     "split": r["split"] + (f" (partial: {r['partial']})" if r["partial"] else ""),
                     "fixed/broken": f"{r['fixed']}/{r['broken']}+{r['derailed']} derailed",
                     "McNemar p": r["mcnemar_p"], "Holm p": r["mcnemar_p_holm"],
                     "Δ accuracy [95%]": span(r, "d_accuracy"), "Δ F1 [95%]": span(r, "d_f1"),
                     "Δ yes-ratio [95%]": span(r, "d_yes_ratio"),
                     "bias control accuracy": pts(r["control_accuracy"]).lstrip("+"),
                     "gain over control [95%]": span(r, "gain_over_control"),
                     "control also fixes": r["control_shares_fixes"], "bias label": r["bias_label"],
                     "best-offset accuracy (uses labels)": pts(r["best_offset_accuracy"]).lstrip("+")})
    view = pd.DataFrame(rows)
    if view["labels"].nunique() < 2:
        view = view.drop(columns=["labels", "rank change"])
    return view


def cmd_compare(args) -> int:
    from ..measurements import stats as S
    from ..pope.compare import compare_runs, findings, markdown_table
    from ..pope.summary import decoding_summary, summary_markdown

    labels = None
    if getattr(args, "labels", None):
        from ..data.labels import load_labels

        labels = load_labels(args.labels)
    if args.resamples is not None and args.resamples < 100:
        from ..errors import UserError

        raise UserError(f"--resamples {args.resamples} is fewer than 100; a 95% interval needs many (default "
                        f"{S.RESAMPLES})")
    table = compare_runs(args.runs, labels, resamples=args.resamples, seed=args.seed)
    print(markdown_table(table))
    said = findings(table)
    print("\n" + "\n".join(f"- {line}" for line in said))
    print(_stats_note(args))
    summary = decoding_summary(table)
    print(f"\n{SUMMARY} (compare_summary.md):\n" + summary_markdown(summary))
    if args.out:
        write_compare(args, table, said, summary)
    return 0


def _stats_note(args) -> str:
    from ..measurements import stats as S

    return STATS_NOTE.format(resamples=args.resamples or S.RESAMPLES, seed=S.SEED if args.seed is None else args.seed,
                             explained=S.EXPLAINED, best=S.BEST_OFFSET_NOTE)


def write_compare(args, table, said: list[str], summary) -> None:
    """compare.csv, compare_layers.csv, compare_findings.md, compare_summary.md and compare.html in ``--out``."""
    from ..pope.compare import layer_table
    from ..pope.summary import summary_markdown
    from ..report.html import Section, write_page
    from ..storage import atomic_write_text

    out = out_dir(args, args.out)
    layers = layer_table(table)
    write_frame(table, out / "compare.csv", "csv")
    atomic_write_text(out / "compare_findings.md", "".join(f"- {line}\n" for line in said))
    atomic_write_text(out / "compare_summary.md", summary_markdown(summary) + "\n")
    write_frame(layers, out / "compare_layers.csv", "csv")
    deltas = [c for c in table.columns if c.startswith("d_image_mass_L")]
    per_layer = [*deltas, *(c for c in table.columns if c.startswith("baseline_image_mass_L"))]
    wide = table[["intervention", "settings", "split", "edited_layers", *deltas]].rename(
        columns={c: f"L{c[14:]}" for c in deltas})
    partial = ("\n\nPartial merges (not every question answered): "
               + "; ".join(sorted({f"{r.run}: {r.partial}" for r in table.itertuples() if r.partial}))
               if table.partial.astype(bool).any() else "")
    sections = [
        Section("What each run did", text="\n".join(f"- {line}" for line in said)),
        Section("Is the difference real?", text=_stats_note(args), table=stats_view(table)),
        Section("Greedy beside sampled", text=SUMMARY + ".", table=summary.round(2)),
        Section("Interventions on POPE, side by side", text=SIDE_BY_SIDE + "\n\n" + _stats_note(args) + partial,
                table=table.drop(columns=["run", *per_layer]).round(4))]
    if len(layers):
        sections.append(Section("Δ image mass per layer",
                                text="Intervened minus baseline at the decision token, per language layer"
                                "  (compare_layers.csv: one row per layer, with the baseline's mass).",
                                figures=[_layer_figure(layers)], table=wide.round(4)))
    page = write_page(out / "compare.html", "mclcbf-diag compare", sections)
    print(f"wrote {show(page)}, {show(out / 'compare.csv')}, {show(out / 'compare_layers.csv')}, "
          f"{show(out / 'compare_findings.md')} and {show(out / 'compare_summary.md')}")


SUMMARY = ("Each setting's greedy run beside its runs of another decoding: their accuracy and Δ accuracy as mean ± "
           "standard deviation over the seeds, fixed/broken per seed, and how many seeds gain, lose (interval beside 0 "
           "and McNemar p below 0.05 after Holm) or are explained by a yes/no shift")

SIDE_BY_SIDE = (
    "Outcomes per question: unchanged, fixed (wrong → right), broken (right → wrong), derailed (no longer a Yes/No "
    "answer), non_finite (the intervention's step overflowed and was not applied). d_image_mass_*: the decision "
    "token's head-mean attention mass on the image, intervened minus baseline, mean over the split's questions "
    "(edited: mean over the layers the intervention acts on; max: the layer of the largest |Δ|). "
    "seconds_per_question: the run's answering time per question; cost_vs_bare: its ratio to the bare forward's "
    "(the inputs plus the baseline's plain forward, timed in the same batches). The last column is what each paper "
    "reports on the real LLaVA-1.5-7B, not measured here.")


STATS_NOTE = ("Is the difference real: each run against its own baseline, question by question. Rows are sorted per "
              "split by the lower end of the 95% interval of Δ accuracy (then its upper end), not by the point "
              "estimate (rank). Δ accuracy, Δ F1, Δ yes-ratio: a paired bootstrap ({resamples:,} resamples, seed "
              "{seed}), in points. McNemar: the exact two-sided binomial test on fixed vs broken answers (a derailed "
              "answer counts as wrong); in brackets Holm's adjustment over the rows of the same split (every run, "
              "and every prompt control's pairing). "
              "Bias control: the constant offset on the baseline's Yes − No margin that gives the intervention's "
              "yes-ratio; a run whose gain over it has an interval reaching 0 or below is '{explained}'. "
              "best_offset_accuracy {best}.")


def add_parser(sub) -> None:
    p = sub.add_parser("compare", help="finished `pope` runs side by side: accuracy, F1, outcome counts, "
                                       "Δ image mass, cost")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="folders of finished `mclcbf-diag pope` runs")
    p.add_argument("--out", default=None, help="also write compare.csv, compare_layers.csv and compare.html here")
    p.add_argument("--labels", default=None, metavar="FILE",
                   help="also re-score every run under a relabelled file (JSON or CSV of question_id → label, "
                        "optionally per split) and show the rank changes")
    p.add_argument("--resamples", type=int, default=None,
                   help="paired bootstrap resamples (default 10000)")
    p.add_argument("--seed", type=int, default=None, help="the bootstrap's seed (default 0)")
    p.set_defaults(func=cmd_compare)

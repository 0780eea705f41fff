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


def cmd_compare(args) -> int:
    from ..pope.compare import compare_runs, layer_table, markdown_table
    from ..report import Section, write_page

    table = compare_runs(args.runs)
    text = markdown_table(table)
    print(text)
    if args.out:
        out = out_dir(args, args.out)
        layers = layer_table(table)
        write_frame(table, out / "compare.csv", "csv")
        write_frame(layers, out / "compare_layers.csv", "csv")
        deltas = [c for c in table.columns if c.startswith("d_image_mass_L")]
        per_layer = [*deltas, *(c for c in table.columns if c.startswith("baseline_image_mass_L"))]
        wide = table[["intervention", "settings", "split", "edited_layers", *deltas]].rename(
            columns={c: f"L{c[14:]}" for c in deltas})
        sections = [
            Section("Interventions on POPE, side by side", text="Outcomes per question: unchanged, fixed "
                    "(wrong → right), broken (right → wrong), derailed (no longer a Yes/No answer), non_finite (the "
                    "intervention's step overflowed and was not applied). "
                    "d_image_mass_*: the decision token's head-mean attention mass on the image, intervened minus "
                    "baseline, mean over the split's questions (edited: mean over the layers the intervention acts "
                    "on; max: the layer of the largest |Δ|). seconds_per_question: the run's answering time per "
                    "question; cost_vs_bare: its ratio to the bare forward's (the inputs plus the baseline's plain "
                    "forward, timed in the same batches). The last column is what each paper reports on the real "
                    "LLaVA-1.5-7B, not measured here.",
                    table=table.drop(columns=["run", *per_layer]).round(4))]
        if len(layers):
            sections.append(Section("Δ image mass per layer", text="Intervened minus baseline at the decision token, "
                                    "per language layer (compare_layers.csv: one row per layer, with the baseline's mass).",
                                    figures=[_layer_figure(layers)], table=wide.round(4)))
        page = write_page(out / "compare.html", "mclcbf-diag compare", sections)
        print(f"wrote {show(page)}, {show(out / 'compare.csv')} and {show(out / 'compare_layers.csv')}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("compare", help="finished `pope` runs side by side: accuracy, F1, outcome counts, "
                                       "Δ image mass, cost")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="folders of finished `mclcbf-diag pope` runs")
    p.add_argument("--out", default=None, help="also write compare.csv, compare_layers.csv and compare.html here")
    p.set_defaults(func=cmd_compare)

"""``mclcbf-diag compare RUN_DIR…``: finished POPE runs side by side, as a table (Markdown, CSV, a page)."""

from __future__ import annotations

from .common import out_dir, show, write_frame


def cmd_compare(args) -> int:
    from ..pope.compare import compare_runs, markdown_table
    from ..report import Section, write_page

    table = compare_runs(args.runs)
    text = markdown_table(table)
    print(text)
    if args.out:
        out = out_dir(args, args.out)
        write_frame(table, out / "compare.csv", "csv")
        page = write_page(out / "compare.html", "mclcbf-diag compare", [
            Section("Interventions on POPE, side by side", text="Outcomes per question: unchanged, fixed "
                    "(wrong → right), broken (right → wrong), derailed (no longer a Yes/No answer). The last "
                    "column is what each paper reports on the real LLaVA-1.5-7B, not measured here.",
                    table=table.drop(columns=["run"]).round(4))])
        print(f"wrote {show(page)} and {show(out / 'compare.csv')}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("compare", help="finished `pope` runs side by side: accuracy, F1, outcome counts")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="folders of finished `mclcbf-diag pope` runs")
    p.add_argument("--out", default=None, help="also write compare.csv and compare.html here")
    p.set_defaults(func=cmd_compare)

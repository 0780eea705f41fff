"""``mclcbf-diag flow``: the information-flow map of one question (which edges carry the image, where)."""

from __future__ import annotations

from ..errors import UserError
from .common import (
    force_option,
    local_depth,
    model_options,
    sample_job,
    sample_options,
    show,
    write_frame,
    writing,
)

FLOW_COLUMNS = {"edge": "blocked edge", "first_layer": "first layer", "last_layer": "last layer",
                "answer": "answer", "p_base": "p(answer), nothing blocked", "p_blocked": "p(answer), edge blocked",
                "change": "change of p(answer) (%)"}


def _check_window(window: int | None, n_layers: int | None) -> None:
    if window is not None and window < 1:
        raise UserError(f"--window {window}: give a positive number of layers (e.g. --window 2)")
    if window is not None and n_layers is not None and window > n_layers:
        raise UserError(f"--window {window} is deeper than the model ({n_layers} layers); give at most {n_layers}")


def cmd_flow(args) -> int:
    _check_window(args.window, local_depth(args.model))  # before anything heavy loads
    _, question, image, lm = sample_job(args, "reports")
    from ..experiments.flow import flow_summary, information_flow
    from ..report.html import Section, write_page
    from ..report.plots import flow_figure
    from ..storage import safe_name

    _check_window(args.window, lm.n_layers)
    flow = information_flow(lm, question, image, window=args.window, template=args.prompt)
    lines = flow_summary(flow)
    print(f"question_id {question.question_id}: {question.text} (label: {question.label}); "
          f"answer {flow.answer.iloc[0]} with p = {flow.p_base.iloc[0]:.4f}")
    for line in lines:
        print("  " + line)
    stem = f"flow-{safe_name(question.question_id)}"
    with writing(args, "reports") as out:
        write_frame(flow, out / f"{stem}.csv", "csv")
        page = write_page(out / f"{stem}.html", f"mclcbf-diag flow: {question.text}", [
            Section("Where the image reaches the answer", lines=lines, figures=[flow_figure(flow)],
                    table=flow.assign(change=100 * flow.change).rename(columns=FLOW_COLUMNS),
                    table_note="Rounded for reading; the CSV file next to this page has full precision.")])
    print(f"wrote {show(page)} and {show(out / (stem + '.csv'))}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("flow", help="information-flow map: block image→question, image→last, question→last "
                                    "in sliding layer windows")
    sample_options(p)
    model_options(p)
    p.add_argument("--window", type=int, default=None,
                   help="layers per blocked window (default: 9 of 32, mapped to the model's depth)")
    p.add_argument("--out", default=None, help="output folder (default reports/)")
    force_option(p)
    p.set_defaults(func=cmd_flow, intervention="mclcbf", preset=None, overrides=[])

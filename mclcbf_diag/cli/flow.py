"""``mclcbf-diag flow``: the information-flow map of one question (which edges carry the image, where)."""

from __future__ import annotations

from ..errors import UserError
from .common import (
    model_options,
    out_dir,
    sample_job,
    sample_options,
    show,
    write_frame,
)


def cmd_flow(args) -> int:
    from ..flow import flow_summary, information_flow
    from ..plots import flow_figure
    from ..report import Section, write_page
    from ..storage import safe_name

    if args.window is not None and args.window < 1:
        raise UserError(f"--window {args.window}: give a positive number of layers (e.g. --window 2)")
    _, question, image, lm = sample_job(args, "reports")
    if args.window is not None and args.window > lm.n_layers:
        raise UserError(f"--window {args.window} is deeper than the model ({lm.n_layers} layers); give at most "
                        f"{lm.n_layers}")
    flow = information_flow(lm, question, image, window=args.window, template=args.prompt)
    lines = flow_summary(flow)
    print(f"question_id {question.question_id}: {question.text} (label: {question.label}); "
          f"answer {flow.answer.iloc[0]} with p = {flow.p_base.iloc[0]:.4f}")
    for line in lines:
        print("  " + line)
    stem = f"flow-{safe_name(question.question_id)}"
    out = out_dir(args, "reports")
    write_frame(flow, out / f"{stem}.csv", "csv")
    page = write_page(out / f"{stem}.html", f"mclcbf-diag flow: {question.text}", [
        Section("Where the image reaches the answer", text="\n".join(lines),
                figures=[flow_figure(flow)], table=flow.round(5))])
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
    p.set_defaults(func=cmd_flow, intervention="mclcbf", preset=None, overrides=[])

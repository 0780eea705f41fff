"""``mclcbf-diag trace``: one sample, baseline vs intervened, every probe per layer and head."""

from __future__ import annotations

import json

from .. import knobs as K
from ..errors import UserError
from .common import (
    intervention_options,
    max_new_tokens_limit,
    model_options,
    out_dir,
    print_summary,
    sample_job,
    sample_options,
    show,
    summary_table,
    write_frame,
)


def cmd_trace(args) -> int:
    from ..storage import atomic_write_text, safe_name

    if args.max_new_tokens < 0:
        raise UserError(f"--max-new-tokens {args.max_new_tokens}: give 0 (prefill only) or a positive count")
    cap = max_new_tokens_limit()
    if args.max_new_tokens > cap:
        raise UserError(f"--max-new-tokens {args.max_new_tokens} is more than the limit of {cap}; pass a smaller "
                        "number, or raise the limit with MCLCBF_DIAG_MAX_NEW_TOKENS=N")
    config, question, image, lm = sample_job(args, "reports/trace-{question_id}", args.max_new_tokens)
    from ..plots import trace_figures
    from ..report import Section, write_page
    from ..trace import decoded, trace_sample

    default_out = f"reports/trace-{safe_name(question.question_id)}"
    result = trace_sample(lm, question, image, config, max_new_tokens=args.max_new_tokens, template=args.prompt)
    summary = result.summary()
    summary["text_before"] = decoded(lm, result.baseline)
    summary["text_after"] = decoded(lm, result.steered)
    meta = {"model": lm.source, "dtype": args.dtype, "device": args.device, "intervention": args.intervention, "preset": args.preset,
            "overrides": args.overrides, "config": K.to_dict(config.knobs), "prompt": result.prompt,
            "question": {"question_id": question.question_id, "image": question.image, "text": question.text,
                         "label": question.label},
            "summary": summary}
    sections = [Section("Summary", table=summary_table(summary))]
    for phase, step in sorted({(p, s) for p, s in result.records[["phase", "step"]].itertuples(index=False)},
                              key=lambda t: t[1]):
        figs = trace_figures(result.records, phase=phase, step=step)
        sections.append(Section(f"{phase} step {step}", figures=list(figs.values())))
    # Everything is computed: only now create the folder and write.
    out = out_dir(args, default_out)
    write_frame(result.records, out / "records.parquet", "parquet")
    write_frame(result.records, out / "records.csv", "csv")
    atomic_write_text(out / "config.json", json.dumps(meta, indent=2, default=str))
    write_page(out / "trace.html", f"mclcbf-diag trace: {question.text}", sections)
    print_summary(summary)
    print(f"wrote {show(out)}/records.parquet, records.csv, config.json, trace.html")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("trace", help="one sample, baseline vs steered, every probe per layer/head")
    sample_options(p)
    model_options(p)
    intervention_options(p)
    p.add_argument("--max-new-tokens", type=int, default=0,
                   help="also generate N tokens and record the decode phase (default 0: prefill only)")
    p.add_argument("--out", default=None, help="output folder (default reports/trace-<question_id>)")
    p.set_defaults(func=cmd_trace)

"""``mclcbf-diag explain``: ranked causes, dose-response, counterfactual fixes and knockouts for one sample."""

from __future__ import annotations

from ..errors import UserError
from .common import (
    force_option,
    intervention_options,
    model_options,
    sample_job,
    sample_options,
    show,
    write_frame,
    writing,
)
from .trace import overlay_section, print_outcome_summary


def cmd_explain(args) -> int:
    if getattr(args, "sample", None) is None and getattr(args, "question_id", None) is None:  # a whole split
        from .population import cmd_population

        return cmd_population(args)
    from .population import check_single

    check_single(args)
    from ..storage import safe_name

    if not 1 <= args.k_max <= 1e12:
        raise UserError(f"--k-max {args.k_max}: the dose-response starts at k = 1; give a value >= 1 "
                        "(and at most 1e12)")
    config, question, image, lm = sample_job(args, "reports")
    from ..diagnosis.diagnose import causes_frame, verdict_text
    from ..experiments.explain import explain_sample
    from ..report.html import write_page

    ex = explain_sample(lm, question, image, config, k_max=args.k_max, per_layer=args.per_layer,
                        template=args.prompt)
    summary = ex.trace.summary()
    text = verdict_text(ex.causes)
    print_outcome_summary(summary, ex.trace.intervention)
    print()
    print(text)
    print()
    if ex.sweep_text:
        print(ex.sweep_text)
    print(ex.dose.sentence())
    fx = ex.fixes
    kind = ex.dose.kind
    if kind == "right":
        hurt = fx[fx.outcome.isin(["broken", "derailed"]) & (fx.applicable == "yes")] if len(fx) else fx
        print("fixes: the answer is right, so nothing counts as a fix; "
              + (f"these would break or derail it: {', '.join(f'{r.fix} ({r.outcome})' for r in hurt.itertuples())}"
                 if len(hurt) else "none of them breaks or derails it"))
    else:
        good = fx[fx["counts"] == True] if len(fx) else fx  # noqa: E712
        na = fx[fx.applicable.astype(str).str.startswith("not applicable")] if len(fx) else fx
        print("fixes that fix the answer (valid Yes/No output): " + (", ".join(good.fix) if len(good) else "none")
              + (f"; not applicable: {', '.join(na.fix)}" if len(na) else ""))
    print("cause chain: " + " → ".join(
        (f"{r.outcome}" if r.outcome in ("fixed", "changed") and r.link > 0 else r.top_cause
         + (f" [fix {r.next_fix}]" if r.next_fix not in ("(none left)", "(none)") else ""))
        for r in ex.chain.itertuples()))
    stem = f"explain-{safe_name(question.question_id)}"
    from ..report.pages import explain_sections, trace_plot_sections

    sections = [*explain_sections(ex, text, causes_frame(ex.causes), overlay_section(lm, ex.trace, image, args.prompt)),
                *trace_plot_sections(lm, ex)]
    # Everything is computed: only now create the folder and write.
    with writing(args, "reports") as out:
        write_frame(ex.records, out / f"{stem}.parquet", "parquet")
        page = write_page(out / f"{stem}.html", f"mclcbf-diag explain: {question.text}", sections)
    print(f"wrote {show(page)} and {show(out / (stem + '.parquet'))}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("explain", help="ranked causes, dose-response and counterfactual fixes for one sample, or "
                                       "counted over a whole split (without --sample/--question-id)")
    sample_options(p, whole_split=True)
    model_options(p)
    intervention_options(p)
    p.add_argument("--k-max", type=float, default=1024.0, help="largest multiplier on θ* in the dose-response")
    p.add_argument("--per-layer", action="store_true", help="also a dose-response for each steered layer alone")
    p.add_argument("--out", default=None, help="output folder for the HTML report (default reports/; for a whole "
                                               "split reports/explain-SPLIT, rerun to resume)")
    force_option(p)
    from .population import add_options

    add_options(p)
    p.set_defaults(func=cmd_explain)

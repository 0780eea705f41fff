"""``mclcbf-diag explain``: ranked causes, dose-response, counterfactual fixes and knockouts for one sample."""

from __future__ import annotations

from ..errors import UserError
from .common import (
    intervention_options,
    model_options,
    out_dir,
    sample_job,
    sample_options,
    show,
    summary_table,
    write_frame,
)
from .trace import overlay_section, print_outcome_summary


def cmd_explain(args) -> int:
    from ..storage import safe_name

    if not 1 <= args.k_max <= 1e12:
        raise UserError(f"--k-max {args.k_max}: the dose-response starts at k = 1; give a value >= 1 (and at most 1e12)")
    config, question, image, lm = sample_job(args, "reports")
    from ..diagnose import causes_frame, verdict
    from ..explain import explain_sample
    from ..plots import dose_response_figure, trace_figures
    from ..report import Section, write_page

    ex = explain_sample(lm, question, image, config, k_max=args.k_max, per_layer=args.per_layer,
                        template=args.prompt)
    summary = ex.trace.summary()
    text = verdict(ex.causes)
    print_outcome_summary(summary)
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
    sections = [
        Section("Verdict", text=text, table=causes_frame(ex.causes)),
        overlay_section(lm, ex.trace, image, args.prompt),
        Section("Summary", table=summary_table(summary)),
        *([Section("Graded image-mass sweep", text=ex.sweep_text, table=ex.sweep)] if ex.sweep is not None else []),
        Section("Dose-response", text=ex.dose.sentence(), figures=[dose_response_figure(ex.dose.curve)],
                table=ex.dose.curve),
        *([Section("Dose-response per layer", text="Each steered layer alone: the smallest multiplier "
                   "on its step that reaches the goal the label sets (empty: none up to --k-max).", table=ex.layer_doses)]
          if ex.layer_doses is not None else []),
        Section("Counterfactual fixes", text="Each fix alone and all together: outcome against the baseline, and "
                "against the intervention as configured (vs_unfixed); only a wrong answer fixed with a valid Yes/No "
                "output counts.", table=ex.fixes),
        Section("Cause chain", table=ex.chain),
        Section("Attention knockouts (prefill)", table=_knockout_table(ex)),
    ]
    figs = trace_figures(ex.trace.records)
    sections.append(Section("Trace plots", figures=list(figs.values())))
    # Everything is computed: only now create the folder and write.
    out = out_dir(args, "reports")
    write_frame(ex.records, out / f"{stem}.parquet", "parquet")
    page = write_page(out / f"{stem}.html", f"mclcbf-diag explain: {question.text}", sections)
    print(f"wrote {show(page)} and {show(out / (stem + '.parquet'))}")
    return 0


def _knockout_table(ex):
    r = ex.records
    r = r[(r.layer == -1) & (r.metric.isin(["final_margin", "answer_yes", "p_yes", "p_no", "top_is_yes_no"]))
          & (r.phase == "prefill")]
    return r.pivot_table(index="condition", columns="metric", values="value").reset_index()


def add_parser(sub) -> None:
    p = sub.add_parser("explain", help="ranked causes, dose-response and counterfactual fixes for one sample")
    sample_options(p)
    model_options(p)
    intervention_options(p)
    p.add_argument("--k-max", type=float, default=1024.0, help="largest multiplier on θ* in the dose-response")
    p.add_argument("--per-layer", action="store_true", help="also a dose-response for each steered layer alone")
    p.add_argument("--out", default=None, help="output folder for the HTML report (default reports/)")
    p.set_defaults(func=cmd_explain)

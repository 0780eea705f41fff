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
    if summary["text_before"] is not None:
        from ..data import parse_answer

        summary["text_answer_before"] = parse_answer(summary["text_before"])
        summary["text_answer_after"] = parse_answer(summary["text_after"])
    meta = {"model": lm.source, "dtype": args.dtype, "device": args.device, "intervention": args.intervention, "preset": args.preset,
            "overrides": args.overrides, "config": K.to_dict(config.knobs), "prompt": result.prompt,
            "question": {"question_id": question.question_id, "image": question.image, "text": question.text,
                         "label": question.label},
            "summary": summary}
    sections = [overlay_section(lm, result, image, args.prompt), Section("Summary", table=summary_table(summary))]
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
    print_outcome_summary(summary)
    print(f"wrote {show(out)}/records.parquet, records.csv, config.json, trace.html")
    return 0


def overlay_section(lm, result, image, template):
    """The first screen: the image as the model saw it, with the decision token's attention over it."""
    from ..overlay import attention_maps, seen_image
    from ..plots import image_attention_figure
    from ..report import Section
    from ..trace import sample_inputs

    _, inputs = sample_inputs(lm, result.question.text if result.question else result.prompt, image, template)
    ip = lm.processor.image_processor
    picture = seen_image(inputs["pixel_values"], ip.image_mean, ip.image_std)
    layers = tuple(result.intervention.layers(lm.n_layers))
    base = attention_maps(result.baseline, result.baseline.detected, steered=layers)
    new = attention_maps(result.steered, result.steered.detected, steered=layers)
    s = result.summary()
    text = (f"Outcome: {s['outcome']}. Answer {s['answer_before']} → {s['answer_after']} (margin "
            f"{s['margin_before']:+.3f} → {s['margin_after']:+.3f}). The heatmaps show, on each image patch, the "
            f"attention of the decision token (the last prompt token), averaged over heads; the slider picks a layer, "
            f"the intervention's layers {list(layers)} together, or all layers.")
    return Section("Where the decision token looks", text=text, figures=[image_attention_figure(picture, base, new)])


def print_outcome_summary(s: dict) -> None:
    """The summary a user reads first: the outcome (not a sign flip), Yes/No masses and top tokens."""
    where = f"sample {s['index']} (question_id {s['sample']})" if "index" in s else f"sample {s['sample']}"
    label = s.get("label")
    print(f"{where}: {s.get('question', '')} (label: {label if label else 'none'})")
    out = s["outcome"]
    note = {"derailed": "no longer a Yes/No answer" + (" (non-finite values)" if s.get("nonfinite_values") else ""),
            "fixed": "wrong → right", "broken": "right → wrong", "changed": "no label: the answer changed",
            "unchanged": "same answer"}.get(out, "")
    print(f"  outcome  {out.upper()} ({note})")
    print(f"  answer   baseline {s['answer_before']:>3}   steered {s['answer_after']:>3}   (sign of logit Yes − No)")
    print(f"  margin   baseline {s['margin_before']:+.4f}   steered {s['margin_after']:+.4f}")
    print(f"  P(Yes)+P(No) baseline {s['p_yes_before'] + s['p_no_before']:.3f}   steered "
          f"{s['p_yes_after'] + s['p_no_after']:.3f}   top token baseline {s['top_before']!r}   steered "
          f"{s['top_after']!r}")
    print(f"  h        baseline {s['h_before_mean']:.4f}   steered {s['h_after_mean']:.4f}"
          f"   (mean over steered layers {s['layers_steered']}; fired at {s['layers_fired']})")
    rel = s["max_theta_rel"]
    print(f"  largest ‖θ*‖/‖x‖ {rel:.3g}" if rel == rel else "  largest ‖θ*‖/‖x‖ n/a (no residual step at this site)")
    if s.get("text_before") is not None:
        print(f"  text     baseline {s['text_before']!r} (parsed: {s.get('text_answer_before')})   steered "
              f"{s['text_after']!r} (parsed: {s.get('text_answer_after')})")


def add_parser(sub) -> None:
    p = sub.add_parser("trace", help="one sample, baseline vs steered, every probe per layer/head")
    sample_options(p)
    model_options(p)
    intervention_options(p)
    p.add_argument("--max-new-tokens", type=int, default=0,
                   help="also generate N tokens and record the decode phase (default 0: prefill only)")
    p.add_argument("--out", default=None, help="output folder (default reports/trace-<question_id>)")
    p.set_defaults(func=cmd_trace)

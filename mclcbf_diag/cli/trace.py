"""``mclcbf-diag trace``: one sample, baseline vs intervened, every probe per layer and head."""

from __future__ import annotations

import json

from .. import knobs as K
from ..errors import UserError
from .common import (
    force_option,
    intervention_options,
    max_new_tokens_limit,
    model_options,
    sample_job,
    sample_options,
    show,
    write_frame,
    writing,
)


def cmd_trace(args) -> int:
    from ..storage import atomic_write_text, safe_name

    if args.max_new_tokens < 0:
        raise UserError(f"--max-new-tokens {args.max_new_tokens}: give 0 (prefill only) or a positive count")
    cap = max_new_tokens_limit()
    if args.max_new_tokens > cap:
        raise UserError(f"--max-new-tokens {args.max_new_tokens} is more than the limit of {cap}; pass a smaller "
                        "number, or raise the limit with MCLCBF_DIAG_MAX_NEW_TOKENS=N")
    check_generation(args)
    overlay_tokens = check_overlay_tokens(args)
    config, question, image, lm = sample_job(args, "reports/trace-{question_id}", args.max_new_tokens)
    from ..experiments.trace import decoded, trace_sample
    from ..report.html import write_page
    from ..report.pages import trace_sections

    default_out = f"reports/trace-{safe_name(question.question_id)}"
    result = trace_sample(lm, question, image, config, max_new_tokens=args.max_new_tokens, template=args.prompt)
    summary = result.summary()
    summary["text_before"] = decoded(lm, result.baseline)
    summary["text_after"] = decoded(lm, result.steered)
    if summary["text_before"] is not None:
        from ..data import parse_answer

        summary["text_answer_before"] = parse_answer(summary["text_before"])
        summary["text_answer_after"] = parse_answer(summary["text_after"])
    meta = {"model": lm.source, "dtype": args.dtype, "device": args.device, "intervention": args.intervention,
            "preset": args.preset,
            "overrides": args.overrides, "config": K.to_dict(config.knobs), "prompt": result.prompt,
            "question": {"question_id": question.question_id, "image": question.image, "text": question.text,
                         "label": question.label},
            "summary": summary}
    sections = trace_sections(lm, result, image, args.prompt, overlay_tokens)
    # Everything is computed: only now create the folder and write.
    with writing(args, default_out) as out:
        write_frame(result.records, out / "records.parquet", "parquet")
        write_frame(result.records, out / "records.csv", "csv")
        atomic_write_text(out / "config.json", json.dumps(meta, indent=2, default=str))
        write_page(out / "trace.html", f"mclcbf-diag trace: {question.text}", sections)
    print_outcome_summary(summary, result.intervention)
    print(f"wrote {show(out)}/records.parquet, records.csv, config.json, trace.html")
    return 0


def check_generation(args) -> None:
    """A UserError, before torch loads, for generated tokens trace cannot record: OPERA generates by its beam search
    (``pope --decoding beam``), which is not a step-by-step loop of one sequence. Every other decoding-level method
    generates through :mod:`mclcbf_diag.engine.decode`'s loop (see :func:`~mclcbf_diag.experiments.trace.trace_sample`).
    """
    if args.max_new_tokens and getattr(args, "intervention", None) == "opera":
        raise UserError(f"--intervention opera --max-new-tokens {args.max_new_tokens}: OPERA generates by its beam "
                        "search, which trace does not record; drop --max-new-tokens (its first-token penalty), or "
                        "generate with: mclcbf-diag pope --intervention opera --decoding beam --num-beams 5 "
                        "--generate N")


def check_overlay_tokens(args) -> list:
    """``--overlay-token`` choices, checked before anything is loaded; then against the tokenized prompt.

    The second check needs only the processor (no weights): a position outside the prompt or
    before the image, or a text no token after the image has, is refused before the model loads.
    """
    if not args.overlay_token:
        return []
    from ..report.overlay import parse_token  # imports torch: only when a token was chosen

    choices = [parse_token(t) for t in args.overlay_token]
    from ..data import build_prompt, load_image, resolve_image
    from ..models.processing import run_processor
    from ..report.overlay import resolve_token
    from .common import check_prompt, prepare_from_args, question_from_args

    check_prompt(args)
    question, image_dir = question_from_args(args)
    prep = prepare_from_args(args)
    enc = run_processor(prep.processor, show(prep.where), build_prompt(question.text, args.prompt),
                        load_image(resolve_image(question, image_dir)), return_tensors="pt")
    ids = enc["input_ids"][0]
    tokens = [prep.processor.tokenizer.decode([int(i)]) for i in ids]
    for c in choices:
        resolve_token(c, tokens, ids == prep.tokens.image_token_id)
    return choices


def overlay_section(lm, result, image, template, tokens=()):
    """The first screen: the image as the model saw it, with the decision token's attention over it."""
    from ..report.pages import overlay_section as build

    return build(lm, result, image, template, tokens)


def print_outcome_summary(s: dict, intervention=None) -> None:
    """The summary a user reads first: the outcome (not a sign flip), Yes/No masses and top tokens, then the
    intervention's own lines (:meth:`~mclcbf_diag.interventions.base.Intervention.summary_lines`)."""
    where = (f"sample {s['index']} (question_id {s['question_id']})" if "index" in s
             else f"question_id {s['question_id']}")
    label = s.get("label")
    print(f"{where}: {s.get('question', '')} (label: {label if label else 'none'})")
    out = s["outcome"]
    note = {"derailed": "no longer a Yes/No answer" + (" (non-finite values)" if s.get("nonfinite_values") else ""),
            "fixed": "wrong → right", "broken": "right → wrong", "changed": "no label: the answer changed",
            "unchanged": "same answer",
            "non_finite": f"the intervention's edit was non-finite and not applied at layers "
                          f"{s.get('layers_dropped')}: this run is not the configured intervention"}.get(out, "")
    print(f"  outcome  {out.upper()} ({note})")
    print(f"  answer   baseline {s['answer_before']:>3}   steered {s['answer_after']:>3}   (sign of logit Yes − No)")
    print(f"  margin   baseline {s['margin_before']:+.4f}   steered {s['margin_after']:+.4f}")
    print(f"  P(Yes)+P(No) baseline {s['p_yes_before'] + s['p_no_before']:.3f}   steered "
          f"{s['p_yes_after'] + s['p_no_after']:.3f}   top token baseline {s['top_before']!r}   steered "
          f"{s['top_after']!r}")
    for line in intervention.summary_lines(s) if intervention is not None else []:
        print(line)
    from ..measurements.noise import show as shown  # "below noise" under a figure's floor

    prop, floor = s.get("propagation_final"), s.get("propagation_floor")
    if prop is not None and prop == prop:
        print(f"  propagation after the final norm {shown(prop, floor, '.3g')}"
              + (f"   (noise floor {floor:.2g})" if floor is not None and floor == floor else ""))
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
    p.add_argument("--overlay-token", action="append", default=[], metavar="INDEX_OR_TEXT",
                   help="also draw this prompt token's attention over the image: a position (negative from the "
                        "end; -1 is the decision token) or the token's text, after the image (repeatable)")
    p.add_argument("--out", default=None, help="output folder (default reports/trace-<question_id>)")
    force_option(p)
    p.set_defaults(func=cmd_trace)

"""The ``mclcbf-diag`` command line.

Subcommands: ``trace`` (one sample, baseline vs steered, every probe), ``zoo`` (train,
evaluate and regenerate the embedded model and its POPE set). Every user mistake is a
:class:`~mclcbf_diag.errors.UserError`: one line on stderr, exit status 2, and a
traceback only with ``--debug``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import UserError

EMBEDDED_POPE = Path(__file__).resolve().parent / "zoo" / "pope"


# ----------------------------------------------------------------------------- shared options
def _model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help="local checkpoint directory or cached hub id (default: the embedded model)")
    g.add_argument("--dtype", default="float32", help="float32 | float16 | bfloat16 (default float32)")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 … (default cpu)")
    g.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 for the embedded model, torch's default otherwise)")


def _sample_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sample")
    g.add_argument("--split", default="adversarial", choices=["random", "popular", "adversarial"],
                   help="POPE split of the embedded question set (default adversarial)")
    g.add_argument("--pope-file", default=None, help="a POPE question file (JSON Lines or JSON array)")
    g.add_argument("--image-dir", default=None, help="folder holding the images the POPE file names")
    _prompt_option(g)
    which = g.add_mutually_exclusive_group()
    which.add_argument("--sample", type=int, default=None, help="0-based index into the question file")
    which.add_argument("--question-id", default=None, help="select by POPE question_id")


def _prompt_option(g) -> None:
    from .data import LLAVA_PROMPT

    g.add_argument("--prompt", default=LLAVA_PROMPT, metavar="TEMPLATE",
                   help="prompt around the question, with <image> and {question} "
                        "(default: llava-hf's 'USER: <image>\\n{question}\\nASSISTANT:')")


def _check_prompt(args) -> None:
    from .data import build_prompt

    build_prompt("question", args.prompt)  # raises a UserError naming what is missing


def _barrier_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("intervention")
    g.add_argument("--preset", default="seed-exp6", help="seed-exp6 (the original) | fixed (default seed-exp6)")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KNOB=VALUE",
                   help="override a knob, e.g. --set span=detected --set tau=0.5 (repeatable)")


def _load(args):
    import torch

    from .models import load_model

    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads {args.threads}: give a positive number of CPU threads (e.g. --threads 1)")
    if args.threads:
        torch.set_num_threads(args.threads)
    elif args.model is None and str(args.device).startswith("cpu"):
        # A 1.4 M-parameter model runs fastest single-threaded (see README, performance).
        torch.set_num_threads(1)
    return load_model(args.model, dtype=args.dtype, device=args.device, device_map=getattr(args, "device_map", None))


def _question(args):
    from .data import load_pope, select_question

    if args.pope_file:
        pope_file = Path(args.pope_file)
        image_dir = Path(args.image_dir) if args.image_dir else pope_file.parent
    else:
        pope_file = EMBEDDED_POPE / f"zoo_pope_{args.split}.json"
        image_dir = Path(args.image_dir) if args.image_dir else EMBEDDED_POPE / "images"
    questions = load_pope(pope_file)
    if args.sample is None and args.question_id is None:
        args.sample = 0
    q = select_question(questions, sample=args.sample, question_id=args.question_id, source=str(pope_file))
    return q, image_dir


def _config(args):
    from .barrier import apply_overrides, get_preset

    return apply_overrides(get_preset(args.preset), args.overrides)


def _check_out(args, default: str) -> Path:
    """Fail early, creating nothing, when the output folder cannot be made or written."""
    out = Path(args.out or default)
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    problem = None
    if not existing.is_dir():
        problem = f"{existing} is a file, not a folder"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = f"{existing} is not writable"
    if problem:
        raise UserError(f"--out {out}: cannot write there ({problem}); pass a writable folder")
    return out


def _out_dir(args, default: str) -> Path:
    out = Path(args.out or default)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"--out {out}: cannot write there ({exc.strerror}); pass a writable folder") from exc
    return out


def _sample_job(args, default_out: str):
    """Validate every input of a one-sample command, then load the model: (config, question, image, lm).

    Nothing is written here; the output folder is only checked.
    """
    from .data import load_image, resolve_image

    config = _config(args)
    _check_prompt(args)
    question, image_dir = _question(args)
    image = load_image(resolve_image(question, image_dir))
    _check_out(args, default_out.format(question_id=question.question_id))
    return config, question, image, _load(args)


# ----------------------------------------------------------------------------- trace
def cmd_trace(args) -> int:
    from .plots import trace_figures
    from .report import Section, write_page
    from .trace import decoded, trace_sample

    if args.max_new_tokens < 0:
        raise UserError(f"--max-new-tokens {args.max_new_tokens}: give 0 (prefill only) or a positive count")
    config, question, image, lm = _sample_job(args, "reports/trace-{question_id}")
    default_out = f"reports/trace-{question.question_id}"
    result = trace_sample(lm, question, image, config, max_new_tokens=args.max_new_tokens, template=args.prompt)
    summary = result.summary()
    summary["text_before"] = decoded(lm, result.baseline)
    summary["text_after"] = decoded(lm, result.steered)
    meta = {"model": lm.source, "dtype": args.dtype, "device": args.device, "preset": args.preset,
            "overrides": args.overrides, "config": config.to_dict(), "prompt": result.prompt,
            "question": {"question_id": question.question_id, "image": question.image, "text": question.text,
                         "label": question.label},
            "summary": summary}
    sections = [Section("Summary", table=_summary_table(summary))]
    for phase, step in sorted({(p, s) for p, s in result.records[["phase", "step"]].itertuples(index=False)},
                              key=lambda t: t[1]):
        figs = trace_figures(result.records, phase=phase, step=step)
        sections.append(Section(f"{phase} step {step}", figures=list(figs.values())))
    # Everything is computed: only now create the folder and write.
    out = _out_dir(args, default_out)
    result.records.to_parquet(out / "records.parquet", index=False)
    result.records.to_csv(out / "records.csv", index=False)
    (out / "config.json").write_text(json.dumps(meta, indent=2, default=str))
    write_page(out / "trace.html", f"mclcbf-diag trace: {question.text}", sections)
    _print_summary(summary)
    print(f"wrote {out}/records.parquet, records.csv, config.json, trace.html")
    return 0


def _summary_table(summary: dict):
    import pandas as pd

    return pd.DataFrame({"quantity": list(summary), "value": [str(v) for v in summary.values()]})


def _print_summary(s: dict) -> None:
    where = f"sample {s['index']} (question_id {s['sample']})" if "index" in s else f"sample {s['sample']}"
    print(f"{where}: {s.get('question', '')} (label: {s.get('label', '?')})")
    print(f"  answer   baseline {s['answer_before']:>3}   steered {s['answer_after']:>3}"
          f"   {'FLIPPED' if s['flipped'] else 'unchanged'}")
    print(f"  margin   baseline {s['margin_before']:+.4f}   steered {s['margin_after']:+.4f}"
          f"   (logit Yes − No)")
    print(f"  h        baseline {s['h_before_mean']:.4f}   steered {s['h_after_mean']:.4f}"
          f"   (mean over steered layers {s['layers_steered']}; fired at {s['layers_fired']})")
    rel = s["max_theta_rel"]
    print(f"  largest ‖θ*‖/‖x‖ {rel:.3g}" if rel == rel else "  largest ‖θ*‖/‖x‖ n/a (no residual step at this site)")
    if s.get("text_before") is not None:
        print(f"  text     baseline {s['text_before']!r}   steered {s['text_after']!r}")


# ----------------------------------------------------------------------------- explain
def cmd_explain(args) -> int:
    from .diagnose import causes_frame, verdict
    from .explain import explain_sample
    from .plots import dose_response_figure, trace_figures
    from .report import Section, write_page

    if not args.k_max >= 1:
        raise UserError(f"--k-max {args.k_max}: the dose-response starts at k = 1; give a value >= 1")
    config, question, image, lm = _sample_job(args, "reports")
    ex = explain_sample(lm, question, image, config, k_max=args.k_max, per_layer=args.per_layer,
                        template=args.prompt)
    summary = ex.trace.summary()
    text = verdict(ex.causes)
    _print_summary(summary)
    print()
    print(text)
    print()
    print(ex.dose.sentence())
    flips = ex.fixes[ex.fixes.flipped]
    print("fixes that flip the answer: " + (", ".join(flips.fix) if len(flips) else "none"))
    print("cause chain: " + " → ".join(
        "answer flipped" if r.flipped else r.top_cause + (f" [fix {r.next_fix}]" if r.next_fix != "(none left)" else "")
        for r in ex.chain.itertuples()))
    stem = f"explain-{question.question_id}"
    sections = [
        Section("Summary", table=_summary_table(summary)),
        Section("Verdict", text=text, table=causes_frame(ex.causes)),
        Section("Dose-response", text=ex.dose.sentence(), figures=[dose_response_figure(ex.dose.curve)],
                table=ex.dose.curve),
        *([Section("Dose-response per layer", text="Each steered layer alone: the smallest multiplier "
                   "on its θ* that flips the answer (empty: none up to --k-max).", table=ex.layer_doses)]
          if ex.layer_doses is not None else []),
        Section("Counterfactual fixes", table=ex.fixes),
        Section("Cause chain", table=ex.chain),
        Section("Attention knockouts (prefill)", table=_knockout_table(ex)),
    ]
    figs = trace_figures(ex.trace.records)
    sections.append(Section("Trace plots", figures=list(figs.values())))
    # Everything is computed: only now create the folder and write.
    out = _out_dir(args, "reports")
    ex.records.to_parquet(out / f"{stem}.parquet", index=False)
    page = write_page(out / f"{stem}.html", f"mclcbf-diag explain: {question.text}", sections)
    print(f"wrote {page} and {out / (stem + '.parquet')}")
    return 0


def _knockout_table(ex):
    r = ex.records
    r = r[(r.layer == -1) & (r.metric.isin(["final_margin", "answer_yes"])) & (r.phase == "prefill")]
    return r.pivot_table(index="condition", columns="metric", values="value").reset_index()


# ----------------------------------------------------------------------------- zoo
def cmd_zoo_train(args) -> int:
    import torch

    from .models.loading import EMBEDDED
    from .zoo.train import TrainConfig, train

    torch.set_num_threads(args.threads or 1)  # one thread: fastest for this size, and reproducible
    cfg = TrainConfig(seed=args.seed, steps=args.steps, vision_steps=args.vision_steps, batch_size=args.batch_size)
    out = EMBEDDED if args.install else Path(args.out or "zoo-model")
    summary = train(out, cfg, device=args.device)
    (Path(out) / "training.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    print(f"wrote {out}")
    return 0


def cmd_zoo_eval(args) -> int:
    from .zoo.evaluate import evaluate

    lm = _load(args)
    table, answers = evaluate(lm, n_images=args.images)
    import pandas as pd

    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.round(4).to_string(index=False))
    if args.out:
        out = _out_dir(args, args.out)
        table.to_csv(out / "zoo_eval.csv", index=False)
        answers.to_csv(out / "zoo_eval_answers.csv", index=False)
    return 0


def cmd_zoo_data(args) -> int:
    from .zoo.questions import write_pope_set
    from .zoo.world import sample_scenes

    out = _out_dir(args, str(EMBEDDED_POPE))
    paths = write_pope_set(sample_scenes(args.images, args.seed), out, seed=args.seed)
    for split, path in paths.items():
        print(f"{split}: {path}")
    return 0


# ----------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mclcbf-diag", description=(
        "Measure why an attention-steering intervention (MC-LCBF) does or does not change a "
        "LLaVA-style model's POPE answers."))
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("trace", help="one sample, baseline vs steered, every probe per layer/head")
    _sample_options(p)
    _model_options(p)
    _barrier_options(p)
    p.add_argument("--max-new-tokens", type=int, default=0,
                   help="also generate N tokens and record the decode phase (default 0: prefill only)")
    p.add_argument("--out", default=None, help="output folder (default reports/trace-<question_id>)")
    p.set_defaults(func=cmd_trace)

    p = sub.add_parser("explain", help="ranked causes, dose-response and counterfactual fixes for one sample")
    _sample_options(p)
    _model_options(p)
    _barrier_options(p)
    p.add_argument("--k-max", type=float, default=1024.0, help="largest multiplier on θ* in the dose-response")
    p.add_argument("--per-layer", action="store_true", help="also a dose-response for each steered layer alone")
    p.add_argument("--out", default=None, help="output folder for the HTML report (default reports/)")
    p.set_defaults(func=cmd_explain)

    zoo = sub.add_parser("zoo", help="the embedded model: train, evaluate, regenerate its POPE set")
    zsub = zoo.add_subparsers(dest="zoo_command", required=True)
    t = zsub.add_parser("train", help="train the embedded model from scratch (seeded)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--steps", type=int, default=800)
    t.add_argument("--vision-steps", type=int, default=300)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--device", default="cpu")
    t.add_argument("--threads", type=int, default=None)
    t.add_argument("--out", default=None, help="output folder (default ./zoo-model)")
    t.add_argument("--install", action="store_true", help="write into the package (replaces the shipped model)")
    t.set_defaults(func=cmd_zoo_train)
    e = zsub.add_parser("eval", help="held-out POPE figures of a model on fresh synthetic scenes")
    _model_options(e)
    e.add_argument("--images", type=int, default=500, help="held-out images (default 500)")
    e.add_argument("--out", default=None, help="also write CSVs here")
    e.set_defaults(func=cmd_zoo_eval)
    d = zsub.add_parser("data", help="regenerate the embedded POPE question set and images")
    d.add_argument("--images", type=int, default=200)
    d.add_argument("--seed", type=int, default=1)
    d.add_argument("--out", default=None, help=f"output folder (default {EMBEDDED_POPE})")
    d.set_defaults(func=cmd_zoo_data)

    from .sweep import add_merge_parser, add_pope_parser

    add_pope_parser(sub)
    add_merge_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        if args.debug:
            raise
        message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        print(f"mclcbf-diag: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mclcbf-diag: interrupted (pope: rerun the same command to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

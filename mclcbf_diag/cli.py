"""The ``mclcbf-diag`` command line.

Subcommands: ``trace`` (one sample, baseline vs steered, every probe), ``zoo`` (train,
evaluate and regenerate the embedded model and its POPE set). Every user mistake is a
:class:`~mclcbf_diag.errors.UserError`: one line on stderr, exit status 2, and a
traceback only with ``--debug``. argparse's own errors (a missing value, ``--shard -1/2``)
are one line too, and Ctrl-C at any moment is one line with status 130.

Order of work: every argument, knob, file, image and the output folder is validated
first (``--set layers=…`` against the depth read from ``config.json``), then the
tokenizer measures the prompt (a prompt it would cut is refused), then the weights are
read, then the computation runs, and only then is anything written, atomically (see
:mod:`mclcbf_diag.storage`). Limits with their overrides: ``--max-new-tokens`` ≤ 512
(``MCLCBF_DIAG_MAX_NEW_TOKENS``), question text ≤ 4000 characters
(``MCLCBF_DIAG_MAX_QUESTION_CHARS``), images ≤ 50 megapixels
(``MCLCBF_DIAG_MAX_IMAGE_PIXELS``), integers in ``--set`` ≤ 10⁶ and ``layers`` ranges ≤
4096 entries.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from .errors import UserError

MAX_NEW_TOKENS = 512  # default; MCLCBF_DIAG_MAX_NEW_TOKENS overrides
MAX_KNOB_INT = 10**6
MAX_LAYER_LIST = 4096


def max_new_tokens_limit() -> int:
    from .data.pope import _env_limit

    return _env_limit("MCLCBF_DIAG_MAX_NEW_TOKENS", MAX_NEW_TOKENS)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors in the toolkit's style (no usage dump)."""

    def error(self, message: str):
        hint = ""
        m = re.search(r"argument (--[\w-]+): expected one argument", message)
        if m:
            hint = f" (a value that starts with '-' must be attached: {m.group(1)}=VALUE)"
        self.exit(2, f"mclcbf-diag: error: {self.prog}: {message}{hint}; see `{self.prog} --help`\n")

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
    g.add_argument("--verify", action="store_true",
                   help="check the model's files against its MANIFEST.sha256 before loading")


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


def _check_threads(args) -> None:
    if args.threads is not None and not 1 <= args.threads <= 4096:
        raise UserError(f"--threads {args.threads}: give a positive number of CPU threads (e.g. --threads 1)")


def _prepare(args):
    """Options, config and processor, no weights (see models.loading)."""
    from .models.loading import prepare_model

    _check_threads(args)
    return prepare_model(args.model, dtype=args.dtype, device=args.device,
                         device_map=getattr(args, "device_map", None), verify=getattr(args, "verify", False))


def _load_weights(args, prep):
    import torch

    from .models.loading import load_weights

    if args.threads:
        torch.set_num_threads(args.threads)
    elif args.model is None and str(args.device).startswith("cpu"):
        # A 1.4 M-parameter model runs fastest single-threaded (see README, performance).
        torch.set_num_threads(1)
    return load_weights(prep)


def _load(args):
    return _load_weights(args, _prepare(args))


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


_INT = re.compile(r"[-+]?\d+")


def _check_override_sizes(overrides) -> None:
    """Bound the integers in ``--set`` strings BEFORE barrier.apply_overrides materialises them.

    ``layers=0:100000000000`` would build a list of 10¹¹ ints (MemoryError) and
    ``fixed_span=0:99…9`` overflows C ints; both become one line here.
    """
    for item in overrides:
        knob, eq, text = str(item).partition("=")
        knob = knob.strip()
        if not eq or knob not in ("layers", "fixed_span"):
            continue
        for num in _INT.findall(text):
            if len(num.lstrip("+-")) > 7 or abs(int(num)) > MAX_KNOB_INT:
                raise UserError(f"--set {item}: {num} is too large (integers here are at most {MAX_KNOB_INT}); "
                                f"give {knob} in token/layer indices of the model")
        if knob == "layers":
            total = 0
            for part in text.split(","):
                a, colon, b = part.partition(":")
                if colon and _INT.fullmatch(a.strip() or "x") and _INT.fullmatch(b.strip() or "x"):
                    total += max(0, int(b) - int(a))
                else:
                    total += 1
            if total > MAX_LAYER_LIST:
                raise UserError(f"--set {item} lists {total} layers, more than {MAX_LAYER_LIST}; list the model's "
                                "layers, e.g. layers=10:28")


def _local_depth(model: str | None) -> int | None:
    """num_hidden_layers from a local config.json, read as plain JSON (no torch, no transformers)."""
    folder = Path(__file__).resolve().parent / "zoo" / "weights" if model in (None, "", "embedded") else Path(model)
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
        n = text.get("num_hidden_layers")
    except (OSError, ValueError, RecursionError, AttributeError):
        return None  # reported properly when the model is located
    return n if isinstance(n, int) and n > 0 else None


def _early_checks(args) -> None:
    """Knob checks that need no torch: sizes of --set integers, and layers against config.json's depth."""
    _check_override_sizes(args.overrides)
    n_layers = _local_depth(args.model)
    if n_layers is None:
        return
    for item in args.overrides:
        knob, eq, text = str(item).partition("=")
        if knob.strip() != "layers" or not eq:
            continue
        values: list[int] = []
        for part in text.split(","):
            a, colon, b = part.strip().partition(":")
            try:
                values.extend(range(int(a), int(b)) if colon else [int(a)] if a else [])
            except ValueError:
                return  # not plain integers: the knob parser explains it
        bad = [v for v in values if not 0 <= v < n_layers]
        if bad:
            raise UserError(f"layers {bad} out of range: the model has layers 0..{n_layers - 1}")


def _config(args, n_layers: int | None = None):
    """The preset with the ``--set`` overrides; ``layers`` checked against ``n_layers`` when known."""
    from .barrier import apply_overrides, get_preset, steered_layers

    _check_override_sizes(args.overrides)
    try:
        config = apply_overrides(get_preset(args.preset), args.overrides)
    except (OverflowError, MemoryError, RecursionError, ValueError, TypeError) as exc:
        raise UserError(f"--set {' '.join(map(str, args.overrides))}: cannot be applied "
                        f"({type(exc).__name__}: {exc}); check the knob values") from None
    if n_layers is not None:
        steered_layers(config, n_layers)  # raises "layers [9] out of range: … 0..3"
    return config


def _check_out(args, default: str) -> Path:
    """Fail early, creating nothing, when the output folder cannot be made or written."""
    from .storage import check_writable

    return check_writable(args.out or default)


def _out_dir(args, default: str) -> Path:
    from .storage import make_dir

    return make_dir(args.out or default)


def _sample_job(args, default_out: str, max_new_tokens: int = 0):
    """Validate every input of a one-sample command, then load the model: (config, question, image, lm).

    Nothing is written here; the output folder is only checked. The order puts the
    cheap checks first: knobs (against config.json's depth), prompt, question, image,
    --out, then the tokenizer (prompt length), and only then the weights.
    """
    from .data import build_prompt, load_image, resolve_image
    from .storage import safe_name

    _check_threads(args)
    _early_checks(args)
    _check_prompt(args)
    question, image_dir = _question(args)
    image = load_image(resolve_image(question, image_dir))
    _check_out(args, default_out.format(question_id=safe_name(question.question_id)))
    from .models.loading import check_prompt_lengths, model_facts  # imports torch: after the cheap checks

    config = _config(args, model_facts(args.model).n_layers)
    prep = _prepare(args)
    check_prompt_lengths(prep, [build_prompt(question.text, args.prompt)],
                         [f"question_id {question.question_id!r}"], max_new_tokens=max_new_tokens)
    return config, question, image, _load_weights(args, prep)


def _write_frame(frame, path: Path, kind: str) -> None:
    from .storage import atomic_write_text, atomic_write_with

    if kind == "parquet":
        atomic_write_with(path, lambda tmp: frame.to_parquet(tmp, index=False))
    else:
        atomic_write_text(path, frame.to_csv(index=False))


# ----------------------------------------------------------------------------- trace
def cmd_trace(args) -> int:
    from .storage import atomic_write_text, safe_name

    if args.max_new_tokens < 0:
        raise UserError(f"--max-new-tokens {args.max_new_tokens}: give 0 (prefill only) or a positive count")
    cap = max_new_tokens_limit()
    if args.max_new_tokens > cap:
        raise UserError(f"--max-new-tokens {args.max_new_tokens} is more than the limit of {cap}; pass a smaller "
                        "number, or raise the limit with MCLCBF_DIAG_MAX_NEW_TOKENS=N")
    config, question, image, lm = _sample_job(args, "reports/trace-{question_id}", args.max_new_tokens)
    from .plots import trace_figures
    from .report import Section, write_page
    from .trace import decoded, trace_sample

    default_out = f"reports/trace-{safe_name(question.question_id)}"
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
    _write_frame(result.records, out / "records.parquet", "parquet")
    _write_frame(result.records, out / "records.csv", "csv")
    atomic_write_text(out / "config.json", json.dumps(meta, indent=2, default=str))
    write_page(out / "trace.html", f"mclcbf-diag trace: {question.text}", sections)
    _print_summary(summary)
    print(f"wrote {_show(out)}/records.parquet, records.csv, config.json, trace.html")
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
    from .storage import safe_name

    if not 1 <= args.k_max <= 1e12:
        raise UserError(f"--k-max {args.k_max}: the dose-response starts at k = 1; give a value >= 1 (and at most 1e12)")
    config, question, image, lm = _sample_job(args, "reports")
    from .diagnose import causes_frame, verdict
    from .explain import explain_sample
    from .plots import dose_response_figure, trace_figures
    from .report import Section, write_page

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
    stem = f"explain-{safe_name(question.question_id)}"
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
    _write_frame(ex.records, out / f"{stem}.parquet", "parquet")
    page = write_page(out / f"{stem}.html", f"mclcbf-diag explain: {question.text}", sections)
    print(f"wrote {_show(page)} and {_show(out / (stem + '.parquet'))}")
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

    from .models.loading import resolve_device
    from .storage import atomic_write_text, check_writable, write_manifest

    for name, low in (("steps", 1), ("vision_steps", 0), ("batch_size", 1)):
        v = getattr(args, name)
        if v < low:
            raise UserError(f"--{name.replace('_', '-')} {v} must be >= {low}")
    _check_threads(args)
    resolve_device(args.device)
    out = EMBEDDED if args.install else Path(args.out or "zoo-model")
    check_writable(out)
    torch.set_num_threads(args.threads or 1)  # one thread: fastest for this size, and reproducible
    cfg = TrainConfig(seed=args.seed, steps=args.steps, vision_steps=args.vision_steps, batch_size=args.batch_size)
    summary = train(out, cfg, device=args.device)
    atomic_write_text(Path(out) / "training.json", json.dumps(summary, indent=2))
    write_manifest(out, _manifest_names(Path(out)))  # what --verify checks
    print(json.dumps(summary, indent=2))
    print(f"wrote {_show(out)}")
    return 0


def cmd_zoo_eval(args) -> int:
    from .zoo.evaluate import evaluate

    if args.images < 1:
        raise UserError(f"--images {args.images} must be >= 1 (held-out images to evaluate on)")
    if args.out:
        _check_out(args, args.out)
    lm = _load(args)
    table, answers = evaluate(lm, n_images=args.images)
    import pandas as pd

    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.round(4).to_string(index=False))
    if args.out:
        out = _out_dir(args, args.out)
        _write_frame(table, out / "zoo_eval.csv", "csv")
        _write_frame(answers, out / "zoo_eval_answers.csv", "csv")
    return 0


def cmd_zoo_data(args) -> int:
    from .zoo.questions import write_pope_set
    from .zoo.world import sample_scenes

    if args.images < 1:
        raise UserError(f"--images {args.images} must be >= 1 (images to generate)")
    _check_out(args, str(EMBEDDED_POPE))
    out = _out_dir(args, str(EMBEDDED_POPE))
    paths = write_pope_set(sample_scenes(args.images, args.seed), out, seed=args.seed)
    for split, path in paths.items():
        print(f"{split}: {_show(path)}")
    return 0


def _manifest_names(folder: Path) -> list[str]:
    """The files of a model folder that --verify checks (weights, configs, tokenizer)."""
    return sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.suffix in (".safetensors", ".json", ".jinja") and p.name != "training.json")


def _show(path) -> str:
    from .storage import show

    return show(path)


# ----------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mclcbf-diag", description=(
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


def _one_line(text: str) -> str:
    message = " ".join(line.strip() for line in str(text).splitlines() if line.strip())
    return message.encode("utf-8", "backslashreplace").decode("utf-8")  # non-UTF-8 file names


def main(argv: list[str] | None = None) -> int:
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        parser = build_parser()
        args = parser.parse_args(argv)
        debug = args.debug
        return args.func(args)
    except UserError as exc:
        if debug:
            raise
        print(f"mclcbf-diag: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mclcbf-diag: interrupted (pope: rerun the same command to resume; nothing is half-written)",
              file=sys.stderr)
        return 130
    except MemoryError:
        if debug:
            raise
        print("mclcbf-diag: error: out of memory; lower --batch-size, --max-new-tokens or the image size "
              "(see the limits in `mclcbf-diag --help`)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

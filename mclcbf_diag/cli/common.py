"""What every command shares: options, input checks before the model loads, printing."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from contextlib import contextmanager
from pathlib import Path

from .. import shipped
from ..errors import UserError

MAX_NEW_TOKENS = 512  # default; MCLCBF_DIAG_MAX_NEW_TOKENS overrides


MAX_KNOB_INT = 10**6


MAX_LAYER_LIST = 4096


_INT = re.compile(r"[-+]?\d+")


def max_new_tokens_limit() -> int:
    from ..data.pope import env_limit

    return env_limit("MCLCBF_DIAG_MAX_NEW_TOKENS", MAX_NEW_TOKENS)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors in the toolkit's style (no usage dump)."""

    def error(self, message: str):
        hint = ""
        m = re.search(r"argument (--[\w-]+): expected one argument", message)
        if m:
            hint = f" (a value that starts with '-' must be attached: {m.group(1)}=VALUE)"
        self.exit(2, f"mclcbf-diag: error: {self.prog}: {message}{hint}; see `{self.prog} --help`\n")




def model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help="local checkpoint directory or cached hub id (default: the embedded model)")
    g.add_argument("--dtype", default="float32", help="float32 | float16 | bfloat16 (default float32)")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 … (default cpu)")
    g.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 for the embedded model, torch's default otherwise)")
    g.add_argument("--verify", action="store_true",
                   help="check the model's files against its MANIFEST.sha256 before loading")


def sample_options(p: argparse.ArgumentParser, whole_split: bool = False) -> None:
    """``--split``, the data and ``--sample``/``--question-id``; ``whole_split``: ``--split all`` too."""
    g = p.add_argument_group("question selection")
    g.add_argument("--split", default="adversarial",
                   choices=["random", "popular", "adversarial", *(["all"] if whole_split else [])],
                   help="POPE split of the embedded question set (default adversarial"
                        + ("; all: every split, without --sample/--question-id)" if whole_split else ")"))
    g.add_argument("--pope-file", default=None, help="a POPE question file (JSON Lines or JSON array)")
    g.add_argument("--image-dir", default=None, help="folder holding the images the POPE file names")
    prompt_option(g)
    if whole_split:
        labels_option(g)
    which = g.add_mutually_exclusive_group()
    which.add_argument("--sample", type=int, default=None,
                       help="0-based index of the question in the split (or --pope-file); the records carry "
                            "its question_id, not this index")
    which.add_argument("--question-id", default=None, help="select by POPE question_id")


def labels_option(g) -> None:
    g.add_argument("--labels", default=None, metavar="FILE",
                   help="question_id → label file (JSON or CSV) overriding the question file's labels, e.g. a "
                        "published relabelling of POPE; recorded in the run identity")


def prompt_option(g) -> None:
    from ..data.prompts import LLAVA_PROMPT, PROMPT_CONTROLS, prompt_template

    g.add_argument("--prompt", default=LLAVA_PROMPT, metavar="TEMPLATE", type=prompt_template,
                   help="prompt around the question, with <image> and {question} (default: llava-hf's "
                        "'USER: <image>\\n{question}\\nASSISTANT:'), or a prompt control: "
                        + ", ".join(PROMPT_CONTROLS) + " (compare sets its baseline answers against the default "
                        "prompt's)")


def check_prompt(args) -> None:
    from ..data import build_prompt

    build_prompt("question", args.prompt)  # raises a UserError naming what is missing


def intervention_options(p: argparse.ArgumentParser) -> None:
    from ..interventions import names

    g = p.add_argument_group("intervention")
    g.add_argument("--intervention", default="mclcbf", metavar="NAME",
                   help=f"which intervention: {', '.join(names())} (default mclcbf, the barrier; "
                        "`mclcbf-diag interventions` lists each with its paper, presets and knobs)")
    g.add_argument("--preset", default=None,
                   help="the intervention's preset (default its first; mclcbf: seed-exp6 = the original "
                        "experiment, alias original; fixed = every suspected cause corrected, alias corrected; "
                        "--help-knobs lists them all)")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KNOB=VALUE",
                   help="override a knob, e.g. --set span=detected --set tau=0.5 (repeatable)")
    g.add_argument("--help-knobs", action="store_true",
                   help="print --intervention's knobs (types, defaults, one line each) and presets, and exit")


def check_threads(args) -> None:
    if args.threads is not None and not 1 <= args.threads <= 4096:
        raise UserError(f"--threads {args.threads}: give a positive number of CPU threads (e.g. --threads 1)")


def prepare_from_args(args):
    """Options, config and processor, no weights (see models.loading)."""
    from ..models.loading import prepare_model

    check_threads(args)
    return prepare_model(args.model, dtype=args.dtype, device=args.device,
                         device_map=getattr(args, "device_map", None), verify=getattr(args, "verify", False))


def weights_from_args(args, prep):
    import torch

    from ..models.loading import load_weights

    if args.threads:
        torch.set_num_threads(args.threads)
    elif args.model is None and str(args.device).startswith("cpu"):
        # A 1.4 M-parameter model runs fastest single-threaded (docs/performance.md).
        torch.set_num_threads(1)
    return load_weights(prep)


def load_from_args(args):
    return weights_from_args(args, prepare_from_args(args))


def question_from_args(args):
    from ..data import load_pope, select_question

    if args.pope_file:
        pope_file = Path(args.pope_file)
        image_dir = Path(args.image_dir) if args.image_dir else pope_file.parent
    else:
        pope_file = shipped.pope_file(args.split)
        image_dir = Path(args.image_dir) if args.image_dir else shipped.IMAGES
    questions = load_pope(pope_file)
    if args.sample is None and args.question_id is None:
        args.sample = 0
    q = select_question(questions, sample=args.sample, question_id=args.question_id, source=str(pope_file))
    return q, image_dir


def check_override_sizes(overrides, intervention: str = "mclcbf") -> None:
    """Bound the integers in ``--set`` strings of integer knobs BEFORE the knob parser materialises them.

    ``layers=0:100000000000`` would build a list of 10¹¹ ints (MemoryError), and a span of positions
    ``0:99…9`` overflows C ints; both become one line here. The integer knobs are ``layers`` and those
    whose preset value is an integer or a tuple of integers (read from the torch-free specs).
    """
    integer_knobs = {"layers", *_integer_knobs(intervention)}
    for item in overrides:
        knob, eq, text = str(item).partition("=")
        knob = knob.strip()
        if not eq or knob not in integer_knobs:
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


def _integer_knobs(intervention: str) -> set[str]:
    import dataclasses

    from .. import interventions

    spec = interventions.specs().get(intervention)
    if spec is None:
        return set()
    knobs = next(iter(spec.presets.values()))

    def integral(v) -> bool:
        ints = v if isinstance(v, tuple) else (v,)
        return bool(ints) and all(isinstance(x, int) and not isinstance(x, bool) for x in ints)

    return {f.name for f in dataclasses.fields(knobs) if integral(getattr(knobs, f.name))}


def local_depth(model: str | None) -> int | None:
    """num_hidden_layers from the model's config.json (a local folder or a cached hub id), read as plain JSON (no
    torch, no transformers); a checkpoint the toolkit cannot measure (its model_type, text model or a missing
    optional package) is refused here, in milliseconds (:func:`mclcbf_diag.models.families.check_config`)."""
    from ..models.families import check_config, config_file

    embedded = model in (None, "", "embedded")
    try:
        path = shipped.WEIGHTS / "config.json" if embedded else config_file(model)
        cfg = json.loads(path.read_text(encoding="utf-8"))
        text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
        n = text.get("num_hidden_layers")
    except (OSError, ValueError, RecursionError, AttributeError, TypeError):
        return None  # reported properly when the model is located
    if "model_type" in cfg:  # without one, transformers' own config error is reported when the model is located
        check_config(cfg, "embedded" if embedded else model)
    return n if isinstance(n, int) and n > 0 else None


def early_checks(args) -> None:
    """Knob checks that need no torch: sizes of --set integers, the intervention's knobs and presets, layers vs
    depth."""
    check_override_sizes(args.overrides, getattr(args, "intervention", "mclcbf"))
    from .. import (
        interventions,  # names only: the classes (and torch) load on first use
    )

    name = getattr(args, "intervention", "mclcbf")
    table = interventions.specs()  # knobs and presets, torch-free: errors in well under a second
    if name not in table:
        raise UserError(f"unknown intervention {name!r}; choose one of {', '.join(table)}")
    from ..knobs import apply_overrides

    spec = table[name]
    if args.preset is not None and args.preset not in spec.presets:
        raise UserError(f"unknown preset {args.preset!r} for {name}; valid presets: {', '.join(spec.presets)}")
    apply_overrides(spec.presets[args.preset or next(iter(spec.presets))], list(args.overrides), spec.aliases)
    n_layers = local_depth(args.model)
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


def _model_json(model: str | None, name: str) -> dict:
    """A JSON file of a local model folder as a dict ({} when absent or unreadable), without transformers."""
    folder = shipped.WEIGHTS if model in (None, "", "embedded") else Path(model)
    try:
        data = json.loads((folder / name).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def shortest_edge(model: str | None) -> int | None:
    """The edge the model's image processor scales an image's shortest side to (None: unknown, 336 assumed)."""
    for name in ("processor_config.json", "preprocessor_config.json"):
        cfg = _model_json(model, name)
        proc = cfg.get("image_processor") if isinstance(cfg.get("image_processor"), dict) else cfg
        size = proc.get("size")
        if "merge_size" in proc:  # Qwen-VL: size is a pixel budget (min/max pixels), not an edge
            return None
        if isinstance(size, dict) and isinstance(size.get("shortest_edge"), int) and size["shortest_edge"] > 0:
            return size["shortest_edge"]
    return None


def quick_prompt_lengths(model: str | None, prompts: list[str], names: list[str], max_new_tokens: int = 0) -> None:
    """Refuse, before transformers loads, a prompt longer than the model's context (``config.json``).

    The text is counted with the ``tokenizers`` library from the model's ``tokenizer.json`` (what
    the fast tokenizer runs), each ``<image>`` as ``image_seq_length`` tokens; a model folder
    without those files is left to :func:`~mclcbf_diag.models.loading.check_prompt_lengths`,
    which measures every prompt with the processor itself before the weights are read.
    """
    from ..data.pope import PLACEHOLDER

    if model not in (None, "", "embedded") and not Path(model).expanduser().is_dir():
        return  # a hub id: measured by the processor
    folder = shipped.WEIGHTS if model in (None, "", "embedded") else Path(model).expanduser()
    cfg = _model_json(str(folder), "config.json")
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    context, per_image = text.get("max_position_embeddings"), cfg.get("image_seq_length")
    if not (isinstance(context, int) and isinstance(per_image, int) and (folder / "tokenizer.json").is_file()):
        return
    try:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    except Exception:  # noqa: BLE001 - an unreadable tokenizer is reported when the processor loads
        return
    tok.no_truncation()
    tok.no_padding()
    for start in range(0, len(prompts), 512):
        chunk = prompts[start:start + 512]
        for j, (prompt, enc) in enumerate(zip(chunk, tok.encode_batch(chunk))):
            n = len(enc.ids) + prompt.count(PLACEHOLDER) * (per_image - 1)
            if n + max_new_tokens > context:
                extra = f" and {max_new_tokens} new tokens" if max_new_tokens else ""
                raise UserError(f"{names[start + j]}: the prompt is {n} tokens ({per_image} of them for the image)"
                                f"{extra}, more than the limit of {context} (the model's context, "
                                "max_position_embeddings in config.json), so it would be cut: shorten the question "
                                "or --prompt"
                                + (", or lower --max-new-tokens/--generate" if max_new_tokens else ""))


# Which command's run a folder holds, and which commands may write there without --force.
_OWNERS = {"trace": {"trace"}, "explain": {"pages"}, "flow": {"pages"}, "pope": {"pope"},
           "explain --split": {"explain --split"}, "merge": {"merge"}, "attribute": {"attribute"}}


def folder_holds(out: Path) -> str | None:
    """Whose outputs ``out`` holds: ``pope``, ``explain --split``, ``merge``, ``trace``, ``attribute``, ``pages``
    or None."""
    from ..pope.store import RUN, load_run

    if (out / RUN).is_file():
        run = load_run(out / RUN) or {}
        if run.get("merged_from"):
            return "merge"
        return "explain --split" if run.get("kind") == "explain-population" else "pope"
    if (out / "attribute.html").is_file():
        return "attribute"
    if (out / "trace.html").is_file() or ((out / "config.json").is_file() and (out / "records.parquet").is_file()):
        return "trace"
    if any(out.glob("explain-*.html")) or any(out.glob("flow-*.html")):
        return "pages"
    return None


def check_folder(out: Path, command: str, force: bool = False) -> None:
    """Refuse an ``--out`` holding another command's run (``--force`` writes there anyway)."""
    held = folder_holds(out)
    if held is None or held in _OWNERS[command] or force:
        return
    what = {"pages": "explain/flow pages", "merge": "a merged run", "trace": "a trace", "attribute": "an attribute run",
            "explain --split": "an explain --split run"}.get(held, f"a {held} run")
    raise UserError(f"--out {show(out)} holds {what}; {command} would write beside it (and could replace its "
                    f"files): pass another --out, or add --force to write there anyway")


def decoding_options(p) -> None:
    """How answers are chosen (:class:`~mclcbf_diag.measurements.sampling.Decoding`)."""
    g = p.add_argument_group("decoding")
    g.add_argument("--decoding", default="greedy", choices=["greedy", "sample", "beam"],
                   help="greedy (default: the first token's Yes − No sign), sample (the first token drawn, seeded "
                        "per question; with --generate the text sampled) or beam (--generate's text by beam search)")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling's mass (default 1: off)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the top K tokens (default 0: off)")
    g.add_argument("--num-beams", type=int, default=1, help="beams of --decoding beam (2 or more)")
    g.add_argument("--seed", type=int, default=None, help="seed of the sampled answers (default 0)")


def decoding_from_args(args):
    """The run's :class:`~mclcbf_diag.measurements.sampling.Decoding` (a UserError for settings that do not fit)."""
    from ..measurements.sampling import Decoding

    if not hasattr(args, "decoding"):  # a command without the options (explain): greedy first-token answers
        return Decoding()
    seed = 0 if args.seed is None else args.seed
    d = Decoding(args.decoding, args.temperature, args.top_p, args.top_k, args.num_beams, seed)
    if d.strategy == "beam" and not getattr(args, "generate", 0):
        raise UserError("--decoding beam chooses generated text; add --generate N (the first token of a beam "
                        "search is the greedy one)")
    return d


def force_option(p) -> None:
    p.add_argument("--force", action="store_true",
                   help="write into an --out that holds another command's run (a trace, pages, a pope or "
                        "explain --split run)")


def command_of(args) -> str:
    """The command as :func:`check_folder` names it (``explain --split`` for a whole split)."""
    if args.command == "explain" and getattr(args, "sample", None) is None and getattr(args, "question_id",
                                                                                         None) is None:
        return "explain --split"
    return args.command


def split_run_checks(args, default_out: str):
    """The model-free checks of a whole-split run (``pope``, ``explain --split``), in order.

    Shard, knobs, prompt, question files (images included) and the output folder (``--out``,
    else ``default_out`` with ``-shard-I-of-N`` for a shard). Returns ``(shard, files,
    all_jobs, jobs, out)``: every selected question and this shard's.
    """
    from ..pope.jobs import parse_shard, question_files, shard_jobs

    shard = parse_shard(args.shard)
    early_checks(args)
    check_prompt(args)
    files = question_files(args.split, args.pope_file, args.image_dir)
    all_jobs, jobs = shard_jobs(files, args.limit, shard, args.shard, shortest_edge(args.model))
    if getattr(args, "labels", None):
        from ..data.labels import relabel_run

        _, all_jobs, jobs = relabel_run(args.labels, files, all_jobs, jobs)
    out = check_run_folder(args, default_out, shard)
    from ..data import build_prompt

    quick_prompt_lengths(args.model, [build_prompt(j.question.text, args.prompt) for j in jobs],
                         [f"question_id {j.question.question_id!r} ({j.split})" for j in jobs],
                         getattr(args, "generate", 0))
    return shard, files, all_jobs, jobs, out


def check_run_folder(args, default_out: str, shard: tuple[int, int] | None) -> Path:
    """The folder part of :func:`split_run_checks`: ``--out`` (else ``default_out``, with ``-shard-I-of-N`` for a
    ``shard``) writable, holding no other command's run, and resumable. Returns the folder."""
    from ..pope.store import check_resumable
    from ..storage import check_writable

    out = check_writable(args.out or default_out + ("" if shard is None else f"-shard-{shard[0]}-of-{shard[1]}"))
    check_folder(out, command_of(args), getattr(args, "force", False))
    check_resumable(out)
    return out


def intervention_from_args(args, n_layers: int | None = None, model_type: str | None = None):
    """``--intervention`` at ``--preset`` with the ``--set`` overrides; its layers checked against ``n_layers``, and
    the family of config.json's ``model_type`` against it (:func:`check_pixels`)."""
    from ..interventions import resolve

    check_override_sizes(args.overrides, args.intervention)
    try:
        iv = resolve(args.intervention, args.preset, args.overrides)
    except (OverflowError, MemoryError, RecursionError, ValueError, TypeError) as exc:
        raise UserError(f"--set {' '.join(map(str, args.overrides))}: cannot be applied "
                        f"({type(exc).__name__}: {exc}); check the knob values") from None
    if n_layers is not None:
        iv.layers(n_layers)  # raises "layers [9] out of range: … 0..3"
    check_pixels(iv, getattr(args, "model", None), model_type)
    if iv.name == "halc" and getattr(args, "command", None) not in (None, "pope"):
        raise UserError(f"--intervention halc runs under `pope` only (its views are crops of each question's image, "
                        f"which `{args.command}` does not hand over yet); use mclcbf-diag pope --intervention halc")
    return iv


def check_pixels(iv, model: str | None, model_type: str | None) -> None:
    """A one-line UserError, before the model loads, for an intervention that cannot run on ``--model``'s family
    (:meth:`~mclcbf_diag.interventions.base.Intervention.model_type_problem` of config.json's ``model_type``, as
    :func:`~mclcbf_diag.models.loading.model_facts` read it; e.g. a view built from each image's pixel tensor on a
    family whose processor gives none)."""
    if model in (None, "", "embedded"):
        return
    problem = iv.model_type_problem(model_type)
    if problem:
        raise UserError(f"--intervention {iv.name} on --model {model} ({model_type}): {problem}")


def check_out(args, default: str) -> Path:
    """Fail early, creating nothing, when the output folder cannot be made or written."""
    from ..storage import check_writable

    return check_writable(args.out or default)


def out_dir(args, default: str) -> Path:
    from ..storage import make_dir

    return make_dir(args.out or default)


@contextmanager
def writing(args, default: str):
    """The output folder of a one-sample command, created and locked for its writes (checked again under the
    lock: a run that another process put there meanwhile is not written over)."""
    from ..storage import FolderLock, make_dir

    out = make_dir(args.out or default)
    with FolderLock(out):
        check_folder(out, command_of(args), getattr(args, "force", False))
        yield out


def relabelled(args, question):
    """The one question of a sample command with ``--labels FILE``'s label where the file has one (the pages of a
    relabelled whole-split run link their questions with it)."""
    if not getattr(args, "labels", None):
        return question
    from ..data.labels import load_labels

    label = load_labels(args.labels).label(args.split, question.question_id)
    return dataclasses.replace(question, label=label) if label else question


def sample_job(args, default_out: str, max_new_tokens: int = 0):
    """Validate every input of a one-sample command, then load the model: (config, question, image, lm).

    Nothing is written here; the output folder is only checked. The order puts the
    cheap checks first: knobs (against config.json's depth), prompt, question, image,
    --out, then the tokenizer (prompt length), and only then the weights.
    """
    from ..data import build_prompt, load_image, resolve_image
    from ..data.pope import SHORTEST_EDGE
    from ..storage import safe_name

    check_threads(args)
    early_checks(args)
    check_prompt(args)
    question, image_dir = question_from_args(args)
    question = relabelled(args, question)
    try:
        image = load_image(resolve_image(question, image_dir), shortest_edge(args.model) or SHORTEST_EDGE)
    except UserError as exc:
        raise UserError(f"question_id {question.question_id!r}: {exc}") if "question_id" not in str(exc) else exc
    out = check_out(args, default_out.format(question_id=safe_name(question.question_id)))
    check_folder(out, command_of(args), getattr(args, "force", False))
    quick_prompt_lengths(args.model, [build_prompt(question.text, args.prompt)],
                         [f"question_id {question.question_id!r}"], max_new_tokens)
    from ..models.loading import (  # imports torch: after the cheap checks
        check_prompt_lengths,
        model_facts,
    )

    facts = model_facts(args.model)
    config = intervention_from_args(args, facts.n_layers, facts.model_type)
    prep = prepare_from_args(args)
    check_prompt_lengths(prep, [build_prompt(question.text, args.prompt)],
                         [f"question_id {question.question_id!r}"], max_new_tokens=max_new_tokens)
    return config, question, image, weights_from_args(args, prep)


def write_frame(frame, path: Path, kind: str) -> None:
    from ..storage import atomic_write_text, atomic_write_with

    if kind == "parquet":
        atomic_write_with(path, lambda tmp: frame.to_parquet(tmp, index=False))
    else:
        atomic_write_text(path, frame.to_csv(index=False))


def summary_table(summary: dict):
    import pandas as pd

    return pd.DataFrame({"quantity": list(summary), "value": [str(v) for v in summary.values()]})




def show(path) -> str:
    from ..storage import show

    return show(path)


def one_line(text: str) -> str:
    message = " ".join(line.strip() for line in str(text).splitlines() if line.strip())
    return message.encode("utf-8", "backslashreplace").decode("utf-8")  # non-UTF-8 file names

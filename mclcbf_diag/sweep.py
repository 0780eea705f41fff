"""``mclcbf-diag pope`` and ``merge``: baseline vs steered POPE at scale, resumable and sharded.

How a run works
---------------
* The questions are the selected splits' files, each cut to its first ``--limit``
  questions; ``--shard i/n`` (0-based ``i``, ``0 ≤ i < n``) keeps the questions whose
  position in that list satisfies ``position % n == i``.
* Each batch is answered twice by :mod:`mclcbf_diag.batch` (first-token margin
  ``logit Yes − logit No``, baseline then steered, the steered run reusing the
  baseline's cached prefix); ``--generate N`` adds greedy text of both conditions,
  scored with POPE's official parser (steering acts on the prefill only).
* ``--out`` (default ``reports/pope``, ``reports/pope-shard-I-of-N`` for a shard) holds
  ``run.json`` (the resolved configuration), ``answers.jsonl`` (one line per question),
  then ``metrics.csv``, ``flips.csv`` and ``summary.html`` (metrics over "all" pool the
  splits' questions).
* **Crash safety.** A batch's lines are appended with ONE ``write`` followed by
  ``fsync``, so a kill leaves whole batches plus at most one partial last line. On
  resume the partial line is cut off, the questions already in the file are skipped,
  and the run continues; a different configuration in ``run.json`` is refused, naming
  the keys that differ (batch size, device and threads may change: they do not change
  the answers).
* ``merge OUT SHARD_DIR…`` joins shard runs with the same configuration, drops duplicate
  (split, question_id) rows, reports missing shards and questions, and recomputes the
  metrics and the summary page.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .errors import UserError

SPLITS = ("random", "popular", "adversarial")
EMBEDDED_POPE = Path(__file__).resolve().parent / "zoo" / "pope"
RUN, ANSWERS = "run.json", "answers.jsonl"
_INFO_KEYS = ("preset", "overrides", "merged_from")  # stored in run.json, not compared


# ----------------------------------------------------------------------------- selection
@dataclass(frozen=True)
class Job:
    split: str
    position: int  # 0-based position in the split's (limited) question list
    question: object  # PopeQuestion
    image_dir: Path

    @property
    def key(self) -> tuple[str, str]:
        return self.split, str(self.question.question_id)


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"i/n"`` → ``(i, n)`` with 0-based ``i``; None stays None."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m:
        raise UserError(f"--shard {text!r} is not i/n; write e.g. --shard 0/4 (0-based i, 0 <= i < n)")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1 or i >= n:
        raise UserError(f"--shard {text}: need n >= 1 and 0 <= i < n (i is 0-based: 0/{max(n, 1)} … "
                        f"{max(n, 1) - 1}/{max(n, 1)})")
    return i, n


def question_files(split: str, pope_file: str | None, image_dir: str | None) -> list[tuple[str, Path, Path]]:
    """``(split label, file, image folder)`` per selected split.

    Without ``--pope-file``: the embedded split files. A ``--pope-file`` containing
    ``{split}`` is expanded for each selected split (e.g. ``coco_pope_{split}.json``);
    otherwise it is one file labelled with ``--split`` (or its stem for ``all``).
    """
    splits = SPLITS if split == "all" else (split,)
    if pope_file is None:
        idir = Path(image_dir) if image_dir else EMBEDDED_POPE / "images"
        return [(s, EMBEDDED_POPE / f"zoo_pope_{s}.json", idir) for s in splits]
    if "{split}" in pope_file:
        paths = [(s, Path(pope_file.replace("{split}", s))) for s in splits]
    else:
        paths = [(split if split != "all" else Path(pope_file).stem, Path(pope_file))]
    return [(s, p.resolve(), Path(image_dir) if image_dir else p.resolve().parent) for s, p in paths]


def select_jobs(files, limit: int | None, shard: tuple[int, int] | None) -> list[Job]:
    from .data import load_pope

    jobs = []
    for split, path, idir in files:
        questions = load_pope(path)[:limit] if limit else load_pope(path)
        for pos, q in enumerate(questions):
            if shard is None or pos % shard[1] == shard[0]:
                jobs.append(Job(split, pos, q, idir))
    return jobs


# ----------------------------------------------------------------------------- run.json
def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def differing_keys(a: dict, b: dict, ignore=_INFO_KEYS) -> list[str]:
    """Flattened keys (``config.tau_prefill``…) whose values differ, ``ignore`` left out."""
    fa = _flat({k: v for k, v in a.items() if k not in ignore})
    fb = _flat({k: v for k, v in b.items() if k not in ignore})
    return sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k))


def claim_out_dir(out: Path, identity: dict) -> None:
    """Write ``run.json``, or check that the run already in ``out`` is this one."""
    path = out / RUN
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"{path} is unreadable ({exc}); delete {out} or pass another --out") from None
        diff = differing_keys(old, identity)
        if diff:
            raise UserError(f"--out {out} holds a run with another configuration (differs in: {', '.join(diff)}); "
                            "rerun with the same options to resume, or pass another --out")
        return
    path.write_text(json.dumps(identity, indent=2) + "\n")


# ----------------------------------------------------------------------------- answers.jsonl
def read_records(path: Path, *, repair: bool = False) -> tuple[list[dict], bool]:
    """Whole lines of ``answers.jsonl`` and whether a partial last line was dropped.

    ``repair=True`` also truncates the file after its last complete line, so appends
    start on a fresh line.
    """
    if not path.is_file():
        return [], False
    data = path.read_bytes()
    cut = data.rfind(b"\n") + 1
    partial = cut < len(data)
    if partial and repair:
        os.truncate(path, cut)
    records = []
    for lineno, line in enumerate(data[:cut].decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise UserError(f"{path}, line {lineno} is not valid JSON; delete that line (its question is "
                            "then re-run) or the file") from None
    return records, partial


def append_records(path: Path, records: list[dict]) -> None:
    """Append whole lines with one ``write`` and ``fsync`` (see the module docstring)."""
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def unique_sorted(records: list[dict], split_order: list[str]) -> tuple[list[dict], int]:
    """Records deduplicated by (split, question_id), first kept, in split/position order."""
    seen, out = set(), []
    for r in records:
        k = (r["split"], str(r["question_id"]))
        if k not in seen:
            seen.add(k)
            out.append(r)
    rank = {s: i for i, s in enumerate(split_order)}
    out.sort(key=lambda r: (rank.get(r["split"], len(rank)), r["split"], r["index"]))
    return out, len(records) - len(out)


# ----------------------------------------------------------------------------- answering
@lru_cache(maxsize=64)
def _image(path: Path):
    from .data import load_image

    return load_image(path)


def answer_jobs(lm, jobs: list[Job], config, generate: int = 0, template: str | None = None) -> list[dict]:
    """One batch of questions → one record per question (baseline and steered)."""
    from .batch import answer_batch, answer_pair, batch_inputs
    from .data import build_prompt, parse_answer, resolve_image

    prompts = [build_prompt(j.question.text, *([template] if template else [])) for j in jobs]
    images = [_image(resolve_image(j.question, j.image_dir)) for j in jobs]
    if generate:
        inputs = batch_inputs(lm, prompts, images, share_images=False)
        base = answer_batch(lm, prompts, images, config, False, inputs=inputs, max_new_tokens=generate)
        steer = answer_batch(lm, prompts, images, config, True, inputs=inputs, max_new_tokens=generate)
    else:
        base, steer = answer_pair(lm, prompts, images, config)
    out = []
    for j, b, s in zip(jobs, base, steer):
        q = j.question
        rec = {"split": j.split, "question_id": q.question_id, "index": j.position, "image": q.image,
               "text": q.text, "label": q.label,
               "baseline_answer": b["answer"], "baseline_margin": b["margin"],
               "steered_answer": s["answer"], "steered_margin": s["margin"],
               "flipped": b["answer"] != s["answer"], "layers_fired": s["layers_fired"],
               "h_mean": s["h_mean"], "mean_theta_rel": s["mean_theta_rel"],
               "max_dh_predicted": s["max_dh_predicted"]}
        if generate:
            rec.update(baseline_text=b["text"], baseline_text_answer=parse_answer(b["text"]),
                       steered_text=s["text"], steered_text_answer=parse_answer(s["text"]))
        out.append(rec)
    return out


def pending(jobs: list[Job], out: Path) -> list[Job]:
    """The jobs not yet in ``out/answers.jsonl`` (a partial last line is cut off first)."""
    done = {(r["split"], str(r["question_id"])) for r in read_records(out / ANSWERS, repair=True)[0]}
    return [j for j in jobs if j.key not in done]


def run_jobs(lm, todo: list[Job], config, out: Path, *, batch_size: int, generate: int = 0,
             on_batch=None, progress: bool = True, template: str | None = None) -> None:
    """Answer ``todo`` batch by batch, appending each batch to ``out/answers.jsonl``.

    ``on_batch(n)`` is called after the n-th batch is on disk (tests interrupt there).
    """
    from tqdm import tqdm

    with tqdm(total=len(todo), unit="q", desc="pope", disable=not progress or not todo,
              file=sys.stderr, dynamic_ncols=True) as bar:
        for n, start in enumerate(range(0, len(todo), batch_size), start=1):
            batch = todo[start:start + batch_size]
            append_records(out / ANSWERS, answer_jobs(lm, batch, config, generate, template))
            bar.set_postfix_str(batch[-1].split, refresh=False)
            bar.update(len(batch))
            if on_batch is not None:
                on_batch(n)


# ----------------------------------------------------------------------------- metrics
def metrics_table(records: list[dict], splits: list[str]):
    """POPE metrics per split (and pooled "all" for several splits) and condition."""
    import pandas as pd

    from .data import pope_metrics

    conditions = [("baseline", "baseline_answer"), ("steered", "steered_answer")]
    if records and "baseline_text_answer" in records[0]:
        conditions += [("baseline_text", "baseline_text_answer"), ("steered_text", "steered_text_answer")]
    rows = []
    for split in _split_groups(records, splits):
        sel = records if split == "all" else [r for r in records if r["split"] == split]
        for cond, col in conditions:
            m = pope_metrics([r["label"] for r in sel], [r[col] for r in sel])
            rows.append({"split": split, "condition": cond, **m})
    cols = ["split", "condition", "n", "accuracy", "precision", "recall", "f1", "yes_ratio", "tp", "fp", "tn", "fn"]
    return pd.DataFrame(rows, columns=cols)


def flips_table(records: list[dict], splits: list[str]):
    """Baseline → steered changes per split: yes→no, no→yes, right→wrong, wrong→right."""
    import pandas as pd

    sources = [("logit", "baseline_answer", "steered_answer")]
    if records and "baseline_text_answer" in records[0]:
        sources.append(("text", "baseline_text_answer", "steered_text_answer"))
    rows = []
    for split in _split_groups(records, splits):
        sel = records if split == "all" else [r for r in records if r["split"] == split]
        for source, bcol, scol in sources:
            pairs = [(r["label"], r[bcol], r[scol]) for r in sel]
            rows.append({"split": split, "answer": source, "n": len(pairs),
                         "flipped": sum(b != s for _, b, s in pairs),
                         "yes_to_no": sum(b == "yes" and s == "no" for _, b, s in pairs),
                         "no_to_yes": sum(b == "no" and s == "yes" for _, b, s in pairs),
                         "right_to_wrong": sum(b == lab and s != lab for lab, b, s in pairs),
                         "wrong_to_right": sum(b != lab and s == lab for lab, b, s in pairs)})
    return pd.DataFrame(rows)


def _split_groups(records, splits) -> list[str]:
    present = [s for s in splits if any(r["split"] == s for r in records)]
    present += sorted({r["split"] for r in records} - set(present))
    return present + (["all"] if len(present) > 1 else [])


def write_outputs(out: Path, records: list[dict], identity: dict) -> tuple:
    """metrics.csv, flips.csv and summary.html from the records; prints both tables."""
    import pandas as pd
    import plotly.express as px

    from .report import Section, write_page

    splits = identity.get("splits", [])
    metrics, flips = metrics_table(records, splits), flips_table(records, splits)
    metrics.to_csv(out / "metrics.csv", index=False)
    flips.to_csv(out / "flips.csv", index=False)
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.float_format", "{:.4f}".format):
        print(metrics.drop(columns=["tp", "fp", "tn", "fn"]).to_string(index=False))
        print()
        print(flips.to_string(index=False))
    long = metrics.melt(id_vars=["split", "condition"], value_vars=["accuracy", "f1", "yes_ratio"], var_name="metric")
    fig_m = px.bar(long, x="split", y="value", color="condition", barmode="group", facet_col="metric",
                   title="POPE metrics by condition", range_y=[0, 1])
    counts = flips.melt(id_vars=["split", "answer"], value_vars=["yes_to_no", "no_to_yes", "right_to_wrong",
                                                                 "wrong_to_right"], var_name="change")
    fig_f = px.bar(counts, x="split", y="value", color="change", barmode="group", facet_col="answer",
                   title="Answers changed by steering (baseline → steered)")
    frame = pd.DataFrame(records)
    frame["margin_change"] = frame.steered_margin - frame.baseline_margin
    fig_d = px.histogram(frame, x="margin_change", color="split", barmode="overlay", nbins=60,
                         title="Δ margin (steered − baseline logit Yes − No)")
    info = pd.DataFrame({"setting": list(_flat(identity)), "value": [str(v) for v in _flat(identity).values()]})
    n_flip = int(frame.flipped.sum())
    sections = [
        Section("Run", text=f"{len(frame)} questions; {n_flip} answers flipped by steering.", table=info),
        Section("Metrics", text="Answers are read from the first-token logits (margin > 0 → yes); "
                "*_text conditions score the generated text with POPE's parser.", figures=[fig_m], table=metrics),
        Section("Flips", figures=[fig_f], table=flips),
        Section("Margins", figures=[fig_d]),
    ]
    write_page(out / "summary.html", "mclcbf-diag pope", sections)
    return metrics, flips


# ----------------------------------------------------------------------------- commands
def _identity(args, config, files, shard) -> dict:
    model = args.model or "embedded"
    if args.model and Path(args.model).expanduser().exists():
        model = str(Path(args.model).expanduser().resolve())
    return {"format": 1, "model": model, "dtype": args.dtype, "preset": args.preset,
            "overrides": list(args.overrides), "config": config.to_dict(),
            "splits": [s for s, _, _ in files], "pope_files": [str(p) for _, p, _ in files],
            "limit": args.limit, "shard": None if shard is None else f"{shard[0]}/{shard[1]}",
            "generate": args.generate, "prompt": args.prompt}


def cmd_pope(args, on_batch=None) -> int:
    from .cli import _check_prompt, _config, _load, _out_dir

    for name, low in (("limit", 1), ("batch_size", 1), ("generate", 0)):
        v = getattr(args, name)
        if v is not None and v < low:
            raise UserError(f"--{name.replace('_', '-')} {v} must be >= {low}")
    config = _config(args)
    _check_prompt(args)
    shard = parse_shard(args.shard)
    files = question_files(args.split, args.pope_file, args.image_dir)
    jobs = select_jobs(files, args.limit, shard)
    if not jobs:
        raise UserError(f"--shard {args.shard} selects no questions (the splits hold fewer questions than "
                        "shards after --limit); use fewer shards")
    out = _out_dir(args, "reports/pope" if shard is None else f"reports/pope-shard-{shard[0]}-of-{shard[1]}")
    identity = _identity(args, config, files, shard)
    claim_out_dir(out, identity)
    todo = pending(jobs, out)
    if todo:
        lm = _load(args)
        run_jobs(lm, todo, config, out, batch_size=args.batch_size, generate=args.generate, on_batch=on_batch,
                 template=args.prompt)
    records, dups = unique_sorted(read_records(out / ANSWERS)[0], identity["splits"])
    if dups:
        print(f"note: {dups} duplicate rows in {out / ANSWERS} were ignored (first kept)")
    wanted = {j.key for j in jobs}
    records = [r for r in records if (r["split"], str(r["question_id"])) in wanted]
    write_outputs(out, records, identity)
    print(f"wrote {out}/{ANSWERS} ({len(records)} questions), metrics.csv, flips.csv, summary.html")
    return 0


def cmd_merge(args) -> int:
    out = Path(args.out)
    dirs = [Path(d) for d in args.shard_dirs]
    if any(out.resolve() == d.resolve() for d in dirs):
        raise UserError(f"merge OUT {out} is one of the shard folders; pass a new folder for the merged run")
    ids = [_read_run(d) for d in dirs]
    for d, ident in zip(dirs[1:], ids[1:]):
        diff = differing_keys(ids[0], ident, ignore=(*_INFO_KEYS, "shard"))
        if diff:
            raise UserError(f"{d} and {dirs[0]} ran different configurations (differ in: {', '.join(diff)}); "
                            "merge only shards of one run")
    if (out / RUN).is_file() and "merged_from" not in _read_run(out):
        raise UserError(f"{out} holds a pope run, not a merge; pass an empty folder as merge OUT")
    _report_shards([ident.get("shard") for ident in ids])
    records = []
    for d in dirs:
        recs, partial = read_records(d / ANSWERS)
        if partial:
            print(f"note: {d / ANSWERS} ends in a partial line (interrupted run); it was skipped")
        records += recs
    identity = {**ids[0], "shard": None, "merged_from": [str(d) for d in dirs]}
    records, dups = unique_sorted(records, identity["splits"])
    if not records:
        raise UserError(f"the folders {', '.join(map(str, dirs))} hold no answers yet; run the shards first")
    print(f"{len(records)} questions from {len(dirs)} folders; {dups} duplicate rows dropped")
    _report_missing(identity, records)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / RUN).write_text(json.dumps(identity, indent=2) + "\n")
        (out / ANSWERS).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    except OSError as exc:
        raise UserError(f"merge OUT {out}: cannot write there ({exc.strerror}); pass a writable folder") from None
    write_outputs(out, records, identity)
    print(f"wrote {out}/{ANSWERS}, metrics.csv, flips.csv, summary.html")
    return 0


def _read_run(d: Path) -> dict:
    try:
        return json.loads((d / RUN).read_text())
    except FileNotFoundError:
        raise UserError(f"{d} has no {RUN}; pass folders written by `mclcbf-diag pope --shard i/n --out DIR`") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{d / RUN} is unreadable ({exc}); rerun that shard into a fresh folder") from None


def _report_shards(shards: list[str | None]) -> None:
    parsed = [parse_shard(s) for s in shards if s is not None]
    ns = {n for _, n in parsed}
    if len(ns) > 1:
        print(f"warning: shards of different counts n: {sorted(ns)}")
    for n in ns:
        have = [i for i, m in parsed if m == n]
        missing = sorted(set(range(n)) - set(have))
        repeated = sorted({i for i in have if have.count(i) > 1})
        if missing:
            print(f"warning: missing shards {', '.join(f'{i}/{n}' for i in missing)}")
        if repeated:
            print(f"warning: shards given more than once: {', '.join(f'{i}/{n}' for i in repeated)}")


def _report_missing(identity: dict, records: list[dict]) -> None:
    files = [(s, Path(p), Path(p).parent) for s, p in zip(identity["splits"], identity["pope_files"])]
    try:
        expected = {j.key for j in select_jobs(files, identity.get("limit"), None)}
    except UserError as exc:
        print(f"note: cannot check for missing questions ({exc})")
        return
    got = {(r["split"], str(r["question_id"])) for r in records}
    missing = sorted(expected - got)
    if missing:
        shown = ", ".join(f"{s}:{q}" for s, q in missing[:5])
        print(f"warning: {len(missing)} questions missing (e.g. {shown}); run the missing shards and merge again")
    else:
        print("no questions missing")


# ----------------------------------------------------------------------------- parsers
def add_pope_parser(sub) -> argparse.ArgumentParser:
    from .cli import _barrier_options, _model_options, _prompt_option

    p = sub.add_parser("pope", help="baseline vs steered POPE evaluation: batched, resumable, sharded")
    g = p.add_argument_group("questions")
    g.add_argument("--split", default="all", choices=[*SPLITS, "all"], help="POPE split(s) (default all)")
    g.add_argument("--pope-file", default=None,
                   help="a POPE file; '{split}' in the name is replaced by each split (default: the embedded set)")
    g.add_argument("--image-dir", default=None, help="folder with the images (default: beside the POPE file)")
    g.add_argument("--limit", type=int, default=None, help="only the first N questions of each split")
    _prompt_option(g)
    g.add_argument("--shard", default=None, metavar="I/N",
                   help="only questions at positions p with p %% N == I (I is 0-based); merge shards with `merge`")
    _model_options(p)
    p.add_argument("--device-map", default=None, help="passed to from_pretrained, e.g. auto (needs accelerate)")
    _barrier_options(p)
    p.add_argument("--batch-size", type=int, default=16, help="questions per forward (default 16)")
    p.add_argument("--generate", type=int, default=0, metavar="N",
                   help="also generate N tokens greedily per condition and score the text (steering: prefill only)")
    p.add_argument("--out", default=None,
                   help="output folder (default reports/pope, or reports/pope-shard-I-of-N); rerun to resume")
    p.set_defaults(func=cmd_pope)
    return p


def add_merge_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("merge", help="merge `pope --shard` runs and recompute metrics and summary")
    p.add_argument("out", help="folder for the merged run")
    p.add_argument("shard_dirs", nargs="+", metavar="SHARD_DIR", help="folders of `pope --shard i/n` runs")
    p.set_defaults(func=cmd_merge)
    return p

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
* **Checks first.** Every option, knob (``layers`` against the depth in ``config.json``),
  question file, image path and header, prompt length (with the tokenizer) and the
  output folder is checked BEFORE anything is written or the weights are read; a
  mistake costs no time and leaves nothing behind.
* **Identity.** ``run.json`` holds everything that changes an answer: model (and its
  files' names, sizes, times), dtype, knobs, prompt, limit, the POPE files' SHA-256 and a
  fingerprint (names, sizes, modification times) of every image the questions name. Every
  answers line carries ``run_id``, a digest of that identity (the shard left out), so rows
  of different runs can never be mixed, even when ``run.json`` is lost.
* **One writer.** ``--out`` is locked (``flock`` on ``.mclcbf-diag.lock``, see
  :mod:`mclcbf_diag.storage`) for the whole run; a second process on the same folder is
  refused, naming the holder. The kernel drops the lock of a killed process.
* **Crash safety.** A batch's lines are appended with ONE ``write`` followed by
  ``fsync``, so a kill leaves whole batches plus at most one partial last line. On
  resume the partial line is cut off, the questions already in the file are skipped,
  and the run continues; a different configuration in ``run.json`` is refused, naming
  the keys that differ (batch size, device and threads may change: they do not change
  the answers). A folder with a ``run.json`` but no answers yet (a run that failed
  before its first batch) is simply taken over. A damaged or missing ``run.json`` is
  rebuilt from the command line when every answers line carries this run's ``run_id``
  (the damaged file is kept as ``run.json.damaged``). ``run.json``, the CSVs and the page
  are replaced atomically (temporary file, fsync, rename).
* **Bounded memory.** Decoded images are cached up to ``MCLCBF_DIAG_IMAGE_CACHE_MB``
  megabytes (default 512), not by count.
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
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .storage import (FolderLock, append_bytes, atomic_write, atomic_write_text, check_writable, digest, files_fingerprint,
                      make_dir, reason, sha256_file, show)

SPLITS = ("random", "popular", "adversarial")
EMBEDDED_POPE = Path(__file__).resolve().parent / "zoo" / "pope"
RUN, ANSWERS = "run.json", "answers.jsonl"
_INFO_KEYS = ("preset", "overrides", "merged_from", "image_dirs")  # stored in run.json, not compared
FORMAT = 2
MAX_BATCH_SIZE = 4096


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
    m = re.fullmatch(r"\s*(\d{1,9})\s*/\s*(\d{1,9})\s*", text)
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


def job_image(job: Job) -> Path:
    """The job's image path, contained in its image folder (see ``data.resolve_image``)."""
    from .data import resolve_image

    return resolve_image(job.question, job.image_dir)


def check_images(jobs: list[Job]) -> None:
    """Every image exists and its header is readable and within the size limit (not decoded)."""
    from PIL import Image

    from .data.pope import check_image_size, max_image_pixels

    limit = max_image_pixels()
    seen = set()
    for j in jobs:
        path = job_image(j)
        if path in seen:
            continue
        seen.add(path)
        where = f"question_id {j.question.question_id!r} ({j.split})"
        if not path.is_file():
            raise UserError(f"{where}: image {show(path)} not found; pass --image-dir pointing at the folder "
                            "holding it")
        try:
            with Image.open(path) as img:
                size = img.size
        except Image.DecompressionBombError:
            size = (limit + 1, 1)
        except (OSError, SyntaxError, ValueError) as exc:
            raise UserError(f"{where}: image {show(path)} cannot be read ({exc}); replace the file or pass "
                            "--image-dir pointing at a folder with intact images") from None
        check_image_size(path, size, limit)


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


def run_id(identity: dict) -> str:
    """Digest of what changes an answer (info keys and the shard left out): stamped on every row."""
    return digest({k: v for k, v in identity.items() if k not in (*_INFO_KEYS, "shard")})


def _load_run(path: Path) -> dict | None:
    """run.json as a dict, or None when it is empty, unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def claim_out_dir(out: Path, identity: dict) -> bool:
    """Write ``run.json``, or check that the run already in ``out`` is this one.

    Returns True when ``run.json`` was (re)written for a folder without answers (so a
    failure before the first batch may remove it again). See the module docstring for
    taking over answer-less folders and rebuilding a damaged ``run.json``.
    """
    path = out / RUN
    rows, _ = read_records(out / ANSWERS)
    rid = run_id(identity)
    if path.exists():
        old = _load_run(path)
        if old is not None:
            diff = differing_keys(old, identity)
            if not diff:
                return False
            if rows:
                raise UserError(f"--out {show(out)} holds a run with another configuration (differs in: "
                                f"{', '.join(diff)}); rerun with the same options to resume, or pass another --out")
            print(f"note: {show(out)} held a run with no answers yet; its {RUN} now describes this run",
                  file=sys.stderr)
            _write_run(path, identity)
            return True
        if rows:
            foreign = [r for r in rows if r.get("run_id") != rid]
            if foreign:
                raise UserError(f"{show(path)} is damaged and {len(foreign)} rows of {ANSWERS} do not carry this "
                                f"run's run_id, so they may come from other options; rerun with the options of "
                                f"that run, or pass another --out")
            try:
                os.replace(path, out / (RUN + ".damaged"))
            except OSError as exc:
                raise UserError(f"{show(path)} is damaged and cannot be moved aside ({reason(exc)}); make "
                                f"{show(out)} writable") from None
            print(f"note: {show(path)} was damaged (kept as {RUN}.damaged); rebuilt it from this command, "
                  f"whose run_id all {len(rows)} answers carry", file=sys.stderr)
            _write_run(path, identity)
            return False
        _write_run(path, identity)
        return True
    if rows:
        foreign = [r for r in rows if r.get("run_id") != rid]
        if foreign:
            raise UserError(f"{show(out)} holds {ANSWERS} without {RUN}, and {len(foreign)} of its rows do not "
                            "carry this run's run_id; rerun with the options of that run, or pass another --out")
        print(f"note: {show(path)} was missing; rebuilt it from this command, whose run_id all "
              f"{len(rows)} answers carry", file=sys.stderr)
        _write_run(path, identity)
        return False
    _write_run(path, identity)
    return True


def _write_run(path: Path, identity: dict) -> None:
    atomic_write_text(path, json.dumps(identity, indent=2) + "\n")


# ----------------------------------------------------------------------------- answers.jsonl
_FIELDS = {"split": (str,), "question_id": (int, str), "index": (int,), "label": (str,),
           "baseline_answer": (str,), "steered_answer": (str,), "baseline_margin": (int, float),
           "steered_margin": (int, float), "flipped": (bool,)}


def _check_row(row: object) -> str | None:
    """What is wrong with one answers row, or None."""
    if not isinstance(row, dict):
        return f"a JSON {type(row).__name__}, not an object"
    for key, types in _FIELDS.items():
        if key not in row:
            return f"field {key!r} is missing"
        v = row[key]
        if not isinstance(v, types) or (bool not in types and isinstance(v, bool)):
            return f"field {key!r} is {v!r}, not {' or '.join(t.__name__ for t in types)}"
    for key in ("label", "baseline_answer", "steered_answer"):
        if row[key] not in ("yes", "no"):
            return f"field {key!r} is {row[key]!r}, not 'yes' or 'no'"
    return None


def read_records(path: Path, *, repair: bool = False) -> tuple[list[dict], bool]:
    """Whole lines of ``answers.jsonl`` and whether a partial last line was dropped.

    ``repair=True`` also truncates the file after its last complete line, so appends
    start on a fresh line. A line that is not UTF-8, not JSON, or not a complete answers
    row is a UserError naming the file and the line.
    """
    if not path.is_file():
        return [], False
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {show(path)} ({reason(exc)}); make it readable") from None
    cut = data.rfind(b"\n") + 1
    partial = cut < len(data)
    if partial and repair:
        try:
            os.truncate(path, cut)
        except OSError as exc:
            raise UserError(f"cannot cut the partial last line of {show(path)} ({reason(exc)}); make it "
                            "writable, then rerun the same command") from None
    records = []
    fix = "delete that line (its question is then re-run) and rerun the same command"
    for lineno, raw in enumerate(data[:cut].split(b"\n")[:-1], start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UserError(f"{show(path)}, line {lineno} is not UTF-8 (byte {exc.start}); {fix}") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            raise UserError(f"{show(path)}, line {lineno} is not valid JSON; {fix}") from None
        problem = _check_row(row)
        if problem:
            raise UserError(f"{show(path)}, line {lineno} is not an answers row ({problem}); {fix}")
        records.append(row)
    return records, partial


def _encode_rows(records: list[dict]) -> bytes:
    out = []
    for r in records:
        try:
            out.append((json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8"))
        except UnicodeEncodeError:  # a lone surrogate (from a "\udcff" escape): keep it escaped
            out.append((json.dumps(r, ensure_ascii=True) + "\n").encode("ascii"))
    return b"".join(out)


def append_records(path: Path, records: list[dict]) -> None:
    """Append whole lines with one ``write`` and ``fsync`` (see the module docstring)."""
    append_bytes(path, _encode_rows(records))


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
class _ImageCache:
    """Decoded images by path, least recently used dropped first, bounded in BYTES."""

    def __init__(self, env: str = "MCLCBF_DIAG_IMAGE_CACHE_MB", default_mb: int = 512):
        self.env, self.default_mb = env, default_mb
        self.items: OrderedDict[Path, object] = OrderedDict()
        self.nbytes = 0

    @property
    def budget(self) -> int:
        from .data.pope import _env_limit

        return _env_limit(self.env, self.default_mb) * 2**20

    def __call__(self, path: Path):
        from .data import load_image

        path = Path(path)
        if path in self.items:
            self.items.move_to_end(path)
            return self.items[path]
        img = load_image(path)
        size = img.width * img.height * len(img.getbands())
        budget = self.budget
        while self.items and self.nbytes + size > budget:
            _, old = self.items.popitem(last=False)
            self.nbytes -= old.width * old.height * len(old.getbands())
        if size <= budget:
            self.items[path] = img
            self.nbytes += size
        return img

    def cache_clear(self) -> None:
        self.items.clear()
        self.nbytes = 0


_image = _ImageCache()


def answer_jobs(lm, jobs: list[Job], config, generate: int = 0, template: str | None = None) -> list[dict]:
    """One batch of questions → one record per question (baseline and steered)."""
    from .batch import answer_batch, answer_pair, batch_inputs
    from .data import build_prompt, parse_answer, resolve_image

    prompts = [build_prompt(j.question.text, *([template] if template else [])) for j in jobs]
    images = [_image(resolve_image(j.question, j.image_dir)) for j in jobs]
    rid = getattr(lm, "run_id", None)
    if generate:
        inputs = batch_inputs(lm, prompts, images, share_images=False)
        base = answer_batch(lm, prompts, images, config, False, inputs=inputs, max_new_tokens=generate)
        steer = answer_batch(lm, prompts, images, config, True, inputs=inputs, max_new_tokens=generate)
    else:
        base, steer = answer_pair(lm, prompts, images, config)
    out = []
    for j, b, s in zip(jobs, base, steer):
        q = j.question
        rec = {**({"run_id": rid} if rid else {}), "split": j.split, "question_id": q.question_id, "index": j.position, "image": q.image,
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


def pending(jobs: list[Job], out: Path, rid: str | None = None) -> list[Job]:
    """The jobs not yet in ``out/answers.jsonl`` (a partial last line is cut off first).

    With ``rid``, a row stamped with another run_id is refused (rows of two runs never mix).
    """
    rows = read_records(out / ANSWERS, repair=True)[0]
    if rid is not None:
        for n, r in enumerate(rows, start=1):
            if "run_id" in r and r["run_id"] != rid:
                raise UserError(f"{show(out / ANSWERS)}: row {n} was written by another run (run_id {r['run_id']}, "
                                f"this one is {rid}); pass another --out, or rerun with that run's options")
    done = {(r["split"], str(r["question_id"])) for r in rows}
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
    atomic_write_text(out / "metrics.csv", metrics.to_csv(index=False))
    atomic_write_text(out / "flips.csv", flips.to_csv(index=False))
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
def _model_files(where: str) -> str | None:
    """Fingerprint of a local model folder's weights, config and tokenizer files (None for a hub id)."""
    folder = Path(where)
    if not folder.is_dir():
        return None
    names = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
             and p.suffix in (".safetensors", ".json", ".jinja", ".model", ".txt") and p.name != "training.json"]
    return files_fingerprint(names, base=folder)


def _identity(args, config, files, shard, all_jobs: list[Job] | None = None, where: str | None = None) -> dict:
    model = args.model or "embedded"
    if args.model and Path(args.model).expanduser().exists():
        model = str(Path(args.model).expanduser().resolve())
    ident = {"format": FORMAT, "model": model, "dtype": args.dtype, "preset": args.preset,
             "overrides": list(args.overrides), "config": config.to_dict(),
             "splits": [s for s, _, _ in files], "pope_files": [str(p) for _, p, _ in files],
             "limit": args.limit, "shard": None if shard is None else f"{shard[0]}/{shard[1]}",
             "generate": args.generate, "prompt": args.prompt}
    if where is not None:
        ident["model_files"] = _model_files(where)
    ident["pope_sha256"] = [sha256_file(p) for _, p, _ in files]
    if all_jobs is not None:
        ident["images"] = files_fingerprint([job_image(j) for j in all_jobs])
        ident["image_dirs"] = sorted({str(Path(d).resolve()) for _, _, d in files})
    return ident


def _check_numbers(args) -> None:
    from .cli import max_new_tokens_limit

    for name, low in (("limit", 1), ("batch_size", 1), ("generate", 0)):
        v = getattr(args, name)
        if v is not None and v < low:
            raise UserError(f"--{name.replace('_', '-')} {v} must be >= {low}")
    if args.batch_size > MAX_BATCH_SIZE:
        raise UserError(f"--batch-size {args.batch_size} is more than {MAX_BATCH_SIZE}; pass a smaller batch "
                        "(16–64 is typical)")
    cap = max_new_tokens_limit()
    if args.generate > cap:
        raise UserError(f"--generate {args.generate} is more than the limit of {cap} new tokens; pass a smaller "
                        "number, or raise the limit with MCLCBF_DIAG_MAX_NEW_TOKENS=N")


def cmd_pope(args, on_batch=None) -> int:
    from .cli import _check_prompt, _config, _early_checks, _load_weights, _prepare

    from .data import build_prompt

    # 1. Everything that needs no model: numbers, shard, knobs vs. the depth, files, images, --out.
    _check_numbers(args)
    shard = parse_shard(args.shard)
    _early_checks(args)
    _check_prompt(args)
    files = question_files(args.split, args.pope_file, args.image_dir)
    all_jobs = select_jobs(files, args.limit, None)
    jobs = [j for j in all_jobs if shard is None or j.position % shard[1] == shard[0]]
    if not jobs:
        raise UserError(f"--shard {args.shard} selects no questions (the splits hold fewer questions than "
                        "shards after --limit); use fewer shards")
    for j in all_jobs:
        job_image(j)  # every image path stays inside its folder
    check_images(jobs)
    out = check_writable(args.out or ("reports/pope" if shard is None
                                      else f"reports/pope-shard-{shard[0]}-of-{shard[1]}"))
    answers = out / ANSWERS
    if answers.exists() and not os.access(answers, os.W_OK):
        raise UserError(f"{show(answers)} is read-only, so the run cannot resume; make it writable "
                        f"(chmod u+w {show(answers)}) or pass another --out")
    facts = _model_facts(args)  # imports torch and transformers: after the cheap checks
    config = _config(args, facts.n_layers)
    # 2. The tokenizer (not the weights): dtype, device and every prompt's length.
    prep = _prepare(args)
    prompts = [build_prompt(j.question.text, args.prompt) for j in jobs]
    from .models.loading import check_prompt_lengths

    check_prompt_lengths(prep, prompts, [f"question_id {j.question.question_id!r} ({j.split})" for j in jobs],
                         max_new_tokens=args.generate)
    identity = _identity(args, config, files, shard, all_jobs, prep.where)
    rid = run_id(identity)
    # 3. Only now write: lock the folder, claim it, answer what is missing.
    make_dir(out)
    with FolderLock(out):
        fresh = claim_out_dir(out, identity)
        todo = pending(jobs, out, rid)
        if todo:
            try:
                lm = _load_weights(args, prep)
            except BaseException:
                if fresh and not read_records(answers)[0]:
                    _forget_run(out)
                raise
            lm.run_id = rid
            run_jobs(lm, todo, config, out, batch_size=args.batch_size, generate=args.generate,
                     on_batch=on_batch, template=args.prompt)
        records, dups = unique_sorted(read_records(answers)[0], identity["splits"])
        if dups:
            print(f"note: {dups} duplicate rows in {show(answers)} were ignored (first kept)")
        wanted = {j.key for j in jobs}
        records = [r for r in records if (r["split"], str(r["question_id"])) in wanted]
        write_outputs(out, records, identity)
    print(f"wrote {show(out)}/{ANSWERS} ({len(records)} questions), metrics.csv, flips.csv, summary.html")
    return 0


def _model_facts(args):
    from .models.loading import model_facts

    return model_facts(args.model)


def _forget_run(out: Path) -> None:
    """Undo a claim that never produced an answer (the folder is left as it was found)."""
    for name in (RUN, ANSWERS):
        try:
            (out / name).unlink()
        except OSError:
            pass


def cmd_merge(args) -> int:
    out = Path(args.out)
    dirs = [Path(d) for d in args.shard_dirs]
    if any(out.resolve() == d.resolve() for d in dirs):
        raise UserError(f"merge OUT {show(out)} is one of the shard folders; pass a new folder for the merged run")
    ids = [_read_run(d) for d in dirs]
    for d, ident in zip(dirs[1:], ids[1:]):
        diff = differing_keys(ids[0], ident, ignore=(*_INFO_KEYS, "shard"))
        if diff:
            raise UserError(f"{show(d)} and {show(dirs[0])} ran different configurations (differ in: "
                            f"{', '.join(diff)}); merge only shards of one run")
    if (out / RUN).is_file() and "merged_from" not in _read_run(out):
        raise UserError(f"{show(out)} holds a pope run, not a merge; pass an empty folder as merge OUT")
    check_writable(out, "merge OUT")
    _check_inputs_unchanged(ids[0])
    _report_shards([ident.get("shard") for ident in ids])
    rid = run_id(ids[0])
    records = []
    for d in dirs:
        recs, partial = read_records(d / ANSWERS)
        if partial:
            print(f"note: {show(d / ANSWERS)} ends in a partial line (interrupted run); it was skipped")
        foreign = [r for r in recs if "run_id" in r and r["run_id"] != rid]
        if foreign:
            raise UserError(f"{show(d / ANSWERS)} holds {len(foreign)} rows of another run (run_id "
                            f"{foreign[0]['run_id']}, {RUN} says {rid}); rerun that shard into a fresh folder")
        records += recs
    identity = {**ids[0], "shard": None, "merged_from": [str(d) for d in dirs]}
    records, dups = unique_sorted(records, identity["splits"])
    if not records:
        raise UserError(f"the folders {', '.join(map(show, dirs))} hold no answers yet; run the shards first")
    print(f"{len(records)} questions from {len(dirs)} folders; {dups} duplicate rows dropped")
    _report_missing(identity, records)
    make_dir(out, "merge OUT")
    with FolderLock(out, "merge OUT"):
        atomic_write_text(out / RUN, json.dumps(identity, indent=2) + "\n")
        atomic_write(out / ANSWERS, _encode_rows(records))
        write_outputs(out, records, identity)
    print(f"wrote {show(out)}/{ANSWERS}, metrics.csv, flips.csv, summary.html")
    return 0


def _check_inputs_unchanged(identity: dict) -> None:
    """merge: the POPE files the shards read must still be the same files (content hash)."""
    for path, want in zip(identity.get("pope_files", []), identity.get("pope_sha256", [])):
        try:
            got = sha256_file(path)
        except OSError:
            print(f"note: {path} (read by the shards) is gone; cannot check for missing questions against it")
            continue
        if got != want:
            raise UserError(f"{path} changed since the shards ran (sha256 {got[:12]}… instead of {want[:12]}…); "
                            "rerun the shards on the current file, or restore the file they read")


def _read_run(d: Path) -> dict:
    if not (d / RUN).exists():
        raise UserError(f"{show(d)} has no {RUN}; pass folders written by `mclcbf-diag pope --shard i/n --out DIR`")
    run = _load_run(d / RUN)
    if run is None:
        raise UserError(f"{show(d / RUN)} is empty or damaged; rerun that shard's pope command (same options: it "
                        "rebuilds run.json and keeps the answers), then merge again")
    return run


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

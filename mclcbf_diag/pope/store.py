"""A POPE run's folder: its identity (``run.json``) and its answers (``answers.jsonl``), safe against kills and mixing.

:func:`resumed` is the protocol every resumable command (``pope``, the population
``explain``) follows on its folder: lock it, claim it for this run's identity, answer only
the questions it does not hold yet, then read back every row of the selected questions for
the outputs, still under the lock; a run that fails before its first answer leaves the
folder as it found it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UserError
from ..storage import FolderLock, append_bytes, atomic_write, atomic_write_text, digest, make_dir, reason, show

if TYPE_CHECKING:
    from .jobs import Job

RUN, ANSWERS = "run.json", "answers.jsonl"
INFO_KEYS = ("preset", "overrides", "merged_from", "image_dirs", "resumed_anyway", "partial")  # not compared
VERSIONS = "versions"  # torch/transformers/nnsight: compared, but a resume may accept them (--resume-anyway)
# Where the question files and images sit, not what they hold (``pope_sha256`` and ``images`` are compared): a
# project folder moved or checked out elsewhere resumes its runs, and run.json then names them where they are now
# (``image_dirs``, an info key, with them). A local model folder's path and a labels file's path are locations too
# (:func:`unlocated`): ``model_files`` and the labels' ``sha256`` are compared.
LOCATIONS = ("pope_files", "image_dir_option")
CONTENT_KEYS = ("images", "model_files", "pope_sha256")  # digests of what the run read, compared by content


FORMAT = 2


def flat_keys(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_keys(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def local_model(identity: dict) -> bool:
    """The run read a model folder named by its path (``--model DIR``), not a hub id or the embedded model: the
    path is where the folder sits, and ``model_files``, its files' digest, says what it holds."""
    model = identity.get("model")
    return isinstance(model, str) and Path(model).is_absolute() and identity.get("model_files") is not None


def model_key(identity: dict):
    """What names the model a run read wherever its files sit: a folder's digest, else the hub id (or "embedded")."""
    return ("files", identity["model_files"]) if local_model(identity) else identity.get("model")


def unlocated(identity: dict) -> dict:
    """``identity`` without where its files sit (their contents' digests stay): the question files and the
    ``--image-dir`` as given (:data:`LOCATIONS`), a local model folder's path and a labels file's path."""
    out = {k: v for k, v in identity.items() if k not in LOCATIONS}
    if local_model(identity):
        out["model"] = "local folder"
    if isinstance(out.get("labels"), dict):
        out["labels"] = {k: v for k, v in out["labels"].items() if k != "file"}
    return out


def located(identity: dict) -> dict:
    """The fields of ``identity`` that say where its files sit (what a resume elsewhere rewrites in run.json)."""
    out = {k: identity[k] for k in (*LOCATIONS, "image_dirs") if k in identity}
    if local_model(identity):
        out["model"] = identity["model"]
    if isinstance(identity.get("labels"), dict):
        out["labels"] = identity["labels"]
    return out


def differing_keys(a: dict, b: dict, ignore=INFO_KEYS) -> list[str]:
    """Flattened keys (``config.tau_prefill``…) whose values differ, ``ignore`` and where files sit left out."""
    fa = flat_keys({k: v for k, v in unlocated(a).items() if k not in ignore})
    fb = flat_keys({k: v for k, v in unlocated(b).items() if k not in ignore})
    return sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k))


def describe(a: dict, b: dict, keys: list[str]) -> str:
    """``keys`` with both values where they are short: ``batch_size (16 in run.json, now 4)``."""
    fa, fb = flat_keys(a), flat_keys(b)
    parts = []
    for k in keys:
        old, new = fa.get(k), fb.get(k)
        short = all(len(json.dumps(v, default=str)) <= 40 for v in (old, new))
        parts.append(f"{k} ({json.dumps(old, default=str)} in {RUN}, now {json.dumps(new, default=str)})" if short
                     else k)
    return ", ".join(parts)


def run_id(identity: dict) -> str:
    """Digest of what changes an answer (info keys, where the files sit, the shard and the package versions left
    out): stamped on every row. Versions are compared when a run resumes, but ``--resume-anyway`` accepts them,
    so the rows of such a run keep one run_id."""
    return _answer_digest(unlocated(identity))


def earlier_run_id(identity: dict) -> str:
    """The run_id releases before this one stamped: a local model folder's path and a labels file's path in it."""
    return _answer_digest({k: v for k, v in identity.items() if k not in LOCATIONS})


def _answer_digest(identity: dict) -> str:
    return digest({k: v for k, v in identity.items() if k not in (*INFO_KEYS, "shard", VERSIONS)})


def restamped(out: Path, rows: list[dict], identity: dict) -> list[dict]:
    """Rows stamped with the earlier run_id of ``identity``, restamped with its run_id (answers.jsonl rewritten
    atomically, with a note); other rows untouched. A run from before a folder's path left the run_id resumes."""
    old, new = earlier_run_id(identity), run_id(identity)
    if old == new or not any(r.get("run_id") == old for r in rows):
        return rows
    rows = [{**r, "run_id": new} if r.get("run_id") == old else r for r in rows]
    atomic_write(out / ANSWERS, encode_rows(rows))
    print(f"note: {show(out / ANSWERS)} carried the run_id of an earlier release (which counted a model folder's or "
          "labels file's path); its rows now carry this run's", file=sys.stderr)
    return rows


def load_run(path: Path) -> dict | None:
    """run.json as a dict, or None when it is empty, unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _refuse_foreign(rows: list[dict], rid: str, problem: str) -> None:
    """Refuse answers another run wrote (``problem`` with ``{n}``, their count), naming the fix."""
    foreign = [r for r in rows if r.get("run_id") != rid]
    if foreign:
        raise UserError(problem.replace("{n}", str(len(foreign))) + "; rerun with the options of that run, or pass "
                        "another --out")


def claim_out_dir(out: Path, identity: dict, resume_anyway: bool = False) -> bool:
    """Write ``run.json``, or check that the run already in ``out`` is this one.

    See the module docstring for taking over answer-less folders and rebuilding a damaged ``run.json``.

    Args:
        out: the run folder.
        identity: this run's description (what ``run.json`` holds).
        resume_anyway: accept answers written with other package versions (and record that in ``run.json``).

    Returns:
        True when ``run.json`` was (re)written for a folder without answers (so a failure before the first
        batch may remove it again); False when the folder's answers continue under it.

    Raises:
        UserError: the folder's answers belong to a run with another configuration (or other versions without
            ``resume_anyway``), rows of another run_id sit beside a damaged or missing ``run.json``, or the
            folder's files cannot be read or moved.
    """
    path = out / RUN
    rows, _ = read_records(out / ANSWERS)
    rid = run_id(identity)
    if path.exists():
        old = load_run(path)
        if old is not None:
            diff = differing_keys(old, identity)
            if not diff:
                restamped(out, rows, old)  # before run.json moves: a kill between the two leaves both as they were
                moved = {k: v for k, v in located(identity).items() if old.get(k) != v}
                if moved:  # the same files (their digests are compared) found elsewhere: record where they are now
                    _write_run(path, {**old, **moved})
                return False
            versions_only = all(k.startswith(VERSIONS + ".") for k in diff)
            if rows and versions_only and resume_anyway:
                note = {VERSIONS: identity.get(VERSIONS), "at": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": len(rows)}
                restamped(out, rows, old)
                _write_run(path, {**old, "resumed_anyway": [*old.get("resumed_anyway", []), note]})
                print(f"note: resuming {show(out)} with other package versions ({describe(old, identity, diff)}), "
                      f"as --resume-anyway asks; recorded in {RUN}", file=sys.stderr)
                return False
            if rows:
                if versions_only:
                    fix = ("pass --resume-anyway to resume with these versions (recorded in run.json), rerun with "
                           "the versions of that run, or pass another --out")
                elif set(diff) <= set(CONTENT_KEYS):
                    fix = ("the files it read now hold other bytes, or it was written by a release that named files "
                           "by path and time, whose runs cannot resume; restore the files it read, or pass another "
                           "--out")
                else:
                    fix = "rerun with the same options to resume, or pass another --out"
                raise UserError(f"--out {show(out)} holds a run with another configuration (differs in: "
                                f"{describe(old, identity, diff)}); {fix}")
            print(f"note: {show(out)} held a run with no answers yet; its {RUN} now describes this run",
                  file=sys.stderr)
            _write_run(path, identity)
            return True
        if rows:
            rows = restamped(out, rows, identity)
            _refuse_foreign(rows, rid, f"{show(path)} is damaged and {{n}} rows of {ANSWERS} do not carry this run's "
                                       "run_id, so they may come from other options")
            try:
                os.replace(path, out / (RUN + ".damaged"))
            except OSError as exc:
                raise UserError(f"{show(path)} is damaged and cannot be moved aside ({reason(exc)}); make "
                                f"{show(out)} writable") from None
            return _rebuilt(path, identity, rows, f"{show(path)} was damaged (kept as {RUN}.damaged)")
        _write_run(path, identity)
        return True
    if rows:
        rows = restamped(out, rows, identity)
        _refuse_foreign(rows, rid, f"{show(out)} holds {ANSWERS} without {RUN}, and {{n}} of its rows do not carry "
                                   "this run's run_id")
        return _rebuilt(path, identity, rows, f"{show(path)} was missing")
    _write_run(path, identity)
    return True


def _rebuilt(path, identity: dict, rows: list, what: str) -> bool:
    """Write ``identity`` as the run's description, rebuilt from this command (its answers carry its run_id)."""
    print(f"note: {what}; rebuilt it from this command, whose run_id all {len(rows)} answers carry", file=sys.stderr)
    _write_run(path, identity)
    return False


def _write_run(path: Path, identity: dict) -> None:
    atomic_write_text(path, json.dumps(identity, indent=2) + "\n")


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

    Args:
        path: the answers file (absent: no rows).
        repair: also truncate the file after its last complete line, so appends start on a fresh line.

    Returns:
        ``(rows, partial)``: the complete lines' rows (blank lines skipped), and whether a partial last line
        was dropped.

    Raises:
        UserError: the file cannot be read (or repaired), or a line is not UTF-8, not JSON, or not a complete
            answers row (naming the file and the line).
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


def encode_rows(records: list[dict]) -> bytes:
    out = []
    for r in records:
        try:
            out.append((json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8"))
        except UnicodeEncodeError:  # a lone surrogate (from a "\udcff" escape): keep it escaped
            out.append((json.dumps(r, ensure_ascii=True) + "\n").encode("ascii"))
    return b"".join(out)


def append_records(path: Path, records: list[dict]) -> None:
    """Append whole lines with one ``write`` and ``fsync`` (see the module docstring)."""
    append_bytes(path, encode_rows(records))


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


def pending(jobs: list[Job], out: Path, rid: str | None = None) -> list[Job]:
    """The jobs not yet in ``out/answers.jsonl`` (a partial last line is cut off first).

    Args:
        jobs: the run's jobs.
        out: the run folder.
        rid: this run's run_id; a row stamped with another is refused (rows of two runs never mix). None: not checked.

    Returns:
        The jobs without a row, in order.

    Raises:
        UserError: a row written by another run.
    """
    rows = read_records(out / ANSWERS, repair=True)[0]
    if rid is not None:
        for n, r in enumerate(rows, start=1):
            if "run_id" in r and r["run_id"] != rid:
                raise UserError(f"{show(out / ANSWERS)}: row {n} was written by another run (run_id {r['run_id']}, "
                                f"this one is {rid}); pass another --out, or rerun with that run's options")
    done = {(r["split"], str(r["question_id"])) for r in rows}
    return [j for j in jobs if j.key not in done]


def check_resumable(out: Path) -> None:
    """Refuse, before any model is loaded, a folder whose answers a rerun could not append to."""
    answers = out / ANSWERS
    if answers.exists() and not os.access(answers, os.W_OK):
        raise UserError(f"{show(answers)} is read-only, so the run cannot resume; make it writable "
                        f"(chmod u+w {show(answers)}) or pass another --out")


def forget_claim(out: Path) -> None:
    """Undo a claim that never produced an answer (the folder is left as it was found)."""
    for name in (RUN, ANSWERS):
        try:
            (out / name).unlink()
        except OSError:
            pass


@contextmanager
def resumed(out: Path, identity: dict, jobs: list, load: Callable, answer: Callable, resume_anyway: bool = False):
    """Answer the ``jobs`` that ``out`` lacks; yield the folder's rows of all ``jobs``, locked.

    The caller writes its outputs inside the block, before the lock is released.

    Args:
        out: the run folder (made if needed).
        identity: this run's description (:func:`claim_out_dir`; its ``splits`` order the rows).
        jobs: every question of the run.
        load: ``load()`` returns the model; called only when something is left to answer.
        answer: ``answer(model, todo)`` appends the missing rows.
        resume_anyway: see :func:`claim_out_dir`.

    Returns:
        A context manager yielding the rows of ``jobs``, sorted by split order and position in the split,
        duplicates dropped (first kept, with a note).

    Raises:
        UserError: the folder is locked by another command, belongs to another run (:func:`claim_out_dir`,
            :func:`pending`) or its answers cannot be read.
    """
    with resumed_together([out], [identity], jobs, load, lambda model, todos: answer(model, todos[0]),
                          resume_anyway) as rows:
        yield rows[0]


@contextmanager
def resumed_together(outs: list[Path], identities: list[dict], jobs: list, load: Callable, answer: Callable,
                     resume_anyway: bool = False):
    """:func:`resumed` for several run folders answered by one pass (``pope --seeds``: one forward, a draw per seed).

    Every folder is locked and claimed for its own identity before anything is answered; the model loads once when
    any folder lacks a question. A failed load leaves every folder that held no answer as it was found.

    Args:
        outs: the run folders (each made if needed).
        identities: each folder's run description (:func:`claim_out_dir`; its ``splits`` order the rows).
        jobs: every question of the run, the same for every folder.
        load: ``load()`` returns the model; called only when some folder lacks a question.
        answer: ``answer(model, todos)`` gets each folder's missing jobs (``todos[i]`` for ``outs[i]``, possibly
            empty) and appends each folder's rows.
        resume_anyway: see :func:`claim_out_dir`.

    Returns:
        A context manager yielding, per folder, the rows of ``jobs`` (as :func:`resumed`).

    Raises:
        UserError: as :func:`resumed`, for any of the folders.
    """
    with ExitStack() as stack:
        fresh, todos = [], []
        for out, identity in zip(outs, identities):
            make_dir(out)
            stack.enter_context(FolderLock(out))
            fresh.append(claim_out_dir(out, identity, resume_anyway))
            todos.append(pending(jobs, out, run_id(identity)))
        if any(todos):
            try:
                model = load()
            except BaseException:
                for out, new in zip(outs, fresh):
                    if new and not read_records(out / ANSWERS)[0]:
                        forget_claim(out)
                raise
            answer(model, todos)
        found = []
        for out, identity in zip(outs, identities):
            rows, dups = unique_sorted(read_records(out / ANSWERS)[0], identity["splits"])
            if dups:
                print(f"note: {dups} duplicate rows in {show(out / ANSWERS)} were ignored (first kept)")
            wanted = {j.key for j in jobs}
            found.append([r for r in rows if (r["split"], str(r["question_id"])) in wanted])
        yield found

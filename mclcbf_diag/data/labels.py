"""Relabelled POPE: a file of question_id → label that overrides the question file's labels (``--labels FILE``).

Accepted layouts (UTF-8):

* JSON object ``{"<question_id>": "yes", …}``, or one object per split
  ``{"<split>": {"<question_id>": "no", …}, …}`` (every value an object then);
* JSON list of objects ``[{"question_id": 3, "label": "yes", "split": "random"}, …]`` (``split`` optional);
* CSV with a header holding ``question_id`` and ``label`` (and optionally ``split``).

Labels are normalised like the question file's (stripped, lower-case, ``yes``/``no`` only);
question ids are compared as strings, as everywhere else (``3`` and ``"3"`` are one id). An
entry without a split applies to that id in every split of the run; when several selected
splits share the id (the embedded splits all number their questions 1 … 676) such an entry
is refused: give the split. An id that is in none of the run's question files is refused by
name (a typo would otherwise silently relabel nothing); an id present in the files but not
selected (``--limit``), or an entry for a split the run does not answer, is simply unused, but
a file none of whose entries applies to the run is refused. Duplicate entries are refused. The file's sha256
goes into the run's identity (:meth:`Labels.identity`).

Relabelling answered rows (:func:`relabel_records`) recomputes what depends on the label:
``label``, ``outcome`` (fixed/broken/unchanged; derailed and non_finite do not depend on it)
and ``text_outcome``; nothing else in a row does.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..storage import sha256_file, show

MAX_LABEL_BYTES = 64 << 20


@dataclass(frozen=True)
class Labels:
    """A relabelling: ``entries`` maps ``(split or None, str(question_id))`` to ``"yes"``/``"no"``."""

    path: str
    sha256: str
    entries: dict

    def identity(self) -> dict:
        """What the run identity records: the file, its digest and how many entries it holds."""
        return {"file": self.path, "sha256": self.sha256, "entries": len(self.entries)}

    def label(self, split: str, question_id) -> str | None:
        key = str(question_id)
        return self.entries.get((split, key), self.entries.get((None, key)))


def _norm_label(value, where: str, shown: str) -> str:
    norm = value.strip().lower() if isinstance(value, str) else None
    if norm not in ("yes", "no"):
        raise UserError(f"labels file {shown}, {where}: label {value!r} is not yes/no; write \"yes\" or \"no\"")
    return norm


def _norm_id(value, where: str, shown: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or (isinstance(value, str) and not value.strip()):
        raise UserError(f"labels file {shown}, {where}: question_id {value!r} is not an integer or a non-empty "
                        "string; use the ids of the question file")
    return value.strip() if isinstance(value, str) else str(value)


def load_labels(path: str | Path) -> Labels:
    """Read and validate a labels file (see the module docstring)."""
    path = Path(path)
    shown = show(path)
    if not path.is_file():
        raise UserError(f"labels file {shown} not found; pass a JSON or CSV file of question_id → label")
    if path.stat().st_size > MAX_LABEL_BYTES:
        raise UserError(f"labels file {shown} is larger than {MAX_LABEL_BYTES >> 20} MiB; it should hold one short "
                        "entry per question")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read labels file {shown} ({type(exc).__name__}); it must be UTF-8 JSON or CSV") \
            from None
    if not text.strip():
        raise UserError(f"labels file {shown} is empty; write question_id → label entries")
    is_json = path.suffix.lower() == ".json" or text.lstrip()[:1] in ("{", "[")
    items = _json_items(text, shown) if is_json else _csv_items(text, shown)
    entries: dict = {}
    where_of: dict = {}
    for where, split, qid, label in items:
        key = (split, _norm_id(qid, where, shown))
        if key in entries:
            raise UserError(f"labels file {shown}, {where}: question_id {key[1]!r}"
                            + (f" of split {split!r}" if split else "") + f" was already given at {where_of[key]}; "
                            "give each question one label")
        entries[key], where_of[key] = _norm_label(label, where, shown), where
    if not entries:
        raise UserError(f"labels file {shown} holds no labels; write question_id → label entries")
    return Labels(str(path.resolve()), sha256_file(path), entries)


def _json_items(text: str, shown: str) -> list:
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise UserError(f"labels file {shown} is not valid JSON ({type(exc).__name__}); write an object "
                        "{\"question_id\": \"yes\"} or a list of {\"question_id\", \"label\"} objects") from None
    if isinstance(data, dict):
        if data and all(isinstance(v, dict) for v in data.values()):  # one object per split
            return [(f"split {s!r}, key {q!r}", str(s), q, lab) for s, d in data.items() for q, lab in d.items()]
        return [(f"key {q!r}", None, q, lab) for q, lab in data.items()]
    if isinstance(data, list):
        out = []
        for i, obj in enumerate(data):
            where = f"item {i} (0-based)"
            if not isinstance(obj, dict) or "question_id" not in obj or "label" not in obj:
                raise UserError(f"labels file {shown}, {where}: expected an object with question_id and label "
                                "(and optionally split)")
            split = obj.get("split")
            if split is not None and not isinstance(split, str):
                raise UserError(f"labels file {shown}, {where}: split {split!r} is not a string")
            out.append((where, split, obj["question_id"], obj["label"]))
        return out
    raise UserError(f"labels file {shown}: top-level JSON is {type(data).__name__}; write an object or a list")


def _csv_items(text: str, shown: str) -> list:
    rows = list(csv.reader(io.StringIO(text)))
    head = [h.strip().lower() for h in rows[0]]
    if "question_id" not in head or "label" not in head:
        raise UserError(f"labels file {shown}: the CSV header {rows[0]!r} needs question_id and label columns "
                        "(and optionally split)")
    qi, li, si = head.index("question_id"), head.index("label"), head.index("split") if "split" in head else None
    out = []
    for lineno, row in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in row):
            continue
        if len(row) != len(head):
            raise UserError(f"labels file {shown}, line {lineno}: {len(row)} fields, the header has {len(head)}")
        split = row[si].strip() or None if si is not None else None
        out.append((f"line {lineno}", split, row[qi], row[li]))
    return out


def check_known(labels: Labels, known: dict, *, require_some: bool = True) -> int:
    """Refuse entries that name no question of the run; return how many entries apply to it.

    An entry for a split the run does not have is unused (one file can relabel all three splits while a run answers
    one), but a file of which no entry applies is refused (unless ``require_some`` is false: ``compare`` checks it over
    all its runs); an id missing from its split's file is refused by name, as is a split-less id in no file, or in
    several (ambiguous: give the split).

    Args:
        labels: the labels file, read.
        known: each split of the run → the ids (strings) of its question file.
        require_some: refuse a file of which no entry applies.

    Returns:
        How many entries apply to the run.

    Raises:
        UserError: an id missing from its split's file, a split-less id in no file or in several, or (with
            ``require_some``) no entry that applies.
    """
    applies = 0
    for (split, qid), _ in labels.entries.items():
        if split is not None:
            if split not in known:
                continue
            if qid not in known[split]:
                raise UserError(f"labels file {show(labels.path)}: question_id {qid!r} is not in split {split!r}'s "
                                "question file; relabel only questions the file holds")
            applies += 1
            continue
        where = [s for s, ids in known.items() if qid in ids]
        if not where:
            raise UserError(f"labels file {show(labels.path)}: question_id {qid!r} is in no question file of this run "
                            f"({', '.join(known) or 'none'}); relabel only questions the files hold")
        if len(where) > 1:
            raise UserError(f"labels file {show(labels.path)}: question_id {qid!r} is in several splits of this run "
                            f"({', '.join(where)}); give each entry its split (a split column, or one object per "
                            "split)")
        applies += 1
    if not applies and require_some:
        named = sorted({s for s, _ in labels.entries if s is not None})
        raise UserError(f"labels file {show(labels.path)} relabels no question of this run: its splits "
                        f"({', '.join(named)}) are not the run's ({', '.join(known) or 'none'}); fix the split names")
    return applies


def relabel_questions(questions: list, labels: Labels, split: str) -> list:
    """The questions (PopeQuestion) of one split with the file's labels where it has one.

    Args:
        questions: the split's questions.
        labels: the labels file, read.
        split: the split's name (an entry for another split does not apply).

    Returns:
        The questions in order, each relabelled where the file has a label for it.
    """
    out = []
    for q in questions:
        new = labels.label(split, q.question_id)
        out.append(q if new is None or new == q.label else dataclasses.replace(q, label=new))
    return out


def relabel_jobs(jobs: list, labels: Labels) -> list:
    """``pope``'s jobs (:class:`~mclcbf_diag.pope.jobs.Job`) with their questions relabelled."""
    out = []
    for j in jobs:
        new = labels.label(j.split, j.question.question_id)
        out.append(j if new is None or new == j.question.label else
                   dataclasses.replace(j, question=dataclasses.replace(j.question, label=new)))
    return out


def relabel_records(records: list[dict], labels: Labels) -> list[dict]:
    """Answered rows (``answers.jsonl``) re-scored under the file's labels: label, outcome and text_outcome."""
    from ..measurements.outcomes import outcome

    out = []
    for r in records:
        new = labels.label(r.get("split"), r["question_id"])
        if new is None or new == r.get("label"):
            out.append(r)
            continue
        row = {**r, "label": new}
        if "outcome" in r and r["outcome"] not in ("derailed", "non_finite"):
            row["outcome"] = outcome(r["baseline_answer"], True, r["steered_answer"], True, new)
        if "text_outcome" in r and "baseline_text_answer" in r:
            row["text_outcome"] = outcome(r["baseline_text_answer"], True, r["steered_text_answer"], True, new)
        out.append(row)
    return out


def known_ids(identity: dict) -> dict:
    """split → ids (strings) of each question file a run's identity names (``splits``, ``pope_files``)."""
    from .pope import load_pope

    return {s: {str(q.question_id) for q in load_pope(p)}
            for s, p in zip(identity.get("splits", []), identity.get("pope_files", []))}


def relabel_run(path, files, all_jobs: list, jobs: list) -> tuple:
    """``--labels FILE`` for a whole-split run (``pope``, ``explain --split``).

    Load and check the file against the run's question files, then relabel every selected job and this shard's. The
    identity records ``labels.identity()`` under ``"labels"``.

    Args:
        path: the labels file.
        files: the run's question files, ``(split, pope file, image dir)`` each, as ``split_run_checks`` returns
            them; every labelled question must be in them.
        all_jobs: every selected job of the run (:class:`~mclcbf_diag.pope.jobs.Job`).
        jobs: this shard's jobs.

    Returns:
        ``(labels, all_jobs, jobs)``: the :class:`Labels` and both job lists relabelled.

    Raises:
        UserError: the labels file cannot be read, is malformed, names a question the run's files do not hold
            (or hold in several splits), or relabels none of them.
    """
    from .pope import load_pope

    labels = load_labels(path)
    check_known(labels, {split: {str(q.question_id) for q in load_pope(p)} for split, p, _ in files})
    return labels, relabel_jobs(all_jobs, labels), relabel_jobs(jobs, labels)


__all__ = ["Labels", "check_known", "known_ids", "load_labels", "relabel_jobs", "relabel_questions",
           "relabel_records", "relabel_run"]

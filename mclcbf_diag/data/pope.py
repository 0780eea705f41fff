"""Load POPE question files and the images they refer to.

POPE ships in two layouts with the same objects (``question_id``, ``image``, ``text``,
``label``): the COCO files are JSON Lines, the A-OKVQA/GQA ones are one pretty-printed JSON
array. :func:`load_pope` reads both, telling them apart by the first non-space character.
Every problem with a file is a :class:`~mclcbf_diag.errors.UserError` whose one-line message
names the file, the line (or array item) and the fix.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import pandas as pd
from PIL import Image

from mclcbf_diag.errors import UserError

_KEYS = ("question_id", "image", "text", "label")


@dataclass(frozen=True)
class PopeQuestion:
    """One POPE question.

    ``label`` is normalised to lower-case ``"yes"``/``"no"``; ``index`` is the 0-based
    position of the question in its file (blank lines not counted), i.e. what ``--sample``
    selects.
    """

    question_id: int | str
    image: str
    text: str
    label: str
    index: int


def load_pope(path: str | Path) -> list[PopeQuestion]:
    """Read a POPE file (JSON Lines or a JSON array) into a list of questions."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "not found"
        raise UserError(f"POPE file {path} {what}; pass the path of a .json/.jsonl question file")
    try:
        content = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read POPE file {path} ({exc}); it must be UTF-8 JSON text") from None
    stripped = content.lstrip()
    if not stripped:
        raise UserError(f"POPE file {path} is empty; it needs one JSON question object per line")

    if stripped.startswith("["):
        records = _array_records(path, content)
    else:
        records = _jsonl_records(path, content)
    questions = [_question(path, where, obj, i) for i, (where, obj) in enumerate(records)]
    if not questions:
        raise UserError(f"POPE file {path} holds no questions; add question objects to it")
    return questions


def _jsonl_records(path: Path, content: str) -> list[tuple[str, object]]:
    records = []
    for lineno, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((f"line {lineno}", json.loads(line)))
        except json.JSONDecodeError as exc:
            raise UserError(
                f"{path}, line {lineno}: malformed JSON ({exc.msg}, column {exc.colno}); "
                "each line must be one complete JSON object"
            ) from None
    return records


def _array_records(path: Path, content: str) -> list[tuple[str, object]]:
    try:
        items = json.loads(content)
    except json.JSONDecodeError as exc:
        raise UserError(
            f"{path}, line {exc.lineno}: malformed JSON ({exc.msg}, column {exc.colno}); "
            "fix the JSON array or use one object per line (JSON Lines)"
        ) from None
    if not isinstance(items, list):
        raise UserError(f"{path}: top-level JSON is not an array; write a list of question objects")
    return [(f"array item {i} (0-based)", obj) for i, obj in enumerate(items)]


def _question(path: Path, where: str, obj: object, index: int) -> PopeQuestion:
    def bad(problem: str, fix: str) -> UserError:
        return UserError(f"{path}, {where}: {problem}; {fix}")

    if not isinstance(obj, dict):
        raise bad(f"expected a JSON object, got {type(obj).__name__}",
                  f"write an object with keys {', '.join(_KEYS)}")
    for key in _KEYS:
        if key not in obj:
            raise bad(f"missing key {key!r}", f"every question needs {', '.join(_KEYS)}")
    qid = obj["question_id"]
    if isinstance(qid, bool) or not isinstance(qid, (int, str)):
        raise bad(f"question_id {qid!r} is not an integer or string", "use e.g. 1 or \"q1\"")
    for key in ("image", "text"):
        if not isinstance(obj[key], str) or not obj[key].strip():
            raise bad(f"{key!r} is {obj[key]!r}", f"give {key!r} as a non-empty string")
    label = obj["label"]
    norm = label.strip().lower() if isinstance(label, str) else None
    if norm not in ("yes", "no"):
        raise bad(f"label {label!r} is not yes/no", 'set "label" to "yes" or "no"')
    return PopeQuestion(qid, obj["image"], obj["text"], norm, index)


def select_question(
    questions: list[PopeQuestion],
    *,
    sample: int | None = None,
    question_id: int | str | None = None,
    source: str | Path | None = None,
) -> PopeQuestion:
    """Pick one question by 0-based position (``sample``) or by ``question_id``.

    Exactly one of the two must be given. Ids are compared as strings, so ``"42"`` finds
    ``42``; with duplicate ids the first wins. ``source`` (the file name) only improves
    error messages.
    """
    name = f"{source}" if source is not None else "the question file"
    if (sample is None) == (question_id is None):
        raise UserError("give exactly one of --sample (0-based position) or --question-id")
    if sample is not None:
        if isinstance(sample, bool) or not isinstance(sample, int) or not 0 <= sample < len(questions):
            valid = f"0..{len(questions) - 1}" if questions else "none (no questions)"
            raise UserError(
                f"--sample {sample} is out of range: {name} has {len(questions)} questions, "
                f"valid samples are {valid}"
            )
        return questions[sample]
    for q in questions:
        if str(q.question_id) == str(question_id):
            return q
    raise UserError(
        f"--question-id {question_id} not found in {name} ({len(questions)} questions); "
        "check the id or select by position with --sample"
    )


def questions_frame(questions: list[PopeQuestion]) -> pd.DataFrame:
    """One row per question with columns index, question_id, image, text, label."""
    columns = ["index"] + [f.name for f in fields(PopeQuestion) if f.name != "index"]
    return pd.DataFrame([asdict(q) for q in questions], columns=columns)


def resolve_image(question: PopeQuestion, image_dir: str | Path) -> Path:
    """Path of the question's image inside ``image_dir`` (existence is checked on load)."""
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise UserError(
            f"image folder {image_dir} does not exist; pass --image-dir pointing at the folder "
            f"that holds {question.image}"
        )
    return image_dir / question.image


def load_image(path: str | Path) -> Image.Image:
    """Open an image fully (so truncated files fail here) and return it as RGB."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"image {path} not found; pass --image-dir pointing at the folder holding it")
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(
            f"image {path} cannot be read ({exc}); replace the file or pass --image-dir "
            "pointing at a folder with intact images"
        ) from None

"""Load POPE question files and the images they refer to.

POPE ships in two layouts with the same objects (``question_id``, ``image``, ``text``,
``label``): the COCO files are JSON Lines, the A-OKVQA/GQA ones are one pretty-printed JSON
array. :func:`load_pope` reads both, telling them apart by the first non-space character.
Every problem with a file is a :class:`~mclcbf_diag.errors.UserError` whose one-line message
names the file, the line (or array item) and the fix.

Safety rules
------------
* **Unique ids.** A ``question_id`` that appears twice is refused (naming both places):
  results are keyed by it, so a duplicate would silently replace or skip a question.
* **Bounded text.** A question longer than :data:`MAX_QUESTION_CHARS` characters is refused
  (raise it with ``MCLCBF_DIAG_MAX_QUESTION_CHARS``); the prompt's token count is checked
  against the model's limit separately, before the model loads.
* **Contained images.** :func:`resolve_image` refuses an ``image`` entry that is absolute or
  holds ``..``: an image is always read from inside ``--image-dir``.
* **Images decode to what the model saw in training.** :func:`load_image` applies the EXIF
  orientation, scales 16- and 32-bit grayscale (``I;16``, ``I``) to 8 bits instead of
  clipping them to white, and refuses float images.
* **Image limits on what the processor makes of them** (:func:`check_image_size`, from the
  header, before decoding). The source may hold at most :data:`MAX_IMAGE_PIXELS` pixels
  (``MCLCBF_DIAG_MAX_IMAGE_PIXELS``; PIL's own decompression-bomb check is replaced by it),
  and the processor's output, its shortest edge scaled to the model's size (336 for
  LLaVA-1.5) as float32, at most :data:`MAX_IMAGE_MB` MB (``MCLCBF_DIAG_MAX_IMAGE_MB``): an
  80-byte 2000x1 PNG would otherwise become a 672000x336 array of 2.7 GB. That refuses aspect
  ratios beyond about 49:1.
* **Images are checked whole before any model loads** (:func:`check_image`): format, mode
  and a full decode (JPEGs at 1/8 scale, which still reads every byte), so a truncated or
  floating-point image is refused with its question before the weights are read.
* **No placeholder in a question.** A question text holding ``<image>`` would add a second
  image to the prompt; it is refused at load, with the line.
"""

from __future__ import annotations

import json
import os
import threading
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from PIL import Image, ImageOps

from mclcbf_diag.errors import UserError
from mclcbf_diag.storage import contained, show

_KEYS = ("question_id", "image", "text", "label")


def env_limit(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None or not text.strip():
        return default
    try:
        value = int(text)
    except ValueError:
        raise UserError(f"{name}={text!r} is not an integer; set it to a positive number or unset it") from None
    if value < 1:
        raise UserError(f"{name}={value} must be >= 1; set a positive number or unset it")
    return value


MAX_QUESTION_CHARS = 4000  # default; MCLCBF_DIAG_MAX_QUESTION_CHARS overrides
MAX_IMAGE_PIXELS = 50_000_000  # default (e.g. 7071 x 7071); MCLCBF_DIAG_MAX_IMAGE_PIXELS overrides
MAX_IMAGE_MB = 64  # the processor's float32 output; MCLCBF_DIAG_MAX_IMAGE_MB overrides
SHORTEST_EDGE = 336  # LLaVA-1.5's processor: the shortest edge is resized to this, then cropped square
PLACEHOLDER = "<image>"


def max_question_chars() -> int:
    return env_limit("MCLCBF_DIAG_MAX_QUESTION_CHARS", MAX_QUESTION_CHARS)


def max_image_pixels() -> int:
    return env_limit("MCLCBF_DIAG_MAX_IMAGE_PIXELS", MAX_IMAGE_PIXELS)


def max_image_bytes() -> int:
    return env_limit("MCLCBF_DIAG_MAX_IMAGE_MB", MAX_IMAGE_MB) * 2**20


def not_a_file(path: Path) -> str | None:
    """Why ``path`` is not a readable regular file ("not found", "a FIFO, not a regular file"…), or None."""
    import stat

    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "a broken symbolic link" if path.is_symlink() else "not found"
    except OSError as exc:
        return f"cannot be opened ({exc.strerror or exc})"
    if stat.S_ISREG(mode):
        return None
    kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode) else
            "a socket" if stat.S_ISSOCK(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else
            "not a regular file")
    return f"is {kind}, not a regular file"


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
    shown = show(path)
    problem = not_a_file(path)
    if problem:
        raise UserError(f"POPE file {shown} {problem}; pass the path of a .json/.jsonl question file")
    try:
        content = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read POPE file {shown} ({exc}); it must be UTF-8 JSON text") from None
    stripped = content.lstrip()
    if not stripped:
        raise UserError(f"POPE file {shown} is empty; it needs one JSON question object per line")

    try:
        if stripped.startswith("["):
            records = _array_records(shown, content)
        else:
            records = _jsonl_records(shown, content)
    except RecursionError:
        raise UserError(f"POPE file {shown} nests JSON too deeply to be a question file; "
                        "write flat question objects (question_id, image, text, label)") from None
    limit = max_question_chars()
    questions = [_question(shown, where, obj, i, limit) for i, (where, obj) in enumerate(records)]
    if not questions:
        raise UserError(f"POPE file {shown} holds no questions; add question objects to it")
    kinds = {type(q.question_id) for q in questions}
    if len(kinds) > 1:  # one column type in every output table (parquet refuses a mixed column)
        first_int = next(w for (w, _), q in zip(records, questions) if isinstance(q.question_id, int))
        first_str = next(w for (w, _), q in zip(records, questions) if isinstance(q.question_id, str))
        raise UserError(f"{shown}: question ids mix integers ({first_int}) and strings ({first_str}); give every "
                        "question_id as an integer, or every one as a string")
    seen: dict[str, str] = {}
    for (where, _), q in zip(records, questions):
        key = str(q.question_id)
        if key in seen:
            raise UserError(f"{shown}, {where}: question_id {q.question_id!r} was already used at {seen[key]}; "
                            "question ids must be unique (results are keyed by them): renumber one of them")
        seen[key] = where
    return questions


def _jsonl_records(path: Path, content: str) -> list[tuple[str, object]]:
    records = []
    # JSON Lines end records at "\n" only: str.splitlines() would also split at U+2028, U+0085 and other
    # separators that are valid inside a JSON string
    for lineno, line in enumerate(content.split("\n"), start=1):
        line = line.removesuffix("\r")
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


def _question(path: str, where: str, obj: object, index: int, max_chars: int) -> PopeQuestion:
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
    if isinstance(qid, int) and not -2 ** 63 <= qid < 2 ** 63:
        raise bad(f"question_id {qid} does not fit in a 64-bit integer (the output tables store it as one)",
                  "use a smaller number, or give every id as a string such as \"q1\"")
    for key in ("image", "text"):
        if not isinstance(obj[key], str) or not obj[key].strip():
            raise bad(f"{key!r} is {obj[key]!r}", f"give {key!r} as a non-empty string")
    if PLACEHOLDER in obj["text"]:
        raise bad(f"question_id {qid!r}: 'text' holds {PLACEHOLDER!r}, the image placeholder, which would put a "
                  "second image into the prompt", f"remove {PLACEHOLDER!r} from the question")
    if len(obj["text"]) > max_chars:
        raise bad(f"'text' is {len(obj['text'])} characters, more than the limit of {max_chars}",
                  "shorten the question, or raise the limit with MCLCBF_DIAG_MAX_QUESTION_CHARS=N")
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

    Exactly one of the two must be given. Ids are compared as strings, so ``"42"`` finds ``42``; with duplicate ids
    the first wins.

    Args:
        questions: the question file's questions, in file order.
        sample: the 0-based position of the question.
        question_id: the question's id.
        source: the file name; only improves error messages.

    Returns:
        The selected :class:`PopeQuestion`.

    Raises:
        UserError: neither or both of ``sample`` and ``question_id``, a position out of range, or an id not found.
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


def questions_frame(questions: list[PopeQuestion]):
    """One row per question with columns index, question_id, image, text, label."""
    import pandas as pd

    columns = ["index"] + [f.name for f in fields(PopeQuestion) if f.name != "index"]
    return pd.DataFrame([asdict(q) for q in questions], columns=columns)


def resolve_image(question: PopeQuestion, image_dir: str | Path) -> Path:
    """Path of the question's image inside ``image_dir`` (existence is checked on load).

    The ``image`` entry must be a plain relative path: absolute paths and ``..`` are refused
    with the question id, so a question file can never make the tool read outside
    ``image_dir``.
    """
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise UserError(
            f"image folder {show(image_dir)} does not exist; pass --image-dir pointing at the folder "
            f"that holds {question.image}"
        )
    return contained(image_dir, question.image, f"question_id {question.question_id!r}: image")


_PIL_LIMIT = threading.Lock()


def resized_size(size: tuple[int, int], shortest_edge: int | None = SHORTEST_EDGE) -> tuple[int, int]:
    """The size the processor resizes ``size`` to: its shortest edge scaled to ``shortest_edge`` (None: kept)."""
    w, h = size
    if shortest_edge is None or min(w, h) < 1:
        return w, h
    if w <= h:
        return shortest_edge, int(shortest_edge * h / w)
    return int(shortest_edge * w / h), shortest_edge


def processor_edge(processor) -> int | None:
    """The shortest edge a loaded processor resizes to (:data:`SHORTEST_EDGE` when it does not say); None for one whose
    ``size`` is a pixel budget (Qwen-VL's ``shortest_edge``/``longest_edge`` count pixels: its output is bounded)."""
    ip = getattr(processor, "image_processor", None)
    if getattr(ip, "merge_size", None) is not None:
        return None
    size = getattr(ip, "size", None)
    edge = size.get("shortest_edge") if isinstance(size, dict) else getattr(size, "shortest_edge", None)
    return edge if isinstance(edge, int) and edge > 0 else SHORTEST_EDGE


def _size_mb(n: float) -> str:
    return f"{n / 2**30:.1f} GB" if n >= 2**30 else f"{n / 2**20:.0f} MB"


def check_image_size(path: Path, size: tuple[int, int], limit: int | None = None,
                     shortest_edge: int | None = SHORTEST_EDGE) -> None:
    """Refuse, from the header's ``size``, an image too large as a file or as the processor's output.

    Args:
        path: the image file (named in the error).
        size: its (width, height) in pixels, from the file's header.
        limit: the most pixels (None: ``MCLCBF_DIAG_MAX_IMAGE_PIXELS`` or the default).
        shortest_edge: the processor resizes the shortest edge to this many pixels (None: kept); the resized image
            as float32 must stay within ``MCLCBF_DIAG_MAX_IMAGE_MB``.

    Raises:
        UserError: the image has more than ``limit`` pixels, or its resized float32 pixels exceed the memory limit.
    """
    limit = max_image_pixels() if limit is None else limit
    w, h = size
    if w * h > limit:
        raise UserError(
            f"image {show(path)} is {w}x{h} ({w * h / 1e6:.1f} megapixels), more than the limit of "
            f"{limit / 1e6:.1f} megapixels; downscale it (the model sees a few hundred pixels a side), "
            "or raise the limit with MCLCBF_DIAG_MAX_IMAGE_PIXELS=N"
        )
    rw, rh = resized_size(size, shortest_edge)
    need, cap = rw * rh * 3 * 4, max_image_bytes()
    if need > cap:
        edge = shortest_edge or min(w, h)
        ratio = max(1, cap // (3 * 4 * edge * edge))
        raise UserError(
            f"image {show(path)} is {w}x{h}: the processor scales its shortest edge to {edge}, which makes it "
            f"{rw}x{rh} ({_size_mb(need)} as float32), more than the limit of {_size_mb(cap)}; crop it to an "
            f"aspect ratio of at most {ratio}:1, or raise the limit with MCLCBF_DIAG_MAX_IMAGE_MB=N"
        )


def _open(path: Path, shortest_edge: int | None) -> Image.Image:
    """The image opened (header only) after its size checks; a UserError for a missing or unreadable file."""
    problem = not_a_file(path)
    if problem:
        raise UserError(f"image {show(path)} {problem}; pass --image-dir pointing at the folder holding it")
    limit = max_image_pixels()
    try:
        with _PIL_LIMIT, warnings.catch_warnings():
            # Our own limits (below) replace PIL's decompression-bomb warning/error, whose
            # warning would be a second stderr line and whose error ignores the override.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                img = Image.open(path)
            finally:
                Image.MAX_IMAGE_PIXELS = saved
    except (OSError, SyntaxError, ValueError, MemoryError) as exc:
        raise _unreadable(path, exc) from None
    try:
        check_image_size(path, img.size, limit, shortest_edge)
        if img.mode == "F":
            raise UserError(f"image {show(path)} is a floating-point image (mode F) with no defined 0..255 "
                            "range; save it as an 8- or 16-bit image")
    except BaseException:
        img.close()
        raise
    return img


def _unreadable(path: Path, exc: BaseException) -> UserError:
    return UserError(f"image {show(path)} cannot be read ({exc}); replace the file or pass --image-dir "
                     "pointing at a folder with intact images")


def check_image(path: str | Path, shortest_edge: int | None = SHORTEST_EDGE) -> None:
    """Everything :func:`load_image` would refuse, without keeping the pixels (see the module docstring)."""
    path = Path(path)
    with _open(path, shortest_edge) as img:
        try:
            img.draft(img.mode, (1, 1))  # JPEG: decode at 1/8 scale; every byte is still read
            img.load()
            if img.mode == "I":
                low, high = img.getextrema()
                if low < 0 or high > 65535:
                    raise UserError(f"image {show(path)} is 32-bit integer grayscale with values outside "
                                    "0..65535; save it as an 8- or 16-bit image")
        except UserError:
            raise
        except (OSError, SyntaxError, ValueError, MemoryError) as exc:
            raise _unreadable(path, exc) from None


def load_image(path: str | Path, shortest_edge: int | None = SHORTEST_EDGE) -> Image.Image:
    """Open an image fully (so truncated files fail here) and return it as 8-bit RGB.

    The EXIF orientation is applied; 16/32-bit grayscale is scaled to 8 bits; an image
    beyond the limits of :func:`check_image_size` is refused before it is decoded.
    """
    path = Path(path)
    with _open(path, shortest_edge) as img:
        try:
            img.load()
            img = ImageOps.exif_transpose(img)
            return _to_rgb(img, path)
        except UserError:
            raise
        except (OSError, SyntaxError, ValueError, MemoryError) as exc:
            raise _unreadable(path, exc) from None


def _to_rgb(img: Image.Image, path: Path) -> Image.Image:
    """8-bit RGB for every PIL mode, scaling wide integer modes instead of clipping them."""
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        import numpy as np

        a = np.asarray(img).astype(np.int64)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise UserError(f"image {show(path)} is 32-bit integer grayscale with values outside 0..65535; "
                            "save it as an 8- or 16-bit image")
        a = (a * 255 + 32767) // 65535  # 0..65535 -> 0..255, rounded
        return Image.fromarray(a.astype(np.uint8), mode="L").convert("RGB")
    if mode == "F":
        raise UserError(f"image {show(path)} is a floating-point image (mode F) with no defined 0..255 range; "
                        "save it as an 8- or 16-bit image")
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        # Transparent pixels over white, as a viewer shows them (convert() would expose
        # whatever colour the transparent pixels happen to hold).
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")

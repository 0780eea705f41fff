"""Which questions a POPE run answers: split files, limits, shards, and their images."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .. import shipped
from ..errors import UserError

SPLITS = ("random", "popular", "adversarial")


EMBEDDED_POPE = shipped.POPE


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

    Args:
        split: ``--split``: one of :data:`SPLITS`, or ``all`` for every one.
        pope_file: ``--pope-file``; None: the embedded split files. A path containing ``{split}`` is expanded
            for each selected split (e.g. ``coco_pope_{split}.json``); otherwise it is one file labelled with
            ``split`` (or its stem for ``all``).
        image_dir: ``--image-dir``; None: the embedded images, or the question file's folder.

    Returns:
        One ``(split label, question file, image folder)`` per split, paths resolved for a ``pope_file``.
    """
    splits = SPLITS if split == "all" else (split,)
    if pope_file is None:
        idir = Path(image_dir) if image_dir else shipped.IMAGES
        return [(s, shipped.pope_file(s), idir) for s in splits]
    if "{split}" in pope_file:
        paths = [(s, Path(pope_file.replace("{split}", s))) for s in splits]
    else:
        paths = [(split if split != "all" else Path(pope_file).stem, Path(pope_file))]
    return [(s, p.resolve(), Path(image_dir) if image_dir else p.resolve().parent) for s, p in paths]


def select_jobs(files, limit: int | None, shard: tuple[int, int] | None) -> list[Job]:
    """The questions of ``files`` as jobs, split by split.

    Args:
        files: ``(split label, question file, image folder)`` triples (:func:`question_files`).
        limit: the first this many questions of each file; None or 0: all of them.
        shard: ``(i, n)`` (:func:`parse_shard`): only the questions whose position in their split is ``i`` mod
            ``n``; None: all.

    Returns:
        The jobs, in file order and each file's order.
    """
    from ..data import load_pope

    jobs = []
    for split, path, idir in files:
        questions = load_pope(path)[:limit] if limit else load_pope(path)
        for pos, q in enumerate(questions):
            if shard is None or pos % shard[1] == shard[0]:
                jobs.append(Job(split, pos, q, idir))
    return jobs


def job_image(job: Job) -> Path:
    """The job's image path, contained in its image folder (see ``data.resolve_image``)."""
    from ..data import resolve_image

    return resolve_image(job.question, job.image_dir)


def check_images(jobs: list[Job], shortest_edge: int | None = None) -> None:
    """Every image exists, decodes and is within the limits (see ``data.check_image``), each named by its
    question; ``shortest_edge`` is the model's processor size (None: LLaVA-1.5's 336)."""
    from ..data.pope import SHORTEST_EDGE, check_image

    seen = set()
    for j in jobs:
        path = job_image(j)
        if path in seen:
            continue
        seen.add(path)
        try:
            check_image(path, shortest_edge or SHORTEST_EDGE)
        except UserError as exc:
            raise UserError(f"question_id {j.question.question_id!r} ({j.split}): {exc}") from None


def shard_jobs(files, limit: int | None, shard: tuple[int, int] | None, shard_text: str | None,
               shortest_edge: int | None = None):
    """``(all_jobs, this shard's jobs)`` with every image path checked (contained, present,
    readable) before any model loads; a shard that selects nothing is refused.

    Args:
        files: ``(split label, question file, image folder)`` triples (:func:`question_files`).
        limit: the first this many questions of each file; None: all of them.
        shard: ``(i, n)`` (:func:`parse_shard`); None: the whole run.
        shard_text: ``--shard`` as typed, for the message.
        shortest_edge: the model's processor size (:func:`check_images`; None: LLaVA-1.5's 336).

    Returns:
        ``(all_jobs, jobs)``: every selected question of the run, and those of this shard.

    Raises:
        UserError: the shard selects no question, or an image path leaves its folder, is missing or does not
            decode within the limits.
    """
    all_jobs = select_jobs(files, limit, None)
    jobs = [j for j in all_jobs if shard is None or j.position % shard[1] == shard[0]]
    if not jobs:
        raise UserError(f"--shard {shard_text} selects no questions (the splits hold fewer questions than "
                        "shards after --limit); use fewer shards")
    for j in all_jobs:
        job_image(j)  # every image path stays inside its folder
    check_images(jobs, shortest_edge)
    return all_jobs, jobs


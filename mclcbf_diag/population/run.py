"""Answering population jobs batch by batch: verdicts, a records part, then the rows (the commit point)."""

from __future__ import annotations

import sys
from pathlib import Path

from ..experiments.verdict import Settings, explain_batch
from ..pope.jobs import Job
from ..pope.store import ANSWERS, append_records
from .outputs import write_part


def job_rows(lm, jobs: list[Job], config, settings: Settings, run_id: str | None = None):
    """One batch of jobs → (rows, records with a ``split`` column).

    Args:
        lm: the loaded model.
        jobs: the batch's questions.
        config: the intervention.
        settings: what each verdict runs.
        run_id: written into every row when given.

    Returns:
        ``(rows, records)``: one question row per job (its verdict's row, with ``split`` and ``index``), and the
        batch's records frame (``split`` first, ``question_id`` set).
    """
    import pandas as pd

    from ..data import resolve_image
    from ..pope.answer import image_of

    images = [image_of(resolve_image(j.question, j.image_dir), lm) for j in jobs]
    verdicts = explain_batch(lm, [j.question for j in jobs], images, config, settings)
    rows, parts = [], []
    for j, v in zip(jobs, verdicts):
        rows.append({**({"run_id": run_id} if run_id else {}), "split": j.split, "index": j.position, **v.row})
        parts.append(v.records.assign(split=j.split, question_id=str(j.question.question_id)))
    records = pd.concat(parts, ignore_index=True)
    return rows, records[["split", *[c for c in records.columns if c != "split"]]]


def run_population(lm, todo: list[Job], config, out: Path, settings: Settings, *, batch_size: int,
                   run_id: str | None = None, on_batch=None, progress: bool = True) -> None:
    """Verdicts for ``todo``, batch by batch: each batch's records part is written, then its rows appended.

    Args:
        lm: the loaded model.
        todo: the questions still to answer, in order.
        config: the intervention.
        out: the run folder.
        settings: what each verdict runs.
        batch_size: questions per batch.
        run_id: written into every row when given.
        on_batch: called as ``on_batch(n)`` after the n-th batch (from 1) is on disk (tests interrupt there).
        progress: whether to show a progress bar on stderr.
    """
    from ..progress import tqdm

    with tqdm(total=len(todo), unit="q", desc="explain", disable=not progress or not todo, file=sys.stderr,
              dynamic_ncols=True) as bar:
        for n, start in enumerate(range(0, len(todo), batch_size), start=1):
            batch = todo[start:start + batch_size]
            rows, records = job_rows(lm, batch, config, settings, run_id)
            write_part(out, [j.key for j in batch], records)
            append_records(out / ANSWERS, rows)
            bar.set_postfix_str(batch[-1].split, refresh=False)
            bar.update(len(batch))
            if on_batch is not None:
                on_batch(n)

"""Answering POPE jobs in batches, baseline and intervened, with a memory-bounded image cache."""

from __future__ import annotations

import sys
from collections import OrderedDict
from pathlib import Path

from ..errors import UserError
from ..storage import show
from .jobs import Job
from .store import ANSWERS, append_records, read_records

MAX_BATCH_SIZE = 4096


class _ImageCache:
    """Decoded images by path, least recently used dropped first, bounded in BYTES."""

    def __init__(self, env: str = "MCLCBF_DIAG_IMAGE_CACHE_MB", default_mb: int = 512):
        self.env, self.default_mb = env, default_mb
        self.items: OrderedDict[Path, object] = OrderedDict()
        self.nbytes = 0

    @property
    def budget(self) -> int:
        from ..data.pope import _env_limit

        return _env_limit(self.env, self.default_mb) * 2**20

    def __call__(self, path: Path):
        from ..data import load_image

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
    """One batch of questions → one record per question (baseline and steered).

    ``outcome`` is the question's class (:mod:`mclcbf_diag.outcomes`): unchanged, fixed, broken or
    derailed (no longer a Yes/No answer at the decision position, or non-finite). ``flipped``
    stays the bare sign change of logit Yes − No (the answers format requires it); with
    ``generate`` the official text parser's answers and their outcome (``text_outcome``) are
    beside them.
    """
    from ..batch import answer_batch, answer_pair, batch_inputs
    from ..data import build_prompt, parse_answer, resolve_image
    from ..outcomes import outcome

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
               "flipped": b["answer"] != s["answer"],
               "outcome": outcome(b["answer"], b["valid"], s["answer"], s["valid"], q.label, new_finite=s["finite"]),
               "baseline_p_yes": b["p_yes"], "baseline_p_no": b["p_no"], "baseline_valid": b["valid"],
               "steered_p_yes": s["p_yes"], "steered_p_no": s["p_no"], "steered_valid": s["valid"],
               "steered_finite": s["finite"],
               **{k: s.get(k) for k in ("layers_fired", "h_mean", "mean_theta_rel", "max_dh_predicted")}}
        if generate:
            bt, st = parse_answer(b["text"]), parse_answer(s["text"])
            rec.update(baseline_text=b["text"], baseline_text_answer=bt, steered_text=s["text"], steered_text_answer=st,
                       text_outcome=outcome(bt, True, st, True, q.label))
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
    from ..progress import tqdm

    with tqdm(total=len(todo), unit="q", desc="pope", disable=not progress or not todo,
              file=sys.stderr, dynamic_ncols=True) as bar:
        for n, start in enumerate(range(0, len(todo), batch_size), start=1):
            batch = todo[start:start + batch_size]
            append_records(out / ANSWERS, answer_jobs(lm, batch, config, generate, template))
            bar.set_postfix_str(batch[-1].split, refresh=False)
            bar.update(len(batch))
            if on_batch is not None:
                on_batch(n)

"""Answering POPE jobs in batches, baseline and intervened, with a memory-bounded image cache.

Besides the answers, each batch records what the intervention did to attention and what it
cost, with plain PyTorch forward hooks held for the batch only (:class:`_Observer`):

* **Image mass per layer.** Every language layer's eager attention returns its softmax
  probabilities; a hook reads the decision query's row (the last position of the left-padded
  batch) and sums it over the image keys (``input_ids == image token``; pad keys weigh 0),
  head mean: ``baseline_image_mass_<layer>`` and ``steered_image_mass_<layer>`` per question
  (the ``attn_image_mass`` of a trace, head −1). :func:`mclcbf_diag.engine.batch.answer_pair` runs the
  baseline forward and then the intervened one, after any auxiliary forwards of the
  intervention's ``prepare`` (a steering vector's prompt without its image, say), so the last
  two calls over the batch's whole prompt are the two conditions. A method's auxiliary forward run
  between them (CausalMM's counterfactual language forward, over the whole prompt; a generation's
  view) runs under :func:`~mclcbf_diag.interventions.base.auxiliary_forward`, and the hooks skip it.
  (A decoding-level method's auxiliary rows may run in the baseline's forward, after the batch's
  rows: the first B rows are read; its other auxiliary forwards continue the baseline's cache over
  fewer or more keys, and are not read.) The intervened row is the one the model used, after the
  intervention's edits; the cost is one ``[B, H, K]`` slice per layer of probabilities that eager
  attention computes anyway.
* **Time.** Per batch: the whole batch (images, inputs, both conditions, records, the append),
  the inputs (image decoding, the processor, the vision tower once per distinct image) and the
  baseline's plain forward (a hook on the model's top module). ``inputs + baseline`` is what
  answering the batch once without any intervention costs: the bare forward. With ``generate``
  the baseline's whole generation counts as its forward.
  :class:`RunTiming` accumulates them in the run folder's ``timing.json``.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections import OrderedDict
from pathlib import Path

from ..storage import atomic_write_text
from .jobs import Job
from .store import ANSWERS, append_records

MAX_BATCH_SIZE = 4096
TIMING = "timing.json"


class ImageCache:
    """Decoded images by path, least recently used dropped first, bounded in BYTES."""

    def __init__(self, env: str = "MCLCBF_DIAG_IMAGE_CACHE_MB", default_mb: int = 512):
        self.env, self.default_mb = env, default_mb
        self.items: OrderedDict[Path, object] = OrderedDict()
        self.nbytes = 0

    @property
    def budget(self) -> int:
        from ..data.pope import env_limit

        return env_limit(self.env, self.default_mb) * 2**20

    def __call__(self, path: Path, lm=None):
        """The decoded image; ``lm``: the model whose processor size bounds it (see ``data.check_image_size``)."""
        from ..data import load_image
        from ..data.pope import processor_edge

        path = Path(path)
        if path in self.items:
            self.items.move_to_end(path)
            return self.items[path]
        img = load_image(path, processor_edge(getattr(lm, "processor", None)))
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


image_of = ImageCache()


def decision_image_mass(rows, image):
    """Head-mean softmax mass on image keys.

    ``rows`` [B, H, K] (one query per row), ``image`` [B, K] (bool or 0/1) → [B]."""
    import torch

    return torch.bmm(rows.float(), image.to(rows.device, torch.float32)[:, :, None])[..., 0].mean(-1)


class _Observer:
    """Forward hooks for one batch: the decision query's image mass per layer, and the model's forward times.

    ``masses[layer]`` lists one ``[B]`` tensor per call of the layer's attention over the
    batch's whole prompt (``K`` keys, ``B`` rows; other calls are skipped); ``forwards`` the
    seconds of each call of the model. See the module docstring for which calls are which.
    """

    def __init__(self, lm, input_ids):
        import torch

        from ..interventions.base import in_auxiliary_forward  # here: importing this module loads no torch

        self._is_tensor, self._auxiliary = torch.is_tensor, in_auxiliary_forward
        self.lm, self.n_keys = lm, int(input_ids.shape[1])
        self.image = (input_ids == lm.tokens.image_token_id).float()  # converted once, read by every call
        self.masses = [[] for _ in range(lm.n_layers)]
        self.forwards: list[float] = []
        self.calls: list[tuple[int, int]] = []  # (index in forwards, rows) of each call over the whole prompt
        self._handles, self._t0 = [], None

    def __enter__(self):
        for i in range(self.lm.n_layers):
            attn = self.lm.adapter.layer_part(self.lm.model, i, "layer_attention")
            self._handles.append(attn.register_forward_hook(self._layer_hook(i)))
        self._handles.append(self.lm.model.register_forward_pre_hook(self._start))
        self._handles.append(self.lm.model.register_forward_hook(self._stop))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()

    def _start(self, module, args) -> None:
        self._t0 = None if self._auxiliary() else time.perf_counter()  # a method's auxiliary forward: skipped

    def _stop(self, module, args, output) -> None:
        if self._t0 is not None:
            self.forwards.append(time.perf_counter() - self._t0)
            self._t0 = None

    def _layer_hook(self, i: int):
        def hook(module, args, output):
            if self._auxiliary():  # a counterfactual or a view of the same length: not the question's forward
                return
            w = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            B = self.image.shape[0]
            if self._is_tensor(w) and w.dim() == 4 and w.shape[0] >= B and w.shape[-1] == self.n_keys:
                # the batch's rows come first: a method's auxiliary rows may follow them (engine.batch.answer_pair)
                self.masses[i].append(decision_image_mass(w[:B, :, -1, :].detach(), self.image))
                if i == 0:
                    self.calls.append((len(self.forwards), int(w.shape[0])))
        return hook

    def baseline_seconds(self) -> float:
        """The baseline forward's time (the last-but-one call over the whole prompt): its rows' share of it, where a
        method's auxiliary rows ran in the same forward."""
        if len(self.calls) < 2:  # no attention probabilities were seen: the last-but-one forward
            return self.forwards[-2]
        call, rows = self.calls[-2]
        return self.forwards[call] * self.image.shape[0] / rows

    def last(self, k: int):
        """The last ``k`` calls' masses, each ``[B, layers]`` (as lists), or None when a layer saw fewer."""
        import torch

        if any(len(m) < k for m in self.masses):
            return None
        # each layer's on its own device under --device-map: moved to the CPU before stacking
        return [torch.stack([m[j - k].cpu() for m in self.masses], dim=1).tolist() for j in range(k)]


def _mass_fields(condition: str, masses) -> dict:
    return {} if masses is None else {f"{condition}_image_mass_{i}": round(float(v), 6) for i, v in enumerate(masses)}


def answer_jobs(lm, jobs: list[Job], config, generate: int = 0, template: str | None = None,
                timing: dict | None = None, decoding=None, run_ids: list[str | None] | None = None) -> list:
    """One batch of questions → one record per question (baseline and steered).

    Args:
        lm: the loaded model.
        jobs: the batch's questions.
        config: the intervention (or what :func:`~mclcbf_diag.interventions.as_intervention` accepts).
        generate: with > 0, also generate up to this many tokens per condition and parse the text's answer;
            0: first-token answers only (the intervened run reuses the baseline's cache).
        template: the prompt template (``<image>`` and ``{question}``); None: the default LLaVA prompt.
        timing: a dict that gets this batch's ``inputs_seconds`` and ``baseline_seconds`` added; None: not timed.
        decoding: how answers are chosen (:class:`~mclcbf_diag.measurements.sampling.Decoding`; None: greedy);
            a sampled first token is drawn per question from its split and id (``baseline_sampled_token``,
            ``steered_sampled_token``). A list of decodings (one sampled setting at several seeds; first-token
            answers only) reads each from the same forwards and returns one list of records per decoding.
        run_ids: the ``run_id`` stamped on each decoding's records, one per decoding, in order: as long as the list
            of decodings, or one entry for one decoding (an entry None: its records carry no ``run_id``). None:
            no record carries one (one decoding only; a list of decodings needs its ids).

    Returns:
        One record per job, in order (a list of them per decoding, for a list). ``outcome`` is the question's class
        (:mod:`mclcbf_diag.measurements.outcomes`): unchanged, fixed, broken, derailed (no longer a Yes/No
        answer at the decision position, or non-finite logits) or non_finite (the intervention's edit
        overflowed and was dropped: ``steered_dropped``). ``flipped`` stays the bare sign change of logit
        Yes − No (the answers format requires it); with ``generate`` the official text parser's answers and
        their outcome (``text_outcome``) are beside them. ``baseline_image_mass_<layer>`` /
        ``steered_image_mass_<layer>``: the decision query's image mass per layer (module docstring).
    """
    from ..data import build_prompt, resolve_image
    from ..engine.batch import answer_batch, answer_pair, batch_inputs

    t0 = time.perf_counter()
    prompts = [build_prompt(j.question.text, *([template] if template else [])) for j in jobs]
    images = [image_of(resolve_image(j.question, j.image_dir), lm) for j in jobs]
    several = isinstance(decoding, (list, tuple))
    rids = [None] if run_ids is None and not several else run_ids
    if rids is None or len(rids) != (len(decoding) if several else 1) or (several and generate):
        raise ValueError("one run id per decoding; several decodings need first-token answers")  # programming error
    inputs = batch_inputs(lm, prompts, images, share_images=not generate)
    t_inputs = time.perf_counter() - t0
    keys = [f"{j.split}:{j.question.question_id}" for j in jobs]
    if generate:
        t1 = time.perf_counter()
        with _Observer(lm, inputs["input_ids"]) as ob:
            base = answer_batch(lm, prompts, images, config, False, inputs=inputs, max_new_tokens=generate,
                                decoding=decoding, keys=keys)
        t_base = time.perf_counter() - t1
        with _Observer(lm, inputs["input_ids"]) as os_:
            steer = answer_batch(lm, prompts, images, config, True, inputs=inputs, max_new_tokens=generate,
                                 decoding=decoding, keys=keys)
        b_mass, s_mass = (ob.last(1) or [None])[0], (os_.last(1) or [None])[0]
    else:
        with _Observer(lm, inputs["input_ids"]) as ob:
            pairs = answer_pair(lm, prompts, images, config, inputs=inputs, decoding=decoding, keys=keys)
        if not several:
            base, steer = pairs
        b_mass, s_mass = ob.last(2) or (None, None)
        t_base = ob.baseline_seconds()  # the baseline's plain forward; the intervened run is the last
    if timing is not None:
        timing["inputs_seconds"] = timing.get("inputs_seconds", 0.0) + t_inputs
        timing["baseline_seconds"] = timing.get("baseline_seconds", 0.0) + t_base
    def records(base, steer, rid):
        return [_record(j, b, s, rid, None if b_mass is None else b_mass[n], None if s_mass is None else s_mass[n],
                        generate) for n, (j, b, s) in enumerate(zip(jobs, base, steer))]

    if several:
        return [records(b, s, r) for (b, s), r in zip(pairs, rids)]
    return records(base, steer, rids[0])


_READING = {"margin", "answer", "p_yes", "p_no", "top_yes_no", "finite", "valid", "dropped", "text", "sampled_token"}


def _record(j: Job, b: dict, s: dict, rid, b_mass, s_mass, generate: int) -> dict:
    """One question's answers row; the intervention's own per-question figures (its ``row_summary``) as they came."""
    from ..data import parse_answer
    from ..measurements.outcomes import outcome

    q = j.question
    rec = {**({"run_id": rid} if rid else {}), "split": j.split, "question_id": q.question_id, "index": j.position,
           "image": q.image, "text": q.text, "label": q.label,
           "baseline_answer": b["answer"], "baseline_margin": b["margin"],
           "steered_answer": s["answer"], "steered_margin": s["margin"],
           "flipped": b["answer"] != s["answer"],
           "outcome": outcome(b["answer"], b["valid"], s["answer"], s["valid"], q.label, new_finite=s["finite"],
                              new_dropped=s.get("dropped", False)),
           "baseline_p_yes": b["p_yes"], "baseline_p_no": b["p_no"], "baseline_valid": b["valid"],
           "steered_p_yes": s["p_yes"], "steered_p_no": s["p_no"], "steered_valid": s["valid"],
           "steered_finite": s["finite"], "steered_dropped": s.get("dropped", False),
           **{k: v for k, v in s.items() if k not in _READING},
           **_mass_fields("baseline", b_mass), **_mass_fields("steered", s_mass)}
    if "sampled_token" in s:
        rec.update(baseline_sampled_token=b["sampled_token"], steered_sampled_token=s["sampled_token"])
    if generate:
        bt, st = parse_answer(b["text"]), parse_answer(s["text"])
        rec.update(baseline_text=b["text"], baseline_text_answer=bt, steered_text=s["text"], steered_text_answer=st,
                   text_outcome=outcome(bt, True, st, True, q.label))
    return rec


class RunTiming:
    """What answering cost, in ``OUT/timing.json``: one session per invocation that answered something.

    Each session holds the machine (``device``, ``dtype``, ``torch_threads``, ``cpus``,
    ``machine``, ``batch_size``) and the sums over its batches: ``questions``, ``seconds``
    (whole batches, the append included), ``inputs_seconds`` and ``baseline_seconds`` (the
    bare forward: see the module docstring). Rewritten atomically after every batch, so a
    killed session keeps what it timed. Not part of the run's identity.
    """

    def __init__(self, out: Path, **machine):
        self.path = Path(out) / TIMING
        self.sessions = self._read()
        self.session = {**machine, "questions": 0, "seconds": 0.0, "inputs_seconds": 0.0, "baseline_seconds": 0.0}

    def _read(self) -> list[dict]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError):
            return []  # absent or damaged: a fresh record (timing is information, not identity)
        sessions = data.get("sessions") if isinstance(data, dict) else None
        return [s for s in sessions if isinstance(s, dict)] if isinstance(sessions, list) else []

    def add(self, questions: int, seconds: float, part: dict) -> None:
        s = self.session
        s["questions"] += questions
        s["seconds"] += seconds
        for k in ("inputs_seconds", "baseline_seconds"):
            s[k] += part.get(k, 0.0)
        atomic_write_text(self.path, json.dumps({"sessions": [*self.sessions, s]}, indent=2) + "\n")

    @staticmethod
    def machine(lm, batch_size: int) -> dict:
        """The facts a session's times depend on."""
        import torch

        return {"device": str(lm.device), "dtype": str(lm.dtype).replace("torch.", ""),
                "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(), "machine": platform.machine(),
                "batch_size": batch_size}


def run_jobs(lm, todo: list[Job], config, out: Path, *, batch_size: int, generate: int = 0,
             on_batch=None, progress: bool = True, template: str | None = None,
             timing: RunTiming | None = None, decoding=None) -> None:
    """Answer ``todo`` batch by batch, appending each batch to ``out/answers.jsonl``.

    Args:
        lm: the loaded model.
        todo: the questions still to answer, in order.
        config: the intervention (as in :func:`answer_jobs`).
        out: the run folder (already claimed).
        batch_size: questions per batch.
        generate: max new tokens of a generated answer (0: first-token answers only).
        on_batch: called as ``on_batch(n)`` after the n-th batch (from 1) is on disk (tests interrupt there).
        progress: whether to show a progress bar on stderr.
        template: the prompt template; None: the default.
        timing: records each batch's cost once it is on disk; None: not timed.
        decoding: how answers are chosen (:func:`answer_jobs`).

    Every record carries the model's ``run_id`` attribute where it has one (else none).
    """
    run_jobs_together(lm, todo, [todo], config, [out], batch_size=batch_size, decodings=[decoding],
                      run_ids=[getattr(lm, "run_id", None)],
                      template=template, timings=None if timing is None else [timing], progress=progress,
                      on_batch=on_batch, generate=generate)


def run_jobs_together(lm, jobs: list[Job], todos: list[list[Job]], config, outs: list[Path], *, batch_size: int,
                      decodings: list, run_ids: list[str | None], template: str | None = None,
                      timings: list[RunTiming] | None = None, progress: bool = True, on_batch=None,
                      generate: int = 0) -> None:
    """Answer several runs that differ only in their sampled draw (``pope --seeds``) from one pass of forwards; with
    one run, that run's batches (:func:`run_jobs`).

    Every question some run lacks is answered once per batch (its baseline and intervened forwards);
    each run's first-token draw is read from those logits (:func:`answer_jobs` with a list of
    decodings) and its rows are appended to its own folder, only for the questions it lacks, so each
    folder holds what a run of its seed alone writes. Every run's ``timing.json`` gets the batch's cost
    (its share of the batch's questions, for a run that lacked only some): the forwards are shared, and
    answering any one run alone costs as much.

    Args:
        lm: the loaded model.
        jobs: every question of the runs, in order (the union of ``todos`` is answered in this order).
        todos: per run, the questions its folder lacks.
        config: the intervention (as in :func:`answer_jobs`).
        outs: the runs' folders (already claimed), in the order of ``decodings`` and ``run_ids``.
        batch_size: questions per batch.
        decodings: one :class:`~mclcbf_diag.measurements.sampling.Decoding` per run (sampled, for several; one:
            any, or None for greedy).
        run_ids: each run's id, stamped on its rows (an entry None: that run's rows carry none).
        template: the prompt template; None: the default.
        timings: each run's timing record (None: not timed).
        progress: whether to show a progress bar on stderr.
        on_batch: called as ``on_batch(n)`` after the n-th batch (from 1) is on disk.
        generate: max new tokens of a generated answer (0: first-token answers only); one run only.
    """
    from ..progress import tqdm

    wanted = [{j.key for j in todo} for todo in todos]
    todo = [j for j in jobs if any(j.key in w for w in wanted)]
    with tqdm(total=len(todo), unit="q", desc="pope", disable=not progress or not todo,
              file=sys.stderr, dynamic_ncols=True) as bar:
        for n, start in enumerate(range(0, len(todo), batch_size), start=1):
            batch = todo[start:start + batch_size]
            t0, part = time.perf_counter(), {}
            if len(decodings) == 1:
                per_run = [answer_jobs(lm, batch, config, generate, template, timing=part, decoding=decodings[0],
                                       run_ids=run_ids)]
            else:
                per_run = answer_jobs(lm, batch, config, generate, template, timing=part, decoding=list(decodings),
                                      run_ids=list(run_ids))
            for out, want, rows in zip(outs, wanted, per_run):
                append_records(out / ANSWERS, [r for j, r in zip(batch, rows) if j.key in want])
            seconds = time.perf_counter() - t0
            for timing, want in zip(timings or (), wanted):
                mine = sum(j.key in want for j in batch)  # a resumed run's part of the batch
                if mine:
                    share = mine / len(batch)
                    timing.add(mine, share * seconds, {k: share * v for k, v in part.items()})
            bar.set_postfix_str(batch[-1].split, refresh=False)
            bar.update(len(batch))
            if on_batch is not None:
                on_batch(n)

"""Benchmark: every registered intervention's ``pope`` throughput against the bare batched forward, in one run.

    python benchmarks/intervention_throughput.py [--n 64] [--split adversarial] [--batch-size 16]
                                                 [--threads 1] [--repeats 3] [--model DIR] [--only a,b:preset]

All paths answer the same N questions in one process, batch by batch:

* bare batched forward: what answering costs with no intervention at all: the images decoded,
  the inputs built (the vision tower once per distinct image), one plain batched forward and
  the first-token Yes/No read-out (:func:`mclcbf_diag.engine.batch.answer_batch` without an
  intervention);
* ``pope --intervention NAME``: what ``mclcbf-diag pope`` does per batch
  (:func:`mclcbf_diag.pope.answer_jobs`, only the file append left out): the same inputs, the
  baseline forward keeping its KV cache, the intervention's ``prepare``, the intervened
  continuation through nnsight, the image mass per layer and one record per question. Every
  name in :func:`mclcbf_diag.interventions.registry`, at its first preset (``--only``: the names given,
  ``NAME:PRESET`` for another preset, e.g. ``causalmm:language``).

Each path is warmed up on one batch first (nnsight wraps the model once; AD-HH searches its
heads once per model), then timed ``--repeats`` times in rounds: in each, every intervention's run right after a
bare run of its own. The ratio is the pope path's time over the bare run's just before it (the cost of both
conditions plus the intervention), the median over rounds: load drift on a shared machine moves both runs of a pair
alike, where the best of each path alone compares one path's luckiest run with another's. The CPU ratio is the same
with the process's CPU seconds (less moved by waiting for a core, still moved by the memory traffic of other
jobs). Questions/s and ms/question are each path's best run.

A decoding-level method may cost at most (1 + its auxiliary forwards) × the bare forward, plus 10%
(:meth:`~mclcbf_diag.interventions.base.Intervention.auxiliary_forwards`: auxiliary rows of the
question's own forward count as one forward, and so does a continuation of its cached prefix); the
``bound`` column prints that ratio beside each such method's, and whether it is met.
"""

from __future__ import annotations

import platform
import statistics
import time

import torch
from options import question_options  # benchmarks/ is the script's folder

from mclcbf_diag import pope
from mclcbf_diag.data import build_prompt, resolve_image
from mclcbf_diag.engine.batch import answer_batch
from mclcbf_diag.interventions import registry, resolve
from mclcbf_diag.memory import reuse_freed_memory
from mclcbf_diag.models import load_model


def bare_path(lm, jobs, batch_size):
    pope.image_of.cache_clear()  # images are decoded inside the timed region, as in a real run
    out = []
    for i in range(0, len(jobs), batch_size):
        batch = jobs[i:i + batch_size]
        prompts = [build_prompt(j.question.text) for j in batch]
        images = [pope.image_of(resolve_image(j.question, j.image_dir)) for j in batch]
        out += answer_batch(lm, prompts, images, None, False)
    return out


def pope_path(lm, jobs, intervention, batch_size):
    pope.image_of.cache_clear()
    out = []
    for i in range(0, len(jobs), batch_size):
        out += pope.answer_jobs(lm, jobs[i:i + batch_size], intervention)
    return out


def bound(aux_forwards: int) -> float:
    """The cost bound of a decoding-level method with ``aux_forwards`` auxiliary forwards: (1 + them) × 1.10."""
    return (1 + aux_forwards) * 1.10


def bound_text(aux_forwards: int | None, ratio: float) -> str:
    """``≤ 2.20× met`` (or ``OVER``) for a decoding-level method; empty for any other."""
    if aux_forwards is None:
        return ""
    return f"≤ {bound(aux_forwards):.2f}× {'met' if ratio <= bound(aux_forwards) else 'OVER'}"


def main() -> None:
    ap = question_options(__doc__.splitlines()[0], repeats=3)
    ap.add_argument("--only", default=None, help="comma-separated intervention names, each at its first preset or "
                                                 "NAME:PRESET (causalmm:language) (default: every registered one)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    reuse_freed_memory()  # freed tensors reused, not mapped afresh (mclcbf_diag.memory)
    names = args.only.split(",") if args.only else list(registry())
    interventions = {name: resolve(*name.split(":", 1)) for name in names}
    lm = load_model(args.model)
    jobs = pope.select_jobs(pope.question_files(args.split, None, None), args.n, None)

    paths = {"bare": lambda: bare_path(lm, jobs, args.batch_size)}
    for name, iv in interventions.items():
        paths[name] = lambda iv=iv: pope_path(lm, jobs, iv, args.batch_size)
    warm = jobs[: args.batch_size]
    bare_path(lm, warm, args.batch_size)
    for iv in interventions.values():
        pope_path(lm, warm, iv, args.batch_size)
    times = {k: [] for k in paths}  # wall seconds of every run of each path
    paired = {k: [] for k in interventions}  # (wall, CPU) ratio of each run to the bare run just before it
    results = {}

    def timed(k):
        t0, c0 = time.perf_counter(), time.process_time()
        results[k] = paths[k]()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        times[k].append(wall)
        return wall, cpu

    for _ in range(args.repeats):
        for k in interventions:  # each run beside a bare run of its own, so that load drift cancels in the ratio
            bare_wall, bare_cpu = timed("bare")
            wall, cpu = timed(k)
            paired[k].append((wall / bare_wall, cpu / bare_cpu))
    best = {k: min(v) for k, v in times.items()}
    ratio = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in paired.items()}
    spread = {k: (min(w for w, _ in v), max(w for w, _ in v)) for k, v in paired.items()}
    n, bare = len(jobs), best["bare"]
    same = {k: sum(b["answer"] == r["baseline_answer"] for b, r in zip(results["bare"], results[k]))
            for k in interventions}
    print(f"model {lm.source}; {n} {args.split} questions; batch size {args.batch_size}; torch threads "
          f"{torch.get_num_threads()}; {platform.machine()}, {torch.get_num_interop_threads()} interop threads; "
          f"{args.repeats} rounds (ratios: medians of paired runs; questions/s: each path's best run)")
    print(f"{'path':<34} {'questions/s':>12} {'ms/question':>12} {'ratio to bare':>14} {'rounds':>12} "
          f"{'CPU ratio':>10} {'bound':>16}")
    print(f"{'bare batched forward':<34} {n / bare:12.1f} {1000 * bare / n:12.2f} {1.0:13.2f}× {'':>12} {1.0:9.2f}×")
    for k, iv in interventions.items():
        t, (wall, cpu) = best[k], ratio[k]
        low, high = spread[k]
        print(f"{'pope --intervention ' + k:<34} {n / t:12.1f} {1000 * t / n:12.2f} {wall:13.2f}× "
              f"{f'{low:.2f}–{high:.2f}':>12} {cpu:9.2f}× "
              f"{bound_text(iv.auxiliary_forwards(), wall):>16}")
    print("ratio = pope time / bare time (both conditions, the intervention and the records, against one plain "
          "forward), the median over rounds of each run against the bare run just before it (rounds: the lowest and "
          "highest of those; CPU ratio: the median with the process's CPU seconds); questions/s and ms/question: "
          "the best run; baseline answers equal to the bare forward's: "
          + ", ".join(f"{k} {v}/{n}" for k, v in same.items()))


if __name__ == "__main__":
    main()

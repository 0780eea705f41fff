"""Benchmark: questions/s of ``mclcbf-diag explain`` over a split, against one bare batched forward per question.

    python benchmarks/population_explain.py [--n 64] [--split adversarial] [--batch-size 16] [--threads 1]
                                            [--model DIR] [--intervention NAME] [--preset P] [--set k=v …]
                                            [--k-max 1024]
                                            [--bisect-steps 8] [--no-sweep] [--repeats 1]

Both paths answer the same N questions in one process, batch by batch, images loaded inside
the timed region:

* population: what the command does per batch (:func:`mclcbf_diag.population.run.job_rows`):
  every experiment of the verdict (trace records, knockouts, graded sweep, tested causes,
  dose-response, counterfactual fixes), one row and the records per question (only the file
  writes are left out);
* bare forward: :func:`mclcbf_diag.engine.batch.batch_inputs` and one plain forward of the batch
  (the first-token logits), nothing else.

It prints questions per second of each, their ratio (target ≤ 3×), the seconds each stage of
the verdict took, and the estimated time of the whole split (target ≤ 600 s).
"""

from __future__ import annotations

import time

import torch
from options import question_options  # benchmarks/ is the script's folder

from mclcbf_diag import pope
from mclcbf_diag.data import build_prompt, resolve_image
from mclcbf_diag.engine.batch import batch_inputs
from mclcbf_diag.experiments import verdict as V
from mclcbf_diag.interventions import resolve
from mclcbf_diag.memory import reuse_freed_memory
from mclcbf_diag.models import load_model
from mclcbf_diag.population import run as prun


def bare(lm, jobs, batch_size):
    pope.image_of.cache_clear()
    for i in range(0, len(jobs), batch_size):
        b = jobs[i:i + batch_size]
        inputs = batch_inputs(lm, [build_prompt(j.question.text) for j in b],
                              [pope.image_of(resolve_image(j.question, j.image_dir)) for j in b])
        with torch.no_grad():
            lm.model(**inputs, logits_to_keep=1)


def population(lm, jobs, config, settings, batch_size, timings):
    pope.image_of.cache_clear()
    original = V.explain_batch

    def timed(*a, **kw):
        return original(*a, **kw, timings=timings)

    prun.explain_batch = timed
    try:
        for i in range(0, len(jobs), batch_size):
            prun.job_rows(lm, jobs[i:i + batch_size], config, settings)
    finally:
        prun.explain_batch = original


def main() -> None:
    ap = question_options(__doc__.splitlines()[0], repeats=1)
    ap.add_argument("--intervention", default="mclcbf", help="the method explained (default: mclcbf)")
    ap.add_argument("--preset", default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KNOB=VALUE")
    ap.add_argument("--k-max", type=float, default=1024.0)
    ap.add_argument("--bisect-steps", type=int, default=8)
    ap.add_argument("--no-sweep", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    reuse_freed_memory()  # freed tensors reused, not mapped afresh (mclcbf_diag.memory)
    lm = load_model(args.model)
    config = resolve(args.intervention, args.preset, args.overrides)
    settings = V.Settings(k_max=args.k_max, bisect_steps=args.bisect_steps, sweep=not args.no_sweep)
    jobs = pope.select_jobs(pope.question_files(args.split, None, None), args.n, None)
    population(lm, jobs[:2], config, settings, 2, {})  # warm-up
    bare(lm, jobs[:2], 2)
    t_pop, t_bare, timings = [], [], {}
    for r in range(args.repeats):
        t0 = time.perf_counter()
        bare(lm, jobs, args.batch_size)
        t_bare.append(time.perf_counter() - t0)
        stage = {}
        t0 = time.perf_counter()
        population(lm, jobs, config, settings, args.batch_size, stage)
        t_pop.append(time.perf_counter() - t0)
        if t_pop[-1] == min(t_pop):
            timings = stage
    n, tp, tb = len(jobs), min(t_pop), min(t_bare)
    print(f"model {lm.source}; {args.intervention}; {n} {args.split} questions; torch threads "
          f"{torch.get_num_threads()}; batch size {args.batch_size}; k_max {args.k_max:g}, {args.bisect_steps} "
          "bisection steps, sweep "
          f"{'off' if args.no_sweep else 'on'}; best of {args.repeats}")
    print(f"population explain (every experiment)  {n / tp:8.2f} questions/s  ({1000 * tp / n:.0f} ms/question)")
    print(f"bare batched forward                  {n / tb:8.2f} questions/s  ({1000 * tb / n:.1f} ms/question)")
    print(f"ratio population / bare forward = {tp / tb:.1f}×  (target ≤ 3×)")
    total = len(pope.select_jobs(pope.question_files(args.split, None, None), None, None))
    print(f"the whole {args.split} split ({total} questions): about {total * tp / n:.0f} s  (target ≤ 600 s)")
    total = sum(timings.values()) or 1.0
    for name, sec in sorted(timings.items(), key=lambda kv: -kv[1]):
        print(f"  {name:48s} {sec:7.2f} s  {100 * sec / total:5.1f}%  ({1000 * sec / n:.0f} ms/question)")


if __name__ == "__main__":
    main()

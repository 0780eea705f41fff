"""Benchmark: questions/s of the ``pope`` path against a seed-style per-question loop.

    python benchmarks/pope_throughput.py [--n 64] [--split adversarial] [--batch-size 16]
                                         [--threads 1] [--repeats 3] [--model DIR] [--set k=v …]

Both paths answer the same N questions, baseline AND steered, in one process:

* ``pope``: what ``mclcbf-diag pope`` does per batch (:func:`mclcbf_diag.pope.answer_jobs`):
  load the images, one batched baseline forward, one steered continuation through nnsight,
  first-token Yes/No margins, one record per question (only the file append is left out).
* seed-style: per question, ``generate(max_new_tokens=5)`` without hooks and again with
  the seed's decoder-layer pre-hooks (``seed_style.seed_hooks``, the toolkit's barrier
  math), then POPE's parser on both texts.

The steering config is the seed's (``seed-exp6``) with ``span=detected`` by default, so the
barrier fires on the embedded model (with the literal ``[1, 577)`` span it never does).
Each path is timed ``--repeats`` times, in alternating rounds; the best run counts. Target: ratio ≥ 10.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from options import question_options  # noqa: E402 (benchmarks/ is the script's folder)
from seed_style import seed_hooks  # noqa: E402

from mclcbf_diag import barrier as B  # noqa: E402
from mclcbf_diag import pope  # noqa: E402
from mclcbf_diag.data import build_prompt, load_image, parse_answer, resolve_image  # noqa: E402
from mclcbf_diag.memory import reuse_freed_memory
from mclcbf_diag.models import load_model  # noqa: E402


def pope_path(lm, jobs, config, batch_size):
    pope.image_of.cache_clear()  # images are loaded inside the timed region, as in a real run
    out = []
    for i in range(0, len(jobs), batch_size):
        out += pope.answer_jobs(lm, jobs[i:i + batch_size], config)
    return out


def seed_loop(lm, jobs, config):
    tok = lm.processor.tokenizer
    gen = dict(max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    out = []
    for j in jobs:
        image = load_image(resolve_image(j.question, j.image_dir))
        inputs = lm.inputs(build_prompt(j.question.text), image)
        n = inputs["input_ids"].shape[1]
        with torch.no_grad():
            base = lm.model.generate(**inputs, **gen)
            with seed_hooks(lm, config, inputs["input_ids"]):
                steered = lm.model.generate(**inputs, **gen)
        out.append({"baseline_answer": parse_answer(tok.decode(base[0, n:], skip_special_tokens=True)),
                    "steered_answer": parse_answer(tok.decode(steered[0, n:], skip_special_tokens=True))})
    return out


def best_times(fns, repeats):
    """Best wall time of each function; rounds alternate so load drift hits both alike."""
    times, results = [[] for _ in fns], [None] * len(fns)
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            t0 = time.perf_counter()
            results[k] = fn()
            times[k].append(time.perf_counter() - t0)
    return [min(t) for t in times], results


def main() -> None:
    ap = question_options(__doc__.splitlines()[0], repeats=3)
    ap.add_argument("--preset", default="seed-exp6")
    ap.add_argument("--set", dest="overrides", action="append", default=None, metavar="KNOB=VALUE")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    reuse_freed_memory()  # freed tensors reused, not mapped afresh (mclcbf_diag.memory)
    overrides = ["span=detected"] if args.overrides is None else args.overrides
    config = B.apply_overrides(B.get_preset(args.preset), overrides)
    if config.site != "resid_pre" or config.tokens != "last":
        sys.exit("the seed-style loop steers the residual of the last token only: keep site and tokens")
    lm = load_model(args.model)
    jobs = pope.select_jobs(pope.question_files(args.split, None, None), args.n, None)

    pope_path(lm, jobs[: args.batch_size], config, args.batch_size)  # warm-up
    seed_loop(lm, jobs[:2], config)
    (t_pope, t_seed), (batched, seed) = best_times(
        [lambda: pope_path(lm, jobs, config, args.batch_size), lambda: seed_loop(lm, jobs, config)], args.repeats)

    n = len(jobs)
    agree = sum(p["baseline_answer"] == s["baseline_answer"] for p, s in zip(batched, seed))
    agree_st = sum(p["steered_answer"] == s["steered_answer"] for p, s in zip(batched, seed))
    fired = sum(bool(p["layers_fired"]) for p in batched)
    print(f"model {lm.source}; {n} {args.split} questions; torch threads {torch.get_num_threads()}; "
          f"batch size {args.batch_size}; best of {args.repeats}")
    print(f"config: {args.preset} {' '.join(overrides)} (barrier fired for {fired}/{n} questions)")
    print(f"pope path (batched, both conditions)   {n / t_pope:8.1f} questions/s  ({t_pope:.2f} s)")
    print(f"seed-style loop (2 × generate(5))      {n / t_seed:8.1f} questions/s  ({t_seed:.2f} s)")
    print(f"ratio pope / seed-style = {t_seed / t_pope:.1f}×  (target ≥ 10×)")
    print(f"baseline answers agree (first-token logits vs parsed text): {agree}/{n}; steered: {agree_st}/{n}")


if __name__ == "__main__":
    main()

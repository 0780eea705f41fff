"""Benchmark: the full ``trace`` against two bare forwards (baseline + seed-style steered).

Prints medians over repeats and the ratio, measured in one run on the same sample:

    python benchmarks/trace_overhead.py [--model DIR] [--repeats 20] [--threads 1]

The trace prepares the sample's inputs once and does both forwards (baseline and steered)
through nnsight plus every probe, so the reference is what any steering study must run
anyway: the same preparation, one plain forward and one forward with the seed's
decoder-layer hooks. Target: ratio ≤ 1.5.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from seed_style import seed_hooks  # noqa: E402

from mclcbf_diag import barrier as B  # noqa: E402
from mclcbf_diag import shipped
from mclcbf_diag.data import load_image, load_pope, resolve_image  # noqa: E402
from mclcbf_diag.experiments.trace import sample_inputs, trace_sample  # noqa: E402
from mclcbf_diag.memory import reuse_freed_memory
from mclcbf_diag.models import load_model  # noqa: E402

POPE = shipped.POPE


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sample", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    reuse_freed_memory()  # freed tensors reused, not mapped afresh (mclcbf_diag.memory)
    lm = load_model(args.model)
    q = load_pope(shipped.pope_file("adversarial"))[args.sample]
    image = load_image(resolve_image(q, shipped.IMAGES))
    config = B.get_preset("seed-exp6")
    _, inputs = sample_inputs(lm, q.text, image)

    def prepare():
        sample_inputs(lm, q.text, image)

    def bare():
        with torch.no_grad():
            lm.model(**inputs)

    def seed_forward():
        with torch.no_grad(), seed_hooks(lm, config, inputs["input_ids"]):
            lm.model(**inputs)

    def full_trace():
        trace_sample(lm, q, image, config)

    t_prep = median_time(prepare, args.repeats)
    t_bare = median_time(bare, args.repeats)
    t_seed = median_time(seed_forward, args.repeats)
    t_trace = median_time(full_trace, args.repeats)
    print(f"model {lm.source}, threads {args.threads}, repeats {args.repeats}")
    print(f"preprocessing          {t_prep * 1e3:8.2f} ms  (processor: image + prompt, once per sample)")
    print(f"bare forward           {t_bare * 1e3:8.2f} ms")
    print(f"seed-style forward     {t_seed * 1e3:8.2f} ms")
    print(f"trace (both + probes)  {t_trace * 1e3:8.2f} ms")
    print(f"ratio trace / (preprocessing + bare + seed-style) = {t_trace / (t_prep + t_bare + t_seed):.2f}"
          "  (target ≤ 1.5)")


if __name__ == "__main__":
    main()

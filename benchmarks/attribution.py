"""Benchmark: the full activation-patching grid and attribution patching of one question, against a bare forward.

Prints the fastest of several interleaved repeats and the ratios, measured in one run on the same sample:

    python benchmarks/attribution.py [--model DIR] [--repeats 10] [--threads 1] [--sample 0] [--device cuda]
                                     [--dtype bfloat16] [--localise pai]

* bare forward: one plain forward of the clean input (vision tower included), no cache kept, with the
  model as loaded (eager attention, which the toolkit needs for attention probabilities); also shown
  with transformers' sdpa attention, which the patching's plain forwards use (they read no probabilities);
* activation patching: :func:`mclcbf_diag.experiments.attribute.activation_patching` from the two inputs, everything
  included: the plain forward of the clean and corrupted input (one batch of two) that keeps their caches
  and activations, then one continuation batch per layer (every residual, head and MLP patch, both
  directions). Target (#33): ≤ 6 × the bare forward;
* attribution patching, denoising: :func:`~mclcbf_diag.experiments.attribute.attribution_patching` from the two
  inputs: a plain forward of the clean input, a forward of the corrupted one recording the graph, one
  backward. Target: ≤ 3 × the bare forward;
* with ``--localise NAME`` (e.g. pai, vista): :func:`~mclcbf_diag.experiments.attribute.localisation` of that
intervention
  (default preset), one direction (its activations put into the baseline) and both (the baseline's restored in
  the intervened run too, which runs the intervention on in every patched row).

The corrupted input is the embedded world's minimal pair of the sample (its default corruption): the
same scene without (or with) the asked object.
"""

from __future__ import annotations

import argparse
import time

import torch

from mclcbf_diag import shipped
from mclcbf_diag.data import build_prompt, load_image, load_pope, resolve_image
from mclcbf_diag.data.corrupt import pair_image
from mclcbf_diag.experiments.attribute import activation_patching, attribution_patching, localisation
from mclcbf_diag.memory import reuse_freed_memory
from mclcbf_diag.models import load_model
from mclcbf_diag.runner import attention_implementation


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def best_times(fns: dict, repeats: int, device="cpu") -> dict:
    """The fastest of ``repeats`` runs of each function, the functions interleaved round by round (so a
    machine whose pace drifts, or that another job shares, slows them alike)."""
    for fn in fns.values():
        fn()  # warm-up
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[k].append(time.perf_counter() - t0)
    return {k: min(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sample", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--localise", default=None, metavar="NAME", help="also time the localisation of this intervention")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    reuse_freed_memory()  # freed tensors reused, not mapped afresh (mclcbf_diag.memory)
    lm = load_model(args.model, dtype=args.dtype, device=args.device)
    q = load_pope(shipped.pope_file("adversarial"))[args.sample]
    image = load_image(resolve_image(q, shipped.IMAGES))
    corrupted_image, what = pair_image(q, image, q.image)
    prompt = build_prompt(q.text)
    clean, corrupted = lm.inputs(prompt, image), lm.inputs(prompt, corrupted_image)

    def bare():
        with torch.no_grad():
            lm.model(**clean, use_cache=False)

    def bare_sdpa():
        with torch.no_grad(), attention_implementation(lm, "sdpa"):
            lm.model(**clean, use_cache=False)

    grid = activation_patching(lm, clean, corrupted)
    fns = {"bare": bare, "bare_sdpa": bare_sdpa, "grid": lambda: activation_patching(lm, clean, corrupted),
           "atp": lambda: attribution_patching(lm, clean, corrupted)}
    if args.localise:
        from mclcbf_diag.interventions import resolve

        iv = resolve(args.localise)
        fns["local"] = lambda: localisation(lm, clean, iv, directions=("denoise",))
        fns["local_both"] = lambda: localisation(lm, clean, iv)
    t = best_times(fns, args.repeats, args.device)
    t_bare, t_sdpa, t_grid, t_atp = t["bare"], t["bare_sdpa"], t["grid"], t["atp"]
    n = sum(int(t.numel()) for k in ("resid", "heads", "mlp") for t in getattr(grid, k).values())
    print(f"model {lm.source} ({args.dtype} on {args.device}), threads {args.threads}, repeats {args.repeats}, "
          f"question {q.question_id} "
          f"({q.text}), corrupted: {what}")
    print(f"bare forward           {t_bare * 1e3:8.2f} ms  (the model as loaded: eager attention)")
    print(f"bare forward, sdpa     {t_sdpa * 1e3:8.2f} ms  (transformers' sdpa attention, no probabilities)")
    print(f"activation patching    {t_grid * 1e3:8.2f} ms  ({n} patches, {lm.n_layers} continuation batches)")
    print(f"attribution patching   {t_atp * 1e3:8.2f} ms  (denoising: two forwards, one backward)")
    print(f"ratio activation patching / bare forward   {t_grid / t_bare:5.2f}  (target ≤ 6; / the sdpa forward "
          f"{t_grid / t_sdpa:.2f})")
    print(f"ratio attribution patching / bare forward  {t_atp / t_bare:5.2f}  (target ≤ 3; / the sdpa forward "
          f"{t_atp / t_sdpa:.2f})")
    if args.localise:
        print(f"localisation of {args.localise}, into the baseline  {t['local'] * 1e3:8.2f} ms  "
              f"({t['local'] / t_bare:.2f} × the bare forward)")
        print(f"localisation of {args.localise}, both directions    {t['local_both'] * 1e3:8.2f} ms  "
              f"({t['local_both'] / t_bare:.2f} × the bare forward)")

if __name__ == "__main__":
    main()

"""``mclcbf-diag explain`` without ``--sample``/``--question-id``: the verdict of every question of a split.

Resumable and sharded like ``pope`` (the same store: ``run.json`` claims the folder, rows are
appended to ``answers.jsonl`` atomically per batch, a changed configuration is refused,
``merge`` joins shards); see :mod:`mclcbf_diag.population`.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import UserError
from .common import (
    intervention_from_args,
    prepare_from_args,
    split_run_checks,
    weights_from_args,
)

KIND = "explain-population"
MAX_BATCH = 256


def add_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("a whole split (without --sample/--question-id)")
    g.add_argument("--limit", type=int, default=None, help="only the first N questions of each split")
    g.add_argument("--shard", default=None, metavar="I/N",
                   help="only questions at positions p with p %% N == I (0-based); join shards with `merge`")
    g.add_argument("--batch-size", type=int, default=16, help="questions per batch (default 16)")
    g.add_argument("--bisect-steps", type=int, default=8,
                   help="bisection steps of the dose-response after the doubling grid (default 8)")
    g.add_argument("--no-sweep", action="store_true", help="skip the graded image-mass sweep")
    g.add_argument("--pages", default=None, metavar="WHICH",
                   help="also write the explain page of these questions, from the run's records (no second forward), "
                        "linked from population.html: wrong (answers), changed (by the intervention or a fix), all, "
                        "or N (the first N)")
    g.add_argument("--resume-anyway", action="store_true",
                   help="resume a run written with other torch/transformers/nnsight versions (recorded in run.json)")


def check_single(args) -> None:
    """Options of a whole split given with --sample/--question-id: one line saying so."""
    which = "--sample" if args.sample is not None else "--question-id"
    if getattr(args, "split", None) == "all":
        raise UserError(f"--split all with {which}: one sample comes from one split; pass --split "
                        f"random|popular|adversarial, or drop {which} to explain the whole split")
    for flag, default in (("--limit", None), ("--shard", None), ("--batch-size", 16), ("--bisect-steps", 8),
                          ("--no-sweep", False), ("--resume-anyway", False), ("--pages", None)):
        if getattr(args, flag[2:].replace("-", "_"), default) != default:
            raise UserError(f"{flag} applies to a whole split, not to {which}; drop {flag}, or drop {which} to "
                            "explain every question")


def check_population_numbers(args) -> None:
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit {args.limit} must be >= 1 (the number of questions per split)")
    if not 1 <= args.batch_size <= MAX_BATCH:
        raise UserError(f"--batch-size {args.batch_size} must be between 1 and {MAX_BATCH} (16–32 is typical)")
    if not 0 <= args.bisect_steps <= 64:
        raise UserError(f"--bisect-steps {args.bisect_steps} must be between 0 and 64")
    if not 1 <= args.k_max <= 1e12:
        raise UserError(f"--k-max {args.k_max}: the dose-response starts at k = 1; give a value >= 1 (and at most "
                        "1e12)")
    pages = getattr(args, "pages", None)
    if pages is not None and pages not in ("wrong", "changed", "all") and not (pages.isdigit() and int(pages) >= 1):
        raise UserError(f"--pages {pages}: give wrong, changed, all or a number of questions >= 1 (e.g. --pages wrong)")
    if args.per_layer:
        raise UserError("--per-layer is for one sample (--sample or --question-id); drop it for a whole split")


def population_identity(args, config, files, shard, all_jobs, where, n_layers) -> dict:
    from ..data import LLAVA_PROMPT
    from ..experiments.sweep import sweep_settings
    from .pope import run_identity as pope_identity

    ident = pope_identity(argparse.Namespace(**{**vars(args), "generate": 0}), config, files, shard, all_jobs, where)
    sweep = [] if args.no_sweep else [[t, None if w is None else list(w), k, v]
                                      for t, w, k, v in sweep_settings(n_layers)]
    ident.update(kind=KIND, k_max=float(args.k_max), bisect_steps=int(args.bisect_steps), sweep=sweep,
                 embedded_data=args.pope_file is None, image_dir_option=args.image_dir,
                 prompt_option=args.prompt != LLAVA_PROMPT)
    return ident


def cmd_population(args, on_batch=None) -> int:
    from ..pope.store import ANSWERS, resumed, run_id
    from ..storage import show

    # 1. Everything that needs no model.
    check_population_numbers(args)
    shard, files, all_jobs, jobs, out = split_run_checks(args, f"reports/explain-{args.split}")
    from ..models.loading import check_prompt_lengths, model_facts

    facts = model_facts(args.model)
    config = intervention_from_args(args, facts.n_layers, facts.model_type)
    prep = prepare_from_args(args)
    from ..data import build_prompt

    check_prompt_lengths(prep, [build_prompt(j.question.text, args.prompt) for j in jobs],
                         [f"question_id {j.question.question_id!r} ({j.split})" for j in jobs])
    identity = population_identity(args, config, files, shard, all_jobs, prep.where, facts.n_layers)
    rid = run_id(identity)
    # 2. Lock, claim, answer what is missing.
    from ..experiments.verdict import Settings
    from ..population.outputs import write_outputs
    from ..population.run import run_population

    settings = Settings(k_max=float(args.k_max), bisect_steps=int(args.bisect_steps), sweep=not args.no_sweep,
                        template=args.prompt)

    def answer(lm, todo):
        run_population(lm, todo, config, out, settings, batch_size=args.batch_size, run_id=rid, on_batch=on_batch)

    with resumed(out, identity, jobs, lambda: weights_from_args(args, prep), answer, args.resume_anyway) as rows:
        t = write_outputs(out, rows, identity, pages=getattr(args, "pages", None))
    print(t["answer"])
    print(f"wrote {show(out)}/{ANSWERS} ({len(rows)} questions), questions.parquet, records.parquet, causes.csv, "
          "doses.csv, masses.csv, fixes.csv, settings.csv, paired.csv, population.html"
          + (f" and the pages of --pages {args.pages} in pages/" if getattr(args, "pages", None) else ""),
          file=sys.stdout)
    return 0


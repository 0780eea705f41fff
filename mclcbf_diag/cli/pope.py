"""``mclcbf-diag pope`` and ``merge``: the command line over :mod:`mclcbf_diag.pope`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .. import knobs as K
from ..errors import UserError
from ..pope import distributed
from ..pope.answer import MAX_BATCH_SIZE, RunTiming, run_jobs
from ..pope.jobs import (
    SPLITS,
    Job,
    job_image,
    parse_shard,
    select_jobs,
)
from ..pope.metrics import write_outputs
from ..pope.store import (
    _INFO_KEYS,
    ANSWERS,
    FORMAT,
    RUN,
    _encode_rows,
    _load_run,
    differing_keys,
    read_records,
    resumed,
    run_id,
    unique_sorted,
)
from ..storage import (
    FolderLock,
    atomic_write,
    atomic_write_text,
    check_writable,
    files_fingerprint,
    make_dir,
    sha256_file,
    show,
)
from .common import (
    intervention_from_args,
    intervention_options,
    max_new_tokens_limit,
    model_options,
    prepare_from_args,
    prompt_option,
    split_run_checks,
    weights_from_args,
)


def _model_files(where: str) -> str | None:
    """Fingerprint of a local model folder's weights, config and tokenizer files (None for a hub id)."""
    folder = Path(where)
    if not folder.is_dir():
        return None
    names = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
             and p.suffix in (".safetensors", ".json", ".jinja", ".model", ".txt") and p.name != "training.json"]
    return files_fingerprint(names, base=folder)


def _identity(args, config, files, shard, all_jobs: list[Job] | None = None, where: str | None = None) -> dict:
    model = args.model or "embedded"
    if args.model and Path(args.model).expanduser().exists():
        model = str(Path(args.model).expanduser().resolve())
    ident = {"format": FORMAT, "model": model, "dtype": args.dtype, "intervention": args.intervention, "preset": args.preset,
             "overrides": list(args.overrides), "config": K.to_dict(config.knobs),
             "splits": [s for s, _, _ in files], "pope_files": [str(p) for _, p, _ in files],
             "limit": args.limit, "shard": None if shard is None else f"{shard[0]}/{shard[1]}",
             "generate": args.generate, "prompt": args.prompt}
    if where is not None:
        ident["model_files"] = _model_files(where)
    ident["pope_sha256"] = [sha256_file(p) for _, p, _ in files]
    if all_jobs is not None:
        ident["images"] = files_fingerprint([job_image(j) for j in all_jobs])
        ident["image_dirs"] = sorted({str(Path(d).resolve()) for _, _, d in files})
    return ident


def _check_numbers(args) -> None:
    for name, low in (("limit", 1), ("batch_size", 1), ("generate", 0)):
        v = getattr(args, name)
        if v is not None and v < low:
            raise UserError(f"--{name.replace('_', '-')} {v} must be >= {low}")
    if args.batch_size > MAX_BATCH_SIZE:
        raise UserError(f"--batch-size {args.batch_size} is more than {MAX_BATCH_SIZE}; pass a smaller batch "
                        "(16–64 is typical)")
    cap = max_new_tokens_limit()
    if args.generate > cap:
        raise UserError(f"--generate {args.generate} is more than the limit of {cap} new tokens; pass a smaller "
                        "number, or raise the limit with MCLCBF_DIAG_MAX_NEW_TOKENS=N")


def cmd_pope(args, on_batch=None) -> int:
    group = distributed.from_env()
    if group is not None:
        return _pope_across_ranks(args, group, on_batch)
    return _pope(args, on_batch)


def _pope_across_ranks(args, group: distributed.Group, on_batch=None) -> int:
    """One rank of a torchrun/accelerate launch: answer shard RANK/WORLD, then rank 0 merges (see pope.distributed)."""
    import argparse as _argparse

    if args.shard is not None:
        raise UserError(f"--shard {args.shard} with a torchrun/accelerate launch (WORLD_SIZE={group.world}): each rank "
                        "already takes its shard; drop --shard, or run without the launcher")
    out = Path(args.out or "reports/pope")
    part = _argparse.Namespace(**{**vars(args), "shard": f"{group.rank}/{group.world}", "out": str(group.part(out))})
    if str(args.device).startswith("cuda"):
        part.device = f"cuda:{group.local_rank}"
    distributed.init(group)
    try:
        error = None
        try:
            rc = _pope(part, on_batch)
        except UserError as exc:
            error, rc = exc, 2
        if not distributed.all_ok(error is None):
            raise error or UserError(f"another rank of this launch failed (see its message); rank {group.rank} "
                                     f"kept its part in {show(group.part(out))}: rerun the same command to resume")
        if group.rank == 0:
            rc = cmd_merge(_argparse.Namespace(out=str(out), shard_dirs=[str(p) for p in group.parts(out)]))
        distributed.barrier()
        return rc
    finally:
        distributed.close()


def _pope(args, on_batch=None) -> int:
    from ..data import build_prompt

    # 1. Everything that needs no model: numbers, shard, knobs vs. the depth, files, images, --out.
    _check_numbers(args)
    shard, files, all_jobs, jobs, out = split_run_checks(args, "reports/pope")
    facts = _model_facts(args)  # imports torch and transformers: after the cheap checks
    config = intervention_from_args(args, facts.n_layers)
    # 2. The tokenizer (not the weights): dtype, device and every prompt's length.
    prep = prepare_from_args(args)
    prompts = [build_prompt(j.question.text, args.prompt) for j in jobs]
    from ..models.loading import check_prompt_lengths

    check_prompt_lengths(prep, prompts, [f"question_id {j.question.question_id!r} ({j.split})" for j in jobs],
                         max_new_tokens=args.generate)
    identity = _identity(args, config, files, shard, all_jobs, prep.where)
    rid = run_id(identity)
    # 3. Only now write: lock the folder, claim it, answer what is missing.
    def answer(lm, todo):
        lm.run_id = rid
        timing = RunTiming(out, **RunTiming.machine(lm, args.batch_size))
        run_jobs(lm, todo, config, out, batch_size=args.batch_size, generate=args.generate,
                 on_batch=on_batch, template=args.prompt, timing=timing)

    with resumed(out, identity, jobs, lambda: weights_from_args(args, prep), answer) as records:
        write_outputs(out, records, identity)
    timed = ", timing.json" if (out / "timing.json").is_file() else ""
    print(f"wrote {show(out)}/{ANSWERS} ({len(records)} questions), metrics.csv, flips.csv, summary.html{timed}")
    return 0


def _model_facts(args):
    from ..models.loading import model_facts

    return model_facts(args.model)


def cmd_merge(args) -> int:
    out = Path(args.out)
    dirs = [Path(d) for d in args.shard_dirs]
    if any(out.resolve() == d.resolve() for d in dirs):
        raise UserError(f"merge OUT {show(out)} is one of the shard folders; pass a new folder for the merged run")
    ids = [_read_run(d) for d in dirs]
    for d, ident in zip(dirs[1:], ids[1:]):
        diff = differing_keys(ids[0], ident, ignore=(*_INFO_KEYS, "shard"))
        if diff:
            raise UserError(f"{show(d)} and {show(dirs[0])} ran different configurations (differ in: "
                            f"{', '.join(diff)}); merge only shards of one run")
    if (out / RUN).is_file() and "merged_from" not in _read_run(out):
        raise UserError(f"{show(out)} holds a pope run, not a merge; pass an empty folder as merge OUT")
    check_writable(out, "merge OUT")
    _check_inputs_unchanged(ids[0])
    _report_shards([ident.get("shard") for ident in ids])
    rid = run_id(ids[0])
    records = []
    for d in dirs:
        recs, partial = read_records(d / ANSWERS)
        if partial:
            print(f"note: {show(d / ANSWERS)} ends in a partial line (interrupted run); it was skipped")
        foreign = [r for r in recs if "run_id" in r and r["run_id"] != rid]
        if foreign:
            raise UserError(f"{show(d / ANSWERS)} holds {len(foreign)} rows of another run (run_id "
                            f"{foreign[0]['run_id']}, {RUN} says {rid}); rerun that shard into a fresh folder")
        records += recs
    identity = {**ids[0], "shard": None, "merged_from": [str(d) for d in dirs]}
    records, dups = unique_sorted(records, identity["splits"])
    if not records:
        raise UserError(f"the folders {', '.join(map(show, dirs))} hold no answers yet; run the shards first")
    print(f"{len(records)} questions from {len(dirs)} folders; {dups} duplicate rows dropped")
    _report_missing(identity, records)
    population = identity.get("kind") == "explain-population"  # `explain` over a split: its own outputs
    make_dir(out, "merge OUT")
    with FolderLock(out, "merge OUT"):
        atomic_write_text(out / RUN, json.dumps(identity, indent=2) + "\n")
        atomic_write(out / ANSWERS, _encode_rows(records))
        if population:
            from ..population.outputs import write_outputs as population_outputs

            population_outputs(out, records, identity, part_dirs=dirs)  # the records from every shard's parts
        else:
            write_outputs(out, records, identity)
    print(f"wrote {show(out)}/{ANSWERS}, " + ("questions.parquet, records.parquet, population.html" if population
                                             else "metrics.csv, flips.csv, summary.html"))
    return 0


def _check_inputs_unchanged(identity: dict) -> None:
    """merge: the POPE files the shards read must still be the same files (content hash)."""
    for path, want in zip(identity.get("pope_files", []), identity.get("pope_sha256", [])):
        try:
            got = sha256_file(path)
        except OSError:
            print(f"note: {path} (read by the shards) is gone; cannot check for missing questions against it")
            continue
        if got != want:
            raise UserError(f"{path} changed since the shards ran (sha256 {got[:12]}… instead of {want[:12]}…); "
                            "rerun the shards on the current file, or restore the file they read")


def _read_run(d: Path) -> dict:
    if not (d / RUN).exists():
        raise UserError(f"{show(d)} has no {RUN}; pass folders written by `mclcbf-diag pope --shard i/n --out DIR`")
    run = _load_run(d / RUN)
    if run is None:
        raise UserError(f"{show(d / RUN)} is empty or damaged; rerun that shard's pope command (same options: it "
                        "rebuilds run.json and keeps the answers), then merge again")
    return run


def _report_shards(shards: list[str | None]) -> None:
    parsed = [parse_shard(s) for s in shards if s is not None]
    ns = {n for _, n in parsed}
    if len(ns) > 1:
        print(f"warning: shards of different counts n: {sorted(ns)}")
    for n in ns:
        have = [i for i, m in parsed if m == n]
        missing = sorted(set(range(n)) - set(have))
        repeated = sorted({i for i in have if have.count(i) > 1})
        if missing:
            print(f"warning: missing shards {', '.join(f'{i}/{n}' for i in missing)}")
        if repeated:
            print(f"warning: shards given more than once: {', '.join(f'{i}/{n}' for i in repeated)}")


def _report_missing(identity: dict, records: list[dict]) -> None:
    files = [(s, Path(p), Path(p).parent) for s, p in zip(identity["splits"], identity["pope_files"])]
    try:
        expected = {j.key for j in select_jobs(files, identity.get("limit"), None)}
    except UserError as exc:
        print(f"note: cannot check for missing questions ({exc})")
        return
    got = {(r["split"], str(r["question_id"])) for r in records}
    missing = sorted(expected - got)
    if missing:
        shown = ", ".join(f"{s}:{q}" for s, q in missing[:5])
        print(f"warning: {len(missing)} questions missing (e.g. {shown}); run the missing shards and merge again")
    else:
        print("no questions missing")


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("pope", help="baseline vs steered POPE evaluation: batched, resumable, sharded")
    g = p.add_argument_group("questions")
    g.add_argument("--split", default="all", choices=[*SPLITS, "all"], help="POPE split(s) (default all)")
    g.add_argument("--pope-file", default=None,
                   help="a POPE file; '{split}' in the name is replaced by each split (default: the embedded set)")
    g.add_argument("--image-dir", default=None, help="folder with the images (default: beside the POPE file)")
    g.add_argument("--limit", type=int, default=None, help="only the first N questions of each split")
    prompt_option(g)
    g.add_argument("--shard", default=None, metavar="I/N",
                   help="only questions at positions p with p %% N == I (I is 0-based); merge shards with `merge`")
    model_options(p)
    p.add_argument("--device-map", default=None, help="passed to from_pretrained, e.g. auto (needs accelerate)")
    intervention_options(p)
    p.add_argument("--batch-size", type=int, default=16, help="questions per forward (default 16)")
    p.add_argument("--generate", type=int, default=0, metavar="N",
                   help="also generate N tokens greedily per condition and score the text (steering: prefill only)")
    p.add_argument("--out", default=None,
                   help="output folder (default reports/pope, or reports/pope-shard-I-of-N); rerun to resume")
    p.set_defaults(func=cmd_pope)
    return p


def add_merge_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("merge", help="merge `pope --shard` runs and recompute metrics and summary")
    p.add_argument("out", help="folder for the merged run")
    p.add_argument("shard_dirs", nargs="+", metavar="SHARD_DIR", help="folders of `pope --shard i/n` runs")
    p.set_defaults(func=cmd_merge)
    return p

"""``mclcbf-diag pope`` and ``merge``: the command line over :mod:`mclcbf_diag.pope`."""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
from pathlib import Path

from .. import knobs as K
from ..errors import UserError
from ..fingerprints import content_fingerprint
from ..pope import distributed
from ..pope.answer import MAX_BATCH_SIZE, RunTiming, run_jobs_together
from ..pope.jobs import (
    SPLITS,
    Job,
    job_image,
    parse_shard,
    select_jobs,
)
from ..pope.store import (
    ANSWERS,
    FORMAT,
    INFO_KEYS,
    RUN,
    differing_keys,
    earlier_run_id,
    encode_rows,
    load_run,
    read_records,
    resumed_together,
    run_id,
    unique_sorted,
)
from ..storage import (
    LOCK_NAME,
    FolderLock,
    atomic_write,
    atomic_write_text,
    check_writable,
    fsync_dir,
    make_dir,
    sha256_file,
    show,
)
from .common import (
    check_run_folder,
    decoding_from_args,
    decoding_options,
    folder_holds,
    force_option,
    intervention_from_args,
    intervention_options,
    labels_option,
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
    return content_fingerprint(names, base=folder)


def run_identity(args, config, files, shard, all_jobs: list[Job] | None = None, where: str | None = None) -> dict:
    model = args.model or "embedded"
    if args.model and Path(args.model).expanduser().exists():
        model = str(Path(args.model).expanduser().resolve())
    ident = {"format": FORMAT, "model": model, "dtype": args.dtype, "intervention": args.intervention,
             "preset": args.preset,
             "overrides": list(args.overrides), "config": K.to_dict(config.knobs),
             "splits": [s for s, _, _ in files], "pope_files": [str(p) for _, p, _ in files],
             "limit": args.limit, "shard": None if shard is None else f"{shard[0]}/{shard[1]}",
             "generate": args.generate, "prompt": args.prompt}
    parts = config.components()
    if parts:  # an intervention without parts besides its knobs (all but HALC) leaves the identity as it was
        ident["components"] = parts
    decoding = decoding_from_args(args).identity()
    if decoding is not None:  # greedy, the default, leaves the identity as it was
        ident["decoding"] = decoding
    if where is not None:
        ident["model_files"] = _model_files(where)
    ident.update(batch_size=args.batch_size, device=_device(args), versions=_versions())
    ident["pope_sha256"] = [sha256_file(p) for _, p, _ in files]
    if getattr(args, "labels", None):  # a relabelled run: its answers are scored against this file
        from ..data.labels import load_labels

        ident["labels"] = load_labels(args.labels).identity()
    if all_jobs is not None:
        ident["image_dirs"] = sorted({str(Path(d).resolve()) for _, _, d in files})
        ident["images"] = content_fingerprint([Path(job_image(j)).resolve() for j in all_jobs],
                                              base=os.path.commonpath(ident["image_dirs"]))
    return ident


def _device(args) -> str:
    """What runs the numbers: the device type (and the GPU's name), or the device map; not a GPU's index,
    which differs between the ranks of one launch."""
    if getattr(args, "device_map", None):
        return f"device map {args.device_map}"
    import torch

    dev = torch.device(args.device)
    return f"cuda ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else dev.type


def _versions() -> dict:
    """The installed torch, transformers and nnsight (their numbers differ between releases)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "transformers", "nnsight"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def resume_options(p) -> None:
    p.add_argument("--resume-anyway", action="store_true",
                   help="resume a run written with other torch/transformers/nnsight versions (recorded in run.json)")
    force_option(p)


def check_numbers(args) -> None:
    for name, low in (("limit", 1), ("batch_size", 1), ("generate", 0)):
        v = getattr(args, name)
        if v is not None and v < low:
            raise UserError(f"--{name.replace('_', '-')} {v} must be >= {low}")
    if args.batch_size > MAX_BATCH_SIZE:
        raise UserError(f"--batch-size {args.batch_size} is more than {MAX_BATCH_SIZE}; pass a smaller batch "
                        "(16–64 is typical)")
    decoding_from_args(args)
    cap = max_new_tokens_limit()
    if args.generate > cap:
        raise UserError(f"--generate {args.generate} is more than the limit of {cap} new tokens; pass a smaller "
                        "number, or raise the limit with MCLCBF_DIAG_MAX_NEW_TOKENS=N")


def cmd_pope(args, on_batch=None) -> int:
    group = distributed.from_env()
    if group is not None:
        if getattr(args, "seeds", None) is not None:
            raise UserError(f"--seeds {args.seeds} under a torchrun/accelerate launch: launch once per seed with "
                            "--seed S, or run --seeds without the launcher")
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
        import torch

        index = group.local_rank % max(torch.cuda.device_count(), 1)  # more ranks than GPUs: they share
        part.device = f"cuda:{index}"
        if torch.cuda.is_available():  # what code that names no index allocates on; without CUDA, the model refuses
            torch.cuda.set_device(index)
    meeting = distributed.meet(group)
    try:
        error = None
        try:
            rc = _pope(part, on_batch)
        except UserError as exc:
            error, rc = exc, 2
        except BaseException:
            meeting.post_failure()  # a launcher that stops no rank: the others learn it when they finish
            raise
        try:
            finished = meeting.all_ok(error is None)
        except UserError:
            if error is not None:  # this rank's own refusal says more than the meeting it then lost
                raise error from None
            raise
        if not finished:
            raise error or UserError(f"another rank of this launch failed (see its message); rank {group.rank} "
                                     f"kept its part in {show(group.part(out))}: rerun the same command to resume")
        merged = None
        if group.rank == 0:
            try:
                rc = cmd_merge(_argparse.Namespace(out=str(out), shard_dirs=[str(p) for p in group.parts(out)],
                                                   partial=False))
            except BaseException as exc:
                merged = exc
        if not meeting.agree("merged", merged is None):
            if merged is not None:
                raise merged
            raise UserError(f"rank 0 could not merge the parts into {show(out)} (see its message); rank "
                            f"{group.rank} kept its part in {show(group.part(out))}")
        return rc
    finally:
        meeting.leave()


def _pope(args, on_batch=None) -> int:
    from ..data import build_prompt

    # 1. Everything that needs no model: numbers, seeds, shard, knobs vs. the depth, files, images, --out.
    check_numbers(args)
    seeds = parse_seeds(args)
    runs = [args] if seeds is None else seed_runs(args, seeds)
    shard, files, all_jobs, jobs, out = split_run_checks(runs[0], "reports/pope")
    outs = [out] + [check_run_folder(run, "reports/pope", shard) for run in runs[1:]]  # the rest is each seed's same
    facts = _model_facts(args)  # imports torch and transformers: after the cheap checks
    config = intervention_from_args(args, facts.n_layers, facts.model_type)
    check_generation(args, config)
    config = with_oracle(args, config, jobs)
    # 2. The tokenizer (not the weights): dtype, device and every prompt's length.
    prep = prepare_from_args(args)
    prompts = [build_prompt(j.question.text, args.prompt) for j in jobs]
    from ..models.loading import check_prompt_lengths

    check_prompt_lengths(prep, prompts, [f"question_id {j.question.question_id!r} ({j.split})" for j in jobs],
                         max_new_tokens=args.generate)
    first = run_identity(runs[0], config, files, shard, all_jobs, prep.where)  # seeds differ in "decoding" alone
    identities = [first] + [{**first, "decoding": decoding_from_args(run).identity()} for run in runs[1:]]
    # 3. Only now write: lock the folders, claim them, answer what is missing.
    answer = _answerer(args, runs, config, jobs, outs, identities, on_batch)
    from ..pope.metrics import write_outputs

    with resumed_together(outs, identities, jobs, lambda: weights_from_args(args, prep), answer,
                          args.resume_anyway) as found:
        for out, records, identity in zip(outs, found, identities):
            write_outputs(out, records, identity)
    for out, records in zip(outs, found):
        timed = ", timing.json" if (out / "timing.json").is_file() else ""
        print(f"wrote {show(out)}/{ANSWERS} ({len(records)} questions), metrics.csv, flips.csv, "
              f"flips_questions.csv, summary.html{timed}")
    return 0


def _answerer(args, runs, config, jobs, outs, identities, on_batch):
    """``answer(lm, todos)`` for :func:`~mclcbf_diag.pope.store.resumed_together`: one run's batches, or the seeds'
    runs from one pass (:func:`~mclcbf_diag.pope.answer.run_jobs_together`)."""
    rids, decodings = [run_id(i) for i in identities], [decoding_from_args(run) for run in runs]

    def answer(lm, todos):
        timings = [RunTiming(out, **RunTiming.machine(lm, args.batch_size)) for out in outs]
        run_jobs_together(lm, jobs, todos, config, outs, batch_size=args.batch_size, decodings=decodings,
                          run_ids=rids, template=args.prompt, timings=timings, on_batch=on_batch,
                          generate=args.generate)

    return answer


def parse_seeds(args) -> list[int] | None:
    """``--seeds S,S,…``: two or more different seeds of one sampled setting, each run into its own ``--out`` (with
    ``{seed}`` in it); None without the option. A UserError, before any model loads, for what does not fit."""
    text = getattr(args, "seeds", None)
    if text is None:
        return None
    try:
        seeds = [int(x) for x in text.split(",")]
    except ValueError:
        raise UserError(f"--seeds {text!r}: give comma-separated integers, e.g. --seeds 0,1,2") from None
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {text}: give two or more different seeds (one seed: --seed S)")
    if getattr(args, "seed", None) is not None:
        raise UserError(f"--seed {args.seed} with --seeds {text}: give one of them")
    if args.decoding != "sample":
        raise UserError(f"--seeds {text} seeds sampled answers: add --decoding sample")
    if args.generate:
        raise UserError(f"--seeds {text} with --generate: sampled text draws every token, so each seed needs its "
                        "own forwards; run one pope per --seed S")
    if "{seed}" not in (args.out or ""):
        raise UserError(f"--seeds {text} writes one run folder per seed: put {{seed}} in --out, e.g. "
                        "--out reports/pope-sample-{seed}")
    return seeds


def seed_runs(args, seeds: list[int]) -> list[argparse.Namespace]:
    """One namespace per seed of ``seeds`` (:func:`parse_seeds`): the run ``pope --seed S --out OUT(seed S)`` would
    be."""
    return [argparse.Namespace(**{**vars(args), "seed": s, "seeds": None, "out": args.out.replace("{seed}", str(s))})
            for s in seeds]


def check_generation(args, config) -> None:
    """A UserError for generated answers a decoding-level method cannot give: a beam search is OPERA's alone, and
    OPERA generates by its beam search. A note on stderr where the generated tokens after the first go unsteered
    (an activation edit outside :func:`~mclcbf_diag.engine.batch.loops_generation`)."""
    if not args.generate:
        return
    beam = getattr(args, "decoding", "greedy") == "beam"
    if "logits" not in config.open_sites(True):
        from ..engine.batch import loops_generation

        if config.activation_part() is not None and config.steers_decode() and not loops_generation(config, beam):
            print(f"note: --generate {args.generate} under --intervention {config.name} steers the prompt's forward "
                  "only (the first answer token); the tokens after it are generated without the edit (trace "
                  "--max-new-tokens N steers every step)", file=sys.stderr)
        return
    if config.name == "opera" and not beam:
        raise UserError("--intervention opera --generate N: OPERA generates by its beam search; add --decoding beam "
                        "--num-beams 5 (the released setting), or drop --generate (first-token answers)")
    if beam and config.name != "opera":
        raise UserError(f"--decoding beam under --intervention {config.name}: a beam search is OPERA's alone; use "
                        "--decoding greedy or sample, or --intervention opera")


def with_oracle(args, config, jobs):
    """HALC grounding with the oracle of the run's images (a one-line UserError, before the model loads, for an image
    the oracle does not know, and for ``--generate``: HALC's generation loop is not here); any other intervention as
    it is."""
    if config.name != "halc":
        return config
    if args.generate:
        raise UserError("--intervention halc --generate N: HALC here is its first token's focal-view contrast (its "
                        "generation loop is not implemented); drop --generate")
    from ..data import resolve_image
    from ..interventions.halc import oracle_for

    return config.with_detector(oracle_for([resolve_image(j.question, j.image_dir) for j in jobs]))


def _model_facts(args):
    from ..models.loading import model_facts

    return model_facts(args.model)


def cmd_merge(args) -> int:
    """Join shard folders into ``OUT``: refused when questions are missing unless ``--partial`` (then marked so
    in run.json); written into a fresh folder that replaces ``OUT`` whole (see :func:`_swap_in`)."""
    out = Path(args.out)
    dirs = [Path(d) for d in args.shard_dirs]
    if any(out.resolve() == d.resolve() for d in dirs):
        raise UserError(f"merge OUT {show(out)} is one of the shard folders; pass a new folder for the merged run")
    ids = [_read_run(d) for d in dirs]
    for d, ident in zip(dirs[1:], ids[1:]):
        diff = differing_keys(ids[0], ident, ignore=(*INFO_KEYS, "shard"))
        if diff:
            raise UserError(f"{show(d)} and {show(dirs[0])} ran different configurations (differ in: "
                            f"{', '.join(diff)}); merge only shards of one run")
    check_writable(out, "merge OUT")
    carried = _check_merge_out(out, dirs)
    records, skipped = _shard_records(dirs, ids)
    identity = {**ids[0], "shard": None, "merged_from": [str(d) for d in dirs]}
    identity.pop("resumed_anyway", None)
    records, dups = unique_sorted(records, identity["splits"])
    if not records:
        raise UserError(f"the folders {', '.join(map(show, dirs))} hold no answers yet; run the shards first")
    partial, notes = _completeness(identity, records, [ident.get("shard") for ident in ids])
    if partial is not None:
        if not args.partial:
            raise UserError(f"merge: {_gap(partial)}; run the missing shards (or finish the interrupted ones) and "
                            "merge again, or pass --partial to write a run marked partial")
        identity["partial"] = {k: v for k, v in partial.items() if k != "e.g."}
        _note(f"warning: the merged run is partial ({_gap(partial)}); run.json says so")
    for line in [*skipped, *notes]:
        _note(line)
    print(f"{len(records)} questions from {len(dirs)} folders; {dups} duplicate rows dropped"
          + ("; no questions missing" if partial is None else ""))
    population = identity.get("kind") == "explain-population"  # `explain` over a split: its own outputs

    def write(folder: Path) -> None:
        atomic_write_text(folder / RUN, json.dumps(identity, indent=2) + "\n")
        atomic_write(folder / ANSWERS, encode_rows(records))
        if population:
            from ..population.outputs import write_outputs as population_outputs

            population_outputs(folder, records, identity, part_dirs=dirs)  # the records from every shard's parts
        else:
            from ..pope.metrics import write_outputs

            write_outputs(folder, records, identity)

    _swap_in(out, carried, write)
    print(f"wrote {show(out)}/{ANSWERS}, " + ("questions.parquet, records.parquet, paired.csv, population.html"
                                             if population else "metrics.csv, flips.csv, flips_questions.csv, "
                                                                "summary.html"))
    return 0


def _shard_records(dirs: list[Path], ids: list[dict]) -> tuple[list[dict], list[str]]:
    """Every shard's answers (a torn last line skipped, with a note), stamped with the first shard's run_id; another
    run's rows are refused. A shard's rows stamped by an earlier release (its model folder's path in the run_id)
    are its own."""
    rid = run_id(ids[0])
    records, skipped = [], []
    for d, ident in zip(dirs, ids):
        recs, partial = read_records(d / ANSWERS)
        if partial:
            skipped.append(f"note: {show(d / ANSWERS)} ends in a partial line (interrupted run); it was skipped")
        earlier = earlier_run_id(ident)
        recs = [{**r, "run_id": rid} if r.get("run_id") == earlier else r for r in recs]
        foreign = [r for r in recs if "run_id" in r and r["run_id"] != rid]
        if foreign:
            raise UserError(f"{show(d / ANSWERS)} holds {len(foreign)} rows of another run (run_id "
                            f"{foreign[0]['run_id']}, {RUN} says {rid}); rerun that shard into a fresh folder")
        records += recs
    return records, skipped


def _note(line: str) -> None:
    print(line, file=sys.stderr)


def _check_merge_out(out: Path, dirs: list[Path]) -> list[str]:
    """Refuse a merge OUT that holds anything but an earlier merge; return its entries that hold shard folders
    (a launch's ``OUT/ranks``), which the new folder takes over."""
    if not out.is_dir():
        return []
    root = out.resolve()
    carried = sorted({d.resolve().relative_to(root).parts[0] for d in dirs if d.resolve().is_relative_to(root)})
    others = [p.name for p in out.iterdir() if p.name not in (*carried, LOCK_NAME)]
    if others and folder_holds(out) != "merge":
        held = folder_holds(out)
        what = f"a {held} run" if held else f"other files ({', '.join(sorted(others)[:3])})"
        raise UserError(f"merge OUT {show(out)} holds {what}, not an earlier merge; pass an empty or new folder "
                        "as merge OUT")
    return carried


def _swap_in(out: Path, carried: list[str], write) -> None:
    """Write the merge into a new sibling folder, then put it in OUT's place, so OUT never mixes two merges.

    Under OUT's lock: the entries in ``carried`` (shard folders inside OUT) move into the new folder, OUT
    moves aside, the new folder takes its name (two renames on one file system), and the old one is removed.
    A failure before the renames leaves OUT as it was.
    """
    import shutil

    make_dir(out.parent, "merge OUT")
    tag = f"{os.getpid()}-{secrets.token_hex(4)}"
    new, old = out.parent / f".{out.name}.merge-{tag}", out.parent / f".{out.name}.old-{tag}"
    fresh = not out.exists()
    make_dir(out, "merge OUT")
    with FolderLock(out, "merge OUT"):
        try:
            make_dir(new, "merge OUT")
            write(new)
            for name in carried:
                os.replace(out / name, new / name)
            os.replace(out, old)
            os.replace(new, out)
        except BaseException:
            for name in carried:  # put the shard folders back
                if (new / name).exists() and not (out / name).exists() and out.exists():
                    os.replace(new / name, out / name)
            shutil.rmtree(new, ignore_errors=True)
            if fresh and out.exists() and not any(p.name != LOCK_NAME for p in out.iterdir()):
                shutil.rmtree(out, ignore_errors=True)
            raise
    shutil.rmtree(old, ignore_errors=True)
    fsync_dir(out.parent)


def _completeness(identity: dict, records: list[dict], shards: list[str | None]) -> tuple[dict | None, list[str]]:
    """``(partial, warnings)``: partial is None when the merge holds every selected question, else the
    ``partial`` entry of its run.json; the warnings name shards of different counts or given twice."""
    parsed = [parse_shard(s) for s in shards if s is not None]
    ns = {n for _, n in parsed}
    notes = [f"warning: shards of different counts n: {sorted(ns)}"] if len(ns) > 1 else []
    missing_shards, repeated = [], []
    for n in sorted(ns):
        have = [i for i, m in parsed if m == n]
        missing_shards += [f"{i}/{n}" for i in sorted(set(range(n)) - set(have))]
        repeated += [f"{i}/{n}" for i in sorted({i for i in have if have.count(i) > 1})]
    if repeated:
        notes.append(f"warning: shards given more than once: {', '.join(repeated)}")
    expected = _expected_keys(identity)
    got = {(r["split"], str(r["question_id"])) for r in records}
    if expected is None:
        notes.append("note: a POPE file the shards read is gone; the merge cannot check for missing questions")
        return ({"expected": None, "present": len(got), "missing_shards": missing_shards} if missing_shards
                else None), notes
    missing = sorted(expected - got)
    if not missing:
        return None, notes
    return {"expected": len(expected), "present": len(got & expected), "missing_shards": missing_shards,
            "e.g.": [f"{s}:{q}" for s, q in missing[:3]]}, notes


def _gap(partial: dict) -> str:
    shards = f"shards {', '.join(partial['missing_shards'])} missing; " if partial["missing_shards"] else ""
    of = f" of {partial['expected']}" if partial["expected"] is not None else ""
    eg = f" (missing e.g. {', '.join(partial['e.g.'])})" if partial.get("e.g.") else ""
    return f"{shards}{partial['present']}{of} questions present{eg}"


def _expected_keys(identity: dict) -> set | None:
    """The (split, question_id) keys the shards' run selects, or None when its POPE files are gone or changed."""
    for path, want in zip(identity.get("pope_files", []), identity.get("pope_sha256", [])):
        try:
            got = sha256_file(path)
        except OSError:
            return None
        if got != want:
            raise UserError(f"{path} changed since the shards ran (sha256 {got[:12]}… instead of {want[:12]}…); "
                            "rerun the shards on the current file, or restore the file they read")
    files = [(s, Path(p), Path(p).parent) for s, p in zip(identity["splits"], identity["pope_files"])]
    return {j.key for j in select_jobs(files, identity.get("limit"), None)}


def _read_run(d: Path) -> dict:
    if not (d / RUN).exists():
        raise UserError(f"{show(d)} has no {RUN}; pass folders written by `mclcbf-diag pope --shard i/n --out DIR`")
    run = load_run(d / RUN)
    if run is None:
        raise UserError(f"{show(d / RUN)} is empty or damaged; rerun that shard's pope command (same options: it "
                        "rebuilds run.json and keeps the answers), then merge again")
    return run


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("pope", help="baseline vs steered POPE evaluation: batched, resumable, sharded")
    g = p.add_argument_group("questions")
    g.add_argument("--split", default="all", choices=[*SPLITS, "all"], help="POPE split(s) (default all)")
    g.add_argument("--pope-file", default=None,
                   help="a POPE file; '{split}' in the name is replaced by each split (default: the embedded set)")
    g.add_argument("--image-dir", default=None, help="folder with the images (default: beside the POPE file)")
    g.add_argument("--limit", type=int, default=None, help="only the first N questions of each split")
    prompt_option(g)
    labels_option(g)
    g.add_argument("--shard", default=None, metavar="I/N",
                   help="only questions at positions p with p %% N == I (I is 0-based); merge shards with `merge`")
    model_options(p)
    p.add_argument("--device-map", default=None, help="passed to from_pretrained, e.g. auto (needs accelerate)")
    intervention_options(p)
    p.add_argument("--batch-size", type=int, default=16, help="questions per forward (default 16)")
    p.add_argument("--generate", type=int, default=0, metavar="N",
                   help="also generate N tokens per condition (greedily, or as --decoding says) and score the text "
                        "(steering: prefill only)")
    decoding_options(p)
    p.add_argument("--seeds", default=None, metavar="S,S,…",
                   help="with --decoding sample: run these seeds from one pass of forwards, each into its own "
                        "folder (put {seed} in --out); each folder is what a run with --seed S writes")
    p.add_argument("--out", default=None,
                   help="output folder (default reports/pope, or reports/pope-shard-I-of-N); rerun to resume")
    resume_options(p)
    p.set_defaults(func=cmd_pope)
    return p


def add_merge_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("merge", help="merge `pope --shard` runs and recompute metrics and summary")
    p.add_argument("out", help="folder for the merged run")
    p.add_argument("shard_dirs", nargs="+", metavar="SHARD_DIR", help="folders of `pope --shard i/n` runs")
    p.add_argument("--partial", action="store_true",
                   help="merge even when shards or questions are missing; run.json, the pages and compare mark "
                        "the result partial")
    p.set_defaults(func=cmd_merge)
    return p

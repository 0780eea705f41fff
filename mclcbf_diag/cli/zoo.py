"""``mclcbf-diag zoo``: train, evaluate and regenerate the embedded model and its POPE set."""

from __future__ import annotations

import json
from pathlib import Path

from .. import shipped
from ..errors import UserError
from .common import (
    check_out,
    check_threads,
    load_from_args,
    model_options,
    out_dir,
    show,
    write_frame,
)


def cmd_zoo_train(args) -> int:
    import torch

    from ..models.loading import EMBEDDED, resolve_device
    from ..storage import atomic_write_text, check_writable, write_manifest
    from ..zoo.train import TrainConfig, train

    for name, low in (("steps", 1), ("vision_steps", 0), ("batch_size", 1)):
        v = getattr(args, name)
        if v < low:
            raise UserError(f"--{name.replace('_', '-')} {v} must be >= {low}")
    check_threads(args)
    resolve_device(args.device)
    out = EMBEDDED if args.install else Path(args.out or "zoo-model")
    check_writable(out)
    torch.set_num_threads(args.threads or 1)  # one thread: fastest for this size, and reproducible
    cfg = TrainConfig(seed=args.seed, steps=args.steps, vision_steps=args.vision_steps, batch_size=args.batch_size)
    summary = train(out, cfg, device=args.device)
    atomic_write_text(Path(out) / "training.json", json.dumps(summary, indent=2))
    write_manifest(out, _manifest_names(Path(out)))  # what --verify checks
    print(json.dumps(summary, indent=2))
    print(f"wrote {show(out)}")
    return 0


def cmd_zoo_eval(args) -> int:
    from ..zoo.evaluate import evaluate

    if args.images < 1:
        raise UserError(f"--images {args.images} must be >= 1 (held-out images to evaluate on)")
    if args.out:
        check_out(args, args.out)
    lm = load_from_args(args)
    table, answers = evaluate(lm, n_images=args.images)
    import pandas as pd

    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.round(4).to_string(index=False))
    if args.out:
        out = out_dir(args, args.out)
        write_frame(table, out / "zoo_eval.csv", "csv")
        write_frame(answers, out / "zoo_eval_answers.csv", "csv")
    return 0


def cmd_zoo_data(args) -> int:
    from ..zoo.questions import write_pope_set
    from ..zoo.world import sample_scenes

    if args.images < 1:
        raise UserError(f"--images {args.images} must be >= 1 (images to generate)")
    check_out(args, str(shipped.POPE))
    out = out_dir(args, str(shipped.POPE))
    paths = write_pope_set(sample_scenes(args.images, args.seed), out, seed=args.seed)
    for split, path in paths.items():
        print(f"{split}: {show(path)}")
    return 0


def _manifest_names(folder: Path) -> list[str]:
    """The files of a model folder that --verify checks (weights, configs, tokenizer)."""
    return sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.suffix in (".safetensors", ".json", ".jinja") and p.name != "training.json")


def add_parser(sub) -> None:
    zoo = sub.add_parser("zoo", aliases=["embedded"], help="the embedded model: train, evaluate, regenerate its POPE set (alias: embedded)")
    zsub = zoo.add_subparsers(dest="zoo_command", required=True)
    t = zsub.add_parser("train", help="train the embedded model from scratch (seeded)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--steps", type=int, default=800)
    t.add_argument("--vision-steps", type=int, default=300)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--device", default="cpu")
    t.add_argument("--threads", type=int, default=None)
    t.add_argument("--out", default=None, help="output folder (default ./zoo-model)")
    t.add_argument("--install", action="store_true", help="write into the package (replaces the shipped model)")
    t.set_defaults(func=cmd_zoo_train)
    e = zsub.add_parser("eval", help="held-out POPE figures of a model on fresh synthetic scenes")
    model_options(e)
    e.add_argument("--images", type=int, default=500, help="held-out images (default 500)")
    e.add_argument("--out", default=None, help="also write CSVs here")
    e.set_defaults(func=cmd_zoo_eval)
    d = zsub.add_parser("data", help="regenerate the embedded POPE question set and images")
    d.add_argument("--images", type=int, default=200)
    d.add_argument("--seed", type=int, default=1)
    d.add_argument("--out", default=None, help=f"output folder (default {shipped.POPE})")
    d.set_defaults(func=cmd_zoo_data)

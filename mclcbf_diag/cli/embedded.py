"""``mclcbf-diag embedded``: train, evaluate and regenerate the embedded model and its POPE set.

``embedded train`` runs :func:`mclcbf_diag.embedded.train.train` (seeded; ``--init-from``
continues a saved model), ``embedded eval`` prints :func:`mclcbf_diag.embedded.evaluate.report`
(layout check, POPE per split beside published LLaVA-1.5-7B figures, the attention profile
at the decision token), ``embedded data`` rewrites the shipped POPE-format questions and
images. ``zoo`` is an alias of ``embedded``.
"""

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


def cmd_train(args) -> int:
    for name, low in (("steps", 1), ("vision_steps", 0), ("text_steps", 0), ("batch_size", 1), ("pool", 8)):
        v = getattr(args, name)
        if v < low:
            raise UserError(f"--{name.replace('_', '-')} {v} must be >= {low}")
    if not 0 < args.sink_target < 1:
        raise UserError(f"--sink-target {args.sink_target} must be between 0 and 1 (a BOS attention mass)")
    if not 0 <= args.sink_start <= 1:
        raise UserError(f"--sink-start {args.sink_start} must be between 0 and 1 (a fraction of the steps)")
    if args.checkpoint_every < 0:
        raise UserError(f"--checkpoint-every {args.checkpoint_every} must be >= 0 (0: no checkpoints)")
    if args.text_loss < 0:
        raise UserError(f"--text-loss {args.text_loss} must be >= 0 (the weight of the text loss)")
    if args.init_from is not None and not (Path(args.init_from) / "config.json").is_file():
        raise UserError(f"--init-from {args.init_from}: no config.json there; give a folder saved by `embedded train`")
    check_threads(args)
    import torch

    from ..embedded.train import TrainConfig, train
    from ..models.loading import EMBEDDED, resolve_device
    from ..storage import check_writable, write_manifest

    resolve_device(args.device)
    out = EMBEDDED if args.install else Path(args.out or "embedded-model")
    check_writable(out)
    torch.set_num_threads(args.threads or 1)  # one thread: fastest for this size, and reproducible
    cfg = TrainConfig(seed=args.seed, steps=args.steps, vision_steps=args.vision_steps, text_steps=args.text_steps,
                      batch_size=args.batch_size, pool=args.pool, lr=args.lr, warmup=args.warmup,
                      text_loss=args.text_loss, sink_weight=args.sink_weight, sink_target=args.sink_target,
                      sink_start=args.sink_start)
    summary = train(out, cfg, device=args.device, say=lambda m: print(m, flush=True),
                    checkpoint_every=args.checkpoint_every, init_from=args.init_from)
    write_manifest(out, _manifest_names(Path(out)))  # what --verify checks
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2))
    print(f"wrote {show(out)}")
    return 0


def cmd_eval(args) -> int:
    for name, what in (("images", "held-out images"), ("prompts", "prompts for the attention profile")):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} {getattr(args, name)} must be >= 1 ({what} to evaluate on)")
    if args.out:
        check_out(args, args.out)
    from ..embedded.evaluate import report

    lm = load_from_args(args)
    rep = report(lm.model, lm.processor, n_images=args.images, n_prompts=args.prompts)
    if args.out:
        out = out_dir(args, args.out)
        write_frame(rep["pope"], out / "embedded_eval.csv", "csv")
        write_frame(rep["answers"], out / "embedded_eval_answers.csv", "csv")
        write_frame(rep["attention"], out / "embedded_attention.csv", "csv")
        print(f"wrote {show(out)}/embedded_eval.csv, embedded_eval_answers.csv, embedded_attention.csv")
    return 0


def cmd_data(args) -> int:
    if args.images < 1:
        raise UserError(f"--images {args.images} must be >= 1 (images to generate)")
    check_out(args, str(shipped.POPE))
    from ..embedded.data import write

    out = out_dir(args, str(shipped.POPE))
    for split, path in write(out, args.images, args.seed).items():
        print(f"{split}: {show(path)}")
    return 0


def _manifest_names(folder: Path) -> list[str]:
    """The files of a model folder that --verify checks (weights, configs, tokenizer)."""
    return sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.suffix in (".safetensors", ".json", ".jinja")
                  and not p.name.startswith("training") and p.name not in ("heldout_eval.json", "subset_figures.json"))


def add_parser(sub) -> None:
    from ..embedded.config import EVAL_SEED, N_IMAGES
    from ..embedded.config import TrainConfig as C

    emb = sub.add_parser("embedded", aliases=["zoo"],
                         help="the embedded model: train, evaluate, regenerate its POPE set (alias: zoo)")
    esub = emb.add_subparsers(dest="embedded_command", required=True)
    t = esub.add_parser("train", help="train the embedded model (seeded; see its MODEL_CARD.md)")
    t.add_argument("--seed", type=int, default=C.seed)
    t.add_argument("--steps", type=int, default=C.steps, help="visual instruction tuning steps")
    t.add_argument("--vision-steps", type=int, default=C.vision_steps, help="vision pre-training steps")
    t.add_argument("--text-steps", type=int, default=C.text_steps, help="image-free language pre-training steps")
    t.add_argument("--batch-size", type=int, default=C.batch_size)
    t.add_argument("--pool", type=int, default=C.pool, help="training scenes")
    t.add_argument("--lr", type=float, default=C.lr)
    t.add_argument("--warmup", type=int, default=C.warmup)
    t.add_argument("--text-loss", type=float, default=C.text_loss,
                   help="weight of the loss on the prompt's text tokens during instruction tuning")
    t.add_argument("--sink-weight", type=float, default=C.sink_weight, help="attention-sink prior weight (0: off)")
    t.add_argument("--sink-target", type=float, default=C.sink_target)
    t.add_argument("--sink-start", type=float, default=C.sink_start,
                   help="fraction of the instruction-tuning steps before the sink prior turns on")
    t.add_argument("--init-from", default=None, help="continue from this saved model "
                   "(with --vision-steps 0 --text-steps 0 the vision and language pre-training stages are skipped)")
    t.add_argument("--checkpoint-every", type=int, default=0,
                   help="save the model every N instruction-tuning steps (0: only at the end)")
    t.add_argument("--device", default="cpu")
    t.add_argument("--threads", type=int, default=None)
    t.add_argument("--out", default=None, help="output folder (default ./embedded-model)")
    t.add_argument("--install", action="store_true", help="write into the package (replaces the shipped model)")
    t.set_defaults(func=cmd_train)
    e = esub.add_parser("eval", help="layout check, held-out POPE figures and attention profile beside LLaVA-1.5-7B's")
    model_options(e)
    e.add_argument("--images", type=int, default=300, help="held-out images (default 300)")
    e.add_argument("--prompts", type=int, default=24, help="prompts for the attention profile (default 24)")
    e.add_argument("--out", default=None, help="also write CSVs here")
    e.set_defaults(func=cmd_eval)
    d = esub.add_parser("data", help="regenerate the embedded POPE question set and images")
    d.add_argument("--images", type=int, default=N_IMAGES)
    d.add_argument("--seed", type=int, default=EVAL_SEED)
    d.add_argument("--out", default=None, help=f"output folder (default {shipped.POPE})")
    d.set_defaults(func=cmd_data)

"""Write the shipped POPE-format data set of the embedded model.

Held-out scenes (``EVAL_SEED``, which training never uses) become the three POPE splits,
JSON Lines with the official keys (``question_id``, ``image``, ``text``, ``label``), the
336×336 PNG images and a sidecar ``annotations.jsonl`` (labels and visible objects)::

    python -m mclcbf_diag.embedded.data [--out mclcbf_diag/embedded/pope] [--images 150]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .config import EVAL_SEED, N_IMAGES
from .questions import write_pope_set
from .world import sample_scenes

POPE_DIR = Path(__file__).resolve().parent / "pope"


def write(out_dir: Path = POPE_DIR, n_images: int = N_IMAGES, seed: int = EVAL_SEED) -> dict[str, Path]:
    return write_pope_set(sample_scenes(n_images, seed), Path(out_dir), seed)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mclcbf_diag.embedded.data")
    ap.add_argument("--out", type=Path, default=POPE_DIR)
    ap.add_argument("--images", type=int, default=N_IMAGES)
    ap.add_argument("--seed", type=int, default=EVAL_SEED)
    args = ap.parse_args(argv)
    for split, path in write(args.out, args.images, args.seed).items():
        print(f"{split}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

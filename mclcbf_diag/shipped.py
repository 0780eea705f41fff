"""Where the embedded model and its POPE set live inside the package: the one place that says so.

``WEIGHTS`` is the model folder (``from_pretrained``-loadable: safetensors, config, processor
files, ``MANIFEST.sha256``); ``POPE`` holds one POPE-format question file per split
(:func:`pope_file`) and the images they name (``IMAGES``). Commands default to these.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent / "embedded"
WEIGHTS = ROOT / "weights"
POPE = ROOT / "pope"
IMAGES = POPE / "images"
POPE_PREFIX = "embedded_pope"


def pope_file(split: str) -> Path:
    """The embedded question file of ``split`` (random, popular or adversarial)."""
    return POPE / f"{POPE_PREFIX}_{split}.json"

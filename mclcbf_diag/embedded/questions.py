"""POPE-format questions over synthetic scenes, built the way POPE builds its splits.

For every image POPE asks about up to three annotated objects ("yes") and as many absent
ones ("no"). The three splits differ only in how the absent objects are chosen:

* ``random``: uniformly among the absent classes;
* ``popular``: the absent classes that are most frequent in the whole image set;
* ``adversarial``: the absent classes that co-occur most often with the objects present.

Output records use the official POPE JSON Lines keys: ``question_id``, ``image``, ``text``,
``label``. :func:`write_pope_set` writes images, the three split files and a sidecar
``annotations.jsonl`` (labels and visible objects per image) for the partner analysis.
"""

from __future__ import annotations

import json
from collections import Counter
from itertools import permutations
from pathlib import Path

import numpy as np

from .build import QUESTION
from .world import CLASS_NAMES, Scene

SPLITS = ("random", "popular", "adversarial")


def image_name(scene: Scene) -> str:
    return f"emb_{scene.scene_id:06d}.png"


def _negatives(split: str, present: set[str], k: int, rng: np.random.Generator,
               frequency: Counter, cooccur: Counter) -> list[str]:
    absent = [c for c in CLASS_NAMES if c not in present]
    if split == "random":
        return [absent[i] for i in rng.choice(len(absent), size=min(k, len(absent)), replace=False)]
    if split == "popular":
        ranked = sorted(absent, key=lambda c: (-frequency[c], CLASS_NAMES.index(c)))
    elif split == "adversarial":
        score = {c: sum(cooccur[(p, c)] for p in present) for c in absent}
        ranked = sorted(absent, key=lambda c: (-score[c], -frequency[c], CLASS_NAMES.index(c)))
    else:
        raise ValueError(f"unknown POPE split {split!r}; expected one of {SPLITS}")
    return ranked[:k]


def pope_questions(scenes: list[Scene], split: str, seed: int) -> list[dict]:
    """Questions for one split: per image up to 3 "yes" and as many "no", interleaved.

    Args:
        scenes: the scenes asked about (one image each).
        split: ``random``, ``popular`` or ``adversarial``: how the absent objects are drawn.
        seed: the draw's seed (with the split's index).

    Returns:
        One POPE question record (question_id, image, text, label) per question.
    """
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    frequency = Counter(n for s in scenes for n in set(s.labels))
    cooccur = Counter(pair for s in scenes for pair in permutations(set(s.labels), 2))
    out: list[dict] = []
    for scene in scenes:
        present = list(dict.fromkeys(scene.labels))
        k = min(3, len(present))
        positives = [present[i] for i in rng.choice(len(present), size=k, replace=False)]
        negatives = _negatives(split, set(present), k, rng, frequency, cooccur)
        for pos, neg in zip(positives, negatives):
            for name, label in ((pos, "yes"), (neg, "no")):
                out.append({"question_id": len(out) + 1, "image": image_name(scene),
                            "text": QUESTION.format(name=name), "label": label})
    return out


def annotation(scene: Scene) -> dict:
    return {"image": image_name(scene), "labels": list(scene.labels), "visible": list(scene.visible)}


def write_pope_set(scenes: list[Scene], out_dir: Path, seed: int, prefix: str = "embedded_pope") -> dict[str, Path]:
    """Write images/, ``{prefix}_{split}.json`` (JSON Lines) and annotations.jsonl.

    Args:
        scenes: the scenes asked about (one image each).
        out_dir: the folder written (made if needed).
        seed: the questions' seed (:func:`pope_questions`).
        prefix: the question files' name before ``_{split}.json``.

    Returns:
        Split → its question file.
    """
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    for scene in scenes:
        scene.image().save(out_dir / "images" / image_name(scene), optimize=True)
    with open(out_dir / "annotations.jsonl", "w") as f:
        for scene in scenes:
            f.write(json.dumps(annotation(scene)) + "\n")
    paths = {}
    for split in SPLITS:
        paths[split] = out_dir / f"{prefix}_{split}.json"
        with open(paths[split], "w") as f:
            f.writelines(json.dumps(q) + "\n" for q in pope_questions(scenes, split, seed))
    return paths

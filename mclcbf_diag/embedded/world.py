"""A synthetic scene world with a COCO-like co-occurrence structure, drawn for a 336-px CLIP.

Each scene is drawn at ``DRAW_SIZE`` (48×48) RGB on a near-grey, noisy background with 1–4
objects and upscaled (nearest neighbour, ×7) to ``IMAGE_SIZE`` = 336, LLaVA-1.5's input size,
so every 14-px CLIP patch covers a 2×2 block of drawn pixels. Drawing small keeps rendering
cheap (about a millisecond) and the vision task learnable by a tiny tower.

Every object class has its own shape *and* its own colour. Three properties make the world
POPE-like:

* **Skewed frequencies.** Classes are drawn with unequal weights, so "popular" negatives
  (the most frequent absent classes) differ from random ones.
* **Co-occurrence.** Five classes have a *partner* that joins them with probability
  ``PARTNER_P``. Partners are drawn small and faint, and a fraction ``HIDDEN_P`` of them are
  listed in the annotation but not drawn at all (occluded, as tiny COCO objects are). A model
  trained on these annotations learns "a dog usually comes with a frisbee" and says "yes"
  to an absent frisbee next to a visible dog: the language prior that POPE's adversarial
  split probes. Part of that bias is therefore learned from genuinely ambiguous labels, as
  with occluded objects in COCO.
* **Ambiguity.** Noise, faint partners and some small main objects keep the held-out
  accuracy in LLaVA-1.5's range instead of near 100%.

Everything is a pure function of a seed: the same seed gives the same scenes, pixels and
annotations on every machine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

DRAW_SIZE = 48
IMAGE_SIZE = 336
BACKGROUND = 128
NOISE_SIGMA = 16.0
PARTNER_P = 0.8
HIDDEN_P = 0.35


@dataclass(frozen=True)
class ObjectClass:
    name: str
    shape: str
    colour: tuple[int, int, int]
    weight: float  # relative frequency as a main object


CLASSES: tuple[ObjectClass, ...] = (
    ObjectClass("dog", "circle", (200, 40, 40), 5.0),
    ObjectClass("car", "square", (40, 70, 210), 4.0),
    ObjectClass("fork", "bar", (235, 200, 30), 3.0),
    ObjectClass("cup", "triangle", (40, 180, 60), 2.5),
    ObjectClass("bird", "diamond", (235, 120, 20), 2.0),
    ObjectClass("frisbee", "ring", (170, 50, 200), 1.5),
    ObjectClass("truck", "cross", (30, 190, 200), 1.2),
    ObjectClass("knife", "hexagon", (240, 240, 240), 1.0),
    ObjectClass("bowl", "star", (120, 70, 30), 0.8),
    ObjectClass("kite", "arrow", (230, 100, 170), 0.6),
)
CLASS_NAMES: tuple[str, ...] = tuple(c.name for c in CLASSES)
BY_NAME = {c.name: c for c in CLASSES}

# main object -> partner that usually accompanies it
PARTNERS: dict[str, str] = {
    "dog": "frisbee",
    "car": "truck",
    "fork": "knife",
    "cup": "bowl",
    "bird": "kite",
}
PARTNER_OF: dict[str, str] = {**PARTNERS, **{v: k for k, v in PARTNERS.items()}}


@dataclass(frozen=True)
class PlacedObject:
    name: str
    cx: float
    cy: float
    size: float  # half-width in drawn pixels
    opacity: float  # 1 = solid, lower = faint
    drawn: bool  # False: annotated but hidden


@dataclass(frozen=True)
class Scene:
    scene_id: int
    objects: tuple[PlacedObject, ...]

    @property
    def labels(self) -> tuple[str, ...]:
        """Annotated classes (the ground truth POPE asks about)."""
        return tuple(o.name for o in self.objects)

    @property
    def visible(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.objects if o.drawn)

    def image(self) -> Image.Image:
        return render(self)


def _shape_polygon(shape: str, cx: float, cy: float, s: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(cx, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "diamond":
        return [(cx, cy - s), (cx + s, cy), (cx, cy + s), (cx - s, cy)]
    if shape == "hexagon":
        return [(cx + s * math.cos(a), cy + s * math.sin(a)) for a in np.linspace(0, 2 * math.pi, 7)[:-1]]
    if shape == "star":
        pts = []
        for i in range(10):
            r = s if i % 2 == 0 else s * 0.45
            a = -math.pi / 2 + i * math.pi / 5
            pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
        return pts
    if shape == "arrow":
        return [(cx - s, cy - s * 0.3), (cx, cy - s * 0.3), (cx, cy - s), (cx + s, cy),
                (cx, cy + s), (cx, cy + s * 0.3), (cx - s, cy + s * 0.3)]
    raise ValueError(f"no polygon for shape {shape!r}")


def _draw_object(draw: ImageDraw.ImageDraw, obj: PlacedObject, fill) -> None:
    spec = BY_NAME[obj.name]
    cx, cy, s = obj.cx, obj.cy, obj.size
    box = (cx - s, cy - s, cx + s, cy + s)
    if spec.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif spec.shape == "square":
        draw.rectangle(box, fill=fill)
    elif spec.shape == "ring":
        draw.ellipse(box, outline=fill, width=max(1, int(s / 3)))
    elif spec.shape == "bar":
        draw.rectangle((cx - s, cy - s / 3, cx + s, cy + s / 3), fill=fill)
    elif spec.shape == "cross":
        draw.rectangle((cx - s, cy - s / 3, cx + s, cy + s / 3), fill=fill)
        draw.rectangle((cx - s / 3, cy - s, cx + s / 3, cy + s), fill=fill)
    else:
        draw.polygon(_shape_polygon(spec.shape, cx, cy, s), fill=fill)


def render_small(scene: Scene) -> np.ndarray:
    """The scene at ``DRAW_SIZE``, uint8 [H, W, 3]; the noise is seeded by the scene id."""
    rng = np.random.default_rng(1_000_003 * (scene.scene_id + 1))
    n = DRAW_SIZE
    canvas = np.full((n, n, 3), BACKGROUND, dtype=np.float32)
    canvas += rng.normal(0.0, 4.0, size=3)  # slight colour cast per image
    for obj in scene.objects:
        if not obj.drawn:
            continue
        layer = Image.new("RGB", (n, n), (0, 0, 0))
        mask = Image.new("L", (n, n), 0)
        _draw_object(ImageDraw.Draw(layer), obj, BY_NAME[obj.name].colour)
        _draw_object(ImageDraw.Draw(mask), obj, 255)
        m = (np.asarray(mask, dtype=np.float32) > 0)[..., None] * obj.opacity
        canvas = canvas * (1 - m) + np.asarray(layer, dtype=np.float32) * m
    canvas += rng.normal(0.0, NOISE_SIGMA, size=canvas.shape)
    return np.clip(canvas, 0, 255).round().astype(np.uint8)


def patch_labels(scene: Scene, grid: int = 24) -> np.ndarray:
    """Per CLIP patch (``grid``×``grid``, row-major), the class drawn on most of it
    (1 + class index) or 0 for background: dense targets for vision pre-training."""
    n, cell = DRAW_SIZE, DRAW_SIZE // grid
    cover = np.zeros((len(CLASSES) + 1, n, n), dtype=np.float32)
    cover[0] = 0.3  # an object must cover at least 30% of a patch
    for obj in scene.objects:
        if obj.drawn:
            mask = Image.new("L", (n, n), 0)
            _draw_object(ImageDraw.Draw(mask), obj, 255)
            cover[1 + CLASS_NAMES.index(obj.name)] = np.maximum(
                cover[1 + CLASS_NAMES.index(obj.name)], np.asarray(mask, dtype=np.float32) / 255)
    pooled = cover.reshape(len(CLASSES) + 1, grid, cell, grid, cell).mean((2, 4))
    return pooled.argmax(0).reshape(-1)


def render(scene: Scene) -> Image.Image:
    """The scene as a 336×336 RGB image (nearest-neighbour upscale of the drawn one)."""
    small = Image.fromarray(render_small(scene), "RGB")
    return small.resize((IMAGE_SIZE, IMAGE_SIZE), Image.NEAREST)


def _place(rng: np.random.Generator, name: str, size: float, opacity: float, drawn: bool,
           taken: list[tuple[float, float, float]]) -> PlacedObject:
    for _ in range(30):
        cx, cy = rng.uniform(size + 1, DRAW_SIZE - size - 1, size=2)
        if all((cx - x) ** 2 + (cy - y) ** 2 > (size + s + 2) ** 2 for x, y, s in taken):
            break
    taken.append((cx, cy, size))
    return PlacedObject(name, float(cx), float(cy), float(size), float(opacity), drawn)


def sample_scene(scene_id: int, seed: int) -> Scene:
    """One scene, a pure function of (scene_id, seed)."""
    rng = np.random.default_rng([seed, scene_id])
    weights = np.array([c.weight for c in CLASSES])
    n_main = int(rng.choice([1, 2, 3], p=[0.45, 0.4, 0.15]))
    mains = list(rng.choice(len(CLASSES), size=n_main, replace=False, p=weights / weights.sum()))
    names = [CLASS_NAMES[i] for i in mains]
    objects: list[PlacedObject] = []
    taken: list[tuple[float, float, float]] = []
    for name in names:
        small = rng.random() < 0.15  # some main objects are small and faint too
        size = rng.uniform(2.5, 3.5) if small else rng.uniform(4.5, 7.5)
        objects.append(_place(rng, name, size, rng.uniform(0.5, 0.8) if small else 1.0, True, taken))
    for name in list(names):
        partner = PARTNERS.get(name)
        if partner is None or partner in names or len(objects) >= 4 or rng.random() > PARTNER_P:
            continue
        names.append(partner)
        hidden = rng.random() < HIDDEN_P
        objects.append(_place(rng, partner, rng.uniform(2.0, 3.5), rng.uniform(0.3, 0.7), not hidden, taken))
    return Scene(scene_id, tuple(objects))


def sample_scenes(n: int, seed: int, start: int = 0) -> list[Scene]:
    """Scenes ``start … start + n − 1`` of the world drawn with ``seed``.

    Args:
        n: how many scenes.
        seed: the world's seed (scene ``i`` is :func:`sample_scene` of ``i`` and ``seed``).
        start: the first scene's index.

    Returns:
        The scenes, in index order.
    """
    return [sample_scene(i, seed) for i in range(start, start + n)]

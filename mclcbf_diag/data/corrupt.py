"""Corrupted inputs for activation patching: the same prompt with another image.

A corruption changes only the image, so the clean and corrupted prompts tokenise to the same ids and
every position lines up (:func:`mclcbf_diag.experiments.attribute.paired_inputs`). Kinds (:data:`KINDS`):

* ``noise``: VCD's forward-diffusion noise on the processed image tensor (the processor's normalised
  ``pixel_values``): ``√ᾱ_t · x + √(1 − ᾱ_t) · ε`` at step ``t`` of 1000 (default 500, VCD's), with
  VCD's schedule: ``β`` = sigmoid of 1000 points from −6 to 6, scaled to [1e-5, 5e-3], ``ᾱ_t = Π (1 − β)``.
  ε is drawn from a seeded generator.
* ``blank``: a uniform mid-grey image (128, 128, 128) of the same size.
* ``other``: another question's image (a different image file of the same question set).
* ``pair`` (the embedded model's world only): the same scene, rendered with the same background noise,
  with the asked object removed when it is drawn, or added (solid, mid-sized, in a free spot) when it
  is not — a minimal pair that differs in exactly the object the question asks about.
"""

from __future__ import annotations

import math
import re

from ..errors import UserError

# numpy, PIL and torch are imported where they are used: the command line checks --corrupt before they load

KINDS = ("pair", "noise", "blank", "other")
VCD_STEPS = 1000
VCD_STEP = 500


def check_step(step: int, steps: int = VCD_STEPS) -> int:
    if not 0 <= step < steps:
        raise UserError(f"--noise-step {step}: give a diffusion step from 0 to {steps - 1} (VCD uses {VCD_STEP})")
    return step


def vcd_alpha_bar(step: int, steps: int = VCD_STEPS) -> float:
    """ᾱ_t of VCD's schedule at ``step`` (0 … steps−1)."""
    import torch

    check_step(step, steps)
    betas = torch.sigmoid(torch.linspace(-6, 6, steps, dtype=torch.float64)) * (0.5e-2 - 1e-5) + 1e-5
    return float(torch.cumprod(1 - betas, 0)[step])


def vcd_noise(pixel_values, step: int = VCD_STEP, seed: int = 0):
    """``pixel_values`` under VCD's forward-diffusion noise at ``step`` (seeded, same dtype and device).

    √ᾱ_t·x + √(1 − ᾱ_t)·ε with ε standard normal, drawn in float32 on the CPU (:func:`vcd_alpha_bar`).

    Args:
        pixel_values: the processor's pixel values (any shape).
        step: the diffusion step t (0 … 999; VCD's default 500).
        seed: the noise's torch seed.

    Returns:
        The noised pixel values, shaped as ``pixel_values``.
    """
    import torch

    a = vcd_alpha_bar(step)
    g = torch.Generator().manual_seed(int(seed))
    eps = torch.randn(pixel_values.shape, generator=g, dtype=torch.float32)
    x = pixel_values.float().cpu()
    return (math.sqrt(a) * x + math.sqrt(1 - a) * eps).to(pixel_values.device, pixel_values.dtype)


def blank_image(size: tuple[int, int]):
    from PIL import Image

    return Image.new("RGB", size, (128, 128, 128))


# ---------------------------------------------------------------------------------- minimal pairs
_EMBEDDED_NAME = re.compile(r"emb_(\d{6})\.png$")


def asked_object(text: str) -> str | None:
    """The embedded world's class a question asks about (the one class name among its words), or None."""
    from ..embedded.world import CLASS_NAMES

    words = set(re.findall(r"[a-z]+", text.lower()))
    found = [c for c in CLASS_NAMES if c in words]
    return found[0] if len(found) == 1 else None


def embedded_scene(image_file: str, image):
    """The embedded world's scene of an image file of the shipped question set, checked pixel for pixel
    (None when the file is not one of its images or the pixels differ)."""
    import numpy as np

    from ..embedded.config import EVAL_SEED
    from ..embedded.world import render, sample_scene

    m = _EMBEDDED_NAME.search(str(image_file))
    if m is None:
        return None
    scene = sample_scene(int(m.group(1)), EVAL_SEED)
    same = np.array_equal(np.asarray(render(scene).convert("RGB")), np.asarray(image.convert("RGB")))
    return scene if same else None


def minimal_pair(scene, name: str):
    """``(scene', what)``: ``scene`` with object ``name`` removed (when drawn) or added (when not), and
    ``"removed"`` or ``"added"``. The background noise is seeded by the scene id, so it stays the same."""
    import numpy as np

    from ..embedded.world import DRAW_SIZE, PlacedObject, Scene

    if any(o.name == name and o.drawn for o in scene.objects):
        return Scene(scene.scene_id, tuple(o for o in scene.objects if o.name != name)), "removed"
    others = [o for o in scene.objects if o.name != name]
    rng = np.random.default_rng([scene.scene_id, 7919])
    size = 6.0
    best, best_gap = None, -math.inf
    for _ in range(200):  # the free spot farthest from every drawn object
        cx, cy = rng.uniform(size + 1, DRAW_SIZE - size - 1, size=2)
        gap = min((math.hypot(cx - o.cx, cy - o.cy) - o.size - size for o in others if o.drawn), default=math.inf)
        if gap > best_gap:
            best, best_gap = (float(cx), float(cy)), gap
        if gap > 2:
            break
    added = PlacedObject(name, best[0], best[1], size, 1.0, True)
    return Scene(scene.scene_id, (*others, added)), "added"


def pair_image(question, image, image_file: str):
    """The minimal-pair corruption of an embedded question: the same scene with the asked object removed or added.

    Args:
        question: the POPE question (its text names the object).
        image: the question's image (PIL), a render of the embedded world.
        image_file: its file name (which scene it is).

    Returns:
        ``(image, description)``: the changed scene's render and what changed, in words.

    Raises:
        UserError: the question names no single object of the embedded world, or the image is not one of its scenes.
    """
    from ..embedded.world import render

    name = asked_object(question.text)
    if name is None:
        raise UserError(f"--corrupt pair: question_id {question.question_id!r} ({question.text!r}) names no single "
                        "object of the embedded world; choose --corrupt noise, blank or other")
    scene = embedded_scene(image_file, image)
    if scene is None:
        raise UserError(f"--corrupt pair needs an image of the embedded model's world (the shipped question set); "
                        f"{image_file} is not one: choose --corrupt noise, blank or other")
    changed, what = minimal_pair(scene, name)
    return render(changed), f"the same scene with the {name} {what}"


__all__ = ["KINDS", "VCD_STEP", "VCD_STEPS", "asked_object", "blank_image", "check_step", "embedded_scene",
           "minimal_pair",
           "pair_image", "vcd_alpha_bar", "vcd_noise"]

"""Corrupted inputs (mclcbf_diag.data.corrupt): VCD's noise schedule by hand, minimal pairs of the embedded world.

References: VCD's schedule recomputed here with numpy in float64 (β = sigmoid of 1000 points from −6 to 6
scaled to [1e-5, 5e-3], ᾱ = cumulative product of 1 − β); the shipped images and their annotations; pixel
comparisons of the rendered pair.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mclcbf_diag import shipped
from mclcbf_diag.data import load_image, load_pope, resolve_image
from mclcbf_diag.data.corrupt import (
    asked_object,
    blank_image,
    check_step,
    embedded_scene,
    minimal_pair,
    pair_image,
    vcd_alpha_bar,
    vcd_noise,
)
from mclcbf_diag.embedded.world import BY_NAME, render
from mclcbf_diag.errors import UserError


def test_vcd_schedule_by_hand():
    t = np.linspace(-6, 6, 1000)
    beta = 1 / (1 + np.exp(-t)) * (0.5e-2 - 1e-5) + 1e-5
    abar = np.cumprod(1 - beta)
    for step in (0, 250, 500, 999):
        assert vcd_alpha_bar(step) == pytest.approx(abar[step], rel=1e-12)
    with pytest.raises(UserError, match="--noise-step 1000"):
        check_step(1000)
    with pytest.raises(UserError, match="--noise-step -1"):
        vcd_alpha_bar(-1)


def test_vcd_noise_is_seeded_and_has_the_schedules_moments():
    x = torch.full((1, 3, 64, 64), 2.0)
    a, b = vcd_noise(x, 500, seed=1), vcd_noise(x, 500, seed=1)
    assert torch.equal(a, b) and not torch.equal(a, vcd_noise(x, 500, seed=2))
    abar = vcd_alpha_bar(500)
    assert float(a.mean()) == pytest.approx(2 * abar ** 0.5, abs=0.05)  # 12288 draws: sd of the mean < 0.01
    assert float(a.std()) == pytest.approx((1 - abar) ** 0.5, rel=0.05)
    assert a.dtype == x.dtype and a.shape == x.shape


def test_asked_object():
    assert asked_object("Is there a dog in the image?") == "dog"
    assert asked_object("Is there a car or a truck?") is None  # two objects: no minimal pair
    assert asked_object("Is there a zebra?") is None


@pytest.fixture(scope="module")
def questions():
    return load_pope(shipped.pope_file("adversarial"))


def test_the_shipped_images_are_recognised_pixel_for_pixel(questions):
    q = questions[0]
    image = load_image(resolve_image(q, shipped.IMAGES))
    scene = embedded_scene(q.image, image)
    assert scene is not None and np.array_equal(np.asarray(render(scene)), np.asarray(image))
    assert embedded_scene(q.image, blank_image(image.size)) is None  # the same name, other pixels
    assert embedded_scene("photo.png", image) is None


def test_a_minimal_pair_differs_only_where_the_object_is(questions):
    for q in questions[:8]:
        image = load_image(resolve_image(q, shipped.IMAGES))
        scene = embedded_scene(q.image, image)
        name = asked_object(q.text)
        changed, what = minimal_pair(scene, name)
        drawn = any(o.name == name and o.drawn for o in scene.objects)
        assert what == ("removed" if drawn else "added")
        assert (name in changed.visible) == (what == "added")
        a, b = np.asarray(render(scene)).astype(int), np.asarray(render(changed)).astype(int)
        diff = np.abs(a - b).sum(-1) > 0
        assert 0 < diff.mean() < 0.1  # a small region: the object, not the background noise
        if what == "added":  # the object's own colour where it was drawn (solid)
            colour = np.array(BY_NAME[name].colour)
            assert (np.abs(b[diff] - colour).max(-1) < 60).mean() > 0.5
        picture, text = pair_image(q, image, q.image)
        assert np.array_equal(np.asarray(picture), b) and name in text


def test_pair_refusals(questions):
    q = questions[0]
    image = load_image(resolve_image(q, shipped.IMAGES))
    with pytest.raises(UserError, match="needs an image of the embedded model's world"):
        pair_image(q, blank_image(image.size), q.image)
    other = type(q)(**{**q.__dict__, "text": "Is there anything in the image?"})
    with pytest.raises(UserError, match="names no single object"):
        pair_image(other, image, q.image)

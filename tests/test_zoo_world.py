"""zoo/world.py: determinism, scene structure and the statistics that make the world POPE-like.

Statistics are recomputed here from the scenes' public fields (labels, objects) and
checked against the constants the module documents (PARTNER_P, HIDDEN_P, class weights),
with bounds wide enough to hold for any seed yet far from what a broken sampler gives.
"""

from collections import Counter

import numpy as np
import pytest

from mclcbf_diag.zoo import world as W
from mclcbf_diag.zoo.world import (
    BY_NAME,
    CLASS_NAMES,
    CLASSES,
    HIDDEN_P,
    IMAGE_SIZE,
    PARTNERS,
    Scene,
    render,
    sample_scene,
    sample_scenes,
)

N_STATS = 2000


@pytest.fixture(scope="module")
def many_scenes():
    return sample_scenes(N_STATS, seed=0)


def pixels(scene):
    return np.asarray(scene.image())


# --- determinism ---------------------------------------------------------------------

@pytest.mark.parametrize("scene_id,seed", [(0, 0), (17, 3), (999, 12345)])
def test_same_id_and_seed_give_identical_scene_and_pixels(scene_id, seed):
    a, b = sample_scene(scene_id, seed), sample_scene(scene_id, seed)
    assert a == b
    assert a.objects == b.objects
    ia, ib = pixels(a), pixels(b)
    assert ia.dtype == np.uint8 and ia.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    assert np.array_equal(ia, ib)
    # and rendering is itself deterministic (noise seeded by the scene id)
    assert np.array_equal(np.asarray(render(a)), ia)


def test_different_seed_gives_different_scenes():
    for scene_id in range(5):
        a, b = sample_scene(scene_id, 0), sample_scene(scene_id, 1)
        assert a.objects != b.objects
        assert not np.array_equal(pixels(a), pixels(b))


def test_different_scene_id_gives_different_scenes():
    a, b = sample_scene(0, 0), sample_scene(1, 0)
    assert a.objects != b.objects
    assert not np.array_equal(pixels(a), pixels(b))


def test_sample_scenes_matches_sample_scene_and_start():
    scenes = sample_scenes(5, seed=4, start=10)
    assert [s.scene_id for s in scenes] == [10, 11, 12, 13, 14]
    assert scenes == [sample_scene(i, 4) for i in range(10, 15)]


# --- scene structure -----------------------------------------------------------------

def test_object_counts_and_fields(many_scenes):
    counts = Counter(len(s.objects) for s in many_scenes)
    assert set(counts) <= {1, 2, 3, 4}
    assert all(counts[n] > 0 for n in (1, 2, 3, 4))  # every size actually occurs
    for s in many_scenes:
        assert len(set(s.labels)) == len(s.labels), f"duplicate class in scene {s.scene_id}"
        assert set(s.labels) <= set(CLASS_NAMES)
        for o in s.objects:
            assert 0 < o.opacity <= 1
            # fully inside the canvas
            assert o.cx - o.size >= 0 and o.cx + o.size <= IMAGE_SIZE
            assert o.cy - o.size >= 0 and o.cy + o.size <= IMAGE_SIZE


def test_hidden_objects_are_annotated_but_not_visible(many_scenes):
    n_hidden = 0
    for s in many_scenes:
        hidden = [o.name for o in s.objects if not o.drawn]
        n_hidden += len(hidden)
        for name in hidden:
            assert name in s.labels
            assert name not in s.visible
        assert s.visible == tuple(o.name for o in s.objects if o.drawn)
        assert set(s.visible) <= set(s.labels)
    assert n_hidden > 0


def test_hidden_objects_do_not_change_pixels():
    """Dropping the hidden objects renders the same image; drawing them changes it."""
    with_hidden = [s for s in sample_scenes(200, seed=0) if any(not o.drawn for o in s.objects)]
    assert with_hidden
    for s in with_hidden[:5]:
        drawn_only = Scene(s.scene_id, tuple(o for o in s.objects if o.drawn))
        assert np.array_equal(pixels(s), np.asarray(render(drawn_only)))
        revealed = Scene(s.scene_id, tuple(W.PlacedObject(o.name, o.cx, o.cy, o.size, o.opacity, True)
                                           for o in s.objects))
        assert not np.array_equal(pixels(s), np.asarray(render(revealed)))


# --- statistics ----------------------------------------------------------------------

def test_class_frequencies_are_skewed(many_scenes):
    freq = Counter(n for s in many_scenes for n in set(s.labels))
    assert set(freq) == set(CLASS_NAMES)  # every class occurs
    assert max(freq.values()) >= 2 * min(freq.values())


def test_main_object_frequency_follows_weights(many_scenes):
    # Main objects are the solid ones (opacity 1); partners are drawn faint.
    mains = Counter(o.name for s in many_scenes for o in s.objects if o.opacity == 1.0)
    by_weight = [c.name for c in sorted(CLASSES, key=lambda c: -c.weight)]
    counts = [mains[n] for n in by_weight]
    assert counts[0] == max(counts) and counts[-1] == min(counts)
    assert counts[0] >= 4 * counts[-1]
    for a, b in zip(counts, counts[1:]):
        assert b <= 1.1 * a, (by_weight, counts)


@pytest.mark.parametrize("main,partner", sorted(PARTNERS.items()))
def test_partner_co_occurs_far_above_chance(many_scenes, main, partner):
    with_main = [s for s in many_scenes if main in s.labels]
    without = [s for s in many_scenes if main not in s.labels]
    p_with = sum(partner in s.labels for s in with_main) / len(with_main)
    p_without = sum(partner in s.labels for s in without) / len(without)
    # PARTNER_P = 0.8 less the scenes already full (4 objects): ~0.72 observed
    assert p_with > 0.6, p_with
    assert p_without < 0.3, p_without
    assert p_with > 3 * p_without


def test_partner_additions_are_small_faint_and_partly_hidden(many_scenes):
    partners = []
    for s in many_scenes:
        mains = [o for o in s.objects if o.opacity == 1.0]
        added = [o for o in s.objects if o.opacity < 1.0]
        # mains come first, then partners, each the partner of a main in the scene
        assert list(s.objects) == mains + added
        main_names = {o.name for o in mains}
        for o in added:
            assert o.name in PARTNERS.values()
            assert {m for m, p in PARTNERS.items() if p == o.name} & main_names
            assert o.size <= 5.5 and all(m.size >= 7 for m in mains)
        assert all(o.drawn for o in mains)  # only partners are ever hidden
        partners += added
    assert len(partners) > 500
    hidden_frac = sum(not o.drawn for o in partners) / len(partners)
    assert abs(hidden_frac - HIDDEN_P) < 0.07, hidden_frac


# --- rendering -----------------------------------------------------------------------

def test_scene_0_seed_0_hand_check():
    """Hand-worked: scene (0, 0) is a solid car and a solid dog, apart from each other."""
    s = sample_scene(0, 0)
    assert s.labels == ("car", "dog") and s.visible == ("car", "dog")
    car, dog = s.objects
    assert (round(car.cx), round(car.cy)) == (47, 52) and (round(dog.cx), round(dog.cy)) == (42, 34)
    img = pixels(s).astype(float)
    # image rows are y, columns x; 3×3 patch means, noise sigma 10 → patch sigma ~3.3
    car_px = img[51:54, 46:49].reshape(-1, 3).mean(0)
    dog_px = img[33:36, 41:44].reshape(-1, 3).mean(0)
    assert np.allclose(car_px, (40, 70, 210), atol=12), car_px
    assert np.allclose(dog_px, (200, 40, 40), atol=12), dog_px
    # the top-left corner is background, ~128 grey
    assert np.allclose(img[1:6, 1:6].reshape(-1, 3).mean(0), 128, atol=15)


def test_solid_object_centres_have_their_class_colour():
    scenes = sample_scenes(40, seed=2)
    checked = 0
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
    for s in scenes:
        img = pixels(s).astype(float)
        drawn = [o for o in s.objects if o.drawn]
        far = np.ones((IMAGE_SIZE, IMAGE_SIZE), bool)
        for o in drawn:
            far &= (xx - o.cx) ** 2 + (yy - o.cy) ** 2 > (1.5 * o.size + 3) ** 2
        if far.sum() > 50:
            assert np.allclose(img[far].mean(0), W.BACKGROUND, atol=15)
        for o in drawn:
            if o.opacity != 1.0 or BY_NAME[o.name].shape == "ring":  # rings are hollow
                continue
            x, y = int(round(o.cx)), int(round(o.cy))
            others = [p for p in drawn if p is not o]
            if any(abs(p.cx - x) < p.size + 3 and abs(p.cy - y) < p.size + 3 for p in others):
                continue  # another object may overlap the centre
            patch = img[y - 1:y + 2, x - 1:x + 2].reshape(-1, 3).mean(0)
            assert np.allclose(patch, BY_NAME[o.name].colour, atol=15), (s.scene_id, o, patch)
            checked += 1
    assert checked >= 30


def test_faint_partner_is_a_blend_of_colour_and_background():
    """A drawn partner with opacity a shows a·colour + (1-a)·background at its centre."""
    for s in sample_scenes(300, seed=0):
        for o in s.objects:
            if not (o.drawn and o.opacity < 1.0 and BY_NAME[o.name].shape != "ring" and o.size >= 4.5):
                continue
            others = [p for p in s.objects if p is not o and p.drawn]
            x, y = int(round(o.cx)), int(round(o.cy))
            if any(abs(p.cx - x) < p.size + 3 and abs(p.cy - y) < p.size + 3 for p in others):
                continue
            expect = o.opacity * np.array(BY_NAME[o.name].colour) + (1 - o.opacity) * W.BACKGROUND
            patch = pixels(s).astype(float)[y - 1:y + 2, x - 1:x + 2].reshape(-1, 3).mean(0)
            # background colour cast (sigma 4) plus patch noise
            assert np.allclose(patch, expect, atol=20), (s.scene_id, o, patch, expect)
            return
    pytest.fail("no isolated faint partner found")

"""zoo/questions.py: POPE splits checked against frequencies and co-occurrences recomputed
here independently (multi-hot matrix products), and write_pope_set checked through
mclcbf_diag.data.load_pope."""

import json
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from mclcbf_diag.data import load_pope
from mclcbf_diag.zoo.questions import (
    SPLITS,
    annotation,
    image_name,
    pope_questions,
    write_pope_set,
)
from mclcbf_diag.zoo.world import CLASS_NAMES, sample_scenes

N_SCENES = 300
SEED = 5
TEXT = re.compile(r"^Is there a (\w+) in the image\?$")


@pytest.fixture(scope="module")
def scenes():
    return sample_scenes(N_SCENES, seed=1)


@pytest.fixture(scope="module")
def questions(scenes):
    return {split: pope_questions(scenes, split, SEED) for split in SPLITS}


@pytest.fixture(scope="module")
def multihot(scenes):
    """[n_scenes, n_classes] 0/1 matrix of annotated classes."""
    m = np.zeros((len(scenes), len(CLASS_NAMES)), dtype=np.int64)
    for i, s in enumerate(scenes):
        for name in s.labels:
            m[i, CLASS_NAMES.index(name)] = 1
    return m


def asked(q):
    match = TEXT.match(q["text"])
    assert match, q["text"]
    return match.group(1)


def by_image(qs):
    out = {}
    for q in qs:
        out.setdefault(q["image"], {"yes": [], "no": []})[q["label"]].append(asked(q))
    return out


@pytest.mark.parametrize("split", SPLITS)
def test_records_shape_balance_and_ids(questions, scenes, split):
    qs = questions[split]
    assert all(set(q) == {"question_id", "image", "text", "label"} for q in qs)
    assert [q["question_id"] for q in qs] == list(range(1, len(qs) + 1))
    labels = Counter(q["label"] for q in qs)
    assert set(labels) == {"yes", "no"} and labels["yes"] == labels["no"]
    # per image: min(3, #objects) yes and as many no, no repeats
    expected_n = sum(2 * min(3, len(set(s.labels))) for s in scenes)
    assert len(qs) == expected_n
    assert {q["image"] for q in qs} == {image_name(s) for s in scenes}
    for img, ans in by_image(qs).items():
        assert len(ans["yes"]) == len(ans["no"]) and 1 <= len(ans["yes"]) <= 3
        assert len(set(ans["yes"])) == len(ans["yes"]) and len(set(ans["no"])) == len(ans["no"])


@pytest.mark.parametrize("split", SPLITS)
def test_yes_asks_annotated_and_no_asks_absent(questions, scenes, split):
    labels = {image_name(s): set(s.labels) for s in scenes}
    for q in questions[split]:
        name = asked(q)
        assert name in CLASS_NAMES
        if q["label"] == "yes":
            assert name in labels[q["image"]], q
        else:
            assert name not in labels[q["image"]], q


def test_image_names():
    s = sample_scenes(1, seed=0, start=42)[0]
    assert image_name(s) == "zoo_000042.png"


def test_small_scenes_ask_about_every_object(questions, scenes):
    """Up to 3 objects: every annotated object is asked about (hidden ones included)."""
    for split in SPLITS:
        yes = by_image(questions[split])
        for s in scenes:
            got = yes[image_name(s)]["yes"]
            if len(s.labels) <= 3:
                assert sorted(got) == sorted(s.labels)
            else:
                assert len(got) == 3 and set(got) < set(s.labels)


def test_popular_negatives_are_most_frequent_absent(questions, scenes, multihot):
    freq = dict(zip(CLASS_NAMES, multihot.sum(0)))  # images containing each class
    asked_no = by_image(questions["popular"])
    for s in scenes:
        absent = set(CLASS_NAMES) - set(s.labels)
        chosen = asked_no[image_name(s)]["no"]
        rest = absent - set(chosen)
        assert min(freq[c] for c in chosen) >= max(freq[c] for c in rest), (s.labels, chosen)


def test_adversarial_negatives_maximise_co_occurrence(questions, scenes, multihot):
    co = multihot.T @ multihot  # co[i, j] = images containing both i and j
    asked_no = by_image(questions["adversarial"])
    n_differs_from_popular = 0
    popular_no = by_image(questions["popular"])
    for s in scenes:
        present = [CLASS_NAMES.index(n) for n in s.labels]
        score = {c: int(co[present, CLASS_NAMES.index(c)].sum()) for c in CLASS_NAMES}
        absent = set(CLASS_NAMES) - set(s.labels)
        chosen = asked_no[image_name(s)]["no"]
        rest = absent - set(chosen)
        assert min(score[c] for c in chosen) >= max(score[c] for c in rest), (s.labels, chosen)
        n_differs_from_popular += set(chosen) != set(popular_no[image_name(s)]["no"])
    assert n_differs_from_popular > N_SCENES // 10  # the split actually differs


def test_adversarial_picks_the_partner(questions, scenes):
    """A dog alone in its annotation: the adversarial split asks about a frisbee."""
    no = by_image(questions["adversarial"])
    lone_dogs = [s for s in scenes if s.labels == ("dog",)]
    assert lone_dogs
    for s in lone_dogs:
        assert no[image_name(s)]["no"] == ["frisbee"]


def test_random_negatives_are_spread_over_absent_classes(questions, scenes):
    no = Counter(asked(q) for q in questions["random"] if q["label"] == "no")
    assert set(no) == set(CLASS_NAMES)
    popular = Counter(asked(q) for q in questions["popular"] if q["label"] == "no")
    assert no != popular
    # popular concentrates on the top classes much more than random does
    assert max(popular.values()) > 1.3 * max(no.values())


@pytest.mark.parametrize("split", SPLITS)
def test_deterministic_for_a_seed(scenes, questions, split):
    assert pope_questions(scenes, split, SEED) == questions[split]


def test_seed_changes_random_split(scenes, questions):
    assert pope_questions(scenes, "random", SEED + 1) != questions["random"]


def test_unknown_split_raises(scenes):
    with pytest.raises(ValueError):
        pope_questions(scenes, "nonsense", SEED)


def test_write_pope_set_round_trips_through_load_pope(tmp_path):
    scenes = sample_scenes(12, seed=3)
    paths = write_pope_set(scenes, tmp_path, seed=SEED)
    assert set(paths) == set(SPLITS)
    for split in SPLITS:
        assert paths[split] == tmp_path / f"zoo_pope_{split}.json"
        loaded = load_pope(paths[split])
        expected = pope_questions(scenes, split, SEED)
        assert [(q.question_id, q.image, q.text, q.label) for q in loaded] == [
            (q["question_id"], q["image"], q["text"], q["label"]) for q in expected]
        for q in loaded:
            assert (tmp_path / "images" / q.image).is_file()
    for s in scenes:
        on_disk = np.asarray(Image.open(tmp_path / "images" / image_name(s)).convert("RGB"))
        assert np.array_equal(on_disk, np.asarray(s.image()))  # PNG is lossless
    lines = (tmp_path / "annotations.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert records == [annotation(s) for s in scenes]
    assert records[0] == {"image": image_name(scenes[0]), "labels": list(scenes[0].labels),
                          "visible": list(scenes[0].visible)}


def test_write_pope_set_prefix(tmp_path):
    paths = write_pope_set(sample_scenes(2, seed=0), tmp_path / "nested", seed=0, prefix="x")
    assert paths["popular"] == tmp_path / "nested" / "x_popular.json"
    assert all(p.is_file() for p in paths.values())

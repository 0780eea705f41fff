"""The shipped POPE-format data of the embedded model: format, images, and llava-hf's layout."""

import json
from pathlib import Path

import pytest
from PIL import Image

from mclcbf_diag.embedded import data
from mclcbf_diag.embedded.build import IMAGE_TOKEN, build_processor
from mclcbf_diag.embedded.evaluate import _prompt_ids, layout_check
from mclcbf_diag.embedded.questions import SPLITS

POPE = data.POPE_DIR


def _questions(split):
    return [json.loads(line) for line in (POPE / f"embedded_pope_{split}.json").read_text().splitlines()]


@pytest.mark.parametrize("split", SPLITS)
def test_split_files_are_pope_json_lines(split):
    qs = _questions(split)
    assert qs and all(set(q) == {"question_id", "image", "text", "label"} for q in qs)
    assert [q["question_id"] for q in qs] == list(range(1, len(qs) + 1))
    labels = [q["label"] for q in qs]
    assert labels.count("yes") == labels.count("no")
    assert all((POPE / "images" / q["image"]).is_file() for q in qs)


def test_images_are_few_small_336px_pngs():
    files = sorted((POPE / "images").glob("*.png"))
    assert 0 < len(files) <= 200
    with Image.open(files[0]) as im:
        assert im.size == (336, 336) and im.mode == "RGB"
    assert sum(f.stat().st_size for f in files) < 5_000_000


def test_layout_on_every_shipped_question():
    """BOS + the four "USER:" prefix tokens, then 576 image tokens at positions 5–580."""
    proc = build_processor()
    image_id = proc.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    n = 0
    for split in SPLITS:
        for q in _questions(split):
            assert layout_check(proc.tokenizer, _prompt_ids(proc, q["text"]), image_id) is None, q
            n += 1
    assert n > 0


def test_data_module_regenerates_the_shipped_files(tmp_path: Path):
    data.write(tmp_path, n_images=4)
    first = (tmp_path / "embedded_pope_random.json").read_text().splitlines()[0]
    assert json.loads(first)["image"] == _questions("random")[0]["image"]
    assert (tmp_path / "images" / _questions("random")[0]["image"]).read_bytes() == \
        (POPE / "images" / _questions("random")[0]["image"]).read_bytes()


@pytest.mark.parametrize("split", SPLITS)
def test_processor_with_shipped_images_gives_the_same_ids(split):
    """The processor's own <image> expansion equals the tokeniser-level check above."""
    from mclcbf_diag.embedded.build import PROMPT

    proc = build_processor()
    for q in _questions(split)[:6]:
        with Image.open(POPE / "images" / q["image"]) as im:
            enc = proc(text=PROMPT.format(question=q["text"]), images=im.convert("RGB"), return_tensors="pt")
        assert enc["input_ids"][0].tolist() == _prompt_ids(proc, q["text"])

"""POPE question loading, selection and image loading."""

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from mclcbf_diag.data import (
    PopeQuestion,
    load_image,
    load_pope,
    questions_frame,
    resolve_image,
    select_question,
)
from mclcbf_diag.errors import UserError

POPE_DIR = Path(
    os.environ.get("MCLCBF_POPE_DIR")
    or Path(__file__).resolve().parents[2] / "shared" / "pope"
)

ROWS = [
    {"question_id": 1, "image": "a.jpg", "text": "Is there a dog in the image?", "label": "yes"},
    {"question_id": 2, "image": "a.jpg", "text": "Is there a cat in the image?", "label": "No"},
    {"question_id": 3, "image": "b.jpg", "text": "Is there a car in the image?", "label": "yes"},
]


def write_jsonl(path, rows, blank_after_first=False):
    lines = [json.dumps(r) for r in rows]
    if blank_after_first:
        lines.insert(1, "   ")
    path.write_text("\n".join(lines) + "\n")
    return path


def expect_error(path, *fragments):
    with pytest.raises(UserError) as info:
        load_pope(path)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message
    return message


# --- formats -------------------------------------------------------------------------

def test_jsonl_with_blank_line(tmp_path):
    qs = load_pope(write_jsonl(tmp_path / "q.jsonl", ROWS, blank_after_first=True))
    assert qs == [
        PopeQuestion(1, "a.jpg", "Is there a dog in the image?", "yes", 0),
        PopeQuestion(2, "a.jpg", "Is there a cat in the image?", "no", 1),  # "No" normalised
        PopeQuestion(3, "b.jpg", "Is there a car in the image?", "yes", 2),
    ]


@pytest.mark.parametrize("sep", ["\u2028", "\u0085", "\u2029"])
def test_jsonl_lines_end_at_newline_only(tmp_path, sep):
    # characters str.splitlines() splits at, valid inside a JSON string (written raw, not escaped)
    text = f"Is there a dog{sep} in the image?"
    path = tmp_path / "q.jsonl"
    rows = [{"question_id": 1, "image": "a.jpg", "text": text, "label": "yes"},
            {"question_id": 2, "image": "a.jpg", "text": "Is there a cat?", "label": "no"}]
    path.write_text("\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\r\n", encoding="utf-8")
    qs = load_pope(path)
    assert [q.text for q in qs] == [text, "Is there a cat?"] and [q.index for q in qs] == [0, 1]


def test_string_ids_load_as_strings(tmp_path):
    rows = [{**r, "question_id": f"q{i}"} for i, r in enumerate(ROWS)] + [
        {"question_id": "вопрос-3", "image": "c.jpg", "text": "Is there a fox?", "label": "no"}]
    assert [q.question_id for q in load_pope(write_jsonl(tmp_path / "q.jsonl", rows))] == ["q0", "q1", "q2", "вопрос-3"]


def test_mixed_or_oversized_ids_are_refused_at_load(tmp_path):
    # a mixed column cannot be written to parquet: refused before any work, with the lines named
    rows = [ROWS[0], {**ROWS[1], "question_id": "q2"}]
    expect_error(write_jsonl(tmp_path / "m.jsonl", rows), "mix integers (line 1) and strings (line 2)",
                 "every one as a string")
    big = [{**ROWS[0], "question_id": 10 ** 25}]
    expect_error(write_jsonl(tmp_path / "b.jsonl", big), "line 1", "does not fit in a 64-bit integer")
    edge = [{**ROWS[0], "question_id": 2 ** 63 - 1}, {**ROWS[1], "question_id": -2 ** 63}]
    assert [q.question_id for q in load_pope(write_jsonl(tmp_path / "e.jsonl", edge))] == [2 ** 63 - 1, -2 ** 63]


def test_json_array_pretty_printed(tmp_path):
    path = tmp_path / "q.json"
    path.write_text("\n  " + json.dumps(ROWS, indent=4))  # leading whitespace before '['
    assert load_pope(path) == load_pope(write_jsonl(tmp_path / "q.jsonl", ROWS))


def test_questions_frame(tmp_path):
    df = questions_frame(load_pope(write_jsonl(tmp_path / "q.jsonl", ROWS)))
    assert list(df.columns) == ["index", "question_id", "image", "text", "label"]
    assert df["label"].tolist() == ["yes", "no", "yes"]
    assert df["index"].tolist() == [0, 1, 2]
    assert questions_frame([]).shape == (0, 5)


@pytest.mark.parametrize("split", ["random", "popular", "adversarial"])
def test_official_coco_files(split):
    path = POPE_DIR / "coco" / f"coco_pope_{split}.json"
    if not path.is_file():
        pytest.skip(f"official POPE file not found at {path} (set MCLCBF_POPE_DIR)")
    qs = load_pope(path)
    assert len(qs) == 3000
    assert sum(q.label == "yes" for q in qs) == 1500
    assert sum(q.label == "no" for q in qs) == 1500
    assert len({q.image for q in qs}) == 500
    assert qs[0].index == 0 and qs[-1].index == 2999


def test_official_aokvqa_array():
    files = sorted((POPE_DIR / "aokvqa").glob("*.json"))
    if not files:
        pytest.skip(f"A-OKVQA POPE files not found under {POPE_DIR / 'aokvqa'} (set MCLCBF_POPE_DIR)")
    for path in files:
        assert path.read_text().lstrip().startswith("[")
        qs = load_pope(path)
        assert len(qs) == 3000
        assert {q.label for q in qs} == {"yes", "no"}


# --- file errors -----------------------------------------------------------------------

def test_malformed_line_reports_line_number(tmp_path):
    path = tmp_path / "q.jsonl"
    # line 1 ok, line 2 blank, line 3 ok, line 4 broken
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + '\n{"question_id": 3,\n')
    expect_error(path, str(path), "line 4", "malformed JSON")


def test_malformed_array_reports_line_number(tmp_path):
    path = tmp_path / "q.json"
    path.write_text('[\n  {"question_id": 1},\n  {oops}\n]\n')
    expect_error(path, str(path), "line 3")


def test_missing_key(tmp_path):
    rows = [ROWS[0], {k: v for k, v in ROWS[1].items() if k != "label"}]
    path = write_jsonl(tmp_path / "q.jsonl", rows)
    expect_error(path, str(path), "line 2", "'label'")


def test_missing_key_in_array(tmp_path):
    path = tmp_path / "q.json"
    path.write_text(json.dumps([ROWS[0], {"question_id": 2, "text": "x", "label": "no"}]))
    expect_error(path, "item 1", "'image'")


def test_bad_label(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [ROWS[0], {**ROWS[1], "label": "maybe"}])
    expect_error(path, "line 2", "'maybe'", "yes")


def test_not_an_object(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n42\n")
    expect_error(path, "line 2", "JSON object")


@pytest.mark.parametrize("content", ["", "  \n\n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "q.jsonl"
    path.write_text(content)
    expect_error(path, str(path), "empty")


def test_empty_array(tmp_path):
    path = tmp_path / "q.json"
    path.write_text("[]")
    expect_error(path, "no questions")


def test_missing_file(tmp_path):
    expect_error(tmp_path / "nope.json", "nope.json", "not found")


def test_directory_instead_of_file(tmp_path):
    expect_error(tmp_path, "directory")


# --- selection -------------------------------------------------------------------------

@pytest.fixture
def questions(tmp_path):
    return load_pope(write_jsonl(tmp_path / "q.jsonl", ROWS))


def test_select_by_index(questions):
    assert select_question(questions, sample=0).question_id == 1
    assert select_question(questions, sample=2).question_id == 3


def test_select_by_id_compares_as_string(questions):
    assert select_question(questions, question_id=2).index == 1
    assert select_question(questions, question_id="2").index == 1
    assert select_question(questions, question_id="3").index == 2


@pytest.mark.parametrize("sample", [3, -1])
def test_out_of_range_index(questions, sample):
    with pytest.raises(UserError) as info:
        select_question(questions, sample=sample, source="q.jsonl")
    message = str(info.value)
    assert f"--sample {sample}" in message
    assert "0..2" in message and "3 questions" in message and "q.jsonl" in message


def test_unknown_id(questions):
    with pytest.raises(UserError, match=r"--question-id 99 not found .*3 questions"):
        select_question(questions, question_id=99)


@pytest.mark.parametrize("kwargs", [{}, {"sample": 0, "question_id": 1}])
def test_exactly_one_selector(questions, kwargs):
    with pytest.raises(UserError, match="exactly one"):
        select_question(questions, **kwargs)


# --- images ----------------------------------------------------------------------------

def test_load_valid_png(tmp_path):
    path = tmp_path / "img.png"
    Image.new("L", (5, 4), color=128).save(path)  # greyscale on disk, RGB after loading
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (5, 4)
    assert img.getpixel((0, 0)) == (128, 128, 128)


def test_resolve_image(tmp_path, questions):
    assert resolve_image(questions[0], tmp_path) == tmp_path / "a.jpg"
    with pytest.raises(UserError, match="--image-dir"):
        resolve_image(questions[0], tmp_path / "missing")


def test_load_missing_image(tmp_path):
    with pytest.raises(UserError) as info:
        load_image(tmp_path / "a.jpg")
    assert str(tmp_path / "a.jpg") in str(info.value) and "--image-dir" in str(info.value)


def test_load_corrupt_image(tmp_path):
    path = tmp_path / "bad.jpg"
    path.write_bytes(b"\x00\x01 definitely not an image")
    with pytest.raises(UserError, match="cannot be read.*--image-dir"):
        load_image(path)


def test_load_truncated_image(tmp_path):
    full = tmp_path / "full.png"
    Image.effect_noise((64, 64), 50).convert("RGB").save(full)
    cut = tmp_path / "cut.png"
    cut.write_bytes(full.read_bytes()[: len(full.read_bytes()) // 2])
    with pytest.raises(UserError, match="cut.png.*cannot be read"):
        load_image(cut)

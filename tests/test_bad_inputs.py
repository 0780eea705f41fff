"""Every bad input gets a clear answer: exit status 2, ONE line on stderr that starts with
``mclcbf-diag: error:`` and says what/where/how to fix, no traceback (unless ``--debug``),
and nothing the user already had is lost or half-written.

CLI cases run ``main([...])`` in process with capsys; the console script does
``sys.exit(main())``, so its exit status is ``main``'s return value. One case runs a real
subprocess to check that ``--debug`` gives the traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mclcbf_diag import barrier as B
from mclcbf_diag.cli import main
from mclcbf_diag.errors import UserError

EMBEDDED_IMAGES = Path(__file__).resolve().parent.parent / "mclcbf_diag" / "zoo" / "pope" / "images"
SENTINEL = "results from an earlier run\n"


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """Run every case in an empty folder, so a default ``reports/`` would show up there."""
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


@pytest.fixture
def out_dir(tmp_path):
    """An --out folder that already holds a user's file."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text(SENTINEL)
    return out


def _untouched(out: Path) -> None:
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"], "files were written despite the error"
    assert (out / "keep.txt").read_text() == SENTINEL
    assert not (Path.cwd() / "reports").exists(), "a default reports/ folder was created despite the error"


def _cli_error(capsys, argv: list[str], *fragments: str) -> str:
    """Run the CLI, expect the one-line error, return it."""
    rc = main(argv)
    captured = capsys.readouterr()
    assert rc == 2, f"exit status {rc}, stderr: {captured.err!r}"
    assert "Traceback" not in captured.err + captured.out
    lines = captured.err.strip("\n").split("\n")
    assert len(lines) == 1, f"stderr is not one line: {captured.err!r}"
    line = lines[0]
    assert "\r" not in line, f"progress-bar output on stderr: {line!r}"
    assert line.startswith("mclcbf-diag: error: "), line
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    return line


def _pope_file(folder: Path, *images: str) -> Path:
    path = folder / "questions.jsonl"
    lines = [json.dumps({"question_id": 100 + i, "image": name, "text": "Is there a dog in the image?",
                         "label": "yes"}) for i, name in enumerate(images)]
    path.write_text("\n".join(lines) + "\n")
    return path


# ----------------------------------------------------------------------------- data
def test_missing_image(tmp_path, capsys, out_dir):
    pope = _pope_file(tmp_path, "zoo_000000.png", "not_there.png")
    shutil.copy(EMBEDDED_IMAGES / "zoo_000000.png", tmp_path / "zoo_000000.png")
    line = _cli_error(capsys, ["trace", "--pope-file", str(pope), "--image-dir", str(tmp_path), "--sample", "1",
                               "--out", str(out_dir)], "not_there.png", "not found", "--image-dir")
    assert str(tmp_path) in line  # where it looked
    _untouched(out_dir)


def test_missing_image_dir(tmp_path, capsys, out_dir):
    pope = _pope_file(tmp_path, "zoo_000000.png")
    _cli_error(capsys, ["trace", "--pope-file", str(pope), "--image-dir", str(tmp_path / "nope"),
                        "--out", str(out_dir)], "image folder", "does not exist", "--image-dir")
    _untouched(out_dir)


def test_corrupt_image(tmp_path, capsys, out_dir):
    pope = _pope_file(tmp_path, "broken.png")
    (tmp_path / "broken.png").write_bytes((EMBEDDED_IMAGES / "zoo_000000.png").read_bytes()[:120])
    _cli_error(capsys, ["trace", "--pope-file", str(pope), "--image-dir", str(tmp_path), "--out", str(out_dir)],
               "broken.png", "cannot be read", "replace the file")
    _untouched(out_dir)


def test_not_an_image(tmp_path, capsys, out_dir):
    pope = _pope_file(tmp_path, "notes.png")
    (tmp_path / "notes.png").write_text("this is text, not a PNG")
    _cli_error(capsys, ["trace", "--pope-file", str(pope), "--image-dir", str(tmp_path), "--out", str(out_dir)],
               "notes.png", "cannot be read")
    _untouched(out_dir)


def test_sample_out_of_range(capsys, out_dir):
    _cli_error(capsys, ["trace", "--sample", "5000", "--out", str(out_dir)],
               "--sample 5000 is out of range", "zoo_pope_adversarial.json", "valid samples are 0..")
    _untouched(out_dir)


def test_negative_sample(capsys, out_dir):
    _cli_error(capsys, ["explain", "--sample", "-1", "--out", str(out_dir)], "--sample -1 is out of range")
    _untouched(out_dir)


def test_unknown_question_id(capsys, out_dir):
    _cli_error(capsys, ["trace", "--question-id", "no-such-id", "--out", str(out_dir)],
               "--question-id no-such-id not found", "zoo_pope_adversarial.json", "--sample")
    _untouched(out_dir)


def test_malformed_pope_line(tmp_path, capsys, out_dir):
    pope = _pope_file(tmp_path, "a.png", "b.png")
    with pope.open("a") as f:
        f.write('{"question_id": 7, "image": "c.png", "text": "Is there a cat?", "label": "no"\n')
    _cli_error(capsys, ["trace", "--pope-file", str(pope), "--out", str(out_dir)],
               str(pope), "line 3", "malformed JSON", "one complete JSON object")
    _untouched(out_dir)


def test_pope_line_missing_key(tmp_path, capsys, out_dir):
    pope = tmp_path / "q.jsonl"
    pope.write_text('{"question_id": 1, "image": "a.png", "text": "Is there a dog?"}\n')
    _cli_error(capsys, ["trace", "--pope-file", str(pope), "--out", str(out_dir)], "line 1", "'label'")
    _untouched(out_dir)


def test_missing_pope_file(tmp_path, capsys, out_dir):
    _cli_error(capsys, ["trace", "--pope-file", str(tmp_path / "nope.jsonl"), "--out", str(out_dir)],
               "nope.jsonl", "not found")
    _untouched(out_dir)


# ----------------------------------------------------------------------------- model
def test_missing_model_directory(tmp_path, capsys, out_dir):
    _cli_error(capsys, ["trace", "--model", str(tmp_path / "no_model_here"), "--out", str(out_dir)],
               "no_model_here", "no such directory", "checkpoint directory")
    _untouched(out_dir)


def test_model_directory_without_config(tmp_path, capsys, out_dir):
    (tmp_path / "empty_model").mkdir()
    _cli_error(capsys, ["trace", "--model", str(tmp_path / "empty_model"), "--out", str(out_dir)],
               "no config.json", "save_pretrained")
    _untouched(out_dir)


def test_model_without_image_token(tmp_path, capsys, out_dir, zoo_processor, zoo_model):
    model_dir = tmp_path / "no_image_token"
    zoo_processor.save_pretrained(model_dir)
    zoo_model.save_pretrained(model_dir)
    cfg_path = model_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    key = "image_token_index" if "image_token_index" in cfg else "image_token_id"
    cfg[key] = 9999  # not in the ~70-word vocabulary
    cfg_path.write_text(json.dumps(cfg))
    capsys.readouterr()  # drop save_pretrained's progress bar
    _cli_error(capsys, ["trace", "--model", str(model_dir), "--out", str(out_dir)],
               "no image token", "image_token_id=9999", "<image>")
    _untouched(out_dir)


def test_fp16_on_cpu(capsys, out_dir):
    _cli_error(capsys, ["trace", "--dtype", "float16", "--out", str(out_dir)],
               "--dtype float16", "CPU", "--dtype float32")
    _untouched(out_dir)


def test_unknown_dtype(capsys, out_dir):
    _cli_error(capsys, ["trace", "--dtype", "float64", "--out", str(out_dir)], "unknown --dtype 'float64'",
               "float32")
    _untouched(out_dir)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda(capsys, out_dir):
    _cli_error(capsys, ["trace", "--device", "cuda", "--out", str(out_dir)],
               "--device cuda", "CUDA is not available", "--device cpu")
    _untouched(out_dir)


def test_bad_threads(capsys, out_dir):
    _cli_error(capsys, ["trace", "--threads", "0", "--out", str(out_dir)], "--threads 0", "positive")
    _untouched(out_dir)


# ----------------------------------------------------------------------------- intervention config
def test_unknown_preset(capsys, out_dir):
    _cli_error(capsys, ["trace", "--preset", "turbo", "--out", str(out_dir)],
               "unknown preset 'turbo'", "seed-exp6", "fixed")
    _untouched(out_dir)


def test_unknown_knob(capsys, out_dir):
    _cli_error(capsys, ["trace", "--set", "nope=1", "--out", str(out_dir)],
               "unknown knob 'nope'", "valid knobs:", "tau_prefill")
    _untouched(out_dir)


@pytest.mark.parametrize("override, fragments", [
    ("tau=abc", ("tau='abc' is not a number",)),
    ("tau=2", ("tau_prefill=2.0", "[0, 1]")),
    ("clamp=maybe", ("clamp='maybe' is not valid", "step_norm")),
    ("layers=x", ("layers", "'x' is not an integer")),
    ("tau", ("has no '='", "knob=value")),
])
def test_bad_knob_value(capsys, out_dir, override, fragments):
    _cli_error(capsys, ["trace", "--set", override, "--out", str(out_dir)], *fragments)
    _untouched(out_dir)


def test_layers_out_of_range(capsys, out_dir):
    # Only detectable once the model is loaded (it has 4 layers): still nothing written.
    _cli_error(capsys, ["trace", "--set", "layers=1,9", "--out", str(out_dir)],
               "layers [9] out of range", "0..3")
    _untouched(out_dir)


def test_bad_k_max(capsys, out_dir):
    _cli_error(capsys, ["explain", "--k-max", "0", "--out", str(out_dir)], "--k-max", ">= 1")
    _untouched(out_dir)


# ----------------------------------------------------------------------------- output
def test_unwritable_out(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text(SENTINEL)
    _cli_error(capsys, ["trace", "--out", str(blocker / "sub")], str(blocker / "sub"), "cannot write there",
               "is a file", "writable folder")
    assert blocker.read_text() == SENTINEL
    assert not (Path.cwd() / "reports").exists()


def test_out_not_created_when_a_later_check_fails(tmp_path, capsys):
    out = tmp_path / "new_out"
    _cli_error(capsys, ["trace", "--set", "layers=9", "--out", str(out)], "layers [9] out of range")
    assert not out.exists(), "the output folder was created although nothing was written"


# ----------------------------------------------------------------------------- numerics
def test_nan_gradient_names_the_layer(monkeypatch, capsys, out_dir):
    from mclcbf_diag.interventions import mclcbf

    real = mclcbf._grad_and_value

    def poisoned(*args, **kwargs):
        g, h = real(*args, **kwargs)
        return torch.full_like(g, float("nan")), h

    monkeypatch.setattr(mclcbf, "_grad_and_value", poisoned)
    # seed-exp6 steers layers 1..3 of the embedded model; the first one computed fails.
    _cli_error(capsys, ["trace", "--out", str(out_dir)], "barrier gradient at layer 1", "NaN or inf",
               "grad_dtype=float32")
    _untouched(out_dir)


def test_inf_weights_name_the_layer(embedded_image_question):
    from mclcbf_diag.models import load_model
    from mclcbf_diag.trace import trace_sample

    lm = load_model()  # a private copy: this test poisons its weights
    question, image = embedded_image_question
    with torch.no_grad():
        lm.model.model.language_model.layers[0].mlp.down_proj.weight[0, 0] = float("inf")
    with pytest.raises(UserError, match=r"layer 1 is NaN or inf") as info:
        trace_sample(lm, question, image, B.get_preset("seed-exp6"))
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- library level
@pytest.fixture(scope="module")
def embedded_image_question():
    from mclcbf_diag.cli import EMBEDDED_POPE
    from mclcbf_diag.data import load_image, load_pope, resolve_image

    q = load_pope(EMBEDDED_POPE / "zoo_pope_adversarial.json")[0]
    return q, load_image(resolve_image(q, EMBEDDED_POPE / "images"))


@pytest.mark.parametrize("command", ["trace", "explain", "pope"])
def test_prompt_without_image_placeholder_cli(capsys, out_dir, command):
    _cli_error(capsys, [command, "--prompt", "USER: {question}\nASSISTANT:", "--out", str(out_dir)],
               "lacks <image>", "e.g.")
    _untouched(out_dir)


def test_prompt_without_image_placeholder(embedded_model, embedded_image_question):
    from mclcbf_diag.trace import sample_inputs

    q, image = embedded_image_question
    with pytest.raises(UserError, match="lacks <image>") as info:
        sample_inputs(embedded_model, q.text, image, template="USER: {question}\nASSISTANT:")
    assert "\n" not in str(info.value)


def test_image_span_not_found(embedded_model):
    from mclcbf_diag.runner import run

    tok = embedded_model.processor.tokenizer
    ids = tok("USER: Is there a dog in the image?\nASSISTANT:", return_tensors="pt").input_ids
    image_id = embedded_model.tokens.image_token_id
    assert not bool((ids == image_id).any())
    with pytest.raises(UserError, match="no image token"):
        B.image_span_mask(B.get_preset("fixed"), ids, image_id)
    for preset in ("seed-exp6", "fixed"):
        with pytest.raises(UserError, match="no image token") as info:
            run(embedded_model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, B.get_preset(preset))
        assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- --debug
def test_debug_gives_a_traceback(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "mclcbf_diag.cli", "--debug", "trace", "--sample", "5000",
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode != 0
    assert "Traceback (most recent call last)" in proc.stderr
    assert "UserError: --sample 5000 is out of range" in proc.stderr
    assert not (tmp_path / "out").exists()

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
import time
from pathlib import Path

import pytest
import torch

from mclcbf_diag import barrier as B
from mclcbf_diag import shipped
from mclcbf_diag.cli import main
from mclcbf_diag.errors import UserError

EMBEDDED_IMAGES = shipped.IMAGES
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
    pope = _pope_file(tmp_path, "emb_000000.png", "not_there.png")
    shutil.copy(EMBEDDED_IMAGES / "emb_000000.png", tmp_path / "emb_000000.png")
    line = _cli_error(capsys, ["trace", "--pope-file", str(pope), "--image-dir", str(tmp_path), "--sample", "1",
                               "--out", str(out_dir)], "not_there.png", "not found", "--image-dir")
    assert str(tmp_path) in line  # where it looked
    _untouched(out_dir)


def test_missing_image_dir(tmp_path, capsys, out_dir):
    pope = _pope_file(tmp_path, "emb_000000.png")
    _cli_error(capsys, ["trace", "--pope-file", str(pope), "--image-dir", str(tmp_path / "nope"),
                        "--out", str(out_dir)], "image folder", "does not exist", "--image-dir")
    _untouched(out_dir)


def test_corrupt_image(tmp_path, capsys, out_dir):
    pope = _pope_file(tmp_path, "broken.png")
    (tmp_path / "broken.png").write_bytes((EMBEDDED_IMAGES / "emb_000000.png").read_bytes()[:120])
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
               "--sample 5000 is out of range", shipped.pope_file("adversarial").name, "valid samples are 0..")
    _untouched(out_dir)


def test_negative_sample(capsys, out_dir):
    _cli_error(capsys, ["explain", "--sample", "-1", "--out", str(out_dir)], "--sample -1 is out of range")
    _untouched(out_dir)


def test_unknown_question_id(capsys, out_dir):
    _cli_error(capsys, ["trace", "--question-id", "no-such-id", "--out", str(out_dir)],
               "--question-id no-such-id not found", shipped.pope_file("adversarial").name, "--sample")
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


def test_model_without_image_token(tmp_path, capsys, out_dir, tiny_processor, tiny_model):
    model_dir = tmp_path / "no_image_token"
    tiny_processor.save_pretrained(model_dir)
    tiny_model.save_pretrained(model_dir)
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
               "layers [9] out of range", "0..7")
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
    from mclcbf_diag.interventions.mclcbf import intervention as mclcbf

    real = mclcbf._grad_and_value

    def poisoned(*args, **kwargs):
        g, h = real(*args, **kwargs)
        return torch.full_like(g, float("nan")), h

    monkeypatch.setattr(mclcbf, "_grad_and_value", poisoned)
    # seed-exp6 steers layers 1..3 of the embedded model; the first one computed fails.
    _cli_error(capsys, ["trace", "--out", str(out_dir)], "barrier gradient at layer 3", "NaN or inf",
               "grad_dtype=float32")
    _untouched(out_dir)


def test_inf_weights_name_the_layer(embedded_image_question):
    from mclcbf_diag.experiments.trace import trace_sample
    from mclcbf_diag.models import load_model

    lm = load_model()  # a private copy: this test poisons its weights
    question, image = embedded_image_question
    with torch.no_grad():
        lm.model.model.language_model.layers[0].mlp.down_proj.weight[0, 0] = float("inf")
    with pytest.raises(UserError, match=r"layer 3 is NaN or inf") as info:
        trace_sample(lm, question, image, B.get_preset("seed-exp6"))
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- library level
@pytest.fixture(scope="module")
def embedded_image_question():
    from mclcbf_diag.data import load_image, load_pope, resolve_image

    q = load_pope(shipped.pope_file("adversarial"))[0]
    return q, load_image(resolve_image(q, shipped.IMAGES))


@pytest.mark.parametrize("command", ["trace", "explain", "pope"])
def test_prompt_without_image_placeholder_cli(capsys, out_dir, command):
    _cli_error(capsys, [command, "--prompt", "USER: {question}\nASSISTANT:", "--out", str(out_dir)],
               "lacks <image>", "e.g.")
    _untouched(out_dir)


def test_prompt_without_image_placeholder(embedded_model, embedded_image_question):
    from mclcbf_diag.experiments.trace import sample_inputs

    q, image = embedded_image_question
    with pytest.raises(UserError, match="lacks <image>") as info:
        sample_inputs(embedded_model, q.text, image, template="USER: {question}\nASSISTANT:")
    assert "\n" not in str(info.value)


def test_image_span_not_found(embedded_model):
    from mclcbf_diag.engine.runner import forward

    tok = embedded_model.processor.tokenizer
    ids = tok("USER: Is there a dog in the image?\nASSISTANT:", return_tensors="pt").input_ids
    image_id = embedded_model.tokens.image_token_id
    assert not bool((ids == image_id).any())
    with pytest.raises(UserError, match="no image token"):
        B.image_span_mask(B.get_preset("fixed"), ids, image_id)
    for preset in ("seed-exp6", "fixed"):
        with pytest.raises(UserError, match="no image token") as info:
            forward(embedded_model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, B.get_preset(preset))
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


# ============================================================================= issue 18: hardening
# Each case below reproduced a silent corruption, an escape or a traceback before the fix.
from mclcbf_diag import pope, storage
from mclcbf_diag.cli import pope as pope_cli  # noqa: E402

POPE_FAST = ["pope", "--split", "random", "--limit", "2", "--batch-size", "2"]


def _copy_images(dst: Path, names=("emb_000000.png", "emb_000001.png")) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for n in names:
        shutil.copy(EMBEDDED_IMAGES / n, dst / n)
    return dst


def _answers(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- 1. a failed pope blocks nothing
@pytest.mark.parametrize("bad", [["--model", "/nonexistent"], ["--dtype", "float64"], ["--set", "layers=99"],
                                 ["--prompt", "USER: {question}"], ["--generate", "100000"],
                                 ["--batch-size", "0"]])
def test_failed_pope_writes_nothing_then_the_fix_runs(tmp_path, capsys, bad):
    out = tmp_path / "pope"
    _cli_error(capsys, [*POPE_FAST, "--out", str(out), *bad])
    assert not out.exists(), "the refused run created its output folder"
    assert main([*POPE_FAST, "--out", str(out)]) == 0
    assert len(_answers(out)) == 2


def test_answerless_run_json_is_taken_over(tmp_path, capsys):
    out = tmp_path / "pope"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"format": 2, "model": "/elsewhere", "dtype": "bfloat16"}))
    assert main([*POPE_FAST, "--out", str(out)]) == 0
    assert json.loads((out / "run.json").read_text())["model"] == "embedded"


# ----------------------------------------------------------------------------- 2. identity covers the images
def test_resume_with_other_images_is_refused(tmp_path, capsys):
    from PIL import Image

    real, black = _copy_images(tmp_path / "real"), tmp_path / "black"
    black.mkdir()
    for p in real.iterdir():
        Image.new("RGB", (64, 64)).save(black / p.name)
    pope_file = _pope_file(tmp_path, "emb_000000.png", "emb_000001.png")
    argv = ["pope", "--pope-file", str(pope_file), "--split", "random", "--batch-size", "1"]
    out = tmp_path / "out"

    def stop(n):
        raise KeyboardInterrupt

    args = sweep_args([*argv, "--image-dir", str(real), "--out", str(out)])
    with pytest.raises(KeyboardInterrupt):
        pope_cli.cmd_pope(args, on_batch=stop)
    assert len(_answers(out)) == 1
    capsys.readouterr()
    _cli_error(capsys, [*argv, "--image-dir", str(black), "--out", str(out)], "differs in: images", "--out")
    assert len(_answers(out)) == 1
    # a changed POPE file is another run too
    pope_file.write_text(pope_file.read_text().replace("dog", "cat"))
    _cli_error(capsys, [*argv, "--image-dir", str(real), "--out", str(out)], "pope_sha256")


def sweep_args(argv):
    from mclcbf_diag.cli import build_parser

    return build_parser().parse_args(argv)


def test_merge_refuses_shards_of_other_images(tmp_path, capsys):
    from PIL import Image

    real, black = _copy_images(tmp_path / "real"), tmp_path / "black"
    black.mkdir()
    for p in real.iterdir():
        Image.new("RGB", (64, 64)).save(black / p.name)
    pope_file = _pope_file(tmp_path, "emb_000000.png", "emb_000001.png")
    argv = ["pope", "--pope-file", str(pope_file), "--split", "random"]
    assert main([*argv, "--image-dir", str(real), "--shard", "0/2", "--out", str(tmp_path / "s0")]) == 0
    assert main([*argv, "--image-dir", str(black), "--shard", "1/2", "--out", str(tmp_path / "s1")]) == 0
    capsys.readouterr()
    _cli_error(capsys, ["merge", str(tmp_path / "m"), str(tmp_path / "s0"), str(tmp_path / "s1")],
               "differ in: images")
    assert not (tmp_path / "m").exists()


# ----------------------------------------------------------------------------- 3. one process per --out
def test_second_process_on_the_same_out_is_refused(tmp_path, capsys):
    out = tmp_path / "pope"
    out.mkdir()
    with storage.FolderLock(out):
        line = _cli_error(capsys, [*POPE_FAST, "--out", str(out)], "is in use by", f"pid {os.getpid()}")
    assert "another --out" in line
    assert not (out / "answers.jsonl").exists()
    assert main([*POPE_FAST, "--out", str(out)]) == 0  # the lock is gone with its holder


# ----------------------------------------------------------------------------- 4. images decode correctly
def test_16bit_grayscale_png_is_scaled_not_white(tmp_path):
    import numpy as np
    from PIL import Image

    from mclcbf_diag.data import load_image

    gray8 = np.asarray(Image.open(EMBEDDED_IMAGES / "emb_000000.png").convert("L"))
    Image.fromarray(gray8.astype(np.uint16) * 257).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode in ("I;16", "I")
    got = np.asarray(load_image(tmp_path / "g16.png"))
    assert got.shape == (*gray8.shape, 3)
    assert np.abs(got[..., 0].astype(int) - gray8).max() <= 1 and got.mean() < 250


def test_exif_orientation_is_applied(tmp_path):
    from PIL import Image

    from mclcbf_diag.data import load_image

    img = Image.new("RGB", (40, 20), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert load_image(tmp_path / "rot.jpg").size == (20, 40)


def test_huge_image_is_refused_with_the_override(tmp_path, capsys, out_dir, monkeypatch):
    pope = _pope_file(tmp_path, "emb_000000.png")
    _copy_images(tmp_path, ["emb_000000.png"])
    monkeypatch.setenv("MCLCBF_DIAG_MAX_IMAGE_PIXELS", "1000")  # 336x336 = 112896 pixels
    for cmd in (["trace"], POPE_FAST[:1]):
        _cli_error(capsys, [*cmd, "--pope-file", str(pope), "--image-dir", str(tmp_path), "--out", str(out_dir)],
                   "emb_000000.png", "336x336", "megapixels", "MCLCBF_DIAG_MAX_IMAGE_PIXELS")
    _untouched(out_dir)


def test_image_cache_is_bounded_in_bytes(monkeypatch):
    monkeypatch.setenv("MCLCBF_DIAG_IMAGE_CACHE_MB", "1")
    cache = pope.ImageCache()
    for p in sorted(EMBEDDED_IMAGES.iterdir())[:120]:  # 120 × 12 KB decoded > 1 MB
        cache(p)
    assert cache.nbytes <= 2**20 and len(cache.items) < 120
    assert cache.nbytes == sum(i.width * i.height * 3 for i in cache.items.values())


# ----------------------------------------------------------------------------- 5. weights
def test_checkpoint_missing_a_tensor_is_refused(tmp_path, capsys, out_dir, saved_tiny_dir):
    from safetensors.torch import load_file, save_file

    model_dir = tmp_path / "partial"
    shutil.copytree(saved_tiny_dir, model_dir)
    tensors = load_file(model_dir / "model.safetensors")
    del tensors[sorted(tensors)[-1]]
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    _cli_error(capsys, ["trace", "--model", str(model_dir), "--out", str(out_dir)], "1 missing", "random weights")
    _untouched(out_dir)


def test_transformers_load_report_is_held_back_and_logged_when_not_refused(capsys):
    """load_weights holds back transformers' LOAD REPORT while from_pretrained runs (the refusal above says it in one
    line); a report it does not refuse for is logged after all, and other warnings pass as they come."""
    import logging

    from transformers.utils import logging as hf_logging

    from mclcbf_diag.models.loading import _HeldLoadReport

    hf_logging.get_logger("transformers.modeling_utils")  # transformers' handler is configured
    logger = logging.getLogger("transformers.modeling_utils")
    with _HeldLoadReport() as report:
        logger.warning("Llava LOAD REPORT from: somewhere\nKey | Status")
        logger.warning("another warning")
    err = capsys.readouterr().err
    assert "another warning" in err and "LOAD REPORT" not in err
    report.release()
    assert "Llava LOAD REPORT from: somewhere" in capsys.readouterr().err
    logger.warning("a LOAD REPORT after the load")
    assert "a LOAD REPORT after the load" in capsys.readouterr().err  # the filter is gone


def test_verify_refuses_changed_weights(tmp_path, capsys, out_dir):
    from mclcbf_diag.models import EMBEDDED

    model_dir = tmp_path / "model"
    shutil.copytree(EMBEDDED, model_dir)
    data = bytearray((model_dir / "model.safetensors").read_bytes())
    data[-100] ^= 0x01
    (model_dir / "model.safetensors").write_bytes(bytes(data))
    _cli_error(capsys, ["trace", "--model", str(model_dir), "--verify", "--out", str(out_dir)],
               "--verify", "model.safetensors does not match MANIFEST.sha256")
    _untouched(out_dir)


# ----------------------------------------------------------------------------- 6/11. limits, no silent cuts
def test_max_new_tokens_is_bounded(capsys, out_dir):
    _cli_error(capsys, ["trace", "--max-new-tokens", "100000", "--out", str(out_dir)],
               "--max-new-tokens 100000", "limit of 512", "MCLCBF_DIAG_MAX_NEW_TOKENS")
    _untouched(out_dir)


def test_huge_question_is_refused_before_anything(tmp_path, capsys, out_dir):
    pope = tmp_path / "q.jsonl"
    pope.write_text(json.dumps({"question_id": 1, "image": "emb_000000.png", "text": "dog " * 2_500_000,
                                "label": "yes"}) + "\n")
    for cmd in (["trace"], ["pope"]):
        _cli_error(capsys, [*cmd, "--pope-file", str(pope), "--image-dir", str(EMBEDDED_IMAGES),
                            "--out", str(out_dir)], "line 1", "10000000 characters", "MCLCBF_DIAG_MAX_QUESTION_CHARS")
    _untouched(out_dir)


@pytest.mark.parametrize("command", ["trace", "pope"])
def test_prompt_the_tokenizer_would_cut_is_refused(capsys, out_dir, command):
    long = "USER: <image>\n" + "Please look carefully at the picture. " * 20 + "{question}\nASSISTANT:"
    _cli_error(capsys, [command, "--prompt", long, "--out", str(out_dir)], "tokens", "limit of 1024", "cut")
    _untouched(out_dir)


# ----------------------------------------------------------------------------- 7. duplicate question ids
def test_duplicate_question_ids_are_refused(tmp_path, capsys, out_dir):
    pope = _pope_file(tmp_path, "a.png", "b.png")
    with pope.open("a") as f:
        f.write(json.dumps({"question_id": 100, "image": "c.png", "text": "Is there a cat?", "label": "no"}) + "\n")
    for cmd in (["trace"], ["pope"]):
        _cli_error(capsys, [*cmd, "--pope-file", str(pope), "--out", str(out_dir)],
                   "line 3", "question_id 100", "line 1", "unique")
    _untouched(out_dir)


# ----------------------------------------------------------------------------- 8. paths stay in their folder
@pytest.mark.parametrize("image", ["/etc/passwd", "../outside.png", "sub/../../outside.png"])
@pytest.mark.parametrize("command", ["trace", "pope"])
def test_image_path_cannot_escape_the_image_dir(tmp_path, capsys, out_dir, image, command):
    images = _copy_images(tmp_path / "images")
    shutil.copy(EMBEDDED_IMAGES / "emb_000000.png", tmp_path / "outside.png")
    pope = _pope_file(tmp_path, image)
    _cli_error(capsys, [command, "--pope-file", str(pope), "--image-dir", str(images), "--out", str(out_dir)],
               "question_id 100", repr(image), "not a plain relative path")
    _untouched(out_dir)


def test_question_id_cannot_escape_reports(tmp_path, capsys):
    pope = tmp_path / "q.jsonl"
    pope.write_text(json.dumps({"question_id": "/../../escaped_trace", "image": "emb_000000.png",
                                "text": "Is there a dog in the image?", "label": "yes"}) + "\n")
    assert main(["trace", "--pope-file", str(pope), "--image-dir", str(EMBEDDED_IMAGES)]) == 0
    cwd = Path.cwd()
    made = list((cwd / "reports").iterdir())
    assert len(made) == 1 and made[0].name.startswith("trace-_.._.._escaped_trace-")
    assert (made[0] / "trace.html").is_file()
    assert not (cwd.parent / "escaped_trace").exists() and not (cwd / "escaped_trace").exists()


# ----------------------------------------------------------------------------- 9. atomic writes, recovery
def test_full_disk_during_the_append_is_one_line(tmp_path, capsys, monkeypatch):
    import errno

    out = tmp_path / "pope"
    real_write = os.write

    def full(fd, data):
        if b'"baseline_answer"' in bytes(data[:4096]):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(storage.os, "write", full)
    assert main([*POPE_FAST, "--out", str(out)]) == 2
    err = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()
    assert "Traceback" not in "".join(err)
    line = err[-1]  # before it: only the progress bar of the run
    assert all(e.startswith("pope:") for e in err[:-1]), err
    assert line.startswith("mclcbf-diag: error: cannot write") and "answers.jsonl" in line
    assert "no space left on device" in line and "rerun" in line
    monkeypatch.setattr(storage.os, "write", real_write)
    assert main([*POPE_FAST, "--out", str(out)]) == 0  # the rerun just works
    assert len(_answers(out)) == 2


def test_full_disk_leaves_no_truncated_report(tmp_path, capsys, monkeypatch):
    import errno

    from mclcbf_diag.report import html as report

    (tmp_path / "r").mkdir()
    page = tmp_path / "r" / "summary.html"
    page.write_text("the previous report")
    monkeypatch.setattr(storage.os, "write", lambda fd, data: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(UserError, match="no space left on device"):
        report.write_page(page, "t", [report.Section("h", text="x" * 100_000)])
    assert page.read_text() == "the previous report"
    assert [p.name for p in page.parent.iterdir()] == ["summary.html"]


@pytest.mark.parametrize("damage", ["", "{\"format\": 2, \"mod", "[1, 2]"])
def test_damaged_run_json_is_rebuilt_keeping_the_answers(tmp_path, capsys, damage):
    out = tmp_path / "pope"
    assert main([*POPE_FAST, "--out", str(out)]) == 0
    before = (out / "answers.jsonl").read_bytes()
    (out / "run.json").write_text(damage)
    assert main([*POPE_FAST, "--out", str(out)]) == 0
    assert (out / "answers.jsonl").read_bytes() == before
    assert json.loads((out / "run.json").read_text())["model"] == "embedded"
    assert "rebuilt" in capsys.readouterr().err
    # with other options, the damaged folder is not silently adopted
    (out / "run.json").write_text("")
    capsys.readouterr()
    _cli_error(capsys, [*POPE_FAST, "--out", str(out), "--set", "tau=0.5"], "run_id", "another --out")


@pytest.mark.parametrize("line, problem", [
    (b'{"split": "random", "question_id": 1}\n', "field 'index' is missing"),
    (b'["not", "an", "object"]\n', "not an object"),
    (b'{"split": 3}\n', "field 'split' is 3"),
    (b'{"split": "random", "question_id": 1, "text": "\xff\xfe"}\n', "not UTF-8"),
])
def test_hand_corrupted_answers_line_is_one_line(tmp_path, capsys, line, problem):
    out = tmp_path / "pope"
    assert main([*POPE_FAST, "--out", str(out)]) == 0
    with (out / "answers.jsonl").open("ab") as f:
        f.write(line)
    capsys.readouterr()
    _cli_error(capsys, [*POPE_FAST, "--out", str(out)], "answers.jsonl, line 3", problem, "delete that line")


def test_read_only_answers_is_one_line(tmp_path, capsys, monkeypatch):
    out = tmp_path / "pope"
    assert main([*POPE_FAST, "--out", str(out)]) == 0
    lines = (out / "answers.jsonl").read_text().splitlines(keepends=True)
    (out / "answers.jsonl").write_text(lines[0])
    real = os.access
    # (as root a chmod does not stop writes, so the check itself is simulated)
    monkeypatch.setattr(os, "access", lambda p, m: False if str(p).endswith("answers.jsonl") else real(p, m))
    capsys.readouterr()
    _cli_error(capsys, [*POPE_FAST, "--out", str(out)], "answers.jsonl is read-only", "chmod")


# ----------------------------------------------------------------------------- 10. one line, never a traceback
@pytest.mark.parametrize("override, fragment", [
    ("fixed_span=0:1e20", "is not an integer"),
    ("fixed_span=0:99999999999999999999999", "too large"),
    ("layers=0:100000000000", "too large"),
    ("layers=0:50000", "lists 50000 layers"),
])
def test_huge_knob_numbers_are_one_line(capsys, out_dir, override, fragment):
    _cli_error(capsys, ["trace", "--set", override, "--out", str(out_dir)], fragment)
    _untouched(out_dir)


def test_ctrl_c_at_start_is_one_line(capsys, monkeypatch):
    import mclcbf_diag.cli as cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert main(["trace"]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "interrupted" in err and "Traceback" not in err


def test_deeply_nested_json_is_one_line(tmp_path, capsys, out_dir):
    pope = tmp_path / "deep.json"
    pope.write_text("[" * 200_000 + "]" * 200_000)
    _cli_error(capsys, ["trace", "--pope-file", str(pope), "--out", str(out_dir)], "nests JSON too deeply")
    _untouched(out_dir)


def test_non_utf8_file_name_is_one_line(tmp_path, capsys, out_dir):
    name = os.fsdecode(b"q\xff.jsonl")
    pope = _pope_file(tmp_path, "emb_000000.png").rename(tmp_path / name)
    _cli_error(capsys, ["trace", "--pope-file", str(pope), "--sample", "7", "--out", str(out_dir)],
               "q\\udcff.jsonl", "--sample 7 is out of range")
    _untouched(out_dir)


@pytest.mark.parametrize("argv, fragment", [
    (["embedded", "eval", "--images", "0"], "--images 0 must be >= 1"),
    (["embedded", "data", "--images", "-5"], "--images -5 must be >= 1"),
    (["embedded", "train", "--steps", "-1"], "--steps -1 must be >= 1"),
    (["pope", "--shard", "-1/2"], "--shard=VALUE"),
    (["trace", "--sample"], "expected one argument"),
])
def test_numbers_and_argparse_errors_are_one_line(tmp_path, capsys, argv, fragment):
    out = tmp_path / "o"
    with pytest.raises(SystemExit) if argv[0] in ("pope", "trace") else _no_raise():
        rc = main([*argv, *(["--out", str(out)] if argv[0] == "embedded" else [])])
        assert rc == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mclcbf-diag: error: ") and fragment in err, err
    assert "usage:" not in err and not out.exists()


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ----------------------------------------------------------------------------- 12. refusals are fast
@pytest.mark.parametrize("argv", [
    ["trace", "--sample", "5000"],
    ["trace", "--set", "layers=99"],
    ["pope", "--set", "layers=1,9"],
    ["explain", "--dtype", "float64"],
    ["trace", "--out", "/dev/null/x"],
])
def test_refusals_never_read_the_weights(capsys, monkeypatch, argv):
    from mclcbf_diag.models import loading

    def no_weights(*a, **k):
        raise AssertionError("the weights were read before the mistake was reported")

    monkeypatch.setattr(loading.LlavaForConditionalGeneration, "from_pretrained", no_weights)
    monkeypatch.setattr(loading, "load_weights", no_weights)
    _cli_error(capsys, argv)


def test_refusals_are_fast(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    for argv in (["trace", "--sample", "5000"], ["pope", "--set", "layers=99", "--out", str(tmp_path / "p")],
                 ["pope", "--limit", "0"], ["trace", "--set", "layers=0:100000000000"],
                 ["trace", "--max-new-tokens", "100000"], ["explain", "--pope-file", "missing.jsonl"],
                 ["trace", "--set", "tau=abc"], ["explain", "--preset", "bogus"], ["pope", "--set", "clamp=maybe"]):
        start = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "mclcbf_diag.cli", *argv], capture_output=True, text=True,
                              env=env, cwd=tmp_path, timeout=120)
        took = time.monotonic() - start
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert took < 5, f"{argv}: refused after {took:.1f} s (the model was probably loaded first)"
    assert not (tmp_path / "p").exists()

"""models/loading.py: config-only facts, complete checkpoints, prompt lengths, --verify."""

import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from mclcbf_diag.errors import UserError
from mclcbf_diag.models import loading
from mclcbf_diag.models.loading import (
    EMBEDDED,
    check_prompt_lengths,
    load_model,
    model_facts,
    prepare_model,
)


def test_model_facts_read_config_only(monkeypatch):
    def no_weights(*a, **k):
        raise AssertionError("weights were read")

    monkeypatch.setattr(loading.LlavaForConditionalGeneration, "from_pretrained", no_weights)
    facts = model_facts(None)
    assert (facts.n_layers, facts.max_positions, facts.image_seq_length, facts.model_type) == (8, 1024, 576, "llava")


def _checkpoint(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    weights = dst / "model.safetensors"
    tensors = load_file(weights)
    edit(tensors)
    save_file(tensors, weights, metadata={"format": "pt"})
    return dst


def test_missing_tensor_is_refused(tmp_path, saved_tiny_dir):
    def drop(t):
        del t[sorted(k for k in t if "layers.1." in k)[0]]

    model_dir = _checkpoint(saved_tiny_dir, tmp_path / "missing", drop)
    with pytest.raises(UserError, match="1 missing") as info:
        load_model(str(model_dir))
    assert "random weights" in str(info.value) and "\n" not in str(info.value)


def test_unexpected_tensor_is_refused(tmp_path, saved_tiny_dir):
    import torch

    def add(t):
        t["model.language_model.layers.99.extra.weight"] = torch.zeros(2)

    model_dir = _checkpoint(saved_tiny_dir, tmp_path / "extra", add)
    with pytest.raises(UserError, match="unexpected"):
        load_model(str(model_dir))


def test_complete_checkpoint_loads(saved_tiny_dir):
    assert load_model(str(saved_tiny_dir)).n_layers == 4


def test_long_prompt_is_refused_not_cut():
    prep = prepare_model()
    assert check_prompt_lengths(prep, ["USER: <image>\nIs there a dog in the image?\nASSISTANT:"]) < 1024
    long = "USER: <image>\n" + "Is there a dog " * 120 + "?\nASSISTANT:"
    with pytest.raises(UserError) as info:
        check_prompt_lengths(prep, [long], ["question_id 7"])
    msg = str(info.value)
    assert "question_id 7" in msg and "1024" in msg and "tokens" in msg and "cut" in msg


def test_new_tokens_beyond_the_context_are_refused():
    prep = prepare_model()
    with pytest.raises(UserError, match="max_position_embeddings"):
        check_prompt_lengths(prep, ["USER: <image>\nIs there a dog?\nASSISTANT:"], max_new_tokens=500)


def test_verify_refuses_a_flipped_byte(tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(EMBEDDED, model_dir)
    prepare_model(str(model_dir), verify=True)  # intact copy passes
    weights = model_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(UserError, match="model.safetensors does not match MANIFEST.sha256"):
        prepare_model(str(model_dir), verify=True)

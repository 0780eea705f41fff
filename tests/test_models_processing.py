"""models/processing.py: the image placeholder, processor errors as one line, the image's patch grid.

Tiny checkpoints come from tests/test_models_adapter.py's builder (a 112-px CLIP tower: an 8 × 8 grid of 64 image
tokens); one of them spells its image placeholder ``<img>``, as Pixtral's processor spells it ``[IMG]``.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_models_adapter import tiny_checkpoint

from mclcbf_diag.embedded.build import PROMPT, QUESTION
from mclcbf_diag.embedded.world import sample_scene
from mclcbf_diag.errors import UserError
from mclcbf_diag.models import load_model
from mclcbf_diag.models.loading import check_prompt_lengths
from mclcbf_diag.models.processing import (
    check_image_grid,
    patch_grid_shape,
    processor_prompt,
    run_processor,
)
from mclcbf_diag.report.overlay import patch_grid

PROMPT_DOG = PROMPT.format(question=QUESTION.format(name="dog"))


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return load_model(tiny_checkpoint("llama", tmp_path_factory.mktemp("llama112")))


@pytest.fixture(scope="module")
def img_lm(tmp_path_factory):
    return load_model(tiny_checkpoint("llama", tmp_path_factory.mktemp("img"), image_token="<img>"))


def test_the_portable_placeholder_becomes_the_processors_own():
    assert processor_prompt(SimpleNamespace(image_token="[IMG]"), "USER: <image>\nq") == "USER: [IMG]\nq"
    assert processor_prompt(SimpleNamespace(image_token="<image>"), "USER: <image>\nq") == "USER: <image>\nq"
    assert processor_prompt(SimpleNamespace(), "a <image>") == "a <image>"


def test_a_checkpoint_with_another_placeholder_runs_the_portable_prompt(img_lm):
    assert img_lm.processor.image_token == "<img>"
    enc = img_lm.inputs(PROMPT_DOG, sample_scene(3, 1).image())
    assert int((enc["input_ids"][0] == img_lm.tokens.image_token_id).sum()) == 64
    assert check_prompt_lengths(img_lm, [PROMPT_DOG]) == enc["input_ids"].shape[1]
    with torch.no_grad():
        assert torch.isfinite(img_lm.model(**enc).logits).all()


def test_processor_errors_are_one_line_before_the_model_runs(lm):
    image = sample_scene(3, 1).image()
    with pytest.raises(UserError) as info:
        lm.inputs("USER: <image> <image>\nIs there a dog?\nASSISTANT:", image)  # two placeholders, one image
    line = str(info.value)
    assert line.startswith(f"--model {lm.source}: its processor refused the prompt and image (")
    assert "needs one <image> per image" in line and "\n" not in line
    assert "(the prompt has 2 <image> placeholders for 1 image)" in line  # the same words on every transformers

    def needs_torchvision(**kwargs):
        raise ImportError("PixtralImageProcessor requires the Torchvision library but it was not found")

    with pytest.raises(UserError, match=r"^--model ckpt: its processor needs a package .*pip install torchvision"):
        run_processor(needs_torchvision, "ckpt", "USER: <image>", image)


def test_the_patch_grid_of_an_image(lm):
    enc = lm.processor(text=PROMPT_DOG, images=sample_scene(3, 1).image(), return_tensors="pt")
    assert patch_grid_shape(enc["pixel_values"], 14) == (8, 8)
    assert lm.image_grid(enc) == (8, 8)
    ids = torch.full((1, 60), 5)
    ids[0, 5:53] = lm.tokens.image_token_id  # 48 image tokens
    wide = {"input_ids": ids, "pixel_values": torch.zeros(1, 3, 84, 112)}  # a 6 × 8 grid
    with pytest.raises(UserError, match=r"a 6 × 8 patch grid \(48 image tokens\), not a square one.*square crop"):
        lm.image_grid(wide)
    ids[0, 53] = lm.tokens.image_token_id  # 49 tokens on a 6 × 8 grid
    with pytest.raises(UserError, match=r"becomes 49 image tokens, which do not form its 6 × 8 patch grid \(48"):
        lm.image_grid(wide)


def test_check_image_grid_by_hand():
    assert check_image_grid(576, (24, 24), "m") == (24, 24)
    assert check_image_grid(577, (24, 24), "m", extra=1) == (24, 24)  # a CLS token kept ("full" selection)
    with pytest.raises(UserError, match="577 image tokens, which do not form its 24 × 24 patch grid"):
        check_image_grid(577, (24, 24), "m")


def test_the_overlay_grid_takes_a_non_square_shape():
    row = torch.arange(10.0)
    mask = torch.tensor([0, 0] + [1] * 6 + [0, 0], dtype=torch.bool)
    np.testing.assert_array_equal(patch_grid(row, mask, (2, 3)), [[2.0, 3.0, 4.0], [5.0, 6.0, 7.0]])
    with pytest.raises(ValueError, match="6 image tokens do not form a square patch grid"):
        patch_grid(row, mask)
    with pytest.raises(ValueError, match="6 image tokens do not form its 4 × 2 patch grid"):
        patch_grid(row, mask, (4, 2))


def test_a_prompt_beyond_the_sliding_window_is_refused(tmp_path):
    """A Mistral text model with a 24-token window caches 23 keys: an 83-token prompt is refused before loading."""
    from mclcbf_diag.models.loading import prepare_model, sliding_window

    prep = prepare_model(tiny_checkpoint("mistral", tmp_path))
    assert sliding_window(prep.config.text_config) == 24
    with pytest.raises(UserError, match=r"^q: the prompt is 8\d tokens and 2 new tokens, more than the text model's "
                                        r"sliding window of 24 tokens keeps in its KV cache \(23\)"):
        check_prompt_lengths(prep, [PROMPT_DOG], ["q"], max_new_tokens=2)
    from transformers import LlamaConfig, Qwen2Config

    assert sliding_window(Qwen2Config(use_sliding_window=True, sliding_window=24, max_window_layers=1,
                                      num_hidden_layers=2)) == 24
    assert sliding_window(Qwen2Config()) is None and sliding_window(LlamaConfig()) is None


def test_trace_overlay_tokens_refuse_a_processor_error_in_one_line_before_loading(lm, monkeypatch, capsys, tmp_path):
    """``trace --overlay-token`` tokenizes the prompt with the processor before the weights load: its refusal is the
    same one line as the model's own inputs (two placeholders, one image), and no weights are read."""
    import mclcbf_diag.models.loading as loading
    from mclcbf_diag.cli import main

    monkeypatch.setattr(loading, "load_weights", lambda *a, **k: pytest.fail("the weights were loaded"))
    rc = main(["trace", "--model", lm.source, "--sample", "0", "--prompt",
               "USER: <image> <image>\n{question}\nASSISTANT:", "--overlay-token", "5", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and not (tmp_path / "o").exists()
    assert err.startswith(f"mclcbf-diag: error: --model {lm.source}: its processor refused the prompt and image (")

"""The shipped embedded weights: offline loading and the model card's figures on a subset."""

import json

import pytest
import torch

from mclcbf_diag.embedded import WEIGHTS
from mclcbf_diag.embedded.build import IMAGE_START, N_IMAGE_TOKENS

pytestmark = pytest.mark.skipif(not (WEIGHTS / "model.safetensors").exists(), reason="no shipped weights")


@pytest.fixture(scope="module")
def shipped():
    from mclcbf_diag.embedded.evaluate import load

    return load(WEIGHTS)


def test_loads_offline_with_llava_hf_layout(shipped):
    model, processor = shipped
    cfg = model.config
    assert cfg.text_config.num_hidden_layers == 8 and cfg.text_config.model_type == "llama"
    assert cfg.vision_config.image_size == 336 and cfg.vision_config.patch_size == 14
    assert cfg.vision_feature_select_strategy == "default"
    tok = processor.tokenizer
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<image>") and tok.pad_token_id == cfg.image_token_id + 1
    assert (WEIGHTS / "model.safetensors").stat().st_size < 30_000_000
    assert IMAGE_START + N_IMAGE_TOKENS == 581


def test_answer_tokens_found_by_the_toolkit(shipped):
    from mclcbf_diag.models.tokens import answer_tokens

    model, processor = shipped
    at = answer_tokens(processor.tokenizer, model.config.image_token_id, str(WEIGHTS))
    assert processor.tokenizer.convert_ids_to_tokens([at.yes_id, at.no_id]) == ["▁Yes", "▁No"]


def test_subset_figures_match_the_model_card(shipped):
    from mclcbf_diag.embedded.evaluate import shipped_subset

    model, processor = shipped
    expected = json.loads((WEIGHTS / "subset_figures.json").read_text())
    got = shipped_subset(model, processor, n_images=expected["n_images"])
    for split, fig in expected["splits"].items():
        assert got[split]["n"] == fig["n"]
        # one flipped near-tie answer at most (float differences between machines)
        assert abs(got[split]["accuracy"] - fig["accuracy"]) <= 1.01 / fig["n"], split
        assert abs(got[split]["yes_ratio"] - fig["yes_ratio"]) <= 1.01 / fig["n"], split


def test_attention_profile_matches_the_model_card(shipped):
    from mclcbf_diag.embedded.evaluate import attention_profile

    model, processor = shipped
    expected = json.loads((WEIGHTS / "subset_figures.json").read_text())["attention"]
    with torch.no_grad():
        prof = attention_profile(model, processor, n_prompts=expected["n_prompts"])
    for key in ("bos", "image", "text"):
        assert prof[key].round(3).tolist() == pytest.approx(expected[key], abs=2e-3), key


def test_manifest_verifies():
    from mclcbf_diag.storage import verify_manifest

    assert verify_manifest(WEIGHTS) == 7


def test_report_prints_the_layout_pope_and_attention_beside_the_published_figures(shipped):
    from mclcbf_diag.embedded.evaluate import PUBLISHED, PUBLISHED_ATTENTION, report

    model, processor = shipped
    pinned = json.loads((WEIGHTS / "subset_figures.json").read_text())["attention"]  # the model card's figures
    lines = []
    with torch.no_grad():
        rep = report(model, processor, n_images=2, n_prompts=pinned["n_prompts"], say=lines.append)
    text = "\n".join(lines)
    assert lines[0].startswith("layout: 2028 shipped questions checked, 0 wrong")
    assert "f1 LLaVA-1.5-7B" in text and PUBLISHED["source_split"] in text  # POPE beside the published F1
    assert all(p in text for p in PUBLISHED_ATTENTION)  # the attention profile beside the literature
    below = sum(pinned["image"][layer] < 0.2 for layer in (3, 4, 5, 6))
    assert lines[-1] == f"seed layers 10–27 map to [3, 4, 5, 6]; image mass < 0.2 at {below}/4 of them"
    assert set(rep["pope"].split) == {"random", "popular", "adversarial"}

"""Unit tests for the embedded model's builder: tokenizer, processor, layout, tiny configs."""

import floors
import pytest
import torch

from mclcbf_diag.embedded import build
from mclcbf_diag.embedded.evaluate import layout_check, mapped_layers

TINY = {"text_layers": 2, "hidden": 32, "heads": 2, "intermediate": 64, "vision_hidden": 32, "vision_layers": 2}


@pytest.fixture(scope="module")
def processor():
    return build.build_processor()


@pytest.fixture(scope="module")
def tiny(processor):
    return build.build_model(processor.tokenizer, seed=0, **TINY).eval()


def test_special_ids_follow_llava_hf(processor):
    tok = processor.tokenizer
    n_regular = len(build.vocabulary())
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.convert_tokens_to_ids("<image>") == n_regular
    assert tok.pad_token_id == n_regular + 1
    assert tok.convert_tokens_to_ids("<0x0A>") == 13  # Llama's newline byte


def test_prompt_prefix_is_bos_plus_four_tokens(processor):
    tok = processor.tokenizer
    ids = tok(build.PROMPT.format(question=build.QUESTION.format(name="frisbee"))).input_ids
    assert tok.convert_ids_to_tokens(ids[:6]) == ["<s>", "▁US", "ER", ":", "▁", "<image>"]
    assert tok.convert_ids_to_tokens(ids[-4:]) == ["ASS", "IST", "ANT", ":"]


def test_answers_are_single_word_start_tokens_with_variants(processor):
    from mclcbf_diag.models.tokens import answer_tokens

    tok = processor.tokenizer
    at = answer_tokens(tok, tok.convert_tokens_to_ids("<image>"), "embedded")
    assert tok.convert_ids_to_tokens([at.yes_id, at.no_id]) == ["▁Yes", "▁No"]
    for v in ("Yes", "▁yes"):
        assert v in at.yes_variants
    for v in ("No", "▁no"):
        assert v in at.no_variants
    assert tok.convert_ids_to_tokens(tok(" Yes", add_special_tokens=False).input_ids) == ["▁Yes"]


def test_processor_expands_image_to_576_tokens_at_5_to_580(processor):
    from mclcbf_diag.embedded.world import sample_scene

    prompt = build.PROMPT.format(question=build.QUESTION.format(name="dog"))
    enc = processor(text=prompt, images=sample_scene(0, 0).image(), return_tensors="pt")
    ids = enc["input_ids"][0].tolist()
    assert enc["pixel_values"].shape == (1, 3, 336, 336)
    assert layout_check(processor.tokenizer, ids, processor.tokenizer.convert_tokens_to_ids("<image>")) is None


def test_tiny_model_forward_and_roundtrip(processor, tiny, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from mclcbf_diag.embedded.world import sample_scene

    assert tiny.config.vision_feature_layer == -2
    assert tiny.config.vision_feature_select_strategy == "default"
    assert tiny.config.text_config.vocab_size % 64 == 0
    prompt = build.PROMPT.format(question=build.QUESTION.format(name="cup"))
    enc = processor(text=prompt, images=sample_scene(1, 0).image(), return_tensors="pt")
    with torch.no_grad():
        out = tiny(**enc, output_attentions=True)
    assert out.logits.shape[1] == enc["input_ids"].shape[1]
    assert out.attentions[0] is not None  # eager attention
    tiny.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    proc = AutoProcessor.from_pretrained(tmp_path)
    enc2 = proc(text=prompt, images=sample_scene(1, 0).image(), return_tensors="pt")
    assert torch.equal(enc2["input_ids"], enc["input_ids"])
    with torch.no_grad():  # reloaded with transformers' default attention, not eager: logits of two routes
        assert torch.allclose(model(**enc2).logits, out.logits, rtol=0, atol=floors.logit_floor(tiny))


def test_seed_layers_map_to_3_to_6():
    assert list(mapped_layers(8)) == [3, 4, 5, 6]
    assert list(mapped_layers(32)) == list(range(10, 28))

"""zoo/build.py: the word-level tokenizer, the LlavaProcessor and the tiny LLaVA, checked
against hand-worked token lists, CLIP's own normalisation constants and transformers'
own forward pass / save-load behaviour."""

import numpy as np
import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration, LlavaProcessor
from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from mclcbf_diag.zoo import build as B
from mclcbf_diag.zoo.world import CLASS_NAMES, IMAGE_SIZE

EXPECTED_TOKENS = ["<s>", "USER", ":", "<image>", "\n", "Is", "there", "a", "dog", "in", "the",
                   "image", "?", "\n", "ASSISTANT", ":"]
N_IMAGE_TOKENS = (64 // 8) ** 2  # 64 patches, CLS dropped by the "default" strategy


# --- tokenizer -----------------------------------------------------------------------

def test_prompt_constants():
    assert B.PROMPT.format(question=B.QUESTION.format(name="dog")) == (
        "USER: <image>\nIs there a dog in the image?\nASSISTANT:")


def test_tokenizer_prompt_round_trip(zoo_processor, zoo_prompt):
    tok = zoo_processor.tokenizer
    ids = tok(zoo_prompt).input_ids
    assert tok.convert_ids_to_tokens(ids) == EXPECTED_TOKENS
    assert ids[0] == tok.bos_token_id == tok.convert_tokens_to_ids("<s>")
    assert ids.count(tok.convert_tokens_to_ids("\n")) == 2
    assert tok.unk_token_id not in ids
    assert tok.convert_tokens_to_ids(tok.convert_ids_to_tokens(ids)) == ids
    # hand-worked ids: vocab is SPECIALS + WORDS in order
    vocab = {t: i for i, t in enumerate(B.SPECIALS + B.WORDS)}
    assert [i for i, t in zip(ids, EXPECTED_TOKENS) if t != "<image>"] == [
        vocab[t] for t in EXPECTED_TOKENS if t != "<image>"]
    # no special tokens requested: no BOS
    assert tok(zoo_prompt, add_special_tokens=False).input_ids == ids[1:]


def test_tokenizer_special_tokens_and_size(zoo_processor):
    tok = zoo_processor.tokenizer
    image_id = tok.convert_tokens_to_ids(B.IMAGE_TOKEN)
    pad_id = tok.pad_token_id
    assert len(tok) == len(B.SPECIALS) + len(B.WORDS) + 2
    assert {image_id, pad_id} == {len(tok) - 2, len(tok) - 1}
    assert tok.convert_ids_to_tokens([pad_id]) == ["<pad>"]
    assert tok.unk_token_id == 0 and tok.eos_token_id == 2
    assert tok.padding_side == "left"


@pytest.mark.parametrize("word", [*CLASS_NAMES, "Yes", "No", "What", "objects", "and"])
def test_every_world_word_is_one_known_token(zoo_processor, word):
    tok = zoo_processor.tokenizer
    ids = tok(word, add_special_tokens=False).input_ids
    assert len(ids) == 1 and ids[0] != tok.unk_token_id


def test_unknown_word_maps_to_unk(zoo_processor):
    tok = zoo_processor.tokenizer
    assert tok("Is there a cat", add_special_tokens=False).input_ids[-1] == tok.unk_token_id


def test_chat_template_gives_the_prompt(zoo_processor, zoo_prompt):
    messages = [{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": B.QUESTION.format(name="dog")}]}]
    text = zoo_processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == zoo_prompt


def test_left_padding_in_a_batch(zoo_processor):
    tok = zoo_processor.tokenizer
    enc = tok(["Is there a dog", "Yes"], padding=True)
    assert enc.input_ids[1][:3] == [tok.pad_token_id] * 3
    assert enc.attention_mask[1] == [0, 0, 0, 1, 1]


# --- processor -----------------------------------------------------------------------

def test_processor_expands_image_to_contiguous_patch_tokens(zoo_processor, zoo_prompt, zoo_image):
    enc = zoo_processor(text=zoo_prompt, images=zoo_image, return_tensors="pt")
    tok = zoo_processor.tokenizer
    image_id = tok.convert_tokens_to_ids(B.IMAGE_TOKEN)
    ids = enc["input_ids"][0].tolist()
    positions = [i for i, t in enumerate(ids) if t == image_id]
    assert len(positions) == N_IMAGE_TOKENS
    assert positions == list(range(3, 3 + N_IMAGE_TOKENS))  # after <s> USER :
    rest = ids[:3] + ids[3 + N_IMAGE_TOKENS:]
    assert tok.convert_ids_to_tokens(rest) == [t for t in EXPECTED_TOKENS if t != "<image>"]
    assert enc["attention_mask"].shape == enc["input_ids"].shape
    assert int(enc["attention_mask"].sum()) == len(ids)


def test_processor_pixel_values_are_clip_normalised(zoo_processor, zoo_prompt, zoo_image):
    enc = zoo_processor(text=zoo_prompt, images=zoo_image, return_tensors="pt")
    pv = enc["pixel_values"]
    assert pv.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE) and pv.dtype == torch.float32
    # 64×64 in, 64×64 out: no resampling, just rescale + CLIP mean/std
    ref = (np.asarray(zoo_image, dtype=np.float32) / 255 - np.array(OPENAI_CLIP_MEAN)) / np.array(OPENAI_CLIP_STD)
    assert torch.allclose(pv[0], torch.tensor(ref, dtype=torch.float32).permute(2, 0, 1), atol=1e-5)


def test_processor_settings_match_llava_hf(zoo_processor):
    assert isinstance(zoo_processor, LlavaProcessor)
    assert zoo_processor.patch_size == B.PATCH_SIZE == 8
    assert zoo_processor.vision_feature_select_strategy == "default"
    assert zoo_processor.num_additional_image_tokens == 1
    assert zoo_processor.image_token == B.IMAGE_TOKEN


def test_config_is_consistent_with_processor(zoo_processor, zoo_model):
    cfg = zoo_model.config
    tok = zoo_processor.tokenizer
    assert cfg.image_token_id == tok.convert_tokens_to_ids(B.IMAGE_TOKEN)
    assert cfg.image_seq_length == N_IMAGE_TOKENS
    assert cfg.text_config.vocab_size == len(tok)
    assert cfg.text_config.bos_token_id == tok.bos_token_id
    assert cfg.text_config.pad_token_id == tok.pad_token_id
    assert cfg.vision_config.image_size == IMAGE_SIZE and cfg.vision_config.patch_size == B.PATCH_SIZE
    assert cfg.vision_feature_select_strategy == zoo_processor.vision_feature_select_strategy
    assert cfg.text_config.num_hidden_layers == 4


# --- model ---------------------------------------------------------------------------

def test_forward_logits_shape_and_image_merge(zoo_processor, zoo_model, zoo_prompt, zoo_image):
    enc = zoo_processor(text=zoo_prompt, images=zoo_image, return_tensors="pt")
    seq = enc["input_ids"].shape[1]
    captured = {}
    h1 = zoo_model.model.multi_modal_projector.register_forward_hook(
        lambda m, a, out: captured.__setitem__("proj", out))
    h2 = zoo_model.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: captured.__setitem__("embeds", kw["inputs_embeds"]), with_kwargs=True)
    try:
        with torch.no_grad():
            out = zoo_model(**enc)
    finally:
        h1.remove()
        h2.remove()
    assert out.logits.shape == (1, seq, len(zoo_processor.tokenizer))
    assert torch.isfinite(out.logits).all()
    # the vision side yields exactly as many features as the processor made image tokens
    assert captured["proj"].shape == (1, N_IMAGE_TOKENS, zoo_model.config.text_config.hidden_size)
    image_id = zoo_model.config.image_token_id
    mask = enc["input_ids"][0] == image_id
    embeds = captured["embeds"][0]
    assert torch.allclose(embeds[mask], captured["proj"][0])
    text_embeds = zoo_model.get_input_embeddings()(enc["input_ids"][0][~mask])
    assert torch.equal(embeds[~mask], text_embeds)


def test_model_uses_eager_attention_with_probabilities(zoo_processor, zoo_model, zoo_prompt, zoo_image):
    assert zoo_model.config._attn_implementation == "eager"
    assert zoo_model.config.text_config._attn_implementation == "eager"
    enc = zoo_processor(text=zoo_prompt, images=zoo_image, return_tensors="pt")
    seq = enc["input_ids"].shape[1]
    with torch.no_grad():
        out = zoo_model(**enc, output_attentions=True)
    assert out.attentions is not None and len(out.attentions) == 4
    for att in out.attentions:
        assert att.shape == (1, 4, seq, seq)
        assert torch.allclose(att.sum(-1), torch.ones(1, 4, seq), atol=1e-5)
        assert (att >= 0).all()
        assert torch.all(att.triu(diagonal=1) == 0)  # causal


def test_build_model_is_seeded(zoo_processor, zoo_model):
    again = B.build_model(zoo_processor.tokenizer, seed=0)
    other = B.build_model(zoo_processor.tokenizer, seed=1)
    w = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(again.state_dict()[w], zoo_model.state_dict()[w])
    assert not torch.equal(other.state_dict()[w], zoo_model.state_dict()[w])


def test_save_and_reload_gives_identical_logits(saved_zoo_dir, zoo_processor, zoo_model, zoo_prompt,
                                               zoo_image):
    assert (saved_zoo_dir / "config.json").is_file()
    assert list(saved_zoo_dir.glob("*.safetensors"))
    assert not list(saved_zoo_dir.glob("*.bin"))
    processor = AutoProcessor.from_pretrained(saved_zoo_dir, local_files_only=True)
    model = LlavaForConditionalGeneration.from_pretrained(
        saved_zoo_dir, local_files_only=True, attn_implementation="eager").eval()
    assert isinstance(processor, LlavaProcessor)
    a = zoo_processor(text=zoo_prompt, images=zoo_image, return_tensors="pt")
    b = processor(text=zoo_prompt, images=zoo_image, return_tensors="pt")
    assert torch.equal(a["input_ids"], b["input_ids"])  # BOS + 64 image tokens survive saving
    assert torch.equal(a["pixel_values"], b["pixel_values"])
    assert processor.tokenizer.padding_side == "left"
    assert processor.chat_template == zoo_processor.chat_template
    with torch.no_grad():
        ref = zoo_model(**a).logits
        got = model(**b).logits
    assert torch.equal(ref, got)

"""mclcbf_diag.models: the adapter on the real llava-1.5-7b-hf layout (meta device, no
weights), image/answer tokens, dtype resolution and load_model's errors and round trip.

The prompt's layout as pure functions (models/tokens.py): the span check and the sink, on hand-worked layouts.

Layouts (positions, half-open spans):
* llava-hf 7B: BOS, ``USER``, ``:``, ``▁``, ``\\n``-ish prefix = 5 tokens, 576 image tokens at 5–580, the question and
  ``ASSISTANT:`` after; the decision token (the last) at 593.
* a 112-px tower: 64 image tokens at 5–68, decision at 81.
* no BOS (a Qwen2 tokenizer): 576 image tokens at 4–579, decision at 592; with 64 tokens at 4–67, decision at 80.
"""


import json
import os

import floors
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
)

from mclcbf_diag.barrier import LayerWeights
from mclcbf_diag.embedded.build import IMAGE_TOKEN, build_tokenizer
from mclcbf_diag.embedded.world import sample_scene
from mclcbf_diag.errors import UserError
from mclcbf_diag.models import (
    ADAPTERS,
    EMBEDDED,
    LLAVA,
    LoadedModel,
    answer_tokens,
    image_positions,
    load_model,
    resolve_dtype,
)
from mclcbf_diag.models.tokens import SEED_OFFSET, Sink, find_sink, span_problem

ADAPTER_PATHS = ["language_model", "layers", "rotary_emb", "final_norm", "unembed",
                 "vision_tower", "projector"]
LAYER_PATHS = ["layer_input_norm", "layer_attention", "layer_post_attention_norm", "layer_mlp",
               "layer_q_proj", "layer_k_proj", "layer_v_proj", "layer_o_proj"]
NNSIGHT_PATHS = ["layer_attention_softmax"]  # nnsight ``.source`` paths, not module paths
FLAGS = ["normed_sublayer_outputs"]  # what the layer computes, not where (Gemma 3: tests/test_models_gemma3.py)


# --- the real llava-1.5-7b-hf layout, on the meta device -----------------------------

def llava_7b_config() -> LlavaConfig:
    vision = CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=336, patch_size=14, projection_dim=768,
    )
    text = LlamaConfig(
        vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-5,
        max_position_embeddings=4096,
    )
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=32000, pad_token_id=32001,
        vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=576,
    )


@pytest.fixture(scope="module")
def meta_7b():
    with torch.device("meta"):
        return LlavaForConditionalGeneration(llava_7b_config())


def test_adapter_registry():
    assert ADAPTERS["LlavaForConditionalGeneration"] is LLAVA
    # every field is covered by the lists above (a new field needs a test)
    assert set(ADAPTER_PATHS + LAYER_PATHS + NNSIGHT_PATHS + FLAGS) == set(LLAVA.__dataclass_fields__)
    assert not LLAVA.normed_sublayer_outputs and ADAPTERS["Gemma3ForConditionalGeneration"].normed_sublayer_outputs




def test_adapter_layer_weights_reproduce_the_layer_keys(embedded_model):
    """The adapter's norm, projections and rotary give the keys the layer itself caches."""
    from mclcbf_diag.models.projection import project_keys

    lm = embedded_model
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    language_model = lm.model.get_submodule(lm.adapter.language_model)
    with torch.no_grad():
        out = language_model(input_ids=ids, use_cache=True, output_hidden_states=True)
        cos, sin = language_model.rotary_emb(out.hidden_states[2], torch.arange(5)[None])
    cache = lm.adapter.output_cache(language_model, out)
    keys = project_keys(out.hidden_states[2][0], lm.layer_weights(2), cos[0], sin[0])
    # from the same state: the norm, projection and RoPE of one layer (floors.state_floor after 1 layer)
    want = cache.layers[2].keys[0]
    torch.testing.assert_close(keys, want, rtol=0, atol=floors.state_floor(want, 1))
    assert lm.adapter.norm_eps(lm.adapter.layer_part(lm.model, 0, "layer_input_norm")) == lm.text_config.rms_norm_eps


def test_adapter_paths_resolve_on_llava_7b(meta_7b):
    for field in ADAPTER_PATHS:
        assert isinstance(meta_7b.get_submodule(getattr(LLAVA, field)), torch.nn.Module), field
    layer = meta_7b.get_submodule(LLAVA.layers)[0]
    for field in LAYER_PATHS:
        assert isinstance(layer.get_submodule(getattr(LLAVA, field)), torch.nn.Module), field
        assert LLAVA.layer_part(meta_7b, 31, field) is meta_7b.get_submodule(LLAVA.layers)[31].get_submodule(
            getattr(LLAVA, field))
    assert LLAVA.get(meta_7b, LLAVA.projector) is meta_7b.model.multi_modal_projector


def test_adapter_points_at_the_right_modules_on_llava_7b(meta_7b):
    layers = LLAVA.decoder_layers(meta_7b)
    assert isinstance(layers, torch.nn.ModuleList) and len(layers) == 32
    assert layers is meta_7b.model.language_model.layers
    for part in ("layer_q_proj", "layer_k_proj", "layer_v_proj", "layer_o_proj"):
        assert LLAVA.layer_part(meta_7b, 10, part).weight.shape == (4096, 4096)
    norm = LLAVA.layer_part(meta_7b, 10, "layer_input_norm")
    assert norm.weight.shape == (4096,) and norm.variance_epsilon == 1e-5
    assert LLAVA.layer_part(meta_7b, 10, "layer_post_attention_norm") is layers[10].post_attention_layernorm
    assert LLAVA.layer_part(meta_7b, 10, "layer_mlp").gate_proj.weight.shape == (11008, 4096)
    assert meta_7b.get_submodule(LLAVA.unembed).weight.shape == (32064, 4096)
    assert meta_7b.get_submodule(LLAVA.final_norm).weight.shape == (4096,)
    rotary = meta_7b.get_submodule(LLAVA.rotary_emb)
    assert "Rotary" in type(rotary).__name__
    attn = LLAVA.layer_part(meta_7b, 10, "layer_attention")
    assert attn.scaling == 128 ** -0.5
    assert meta_7b.get_submodule(LLAVA.vision_tower).config.hidden_size == 1024
    assert meta_7b.get_submodule(LLAVA.projector).linear_1.weight.shape == (4096, 1024)
    assert meta_7b.get_submodule(LLAVA.language_model) is meta_7b.model.language_model


def test_layer_weights_on_llava_7b(meta_7b):
    lm = LoadedModel(meta_7b, processor=None, adapter=LLAVA, tokens=None, source="meta")
    assert lm.n_layers == 32
    w = lm.layer_weights(10)
    assert isinstance(w, LayerWeights)
    assert w.ln_weight.shape == (4096,) and w.ln_eps == 1e-5
    assert w.q_weight.shape == (4096, 4096) and w.k_weight.shape == (4096, 4096)
    assert w.q_bias is None and w.k_bias is None  # Llama has no attention bias
    assert (w.n_heads, w.n_kv_heads, w.head_dim) == (32, 32, 128)
    assert w.scaling == pytest.approx(128 ** -0.5)
    assert w.q_weight.device.type == "meta"
    assert not w.q_weight.requires_grad


def test_layer_weights_with_grouped_query_attention():
    """n_kv_heads differs from n_heads: k_weight is [KV*hd, d] and the config's count is used."""
    cfg = llava_7b_config()
    cfg.text_config.num_key_value_heads = 8
    cfg.text_config.num_hidden_layers = 2
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(cfg)
    w = LoadedModel(model, None, LLAVA, None, "meta").layer_weights(1)
    assert w.k_weight.shape == (8 * 128, 4096) and w.q_weight.shape == (4096, 4096)
    assert (w.n_heads, w.n_kv_heads, w.head_dim) == (32, 8, 128)


def test_softmax_path_gives_the_attention_probabilities(tiny_processor, tiny_model, tiny_prompt,
                                                        tiny_image):
    """The nnsight path reaches the eager softmax: its output is output_attentions' tensor."""
    from functools import reduce

    import nnsight

    enc = tiny_processor(text=tiny_prompt, images=tiny_image, return_tensors="pt")
    traced = nnsight.NNsight(tiny_model)
    with torch.no_grad(), traced.trace(**enc, output_attentions=True):
        layer = reduce(getattr, LLAVA.layers.split("."), traced)[2]
        probs = reduce(getattr, LLAVA.layer_attention_softmax.split("."), layer).output.save()
        out = traced.output.save()
    assert probs.shape == out.attentions[2].shape
    assert torch.equal(probs, out.attentions[2])  # exact: the softmax's output is the tensor HF returns


# --- image positions -----------------------------------------------------------------

def test_image_positions_llava_prompt_layout():
    # "<s> USER : ▁" then 576 image tokens, then the question
    ids = [1, 3148, 1001, 29901, 29871] + [32000] * 576 + [29871, 13, 3624, 727, 263, 11203, 29973]
    for shape in ((-1,), (1, -1)):
        pos = image_positions(torch.tensor(ids).reshape(shape), 32000)
        assert pos.tolist() == list(range(5, 581))
        assert len(pos) == 576 and pos[0] == 5 and pos[-1] == 580


def test_image_positions_missing_image_token():
    with pytest.raises(UserError, match="32000"):
        image_positions(torch.tensor([1, 3148, 1001, 29901]), 32000)


# --- answer tokens -------------------------------------------------------------------

def word_level_tokenizer(words, metaspace=False):
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", *words])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    if metaspace:  # SentencePiece-like: "▁" marks a preceding space
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


def test_answer_tokens_on_the_embedded_tokenizer():
    tok = build_tokenizer()
    vocab = tok.get_vocab()
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    t = answer_tokens(tok, image_id, "embedded")
    assert t.image_token_id == image_id
    assert t.yes_id == vocab["▁Yes"] and t.no_id == vocab["▁No"]  # word-start pieces, as in Llama-2
    assert t.yes_id != t.no_id
    assert t.yes_variants == {v: vocab[v] for v in ("▁Yes", "Yes", "▁yes", "yes", "▁YES")}
    assert t.no_variants == {v: vocab[v] for v in ("▁No", "No", "▁no", "no", "▁NO")}
    # the id really is what follows "ASSISTANT:" in the prompt
    assert tok("ASSISTANT: Yes", add_special_tokens=False).input_ids[-1] == t.yes_id


def test_answer_tokens_sentencepiece_like_vocabulary():
    """Llama-style vocab: the answer after "ASSISTANT:" is "▁Yes", not the bare "Yes"."""
    tok = word_level_tokenizer(["▁ASSISTANT:", "▁Yes", "▁No", "Yes", "no", "<image>"], metaspace=True)
    vocab = tok.get_vocab()
    assert tok.convert_ids_to_tokens(tok("ASSISTANT: Yes", add_special_tokens=False).input_ids) == [
        "▁ASSISTANT:", "▁Yes"]
    t = answer_tokens(tok, vocab["<image>"], "sp")
    assert t.yes_id == vocab["▁Yes"] and t.no_id == vocab["▁No"]
    assert t.yes_variants == {"▁Yes": vocab["▁Yes"], "Yes": vocab["Yes"]}
    assert t.no_variants == {"▁No": vocab["▁No"], "no": vocab["no"]}


@pytest.mark.parametrize("image_id", [None, 9999])
def test_answer_tokens_without_image_token(image_id):
    tok = word_level_tokenizer(["ASSISTANT", ":", "Yes", "No"])  # no <image> at all
    with pytest.raises(UserError, match="image token") as info:
        answer_tokens(tok, image_id, "somewhere/model")
    assert "somewhere/model" in str(info.value)


def test_answer_tokens_image_id_must_be_the_tokenizers():
    tok = build_tokenizer()
    with pytest.raises(UserError):
        answer_tokens(tok, len(tok) + 5, "x")


def test_answer_tokens_without_yes():
    tok = word_level_tokenizer(["ASSISTANT", ":", "No", "<image>"])
    with pytest.raises(UserError, match="'Yes'"):
        answer_tokens(tok, tok.get_vocab()["<image>"], "x")


# --- dtype ---------------------------------------------------------------------------

def test_resolve_dtype():
    assert resolve_dtype("float32", "cpu") is torch.float32
    assert resolve_dtype("bfloat16", "cpu") is torch.bfloat16
    assert resolve_dtype("float16", "cuda") is torch.float16
    assert resolve_dtype("float16", "cuda:1") is torch.float16


@pytest.mark.parametrize("device", ["cpu", "cpu:0"])
def test_resolve_dtype_float16_on_cpu(device):
    with pytest.raises(UserError, match="float32"):
        resolve_dtype("float16", device)


@pytest.mark.parametrize("name", ["fp16", "float64", "", "Float32"])
def test_resolve_dtype_unknown(name):
    with pytest.raises(UserError, match="float32") as info:
        resolve_dtype(name, "cpu")
    assert repr(name) in str(info.value)


# --- load_model errors ---------------------------------------------------------------

def test_load_model_missing_directory(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(UserError, match="no such directory") as info:
        load_model(str(missing))
    assert str(missing) in str(info.value)


def test_load_model_missing_relative_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="no_such_dir"):
        load_model("no_such_dir")


def test_load_model_directory_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="config.json") as info:
        load_model(str(tmp_path))
    assert str(tmp_path) in str(info.value)


def test_load_model_directory_without_safetensors(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")  # .bin is never read
    with pytest.raises(UserError, match="safetensors") as info:
        load_model(str(tmp_path))
    assert str(tmp_path) in str(info.value)


def test_load_model_hub_id_not_in_cache(tmp_path, monkeypatch):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    monkeypatch.chdir(tmp_path)  # so "nobody/not-a-model" is not a local path
    with pytest.raises(UserError, match="cache") as info:
        load_model("nobody/not-a-model")
    assert "nobody/not-a-model" in str(info.value)
    assert "\n" not in str(info.value)


def test_load_model_float16_on_cpu_fails_before_loading(tmp_path):
    with pytest.raises(UserError, match="float32"):
        load_model(str(tmp_path / "missing"), dtype="float16", device="cpu")


def test_load_model_path_is_a_file(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"")
    with pytest.raises(UserError, match="config.json"):
        load_model(str(f))


def test_load_model_truncated_safetensors(tmp_path, saved_tiny_dir):
    import shutil

    for f in saved_tiny_dir.iterdir():
        shutil.copy(f, tmp_path / f.name)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # an interrupted download
    with pytest.raises(UserError, match=str(tmp_path)):
        load_model(str(tmp_path))


def test_load_model_rejects_a_non_llava_checkpoint(tmp_path, monkeypatch, tiny_processor):
    tiny_processor.save_pretrained(tmp_path)  # a valid processor, so only the model is wrong
    LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=2, vocab_size=len(tiny_processor.tokenizer)
                ).to_json_file(tmp_path / "config.json")
    (tmp_path / "model.safetensors").write_bytes(b"never read")
    called = []

    def refuse(cls, *args, **kwargs):  # never let the test allocate the default 7B model
        called.append(args)
        raise RuntimeError("from_pretrained reached with a non-LLaVA config")

    monkeypatch.setattr(LlavaForConditionalGeneration, "from_pretrained", classmethod(refuse))
    with pytest.raises(UserError):
        load_model(str(tmp_path))
    assert not called


# --- load_model on a saved tiny model ------------------------------------------------

@pytest.fixture(scope="module")
def loaded(saved_tiny_dir):
    return load_model(str(saved_tiny_dir))


def test_load_model_saved_tiny_model(loaded, saved_tiny_dir, tiny_processor, tiny_model):
    assert isinstance(loaded, LoadedModel)
    assert loaded.source == str(saved_tiny_dir)
    assert loaded.n_layers == 4
    assert loaded.adapter is LLAVA
    assert loaded.dtype == torch.float32 and loaded.device.type == "cpu"
    assert not loaded.model.training
    assert loaded.model.config._attn_implementation == "eager"
    image_id = tiny_processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert loaded.tokens.image_token_id == image_id == tiny_model.config.image_token_id
    vocab = tiny_processor.tokenizer.get_vocab()
    assert (loaded.tokens.yes_id, loaded.tokens.no_id) == (vocab["▁Yes"], vocab["▁No"])
    # weights survived the round trip
    ref = tiny_model.state_dict()
    for name, tensor in loaded.model.state_dict().items():
        assert torch.equal(tensor, ref[name]), name


def test_loaded_layer_weights_are_the_module_weights(loaded):
    layer = loaded.model.model.language_model.layers[1]
    w = loaded.layer_weights(1)
    assert torch.equal(w.ln_weight, layer.input_layernorm.weight)
    assert torch.equal(w.q_weight, layer.self_attn.q_proj.weight)
    assert torch.equal(w.k_weight, layer.self_attn.k_proj.weight)
    assert w.q_weight.data_ptr() == layer.self_attn.q_proj.weight.data_ptr()  # a view, no copy
    assert w.ln_eps == 1e-5
    assert (w.n_heads, w.n_kv_heads, w.head_dim) == (4, 4, 32)
    assert w.scaling == pytest.approx(32 ** -0.5)
    assert torch.equal(loaded.unembed_weight(), loaded.model.lm_head.weight)
    assert loaded.final_norm() is loaded.model.model.language_model.norm


def test_loaded_inputs_and_forward_match_the_original(loaded, tiny_model, tiny_processor, tiny_prompt,
                                                      tiny_image):
    enc = loaded.inputs(tiny_prompt, tiny_image)
    ref = tiny_processor(text=tiny_prompt, images=tiny_image, return_tensors="pt")
    assert torch.equal(enc["input_ids"], ref["input_ids"])
    pos = image_positions(enc["input_ids"], loaded.tokens.image_token_id)
    assert pos.tolist() == list(range(5, 581))  # llava-hf's layout
    with torch.no_grad():  # exact: the same weights, inputs and kernels
        assert torch.equal(loaded.model(**enc).logits, tiny_model(**ref).logits)


def test_shipped_model_loads_offline_and_survives_a_save_load_round_trip(embedded_model, tmp_path):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    lm = embedded_model
    assert lm.source == str(EMBEDDED)
    assert lm.model.config._attn_implementation == "eager"
    assert not any(p.is_meta for p in lm.model.parameters())
    prompt, image = "USER: <image>\nIs there a kite in the image?\nASSISTANT:", sample_scene(7, 1).image()
    inputs = lm.inputs(prompt, image)
    lm.model.save_pretrained(tmp_path)
    lm.processor.save_pretrained(tmp_path)
    again = load_model(str(tmp_path))
    with torch.no_grad():
        a = lm.model(**inputs).logits
        b = again.model(**again.inputs(prompt, image)).logits
    assert torch.equal(a, b)  # exact: the same weights, inputs and kernels


def test_cache_keyword_follows_the_installed_signature():
    """Old and new transformers name the KV cache differently; the adapter asks the signature."""
    from mclcbf_diag.models.adapter import cache_keyword

    class New(torch.nn.Module):
        def forward(self, hidden_states, cache=None, **kwargs):
            return hidden_states

    class Old(torch.nn.Module):
        def forward(self, hidden_states, past_key_values=None, **kwargs):
            return hidden_states

    class Neither(torch.nn.Module):
        def forward(self, hidden_states):
            return hidden_states

    assert cache_keyword(New()) == "cache"
    assert cache_keyword(Old()) == "past_key_values"
    with pytest.raises(TypeError, match="no KV cache argument"):
        cache_keyword(Neither())


def test_adapter_reads_the_cache_the_model_was_given(embedded_model):
    """A real forward with use_cache: the adapter finds the returned cache without deprecated names."""
    import inspect

    lm = embedded_model
    layer = lm.adapter.decoder_layers(lm.model)[0]
    name = lm.adapter.cache_kwargs(lm.model, None).popitem()[0]
    assert name in inspect.signature(type(lm.model).forward).parameters
    assert name in inspect.signature(type(layer).forward).parameters
    ids = torch.tensor([[1, 5, 6, 7]])
    language_model = lm.model.get_submodule(lm.adapter.language_model)
    with torch.no_grad():
        out = language_model(input_ids=ids, use_cache=True)
    cache = lm.adapter.output_cache(language_model, out)
    assert cache.layers[0].keys.shape[-2] == 4
    assert lm.adapter.layer_cache(lm.model, {name: cache}) is cache


# ------------------------------------------------------------ the prompt's layout: span check and sink
SEED = (1, 577)


def image(first: int, n: int) -> list[int]:
    return list(range(first, first + n))


def test_the_seed_span_on_llava_hf_is_the_known_offset_and_the_detected_span_is_clean():
    assert SEED_OFFSET == 4
    assert span_problem(SEED, image(5, 576), 593) is None  # covers 1–4, misses 577–580: the known offset
    assert span_problem((5, 581), image(5, 576), 593) is None
    assert span_problem(SEED, torch.tensor(image(5, 576)), 593) is None  # a tensor of positions works alike


def test_a_span_covering_more_prefix_or_missing_more_image_tokens_is_named():
    line = span_problem((0, 581), image(5, 576), 593)
    assert line.startswith("the configured image span [0, 581) covers 5 non-image tokens (0–4), more than the "
                           "seed's known 4-token offset; the detected image tokens are 5–580")
    assert line.endswith("use the detected span (span=detected) or set fixed_span to the detected tokens")
    line = span_problem((1, 570), image(5, 576), 593)
    assert "misses 11 of the 576 image tokens (570–580)" in line and "\n" not in line


def test_the_seed_span_on_a_112_px_tower_covers_the_question_and_the_decision_token():
    line = span_problem(SEED, image(5, 64), 81)
    assert line.startswith("the configured image span [1, 577) covers the decision token (position 81) and 16 other "
                           "non-image tokens (1–4, 69–80); the detected image tokens are 5–68: use the detected span")


def test_no_bos_layouts():
    # 576 tokens one earlier: covers 1–3, misses 577–579, inside the known offset
    assert span_problem(SEED, image(4, 576), 592) is None
    line = span_problem(SEED, image(4, 64), 80)
    assert "covers the decision token (position 80) and 15 other non-image tokens (1–3, 68–79)" in line
    assert "no image token was detected" in span_problem(SEED, [], 20)


def test_the_sink_is_the_bos_where_there_is_one():
    ids = torch.tensor([[1, 7, 8, 9, 9, 9, 10]])
    rows = torch.zeros(2, 3, 7)
    rows[..., 2] = 1.0  # even where another key takes more attention
    assert find_sink(ids, 1, rows) == Sink(0, "BOS")
    assert str(find_sink(ids, 1)) == "BOS (position 0)"


def test_without_a_bos_the_sink_is_measured_and_excludes_image_tokens_and_the_decision_token():
    ids = torch.tensor([7, 8, 9, 9, 9, 10, 11])  # USER : <image>×3 question decision
    mask = ids == 9
    rows = torch.tensor([[[0.10, 0.05, 0.30, 0.20, 0.10, 0.05, 0.20]],
                         [[0.30, 0.05, 0.20, 0.10, 0.10, 0.05, 0.20]]])  # [layers, heads, seq]
    # means: 0.20, 0.05, (image), (image), (image), 0.05, (decision 0.20): position 0 wins over the image keys
    assert find_sink(ids, 1, rows, mask) == Sink(0, "measured sink")
    rows[:, :, 1] = 0.26
    assert find_sink(ids, 1, rows, mask) == Sink(1, "measured sink")
    assert find_sink(ids, None, rows, mask).kind == "measured sink"  # a tokenizer with no BOS at all
    with pytest.raises(ValueError, match="measure the sink"):
        find_sink(ids, None)

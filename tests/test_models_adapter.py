"""The architecture adapter (mclcbf_diag.models.adapter) on a tiny random LLaVA, against the HF modules.

Paths on LLaVA-1.5-7B's layout and the KV-cache keyword are in tests/test_models.py.

Every accepted text backbone (below the tiny GQA model's tests): the look-ahead is exact (#32 item 1), and the sink
is measured where there is no BOS.

For each text model a LLaVA checkpoint may carry (Llama, Mistral with a sliding window, Qwen2 without a BOS and with
a sliding layer, Qwen3 with q/k norms, Gemma with its ``1 + w`` norm), a tiny random checkpoint is built here from
transformers' own config classes (2 layers, hidden 64, a 112-px CLIP tower: 64 image tokens), saved and loaded the way
users load one. Its norm weights are drawn away from their initial values, so a look-ahead that skipped a norm, its
offset or the window would disagree. References are a plain transformers forward (``output_attentions``, the KV cache,
the logits), never the toolkit's own code path.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tokenizers.processors import TemplateProcessing
from transformers import (
    CLIPVisionConfig,
    GemmaConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)
from transformers.models.clip import CLIPImageProcessorPil

from mclcbf_diag.batch import batch_inputs
from mclcbf_diag.data import build_prompt
from mclcbf_diag.embedded.build import CHAT_TEMPLATE, IMAGE_TOKEN, PROMPT, QUESTION, build_tokenizer, padded_vocab_size
from mclcbf_diag.embedded.world import sample_scene
from mclcbf_diag.models import load_model
from mclcbf_diag.models.adapter import LLAVA, ArchitectureAdapter, sequence_inputs
from mclcbf_diag.models.projection import attention_rows, project_keys, project_queries


@pytest.fixture(scope="module")
def lm(tiny_gqa_model):
    return tiny_gqa_model


def test_paths_name_the_hf_modules(lm):
    m = lm.model
    layer = m.model.language_model.layers[2]
    assert LLAVA.decoder_layers(m) is m.model.language_model.layers
    for part, module in (("layer_input_norm", layer.input_layernorm), ("layer_attention", layer.self_attn),
                         ("layer_post_attention_norm", layer.post_attention_layernorm), ("layer_mlp", layer.mlp),
                         ("layer_q_proj", layer.self_attn.q_proj), ("layer_k_proj", layer.self_attn.k_proj),
                         ("layer_v_proj", layer.self_attn.v_proj), ("layer_o_proj", layer.self_attn.o_proj)):
        assert LLAVA.layer_part(m, 2, part) is module, part
    assert LLAVA.get(m, LLAVA.final_norm) is m.model.language_model.norm
    assert LLAVA.get(m, LLAVA.unembed) is m.lm_head


def test_layer_weights_norm_equals_the_hf_input_norm(lm):
    w = LLAVA.layer_weights(lm.model, 1)
    layer = lm.model.model.language_model.layers[1]
    x = 4 * torch.randn(3, lm.text_config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(w.norm(x), layer.input_layernorm(x), atol=1e-6, rtol=0)
    cfg = lm.text_config
    assert (w.n_heads, w.n_kv_heads, w.head_dim) == (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
    assert w.scaling == pytest.approx(cfg.head_dim ** -0.5) and w.norm_kind == "rms"


def test_norm_eps_reads_whichever_attribute_the_norm_has(lm):
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    rms = lm.model.model.language_model.norm
    assert LLAVA.norm_eps(rms) == rms.variance_epsilon
    assert LLAVA.norm_eps(torch.nn.LayerNorm(8, eps=3e-4)) == pytest.approx(3e-4)
    assert LLAVA.norm_eps(GemmaRMSNorm(8, eps=2e-6)) == pytest.approx(2e-6)  # .eps, no .variance_epsilon
    with pytest.raises(AttributeError, match="no epsilon attribute"):
        LLAVA.norm_eps(torch.nn.Linear(2, 2))


def test_the_per_position_inputs_kept_sliced_and_extended_by_hand():
    """sequence_inputs: Gemma 3's token_type_ids (2 rows, an image at positions 1–2 of row 0 and 2–3 of row 1) kept
    whole, of some rows, from a position on and with generated text appended; nothing for a family without them."""
    types = torch.tensor([[0, 1, 1, 0, 0], [0, 0, 1, 1, 0]])
    inputs = {"input_ids": torch.zeros(2, 5, dtype=torch.long), "token_type_ids": types}
    assert sequence_inputs(inputs)["token_type_ids"] is types
    assert sequence_inputs(inputs, rows=[1])["token_type_ids"].tolist() == [[0, 0, 1, 1, 0]]
    assert sequence_inputs(inputs, rows=torch.tensor([1, 0]), start=3)["token_type_ids"].tolist() == [[1, 0], [0, 0]]
    grown = sequence_inputs(inputs, extend=2)["token_type_ids"]
    assert grown.tolist() == [[0, 1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0, 0]] and grown.dtype == types.dtype
    assert sequence_inputs({"input_ids": inputs["input_ids"], "attention_mask": torch.ones(2, 5)}) == {}


def test_the_adapter_needs_no_processor_extras(lm):
    """LLaVA's processor returns one fixed-shape image per prompt and nothing else per image: exactly what
    batch_inputs batches (its de-duplication flattens pixel_values), so the adapter names no extras."""
    assert "processor_extras" not in {f.name for f in dataclasses.fields(ArchitectureAdapter)}
    images = [sample_scene(i, 2).image() for i in range(2)]
    enc = lm.processor(text=[build_prompt("dog?")] * 2, images=images, return_tensors="pt", padding="longest")
    assert set(enc) == {"input_ids", "attention_mask", "pixel_values"}
    assert enc["pixel_values"].shape[0] == 2 and enc["pixel_values"].dim() == 4  # [images, C, H, W]
    assert set(batch_inputs(lm, [build_prompt("dog?")] * 2, images, share_images=False)) == \
        {"input_ids", "attention_mask", "pixel_values", "position_ids"}


# ----------------------------------------------------------------------------- every accepted text backbone
TOL = 1e-5  # float32, two routes to one quantity on a 2-layer model
IMAGE_PX, PATCH = 112, 14  # 64 image tokens
TEXT = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, max_position_embeddings=512, tie_word_embeddings=False)
BACKBONES = {
    "llama": (LlamaConfig, {}),
    "mistral": (MistralConfig, {"sliding_window": 24}),  # shorter than the prompt: the window hides keys
    "qwen2": (Qwen2Config, {"use_sliding_window": True, "sliding_window": 24, "max_window_layers": 1}),
    "qwen3": (Qwen3Config, {}),
    "gemma": (GemmaConfig, {}),
}
NO_BOS = {"qwen2"}  # Qwen2 tokenizers add no BOS: position 0 is "USER"


def tiny_processor(bos: bool, image_token: str = IMAGE_TOKEN) -> LlavaProcessor:
    """The embedded model's tokenizer and chat template, a 112-px CLIP preprocessing; without a BOS if asked, with
    another image placeholder if asked (a new special token)."""
    tok = build_tokenizer()
    if not bos:
        tok.backend_tokenizer.post_processor = TemplateProcessing(single="$A", pair="$A $B", special_tokens=[])
        tok.add_bos_token = False
    if image_token != IMAGE_TOKEN:
        tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN, image_token]})
    image = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_PX}, crop_size={"height": IMAGE_PX, "width": IMAGE_PX},
                                  do_center_crop=True, do_resize=True, do_normalize=True, do_convert_rgb=True)
    return LlavaProcessor(image_processor=image, tokenizer=tok, patch_size=PATCH, chat_template=CHAT_TEMPLATE,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          image_token=image_token)


def tiny_checkpoint(backbone: str, folder, seed: int = 0, image_token: str = IMAGE_TOKEN, **text) -> str:
    """A random LLaVA whose text model is ``backbone``, saved (safetensors) with its processor in ``folder``; ``text``
    overrides fields of the text config (``use_sliding_window=False``)."""
    processor = tiny_processor(bos=backbone not in NO_BOS, image_token=image_token)
    tok = processor.tokenizer
    cls, extra = BACKBONES[backbone]
    extra = {**extra, **text}
    text = cls(vocab_size=padded_vocab_size(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id, **TEXT, **extra)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=IMAGE_PX, patch_size=PATCH, projection_dim=32)
    config = LlavaConfig(vision_config=vision, text_config=text, image_seq_length=(IMAGE_PX // PATCH) ** 2,
                         image_token_index=tok.convert_tokens_to_ids(image_token), vision_feature_layer=-2,
                         vision_feature_select_strategy="default", pad_token_id=tok.pad_token_id,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    with torch.no_grad():  # norms away from their initial 1 (or Gemma's 0): a skipped norm or offset shows
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(torch.randn_like(p) * 0.5 + (0.0 if backbone == "gemma" else 1.0))
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module", params=list(BACKBONES))
def family_lm(request, tmp_path_factory):
    return load_model(tiny_checkpoint(request.param, tmp_path_factory.mktemp(request.param)))


@pytest.fixture(scope="module")
def family_forward(family_lm):
    """A plain transformers family_forward: attentions, hidden states, logits, the cache, and each layer's output."""
    prompt = PROMPT.format(question=QUESTION.format(name="dog"))
    inputs = family_lm.inputs(prompt, sample_scene(3, 1).image())
    outputs: dict[int, torch.Tensor] = {}
    hooks = [layer.register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, out.detach()))
             for i, layer in enumerate(family_lm.adapter.decoder_layers(family_lm.model))]
    try:
        with torch.no_grad():
            out = family_lm.model(**inputs, output_attentions=True, output_hidden_states=True, use_cache=True)
    finally:
        for hook in hooks:
            hook.remove()
    return inputs, out, outputs


def test_the_look_ahead_equals_the_layers_own_attention(family_lm, family_forward):
    """Keys, every head's decision-token row and the image mass h: the look-ahead's against the layer's own."""
    inputs, out, _ = family_forward
    ids = inputs["input_ids"][0]
    image, last = ids == family_lm.tokens.image_token_id, len(ids) - 1
    language_model = family_lm.model.get_submodule(family_lm.adapter.language_model)
    cache = family_lm.adapter.output_cache(language_model, out)
    for i in range(family_lm.n_layers):
        x = out.hidden_states[i][0]
        with torch.no_grad():
            cos, sin = language_model.rotary_emb(x[None], torch.arange(len(ids))[None])
            w = family_lm.layer_weights(i)
            keys = project_keys(x, w, cos[0], sin[0])
            rows = attention_rows(project_queries(x[-1:], w, cos[0, -1:], sin[0, -1:]), keys, w, [last])[:, 0]
        cached = cache.layers[i].keys[0]  # a sliding-window layer caches only its last window − 1 keys
        torch.testing.assert_close(keys[:, -cached.shape[1]:], cached, rtol=0, atol=TOL)
        want = out.attentions[i][0, :, -1]
        torch.testing.assert_close(rows, want, rtol=0, atol=TOL)
        h, measured = float(rows[:, image].sum(-1).mean()), float(want[:, image].sum(-1).mean())
        assert h == pytest.approx(measured, rel=0, abs=TOL)


def test_llama_math_would_miss_on_the_other_backbones(family_lm, family_forward):
    """The declared differences matter here: Llama's math (no q/k norm, no offset, no window) gives another row."""
    inputs, out, _ = family_forward
    backbone = family_lm.text_config.model_type
    if backbone == "llama":
        pytest.skip("Llama's math is the declared one")
    ids = inputs["input_ids"][0]
    language_model = family_lm.model.get_submodule(family_lm.adapter.language_model)
    i = family_lm.n_layers - 1  # Qwen2's sliding layer is the last
    x = out.hidden_states[i][0]
    with torch.no_grad():
        cos, sin = language_model.rotary_emb(x[None], torch.arange(len(ids))[None])
        w = family_lm.layer_weights(i)
        llama = dataclasses.replace(w, norm_kind="rms", q_norm_weight=None, k_norm_weight=None, window=None)
        if backbone == "gemma":
            llama = dataclasses.replace(llama, ln_weight=w.ln_weight, ln_eps=w.ln_eps)
        rows = attention_rows(project_queries(x[-1:], llama, cos[0, -1:], sin[0, -1:]),
                              project_keys(x, llama, cos[0], sin[0]), llama, [len(ids) - 1])[:, 0]
    assert float((rows - out.attentions[i][0, :, -1]).abs().max()) > 100 * TOL


def test_final_norm_and_unembedding_give_the_logits(family_lm, family_forward):
    """The adapter's final norm (Gemma's 1 + w, its ``eps``) through lm_head equals the model's last logits."""
    _, out, outputs = family_forward
    x = outputs[family_lm.n_layers - 1][0, -1]
    norm = family_lm.final_norm()
    with torch.no_grad():
        y = family_lm.adapter.apply_norm(family_lm.model, norm, x)
        torch.testing.assert_close(y, norm(x), rtol=0, atol=TOL)
        gain = family_lm.adapter.norm_gain(family_lm.model, norm)
        manual = x.float() * torch.rsqrt(x.float().pow(2).mean() + family_lm.adapter.norm_eps(norm)) * gain
        torch.testing.assert_close(manual, norm(x), rtol=0, atol=TOL)
        logits = y @ family_lm.unembed_weight().T
    torch.testing.assert_close(logits, out.logits[0, -1], rtol=0, atol=TOL * float(out.logits.abs().max()))


@pytest.fixture(scope="module")
def family_traced(family_lm):
    from mclcbf_diag import barrier as B
    from mclcbf_diag.experiments.trace import trace_sample

    config = dataclasses.replace(B.get_preset("seed-exp6"), span="detected", tau_prefill=0.99, layers=[0, 1])
    return trace_sample(family_lm, QUESTION.format(name="dog"), sample_scene(3, 1).image(), config)


def _baseline(family_traced, metric: str) -> dict[int, float]:
    r = family_traced.records
    r = r[(r.metric == metric) & (r.condition == "baseline") & (r["head"] == -1) & (r.phase == "prefill")]
    return dict(zip(r.layer, r.value))


def test_the_trace_records_h_equal_to_the_measured_mass(family_lm, family_traced, family_forward):
    """The barrier's h (its look-ahead) and the image mass the model realised, per layer, as `trace` records them."""
    inputs, out, _ = family_forward
    h, mass = _baseline(family_traced, "barrier_h"), _baseline(family_traced, "attn_image_mass")
    image = inputs["input_ids"][0] == family_lm.tokens.image_token_id
    for i in range(family_lm.n_layers):
        want = float(out.attentions[i][0, :, -1, image].sum(-1).mean())
        assert h[i] == pytest.approx(want, rel=0, abs=TOL) and mass[i] == pytest.approx(want, rel=0, abs=TOL)


def test_the_look_ahead_is_compared_with_the_mass_it_predicts(family_lm, family_traced, family_forward):
    """Every backbone (Qwen3's q/k norms included): the recorded look-ahead miss is within its float32 floor of 0,
    so no warning; the miss is the model's own mass (a plain forward's) minus h."""
    inputs, out, _ = family_forward
    image = inputs["input_ids"][0] == family_lm.tokens.image_token_id
    h, miss = _baseline(family_traced, "barrier_h"), _baseline(family_traced, "lookahead_miss")
    floor = _baseline(family_traced, "lookahead_miss_floor")
    for i in range(family_lm.n_layers):
        want = float(out.attentions[i][0, :, -1, image].sum(-1).mean())
        assert miss[i] == pytest.approx(want - h[i], rel=0, abs=TOL) and abs(miss[i]) <= floor[i] < 1e-6
    summary = family_traced.summary()
    assert "lookahead_miss_layers" not in summary
    assert not any("warning" in line for line in family_traced.intervention.summary_lines(summary))


def test_the_look_ahead_check_compares_the_same_targets(family_lm):
    """With every text token after the image as a target, h is the mean over them: so is the mass it is compared
    with (not the decision token's alone), and nothing is flagged."""
    from mclcbf_diag import barrier as B
    from mclcbf_diag.experiments.trace import trace_sample

    if family_lm.text_config.model_type != "llama":
        pytest.skip("one backbone is enough")
    config = dataclasses.replace(B.get_preset("seed-exp6"), span="detected", tokens="after_image", tau_prefill=0.99,
                                 layers=[0, 1])
    result = trace_sample(family_lm, QUESTION.format(name="dog"), sample_scene(3, 1).image(), config)
    miss, floor = _baseline(result, "lookahead_miss"), _baseline(result, "lookahead_miss_floor")
    assert all(abs(miss[i]) <= floor[i] for i in range(family_lm.n_layers))
    assert "lookahead_miss_layers" not in result.summary()


def test_a_look_ahead_that_misses_is_printed_and_paged(family_lm, monkeypatch):
    """A look-ahead given other query weights than the layer's (a planted miss: layer 1's rows rolled by one, which
    Qwen3's per-head q norm does not undo as it would a scale) computes another h: the run says so on screen and on
    the page, at the layer where it happened."""
    from mclcbf_diag import barrier as B
    from mclcbf_diag.experiments.trace import trace_sample
    from mclcbf_diag.report.pages import headline

    if family_lm.text_config.model_type != "qwen3":
        pytest.skip("one backbone is enough: the check is the intervention's, not the backbone's")
    real = family_lm.layer_weights
    monkeypatch.setattr(family_lm, "layer_weights", lambda i: dataclasses.replace(
        real(i), q_weight=real(i).q_weight.roll(i, dims=0)))
    config = dataclasses.replace(B.get_preset("seed-exp6"), span="detected", tau_prefill=0.99, layers=[0, 1])
    result = trace_sample(family_lm, QUESTION.format(name="dog"), sample_scene(3, 1).image(), config)
    miss = _baseline(result, "lookahead_miss")
    assert abs(miss[1]) > 1e-3 and abs(miss[0]) < 1e-6
    summary = result.summary()
    assert summary["lookahead_miss_layers"] == [1] and summary["lookahead_miss_max"] == pytest.approx(miss[1])
    lines = [x for x in result.intervention.summary_lines(summary) if "warning" in x]
    assert lines == [f"  warning: the barrier's look-ahead h differs from the image mass the model computed by up to "
                     f"{miss[1]:+.3g} (noise floor {summary['lookahead_miss_floor']:.2g}) at layers [1]: h, its "
                     "gradient and the step are not the model's there"]
    assert any(x.startswith("Warning: The barrier's look-ahead h differs") for x in headline(
        summary, result.records, result.intervention))


def test_the_trace_records_norms_and_margins_of_a_plain_forward(family_lm, family_traced, family_forward):
    _, out, outputs = family_forward
    pre, post = _baseline(family_traced, "resid_pre_norm"), _baseline(family_traced, "resid_post_norm")
    for i in range(family_lm.n_layers):
        assert pre[i] == pytest.approx(float(out.hidden_states[i][0, -1].norm()), rel=TOL)
        assert post[i] == pytest.approx(float(outputs[i][0, -1].norm()), rel=TOL)
    logits = out.logits[0, -1]
    margin = float(logits[family_lm.tokens.yes_id] - logits[family_lm.tokens.no_id])
    scale = TOL * float(logits.abs().max())
    assert family_traced.value("final_margin", "baseline") == pytest.approx(margin, rel=0, abs=scale)
    lens = _baseline(family_traced, "logit_lens_margin")
    assert lens[family_lm.n_layers - 1] == pytest.approx(margin, rel=0, abs=scale)


def test_the_barrier_gradient_passes_through_each_backbones_norms(family_lm, family_forward):
    """∇h in float64 on the model's own weights (q/k norms, Gemma's offset, the window), against central differences."""
    from mclcbf_diag import barrier as B

    inputs, out, _ = family_forward
    i = family_lm.n_layers - 1
    w = family_lm.layer_weights(i)
    x = out.hidden_states[i][0].double()
    seq = x.shape[0]
    cos, sin = family_lm.model.get_submodule(family_lm.adapter.rotary_emb)(x[None].float(), torch.arange(seq)[None])
    cos, sin = cos[0].double(), sin[0].double()
    mask = inputs["input_ids"][0] == family_lm.tokens.image_token_id
    keys, q = B.project_keys(x, w, cos, sin), torch.tensor([seq - 1])
    _, g = B.barrier_gradient(x[-1:], keys, w, cos[-1:], sin[-1:], mask, q, torch.float64)
    v = torch.randn(x.shape[-1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    eps = 1e-6 * float(x[-1].norm())
    hp, _ = B.barrier_value(x[-1:] + eps * v, keys, w, cos[-1:], sin[-1:], mask, q)
    hm, _ = B.barrier_value(x[-1:] - eps * v, keys, w, cos[-1:], sin[-1:], mask, q)
    assert float(g[0] @ v) == pytest.approx(float((hp - hm) / (2 * eps)), rel=1e-5, abs=1e-10)


def test_the_sink_is_the_bos_or_else_measured(family_lm, family_forward):
    """The Qwen2 prompt starts with ``USER``, not a BOS: its sink is the measured one, from a plain forward's rows."""
    from mclcbf_diag.models.tokens import find_sink

    inputs, out, _ = family_forward
    ids = inputs["input_ids"][0]
    image = ids == family_lm.tokens.image_token_id
    rows = torch.stack([a[0, :, -1] for a in out.attentions])  # [layers, heads, seq]
    sink = find_sink(ids, family_lm.tokens.bos_token_id, rows, image)
    if family_lm.text_config.model_type not in NO_BOS:
        assert int(ids[0]) == family_lm.tokens.bos_token_id and (sink.position, sink.kind) == (0, "BOS")
        return
    assert int(ids[0]) != family_lm.tokens.bos_token_id
    assert family_lm.processor.tokenizer.decode(ids[:3]).startswith("USER")
    mean = rows.mean(dim=(0, 1))
    text = [p for p in range(len(ids) - 1) if not image[p]]
    assert sink.kind == "measured sink" and sink.position == max(text, key=lambda p: (float(mean[p]), -p))


def test_the_trace_records_the_sink_mass_on_the_bos_or_the_measured_sink(family_lm, family_traced, family_forward):
    """``attn_sink_mass`` is the mass on the BOS (position 0) or, without a BOS (Qwen2), on the key a plain forward's
    decision rows attend most (mean over layers and heads, image and decision tokens excluded); ``sink_is_bos`` and
    ``sink_position`` say which, for the baseline and the steered run alike."""
    inputs, out, _ = family_forward
    ids = inputs["input_ids"][0]
    image = ids == family_lm.tokens.image_token_id
    if family_lm.text_config.model_type in NO_BOS:
        mean = torch.stack([a[0, :, -1] for a in out.attentions]).mean(dim=(0, 1))
        text = [p for p in range(len(ids) - 1) if not image[p]]
        sink, is_bos = max(text, key=lambda p: (float(mean[p]), -p)), 0.0
    else:
        sink, is_bos = 0, 1.0
    r = family_traced.records
    for condition in ("baseline", "steered"):
        assert family_traced.value("sink_is_bos", condition) == is_bos
        assert family_traced.value("sink_position", condition) == sink
    mass = _baseline(family_traced, "attn_sink_mass")
    for i in range(family_lm.n_layers):
        want = float(out.attentions[i][0, :, -1, sink].mean())
        assert mass[i] == pytest.approx(want, rel=0, abs=TOL)
    assert set(r[r.metric == "sink_is_bos"].layer) == {-1}


def test_the_seed_span_is_flagged_on_these_layouts(family_lm, family_forward):
    """64 image tokens (and, for Qwen2, no BOS): the seed's [1, 577) covers the question and the decision token."""
    from mclcbf_diag.interventions.mclcbf.config import BarrierConfig
    from mclcbf_diag.models.tokens import span_problem

    inputs, _, _ = family_forward
    ids = inputs["input_ids"][0]
    detected = torch.nonzero(ids == family_lm.tokens.image_token_id).flatten()
    first = 4 if family_lm.text_config.model_type in NO_BOS else 5
    assert detected.tolist() == list(range(first, first + 64))
    line = span_problem(BarrierConfig().fixed_span, detected, len(ids) - 1)
    assert line.startswith(f"the configured image span [1, 577) covers the decision token (position {len(ids) - 1})")
    assert span_problem((first, first + 64), detected, len(ids) - 1) is None


def test_batched_rows_and_a_cached_prefix_equal_plain_forwards(family_lm):
    """pope's path on each backbone: left-padded batches (Qwen2: no BOS), then the decision token continuing each
    question's cached prefix (models.shared_prefix), against each prompt's own plain forward."""
    from mclcbf_diag.data import build_prompt
    from mclcbf_diag.engine.batch import batch_inputs
    from mclcbf_diag.engine.runner import Continuation, Keep, forward, prefix_forward
    from mclcbf_diag.interventions.base import Intervention
    from mclcbf_diag.models.shared_prefix import SharedPrefix, continuation_mask, continuing

    lm = family_lm
    prompts = [build_prompt(t) for t in ("Is there a dog in the image?", "Is there a big red dog here?", "dog?")]
    images = [sample_scene(k, 1).image() for k in range(3)]
    with torch.no_grad():
        refs = [lm.model(**lm.inputs(p, i)).logits[0, -1] for p, i in zip(prompts, images)]
    tol = TOL * max(float(r.abs().max()) for r in refs)
    inputs = batch_inputs(lm, prompts, images)
    assert len(set((inputs["attention_mask"] == 0).sum(-1).tolist())) == 3, "the prompts need different padding"
    with torch.no_grad():
        last = forward(lm, inputs, Intervention(), keep=Keep(layers=False)).logits
    for b, ref in enumerate(refs):
        torch.testing.assert_close(last[b].float(), ref.float(), atol=tol, rtol=0)
    if getattr(lm.text_config, "sliding_window", None):
        return  # a cache of window − 1 keys holds no whole prefix: such prompts are refused (check_prompt_lengths)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    pre = prefix_forward(lm, inputs, states_from=ids.shape[1] - 1)
    start, owner = ids.shape[1] - 1, torch.tensor([2, 0, 1])
    feed = {"inputs_embeds": pre.embeds[owner, start:], "position_ids": inputs["position_ids"][owner, start:],
            "attention_mask": continuation_mask(mask[owner], start, pre.embeds.dtype)}
    kv = [(c.keys, c.values) for c in pre.cache.layers]
    with torch.no_grad(), continuing(lm, SharedPrefix([k for k, _ in kv], [v for _, v in kv], start, owner)):
        cont = forward(lm, feed, Intervention(), keep=Keep(layers=False), full_ids=ids[owner], prepare=False,
                       continuation=Continuation(start, prefix_keys={i: k for i, (k, _) in enumerate(kv)},
                                                 prefix_rows=owner.tolist(), full_mask=mask[owner]),
                       use_cache=False).logits
    for b, q in enumerate(owner.tolist()):
        torch.testing.assert_close(cont[b].float(), refs[q].float(), atol=tol, rtol=0)


def test_explain_refuses_a_prompt_past_the_sliding_window_in_one_line(family_lm):
    from mclcbf_diag.errors import UserError
    from mclcbf_diag.experiments.explain import explain_sample
    from mclcbf_diag.experiments.trace import trace_sample
    from mclcbf_diag.interventions import resolve
    from mclcbf_diag.models.loading import sliding_window

    if sliding_window(family_lm.text_config) is None:
        pytest.skip("a text model with a sliding window (Mistral, Qwen2's sliding layer)")
    image, iv = sample_scene(3, 1).image(), resolve("knockout")
    # explain continues from cached prefixes, which a window shorter than the prompt no longer holds: refused
    # before any forward; a trace is one whole forward per condition, exact past the window (tests above)
    with pytest.raises(UserError, match=r"more than the text model's sliding window of 24 tokens"):
        explain_sample(family_lm, "Is there a dog in the image?", image, iv)
    assert trace_sample(family_lm, "Is there a dog in the image?", image, iv).records.size

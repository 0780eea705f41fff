"""Each family's published configuration as data, built at any depth (meta device: shapes only), and each family at
its published attention widths with two layers against a plain transformers forward and its own look-ahead."""

import pytest
import torch

from mclcbf_diag.models.real_width import (
    LLAVA_1_5_7B,
    build_random_llava,
    check_family,
    llava15_7b_config,
    parameter_count,
    real_width_families,
)


def test_full_configuration_has_the_published_size():
    config = llava15_7b_config()
    t, v = config.text_config, config.vision_config
    assert (t.hidden_size, t.num_attention_heads, t.intermediate_size, t.vocab_size, t.num_hidden_layers) == \
        (4096, 32, 11008, 32064, 32)
    assert (v.hidden_size, v.num_hidden_layers, v.image_size, v.patch_size) == (1024, 24, 336, 14)
    assert (v.image_size // v.patch_size) ** 2 == config.image_seq_length == 576
    # 7.06 B parameters, as llava-hf/llava-1.5-7b-hf
    assert abs(parameter_count(config) / 1e9 - 7.06) < 0.01


def test_depth_is_a_parameter_and_widths_stay():
    config = llava15_7b_config(2, 2, image_token_id=300, pad_token_id=301)
    model = build_random_llava(config, device="meta")
    layers = model.model.language_model.layers
    assert len(layers) == 2 and layers[0].self_attn.q_proj.weight.shape == (4096, 4096)
    assert layers[0].mlp.up_proj.weight.shape == (11008, 4096)
    assert model.lm_head.weight.shape == (32064, 4096)
    assert config.image_token_index == 300 and LLAVA_1_5_7B["image_token_index"] == 32000
    assert model.model.language_model.embed_tokens.weight.device == torch.device("meta")


# ----------------------------------------------------------------------------- every family's published widths
FAMILY_TESTS = real_width_families()
# Too heavy on one core at their published attention width with their 1,200–1,500-token anyres prompts (and the 7B's
# 595): these keep head_dim, the query/key-value head ratio and the rotary settings, with 8× (4×) fewer heads.
FEWER_HEADS = {"llava": {"num_attention_heads": 4, "num_key_value_heads": 4},
               "llava_next": {"num_attention_heads": 4, "num_key_value_heads": 1},
               "llava_onevision": {"num_attention_heads": 7, "num_key_value_heads": 1}}


def test_every_published_file_loads_as_its_family_config():
    """Each JSON builds with transformers' own config class for its model_type, the class the family's architecture
    loads, and names its checkpoint and sources."""
    from transformers import AutoConfig

    from mclcbf_diag.models.families import FAMILIES
    from mclcbf_diag.models.real_width import PUBLISHED_FILES, architecture, published

    by_name = {f.name: f for f in FAMILIES}
    assert set(real_width_families()) == set(PUBLISHED_FILES)  # every supported family's configuration is kept
    for family in PUBLISHED_FILES:
        spec = published(family)
        assert spec["_checkpoint"] if family != "llava" else spec["_source"]
        assert isinstance(spec["_source"], (str, dict)) and spec["_source"]
        clean = {k: v for k, v in spec.items() if not k.startswith("_") and k != "model_type"}
        clean["text_config"] = {k: v for k, v in clean["text_config"].items() if k != "sliding_window_pattern"}
        config = AutoConfig.for_model(spec["model_type"], **clean)
        assert by_name[family].model_type == config.model_type  # the file names the family's own model_type
        assert type(config) is architecture(family).config_class


def test_each_family_keeps_its_published_widths_at_any_depth():
    from mclcbf_diag.models.real_width import build_random_model, family_config, published

    for family in real_width_families():
        spec = published(family)
        t = spec["text_config"]
        config = family_config(family, 2, 2)
        text = config.get_text_config()
        assert (text.hidden_size, text.num_attention_heads, text.intermediate_size, text.vocab_size) == \
            (t["hidden_size"], t["num_attention_heads"], t["intermediate_size"], t["vocab_size"])
        assert text.num_hidden_layers == 2
        model = build_random_model(config, family, device="meta")
        q = model.model.language_model.layers[0].self_attn.q_proj.weight
        k = model.model.language_model.layers[0].self_attn.k_proj.weight
        head_dim = t.get("head_dim", t["hidden_size"] // t["num_attention_heads"])
        assert q.shape == (t["num_attention_heads"] * head_dim, t["hidden_size"])
        assert k.shape == (t.get("num_key_value_heads", t["num_attention_heads"]) * head_dim, t["hidden_size"])
    gemma = family_config("gemma3", 2, 2).text_config
    assert gemma.layer_types == ["sliding_attention", "full_attention"]  # a global layer kept at any depth
    qwen = family_config("qwen2_5_vl", 2, 2).vision_config
    assert qwen.depth == 2 and qwen.fullatt_block_indexes == [1]


def test_a_family_outside_the_toolkit_or_unknown_is_refused_in_one_line(monkeypatch):
    from mclcbf_diag.errors import UserError
    from mclcbf_diag.models import real_width

    # a configuration kept for a family the toolkit does not measure (none today: every kept one is supported)
    monkeypatch.setitem(real_width.PUBLISHED_FILES, "idefics3", "idefics3.json")
    with pytest.raises(UserError, match=r"^--family idefics3: its published configuration is kept .*choose one"):
        check_family("idefics3")
    with pytest.raises(UserError, match=r"^--family 'nope': not a family .*choose one of: llava, llava_next"):
        check_family("nope")
    check_family("gemma3")


@pytest.fixture(scope="module")
def scene():
    from mclcbf_diag.data import load_image, load_pope, resolve_image
    from mclcbf_diag.shipped import IMAGES, pope_file

    question = load_pope(pope_file("adversarial"))[0]
    return question, load_image(resolve_image(question, IMAGES))


@pytest.mark.parametrize("family", FAMILY_TESTS)
def test_a_family_at_its_published_attention_equals_a_plain_forward_and_its_look_ahead(family, scene, tmp_path):
    """2 language and 2 tower layers, the published attention (heads, head_dim, key-value heads, rotary; fewer heads
    where FEWER_HEADS says), norms away from identity, the family's processor at its published tile size: ``trace``'s
    masses, residual norms and margin equal a plain transformers forward, and the barrier's look-ahead h equals the
    measured mass at each layer it keeps."""
    import dataclasses

    from floors import margin_floor, mass_floor, state_floor

    from mclcbf_diag import barrier as B
    from mclcbf_diag.data import build_prompt
    from mclcbf_diag.experiments.trace import trace_sample
    from mclcbf_diag.models import load_model
    from mclcbf_diag.models.real_width import (
        build_random_model,
        family_config,
        reduced_widths,
        save_stand_in,
        stand_in_processor,
        stand_in_token_ids,
        stand_in_vocabulary,
    )

    question, image = scene
    processor = stand_in_processor(family)
    widths = reduced_widths(family, stand_in_vocabulary(family, processor))
    widths["text"].update(FEWER_HEADS.get(family, {}))
    config = family_config(family, 2, 2, widths=widths, token_ids=stand_in_token_ids(family, processor))
    build_random_model(config, family, seed=5, norms_away_from_one=True).save_pretrained(tmp_path)
    save_stand_in(family, processor, tmp_path)
    lm = load_model(str(tmp_path))
    inputs = lm.inputs(build_prompt(question.text), image)
    with torch.no_grad():
        out = lm.model(**inputs, output_attentions=True, output_hidden_states=True)
    result = trace_sample(lm, question, image, dataclasses.replace(B.get_preset("seed-exp6"), span="detected",
                                                                    tau_prefill=0.99))
    r = result.records
    base = r[(r.condition == "baseline") & (r.phase == "prefill") & (r["head"] == -1)]
    per = {m: dict(zip(g.layer, g.value)) for m, g in base.groupby("metric")}
    image_mask = inputs["input_ids"][0] == lm.tokens.image_token_id
    assert int(image_mask.sum()) >= 100 and set(per["barrier_h"]) == {1}  # the kept layer of the two
    for i in range(lm.n_layers):
        want = float(out.attentions[i][0, :, -1, image_mask].sum(-1).mean())
        assert per["attn_image_mass"][i] == pytest.approx(want, abs=mass_floor(want))
        if i in per["barrier_h"]:
            assert per["barrier_h"][i] == pytest.approx(want, abs=mass_floor(want))
        norm = float(out.hidden_states[i][0, -1].norm())
        assert per["resid_pre_norm"][i] == pytest.approx(norm, abs=state_floor(out.hidden_states[i][0, -1:], i + 2))
    margin = float(out.logits[0, -1, lm.tokens.yes_id] - out.logits[0, -1, lm.tokens.no_id])
    assert result.value("final_margin", "baseline") == pytest.approx(
        margin, abs=margin_floor(lm, lm.tokens.yes_id, lm.tokens.no_id))
    assert "lookahead_miss_layers" not in result.summary()


def test_published_widths_agree_with_independent_accounts_of_the_checkpoints():
    """Checks against sources other than the files the JSON was written from: Qwen2.5-VL-7B's printed module tree
    (github.com/acproject/duorou docs/qwen2.5vl_graph.md) and Qwen3-VL-8B's parameter count (8.77 B,
    github.com/EduardoNicacio/LLMBenchmark qwen3-VL-8b/readme.md)."""
    from mclcbf_diag.models.real_width import build_random_model, family_config, family_parameter_count

    qwen = build_random_model(family_config("qwen2_5_vl", 1, 1), "qwen2_5_vl", device="meta")
    text, tower = qwen.model.language_model, qwen.model.visual
    assert text.embed_tokens.weight.shape == (152064, 3584)
    assert text.layers[0].self_attn.k_proj.weight.shape == (512, 3584)
    assert text.layers[0].mlp.gate_proj.weight.shape == (18944, 3584)
    assert tower.patch_embed.proj.weight.shape == (1280, 3, 2, 14, 14)
    assert tower.blocks[0].attn.qkv.weight.shape == (3840, 1280) and tower.blocks[0].mlp.up_proj.weight.shape[0] == 3420
    assert [m.weight.shape for m in tower.merger.mlp if hasattr(m, "weight")] == [(5120, 5120), (3584, 5120)]
    assert round(family_parameter_count("qwen3_vl") / 1e9, 2) == 8.77

"""LLaVA-1.5-7B's exact configuration as data, built at any depth (meta device: shapes only)."""

import torch

from mclcbf_diag.models.real_width import (
    LLAVA_1_5_7B,
    build_random_llava,
    llava15_7b_config,
    parameter_count,
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

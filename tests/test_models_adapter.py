"""The architecture adapter (mclcbf_diag.models.adapter) on a tiny random LLaVA, against the HF modules.

Paths on LLaVA-1.5-7B's layout and the KV-cache keyword are in tests/test_models.py.
"""

import dataclasses

import pytest
import torch

from mclcbf_diag.batch import batch_inputs
from mclcbf_diag.data import build_prompt
from mclcbf_diag.embedded.world import sample_scene
from mclcbf_diag.models.adapter import LLAVA, ArchitectureAdapter


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


def test_norm_eps_follows_the_norm_kind(lm):
    rms = lm.model.model.language_model.norm
    assert LLAVA.norm_eps(rms) == rms.variance_epsilon
    layer_kind = dataclasses.replace(LLAVA, norm_kind="layer")
    assert layer_kind.norm_eps(torch.nn.LayerNorm(8, eps=3e-4)) == pytest.approx(3e-4)


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

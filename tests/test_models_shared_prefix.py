"""Shared-prefix attention against transformers' eager attention on copied caches, and against full forwards."""

import floors
import pytest
import torch
from transformers.models.llama.modeling_llama import eager_attention_forward

from mclcbf_diag import noise
from mclcbf_diag.models.shared_prefix import NAME, SharedPrefix, continuation_mask, continuing, shared_prefix_attention


class _Attn(torch.nn.Module):
    def __init__(self, groups, layer_idx=0):
        super().__init__()
        self.num_key_value_groups, self.layer_idx = groups, layer_idx


def test_continuation_mask_by_hand():
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    got = continuation_mask(mask, 2, torch.float32)[:, 0]
    lo = torch.finfo(torch.float32).min
    want = torch.tensor([[[0, 0, 0, lo], [0, 0, 0, 0]],
                         [[lo, lo, 0, lo], [lo, lo, 0, 0]]])
    assert got.shape == (2, 2, 4)
    assert torch.equal(got, want)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_equals_eager_attention_on_copied_prefixes(heads, kv_heads):
    torch.manual_seed(0)
    questions, T, start, D = 3, 9, 6, 8
    s = T - start
    owner = torch.tensor([0, 0, 2, 1, 1, 0])  # the last row makes a second run of question 0
    rows = len(owner)
    pk, pv = torch.randn(questions, kv_heads, T, D), torch.randn(questions, kv_heads, T, D)
    q = torch.randn(rows, heads, s, D)
    k, v = torch.randn(rows, kv_heads, s, D), torch.randn(rows, kv_heads, s, D)
    pad = torch.ones(rows, T, dtype=torch.long)
    pad[2, :2] = 0  # a left-padded row
    mask = continuation_mask(pad, start, torch.float32)
    module = _Attn(heads // kv_heads)
    module._mclcbf_shared_prefix = SharedPrefix([pk], [pv], start, owner)
    out, probs = shared_prefix_attention(module, q, k, v, mask, scaling=D ** -0.5)
    # reference: every row's own copy of its question's prefix, then eager attention
    full_k = torch.cat([pk[owner, :, :start], k], dim=2)
    full_v = torch.cat([pv[owner, :, :start], v], dim=2)
    ref_out, ref_probs = eager_attention_forward(module, q, full_k, full_v, mask, scaling=D ** -0.5)
    assert out.shape == ref_out.shape == (rows, s, heads, D)
    # the probabilities: each within its float32 floor (floors.mass_floors)
    prob_tol = floors.mass_floors(ref_probs)
    assert bool(((probs.double() - ref_probs.double()).abs() <= prob_tol).all())
    # the output Σ_k p_k v_k: the probabilities' floors carried through |v|, plus the sum's own rounding
    # (a float32 sum of T terms at the scale Σ_k p_k |v_k|: noise.floor)
    abs_v = full_v.abs().repeat_interleave(heads // kv_heads, dim=1).double()
    carried = (prob_tol @ abs_v).transpose(1, 2)
    summed = noise.floor(torch.float32, float((ref_probs.double() @ abs_v).max()), T)
    assert bool(((out.double() - ref_out.double()).abs() <= carried + summed).all())
    # exact: a pad key scores finfo.min, whose exp underflows to 0
    assert float(probs[2, :, :, :2].abs().max()) == 0.0  # pad keys get no weight


def test_groups_are_runs_of_one_question():
    prefix = SharedPrefix([], [], 1, torch.tensor([3, 3, 0, 0, 0, 3]))
    assert prefix.groups == [(3, slice(0, 2)), (0, slice(2, 5)), (3, slice(5, 6))]


def test_model_continuation_equals_full_forwards(tiny_gqa_model, tiny_image):
    """Rows continuing two questions' prefixes give the logits of each question's own full forward."""
    from mclcbf_diag.batch import batch_inputs
    from mclcbf_diag.runner import prefix_forward

    lm = tiny_gqa_model
    prompts = ["USER: <image>\nIs there a dog in the image?\nASSISTANT:", "USER: <image>\nIs there a cat?\nASSISTANT:"]
    inputs = batch_inputs(lm, prompts, [tiny_image, tiny_image.rotate(90)])
    logits, cache, embeds, _ = prefix_forward(lm, inputs)
    T = inputs["input_ids"].shape[1]
    start = T - 4
    owner = torch.tensor([1, 0, 0, 1])
    kv = [(layer.keys, layer.values) for layer in cache.layers]
    feed = {"inputs_embeds": embeds[owner, start:], "position_ids": inputs["position_ids"][owner, start:],
            "attention_mask": continuation_mask(inputs["attention_mask"][owner], start, embeds.dtype)}
    attn_config = lm.adapter.layer_part(lm.model, 0, "layer_attention").config
    before = attn_config._attn_implementation
    with torch.no_grad(), continuing(lm, SharedPrefix([k for k, _ in kv], [v for _, v in kv], start, owner)):
        assert attn_config._attn_implementation == NAME
        got = lm.model(**feed, use_cache=False, logits_to_keep=1).logits[:, -1]
    assert attn_config._attn_implementation == before
    assert not hasattr(lm.adapter.layer_part(lm.model, 0, "layer_attention"), "_mclcbf_shared_prefix")
    assert torch.allclose(got, logits[owner], atol=floors.logit_floor(lm), rtol=0)  # logits of two routes
    # and a row's continuation of the other question's prefix is not that question's answer
    assert not torch.allclose(logits[0], logits[1], atol=1e-3)

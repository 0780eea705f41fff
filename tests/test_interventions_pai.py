"""PAI on the seam equals PAI written as its released code does it: a patched eager attention.

The reference replaces transformers' ``eager_attention_forward`` by one that adds α·|a| to
the last query row's image-key logits before the softmax (``LALBJ/PAI``'s
``llama_new_forward``), in the targeted layers; nothing of the package is used in it.
"""


import floors
import pytest
import torch
import transformers.models.llama.modeling_llama as llama
from transformers import LlavaForConditionalGeneration

from mclcbf_diag import shipped
from mclcbf_diag.data import build_prompt, load_image, load_pope, resolve_image
from mclcbf_diag.engine.batch import answer_pair, batch_inputs
from mclcbf_diag.errors import UserError
from mclcbf_diag.experiments.trace import trace_sample
from mclcbf_diag.interventions import REGISTRY
from mclcbf_diag.interventions.pai import PAI, PAIKnobs, apply_logit_deltas
from mclcbf_diag.measurements.records import documented

POPE = shipped.POPE


@pytest.fixture(scope="module")
def questions():
    """Four questions of three lengths (their texts) and their images."""
    qs = load_pope(shipped.pope_file("adversarial"))[20:24]
    texts = [qs[0].text, qs[1].text.replace(" in the image", ""), qs[2].text.replace("?", " in the image?"), qs[3].text]
    return texts, [load_image(resolve_image(q, shipped.IMAGES)) for q in qs]


_PLAIN = {}


def plain_model(lm):
    """A fresh copy of the model from its checkpoint, never wrapped by nnsight (plain PyTorch)."""
    if lm.source not in _PLAIN:
        _PLAIN[lm.source] = LlavaForConditionalGeneration.from_pretrained(
            lm.source, dtype=torch.float32, attn_implementation="eager", local_files_only=True).eval()
    return _PLAIN[lm.source]


def patched_margin(lm, prompt, image, edit_logits, layers):
    """Plain HF forward with ``edit_logits(weights, image_cols, layer)`` applied before the softmax."""
    inputs = lm.inputs(prompt, image)
    model = plain_model(lm)
    image_cols = inputs["input_ids"][0] == lm.tokens.image_token_id
    original = llama.eager_attention_forward

    def eager(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        k = llama.repeat_kv(key, module.num_key_value_groups)
        v = llama.repeat_kv(value, module.num_key_value_groups)
        w = torch.matmul(query, k.transpose(2, 3)) * scaling
        if attention_mask is not None:
            w = w + attention_mask
        if module.layer_idx in layers:
            w = edit_logits(w, image_cols[: w.shape[-1]], module.layer_idx)
        w = torch.softmax(w, dim=-1, dtype=torch.float32).to(query.dtype)
        return torch.matmul(w, v).transpose(1, 2).contiguous(), w

    llama.eager_attention_forward = eager
    try:
        with torch.no_grad():
            logits = model(**inputs).logits[0, -1]
    finally:
        llama.eager_attention_forward = original
    return float(logits[lm.tokens.yes_id] - logits[lm.tokens.no_id])


def pai_reference(alpha):
    def edit(w, img, layer):
        w = w.clone()
        last = w[:, :, -1, img]
        w[:, :, -1, img] = last.abs() * alpha + last
        return w
    return edit


def test_apply_logit_deltas_equals_softmax_of_shifted_logits():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 2, 7, generator=g) * 4
    a[..., -1] = -torch.inf  # a masked key stays masked
    d = torch.randn(3, 2, 7, generator=g) * 3
    got = apply_logit_deltas(torch.softmax(a, -1), d)
    want = torch.softmax(a + d, -1)
    # each probability within its float32 mass floor (floors.mass_floors, at the larger of the two)
    assert ((got - want).abs() <= floors.mass_floors(torch.maximum(got, want))).all()
    assert got[..., -1].abs().max() == 0  # exact by construction: a masked key's probability is 0, and 0·e^δ = 0


def test_registered_with_paper_defaults():
    assert REGISTRY["pai"] is PAI
    k = PAI().knobs
    assert (k.alpha, k.contrast_gamma) == (0.2, 1.0)
    assert PAI().layers(32) == tuple(range(2, 32))


@pytest.mark.parametrize("model", ["embedded_model", "tiny_gqa_model"])
def test_trace_matches_patched_attention(model, questions, request):
    lm = request.getfixturevalue(model)
    qs, images = questions
    # stronger than the paper's, so the effect is visible (a random model's logits are near 0)
    alpha = 0.5 if model == "embedded_model" else 500.0
    iv = PAI(PAIKnobs(alpha=alpha))
    result = trace_sample(lm, qs[0], images[0], iv)
    ref = patched_margin(lm, build_prompt(qs[0]), images[0], pai_reference(alpha), set(iv.layers(lm.n_layers)))
    s = result.summary()
    floor = floors.margin_floor(lm, lm.tokens.yes_id, lm.tokens.no_id)
    assert s["margin_after"] == pytest.approx(ref, rel=0, abs=floor)  # the Yes − No margin's floor
    assert s["margin_after"] != pytest.approx(s["margin_before"], abs=1e-4)
    emitted = set(result.records.metric)
    assert "pai_logit_delta" in emitted
    assert all(documented(m, iv) for m in emitted)


def test_batched_rows_equal_single_traces(embedded_model, questions):
    lm = embedded_model
    qs, images = questions
    prompts = [build_prompt(q) for q in qs]
    iv = PAI(PAIKnobs(alpha=0.5))
    _, steered = answer_pair(lm, prompts, images, iv, inputs=batch_inputs(lm, prompts, images))
    floor = floors.margin_floor(lm, lm.tokens.yes_id, lm.tokens.no_id)  # the Yes − No margin's floor
    for q, img, row in zip(qs, images, steered):
        assert row["margin"] == pytest.approx(trace_sample(lm, q, img, iv).summary()["margin_after"], rel=0, abs=floor)


def test_contrast_is_a_clear_user_error(embedded_model, questions):
    qs, images = questions
    with pytest.raises(UserError, match="final logits"):
        trace_sample(embedded_model, qs[0], images[0], PAI(PAIKnobs(contrast_gamma=1.1)))

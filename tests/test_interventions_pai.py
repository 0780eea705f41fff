"""PAI on the seam equals PAI written as its released code does it: a patched eager attention,
then the image-free contrast.

The reference replaces transformers' ``eager_attention_forward`` by one that adds α·|a| to
the last query row's image-key logits before the softmax (``LALBJ/PAI``'s
``llama_new_forward``), in the targeted layers: the conditional logits. The unconditional ones
are a plain forward of the same ids with the image tokens removed (``init_cfg_processor``'s
``neg_prompt``; no attention edit there, as ``use_cfg`` switches it off), and the scores are
``CFG.py``'s ``γ·(lp − lp_u) + lp_u`` on log-softmax, −inf where ``lp < log 0.1 + max lp``.
Nothing of the package is used in it. Like the package's forwards it reads the last position
with ``logits_to_keep=1``.
"""

import math

import floors
import pytest
import torch
import transformers.models.llama.modeling_llama as llama
from plain_refs import DECODING, assert_scores, plain_model

from mclcbf_diag import shipped
from mclcbf_diag.data import build_prompt, load_image, load_pope, resolve_image
from mclcbf_diag.engine.batch import answer_batch, answer_pair, batch_inputs
from mclcbf_diag.engine.runner import Keep, forward
from mclcbf_diag.experiments.trace import trace_sample
from mclcbf_diag.interventions import REGISTRY
from mclcbf_diag.interventions.base import rows_of
from mclcbf_diag.interventions.pai import PAI, PAIKnobs, apply_logit_deltas
from mclcbf_diag.interventions.views import image_free_inputs
from mclcbf_diag.measurements.records import documented

POPE = shipped.POPE


@pytest.fixture(scope="module")
def questions():
    """Four questions of three lengths (their texts) and their images."""
    qs = load_pope(shipped.pope_file("adversarial"))[20:24]
    texts = [qs[0].text, qs[1].text.replace(" in the image", ""), qs[2].text.replace("?", " in the image?"), qs[3].text]
    return texts, [load_image(resolve_image(q, shipped.IMAGES)) for q in qs]




def patched_logits(lm, prompt, image, edit_logits, layers):
    """Last-position logits [vocab] of a plain HF forward with ``edit_logits(weights, image_cols, layer)`` applied
    before the softmax."""
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
            return model(**inputs, logits_to_keep=1).logits[0, -1]
    finally:
        llama.eager_attention_forward = original


def patched_margin(lm, prompt, image, edit_logits, layers):
    """The Yes − No margin of :func:`patched_logits`."""
    logits = patched_logits(lm, prompt, image, edit_logits, layers)
    return float(logits[lm.tokens.yes_id] - logits[lm.tokens.no_id])


def image_free_logits(lm, prompt, image):
    """The unconditional pass: the same ids with every image token removed, one row, no padding, no edit."""
    ids = lm.inputs(prompt, image)["input_ids"][0]
    with torch.no_grad():
        return plain_model(lm)(input_ids=ids[ids != lm.tokens.image_token_id][None], logits_to_keep=1).logits[0, -1]


def cfg_scores(cond, uncond, gamma, cutoff=0.1):
    """``CFG.py``'s ``CFGLogits``: (scores with −inf where cut, scores before the cut)."""
    lp = torch.log_softmax(cond, dim=-1)
    lp_u = torch.log_softmax(uncond, dim=-1)
    out = gamma * (lp - lp_u) + lp_u
    return out.masked_fill(lp < math.log(cutoff) + lp.max(dim=-1, keepdim=True).values, -torch.inf), out


def reference(lm, prompt, image, alpha, gamma, layers):
    """(scores, scores before the cut, conditional logits, unconditional logits) of released PAI on one question."""
    cond = patched_logits(lm, prompt, image, pai_reference(alpha), layers)
    uncond = image_free_logits(lm, prompt, image)
    return (*cfg_scores(cond, uncond, gamma), cond, uncond)


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
    # README/POPE: --alpha 0.2 --use-cfg --gamma 1.1 --start-layer 2 --end-layer 32; CFG.py's cutoff 0.1
    assert (k.alpha, k.contrast_gamma, k.cutoff, k.layers) == (0.2, 1.1, 0.1, None)
    assert PAI().layers(32) == tuple(range(2, 32))
    assert PAI().layers(8) == tuple(range(1, 8)) and PAI().layers(5) == tuple(range(5))  # by depth fraction
    assert "logits" in PAI().open_sites(True) and not PAI().open_sites(False)
    only = PAI.from_preset("attention-only")
    assert (only.knobs.alpha, only.knobs.contrast_gamma) == (0.2, 1.0)
    assert only.open_sites(True) == {"residual", "attention"}
    assert PAI().logit_part_on and not only.logit_part_on  # γ = 1 turns the contrast off, and its forward
    assert PAI().auxiliary_forwards() == 1 and only.auxiliary_forwards() is None


@pytest.mark.parametrize("model", ["embedded_model", "tiny_gqa_model"])
def test_trace_matches_patched_attention(model, questions, request):
    lm = request.getfixturevalue(model)
    qs, images = questions
    # stronger than the paper's, so the effect is visible (a random model's logits are near 0)
    alpha = 0.5 if model == "embedded_model" else 500.0
    iv = PAI(PAIKnobs(alpha=alpha, contrast_gamma=1.0))  # the attention edit alone: the reference has no contrast
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


@pytest.mark.parametrize("model,alpha,gamma,q", [("embedded_model", 0.2, 1.1, 0), ("embedded_model", 0.5, 2.0, 1),
                                                 ("tiny_gqa_model", 500.0, 1.1, 1), ("tiny_gqa_model", 0.0, 3.0, 0)])
def test_full_method_matches_released_code(model, alpha, gamma, q, questions, request):
    """The attention edit and the image-free contrast together (γ = 2: ``pope_eval.py``'s argparse default; α = 0:
    the contrast alone). On the trained model question 0 keeps Yes and No, question 1 cuts Yes."""
    lm = request.getfixturevalue(model)
    qs, images = questions
    iv = PAI(PAIKnobs(alpha=alpha, contrast_gamma=gamma))
    prompt = build_prompt(qs[q])
    want, raw, cond, uncond = reference(lm, prompt, images[q], alpha, gamma, set(iv.layers(lm.n_layers)))
    cap = forward(lm, lm.inputs(prompt, images[q]), iv).captures[0]
    assert_scores(cap.steps[0].final_logits, want)
    assert float((cond - uncond).abs().max()) > 1e-3  # the image-free pass is another forward
    yes, no = lm.tokens.yes_id, lm.tokens.no_id
    rec = cap.row_records
    assert set(DECODING) <= set(rec)
    assert rec["decoding_model_margin"] == pytest.approx(float(cond[yes] - cond[no]), abs=1e-5)
    assert rec["decoding_aux_margin"] == pytest.approx(float(uncond[yes] - uncond[no]), abs=1e-5)
    assert rec["decoding_contrast_margin"] == pytest.approx(float(raw[yes] - raw[no]), abs=1e-5)
    assert rec["decoding_cut_yes"] == float(bool(torch.isinf(want[yes])))
    assert rec["decoding_cut_no"] == float(bool(torch.isinf(want[no])))


def test_the_cutoff_cuts(embedded_model, questions):
    """On the trained model the 0.1 cutoff leaves few tokens; cutoff=0 keeps every one (the fix that undoes it)."""
    lm = embedded_model
    qs, images = questions
    prompt = build_prompt(qs[0])
    layers = set(PAI().layers(lm.n_layers))
    want, raw, _, _ = reference(lm, prompt, images[0], 0.2, 1.1, layers)
    assert 1 <= int(torch.isfinite(want).sum()) < want.numel()
    got = forward(lm, lm.inputs(prompt, images[0]), PAI(PAIKnobs(cutoff=0.0))).captures[0].steps[0].final_logits
    assert_scores(got, raw)


def test_dose_scales_alpha_and_gamma_together(embedded_model, questions):
    """dose 0.5 of (α, γ) = (0.5, 2) is (0.25, 1.5) of the released code."""
    lm = embedded_model
    qs, images = questions
    prompt = build_prompt(qs[2])
    iv = PAI(PAIKnobs(alpha=0.5, contrast_gamma=2.0))
    want, *_ = reference(lm, prompt, images[2], 0.25, 1.5, set(iv.layers(lm.n_layers)))
    got = forward(lm, lm.inputs(prompt, images[2]), iv, dose=0.5).captures[0].steps[0].final_logits
    assert_scores(got, want)
    full = forward(lm, lm.inputs(prompt, images[2]), iv).captures[0].steps[0].final_logits
    both = torch.isfinite(full) & torch.isfinite(got)
    assert float((full - got)[both].abs().max()) > 1e-3  # the dose changed the scores


def test_image_free_view_is_the_prompt_without_its_image(embedded_model, questions):
    """Left-padded rows of the ids without image tokens, RoPE positions 0 … on each row's own tokens."""
    lm = embedded_model
    qs, images = questions
    prompts = [build_prompt(q) for q in qs]
    inputs = batch_inputs(lm, prompts, images)
    rows = rows_of(inputs["input_ids"], inputs["attention_mask"], lm.tokens.image_token_id)
    view = image_free_inputs(lm, rows)
    for b, (prompt, image) in enumerate(zip(prompts, images)):
        ids = lm.inputs(prompt, image)["input_ids"][0]
        ids = ids[ids != lm.tokens.image_token_id]
        n = ids.numel()
        assert torch.equal(view["input_ids"][b, -n:].cpu(), ids)
        assert view["attention_mask"][b, -n:].all() and not view["attention_mask"][b, :-n].any()
        assert torch.equal(view["position_ids"][b, -n:].cpu(), torch.arange(n))


@pytest.mark.parametrize("model", ["embedded_model", "tiny_gqa_model"])
def test_batched_scores_match_released_code(model, questions, request):
    """A left-padded batch (image-free rows of three lengths) against each question's released PAI alone: the
    scores of the runner's forward and the margins of answer_batch."""
    lm = request.getfixturevalue(model)
    qs, images = questions
    prompts = [build_prompt(q) for q in qs]
    alpha = 0.5 if model == "embedded_model" else 500.0
    iv = PAI(PAIKnobs(alpha=alpha, contrast_gamma=1.5))
    layers = set(iv.layers(lm.n_layers))
    inputs = batch_inputs(lm, prompts, images)
    res = forward(lm, inputs, iv, keep=Keep(layers=False))
    last, records = res.logits, res.records
    answers = answer_batch(lm, prompts, images, iv, steer=True)
    yes, no = lm.tokens.yes_id, lm.tokens.no_id
    # the batch (left-padded rows) is another route than a lone row: a score γ·lp − (γ − 1)·lp_u moves by at
    # most (2γ − 1)·2·floors.logit_floor (a log-softmax by twice its logits' error); 1e-5 holds on the CPUs tried
    floor = (2 * 1.5 - 1) * 2 * floors.logit_floor(lm)
    for b, (prompt, image) in enumerate(zip(prompts, images)):
        want, raw, cond, uncond = reference(lm, prompt, image, alpha, 1.5, layers)
        assert_scores(last[b], want, atol=floor)
        margin = float(want[yes] - want[no])
        assert answers[b]["margin"] == (margin if math.isinf(margin) else pytest.approx(margin, abs=2 * floor))
        assert set(DECODING) <= set(records[b][-1])
        aux = floors.margin_floor(lm, yes, no)
        assert records[b][-1]["decoding_aux_margin"] == pytest.approx(float(uncond[yes] - uncond[no]), abs=aux)
        assert records[b][-1]["decoding_contrast_margin"] == pytest.approx(float(raw[yes] - raw[no]), abs=2 * floor)


def test_a_question_scores_the_same_alone_and_in_a_batch(embedded_model, questions):
    lm = embedded_model
    qs, images = questions
    prompts = [build_prompt(q) for q in qs]
    iv = PAI(PAIKnobs(alpha=0.5, contrast_gamma=2.0))
    inputs = batch_inputs(lm, prompts, images)
    res = forward(lm, inputs, iv, keep=Keep(layers=False))
    together, records = res.logits, res.records
    for b in range(len(prompts)):
        one = batch_inputs(lm, prompts[b:b + 1], images[b:b + 1])
        res = forward(lm, one, iv, keep=Keep(layers=False))
        alone, rec_alone = res.logits, res.records
        assert_scores(together[b], alone[0])
        for metric in DECODING:
            assert records[b][-1][metric] == pytest.approx(rec_alone[0][-1][metric], abs=1e-5)

"""VISTA on the seam equals a plain re-implementation: two forwards for v, then layer pre-hooks.

The reference computes v_ℓ (residual entering layer ℓ at the last token, with the image minus
the same ids without the image tokens) with a fresh, plain copy of the model, and applies
``x' = ‖x‖·normalize(x̂ + λ·s·v̂)``, ``s = 1 + max(0, cos(x, −v))``, to every position of the
residual entering each layer with forward pre-hooks (``LzVv123456/VISTA``'s ``VSVLayer``).
Self-logits augmentation (``llava_llama.py``'s forward): the steered forward's ``output_hidden_states``,
``hidden_states[1:][k]`` for the readout layers k through ``lm_head`` without the final norm, mixed
``α·mean + (1 − α)·logits``. The hooks return the steered residual instead of writing it in place, so
``hidden_states[k + 1]`` is layer k's output as it left the layer (before layer k + 1's steering), and
the last layer's raw output is read with ``tie_last_hidden_states=False`` (transformers otherwise puts the
final-normed state there; on the small models the readout range, 25–30 of 32 by depth fraction, ends at
the last layer).
"""

import floors
import pytest
import torch
from plain_refs import DECODING, vista_steering
from test_interventions_pai import plain_model, questions  # noqa: F401  (fixture)

from mclcbf_diag.data import build_prompt
from mclcbf_diag.engine.batch import answer_batch, answer_pair, batch_inputs
from mclcbf_diag.engine.runner import Keep, forward
from mclcbf_diag.experiments.trace import trace_sample
from mclcbf_diag.interventions import REGISTRY
from mclcbf_diag.interventions.vista import VISTA, VISTAKnobs
from mclcbf_diag.measurements.records import documented


def hooked_forward(lm, prompt, image, lam, similarity=True):
    """(last-position logits [vocab], hidden_states) of the steered plain forward; hidden_states[k + 1] is the raw
    output of layer k (the last one too, not final-normed)."""
    model = plain_model(lm)
    inputs = lm.inputs(prompt, image)
    ids = inputs["input_ids"][0]
    with torch.no_grad():
        pos = model(**inputs, output_hidden_states=True).hidden_states
        neg = model(input_ids=ids[ids != lm.tokens.image_token_id][None], output_hidden_states=True).hidden_states
    vs = [(pos[i][0, -1] - neg[i][0, -1]).float() for i in range(lm.n_layers)]

    handles = vista_steering(model, lm, vs, lam, similarity)
    text = model.config.text_config
    text.tie_last_hidden_states = False
    try:
        with torch.no_grad():
            out = model(**inputs, output_hidden_states=True, logits_to_keep=1)
    finally:
        del text.tie_last_hidden_states
        for h in handles:
            h.remove()
    return out.logits[0, -1], out.hidden_states


def hooked_margin(lm, prompt, image, lam, similarity=True):
    logits, _ = hooked_forward(lm, prompt, image, lam, similarity)
    return float(logits[lm.tokens.yes_id] - logits[lm.tokens.no_id])


def reference(lm, prompt, image, lam, alpha, layers, similarity=True):
    """(scores, steered logits, mean readout logits, floor of the scores) of released VISTA (VSV + SLA) on one
    question. The floor is that of two float32 routes to the scores (a batch and a lone row):
    ``(1 − α)·floors.logit_floor`` for the final logits, and for each readout ``floors.state_floor`` of the raw
    state after the vision tower and k + 1 language layers times the largest ‖w_row‖ of ``lm_head`` (no final
    norm bounds that state), averaged, times α."""
    logits, hs = hooked_forward(lm, prompt, image, lam, similarity)
    head = plain_model(lm).lm_head
    with torch.no_grad():
        aug = torch.stack([head(hs[1:][k][0, -1]) for k in layers]).mean(0)
    w = float(head.weight.detach().float().norm(dim=-1).max())
    vision = floors.depth(lm) - lm.n_layers
    readout = sum(floors.state_floor(hs[1:][k][0, -1], vision + k + 1) * w for k in layers) / len(layers)
    floor = (1 - alpha) * floors.logit_floor(lm) + alpha * readout
    return alpha * aug + (1 - alpha) * logits, logits, aug, floor


def assert_scores(got, want, atol=1e-5):
    got = got.float()
    assert torch.isfinite(got).all() and torch.isfinite(want).all()  # SLA cuts nothing
    torch.testing.assert_close(got, want, rtol=0, atol=atol)


def test_registered_with_paper_defaults():
    assert REGISTRY["vista"] is VISTA
    k = VISTA().knobs
    # run_pope.sh: --vsv --vsv-lambda 0.01 --logits-aug --logits-alpha 0.3 (--logits-layers 25,30: k = 25 … 30)
    assert (k.lam, k.similarity, k.logits_alpha, k.logits_layers) == (0.01, True, 0.3, None)
    assert VISTA().layers(32) == tuple(range(32))
    assert VISTA().readout_layers(32) == tuple(range(25, 31))
    # by depth fraction (rounded half up): 25/32 and 31/32 of the depth
    assert VISTA().readout_layers(8) == (6, 7) and VISTA().readout_layers(5) == (4,)
    assert VISTA().readout_layers(40) == tuple(range(31, 39))
    assert VISTA(VISTAKnobs(logits_layers=(1, 3))).readout_layers(8) == (1, 3)
    assert "logits" in VISTA().open_sites(True) and not VISTA().open_sites(False)
    only = VISTA.from_preset("steering-only")
    assert (only.knobs.lam, only.knobs.logits_alpha) == (0.01, 0.0)
    assert only.readout_layers(32) == () and only.open_sites(True) == {"residual"}
    assert VISTA().logit_part_on and not only.logit_part_on  # α = 0 turns SLA off, and its forwards
    assert VISTA().auxiliary_forwards() == 2 and only.auxiliary_forwards() is None


@pytest.mark.parametrize("model,similarity", [("embedded_model", True), ("tiny_gqa_model", False)])
def test_trace_matches_plain_hooks(model, similarity, questions, request):  # noqa: F811
    lm = request.getfixturevalue(model)
    texts, images = questions
    iv = VISTA(VISTAKnobs(lam=0.3, similarity=similarity, logits_alpha=0.0))  # the reference has no SLA
    result = trace_sample(lm, texts[0], images[0], iv)
    ref = hooked_margin(lm, build_prompt(texts[0]), images[0], 0.3, similarity)
    s = result.summary()
    floor = floors.margin_floor(lm, lm.tokens.yes_id, lm.tokens.no_id)
    assert s["margin_after"] == pytest.approx(ref, rel=0, abs=floor)  # the Yes − No margin's floor
    assert s["margin_after"] != pytest.approx(s["margin_before"], abs=1e-4)
    emitted = set(result.records.metric)
    assert {"vista_vector_norm", "vista_similarity", "rounding_survival"} <= emitted
    assert all(documented(m, iv) for m in emitted)


def test_paper_lambda_matches_too(embedded_model, questions):  # noqa: F811
    texts, images = questions
    ref = hooked_margin(embedded_model, build_prompt(texts[2]), images[2], 0.01)
    steering = VISTA.from_preset("steering-only")  # the reference has no SLA
    got = trace_sample(embedded_model, texts[2], images[2], steering).summary()["margin_after"]
    floor = floors.margin_floor(embedded_model, embedded_model.tokens.yes_id, embedded_model.tokens.no_id)
    assert got == pytest.approx(ref, rel=0, abs=floor)  # the Yes − No margin's floor


def test_batched_rows_equal_single_traces(embedded_model, questions):  # noqa: F811
    lm = embedded_model
    texts, images = questions
    prompts = [build_prompt(t) for t in texts]
    iv = VISTA(VISTAKnobs(lam=0.3))
    _, steered = answer_pair(lm, prompts, images, iv, inputs=batch_inputs(lm, prompts, images))
    floor = floors.margin_floor(lm, lm.tokens.yes_id, lm.tokens.no_id)  # the Yes − No margin's floor
    for t, img, row in zip(texts, images, steered):
        assert row["margin"] == pytest.approx(trace_sample(lm, t, img, iv).summary()["margin_after"], rel=0, abs=floor)


def test_some_rows_of_a_batch_read_their_own_vectors(embedded_model, questions):  # noqa: F811
    """Prepared for rows 1 and 3 of a batch (a mix's rows beside another intervention's), each row's vector is at its
    own index: the vector of that prompt's own two forwards, to the floor of a residual after every layer."""
    from mclcbf_diag.interventions.base import rows_of
    from mclcbf_diag.interventions.vista import steering_vectors

    lm = embedded_model
    texts, images = questions
    inputs = batch_inputs(lm, [build_prompt(t) for t in texts], images)
    rows = rows_of(inputs["input_ids"], inputs["attention_mask"], lm.tokens.image_token_id)
    iv = VISTA()
    iv.prepare(lm, inputs, [rows[1], rows[3]])
    for b in (1, 3):
        alone = batch_inputs(lm, [build_prompt(texts[b])], [images[b]])
        want = steering_vectors(lm, alone, rows_of(alone["input_ids"], alone["attention_mask"],
                                                   lm.tokens.image_token_id))[0]
        for layer in range(lm.n_layers):
            floor = 2 * floors.state_floor(want[layer], layer + 1)
            assert float((iv._v[b, layer] - want[layer]).abs().max()) <= floor, (b, layer)


@pytest.mark.parametrize("model,lam,alpha,similarity,q", [("embedded_model", 0.01, 0.3, True, 2),
                                                          ("embedded_model", 0.3, 0.3, True, 0),
                                                          ("tiny_gqa_model", 0.3, 0.5, False, 1),
                                                          ("tiny_gqa_model", 0.0, 0.3, True, 0)])
def test_full_method_matches_released_code(model, lam, alpha, similarity, q, questions, request):  # noqa: F811
    """Steering and self-logits augmentation together (the paper's λ = 0.01, α = 0.3 first; λ = 0: SLA alone)."""
    lm = request.getfixturevalue(model)
    texts, images = questions
    iv = VISTA(VISTAKnobs(lam=lam, similarity=similarity, logits_alpha=alpha))
    prompt = build_prompt(texts[q])
    want, logits, aug, _ = reference(lm, prompt, images[q], lam, alpha, iv.readout_layers(lm.n_layers), similarity)
    cap = forward(lm, lm.inputs(prompt, images[q]), iv).captures[0]
    assert_scores(cap.steps[0].final_logits, want)
    assert float((aug - logits).abs().max()) > 1e-3  # the readout is another distribution
    yes, no = lm.tokens.yes_id, lm.tokens.no_id
    rec = cap.row_records
    assert set(DECODING) <= set(rec)
    assert rec["decoding_model_margin"] == pytest.approx(float(logits[yes] - logits[no]), abs=1e-5)
    assert rec["decoding_aux_margin"] == pytest.approx(float(aug[yes] - aug[no]), abs=1e-5)
    assert rec["decoding_contrast_margin"] == pytest.approx(float(want[yes] - want[no]), abs=1e-5)
    assert rec["decoding_cut_yes"] == rec["decoding_cut_no"] == 0.0


def test_explicit_readout_layers(embedded_model, questions):  # noqa: F811
    """Layers before the last: their output as it left the layer, before the next layer's steering."""
    lm = embedded_model
    texts, images = questions
    iv = VISTA(VISTAKnobs(lam=0.3, logits_layers=(1, 4)))
    prompt = build_prompt(texts[0])
    want, *_ = reference(lm, prompt, images[0], 0.3, 0.3, (1, 4))
    assert_scores(forward(lm, lm.inputs(prompt, images[0]), iv).captures[0].steps[0].final_logits, want)


def test_dose_scales_lambda_and_alpha_together(embedded_model, questions):  # noqa: F811
    """dose 0.5 of (λ, α) = (0.3, 0.4) is (0.15, 0.2) of the released code."""
    lm = embedded_model
    texts, images = questions
    prompt = build_prompt(texts[1])
    iv = VISTA(VISTAKnobs(lam=0.3, logits_alpha=0.4))
    want, *_ = reference(lm, prompt, images[1], 0.15, 0.2, iv.readout_layers(lm.n_layers))
    got = forward(lm, lm.inputs(prompt, images[1]), iv, dose=0.5).captures[0].steps[0].final_logits
    assert_scores(got, want)
    full = forward(lm, lm.inputs(prompt, images[1]), iv).captures[0].steps[0].final_logits
    assert float((full - got).abs().max()) > 1e-3  # the dose changed the scores


@pytest.mark.parametrize("model", ["embedded_model", "tiny_gqa_model"])
def test_batched_scores_match_released_code(model, questions, request):  # noqa: F811
    """A left-padded batch of three lengths against each question's released VISTA alone: the scores of the runner's
    forward and the margins of answer_batch."""
    lm = request.getfixturevalue(model)
    texts, images = questions
    prompts = [build_prompt(t) for t in texts]
    iv = VISTA(VISTAKnobs(lam=0.3, logits_alpha=0.3))
    layers = iv.readout_layers(lm.n_layers)
    inputs = batch_inputs(lm, prompts, images)
    res = forward(lm, inputs, iv, keep=Keep(layers=False))
    last, records = res.logits, res.records
    answers = answer_batch(lm, prompts, images, iv, steer=True)
    yes, no = lm.tokens.yes_id, lm.tokens.no_id
    for b, (prompt, image) in enumerate(zip(prompts, images)):
        want, logits, aug, floor = reference(lm, prompt, image, 0.3, 0.3, layers)
        assert floor < 1e-3
        assert_scores(last[b], want, atol=floor)  # the batch is another route: its floor (1e-5 fails by a hair)
        assert answers[b]["margin"] == pytest.approx(float(want[yes] - want[no]), abs=2 * floor)
        assert set(DECODING) <= set(records[b][-1])
        # the readouts' part of the floor is at most floor / α, for each of the two logits
        assert records[b][-1]["decoding_aux_margin"] == pytest.approx(float(aug[yes] - aug[no]), abs=2 * floor / 0.3)

"""OPERA's first step on the ``logits`` site equals the released code's formula run on a plain HF model.

The reference (:func:`released_first_step`) follows ``shikiw/OPERA``'s ``opera_decoding`` at the first
response token: the top-5 raw logits z[c]; for each candidate a full forward of the prompt plus c with
``output_attentions=True``; the new position's last-layer row, max over heads, renormalised to sum 1;
its sum over the image tokens attn_img(c); scores z[c] + weight·attn_img(c), every other token ruled
out. Nothing of the package is used in it but the processor's inputs.
"""

import pytest
import torch
from plain_refs import assert_scores, plain_model

from mclcbf_diag import shipped
from mclcbf_diag.data import build_prompt, load_image, load_pope, resolve_image
from mclcbf_diag.engine.batch import answer_batch, answer_pair, batch_inputs
from mclcbf_diag.engine.runner import Keep, forward
from mclcbf_diag.engine.units import Prefix, Unit, run_units
from mclcbf_diag.errors import UserError
from mclcbf_diag.interventions.knockout import AttentionKnockout
from mclcbf_diag.interventions.opera import OPERA, OPERAKnobs, image_shares
from mclcbf_diag.measurements.records import documented

TOL = 1e-5  # float32 scores: the run's logits vs a plain forward's, plus a share in [0, 1]


@pytest.fixture(scope="module")
def questions():
    """Three questions of three lengths (their prompts) and three images."""
    qs = load_pope(shipped.pope_file("adversarial"))[20:23]
    texts = [qs[0].text, qs[1].text.replace(" in the image", ""), qs[2].text.replace("?", " in the image, please?")]
    return [build_prompt(t) for t in texts], [load_image(resolve_image(q, shipped.IMAGES)) for q in qs]




def released_first_step(model, inputs, image_token_id, candidates=5, weight=1.0):
    """``(scores [vocab], tokens, attn_img)`` of OPERA's first step, as the released code computes them."""
    ids = inputs["input_ids"]
    with torch.no_grad():
        prompt = model(**inputs, output_hidden_states=True)
        z = prompt.logits[0, -1].float()
        cand_scores, cand = torch.topk(z, candidates, dim=-1, largest=True, sorted=True)
        image = ids[0] == image_token_id  # the processor expanded <image>: one id per image token
        shares = []
        for c in cand.tolist():
            ids_c = torch.cat([ids, torch.tensor([[c]])], -1)
            if c != image_token_id:
                out = model(input_ids=ids_c, attention_mask=torch.ones_like(ids_c),
                            pixel_values=inputs["pixel_values"], output_attentions=True)
            else:  # a random model may rank <image> itself among its top 5: its embedding row, not an image
                embeds = torch.cat([prompt.hidden_states[0], model.get_input_embeddings()(ids_c[:, -1:])], 1)
                out = model(inputs_embeds=embeds, attention_mask=torch.ones_like(ids_c), output_attentions=True)
            row = out.attentions[-1][0, :, -1].float().max(0).values  # [T + 1], max over heads
            row = row / row.sum(-1, keepdim=True)  # attn_last / attn_last.sum(-1)
            shares.append(row[:-1][image].sum())
        attn_img = torch.stack(shares)
        penalty = -attn_img  # cur_response_lens = 1 <= 10
        cand_scores = cand_scores - weight * penalty
        scores = torch.full_like(z, -torch.inf).scatter(-1, cand, cand_scores)  # −999 in the released code
    return scores, cand, attn_img


def test_shares_renormalise_the_max_over_heads():
    probs = torch.tensor([[[0.5, 0.3, 0.2, 0.0], [0.1, 0.1, 0.6, 0.2]]])  # [1, H=2, K=4]
    image = torch.tensor([[False, True, True, False]])
    # max over heads: (0.5, 0.3, 0.6, 0.2), sum 1.6; image keys 0.3 + 0.6
    assert image_shares(probs, image) == pytest.approx(torch.tensor([0.9 / 1.6]), abs=1e-7)


@pytest.mark.parametrize("model", ["embedded_model", "tiny_gqa_model"])
def test_scores_equal_the_released_first_step(model, questions, request):
    lm = request.getfixturevalue(model)
    prompts, images = questions
    inputs = lm.inputs(prompts[0], images[0])
    want, cand, attn_img = released_first_step(plain_model(lm), inputs, lm.tokens.image_token_id)
    assert (attn_img > 0).all() and (attn_img < 1).all()
    got = forward(lm, inputs, OPERA()).captures[0].steps[0].final_logits.float()
    assert_scores(got, want)
    # the batched path reads the same scores
    res = forward(lm, batch_inputs(lm, prompts[:1], images[:1]), OPERA(), keep=Keep(layers=False),
                  full_ids=lm.inputs(prompts[0], images[0])["input_ids"])
    last, records = res.logits, res.records
    assert_scores(last[0], want)
    best = int(want.argmax())
    assert records[0][-1]["opera_image_share"] == pytest.approx(float(attn_img[cand.tolist().index(best)]), abs=TOL)
    assert all(documented(m, OPERA()) for layer in records[0].values() for m in layer)


def test_a_question_alone_equals_it_in_a_batch(embedded_model, questions):
    lm = embedded_model
    prompts, images = questions
    inputs = batch_inputs(lm, prompts, images)
    assert len(set((inputs["attention_mask"] == 0).sum(-1).tolist())) == 3  # three paddings
    res = forward(lm, inputs, OPERA(), keep=Keep(layers=False))
    batch, batch_records = res.logits, res.records
    for b in range(3):
        alone = batch_inputs(lm, prompts[b: b + 1], images[b: b + 1])
        res = forward(lm, alone, OPERA(), keep=Keep(layers=False))
        one, one_records = res.logits, res.records
        assert_scores(batch[b], one[0])
        assert batch_records[b][-1]["opera_image_share"] == pytest.approx(
            one_records[0][-1]["opera_image_share"], abs=TOL)


def test_population_units_and_cached_prefix_read_the_same_scores(embedded_model, questions):
    """Some rows of a mix (prepare sees the chunk's inputs and its own rows only), a dose as the weight;
    and answer_pair's continuation from the baseline's cache."""
    lm = embedded_model
    prompts, images = questions
    iv = OPERA()
    units = [Unit(0, iv), Unit(2, iv, dose=0.5), Unit(1, AttentionKnockout()), Unit(1, iv)]
    got = run_units(Prefix(lm, prompts, images), units, capture=False)
    for u, (scores, records) in zip(units, got):
        if u.iv is not iv:
            continue
        one = batch_inputs(lm, prompts[u.q: u.q + 1], images[u.q: u.q + 1])
        res = forward(lm, one, OPERA(OPERAKnobs(weight=u.dose)), keep=Keep(layers=False))
        want, want_records = res.logits, res.records
        assert_scores(scores, want[0])
        assert records[-1]["opera_image_share"] == pytest.approx(want_records[0][-1]["opera_image_share"], abs=TOL)
    inputs = batch_inputs(lm, prompts, images)
    _, steered = answer_pair(lm, prompts, images, iv, inputs=inputs)
    batched = answer_batch(lm, prompts, images, iv, steer=True, inputs=inputs)
    for a, b in zip(steered, batched):
        assert a["margin"] == pytest.approx(b["margin"], abs=TOL, nan_ok=True)  # NaN: Yes and No both ruled out


def test_weight_zero_reads_the_top_raw_logits(embedded_model, questions):
    lm = embedded_model
    prompts, images = questions
    inputs = batch_inputs(lm, prompts, images)
    with torch.no_grad():
        raw = lm.model(**inputs, logits_to_keep=1).logits[:, -1].float()
    scores = forward(lm, inputs, OPERA(OPERAKnobs(weight=0.0)), keep=Keep(layers=False)).logits
    top = raw.topk(5, dim=-1).indices
    want = torch.full_like(raw, -torch.inf).scatter(-1, top, raw.gather(-1, top))
    for b in range(3):
        assert_scores(scores[b], want[b])
    steered = answer_batch(lm, prompts, images, OPERA(OPERAKnobs(weight=0.0)), steer=True, inputs=inputs)
    baseline = answer_batch(lm, prompts, images, OPERA(), steer=False, inputs=inputs)
    yes, no = lm.tokens.yes_id, lm.tokens.no_id
    both = [b for b in range(3) if {yes, no} <= set(top[b].tolist())]
    assert both  # the trained model puts Yes and No among its top 5
    for b in both:
        assert steered[b]["answer"] == baseline[b]["answer"]
        assert steered[b]["margin"] == pytest.approx(baseline[b]["margin"], abs=TOL)


def test_dose_scales_the_weight(embedded_model, questions):
    lm = embedded_model
    prompts, images = questions
    inputs = lm.inputs(prompts[0], images[0])
    half = forward(lm, inputs, OPERA(), dose=0.5).captures[0].steps[0].final_logits.float()
    weight = forward(lm, inputs, OPERA(OPERAKnobs(weight=0.5))).captures[0].steps[0].final_logits.float()
    assert_scores(half, weight)


def test_knobs_are_checked():
    with pytest.raises(UserError, match="candidates=0"):
        OPERAKnobs(candidates=0)
    with pytest.raises(UserError, match="candidates"):
        OPERA.from_preset(None, ["candidates=0"])

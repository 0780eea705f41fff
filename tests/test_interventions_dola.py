"""DoLa on the seam equals DoLa written as its released code does it.

The reference follows ``voidism/DoLa``'s transformers fork (``early_exit_layers``: ``lm_head`` on
``hidden_states[j]`` without the final norm; ``dola_greedy_decode``'s selection of the premature layer and
``relative_top_filter``), which transformers' ``_dola_select_contrast`` / ``_relative_top_filter`` repeat, in
plain PyTorch on a fresh copy of the model: one forward with ``output_hidden_states=True``; the candidates'
readouts ``lm_head(hidden_states[j][:, -1])`` (``hidden_states[0]``: the embeddings; the package's layer ℓ
is ``hidden_states[ℓ + 1]``); the premature layer by the released ``0.5 * (F.kl_div(log P_f, M) +
F.kl_div(log P_j, M)).mean(-1)`` argmax; ``log_softmax(final) − log_softmax(premature)`` with the tokens under
``max + log 0.1`` of the final log-probs at −inf. The JSD the package records is checked against one written
here as H(M) − ½·(H(P) + H(Q)).
"""

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from plain_refs import assert_scores, plain_model, three_questions

from mclcbf_diag import shipped
from mclcbf_diag.data import build_prompt, load_image, load_pope, resolve_image
from mclcbf_diag.diagnosis.rulebook import Evidence
from mclcbf_diag.engine.batch import answer_batch, answer_pair, batch_inputs
from mclcbf_diag.engine.runner import Keep, forward
from mclcbf_diag.errors import UserError
from mclcbf_diag.interventions.decoding_rules import JSD_AGREES, dola_rules
from mclcbf_diag.interventions.dola import DoLa, DoLaKnobs, bucket_layers, selection_divergence
from mclcbf_diag.measurements.records import COLUMNS, NO_HEAD, NO_LAYER, documented, frame

TOL = 1e-5  # float32 log-probabilities, the package's readouts vs a plain HF model's
DECODING = ("decoding_model_margin", "decoding_contrast_margin", "decoding_cut_yes", "decoding_cut_no")
CHOICES = [{"bucket": "low"}, {"bucket": "high"}, {"layers": (-1, 2)}]


@pytest.fixture(scope="module")
def questions():
    """Three questions of three lengths about three different images."""
    return three_questions()




def hf_candidates(knobs: dict, n_layers: int) -> list[int]:
    """transformers' ``dola_layers`` (``hidden_states`` indices) for an untied model (start layer 0)."""
    if "layers" in knobs:
        return [i + 1 for i in knobs["layers"]]
    if knobs["bucket"] == "low":
        return list(range(0, n_layers // 2, 2)) if n_layers <= 40 else list(range(0, 20, 2))
    return list(range(n_layers // 2, n_layers, 2)) if n_layers <= 40 else list(range(n_layers - 20, n_layers, 2))


def jsd(a, b):
    """JSD(softmax a, softmax b) = H(M) − ½·(H(P) + H(Q)), natural log, float64."""
    def entropy(p):
        return -(p * torch.log(p.clamp_min(1e-300))).sum(-1)

    p, q = torch.softmax(a.double(), -1), torch.softmax(b.double(), -1)
    return float(entropy(0.5 * (p + q)) - 0.5 * (entropy(p) + entropy(q)))


def released_scores(final_logits, premature, candidates, relative_top=0.1):
    """``(scores [vocab], hidden_states index chosen)`` as ``dola_greedy_decode`` computes them (batch of one)."""
    if len(candidates) == 1:
        chosen = candidates[0]
    else:
        stacked = torch.stack([premature[i] for i in candidates], dim=0)  # [L, 1, V]
        softmax_mature_layer = F.softmax(final_logits, dim=-1)
        softmax_premature_layers = F.softmax(stacked, dim=-1)
        M = 0.5 * (softmax_mature_layer[None, :, :] + softmax_premature_layers)
        log_softmax_mature_layer = F.log_softmax(final_logits, dim=-1)
        log_softmax_premature_layers = F.log_softmax(stacked, dim=-1)
        kl1 = F.kl_div(log_softmax_mature_layer[None, :, :], M, reduction="none").mean(-1)
        kl2 = F.kl_div(log_softmax_premature_layers, M, reduction="none").mean(-1)
        js_divs = (0.5 * (kl1 + kl2)).mean(-1)
        chosen = candidates[int(js_divs.argmax())]
    # relative_top_filter (min_tokens_to_keep = 1)
    scores_normalized = final_logits.log_softmax(dim=-1)
    base = premature[chosen].log_softmax(dim=-1)
    sorted_logits, _ = torch.sort(scores_normalized, descending=True)
    min_thresh = sorted_logits[..., 0]
    probs_thresh = torch.min(min_thresh, scores_normalized.max(-1).values + np.log(relative_top)).unsqueeze(-1)
    base[scores_normalized < probs_thresh] = -1e3
    scores_normalized[scores_normalized < probs_thresh] = -float("inf")
    return (scores_normalized - base)[0], chosen


def reference(lm, prompt, image, knobs):
    """(scores, package layer chosen, its JSD, final logits [vocab], readouts {hs index: [vocab]}) of one question."""
    model = plain_model(lm)
    with torch.no_grad():
        out = model(**lm.inputs(prompt, image), output_hidden_states=True, logits_to_keep=1)
        final = out.logits[:, -1].float()
        candidates = hf_candidates(knobs, len(out.hidden_states) - 1)
        premature = {j: model.lm_head(out.hidden_states[j][:, -1]).float() for j in candidates}
    scores, chosen = released_scores(final, premature, candidates, knobs.get("cutoff", 0.1))
    return scores, chosen - 1, jsd(final[0], premature[chosen][0]), final[0], {j: v[0] for j, v in premature.items()}


def assert_records(rec, layer, value, ref, lm):
    assert rec["dola_premature_layer"] == layer
    assert rec["dola_jsd"] == pytest.approx(value, rel=1e-4, abs=1e-7)
    yes, no = lm.tokens.yes_id, lm.tokens.no_id
    assert rec["decoding_cut_yes"] == float(bool(torch.isinf(ref[yes])))
    assert rec["decoding_cut_no"] == float(bool(torch.isinf(ref[no])))
    assert "decoding_aux_margin" not in rec  # DoLa runs no auxiliary forward


# --------------------------------------------------------------------------- the candidates
def test_buckets_are_transformers_layers_minus_one():
    assert bucket_layers("low", 32) == (-1, 1, 3, 5, 7, 9, 11, 13)
    assert bucket_layers("high", 32) == (15, 17, 19, 21, 23, 25, 27, 29)
    assert bucket_layers("low", 32) == tuple(j - 1 for j in range(0, 16, 2))
    assert bucket_layers("high", 32) == tuple(j - 1 for j in range(16, 32, 2))
    # more than 40 layers: the 20 below the middle / the last 20
    assert bucket_layers("low", 48) == tuple(j - 1 for j in range(0, 20, 2)) == (-1, 1, 3, 5, 7, 9, 11, 13, 15, 17)
    assert bucket_layers("high", 48) == tuple(j - 1 for j in range(28, 48, 2)) == (27, 29, 31, 33, 35, 37, 39, 41,
                                                                                      43, 45)
    assert bucket_layers("high", 40) == tuple(j - 1 for j in range(20, 40, 2))
    for n in (5, 8, 32, 40, 48, 80):
        for bucket in ("low", "high"):
            assert bucket_layers(bucket, n) == tuple(j - 1 for j in hf_candidates({"bucket": bucket}, n))
            assert all(-1 <= i <= n - 2 for i in bucket_layers(bucket, n))
            assert DoLa(DoLaKnobs(bucket=bucket)).readout_layers(n) == bucket_layers(bucket, n)


def test_layers_out_of_range_are_refused(embedded_model, questions):
    for bad in ((7,), (-2, 3), (100,)):
        with pytest.raises(UserError, match=r"out of range.*−1 \(the embeddings\) … 6"):
            DoLa(DoLaKnobs(layers=bad)).readout_layers(8)
    assert DoLa(DoLaKnobs(layers=(6, -1, 6))).readout_layers(8) == (-1, 6)
    lm = embedded_model
    with pytest.raises(UserError, match=r"−1 \(the embeddings\) … 6 \(the final layer, 7, is the mature one\)"):
        forward(lm, lm.inputs(questions[0][0], questions[1][0]), DoLa(DoLaKnobs(layers=(7,))))
    with pytest.raises(UserError):
        DoLaKnobs(layers=())
    with pytest.raises(UserError):
        DoLaKnobs(bucket="middle")
    with pytest.raises(UserError):
        DoLaKnobs(cutoff=1.0)


def test_the_selection_is_the_released_divergence_not_the_jsd():
    """The released codes' F.kl_div(log P, M) is KL(M‖P): the criterion is ½[KL(M‖P) + KL(M‖Q)], V × their mean."""
    g = torch.Generator().manual_seed(0)
    final, early = torch.randn(1, 50, generator=g), torch.randn(6, 50, generator=g) * 4
    mean = 0.5 * (F.kl_div(F.log_softmax(final, -1).expand(6, -1), 0.5 * (final.softmax(-1) + early.softmax(-1)),
                           reduction="none").mean(-1)
                  + F.kl_div(F.log_softmax(early, -1), 0.5 * (final.softmax(-1) + early.softmax(-1)),
                             reduction="none").mean(-1))
    got = selection_divergence(final.expand(6, -1), early)
    torch.testing.assert_close(got, 50 * mean.double(), rtol=1e-5, atol=0)
    # near distributions: both divergences agree to second order; far ones differ
    near = final + 1e-2 * torch.randn(1, 50, generator=g)
    assert float(selection_divergence(final, near)) == pytest.approx(jsd(final[0], near[0]), rel=1e-2)
    assert abs(float(got[0]) - jsd(final[0], early[0])) > 1e-3


# --------------------------------------------------------------------------- against the released code
@pytest.mark.parametrize("model", ["embedded_model", "tiny_gqa_model"])
@pytest.mark.parametrize("knobs", CHOICES)
def test_equals_the_released_construction(model, knobs, questions, request):
    lm = request.getfixturevalue(model)
    prompts, images = questions
    iv = DoLa(DoLaKnobs(**knobs))
    for b in range(3):
        ref, layer, value, final, _ = reference(lm, prompts[b], images[b], knobs)
        cap = forward(lm, lm.inputs(prompts[b], images[b]), iv).captures[0]
        assert_scores(cap.steps[0].final_logits, ref)
        assert_records(cap.row_records, layer, value, ref, lm)
        yes, no = lm.tokens.yes_id, lm.tokens.no_id
        assert cap.row_records["decoding_model_margin"] == pytest.approx(float(final[yes] - final[no]), abs=TOL)
    # the batched path, three questions of three paddings together
    inputs = batch_inputs(lm, prompts, images)
    assert len(set((inputs["attention_mask"] == 0).sum(-1).tolist())) == 3
    res = forward(lm, inputs, iv, keep=Keep(layers=False))
    last, records = res.logits, res.records
    for b in range(3):
        ref, layer, value, _, _ = reference(lm, prompts[b], images[b], knobs)
        assert_scores(last[b], ref)
        assert_records(records[b][-1], layer, value, ref, lm)
        assert all(documented(m, iv) for layer_rec in records[b].values() for m in layer_rec)


def test_a_question_where_the_jsd_would_choose_otherwise(embedded_model):
    """POPE adversarial #36, high bucket: the released divergence picks layer 5, the JSD proper would pick 3."""
    lm = embedded_model
    q = load_pope(shipped.pope_file("adversarial"))[36]
    prompt, image = build_prompt(q.text), load_image(resolve_image(q, shipped.IMAGES))
    knobs = {"bucket": "high"}
    ref, layer, value, final, premature = reference(lm, prompt, image, knobs)
    assert layer == 5
    by_jsd = max(premature, key=lambda j: jsd(final, premature[j])) - 1
    assert by_jsd == 3
    cap = forward(lm, lm.inputs(prompt, image), DoLa(DoLaKnobs(**knobs))).captures[0]
    assert_scores(cap.steps[0].final_logits, ref)
    assert_records(cap.row_records, layer, value, ref, lm)


def test_the_choice_varies_and_is_per_question(embedded_model, questions):
    """Over the three questions and buckets the chosen layers are read per row, not one per batch."""
    lm = embedded_model
    prompts, images = questions
    chosen = {}
    for knobs in CHOICES:
        iv = DoLa(DoLaKnobs(**knobs))
        inputs = batch_inputs(lm, prompts, images)
        records = forward(lm, inputs, iv, keep=Keep(layers=False)).records
        for b in range(3):
            alone = batch_inputs(lm, prompts[b:b + 1], images[b:b + 1])
            one = forward(lm, alone, iv, keep=Keep(layers=False)).records
            assert one[0][-1]["dola_premature_layer"] == records[b][-1]["dola_premature_layer"]
            assert one[0][-1]["dola_jsd"] == pytest.approx(records[b][-1]["dola_jsd"], rel=1e-4)
            chosen[(knobs.get("bucket"), b)] = records[b][-1]["dola_premature_layer"]
    low = [chosen[("low", b)] for b in range(3)]
    high = [chosen[("high", b)] for b in range(3)]
    assert set(low) <= {-1, 1} and set(high) == {3, 5}  # one batch, two premature layers


def test_the_cached_prefix_run_answers_as_the_full_one(embedded_model, questions):
    lm = embedded_model
    inputs = batch_inputs(lm, *questions)
    for knobs in CHOICES:
        iv = DoLa(DoLaKnobs(**knobs))
        _, steered = answer_pair(lm, *questions, iv, inputs=inputs)
        full = answer_batch(lm, *questions, iv, steer=True, inputs=inputs)
        for a, b in zip(steered, full):
            assert a["answer"] == b["answer"]
            assert a["margin"] == pytest.approx(b["margin"], abs=1e-4, nan_ok=True)


def test_dose_zero_is_the_final_layer_on_the_kept_tokens(embedded_model, questions):
    lm = embedded_model
    prompt, image = questions[0][1], questions[1][1]
    ref, layer, _, final, premature = reference(lm, prompt, image, {"bucket": "low"})
    cut = torch.isinf(ref)
    got = forward(lm, lm.inputs(prompt, image), DoLa(), dose=0.0).captures[0].steps[0].final_logits
    assert_scores(got, final.log_softmax(-1).masked_fill(cut, -torch.inf))
    # a half dose halves the premature term
    half = forward(lm, lm.inputs(prompt, image), DoLa(), dose=0.5).captures[0].steps[0].final_logits
    want = final.log_softmax(-1) - 0.5 * premature[layer + 1].log_softmax(-1)
    assert_scores(half, want.masked_fill(cut, -torch.inf))


# --------------------------------------------------------------------------- the rule
def _frame(*, label_yes: float, base_margin: float, steered_margin: float, jsd_value: float, layer: float = 1.0):
    rows = [("baseline", "label_yes", label_yes), ("baseline", "final_margin", base_margin),
            ("steered", "label_yes", label_yes), ("steered", "final_margin", steered_margin),
            ("steered", "dola_jsd", jsd_value), ("steered", "dola_premature_layer", layer),
            ("steered", "decoding_model_margin", base_margin), ("steered", "decoding_contrast_margin", steered_margin),
            ("steered", "decoding_cut_yes", 0.0), ("steered", "decoding_cut_no", 0.0)]
    cols = {c: [] for c in COLUMNS}
    for cond, metric, value in rows:
        for c, v in zip(COLUMNS, ("q1", cond, "prefill", 0, NO_LAYER, NO_HEAD, metric, value)):
            cols[c].append(v)
    return frame(cols)


def _cause(df):
    iv = DoLa()
    ev = Evidence(df, iv.rules(), iv.layer_sets)
    return ev, ev.cause("premature_agrees")


def test_premature_agrees_fires_on_a_wrong_answer_only():
    assert [r.id for r in dola_rules()] == ["premature_agrees", "cutoff_removes_flip"]
    assert JSD_AGREES == 1e-3
    # wrong (label Yes, answered No), the premature layer within 1e-3 nats of the final one: fires
    ev, cause = _cause(_frame(label_yes=1.0, base_margin=-2.0, steered_margin=-1.5, jsd_value=4e-4))
    assert cause.detected and cause.strength == pytest.approx(0.6)
    assert cause.evidence == {"jsd": 4e-4, "premature_layer": 1.0}
    assert ev.steered == [-1]
    # the same divergence on a right answer: not a failure to explain
    _, cause = _cause(_frame(label_yes=1.0, base_margin=2.0, steered_margin=2.5, jsd_value=4e-4))
    assert not cause.detected
    # a wrong answer whose premature layer is far from the final one: not this cause
    _, cause = _cause(_frame(label_yes=0.0, base_margin=3.0, steered_margin=1.0, jsd_value=0.2))
    assert not cause.detected
    # no DoLa records: skipped
    df = _frame(label_yes=1.0, base_margin=-2.0, steered_margin=-1.5, jsd_value=4e-4)
    _, cause = _cause(df[df["metric"] != "dola_jsd"])
    assert not cause.detected and "skipped" in cause.evidence


def test_premature_agrees_counterfactual_flips_the_bucket():
    ev, cause = _cause(_frame(label_yes=1.0, base_margin=-2.0, steered_margin=-1.5, jsd_value=1e-5))
    rule = next(r for r in dola_rules() if r.id == "premature_agrees")
    spec = rule.counterfactual(ev, cause)
    assert "bucket" in spec.why
    for knobs, bucket in ((DoLaKnobs(), "high"), (DoLaKnobs(bucket="high"), "low"),
                          (DoLaKnobs(layers=(-1, 2)), "high")):
        changed = dataclasses.replace(knobs, **spec.knobs_of(knobs))
        assert changed.bucket == bucket and changed.layers is None and changed.cutoff == knobs.cutoff
    assert math.isfinite(cause.strength)


def test_halcs_first_token_is_dola_over_every_second_layer():
    # HALC's DoLa candidates [0, 2, …, 30] of hidden_states (the embeddings first) on a 32-layer model
    assert bucket_layers("all", 32) == tuple(j - 1 for j in range(0, 32, 2)) == tuple(range(-1, 30, 2))
    assert DoLa.from_preset("halc-first-token").readout_layers(8) == (-1, 1, 3, 5)

"""CausalMM on the seam equals CausalMM written as its released code does it (the vision level), and as the module
docstring states its language level.

The reference follows ``The-Martyr/CausalMM``'s ``cf_encoder.py`` (``edit_attention``, ``apply_attention``)
and ``causalmm_sm.py`` (the contrast) in plain PyTorch on a fresh copy of the model: the vision tower's
``hidden_states[-2][:, 1:]`` weighted by its ``attentions[-2]`` edited, resized to 24 × 24 and averaged over
the heads, the projector, the language model run with those image features (a forward hook replaces the
projector's output, so that the model merges them itself), and (1 + γ)·z − γ·z_cf cut where
``z < log ε + max z``. Only its randomness comes from the same seeded generator as the package's, and it
reads the last position's logits with ``logits_to_keep=1`` as the package's forwards do (the unembedding of
one position sums in another order than that of every position: ~5e-6 apart on the embedded model).

The language level's reference (no released code) patches transformers' own ``eager_attention_forward`` of a
fresh model so that, in every decoder layer, each query's softmax row is replaced by its counterfactual, built
query by query with loops in plain PyTorch; only the draws (U(0, 1) [H, L, L] per layer, from one generator per
prompt seeded with ``seed``) are shared with the package.
"""

import json
import math
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from floors import logit_floor
from plain_refs import DECODING, plain_model, positions_run, three_questions
from transformers import LlavaForConditionalGeneration
from transformers.models.llama import modeling_llama

from mclcbf_diag.engine.batch import answer_batch, answer_pair, batch_inputs
from mclcbf_diag.engine.runner import Keep, forward
from mclcbf_diag.errors import UserError
from mclcbf_diag.interventions.causalmm import CausalMM, CausalMMKnobs, counterfactual_features, counterfactual_map

METHODS = ("shuffle", "random", "uniform", "reversed")


@pytest.fixture(scope="module")
def questions():
    """Three questions of three lengths about three different images."""
    return three_questions()




def edit_attention(a, method, seed):
    """``cf_encoder.py``'s ``edit_attention`` on [B, H, N, N], its randomness from a generator seeded with ``seed``."""
    b, h, n, w = a.shape
    g = torch.Generator().manual_seed(seed)
    if method == "random":
        return torch.rand(b, h, n, w, generator=g) * 2
    if method == "uniform":
        return torch.mean(a, dim=(2, 3), keepdim=True).expand(b, h, n, w)
    if method == "reversed":
        top, _ = torch.max(a, dim=2, keepdim=True)
        top, _ = torch.max(top, dim=3, keepdim=True)
        return top - a
    out = a.clone()
    for i in range(h):
        out[:, i] = out[:, i].reshape(b, -1).gather(1, torch.randperm(n * w, generator=g).expand(b, -1)).view(b, n, w)
    return out


def reference_scores(lm, prompt, image, method, *, seed=0, gamma=1.0, epsilon=0.6):
    """(scores [vocab] with −inf where cut, z, z_cf) of one question, as the released code computes them."""
    model = plain_model(lm)
    assert model.config.vision_feature_layer == -2 and model.config.vision_feature_select_strategy == "default"
    inputs = lm.inputs(prompt, image)
    with torch.no_grad():
        out = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True, output_attentions=True)
        feat = out.hidden_states[-2][:, 1:]
        a_cf = edit_attention(out.attentions[-2], method, seed)
        m = F.interpolate(a_cf, size=(24, 24), mode="bilinear", align_corners=False).mean(dim=1)
        embeds_cf = model.model.multi_modal_projector(feat * m.view(feat.shape[0], 576, 1))
        z = model(**inputs, logits_to_keep=1).logits[0, -1]
        hook = model.model.multi_modal_projector.register_forward_hook(lambda mod, args, output: embeds_cf)
        try:
            z_cf = model(**inputs, logits_to_keep=1).logits[0, -1]
        finally:
            hook.remove()
    diffs = (1 + gamma) * z - gamma * z_cf
    cutoff = torch.log(torch.tensor(epsilon)) + z.max(dim=-1, keepdim=True).values  # ε = 0: −inf, nothing cut
    return diffs.masked_fill(z < cutoff, -float("inf")), z, z_cf


def package_run(lm, prompt, image, **knobs):
    return forward(lm, lm.inputs(prompt, image), CausalMM(CausalMMKnobs(**knobs))).captures[0]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("epsilon", [0.6, 1e-3, 0.0])
def test_equals_the_released_construction(embedded_model, questions, method, epsilon):
    lm = embedded_model
    prompt, image = questions[0][0], questions[1][0]
    ref, z, z_cf = reference_scores(lm, prompt, image, method, epsilon=epsilon)
    cap = package_run(lm, prompt, image, attention=method, epsilon=epsilon)
    got = cap.steps[0].final_logits.float()
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    finite = torch.isfinite(ref)
    assert int(finite.sum()) >= 1
    torch.testing.assert_close(got[finite], ref[finite], rtol=0, atol=1e-5)
    # the auxiliary forward is a different one (the counterfactual changed the image features)
    assert float((z - z_cf).abs().max()) > 1e-3
    yes, no = lm.tokens.yes_id, lm.tokens.no_id
    rec = cap.row_records
    assert rec["decoding_model_margin"] == pytest.approx(float(z[yes] - z[no]), abs=1e-5)
    assert rec["decoding_aux_margin"] == pytest.approx(float(z_cf[yes] - z_cf[no]), abs=1e-5)
    assert rec["decoding_contrast_margin"] == pytest.approx(float(2 * (z[yes] - z[no]) - (z_cf[yes] - z_cf[no])),
                                                            abs=1e-5)
    assert rec["decoding_cut_yes"] == float(bool(torch.isinf(ref[yes])))
    assert rec["decoding_cut_no"] == float(bool(torch.isinf(ref[no])))


def test_the_features_carry_the_map(embedded_model, questions):
    """Uniform: every patch weighted 1/N (N = 577), so the projector reads feat / 577."""
    lm = embedded_model
    inputs = lm.inputs(questions[0][0], questions[1][0])
    model = plain_model(lm)
    with torch.no_grad():
        feat = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states[-2][:, 1:]
        expected = model.model.multi_modal_projector(feat / 577)[0]
    got = counterfactual_features(lm, inputs["pixel_values"], "uniform", 0)
    assert len(got) == 1 and got[0].shape == expected.shape
    torch.testing.assert_close(got[0], expected, rtol=0, atol=1e-5)


def test_the_full_strategy_weights_cls_by_the_maps_mean(embedded_model, questions):
    """``full`` (CLS kept): the patches as under ``default``, the CLS feature times the map's mean."""
    lm = embedded_model
    full = LlavaForConditionalGeneration.from_pretrained(lm.source, dtype=torch.float32, attn_implementation="eager",
                                                         local_files_only=True,
                                                         vision_feature_select_strategy="full").eval()
    assert full.config.vision_feature_select_strategy == "full"
    lm_full = SimpleNamespace(model=full, adapter=lm.adapter, source="full")
    pixels = lm.inputs(questions[0][0], questions[1][0])["pixel_values"]
    patches = counterfactual_features(lm, pixels, "reversed", 0)[0]
    got = counterfactual_features(lm_full, pixels, "reversed", 0)[0]
    assert got.shape[0] == patches.shape[0] + 1 == 577
    torch.testing.assert_close(got[1:], patches, rtol=0, atol=1e-6)
    with torch.no_grad():
        out = full.model.vision_tower(pixels, output_hidden_states=True, output_attentions=True)
        m = F.interpolate(edit_attention(out.attentions[-2], "reversed", 0), size=(24, 24), mode="bilinear",
                          align_corners=False).mean(dim=1)
        cls = full.model.multi_modal_projector(out.hidden_states[-2][:, :1] * m.mean())[0, 0]
    torch.testing.assert_close(got[0], cls, rtol=0, atol=1e-5)


def _batch_scores(lm, prompts, images, iv):
    inputs = batch_inputs(lm, prompts, images)
    res = forward(lm, inputs, iv, keep=Keep(layers=False))
    last, records = res.logits, res.records
    return last, records


@pytest.mark.parametrize("method", ["shuffle", "random"])
def test_a_question_scores_the_same_alone_and_in_a_batch(embedded_model, questions, method):
    lm = embedded_model
    prompts, images = questions
    iv = CausalMM(CausalMMKnobs(attention=method, epsilon=1e-3))
    together, records = _batch_scores(lm, prompts, images, iv)
    for b in range(3):
        alone, rec_alone = _batch_scores(lm, prompts[b:b + 1], images[b:b + 1], iv)
        assert torch.equal(torch.isinf(alone[0]), torch.isinf(together[b]))
        finite = torch.isfinite(alone[0])
        torch.testing.assert_close(together[b][finite], alone[0][finite], rtol=0, atol=1e-4)
        for metric in DECODING:
            assert records[b][-1][metric] == pytest.approx(rec_alone[0][-1][metric], abs=1e-4)


def test_records_are_whole_model_records(embedded_model, questions):
    lm = embedded_model
    iv = CausalMM()
    cap = package_run(lm, questions[0][1], questions[1][1])
    assert set(DECODING) <= set(cap.row_records)
    _, records = _batch_scores(lm, questions[0], questions[1], iv)
    for rec in records:
        assert set(DECODING) <= set(rec[-1])
        assert rec[-1]["decoding_cut_yes"] in (0.0, 1.0) and rec[-1]["decoding_cut_no"] in (0.0, 1.0)


def test_the_cached_prefix_run_answers_as_the_full_one(embedded_model, questions):
    """answer_pair continues from the baseline's cache at the decision token: the same answers."""
    lm = embedded_model
    iv = CausalMM(CausalMMKnobs(epsilon=1e-3))
    _, steered = answer_pair(lm, *questions, iv)
    full = answer_batch(lm, *questions, iv, steer=True)
    for a, b in zip(steered, full):
        assert a["answer"] == b["answer"]
        assert a["margin"] == pytest.approx(b["margin"], abs=1e-4)


def test_the_baseline_is_untouched(embedded_model, questions):
    """A measuring run opens no site: its final logits are the model's."""
    lm = embedded_model
    prompt, image = questions[0][2], questions[1][2]
    cap = forward(lm, lm.inputs(prompt, image), CausalMM(), steer=False).captures[0]
    with torch.no_grad():
        plain = plain_model(lm)(**lm.inputs(prompt, image), logits_to_keep=1).logits[0, -1]
    torch.testing.assert_close(cap.steps[0].final_logits.float(), plain, rtol=0, atol=1e-5)
    assert not cap.row_records or "decoding_aux_margin" not in cap.row_records


def test_the_dose_scales_gamma(embedded_model, questions):
    lm = embedded_model
    prompt, image = questions[0][1], questions[1][1]
    half = package_run(lm, prompt, image, gamma=0.5, epsilon=1e-3).steps[0].final_logits
    inputs = lm.inputs(prompt, image)
    dosed = forward(lm, inputs, CausalMM(CausalMMKnobs(gamma=1.0, epsilon=1e-3)),
                    dose=0.5).captures[0].steps[0].final_logits
    finite = torch.isfinite(half)
    assert torch.equal(finite, torch.isfinite(dosed))
    torch.testing.assert_close(dosed[finite], half[finite], rtol=0, atol=1e-5)


@pytest.mark.parametrize("bad", [{"epsilon": 1.5}, {"attention": "bogus"}, {"gamma": -1.0}])
def test_bad_knobs_are_refused(bad):
    with pytest.raises(UserError):
        CausalMMKnobs(**bad)
    with pytest.raises(UserError):
        CausalMM.from_preset(None, [f"{k}={v}" for k, v in bad.items()])


def test_the_seed_makes_the_numbers(embedded_model, questions):
    lm = embedded_model
    prompt, image = questions[0][0], questions[1][0]
    first = package_run(lm, prompt, image, epsilon=0.0)
    again = package_run(lm, prompt, image, epsilon=0.0)
    assert torch.equal(first.steps[0].final_logits, again.steps[0].final_logits)
    assert first.row_records["decoding_aux_margin"] == again.row_records["decoding_aux_margin"]
    other = package_run(lm, prompt, image, epsilon=0.0, seed=1)
    assert first.row_records["decoding_aux_margin"] != other.row_records["decoding_aux_margin"]
    a = torch.softmax(torch.randn(2, 9, 9), -1)
    m0, m0_again, m1 = (counterfactual_map(a, "shuffle", s) for s in (0, 0, 1))
    assert torch.equal(m0, m0_again) and not torch.equal(m0, m1)
    # a shuffle permutes each head's entries: the same values, elsewhere
    for h in range(2):
        assert torch.equal(m0[h].flatten().sort().values, a[h].flatten().sort().values)


def test_the_maps_by_hand():
    a = torch.softmax(torch.randn(3, 5, 5), -1)
    torch.testing.assert_close(counterfactual_map(a, "uniform", 0), torch.full((3, 5, 5), 1 / 5))
    rev = counterfactual_map(a, "reversed", 0)
    assert torch.equal(rev, a.amax(dim=(1, 2), keepdim=True) - a)
    rnd = counterfactual_map(a, "random", 0)
    assert rnd.shape == (3, 5, 5) and float(rnd.min()) >= 0 and float(rnd.max()) < 2


def test_other_layouts_are_refused():
    """LLaVA-NeXT (tiles), Gemma 3 (pooled patches, named as such) and a list of feature layers are not LLaVA-1.5
    layouts."""
    next_cfg = SimpleNamespace(model_type="llava_next", vision_feature_layer=-2,
                               vision_feature_select_strategy="default")
    lm = SimpleNamespace(model=SimpleNamespace(config=next_cfg), source="llava-hf/llava-v1.6-mistral-7b-hf")
    with pytest.raises(UserError, match="llava-v1.6.*LLaVA-1.5"):
        counterfactual_features(lm, torch.zeros(1, 5, 3, 336, 336), "shuffle", 0)
    gemma = SimpleNamespace(model=SimpleNamespace(config=SimpleNamespace(model_type="gemma3")), source="g")
    with pytest.raises(UserError, match="Gemma 3 reads the tower's last state") as refused:
        counterfactual_features(gemma, torch.zeros(1, 3, 896, 896), "shuffle", 0)
    assert "tiles" not in str(refused.value)
    multi = SimpleNamespace(model_type="llava", vision_feature_layer=[-2, -5], vision_feature_select_strategy="default")
    lm = SimpleNamespace(model=SimpleNamespace(config=multi), source="m")
    with pytest.raises(UserError, match="one vision feature layer"):
        counterfactual_features(lm, torch.zeros(1, 3, 336, 336), "shuffle", 0)


def test_the_families_it_cannot_run_on_are_named_before_loading():
    """``model_type_problem`` per family, as the command line asks before the model loads: the vision level and
    ``both`` run on LLaVA (one patch grid) only, each other family refused with its own reason and advice that holds
    (a LLaVA-1.5 model, not another tiled family); the language level runs on every family. VCD's default rule (the
    pixel tensor) refuses the flattened-patch families only, and a method reading no pixels refuses none."""
    from mclcbf_diag.interventions import resolve
    from mclcbf_diag.interventions.causalmm import NOT_ONE_GRID
    from mclcbf_diag.models.families import FAMILIES

    for family in FAMILIES:
        for preset in ("pope", "both"):
            problem = resolve("causalmm", preset).model_type_problem(family.model_type)
            if family.model_type == "llava":
                assert problem is None
            else:
                assert NOT_ONE_GRID[family.model_type] in problem and "use a LLaVA-1.5 model" in problem, problem
                assert "another family" not in problem
        assert resolve("causalmm", "language").model_type_problem(family.model_type) is None
        vcd = resolve("vcd", None).model_type_problem(family.model_type)
        assert (vcd is None) == (not family.flat_pixels), (family.name, vcd)
        assert resolve("dola", None).model_type_problem(family.model_type) is None
    assert resolve("causalmm", None).model_type_problem(None) is None  # no model_type: the load reports it


# --------------------------------------------------------------------------- the language level
def reference_rows(p, method, g):
    """The counterfactual of one prompt's attention ``p`` [H, L, L], query by query (the module docstring's recipe)."""
    heads, n, _ = p.shape
    draws = torch.rand((heads, n, n), generator=g) if method in ("random", "shuffle") else None
    top = p.amax(dim=(1, 2))  # hidden entries are 0: the head's maximum over its visible ones
    out = torch.zeros(heads, n, n)
    for q in range(n):
        row = p[:, q, :q + 1]
        if method == "random":
            c = draws[:, q, :q + 1] * 2
        elif method == "uniform":
            c = torch.ones_like(row)
        elif method == "reversed":
            c = top[:, None] - row
        else:
            c = torch.stack([row[h][torch.argsort(draws[h, q, :q + 1])] for h in range(heads)])
        total = c.sum(-1, keepdim=True)
        out[:, q, :q + 1] = torch.where(total > 0, c / total.clamp(min=1e-30), torch.full_like(c, 1 / (q + 1)))
    return out


@contextmanager
def counterfactual_eager(monkeypatch, method, seed, pads):
    """transformers' eager attention with each row's softmax probabilities replaced by :func:`reference_rows`."""
    plain = modeling_llama.eager_attention_forward
    gens = [torch.Generator().manual_seed(seed) for _ in pads]

    def edited(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        k = modeling_llama.repeat_kv(key, module.num_key_value_groups)
        v = modeling_llama.repeat_kv(value, module.num_key_value_groups)
        w = torch.matmul(query, k.transpose(2, 3)) * scaling + attention_mask
        w = torch.softmax(w, dim=-1, dtype=torch.float32).to(query.dtype)
        for b, pad in enumerate(pads):
            w[b, :, pad:, pad:] = reference_rows(w[b, :, pad:, pad:], method, gens[b])
        return torch.matmul(w, v).transpose(1, 2).contiguous(), w

    with monkeypatch.context() as m:
        m.setattr(modeling_llama, "eager_attention_forward", edited)
        yield
    assert modeling_llama.eager_attention_forward is plain


def reference_language(lm, monkeypatch, prompt, image, method, *, seed=0, gamma=1.0, epsilon=0.6, vision=False):
    """(scores with −inf where cut, z, z_cf) of one question: z_cf under the counterfactual language attention (with
    ``vision``, on the counterfactual image features of :func:`reference_scores` too)."""
    model = plain_model(lm)
    inputs = lm.inputs(prompt, image)
    hook = None
    with torch.no_grad():
        z = model(**inputs, logits_to_keep=1).logits[0, -1]
        if vision:
            out = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True, output_attentions=True)
            feat = out.hidden_states[-2][:, 1:]
            m = F.interpolate(edit_attention(out.attentions[-2], method, seed), size=(24, 24), mode="bilinear",
                              align_corners=False).mean(dim=1)
            embeds_cf = model.model.multi_modal_projector(feat * m.view(feat.shape[0], 576, 1))
            hook = model.model.multi_modal_projector.register_forward_hook(lambda mod, args, output: embeds_cf)
        try:
            with counterfactual_eager(monkeypatch, method, seed, [0]):
                z_cf = model(**inputs, logits_to_keep=1).logits[0, -1]
        finally:
            if hook is not None:
                hook.remove()
    diffs = (1 + gamma) * z - gamma * z_cf
    cutoff = torch.log(torch.tensor(epsilon)) + z.max()
    return diffs.masked_fill(z < cutoff, -float("inf")), z, z_cf


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("level", ["language", "both"])
def test_the_language_level_equals_its_reference(embedded_model, questions, monkeypatch, method, level):
    """The counterfactual forward's logits equal the patched eager model's within the logit floor; the scores are
    (1 + γ)·z − γ·z_cf, cut where z < log ε + max z."""
    lm = embedded_model
    prompt, image = questions[0][0], questions[1][0]
    ref, z, z_cf = reference_language(lm, monkeypatch, prompt, image, method, epsilon=1e-3, vision=level == "both")
    floor = logit_floor(lm.model)
    iv = CausalMM(CausalMMKnobs(attention=method, level=level, epsilon=1e-3))
    aux = iv.auxiliary(lm, lm.inputs(prompt, image), rows_for(lm, prompt, image))[0]
    torch.testing.assert_close(aux, z_cf, rtol=0, atol=floor)
    assert float((z - z_cf).abs().max()) > 100 * floor  # a different forward
    cap = forward(lm, lm.inputs(prompt, image), iv).captures[0]
    got = cap.steps[0].final_logits.float()
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    finite = torch.isfinite(ref)
    torch.testing.assert_close(got[finite], ref[finite], rtol=0, atol=3 * floor)  # (1 + γ)·z + γ·z_cf: 3 floors
    yes, no = lm.tokens.yes_id, lm.tokens.no_id
    rec = cap.row_records
    assert rec["decoding_aux_margin"] == pytest.approx(float(z_cf[yes] - z_cf[no]), abs=2 * floor)
    assert rec["decoding_contrast_margin"] == pytest.approx(float(2 * (z[yes] - z[no]) - (z_cf[yes] - z_cf[no])),
                                                            abs=6 * floor)


def rows_for(lm, prompt, image):
    from mclcbf_diag.interventions.base import rows_of

    inputs = lm.inputs(prompt, image)
    return rows_of(inputs["input_ids"], inputs["attention_mask"], lm.tokens.image_token_id)


def test_the_language_rows_by_hand():
    """Every counterfactual row is a distribution over its visible keys; uniform is 1/(q + 1); shuffle permutes."""
    from mclcbf_diag.interventions.causalmm import counterfactual_rows

    hidden = ~torch.ones(6, 6, dtype=torch.bool).tril()
    scores = torch.randn(2, 6, 6, generator=torch.Generator().manual_seed(5))
    p = torch.softmax(scores.masked_fill(hidden, -torch.inf), -1)
    for method in METHODS:
        cf = counterfactual_rows(p, method, torch.Generator().manual_seed(0))
        assert float(cf[:, hidden].abs().max()) == 0
        torch.testing.assert_close(cf.sum(-1), torch.ones(2, 6), rtol=0, atol=1e-6)
    uniform = counterfactual_rows(p, "uniform", torch.Generator())
    torch.testing.assert_close(uniform[0, 3, :4], torch.full((4,), 0.25))
    shuffled = counterfactual_rows(p, "shuffle", torch.Generator().manual_seed(0))
    for q in range(6):
        torch.testing.assert_close(shuffled[1, q, :q + 1].sort().values, p[1, q, :q + 1].sort().values,
                                   rtol=0, atol=1e-6)  # renormalised: its sum is 1 up to rounding
    rev = counterfactual_rows(p, "reversed", torch.Generator())
    assert torch.equal(rev[:, 0, 0], torch.ones(2))  # one visible key: max − p = 0, read as the uniform row
    # a mask that is not causal (a bidirectional block, a window): the keys it leaves are the ones shuffled
    visible = ~hidden
    visible[1, 2], visible[5, 0] = True, False
    q = torch.softmax(scores.masked_fill(~visible, -torch.inf), -1)
    for method in METHODS:
        cf = counterfactual_rows(q, method, torch.Generator().manual_seed(0), visible)
        assert float(cf[:, ~visible].abs().max()) == 0
        torch.testing.assert_close(cf.sum(-1), torch.ones(2, 6), rtol=0, atol=1e-6)
    cf = counterfactual_rows(q, "shuffle", torch.Generator().manual_seed(0), visible)
    for r in range(6):
        torch.testing.assert_close(cf[0, r][visible[r]].sort().values, q[0, r][visible[r]].sort().values,
                                   rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["shuffle", "random"])
def test_the_language_level_scores_a_question_the_same_alone_and_in_a_batch(embedded_model, questions, method):
    lm = embedded_model
    prompts, images = questions
    iv = CausalMM(CausalMMKnobs(attention=method, level="language", epsilon=1e-3))
    together, _ = _batch_scores(lm, prompts, images, iv)
    floor = logit_floor(lm.model)
    for b in (0, 2):
        alone, _ = _batch_scores(lm, prompts[b:b + 1], images[b:b + 1], iv)
        finite = torch.isfinite(alone[0])
        assert torch.equal(finite, torch.isfinite(together[b]))
        torch.testing.assert_close(together[b][finite], alone[0][finite], rtol=0, atol=3 * floor)


def test_the_level_is_in_the_run_identity():
    assert CausalMM().describe()["knobs"]["level"] == "vision"
    iv = CausalMM.from_preset(None, ["level=language"])
    assert iv.describe()["knobs"]["level"] == "language"
    assert CausalMM.from_preset("both").knobs.level == "both"
    with pytest.raises(UserError):
        CausalMM.from_preset(None, ["level=bogus"])


def test_pope_runs_at_the_language_level(embedded_model, tmp_path):
    from mclcbf_diag.cli import main

    # the level is applied: without the cutoff (which leaves ±inf at these questions) the two levels' contrasts differ
    margins = {}
    for level in ("language", "vision"):
        assert main(["pope", "--split", "adversarial", "--limit", "2", "--intervention", "causalmm", "--set",
                     f"level={level}", "--set", "epsilon=0", "--out", str(tmp_path / level)]) == 0
        margins[level] = [json.loads(x)["steered_margin"]
                          for x in (tmp_path / level / "answers.jsonl").read_text().splitlines()]
    assert json.loads((tmp_path / "language" / "run.json").read_text())["config"]["level"] == "language"  # identity
    assert len(margins["language"]) == 2 and all(math.isfinite(m) for m in margins["language"] + margins["vision"])
    assert any(abs(a - b) > 1e-3 for a, b in zip(margins["language"], margins["vision"]))
    assert not CausalMM.from_preset("language").reads_pixels and CausalMM.from_preset("pope").reads_pixels


@pytest.mark.parametrize("level", ["vision", "language", "both"])
def test_auxiliary_forwards_counts_the_forwards_run(embedded_model, questions, level):
    """The batch's forwards as they run (decoder layer 0's attention, [rows, positions] per call): the vision level's
    counterfactual is B more rows of the baseline's forward, the language level's (and both's) one forward of its own
    over every position; then the intervened continuation of one position. One auxiliary forward at each level."""
    from mclcbf_diag.engine.batch import answer_pair

    lm = embedded_model
    prompts, images = questions
    iv = CausalMM(CausalMMKnobs(level=level))
    calls = positions_run(lm, lambda: answer_pair(lm, prompts, images, iv))
    B = len(prompts)
    S = calls[0][1]
    own = [(2 * B, S)] if level == "vision" else [(B, S), (B, S)]
    assert calls == [*own, (B, 1)] and iv.auxiliary_forwards() == 1


def test_epsilon_is_the_cutoff_the_rule_undoes():
    # ε keeps tokens with p ≥ ε·p_max, as VCD's β: the rule that finds the flipped token cut out, and its fix (ε = 0)
    iv = CausalMM()
    assert "cutoff_removes_flip" in [r.id for r in iv.rules()]
    assert iv.fixes() == {"no_cutoff": {"epsilon": 0.0}}
    assert iv.cause_fix("cutoff_removes_flip") == "no_cutoff"


@pytest.mark.parametrize("method, generate", [(("causalmm", "language"), 0), (("causalmm", "language"), 2),
                                              (("vcd",), 2)])
def test_pope_records_the_baselines_masses_not_the_counterfactual_forwards(embedded_model, method, generate):
    """The language level's counterfactual forward runs over the whole prompt between the baseline's and the
    continuation, and with ``generate`` a view (VCD's noised image) runs beside every step; pope's records must take
    the image masses of the question's own forwards: the baseline's equal a plain run's (knockout, whose baseline is
    the same plain forward), and, as the method edits no activation, the intervened forward's equal them too."""
    from mclcbf_diag import pope
    from mclcbf_diag.interventions import resolve

    jobs = pope.select_jobs(pope.question_files("adversarial", None, None), 2, None)
    plain = pope.answer_jobs(embedded_model, jobs, resolve("knockout"), generate=generate)
    timing = {}
    recs = pope.answer_jobs(embedded_model, jobs, resolve(*method), generate=generate, timing=timing)
    for p, r in zip(plain, recs):
        for layer in range(embedded_model.n_layers):
            key = f"image_mass_{layer}"
            assert r[f"baseline_{key}"] == pytest.approx(p[f"baseline_{key}"], abs=2e-6), layer  # 6 decimals kept
            assert r[f"steered_{key}"] == pytest.approx(r[f"baseline_{key}"], abs=2e-6)
    assert timing["baseline_seconds"] > 0

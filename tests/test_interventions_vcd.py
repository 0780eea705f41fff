"""VCD on the seam equals VCD written as its released code does it.

The reference follows ``DAMO-NLP-SG/VCD``'s ``vcd_add_noise.py`` (``add_diffusion_noise``: a 1000-step
sigmoid β schedule, x_t = √ᾱ_t·x_0 + √(1 − ᾱ_t)·ε on the processor's normalised pixels, in float32 as
there) and ``vcd_sample.py`` (the contrast: (1 + α)·z − α·z_cd, −inf where ``z < log β + max z``) in plain
PyTorch on a fresh copy of the model. Only its ε is drawn as the package draws it (one generator seeded
with ``seed`` per image, instead of the global RNG's ``randn_like``), and it reads the last position's
logits with ``logits_to_keep=1`` as the package's forwards do.
"""

import math

import pytest
import torch
from plain_refs import DECODING, add_diffusion_noise, assert_scores, seeded_noise, three_questions, vcd_reference

from mclcbf_diag.engine.batch import answer_batch, answer_pair, batch_inputs
from mclcbf_diag.engine.runner import Keep, forward
from mclcbf_diag.errors import UserError
from mclcbf_diag.interventions.vcd import VCD, VCDKnobs
from mclcbf_diag.interventions.views import diffusion_noise, diffusion_schedule, pixels_of
from mclcbf_diag.measurements.records import documented

TOL = 1e-5  # float32 logits of two forwards each, the package's vs a plain HF model's


@pytest.fixture(scope="module")
def questions():
    """Three questions of three lengths about three different images."""
    return three_questions()




reference_scores = vcd_reference  # (scores with −inf where cut, z, z_cd) of one question, as the released code does


def package_run(lm, prompt, image, dose=1.0, **knobs):
    return forward(lm, lm.inputs(prompt, image), VCD(VCDKnobs(**knobs)), dose=dose).captures[0]


def _batch(lm, prompts, images, iv):
    inputs = batch_inputs(lm, prompts, images)
    res = forward(lm, inputs, iv, keep=Keep(layers=False))
    return res.logits, res.records


# --------------------------------------------------------------------------- the noise
def test_the_schedule_by_hand():
    """√ᾱ_500 ≈ 0.8630, √(1 − ᾱ_500) ≈ 0.5052 (the released formula's figures); more noise later."""
    bar = diffusion_schedule()
    assert bar.shape == (1000,)
    assert float(bar[500].sqrt()) == pytest.approx(0.8630, abs=5e-5)
    assert float((1 - bar[500]).sqrt()) == pytest.approx(0.5052, abs=5e-5)
    assert float(bar[999].sqrt()) == pytest.approx(0.2850, abs=5e-5)
    assert float(bar[400].sqrt()) == pytest.approx(0.9449, abs=5e-5)
    assert bool((bar[1:] < bar[:-1]).all())
    # the released float32 computation agrees to float32's precision: 1 − ᾱ_t in float32 near t = 0 (ᾱ ≈ 1)
    # keeps few digits, so √(1 − ᾱ_t) is up to 5e-6 from the package's float64 one there (2e-6 from t = 100 on)
    x0, eps = torch.zeros(1), torch.ones(1)
    for t in range(1000):
        assert float(add_diffusion_noise(x0, t, eps)) == pytest.approx(float((1 - bar[t]).sqrt()), abs=1e-5)
        assert float(add_diffusion_noise(eps, t, x0)) == pytest.approx(float(bar[t].sqrt()), abs=1e-6)


def test_the_noise_equals_the_released_q_x():
    pixels = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    for step in (0, 500, 999):
        got = diffusion_noise(pixels, step, 7)
        want = torch.stack([add_diffusion_noise(x, step, seeded_noise(x, 7)) for x in pixels])
        torch.testing.assert_close(got, want, rtol=0, atol=3e-5)  # |ε| < 6 times the float32 schedule's 5e-6
    # each image draws the same ε from the seed: two equal images get equal views
    same = diffusion_noise(pixels[:1].expand(3, -1, -1, -1), 500, 7)
    assert torch.equal(same[0], same[2])
    assert not torch.equal(diffusion_noise(pixels, 500, 7), diffusion_noise(pixels, 500, 8))


@pytest.mark.parametrize("step", [-1, 1000])
def test_noise_step_bounds(step):
    with pytest.raises(ValueError, match="0 … 999"):
        diffusion_noise(torch.zeros(1, 3, 2, 2), step, 0)
    with pytest.raises(UserError, match="noise_step"):
        VCDKnobs(noise_step=step)
    assert VCDKnobs(noise_step=0).noise_step == 0 and VCDKnobs(noise_step=999).noise_step == 999


# --------------------------------------------------------------------------- against the released code
@pytest.mark.parametrize("model", ["embedded_model", "tiny_gqa_model"])
@pytest.mark.parametrize("knobs", [{}, {"beta": 1e-3, "alpha": 0.5, "noise_step": 999, "seed": 3}, {"beta": 0.0}])
def test_equals_the_released_construction(model, knobs, questions, request):
    lm = request.getfixturevalue(model)
    prompts, images = questions
    ref, z, z_cd = reference_scores(lm, prompts[0], images[0], **knobs)
    cap = package_run(lm, prompts[0], images[0], **knobs)
    assert_scores(cap.steps[0].final_logits, ref)
    # the noised image is another forward
    assert float((z - z_cd).abs().max()) > 1e-3
    alpha = knobs.get("alpha", 1.0)
    yes, no = lm.tokens.yes_id, lm.tokens.no_id
    rec = cap.row_records
    assert rec["decoding_model_margin"] == pytest.approx(float(z[yes] - z[no]), abs=TOL)
    assert rec["decoding_aux_margin"] == pytest.approx(float(z_cd[yes] - z_cd[no]), abs=TOL)
    assert rec["decoding_contrast_margin"] == pytest.approx(
        float((1 + alpha) * (z[yes] - z[no]) - alpha * (z_cd[yes] - z_cd[no])), abs=TOL)
    assert rec["decoding_cut_yes"] == float(bool(torch.isinf(ref[yes])))
    assert rec["decoding_cut_no"] == float(bool(torch.isinf(ref[no])))
    if knobs.get("beta") == 0.0:
        assert bool(torch.isfinite(ref).all())
    # the batched path (shared image features, the pixels kept beside them) reads the same scores
    inputs = batch_inputs(lm, prompts[:1], images[:1])
    assert "pixel_values" not in inputs and "pixel_values" in inputs["mm_encoder_outputs"]
    torch.testing.assert_close(pixels_of(inputs), lm.inputs(prompts[0], images[0])["pixel_values"], rtol=0, atol=0)
    res = forward(lm, inputs, VCD(VCDKnobs(**knobs)), keep=Keep(layers=False))
    last, records = res.logits, res.records
    assert_scores(last[0], ref)
    for metric in DECODING:
        assert records[0][-1][metric] == pytest.approx(rec[metric], abs=TOL)
    assert all(documented(m, VCD()) for layer in records[0].values() for m in layer)
    answers = answer_batch(lm, prompts[:1], images[:1], VCD(VCDKnobs(**knobs)), steer=True, inputs=inputs)
    want = float(ref[yes] - ref[no])
    got = answers[0]["margin"]
    if math.isfinite(want):
        assert got == pytest.approx(want, abs=TOL)
    else:
        assert got == want or (math.isnan(want) and math.isnan(got))


def test_a_question_alone_equals_it_in_a_batch(embedded_model, questions):
    lm = embedded_model
    prompts, images = questions
    iv = VCD(VCDKnobs(beta=1e-3))
    inputs = batch_inputs(lm, prompts, images)
    assert len(set((inputs["attention_mask"] == 0).sum(-1).tolist())) == 3  # three paddings
    res = forward(lm, inputs, iv, keep=Keep(layers=False))
    together, records = res.logits, res.records
    for b in range(3):
        alone, rec_alone = _batch(lm, prompts[b:b + 1], images[b:b + 1], iv)
        assert_scores(together[b], alone[0], atol=1e-4)
        for metric in DECODING:
            assert records[b][-1][metric] == pytest.approx(rec_alone[0][-1][metric], abs=1e-4)
        # and each row is the released construction of its own question
        ref, _, _ = reference_scores(lm, prompts[b], images[b], beta=1e-3)
        assert_scores(together[b], ref, atol=1e-4)


def test_records_are_whole_model_records(embedded_model, questions):
    lm = embedded_model
    cap = package_run(lm, questions[0][1], questions[1][1])
    assert set(DECODING) <= set(cap.row_records)
    _, records = _batch(lm, *questions, VCD())
    for rec in records:
        assert set(DECODING) <= set(rec[-1])
        assert rec[-1]["decoding_cut_yes"] in (0.0, 1.0) and rec[-1]["decoding_cut_no"] in (0.0, 1.0)


def test_the_cached_prefix_run_answers_as_the_full_one(embedded_model, questions):
    """answer_pair continues from the baseline's cache at the decision token: the same answers."""
    lm = embedded_model
    for iv in (VCD(VCDKnobs(beta=1e-3)), VCD()):
        inputs = batch_inputs(lm, *questions)
        _, steered = answer_pair(lm, *questions, iv, inputs=inputs)
        full = answer_batch(lm, *questions, iv, steer=True, inputs=inputs)
        for a, b in zip(steered, full):
            assert a["answer"] == b["answer"]
            assert a["margin"] == pytest.approx(b["margin"], abs=1e-4, nan_ok=True)  # ±inf: one token cut


def test_the_dose_scales_alpha(embedded_model, questions):
    lm = embedded_model
    prompt, image = questions[0][1], questions[1][1]
    half = package_run(lm, prompt, image, alpha=0.5).steps[0].final_logits
    dosed = package_run(lm, prompt, image, dose=0.5, alpha=1.0).steps[0].final_logits
    assert_scores(dosed, half.float())
    ref, _, _ = reference_scores(lm, prompt, image, alpha=0.5)
    assert_scores(dosed, ref)


def test_the_defaults_are_the_pope_scripts():
    """``llava1.5_pope.bash``: cd_alpha 1, cd_beta 0.2, noise_step 500."""
    knobs = VCD().knobs
    assert (knobs.alpha, knobs.beta, knobs.noise_step) == (1.0, 0.2, 500)


@pytest.mark.parametrize("bad", [{"beta": 1.5}, {"noise_step": 1000}, {"alpha": -1.0}])
def test_bad_knobs_are_refused(bad):
    with pytest.raises(UserError):
        VCDKnobs(**bad)
    with pytest.raises(UserError):
        VCD.from_preset(None, [f"{k}={v}" for k, v in bad.items()])


def test_the_seed_makes_the_numbers(embedded_model, questions):
    lm = embedded_model
    prompt, image = questions[0][0], questions[1][0]
    first = package_run(lm, prompt, image, beta=0.0)
    again = package_run(lm, prompt, image, beta=0.0)
    assert torch.equal(first.steps[0].final_logits, again.steps[0].final_logits)
    assert first.row_records["decoding_aux_margin"] == again.row_records["decoding_aux_margin"]
    other = package_run(lm, prompt, image, beta=0.0, seed=1)
    assert first.row_records["decoding_aux_margin"] != other.row_records["decoding_aux_margin"]


def test_trace_records_the_noised_view_as_the_baseline_is_measured(embedded_model, questions):
    from mclcbf_diag.experiments.trace import trace_sample

    prompts, images = questions
    text = prompts[0].split("\n")[1]  # the question of the first prompt
    r = trace_sample(embedded_model, text, images[0], VCD()).records
    view = r[r.condition == "view:noised image"]
    assert set(view.layer[view.layer >= 0]) == set(range(embedded_model.n_layers))  # every layer measured
    aux = r[(r.condition == "steered") & (r.metric == "decoding_aux_margin")].value.item()
    # the view's own final margin is the auxiliary forward's margin the contrast used (two routes, one forward)
    assert view[view.metric == "final_margin"].value.item() == pytest.approx(aux, abs=1e-4)
    assert not view[view.metric == "attn_image_mass"].empty

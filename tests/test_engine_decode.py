"""Generated text under a decoding-level method equals the method's loop written in plain PyTorch.

The references re-run a fresh copy of the model (never wrapped by nnsight) on the whole sequence so
far at every step, with no cache, and combine the logits as the released codes do: VCD's
``vcd_sample.py`` ((1 + α)·z − α·z_noised, −inf where ``z < log β + max z``; the noised image as
``add_diffusion_noise`` makes it, ε from a generator seeded per image as the package draws it) and
DoLa's ``dola_greedy_decode`` (``lm_head`` on ``hidden_states[j]`` without the final norm, the
premature layer by the released ``F.kl_div`` divergence, log p_final − log p_premature with the relative-top
cutoff). The package's loop continues a KV cache one token at a time; the tokens must be the same and
every step's scores within the floor of the two routes (:mod:`floors`).
"""

import pytest
import torch
import torch.nn.functional as F
from floors import logit_floor
from plain_refs import assert_scores, noised, plain_model, three_questions

from mclcbf_diag.engine.batch import batch_inputs
from mclcbf_diag.engine.decode import choose, end_ids, generate
from mclcbf_diag.interventions.dola import DoLa, DoLaKnobs, bucket_layers
from mclcbf_diag.interventions.vcd import VCD, VCDKnobs
from mclcbf_diag.measurements import noise
from mclcbf_diag.measurements.sampling import Decoding, sample_token

ALPHA = 1.0  # VCD's default contrast strength
STEPS = 6


@pytest.fixture(scope="module")
def questions():
    return three_questions()


@pytest.fixture(scope="module")
def batch(embedded_model, questions):
    return batch_inputs(embedded_model, *questions)




def vcd_scores(model, ids, pixels, alpha=ALPHA, beta=0.2):
    """``(scores, tolerance)``: two logits combined, each within :func:`~floors.logit_floor` of another route's."""
    with torch.no_grad():
        z = model(input_ids=ids, pixel_values=pixels).logits[0, -1]
        z_cd = model(input_ids=ids, pixel_values=noised(pixels)).logits[0, -1]
    cutoff = torch.log(torch.tensor(beta)) + z.max(-1, keepdim=True).values
    return ((1 + alpha) * z - alpha * z_cd).masked_fill(z < cutoff, -torch.inf), (1 + 2 * alpha) * logit_floor(model)


def dola_scores(model, ids, pixels, candidates, relative_top=0.1):
    """``(scores, tolerance)``: log p_final (twice :func:`~floors.logit_floor`: its logit and the normaliser) minus
    log p_premature, the premature readout ``W_U·h`` of a state after j layers (``noise.propagation_floor`` at
    ``max‖w_row‖·‖h‖``, twice likewise)."""
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels, output_hidden_states=True)
    final = out.logits[0, -1:]
    head = model.get_output_embeddings()
    stacked = torch.stack([head(out.hidden_states[j][0, -1:]) for j in candidates])  # [L, 1, V]
    M = 0.5 * (F.softmax(final, -1)[None] + F.softmax(stacked, -1))
    kl1 = F.kl_div(F.log_softmax(final, -1)[None], M, reduction="none").mean(-1)
    kl2 = F.kl_div(F.log_softmax(stacked, -1), M, reduction="none").mean(-1)
    pick = int((0.5 * (kl1 + kl2)).mean(-1).argmax())
    premature, state = stacked[pick], out.hidden_states[candidates[pick]][0, -1]
    w = float(head.weight.detach().norm(dim=-1).max())
    tol = 2 * logit_floor(model) + 2 * noise.propagation_floor(torch.float32, w * float(state.norm()),
                                                                 max(candidates[pick], 1) + 1)
    lp = final.log_softmax(-1)
    thresh = lp.max(-1, keepdim=True).values + torch.log(torch.tensor(relative_top))
    return (lp - premature.log_softmax(-1)).masked_fill(lp < thresh, -torch.inf)[0], tol


def reference(lm, prompt, image, combine, steps=STEPS):
    """``(tokens, (scores, tolerance) per step)`` of one question: a full forward of the whole sequence at every
    step."""
    model = plain_model(lm)
    inputs = lm.inputs(prompt, image)
    ids, pixels = inputs["input_ids"], inputs["pixel_values"]
    tokens, scores = [], []
    for _ in range(steps):
        s, tol = combine(model, ids, pixels)
        t = int(s.argmax())
        tokens.append(t)
        scores.append((s, tol))
        ids = torch.cat([ids, torch.tensor([[t]])], -1)
        if t in end_ids(lm):
            break
    return tokens, scores


def check_against(lm, batch, questions, iv, combine):
    gen = generate(lm, batch, iv, max_new_tokens=STEPS, keep_scores=True)
    S = batch["input_ids"].shape[1]
    longest = 0
    for b, (prompt, image) in enumerate(zip(*questions)):
        tokens, scores = reference(lm, prompt, image, combine)
        longest = max(longest, len(tokens))
        assert gen.sequences[b, S:S + len(tokens)].tolist() == tokens
        for k, (want, tol) in enumerate(scores):
            assert_scores(gen.steps[k]["scores"][b], want, atol=tol)
    assert gen.new_tokens == longest
    return gen


def test_greedy_vcd_generation_matches_the_released_loop(embedded_model, batch, questions):
    gen = check_against(embedded_model, batch, questions, VCD(VCDKnobs()), vcd_scores)
    assert gen.new_tokens > 2  # one of the questions goes on past "Yes"/"No" and the end token
    for step in gen.steps:  # every step records the contrast's terms at its own position
        assert set(step["records"][1][-1]) >= {"decoding_model_margin", "decoding_aux_margin",
                                                "decoding_contrast_margin", "decoding_cut_yes"}


def test_greedy_dola_generation_matches_the_released_loop(embedded_model, batch, questions):
    candidates = [j + 1 for j in bucket_layers("low", embedded_model.n_layers)]  # hidden_states indices

    def combine(model, ids, pixels):
        return dola_scores(model, ids, pixels, candidates)

    gen = check_against(embedded_model, batch, questions, DoLa(DoLaKnobs()), combine)
    assert all("dola_premature_layer" in step["records"][0][-1] for step in gen.steps)


def test_baseline_loop_is_transformers_greedy_generate(embedded_model, questions, batch):
    gen = generate(embedded_model, batch, None, max_new_tokens=STEPS)
    plain = {k: v for k, v in batch_inputs(embedded_model, *questions, share_images=False).items()
             if k != "position_ids"}
    with torch.no_grad():
        want = embedded_model.model.generate(**plain, max_new_tokens=STEPS, do_sample=False,
                                             pad_token_id=embedded_model.processor.tokenizer.pad_token_id)
    n = want.shape[1]
    assert torch.equal(gen.sequences[:, :n], want)


def test_sampled_generation_is_seeded_and_its_first_token_is_the_first_token_answer(embedded_model, batch):
    decoding = Decoding("sample", temperature=1.5, seed=3)
    keys = ["adversarial:1", "adversarial:2", "adversarial:3"]
    iv = DoLa(DoLaKnobs())
    one = generate(embedded_model, batch, iv, max_new_tokens=4, decoding=decoding, keys=keys)
    two = generate(embedded_model, batch, iv, max_new_tokens=4, decoding=decoding, keys=keys)
    assert torch.equal(one.sequences, two.sequences)
    S = batch["input_ids"].shape[1]
    for b, key in enumerate(keys):
        assert int(one.sequences[b, S]) == sample_token(one.first_scores[b], decoding, key)
    assert choose(one.first_scores, None).tolist() == one.first_scores.argmax(-1).tolist()

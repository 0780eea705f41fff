"""OPERA's beam search equals the released loop, and its rollback acts as the released code's does.

The reference (:func:`released_search`) follows ``shikiw/OPERA``'s ``opera_beam_search`` line for line on a
plain HF model, except that every forward re-runs the whole sequence (no cache, ``output_attentions=True``):
``attn_previous`` is the last layer's attention max over heads; each candidate's row is appended after a
zero column; ``attn_last`` is renormalised per row; ``attn_local`` = ``scale_factor`` × its generated
window; column scores 1e-7·∏ stored in a float16 tensor; the penalty −attn_img while the response holds
≤ 10 tokens; −999 for every other token; ``log_softmax`` + beam scores; the top 2·beams continuations through
``BeamSearchScorer.process`` (end tokens set aside, the first ``num_beams`` others kept).

The rollback needs a response past 10 tokens whose attention keeps returning to one column, which the
embedded model (it answers in one or two tokens) does not write; :class:`Scripted` hand-builds such
attention, and the test checks the recorded penalties and rollback against numbers worked out here.
"""

import math

import pytest
import torch
from floors import logit_floor, mass_floor
from plain_refs import plain_model, three_questions

from mclcbf_diag.engine.decode import end_ids
from mclcbf_diag.interventions.opera import OPERAKnobs
from mclcbf_diag.interventions.opera_beam import Hypotheses, ModelStepper, Search, column_scores, opera_search

STEPS, BEAMS = 4, 3


def released_search(lm, prompt, image, beams=BEAMS, candidates=5, steps=STEPS, scale=50.0, weight=1.0):
    """Per step ``(penalty [beams, C], chosen tokens, beam indices, beam scores)`` of the released loop."""
    model = plain_model(lm)
    inputs = lm.inputs(prompt, image)
    ids, pixels = inputs["input_ids"].repeat(beams, 1), inputs["pixel_values"].repeat(beams, 1, 1, 1)
    T = ids.shape[1]
    image_pos = ids[0] == lm.tokens.image_token_id
    ends = end_ids(lm)
    beam_scores = torch.zeros(beams)
    beam_scores[1:] = -1e9
    out_steps = []
    with torch.no_grad():
        for _ in range(steps):
            out = model(input_ids=ids, pixel_values=pixels, output_attentions=True)
            z = out.logits[:, -1]
            attn_previous = out.attentions[-1].max(1, keepdim=True).values  # [beams, 1, q, kv]
            cand_scores, cand = torch.topk(z, candidates, dim=-1, largest=True, sorted=True)
            attn_last = []
            for c in range(candidates):
                o = model(input_ids=torch.cat([ids, cand[:, c:c + 1]], -1), pixel_values=pixels,
                          output_attentions=True)
                attn_output = o.attentions[-1][:, :, -1:].max(1, keepdim=True).values  # [beams, 1, 1, kv + 1]
                square = torch.cat([attn_previous, torch.zeros_like(attn_previous).sum(-1, keepdim=True)], -1)
                attn_last.append(torch.cat([square, attn_output], -2))
            attn_last = torch.cat(attn_last, 1)
            attn_last = attn_last / attn_last.sum(-1, keepdim=True)
            attn_local = scale * attn_last[:, :, T:, T:]
            local_scores = torch.zeros(attn_local.shape[0], attn_local.shape[1], attn_local.shape[-1],
                                       dtype=torch.float16)
            for j in range(attn_local.shape[-1]):
                local_scores[..., j] = (1e-7 * attn_local[..., j:, j].prod(-1)).to(torch.float32)
            attn_i = attn_last[:, :, -1, :T][..., image_pos].sum(-1)
            rollback_scores, _ = local_scores.float().max(-1)
            penalty = -attn_i if attn_local.shape[-1] <= 10 else rollback_scores
            cand_scores = cand_scores - weight * penalty
            logits = torch.full_like(z, -999.0).scatter(-1, cand, cand_scores)
            scores = torch.log_softmax(logits, -1) + beam_scores[:, None]
            V = scores.shape[-1]
            top, flat = torch.topk(scores.view(-1), 2 * beams, largest=True, sorted=True)
            kept = []
            for rank, (s, f) in enumerate(zip(top.tolist(), flat.tolist())):
                if f % V not in ends:
                    kept.append((s, f % V, f // V))
                if len(kept) == beams:
                    break
            beam_scores = torch.tensor([k[0] for k in kept])
            tokens = torch.tensor([k[1] for k in kept])
            idx = torch.tensor([k[2] for k in kept])
            out_steps.append((penalty, tokens.tolist(), idx.tolist(), beam_scores))
            ids = torch.cat([ids[idx], tokens[:, None]], -1)
    return out_steps


def test_beam_search_steps_equal_the_released_loop(embedded_model, question=1):
    lm = embedded_model
    prompts, images = three_questions()
    want = released_search(lm, prompts[question], images[question])
    _, search = opera_search(lm, lm.inputs(prompts[question], images[question]), OPERAKnobs(), num_beams=BEAMS,
                             max_new_tokens=STEPS, ends=end_ids(lm))
    # a beam score sums one log-softmax per step over candidates z[c] + attn_img(c): two logits' floors and two
    # attention shares' floors per step (the routes differ by a cache and the shared-prefix attention)
    tol = STEPS * 2 * (logit_floor(lm) + mass_floor(1.0))
    assert len(search.events) == STEPS  # this question's beams write past their end token
    for got, (penalty, tokens, idx, scores) in zip(search.events, want):
        assert got["kind"] == "image" and got["rollback"] is None
        torch.testing.assert_close(torch.tensor(got["penalty"]), penalty, rtol=0, atol=2 * mass_floor(1.0))
        assert got["chosen"] == tokens and got["beam_idx"] == idx
        torch.testing.assert_close(torch.tensor(got["beam_scores"]), scores, rtol=0, atol=tol)


def test_model_stepper_continues_and_rebuilds_as_plain_forwards(embedded_model):
    lm = embedded_model
    prompts, images = three_questions()
    inputs = lm.inputs(prompts[0], images[0])
    model = plain_model(lm)
    stepper = ModelStepper(lm, inputs, 2)
    stepper.prefill(torch.zeros(2, 0, dtype=torch.long))
    logits, row = stepper.step(torch.tensor([300, 301]), torch.tensor([0, 0]))
    again = stepper.prefill(torch.tensor([[300, 310], [301, 311]]))
    with torch.no_grad():
        for b, gen in enumerate(([300], [301])):
            ids = torch.cat([inputs["input_ids"], torch.tensor([gen])], -1)
            o = model(input_ids=ids, pixel_values=inputs["pixel_values"], output_attentions=True)
            torch.testing.assert_close(logits[b], o.logits[0, -1], rtol=0, atol=logit_floor(lm))
            torch.testing.assert_close(row[b], o.attentions[-1][0, :, -1].max(0).values, rtol=0, atol=mass_floor(1.0))
        for b, gen in enumerate(([300, 310], [301, 311])):
            ids = torch.cat([inputs["input_ids"], torch.tensor([gen])], -1)
            want = model(input_ids=ids, pixel_values=inputs["pixel_values"]).logits[0, -1]
            torch.testing.assert_close(again[b], want, rtol=0, atol=logit_floor(lm))


# ----------------------------------------------------------------------------- the rollback, hand-built
T, IMAGE, V, FOCUS, SINK = 4, (1, 2), 6, 10, 30.0  # prompt keys, image keys, vocabulary, the over-trusted column


def weights(p: int) -> torch.Tensor:
    """Hand-built attention of response position ``p`` over its ``T + p + 1`` keys (before renormalising): weight
    ``SINK`` on prompt key 0 and 1 elsewhere; from position 11 on, 8 on the response's column ``FOCUS``."""
    w = torch.ones(T + p + 1)
    w[0] = SINK
    if p > FOCUS:
        w[T + FOCUS] = 8.0
    return w


class Scripted:
    """A :class:`~mclcbf_diag.interventions.opera_beam.Stepper` whose logits depend on each beam's tokens and whose
    attention is :func:`weights` (the same for every candidate)."""

    def __init__(self):
        self.gen = None

    def logits(self):
        base = torch.tensor([3.0, 2.6, 2.2, 1.8, 1.4, -50.0])  # token 5 (the end) is never chosen
        return torch.stack([base.roll(int(g.sum()) % 5) if len(g) else base for g in self.gen])

    def prefill(self, generated):
        self.gen = generated.clone()
        return self.logits()

    def step(self, tokens, beam_idx):
        self.gen = torch.cat([self.gen[beam_idx], tokens[:, None]], -1)
        p = self.gen.shape[1] - 1
        return self.logits(), weights(p).expand(len(tokens), -1)

    def candidates(self, tokens):
        p = self.gen.shape[1]
        return weights(p).expand(*tokens.shape, -1)


def test_a_column_that_keeps_the_top_score_rolls_the_search_back():
    search = Search(Scripted(), torch.tensor([i in IMAGE for i in range(T)]), num_beams=2, max_new_tokens=16,
                    ends=frozenset({5}), prompt_len=T, candidates=2, threshold=2)
    search.run()
    ev = search.events
    for e in ev[:10]:  # responses of ≤ 10 tokens: −(the candidate row's image share)
        w = weights(e["response"] - 1)
        assert e["kind"] == "image"
        want = -float(w[list(IMAGE)].sum() / w.sum())
        assert [p for row in e["penalty"] for p in row] == pytest.approx([want] * 4, rel=1e-6)
    rolled = [e for e in ev if e["rollback"] is not None]
    assert rolled, "the column stayed the top one more than threshold times: the search must roll back"
    first = rolled[0]
    # column FOCUS is the top one from response 13 on (its product outgrows column 0's: 6.6e-6 against 1.5e-6); the
    # third time (> 2) it is, at response 15, the search goes back to position FOCUS + 1: the state with 11 tokens,
    # where the tokens the step of response 12 had chosen are ruled out
    assert [e["column"] for e in ev[12:15]] == [FOCUS] * 3 and ev[11]["column"] != FOCUS
    assert first is ev[14] and first["response"] == 15
    assert first["rollback"]["column"] == FOCUS and first["rollback"]["to"] == FOCUS + 1
    assert first["rollback"]["revived"] == FOCUS + 1 and ev[15]["response"] == FOCUS + 3
    chosen_there = ev[11]  # the step that had written position 11
    assert first["rollback"]["rejected"] == [b * V + t for b, t in zip(chosen_there["beam_idx"],
                                                                        chosen_there["chosen"])]
    assert not set(zip(first["beam_idx"], first["chosen"])) & set(zip(chosen_there["beam_idx"],
                                                                      chosen_there["chosen"]))
    # once position 11 was rolled back to as often as there are candidates (2), the next rollback goes to 10
    assert [e["rollback"]["to"] for e in rolled[:3]] == [FOCUS + 1, FOCUS + 1, FOCUS]
    # the column penalty at response 14 (FOCUS the top column), worked out: 1e-7 · ∏_{i=10}^{13} 50·a[i, 10]
    want = 1e-7
    for i in range(FOCUS, 14):
        w = weights(i)
        want *= 50 * float(w[T + FOCUS] / w.sum())
    assert ev[13]["kind"] == "column" and ev[13]["response"] == 14
    assert ev[13]["penalty"][0][0] == pytest.approx(float(torch.tensor(want).half()), rel=1e-3)


def test_column_scores_are_the_products_below_the_diagonal_in_float16():
    window = torch.tensor([[2.0, 0.0, 0.0], [3.0, 4.0, 0.0], [5.0, 6.0, 7.0]])
    want = torch.tensor([1e-7 * 2 * 3 * 5, 1e-7 * 4 * 6, 1e-7 * 7]).half().float()
    assert torch.equal(column_scores(window), want)


def test_hypotheses_keep_the_best_by_length_normalised_score():
    h = Hypotheses(2)
    h.add([1], -4.0, 4)  # −1
    h.add([2], -3.0, 2)  # −1.5
    h.add([3], -1.0, 4)  # −0.25: replaces the worst
    assert sorted(t for _, t in h.beams) == [[1], [3]] and h.worst == -1.0
    assert h.is_done(-5.0, 5) and not h.is_done(-4.0, 5)
    assert math.isclose(max(s for s, _ in h.beams), -0.25)

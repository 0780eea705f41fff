"""VISTA under generation: its steering vector is the prompt's, built once and added at every position of every step.

VISTA's released code (github.com/LzVv123456/VISTA, ``pope_eval.py``'s ``main``) runs ``obtain_vsv``
(``steering_vector.py``) on the prompt with and without its image, installs ``VSVLayer`` with that vector
(``llm_layers.py``'s ``add_vsv_layers``) and then calls ``generate(use_cache=True)``: the vector never changes while
the answer is generated, the prefill steers every prompt position and each cached step its one new position, and its
self-logits augmentation (``llava_llama.py``'s forward) reads each step's own steered forward. Checked here:

* **the decode loop against plain PyTorch, written here** (:func:`reference`): per question alone, a never-wrapped
  model copy, v from the prompt (residuals entering each layer at the last token, with the image − without), then
  at each step the whole sequence so far re-run with forward pre-hooks steering every position with that same v, and
  the scores ``(1 − α)·logits + α·mean_k lm_head(h_k)`` of that forward; the reference chooses its own greedy tokens.
  The loop (a left-padded batch of four, the steered prompt once, then a continuation of its own cache) generates
  the same tokens, and each step's scores are within the floor of two float32 routes to them (:func:`floor_of`: the
  final logits' and the readouts' floors, as ``tests/test_interventions_vista.py`` takes them);
* **the two generation routes agree**: the ``steering-only`` preset through the runner's ``generate`` (transformers'
  ``generate`` traced, every step steered, what ``trace --max-new-tokens`` runs for an activation edit) and the full
  preset with SLA's weight ``logits_alpha=0`` through the decode loop give the same tokens and each step's steered
  scores within :func:`floors.logit_floor`;
* **the forwards**: the vector's two forwards of the prompt, the steered prompt, then one position per step; no
  per-step view, and no ``prepare`` after the prompt;
* **``pope --generate``** under ``steering-only`` runs the loop too (every token steered), not ``generate`` with
  only the prefill steered, whose text differs on these questions;
* **``trace --max-new-tokens``** under full VISTA records the same ‖v_ℓ‖ at every step: the prompt's vector.
"""

import floors
import pytest
import torch
from plain_refs import assert_scores, four_questions, plain_model, positions_run, vista_steering

from mclcbf_diag.engine.batch import answer_batch, batch_inputs
from mclcbf_diag.engine.decode import end_ids, generate
from mclcbf_diag.engine.runner import Keep, forward, greedy
from mclcbf_diag.interventions import resolve
from mclcbf_diag.interventions.vista import VISTA, VISTAKnobs

STEPS = 3
LAM, ALPHA = 0.3, 0.3  # λ larger than the paper's 0.01, so the steering moves the scores well above their floor


@pytest.fixture(scope="module")
def questions():
    return four_questions()


@pytest.fixture(scope="module")
def batch(embedded_model, questions):
    return batch_inputs(embedded_model, *questions, share_images=False)


def reference(lm, prompt: str, image, readout: tuple, steps: int, lam: float = LAM, alpha: float = ALPHA):
    """Released VISTA's greedy generation of one question, re-running the whole sequence at each step: (generated
    ids, per step (scores [vocab], its floor))."""
    model = plain_model(lm)
    inputs = lm.inputs(prompt, image)
    ids = inputs["input_ids"][0]
    with torch.no_grad():  # the vector: the prompt's, once
        pos = model(**inputs, output_hidden_states=True).hidden_states
        neg = model(input_ids=ids[ids != lm.tokens.image_token_id][None], output_hidden_states=True).hidden_states
    vs = [(pos[i][0, -1] - neg[i][0, -1]).float() for i in range(lm.n_layers)]
    handles, text = vista_steering(model, lm, vs, lam), model.config.text_config
    text.tie_last_hidden_states = False  # the last layer's raw output in hidden_states (SLA reads it unnormed)
    head, out = model.lm_head, []
    try:
        for _ in range(steps):
            with torch.no_grad():
                run = model(input_ids=ids[None], pixel_values=inputs["pixel_values"], output_hidden_states=True)
                aug = torch.stack([head(run.hidden_states[1:][k][0, -1]) for k in readout]).mean(0)
            scores = alpha * aug + (1 - alpha) * run.logits[0, -1]
            out.append((scores, floor_of(lm, run.hidden_states, readout, alpha)))
            token = int(scores.argmax())
            ids = torch.cat([ids, torch.tensor([token])])
            if token in end_ids(lm):
                break
    finally:
        del text.tie_last_hidden_states
        for h in handles:
            h.remove()
    return ids[len(inputs["input_ids"][0]):], out


def floor_of(lm, hidden_states, readout: tuple, alpha: float) -> float:
    """Floor of a score of two float32 routes (a batch continuing its cache, a lone row re-run whole):
    ``(1 − α)·floors.logit_floor`` for the final logits, and for each readout ``floors.state_floor`` of the raw state
    after the vision tower and k + 1 language layers times the largest ‖w_row‖ of ``lm_head`` (no final norm bounds
    that state), averaged, times α."""
    w = float(plain_model(lm).lm_head.weight.detach().float().norm(dim=-1).max())
    vision = floors.depth(lm) - lm.n_layers
    read = sum(floors.state_floor(hidden_states[1:][k][0, -1], vision + k + 1) * w for k in readout) / len(readout)
    return (1 - alpha) * floors.logit_floor(lm) + alpha * read


def test_the_loop_equals_released_vista_with_the_prompts_vector(embedded_model, questions, batch):
    lm = embedded_model
    iv = VISTA(VISTAKnobs(lam=LAM, logits_alpha=ALPHA))
    readout = iv.readout_layers(lm.n_layers)
    gen = generate(lm, batch, iv, max_new_tokens=STEPS, keep_scores=True)
    S = batch["input_ids"].shape[1]
    compared = 0
    for b, (prompt, image) in enumerate(zip(*questions)):
        last = gen.new_tokens - 1 if gen.ends[b] is None else gen.ends[b]
        tokens, steps = reference(lm, prompt, image, readout, last + 1)
        assert torch.equal(gen.sequences[b, S:S + last + 1], tokens)
        for k, (want, floor) in enumerate(steps):
            assert floor < 1e-3
            assert_scores(gen.steps[k]["scores"][b], want, atol=floor)
            compared += 1
    assert gen.new_tokens == STEPS and compared > len(questions[0])  # the first question's later steps compared


@pytest.mark.parametrize("cache_views", [True, False])
def test_the_vector_is_prepared_once_and_the_steered_cache_continued(embedded_model, batch, cache_views):
    """The vector's two forwards of the prompt (with its image, without), the steered prompt, then one position per
    step: no per-step view and one ``prepare``, in either route of the loop."""
    lm = embedded_model
    B, S = batch["input_ids"].shape
    free = int((batch["input_ids"] != lm.tokens.image_token_id).sum(-1).max())  # the image-free prompts, left-padded
    iv, prepared, handed = VISTA(VISTAKnobs()), [], []
    own = iv.prepare
    iv.prepare = lambda *a: (prepared.append(a[1]["input_ids"].shape), own(*a))[1]
    iv.use_decode_views = lambda *a: handed.append(a)
    gen = None

    def run():
        nonlocal gen
        gen = generate(lm, batch, iv, max_new_tokens=STEPS, cache_views=cache_views)

    calls = positions_run(lm, run)
    assert gen.new_tokens == STEPS  # the first question goes on past its answer
    assert calls == [(B, S), (B, free), (B, S)] + [(B, 1)] * (STEPS - 1)
    assert prepared == [(B, S)] and handed == []


def test_steering_only_through_generate_is_the_loop_without_sla(embedded_model, batch):
    """``--preset steering-only`` through the runner's ``generate`` and the full preset with ``logits_alpha=0``
    through the decode loop: the same tokens, each step's steered scores within a logit's floor."""
    lm = embedded_model
    only = resolve("vista", "steering-only")
    assert "logits" not in only.open_sites(True)  # no logit part: not a decoding-level method
    full = resolve("vista", "pope", ["logits_alpha=0"])
    assert full.knobs == only.knobs  # the knob that switches SLA off makes the full preset the steering-only one
    loop = generate(lm, batch, full, max_new_tokens=STEPS, keep_scores=True)
    res = forward(lm, {k: v for k, v in batch.items() if k != "position_ids"}, only, generate=greedy(STEPS),
                  keep=Keep())
    S, tol = batch["input_ids"].shape[1], floors.logit_floor(lm)
    for b, cap in enumerate(res.captures):
        last = STEPS - 1 if loop.ends[b] is None else loop.ends[b]
        # generate's min_new_tokens keeps the end token out (greedy: all STEPS generated): the tokens agree before
        # the step the loop ended at, whose scores are still compared
        same = last + 1 if loop.ends[b] is None else last
        assert torch.equal(cap.generated[0, -STEPS:][:same], loop.sequences[b, S:S + same])
        for k in range(last + 1):
            assert_scores(cap.steps[k].final_logits.float(), loop.steps[k]["scores"][b], atol=tol)
    base = generate(lm, batch, full, max_new_tokens=STEPS, keep_scores=True, steer=False)
    assert float((base.steps[0]["scores"] - loop.steps[0]["scores"]).abs().max()) > 100 * tol  # it steers


def test_pope_generate_under_steering_only_steers_every_token(embedded_model, questions, batch):
    """``pope --generate`` under ``--preset steering-only`` (:func:`~mclcbf_diag.engine.batch.answer_batch`) runs the
    loop too: the text the full preset with ``logits_alpha=0`` generates there, not that of ``generate`` with the
    prefill steered only (what it ran before, which differs on these questions); the baseline's text is the model's
    own greedy ``generate``."""
    lm = embedded_model
    only = resolve("vista", "steering-only", [f"lam={LAM}"])
    got = answer_batch(lm, *questions, only, True, inputs=batch, max_new_tokens=STEPS)
    loop = generate(lm, batch, resolve("vista", "pope", ["logits_alpha=0", f"lam={LAM}"]), max_new_tokens=STEPS)
    S, tok = batch["input_ids"].shape[1], lm.processor.tokenizer
    assert [r["text"] for r in got] == [tok.decode(loop.sequences[b, S:], skip_special_tokens=True)
                                        for b in range(len(got))]
    kw = {k: v for k, v in batch.items() if k != "position_ids"}
    gen = dict(max_new_tokens=STEPS, pad_token_id=tok.pad_token_id, do_sample=False)
    prefill_only = forward(lm, kw, only, keep=Keep(layers=False), generate=gen).sequences
    assert [r["text"] for r in got] != [tok.decode(s[S:], skip_special_tokens=True) for s in prefill_only]
    base = answer_batch(lm, *questions, only, False, inputs=batch, max_new_tokens=STEPS)
    with torch.no_grad():
        plain = lm.model.generate(**kw, **gen)
    assert [r["text"] for r in base] == [tok.decode(s[S:], skip_special_tokens=True) for s in plain]


def test_trace_records_the_prompts_vector_at_every_step(embedded_model, questions):
    """``trace --max-new-tokens`` under full VISTA (the loop, every step captured): each step records the steering at
    the step's position with the same ‖v_ℓ‖ per layer, the prompt's (a vector rebuilt per step would change it)."""
    from mclcbf_diag.experiments.trace import trace_sample

    image = questions[1][0]  # the first question's ("Is there a dog?") image
    r = trace_sample(embedded_model, "Is there a dog?", image, resolve("vista"), max_new_tokens=STEPS)
    rec = r.records[(r.records.condition == "steered") & (r.records.metric == "vista_vector_norm")]
    norms = {k: g.set_index("layer").value.sort_index() for k, g in rec.groupby("decode_step")}
    assert sorted(norms) == list(range(STEPS)) and len(norms[0]) == embedded_model.n_layers - 1  # v₀ = 0: unsteered
    assert all(norms[k].equals(norms[0]) for k in norms)

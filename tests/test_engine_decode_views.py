"""Generation continues each auxiliary view of a decoding-level method by its own KV cache, and gives what re-running
every view over the whole sequence at every step gives.

:func:`~mclcbf_diag.engine.decode.generate` runs each view's prompt once and then one position per generated token
(:class:`~mclcbf_diag.engine.decode.ViewStream`): VCD's noised image, CausalMM's counterfactual image features (the
vision level), PAI's image-free prompt. VISTA runs no view after the prompt: its steering vector is the prompt's,
built once as its released code builds it (``pope_eval.py``: ``obtain_vsv`` before ``generate``), and the loop
continues its steered forward's own cache (``tests/test_engine_decode_vista.py`` checks that against plain PyTorch);
here it is checked to hand no view at any step and to run the same forwards in both routes. Checked on the embedded
model, four questions of four lengths in one left-padded batch, greedy and
sampled, against two references:

* **plain PyTorch, written here**: at every step each view re-run by a never-wrapped model copy over the whole
  sequence so far, each row alone (the noised image as ``add_diffusion_noise`` makes it, ε seeded per image; the
  image-free prompt as the row's ids without its image tokens; CausalMM's counterfactual features from the package's
  :func:`~mclcbf_diag.interventions.causalmm.counterfactual_features`, which ``tests/test_interventions_causalmm.py``
  checks against its own reference, merged into the embeddings here). What each view handed the method at each
  step (its logits) within the floor of two float32 routes
  (:func:`floors.logit_floor`, :func:`floors.state_floor`);
* **the recompute route** (``generate(..., cache_views=False)``: the method's ``prepare`` re-runs every view over
  the whole sequence at every step, the loop's behaviour before the views were continued): the same tokens and
  text, each step's scores within the floor of the combination (the main rows' forward is the same in both routes,
  so only the views' rounding differs; VISTA's two routes are one computation, equal exactly).

And the saving: the positions each route runs (decoder layer 0's attention, [rows, positions] per call), and under
``trace --max-new-tokens`` the view runs once per step, its records the loop's own forward.
"""


import floors
import pytest
import torch
from plain_refs import assert_scores, four_questions, noised, plain_model, positions_run

from mclcbf_diag import shipped
from mclcbf_diag.data import load_image, load_pope, resolve_image
from mclcbf_diag.engine.batch import batch_inputs
from mclcbf_diag.engine.decode import generate
from mclcbf_diag.interventions.causalmm import CausalMM, CausalMMKnobs, counterfactual_features
from mclcbf_diag.interventions.pai import PAI, PAIKnobs
from mclcbf_diag.interventions.vcd import VCD, VCDKnobs
from mclcbf_diag.interventions.vista import VISTA, VISTAKnobs
from mclcbf_diag.measurements.sampling import Decoding

STEPS = 3
METHODS = {"vcd": lambda: VCD(VCDKnobs()), "pai": lambda: PAI(PAIKnobs()), "vista": lambda: VISTA(VISTAKnobs()),
           "causalmm": lambda: CausalMM(CausalMMKnobs())}
# VISTA: none. Its vector was once rebuilt at every step from two per-step views (the sequence with its image and
# without it, read at the step's last token); its released code builds it once from the prompt, which the loop now does
VIEWS = {"vcd": ["noised image"], "pai": ["image-free prompt"], "vista": [], "causalmm": ["shuffle attention"]}
KEYS = ["adversarial:1", "adversarial:21", "adversarial:27", "adversarial:33"]  # the sampled draws' keys
DECODINGS = {"greedy": None, "sampled": Decoding("sample", temperature=1.5, seed=3)}


@pytest.fixture(scope="module")
def questions():
    return four_questions()


@pytest.fixture(scope="module")
def batch(embedded_model, questions):
    return batch_inputs(embedded_model, *questions, share_images=False)




def plain_views(lm, name: str, ids: torch.Tensor, pixels: torch.Tensor) -> dict:
    """Each view of one row's whole sequence ``ids`` [n] by the plain model: name → (last logits [vocab], residuals
    entering every decoder layer at the last position [L, d] or None)."""
    model = plain_model(lm)
    L, image = lm.n_layers, lm.tokens.image_token_id

    def run(**kw):
        with torch.no_grad():
            out = model(**kw, output_hidden_states=True)
        return out.logits[0, -1].float(), torch.stack([out.hidden_states[i][0, -1].float() for i in range(L)])

    free = ids[ids != image][None]
    if name == "vcd":
        return {"noised image": (run(input_ids=ids[None], pixel_values=noised(pixels))[0], None)}
    if name == "pai":
        return {"image-free prompt": (run(input_ids=free)[0], None)}
    feats = counterfactual_features(lm, pixels, "shuffle", 0)[0]
    embeds = model.get_input_embeddings()(ids[None])
    embeds = embeds.masked_scatter((ids == image)[None, :, None], feats.to(embeds.dtype))
    return {"shuffle attention": (run(inputs_embeds=embeds)[0], None)}


def watched(iv) -> list:
    """The outputs the loop hands ``iv`` at each step (its ``use_decode_views`` wrapped): per step, name →
    (logits [B, vocab], states [B, L, d] or None)."""
    seen, own = [], iv.use_decode_views

    def use(lm, rows, outputs):
        seen.append({k: (v.logits.clone(), None if v.states is None else v.states.clone())
                     for k, v in outputs.items()})
        own(lm, rows, outputs)

    iv.use_decode_views = use
    return seen


def last_step(gen, b: int) -> int:
    return gen.new_tokens - 1 if gen.ends[b] is None else gen.ends[b]


@pytest.fixture(scope="module")
def runs(embedded_model, batch):
    """Per (method, decoding): the cached route with what it handed its method, and the recompute route with what its
    ``prepare`` made each time it ran (VISTA's steering vectors, the prompt's only; None for the others)."""
    out = {}
    for name, make in METHODS.items():
        for how, decoding in DECODINGS.items():
            iv = make()
            seen = watched(iv)
            cached = generate(embedded_model, batch, iv, max_new_tokens=STEPS, decoding=decoding, keys=KEYS,
                              keep_scores=True)
            iv, prepared = make(), []
            own = iv.prepare
            iv.prepare = lambda *a, own=own, iv=iv, prepared=prepared: (own(*a), prepared.append(
                iv.prepared_views(a[2]) if name == "vista" else None))[0]  # VISTA's steering vector
            whole = generate(embedded_model, batch, iv, max_new_tokens=STEPS, decoding=decoding, keys=KEYS,
                             keep_scores=True, cache_views=False)
            out[name, how] = cached, seen, whole, prepared
    return out


@pytest.mark.parametrize("how", list(DECODINGS))
@pytest.mark.parametrize("name", list(METHODS))
def test_each_views_output_is_a_plain_forward_of_the_whole_sequence(embedded_model, batch, questions, runs, name,
                                                                    how):
    lm = embedded_model
    cached, seen, _, _ = runs[name, how]
    if name == "vista":  # the vector is the prompt's (step 0's prepare): no view is handed at any step
        assert seen == [] and cached.new_tokens >= 3
        return
    assert len(seen) == cached.new_tokens and all(list(s) == VIEWS[name] for s in seen)
    S, lengths = batch["input_ids"].shape[1], batch["attention_mask"].sum(-1).tolist()
    logit_tol = floors.logit_floor(lm)  # two float32 routes to one logit: a continuation and a whole forward
    compared = 0
    for b, (prompt, image) in enumerate(zip(*questions)):
        pixels = lm.inputs(prompt, image)["pixel_values"]
        for k in range(last_step(cached, b) + 1):  # the steps whose scores the row read
            ids = cached.sequences[b, S - lengths[b]:S + k]
            for view, (logits, states) in plain_views(lm, name, ids, pixels).items():
                got_logits, got_states = seen[k][view][0][b], seen[k][view][1]
                torch.testing.assert_close(got_logits, logits, rtol=0, atol=logit_tol)
                if states is not None:  # residuals after at most every layer: floors.state_floor
                    tol = floors.state_floor(states, floors.depth(lm))
                    torch.testing.assert_close(got_states[b], states, rtol=0, atol=tol)
                compared += 1
    assert compared >= len(lengths) * len(VIEWS[name]) and cached.new_tokens >= 3


def combination_tolerance(lm, name: str) -> float:
    """Floor of a combined score of two routes whose main logits are the same and whose view's logits differ by
    :func:`floors.logit_floor`: VCD α·δz', CausalMM γ·δz', PAI |1 − γ|·δ log p_u (a logit and its normaliser)."""
    if name == "vcd":
        return VCDKnobs().alpha * floors.logit_floor(lm)
    if name == "causalmm":
        return CausalMMKnobs().gamma * floors.logit_floor(lm)
    return abs(1 - PAIKnobs().contrast_gamma) * 2 * floors.logit_floor(lm)


@pytest.mark.parametrize("how", list(DECODINGS))
@pytest.mark.parametrize("name", list(METHODS))
def test_the_cached_route_generates_what_the_recompute_route_does(embedded_model, batch, runs, name, how):
    lm = embedded_model
    cached, seen, whole, vectors = runs[name, how]
    if name == "vista":  # prepared once, from the prompt, in both routes (its released code): one computation
        assert len(vectors) == 1 and torch.equal(cached.sequences, whole.sequences) and cached.ends == whole.ends
        assert all(torch.equal(c["scores"], w["scores"]) for c, w in zip(cached.steps, whole.steps))
        return
    assert len(vectors) == whole.new_tokens  # the recompute route prepared at every step
    assert torch.equal(cached.sequences, whole.sequences) and cached.ends == whole.ends
    S, tok = batch["input_ids"].shape[1], lm.processor.tokenizer
    texts = [tok.decode(cached.sequences[b, S:], skip_special_tokens=True) for b in range(len(cached.ends))]
    assert texts == [tok.decode(whole.sequences[b, S:], skip_special_tokens=True) for b in range(len(whole.ends))]
    assert all(texts)
    for b in range(len(cached.ends)):
        for k in range(last_step(cached, b) + 1):
            tol = combination_tolerance(lm, name)
            assert_scores(cached.steps[k]["scores"][b], whole.steps[k]["scores"][b], atol=tol)
            if k == 0:  # the prompt's views: the same forward in both routes
                assert torch.equal(cached.steps[0]["scores"][b], whole.steps[0]["scores"][b])


@pytest.mark.parametrize("name", ["vcd", "pai", "vista"])
def test_each_view_runs_its_prompt_once_then_one_position_per_step(embedded_model, batch, name):
    """The cached route's forwards against the recompute route's: the same main forwards, and each view's prompt
    once, then [B, 1] per step instead of the whole sequence so far (VISTA: no view after the prompt in either)."""
    lm = embedded_model
    B, S = batch["input_ids"].shape
    free = int((batch["input_ids"] != lm.tokens.image_token_id).sum(-1).max())  # the image-free prompts, left-padded
    n = 3  # the first question goes on past its answer: three steps run
    cached = positions_run(lm, lambda: generate(lm, batch, METHODS[name](), max_new_tokens=n))
    whole = positions_run(lm, lambda: generate(lm, batch, METHODS[name](), max_new_tokens=n, cache_views=False))
    if name in ("vcd", "pai"):  # main: the prompt's plain cache, then one position per step; then the view's
        view = S if name == "vcd" else free  # the noised image's prompt, or the image-free one
        want_cached = [(B, S), (B, view), (B, 1)] + [(B, 1), (B, 1)] * (n - 1)
        want_whole = [(B, S), (B, view), (B, 1)] + [c for k in range(1, n) for c in ((B, view + k), (B, 1))]
        assert sum(r * p for r, p in want_cached) < sum(r * p for r, p in want_whole)
    else:  # VISTA: its vector's two forwards of the prompt, the steered prompt, then its own cache continued, in
        # both routes (it was two views and the whole steered sequence at every step, a vector rebuilt per step)
        want_cached = want_whole = [(B, S), (B, free), (B, S)] + [(B, 1)] * (n - 1)
    assert cached == want_cached
    assert whole == want_whole


def test_trace_runs_each_steps_view_once(embedded_model):
    """``trace --max-new-tokens`` under VCD: the noised view of each step is the loop's own forward, captured (its
    prompt once, then one position per step), not run again for the ``view:NAME`` records, which cover every step."""
    from mclcbf_diag.experiments.trace import trace_sample

    lm = embedded_model
    image = load_image(resolve_image(load_pope(shipped.pope_file("adversarial"))[0], shipped.IMAGES))
    n = 3
    result = None

    def run():
        nonlocal result
        result = trace_sample(lm, "Is there a dog?", image, VCD(VCDKnobs()), max_new_tokens=n)

    calls = positions_run(lm, run)
    S = result.baseline.prompt_len
    baseline = [(1, S)] + [(1, 1)] * n  # the baseline's loop: the prompt's cache, then one position per step
    steered = [(1, S), (1, S), (1, 1)] + [(1, 1), (1, 1)] * (n - 1)  # the view's prompt, the main cache, …
    assert calls == baseline + steered
    views = result.records[result.records.condition == "view:noised image"]
    assert sorted(set(views.decode_step)) == list(range(n))

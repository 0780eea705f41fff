"""Auxiliary forwards as rows of the question's own forward equal them run on their own, row by row.

A decoding-level method's auxiliary view that differs from the question only in its image features
(VCD's noised image, CausalMM's counterfactual features) runs as extra rows of the main rows' batched
forward: in ``pope``'s baseline forward (``answer_pair``) and in the runner's traced forward
(``forward``). PAI's image-free prompt continues the baseline's cached prefix up to the batch's first
image token, and OPERA's candidates continue the baseline's cache instead of a forward of their own.
Each is compared here with the separate-forward route (:meth:`auxiliary` / ``prepare``) per row, within
the noise floors of two float32 forwards (``tests/floors.py``), on three questions of three lengths (so
three paddings) about three images; and the batched routes are checked to run no forward of their own.
"""

import math

import pytest
import torch
from floors import logit_floor, margin_floor, mass_floors, state_floor
from plain_refs import three_questions

from mclcbf_diag.engine.batch import answer_pair, batch_inputs
from mclcbf_diag.engine.runner import Keep, forward
from mclcbf_diag.interventions.base import Batched, rows_of
from mclcbf_diag.interventions.causalmm import CausalMM
from mclcbf_diag.interventions.opera import OPERA, prompt_cache
from mclcbf_diag.interventions.pai import PAI, PAIKnobs
from mclcbf_diag.interventions.vcd import VCD, VCDKnobs
from mclcbf_diag.interventions.views import image_free_inputs, image_free_logits, last_logits, with_aux_rows
from mclcbf_diag.interventions.vista import VISTA, steering_vectors


@pytest.fixture(scope="module")
def questions():
    return three_questions()


@pytest.fixture(scope="module")
def batch(embedded_model, questions):
    lm = embedded_model
    inputs = batch_inputs(lm, *questions)
    assert len(set((inputs["attention_mask"] == 0).sum(-1).tolist())) == 3  # three paddings
    return inputs, rows_of(inputs["input_ids"], inputs["attention_mask"], lm.tokens.image_token_id)


class Calls:
    """The model's top-level forwards inside the block: their batch sizes."""

    def __init__(self, lm):
        self.lm, self.rows = lm, []

    def __enter__(self):
        def hook(module, args, kwargs):
            x = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
            self.rows.append(int(x.shape[0]))

        self.handle = self.lm.model.register_forward_pre_hook(hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def margins(lm, logits):
    yes, no = int(lm.tokens.yes_id), int(lm.tokens.no_id)
    return logits[:, yes].double() - logits[:, no].double()


def assert_rows_close(lm, got, want):
    """Per row: every logit within the logit floor, the Yes − No margin within the margin floor."""
    yes, no = int(lm.tokens.yes_id), int(lm.tokens.no_id)
    assert got.shape == want.shape
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=logit_floor(lm))
    diff = (margins(lm, got) - margins(lm, want)).abs()
    assert bool((diff <= margin_floor(lm, yes, no)).all()), diff


def assert_margins_close(lm, got: list[dict], want: list[dict], factor: float):
    """The answers' margins within ``factor`` margin floors (a combination a·z + b·z' of two forwards' margins,
    each within one floor, is within |a| + |b| floors)."""
    floor = factor * margin_floor(lm, int(lm.tokens.yes_id), int(lm.tokens.no_id))
    for a, b in zip(got, want, strict=True):
        if math.isfinite(b["margin"]):
            assert a["margin"] == pytest.approx(b["margin"], abs=floor)
        else:  # the cutoff removed Yes or No in both routes
            assert a["margin"] == b["margin"]


@pytest.mark.parametrize("make", [lambda: VCD(VCDKnobs(beta=1e-3)), lambda: CausalMM()], ids=["vcd", "causalmm"])
def test_stacked_auxiliary_rows_equal_the_separate_forward(embedded_model, batch, make):
    lm = embedded_model
    inputs, rows = batch
    iv = make()
    separate = iv.auxiliary(lm, inputs, rows)  # the view's own forward (pixels, or merged embeddings)
    stacked = with_aux_rows(inputs, iv.aux_features(lm, inputs, rows))
    assert stacked["input_ids"].shape[0] == 2 * len(rows)
    both = last_logits(lm, stacked)
    assert_rows_close(lm, both[len(rows):], separate)
    assert_rows_close(lm, both[:len(rows)], last_logits(lm, inputs))  # the main rows are untouched by the others


@pytest.mark.parametrize("make", [lambda: VCD(VCDKnobs(beta=1e-3)), lambda: CausalMM()], ids=["vcd", "causalmm"])
def test_pope_and_the_runner_run_them_in_the_questions_own_forward(embedded_model, questions, batch, make):
    """answer_pair's baseline forward and the runner's traced forward each hold the auxiliary rows: no forward of
    their own, and the answers equal those of the separate route (prepared apart, then the same forward)."""
    lm = embedded_model
    inputs, rows = batch
    iv = make()
    iv.prepare(lm, inputs, rows)  # the separate route
    alone = forward(lm, inputs, iv, keep=Keep(layers=False), prepare=False)
    want_aux = dict(iv._aux)
    with Calls(lm) as calls:
        _, steered = answer_pair(lm, *questions, iv, inputs=inputs)
    assert calls.rows == [2 * len(rows), len(rows)]  # the baseline with its auxiliary rows, then the continuation
    for r in rows:
        assert_rows_close(lm, iv._aux[r.index][None], want_aux[r.index][None])
    with Calls(lm) as calls:
        res = forward(lm, inputs, iv, keep=Keep(layers=False))
    assert calls.rows == [2 * len(rows)]
    assert res.logits.shape[0] == len(rows) and len(res.records) == len(rows)
    floor = margin_floor(lm, int(lm.tokens.yes_id), int(lm.tokens.no_id))
    for b in range(len(rows)):
        for metric in ("decoding_aux_margin", "decoding_contrast_margin", "decoding_model_margin"):
            want = alone.records[b][-1][metric]
            # (1 + α)·z − α·z_aux with α = 1: 1 + 2α floors
            assert res.records[b][-1][metric] == pytest.approx(want, abs=3 * floor, nan_ok=True)
    from mclcbf_diag.engine.batch import _answers

    assert_margins_close(lm, steered, _answers(lm, alone.logits, iv, alone.records), 3)


def test_a_captured_run_reads_the_auxiliary_rows_too(embedded_model, batch):
    """With every layer captured the stacked rows' logits come from the captured forward; the captures are the
    main rows' only."""
    lm = embedded_model
    inputs, rows = batch
    iv = VCD(VCDKnobs(beta=1e-3))
    res = forward(lm, inputs, iv, keep=Keep(layers=True))
    assert len(res.captures) == len(rows)
    separate = iv.auxiliary(lm, inputs, rows)
    for b, r in enumerate(rows):
        assert_rows_close(lm, iv._aux[r.index][None], separate[b][None])


def test_the_image_free_view_continues_the_cached_prefix(embedded_model, batch):
    lm = embedded_model
    inputs, rows = batch
    logits, cache = prompt_cache(lm, inputs)
    start = min(r.pad + int(torch.nonzero(r.image)[0]) for r in rows)
    assert start > 0  # the text before the image is shared
    got = image_free_logits(lm, rows, cache, inputs["attention_mask"])
    assert_rows_close(lm, got, last_logits(lm, image_free_inputs(lm, rows)))
    # rows in another order read their own prompts' prefixes
    back = list(reversed(rows))
    assert_rows_close(lm, image_free_logits(lm, back, cache, inputs["attention_mask"]), got.flip(0))


def test_pai_in_pope_continues_the_baseline_for_its_contrast(embedded_model, questions, batch):
    lm = embedded_model
    inputs, rows = batch
    iv = PAI(PAIKnobs(contrast_gamma=1.1))
    iv.prepare(lm, inputs, rows)
    want = dict(iv._image_free)
    alone = forward(lm, inputs, iv, keep=Keep(layers=False), prepare=False)
    with Calls(lm) as calls:
        _, steered = answer_pair(lm, *questions, iv, inputs=inputs)
    assert calls.rows == [len(rows)] * 3  # baseline, image-free continuation, intervened continuation
    for r in rows:
        assert_rows_close(lm, iv._image_free[r.index][None], want[r.index][None])
    from mclcbf_diag.engine.batch import _answers

    # γ·z + (1 − γ)·z_free (log-probabilities' margins are the logits'), γ = 1.1: 1.2 floors
    assert_margins_close(lm, steered, _answers(lm, alone.logits, iv, alone.records), 1.2)


def test_opera_continues_the_baselines_cache(embedded_model, batch):
    lm = embedded_model
    inputs, rows = batch
    own, shared = OPERA(), OPERA()
    own.prepare(lm, inputs, rows)
    logits, cache = prompt_cache(lm, inputs)
    with Calls(lm) as calls:
        shared.prepare_batched(lm, inputs, rows, Batched(cache=cache, logits=logits))
    assert calls.rows == [len(rows) * shared.knobs.candidates]  # only the candidates' one-token continuation
    for r in rows:
        tokens, shares = shared._candidates[r.index]
        want_tokens, want_shares = own._candidates[r.index]
        assert torch.equal(tokens, want_tokens)
        assert bool(((shares - want_shares).abs() <= mass_floors(want_shares)).all())


def test_vista_in_pope_builds_its_vector_from_the_baseline(embedded_model, questions, batch):
    """VISTA's "with image" residuals are the baseline forward's, and its image-free prompt continues the baseline's
    cache: the vector equals the one of its own two forwards within the floor of a residual after every layer."""
    lm = embedded_model
    inputs, rows = batch
    iv = VISTA()
    want = steering_vectors(lm, inputs, rows)
    alone = forward(lm, inputs, iv, keep=Keep(layers=False))
    with Calls(lm) as calls:
        _, steered = answer_pair(lm, *questions, iv, inputs=inputs)
    assert calls.rows == [len(rows)] * 3  # baseline, image-free continuation, intervened forward
    assert iv._v.shape == want.shape
    for layer in range(lm.n_layers):
        floor = 2 * state_floor(want[:, layer], layer + 1)  # two routes' residuals, each within one floor
        assert float((iv._v[:, layer] - want[:, layer]).abs().max()) <= floor
    from mclcbf_diag.engine.batch import _answers

    # (1 − α)·z + α·z_early with α = 0.3 (SLA): one floor each
    assert_margins_close(lm, steered, _answers(lm, alone.logits, iv, alone.records), 1)

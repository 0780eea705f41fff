"""The runner (mclcbf_diag.engine.runner) against plain Hugging Face forwards, hooks written here.

References never go through nnsight or the runner: a plain ``model(...)`` with
``output_attentions=True`` (eager attention), ``register_forward_pre_hook`` /
``register_forward_hook`` on the HF modules to read residuals and to add a vector, and
``model.generate`` for the decode phase. Two tiny random LLaVAs: the embedded model's shape
(saved and reloaded through ``load_model``) and one with grouped-query attention.
"""

from __future__ import annotations

import contextlib

import floors
import pytest
import torch

from mclcbf_diag.data import build_prompt
from mclcbf_diag.embedded.world import sample_scene
from mclcbf_diag.engine.runner import Keep, forward, greedy, with_embeds
from mclcbf_diag.errors import UserError
from mclcbf_diag.interventions.base import Intervention
from mclcbf_diag.models import load_model

TEXTS = ["Is there a dog in the image?", "Is there a big red dog in the image?", "dog?"]


@pytest.fixture(scope="module", params=["tiny", "tiny_gqa"])
def lm(request):
    if request.param == "tiny":
        return load_model(str(request.getfixturevalue("saved_tiny_dir")))
    return request.getfixturevalue("tiny_gqa_model")


@pytest.fixture(scope="module")
def images():
    return [sample_scene(i, 1).image() for i in range(len(TEXTS))]


def _layers(lm):
    return lm.model.model.language_model.layers  # spelled out here, not asked of the adapter


class AddVector(Intervention):
    """Adds ``vector`` to the residual (or the normalised input) of the current token at ``layer``."""

    name = "test-add-vector"
    sites = frozenset({"residual"})

    def __init__(self, layer: int, vector: torch.Tensor, after_norm: bool = False):
        super().__init__()
        self.layer, self.vector, self.after_norm = layer, vector, after_norm

    def layers(self, n_layers):
        return (self.layer,)

    def first_edited(self, row):
        return row.decision

    def residual(self, site):
        if site.steer:
            for row in site.rows:
                site.add(row, [site.current(row)], self.vector[None] * site.dose, after_norm=self.after_norm)


@contextlib.contextmanager
def hooked(lm, layer: int | None = None, vector: torch.Tensor | None = None, after_norm: bool = False):
    """Plain HF hooks: optionally add ``vector`` at the last position of ``layer``; record residuals.

    Yields ``seen``: per forward, {layer: {"pre", "mid", "post"}} of the last position (row 0).
    """
    seen: list[dict] = []
    handles = []

    def add_pre(module, args, kwargs):
        h = (args[0] if args else kwargs["hidden_states"]).clone()
        h[:, -1] += vector.to(h.dtype)
        return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})

    def add_after_norm(module, args, output):
        out = output.clone()
        out[:, -1] += vector.to(out.dtype)
        return out

    def rec(i, key, pre):
        def hook(module, args, *rest):
            if pre:
                kwargs = rest[0]
                t = args[0] if args else kwargs["hidden_states"]
            else:
                t = rest[0]
            if i == 0 and key == "pre":
                seen.append({})
            seen[-1].setdefault(i, {})[key] = t[0, -1].detach().clone()
        return hook

    layers = _layers(lm)
    for i, mod in enumerate(layers):
        if layer == i and vector is not None and not after_norm:
            handles.append(mod.register_forward_pre_hook(add_pre, with_kwargs=True))
        if layer == i and vector is not None and after_norm:
            handles.append(mod.input_layernorm.register_forward_hook(add_after_norm))
    for i, mod in enumerate(layers):  # registered after the edit: they see the edited residual
        handles.append(mod.register_forward_pre_hook(rec(i, "pre", True), with_kwargs=True))
        handles.append(mod.post_attention_layernorm.register_forward_pre_hook(rec(i, "mid", True), with_kwargs=True))
        handles.append(mod.register_forward_hook(rec(i, "post", False)))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def _plain(lm, inputs, **hook):
    with torch.no_grad(), hooked(lm, **hook) as seen:
        out = lm.model(**inputs, output_attentions=True, output_hidden_states=True)
    return out, seen[0]


def _state_tol(lm, reference, layers: int) -> float:
    """Tolerance of a residual of the runner against the plain forward's: ``floors.state_floor`` after the
    vision tower and ``layers`` language layers."""
    return floors.state_floor(reference, floors.depth(lm) - lm.n_layers + layers)


def _assert_probs_close(got, want):
    """Attention probabilities of two routes, each within its float32 floor (``floors.mass_floors``)."""
    want = want.float()
    excess = (got.double() - want.double()).abs() - floors.mass_floors(want)
    assert float(excess.max()) <= 0, f"{float(excess.max()):.3g} over the mass floor"


def _vector(lm, seed=3, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(lm.text_config.hidden_size, generator=g)


# ----------------------------------------------------------------------------- one prompt, no intervention
def test_forward_without_intervention_equals_a_plain_forward(lm, images):
    inputs = lm.inputs(build_prompt(TEXTS[1]), images[1])
    cap = forward(lm, inputs).captures[0]
    out, seen = _plain(lm, inputs)
    ids = inputs["input_ids"][0]
    assert cap.prompt_len == ids.shape[0]
    assert torch.equal(cap.detected, ids == lm.tokens.image_token_id) and cap.detected.sum() > 0
    assert [(s.phase, s.decode_step) for s in cap.steps] == [("prefill", 0)]
    step = cap.steps[0]
    assert sorted(step.layers) == list(range(lm.n_layers))
    assert step.n_keys == ids.shape[0]
    for i, c in step.layers.items():  # residuals: floors.state_floor; probabilities: floors.mass_floors
        torch.testing.assert_close(c.resid_pre_in, out.hidden_states[i][0, -1], rtol=0,
                                   atol=_state_tol(lm, out.hidden_states[i][0, -1], i))
        torch.testing.assert_close(c.resid_pre, seen[i]["pre"], atol=_state_tol(lm, seen[i]["pre"], i), rtol=0)
        torch.testing.assert_close(c.resid_mid, seen[i]["mid"], atol=_state_tol(lm, seen[i]["mid"], i + 1), rtol=0)
        torch.testing.assert_close(c.resid_post, seen[i]["post"], atol=_state_tol(lm, seen[i]["post"], i + 1),
                                   rtol=0)
        _assert_probs_close(c.attn, out.attentions[i][0, :, -1, :])
        assert c.added is None and c.metrics == {}
    torch.testing.assert_close(step.final_logits, out.logits[0, -1].float(), atol=floors.logit_floor(lm), rtol=0)


def test_forward_refuses_a_prompt_without_image(lm):
    ids = lm.processor.tokenizer("USER: hello\nASSISTANT:", return_tensors="pt").input_ids
    with pytest.raises(UserError, match="no image token"):
        forward(lm, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, AddVector(0, _vector(lm)))


# ----------------------------------------------------------------------------- one prompt, residual addition
@pytest.mark.parametrize("after_norm", [False, True])
def test_forward_with_a_residual_addition_equals_a_forward_pre_hook(lm, images, after_norm):
    layer = 1
    vec = _vector(lm)
    inputs = lm.inputs(build_prompt(TEXTS[0]), images[0])
    cap = forward(lm, inputs, AddVector(layer, vec, after_norm)).captures[0]
    out, seen = _plain(lm, inputs, layer=layer, vector=vec, after_norm=after_norm)
    base, _ = _plain(lm, inputs)
    step = cap.steps[0]
    logit_tol = floors.logit_floor(lm)
    assert (step.final_logits - base.logits[0, -1]).abs().max() > 30 * logit_tol, "the vector must move the logits"
    torch.testing.assert_close(step.final_logits, out.logits[0, -1].float(), atol=logit_tol, rtol=0)
    for i, c in step.layers.items():
        torch.testing.assert_close(c.resid_post, seen[i]["post"], atol=_state_tol(lm, seen[i]["post"], i + 1), rtol=0)
        _assert_probs_close(c.attn, out.attentions[i][0, :, -1, :])
    c = step.layers[layer]
    torch.testing.assert_close(c.resid_pre_in, base.hidden_states[layer][0, -1], rtol=0,
                               atol=_state_tol(lm, base.hidden_states[layer][0, -1], layer))
    # the residual the layer used: x + v before the norm; after_norm leaves x itself unchanged. Exact: the
    # runner adds the same float32 v (dose 1) to the same x, one correctly rounded addition per element
    torch.testing.assert_close(c.resid_pre, c.resid_pre_in + (0 if after_norm else vec), atol=0, rtol=0)
    torch.testing.assert_close(c.added, vec, atol=0, rtol=0)  # exact: a copy of the vector added
    assert c.metrics["rounding_survival"] == pytest.approx(1.0, abs=1e-5)  # float32 keeps the whole step
    assert all(step.layers[i].added is None for i in step.layers if i != layer)


def test_dose_scales_the_addition_and_steer_false_leaves_the_model_alone(lm, images):
    vec = _vector(lm, seed=5, scale=0.3)
    inputs = lm.inputs(build_prompt(TEXTS[2]), images[2])
    doubled = forward(lm, inputs, AddVector(0, vec), dose=2.0).captures[0]
    out, _ = _plain(lm, inputs, layer=0, vector=2 * vec)
    tol = floors.logit_floor(lm)  # logits of two routes
    torch.testing.assert_close(doubled.steps[0].final_logits, out.logits[0, -1].float(), atol=tol, rtol=0)
    measured = forward(lm, inputs, AddVector(0, vec), steer=False).captures[0]
    base, _ = _plain(lm, inputs)
    torch.testing.assert_close(measured.steps[0].final_logits, base.logits[0, -1].float(), atol=tol, rtol=0)
    assert measured.steps[0].layers[0].added is None


# ----------------------------------------------------------------------------- decode phase
def test_generation_equals_hf_generate_with_the_same_hook(lm, images):
    n, layer, vec = 3, lm.n_layers - 1, _vector(lm, seed=7)
    inputs = lm.inputs(build_prompt(TEXTS[0]), images[0])
    cap = forward(lm, inputs, AddVector(layer, vec), generate=greedy(n)).captures[0]
    with torch.no_grad(), hooked(lm, layer=layer, vector=vec):
        ref = lm.model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                return_dict_in_generate=True, output_logits=True)
    assert torch.equal(cap.generated, ref.sequences)
    assert [(s.phase, s.decode_step) for s in cap.steps] == [("prefill", 0)] + [("decode", s) for s in range(1, n)]
    prompt = inputs["input_ids"].shape[1]
    for s, (step, logits) in enumerate(zip(cap.steps, ref.logits)):
        assert step.n_keys == prompt + s
        torch.testing.assert_close(step.final_logits, logits[0].float(), atol=floors.logit_floor(lm), rtol=0)
        torch.testing.assert_close(step.layers[layer].added, vec, atol=0, rtol=0)  # a copy of the vector added


# ----------------------------------------------------------------------------- prompt embeddings
def test_kept_embeddings_are_the_language_models_input_and_replay_the_run(lm, images):
    inputs = lm.inputs(build_prompt(TEXTS[0]), images[0])
    got = {}

    def keep(module, args, kwargs):
        got["embeds"] = kwargs["inputs_embeds"].detach().clone()

    handle = lm.model.model.language_model.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        with torch.no_grad():
            lm.model(**inputs)
    finally:
        handle.remove()
    vec = _vector(lm)
    cap = forward(lm, inputs, AddVector(1, vec), keep=Keep(embeds=True)).captures[0]
    # exact: the same embedding lookup and vision tower, same kernels on the same inputs, in both forwards
    torch.testing.assert_close(cap.inputs_embeds, got["embeds"], atol=0, rtol=0)
    replay = forward(lm, with_embeds(inputs, cap), AddVector(1, vec)).captures[0]
    torch.testing.assert_close(replay.steps[0].final_logits, cap.steps[0].final_logits, atol=floors.logit_floor(lm),
                               rtol=0)
    assert with_embeds(inputs, forward(lm, inputs).captures[0]) is inputs  # nothing kept: the inputs as they were


# ----------------------------------------------------------------------------- batches
def _batch(lm, images):
    from mclcbf_diag.engine.batch import batch_inputs

    prompts = [build_prompt(t) for t in TEXTS]
    inputs = batch_inputs(lm, prompts, images)
    pads = (inputs["attention_mask"] == 0).sum(-1).tolist()
    assert len(set(pads)) == len(pads) and min(pads) == 0, "the prompts must need different left padding"
    return prompts, inputs


@pytest.mark.parametrize("with_vector", [False, True])
def test_uncaptured_forward_with_left_padding_equals_per_sample_plain_forwards(lm, images, with_vector):
    layer, vec = 1, _vector(lm, seed=11)
    prompts, inputs = _batch(lm, images)
    iv = AddVector(layer, vec) if with_vector else Intervention()
    with torch.no_grad():  # as batch.py calls it
        res = forward(lm, inputs, iv, keep=Keep(layers=False))
        last, records = res.logits, res.records
    assert last.shape == (len(prompts), lm.model.config.text_config.vocab_size)
    for b, (p, img) in enumerate(zip(prompts, images)):
        alone = lm.inputs(p, img)
        with torch.no_grad(), hooked(lm, layer=layer, vector=vec if with_vector else None):
            ref = lm.model(**alone).logits[0, -1]
        torch.testing.assert_close(last[b].float(), ref.float(), atol=floors.logit_floor(lm), rtol=0)
        if with_vector:
            assert set(records[b]) == {layer}
            assert records[b][layer]["rounding_survival"] == pytest.approx(1.0, abs=1e-5)
        else:
            assert records[b] == {}


def test_forward_captures_every_row_of_a_padded_batch_as_a_plain_forward_of_it_alone(lm, images):
    """The one entry point: every row of a left-padded batch captured at every layer, its answer's logits, its
    records and its kept embeddings, each as a plain hooked forward of that prompt alone gives them."""
    from mclcbf_diag.engine.runner import RunResult

    layer, vec = 1, _vector(lm, seed=13)
    prompts, inputs = _batch(lm, images)
    with torch.no_grad():
        res = forward(lm, inputs, AddVector(layer, vec), keep=Keep(embeds=True))
        uncaptured = forward(lm, inputs, AddVector(layer, vec), keep=Keep(layers=False))
    assert isinstance(res, RunResult) and len(res.captures) == len(res.records) == len(prompts)
    assert res.sequences is None and res.logits.dtype == torch.float32 and uncaptured.captures is None
    language_model = lm.model.get_submodule(lm.adapter.language_model)
    for b, (p, img) in enumerate(zip(prompts, images)):
        alone = lm.inputs(p, img)
        seen_embeds = {}

        def keep(module, args, kwargs):
            seen_embeds["x"] = kwargs["inputs_embeds"].detach()

        hook = language_model.register_forward_pre_hook(keep, with_kwargs=True)
        try:
            out, seen = _plain(lm, alone, layer=layer, vector=vec)
        finally:
            hook.remove()
        cap = res.captures[b]
        assert cap.prompt_len == alone["input_ids"].shape[1] and int(cap.detected.sum()) > 0
        for logits in (res.logits[b], uncaptured.logits[b], cap.steps[0].final_logits):
            torch.testing.assert_close(logits, out.logits[0, -1].float(), atol=floors.logit_floor(lm), rtol=0)
        assert sorted(cap.steps[0].layers) == list(range(lm.n_layers))
        for i, c in cap.steps[0].layers.items():
            ref = seen[i]["post"]
            torch.testing.assert_close(c.resid_post, ref, atol=_state_tol(lm, ref, i + 1), rtol=0)
        assert res.records[b][layer]["rounding_survival"] == pytest.approx(1.0, abs=1e-5)
        want = seen_embeds["x"][0]  # the row's own positions: the padded batch's last prompt_len
        torch.testing.assert_close(cap.inputs_embeds[0, -cap.prompt_len:], want,
                                   atol=_state_tol(lm, want, 0), rtol=0)


@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True")
def test_forward_runs_without_gradients_on_its_own(lm, images):
    _, inputs = _batch(lm, images)
    last = forward(lm, inputs, AddVector(1, _vector(lm)), keep=Keep(layers=False)).logits
    assert not last.requires_grad


@pytest.mark.parametrize("layer", [0, 2])
def test_rows_continuing_a_shared_prefix_from_a_later_layer_equal_plain_hooked_forwards(lm, images, layer):
    """forward over the last positions only, attending to each question's cached prefix in
    place (models.shared_prefix), the layers before the edit not run (skip_to), against each
    prompt's own full forward with a plain HF hook."""
    from mclcbf_diag.engine.runner import Continuation, prefix_forward
    from mclcbf_diag.interventions.base import rows_of
    from mclcbf_diag.models.shared_prefix import SharedPrefix, continuation_mask, continuing

    vec = _vector(lm, seed=5)
    prompts, inputs = _batch(lm, images)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    rows = rows_of(ids, mask, lm.tokens.image_token_id)
    states_from = min(r.pad + r.last_image + 1 for r in rows)
    pre = prefix_forward(lm, inputs, states_from=states_from)
    owner = torch.tensor([2, 0, 0, 1])
    T = ids.shape[1]
    start = T - 1  # the decision token only
    feed = {"inputs_embeds": pre.embeds[owner, start:], "position_ids": inputs["position_ids"][owner, start:],
            "attention_mask": continuation_mask(mask[owner], start, pre.embeds.dtype)}
    kv = [(c.keys, c.values) for c in pre.cache.layers]
    shared = SharedPrefix([k for k, _ in kv], [v for _, v in kv], start, owner)
    entering = pre.layer_inputs[layer][owner, start - states_from:] if layer else None
    with torch.no_grad(), continuing(lm, shared):
        cont = Continuation(start, prefix_keys={i: k for i, (k, _) in enumerate(kv)}, prefix_rows=owner.tolist(),
                            full_mask=mask[owner], skip_to=layer, entering=entering)
        res = forward(lm, feed, AddVector(layer, vec), keep=Keep(layers=False), full_ids=ids[owner], continuation=cont,
                      prepare=False, use_cache=False)
        last, records = res.logits, res.records
    for b, q in enumerate(owner.tolist()):
        with torch.no_grad(), hooked(lm, layer=layer, vector=vec):
            ref = lm.model(**lm.inputs(prompts[q], images[q])).logits[0, -1]
        torch.testing.assert_close(last[b].float(), ref.float(), atol=floors.logit_floor(lm), rtol=0)
        assert records[b][layer]["rounding_survival"] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="skip_to"):
        forward(lm, feed, AddVector(layer, vec), keep=Keep(layers=False), full_ids=ids[owner], prepare=False,
                continuation=Continuation(start, full_mask=mask[owner], skip_to=layer + 1, entering=entering))

"""Batched answers (mclcbf_diag.engine.batch) against per-sample ``runner.forward``.

Prompts of different lengths force left padding: every row must still get exactly the
margin it gets alone, baseline and steered, for every steering site and token choice.
Unknown words map to <unk> in the embedded word-level vocabulary, which lengthens a
prompt without changing its template.
"""


import floors
import pytest
import torch

from mclcbf_diag import barrier as B
from mclcbf_diag import shipped
from mclcbf_diag.data import build_prompt, load_image, load_pope, resolve_image
from mclcbf_diag.engine.batch import answer_batch, answer_pair, batch_inputs, cached_prefix
from mclcbf_diag.engine.runner import forward
from mclcbf_diag.interventions import MCLCBF

POPE = shipped.POPE
TEXTS = [
    "Is there a dog in the image ?",
    "Is there a big red dog in the image?",  # two <unk>: 2 tokens longer
    "dog?",  # 6 tokens shorter
    "Is there a cup in the image?",
    "Is there really a big knife over here in the image?",
]


def _cfg(preset="seed-exp6", *overrides):
    return B.apply_overrides(B.get_preset(preset), list(overrides))


CONFIGS = {
    "seed-exp6 detected": _cfg("seed-exp6", "span=detected", "tau=0.99"),
    "seed-exp6 fixed span": _cfg("seed-exp6", "fixed_span=1,20", "tau=0.99", "alpha=20"),
    "fixed span, after_image (no cache)": _cfg("seed-exp6", "fixed_span=1,20", "tau=0.99", "tokens=after_image"),
    "ln1_out": _cfg("seed-exp6", "span=detected", "tau=0.99", "site=ln1_out", "alpha=20"),
    "attn_logits": _cfg("fixed", "tau=0.99"),
    "attn_logits after_image": _cfg("fixed", "tokens=after_image", "tau=0.99"),
    "resid_pre after_image": _cfg("seed-exp6", "span=detected", "tau=0.99", "alpha=10", "tokens=after_image"),
}


@pytest.fixture(scope="module", params=["embedded", "tiny_gqa"])
def lm(request):
    return request.getfixturevalue(f"{request.param}_model")


@pytest.fixture(scope="module")
def batch():
    questions = load_pope(shipped.pope_file("adversarial"))
    images = [load_image(resolve_image(q, shipped.IMAGES)) for q in questions[: len(TEXTS)]]
    return [build_prompt(t) for t in TEXTS], images


def _tol(lm) -> float:
    """Tolerance of a Yes − No margin computed by two routes (batched, padded, cached prefix, alone):
    its float32 noise floor, ``floors.margin_floor``."""
    return floors.margin_floor(lm, lm.tokens.yes_id, lm.tokens.no_id)


def _margin(lm, capture):
    logits = capture.steps[0].final_logits
    return float(logits[lm.tokens.yes_id] - logits[lm.tokens.no_id])


def _fired(capture):
    return [i for i, c in sorted(capture.steps[0].layers.items())
            if c.metrics.get("barrier_active")]


@pytest.fixture(scope="module")
def singles(lm, batch):
    """Per-sample runner.forward margins and fired layers, per config."""
    prompts, images = batch
    out = {}
    for name, cfg in CONFIGS.items():
        rows = []
        for p, img in zip(prompts, images):
            inputs = lm.inputs(p, img)
            base, steered = forward(lm, inputs, cfg, steer=False).captures[0], forward(lm, inputs, cfg).captures[0]
            rows.append((_margin(lm, base), _margin(lm, steered), _fired(steered)))
        out[name] = rows
    return out


def test_prompts_really_differ_in_length(lm, batch):
    inputs = batch_inputs(lm, *batch)
    pads = (inputs["attention_mask"] == 0).sum(-1)
    assert len(set(pads.tolist())) >= 3 and int(pads.min()) == 0
    for b, p in enumerate(pads.tolist()):  # real tokens get 0..L_b-1, as alone
        assert inputs["position_ids"][b, p:].tolist() == list(range(inputs["input_ids"].shape[1] - p))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_batched_margins_equal_per_sample_runs(lm, batch, singles, name):
    prompts, images = batch
    cfg = CONFIGS[name]
    base = answer_batch(lm, prompts, images, cfg, False)
    steered = answer_batch(lm, prompts, images, cfg, True)
    pair_base, pair_steered = answer_pair(lm, prompts, images, cfg)
    tol = _tol(lm)
    for b, (m_base, m_steer, fired) in enumerate(singles[name]):
        assert fired, "the config must fire for the test to mean anything"
        assert base[b]["margin"] == pytest.approx(m_base, rel=0, abs=tol)
        assert pair_base[b]["margin"] == pytest.approx(m_base, rel=0, abs=tol)
        assert steered[b]["margin"] == pytest.approx(m_steer, rel=0, abs=tol)
        assert pair_steered[b]["margin"] == pytest.approx(m_steer, rel=0, abs=tol)
        # discrete, compared exactly: every h here is over 10⁴ mass floors from τ
        assert steered[b]["layers_fired"] == pair_steered[b]["layers_fired"] == fired
        assert steered[b]["answer"] == ("yes" if steered[b]["margin"] > 0 else "no")


def test_steering_moves_margins(embedded_model, batch):
    base, steered = answer_pair(embedded_model, *batch, CONFIGS["attn_logits after_image"])
    assert max(abs(s["margin"] - b["margin"]) for b, s in zip(base, steered)) > 0.1


def test_cached_prefix_is_the_first_target(lm, batch):
    prompts, images = batch
    inputs = batch_inputs(lm, prompts, images)
    ids = inputs["input_ids"]
    mask = inputs["attention_mask"]
    assert cached_prefix(lm, ids, mask, MCLCBF(CONFIGS["seed-exp6 detected"])) == ids.shape[1] - 1
    # after_image: the cache ends at the first text token after the image …
    same = batch_inputs(lm, [prompts[0], prompts[0]], [images[0], images[3]])  # one length: no padding
    pads = (same["attention_mask"] == 0).sum(-1)
    first_text = min(int(p) + int(torch.nonzero(row[int(p):] == lm.tokens.image_token_id).max()) + 1
                     for row, p in zip(same["input_ids"], pads))
    assert cached_prefix(lm, same["input_ids"], same["attention_mask"],
                         MCLCBF(CONFIGS["resid_pre after_image"])) == first_text
    # … unless another row's image lies beyond it (much shorter prompts): re-run all
    assert cached_prefix(lm, ids, inputs["attention_mask"], MCLCBF(CONFIGS["resid_pre after_image"])) == 0
    # a fixed span ending inside the image puts image tokens among the targets: no cache
    assert cached_prefix(lm, ids, mask, MCLCBF(CONFIGS["fixed span, after_image (no cache)"])) == 0


def test_batch_size_does_not_change_answers(embedded_model):
    lm = embedded_model
    questions = load_pope(shipped.pope_file("popular"))[:12]
    prompts = [build_prompt(q.text) for q in questions]
    prompts[3] = build_prompt("Is there a very big " + questions[3].text.split()[-4] + " in the image?")
    images = [load_image(resolve_image(q, shipped.IMAGES)) for q in questions]
    cfg = CONFIGS["attn_logits after_image"]
    results = {}
    for bs in (1, 5, 12):
        base, steered = [], []
        for i in range(0, len(prompts), bs):
            b, s = answer_pair(lm, prompts[i:i + bs], images[i:i + bs], cfg)
            base += b
            steered += s
        results[bs] = (base, steered)
    ref_base, ref_steered = results[1]
    tol = _tol(lm)
    assert any(b["answer"] != s["answer"] for b, s in zip(ref_base, ref_steered))
    for bs in (5, 12):
        base, steered = results[bs]
        # discrete, compared exactly: every margin here is over 10⁴ margin floors from 0
        assert [r["answer"] for r in base] == [r["answer"] for r in ref_base]
        assert [r["answer"] for r in steered] == [r["answer"] for r in ref_steered]
        for got, ref in zip(base + steered, ref_base + ref_steered):
            assert got["margin"] == pytest.approx(ref["margin"], rel=0, abs=tol)
            assert got.get("layers_fired") == ref.get("layers_fired")


def test_generation_is_batch_invariant_and_steers_the_first_token(embedded_model, batch):
    lm = embedded_model
    prompts, images = batch
    cfg = CONFIGS["attn_logits after_image"]
    inputs = batch_inputs(lm, prompts, images, share_images=False)
    for steer in (False, True):
        first = answer_batch(lm, prompts, images, cfg, steer)
        gen = answer_batch(lm, prompts, images, cfg, steer, inputs=inputs, max_new_tokens=3)
        alone = [answer_batch(lm, [p], [i], cfg, steer, max_new_tokens=3)[0] for p, i in zip(prompts, images)]
        for f, g, a in zip(first, gen, alone):
            assert g["margin"] == pytest.approx(f["margin"], rel=0, abs=_tol(lm))
            # discrete: each greedy token leads the next by over 10⁴ logit floors
            assert g["text"] == a["text"] and g["text"]


def test_prompt_without_image_is_a_user_error(embedded_model, batch):
    from mclcbf_diag.errors import UserError

    _, images = batch
    with pytest.raises(UserError, match="placeholder"):
        answer_batch(embedded_model, ["USER: hello\nASSISTANT:"], images[:1], CONFIGS["attn_logits"], True)


# ============================================================================= independent references
# The tests above compare the batched path with runner.forward, the same runner. These compare it
# with plain HF forwards (no nnsight, no toolkit code): per sample, and as one left-padded
# batch built here with the tokenizer; the intervention is a vector added to the decision
# token's residual, implemented for the reference as a ``register_forward_pre_hook``.
from mclcbf_diag.interventions.base import Intervention

STEER_LAYER = 1


class _AddAtDecision(Intervention):
    name = "test-add-at-decision"
    sites = frozenset({"residual"})

    def __init__(self, vector):
        super().__init__()
        self.vector = vector

    def layers(self, n_layers):
        return (STEER_LAYER,)

    def first_edited(self, row):
        return row.decision

    def residual(self, site):
        if site.steer:
            for row in site.rows:
                site.add(row, [row.decision], self.vector[None])


def _steering_vector(lm):
    g = torch.Generator().manual_seed(0)
    return 2.0 * torch.randn(lm.text_config.hidden_size, generator=g)


def _hf_margins(lm, enc: dict, vector=None) -> list[float]:
    """Yes − No at the last position of a plain HF forward; ``vector`` added there at STEER_LAYER by a hook."""
    def add(module, args, kwargs):
        h = args[0].clone()
        h[:, -1] += vector
        return (h, *args[1:]), kwargs

    layer = lm.model.model.language_model.layers[STEER_LAYER]
    handle = layer.register_forward_pre_hook(add, with_kwargs=True) if vector is not None else None
    try:
        with torch.no_grad():
            logits = lm.model(**enc).logits[:, -1]
    finally:
        if handle is not None:
            handle.remove()
    return (logits[:, lm.tokens.yes_id] - logits[:, lm.tokens.no_id]).tolist()


def _hf_left_padded(lm, prompts, images) -> dict:
    tok = lm.processor.tokenizer
    side, tok.padding_side = tok.padding_side, "left"
    try:
        enc = dict(lm.processor(text=prompts, images=images, return_tensors="pt", padding="longest"))
    finally:
        tok.padding_side = side
    enc["position_ids"] = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return enc


def test_batched_answers_equal_plain_hf_forwards_with_a_hook(lm, batch):
    prompts, images = batch
    vec = _steering_vector(lm)
    iv = _AddAtDecision(vec)
    alone_base = [_hf_margins(lm, lm.inputs(p, i))[0] for p, i in zip(prompts, images)]
    alone_steer = [_hf_margins(lm, lm.inputs(p, i), vec)[0] for p, i in zip(prompts, images)]
    padded = _hf_left_padded(lm, prompts, images)
    assert len(set((padded["attention_mask"] == 0).sum(-1).tolist())) >= 3  # really padded
    padded_base, padded_steer = _hf_margins(lm, padded), _hf_margins(lm, padded, vec)
    assert max(abs(s - b) for s, b in zip(alone_steer, alone_base)) > 0.05, "the vector must move the margins"
    pair_base, pair_steer = answer_pair(lm, prompts, images, iv)  # continues from the cached prefix
    full_base, full_steer = answer_batch(lm, prompts, images, iv, False), answer_batch(lm, prompts, images, iv, True)
    tol = _tol(lm)
    for b in range(len(prompts)):
        assert padded_base[b] == pytest.approx(alone_base[b], rel=0, abs=tol)  # the reference agrees with itself
        assert padded_steer[b] == pytest.approx(alone_steer[b], rel=0, abs=tol)
        for got in (pair_base[b], full_base[b]):
            assert got["margin"] == pytest.approx(alone_base[b], rel=0, abs=tol)
        for got in (pair_steer[b], full_steer[b]):
            assert got["margin"] == pytest.approx(alone_steer[b], rel=0, abs=tol)
            assert got["answer"] == ("yes" if alone_steer[b] > 0 else "no")  # margins: >10⁴ floors from 0


def test_batch_inputs_equal_the_processors_own_left_padding(lm, batch):
    prompts, images = batch
    ours, ref = batch_inputs(lm, prompts, images, share_images=False), _hf_left_padded(lm, prompts, images)
    for key in ("input_ids", "attention_mask", "position_ids"):
        assert torch.equal(ours[key], ref[key]), key
    # exact: the same processor call on the same images
    torch.testing.assert_close(ours["pixel_values"], ref["pixel_values"].to(lm.dtype), atol=0, rtol=0)
    shared = batch_inputs(lm, prompts, images)  # one vision-tower pass per distinct image, same margins
    assert "pixel_values" not in shared
    with torch.no_grad():
        a = lm.model(**shared, logits_to_keep=1).logits[:, -1]
    b = _hf_margins(lm, ref)
    assert (a[:, lm.tokens.yes_id] - a[:, lm.tokens.no_id]).tolist() == pytest.approx(b, rel=0, abs=_tol(lm))

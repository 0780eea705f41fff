"""AD-HH on the seam equals its released form: listed heads' text attention zeroed after the softmax.

The reference patches transformers' eager attention as the released ``modeling_llama.py``
does: for each listed head, if the last query's mass on the keys after the image reaches the
threshold, those probabilities are set to 0 (no renormalisation).
"""

import floors
import pytest
import torch
import transformers.models.llama.modeling_llama as llama
from test_interventions_pai import plain_model, questions  # noqa: F401  (fixture)

from mclcbf_diag import shipped
from mclcbf_diag.data import build_prompt
from mclcbf_diag.embedded.world import sample_scene
from mclcbf_diag.engine.batch import answer_batch, answer_pair, batch_inputs
from mclcbf_diag.errors import UserError
from mclcbf_diag.experiments.trace import trace_sample
from mclcbf_diag.interventions import REGISTRY
from mclcbf_diag.interventions.adhh import AdHH, AdHHKnobs, head_influence
from mclcbf_diag.measurements.records import documented
from mclcbf_diag.models import load_model


def probs_margin(lm, prompt, image, edit_probs, layer_hook=None):
    """Plain HF forward with ``edit_probs(p, image_cols, layer)`` after the softmax of every layer."""
    model = plain_model(lm)
    inputs = lm.inputs(prompt, image)
    image_cols = inputs["input_ids"][0] == lm.tokens.image_token_id
    original = llama.eager_attention_forward

    def eager(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        k = llama.repeat_kv(key, module.num_key_value_groups)
        v = llama.repeat_kv(value, module.num_key_value_groups)
        w = torch.matmul(query, k.transpose(2, 3)) * scaling
        if attention_mask is not None:
            w = w + attention_mask
        w = torch.softmax(w, dim=-1, dtype=torch.float32).to(query.dtype)
        w = edit_probs(w, image_cols[: w.shape[-1]], module.layer_idx)
        return torch.matmul(w, v).transpose(1, 2).contiguous(), w

    handles = []
    if layer_hook is not None:
        for i, layer in enumerate(model.model.language_model.layers):
            handles.append(layer.register_forward_pre_hook(
                lambda m, a, kw, i=i: layer_hook(a[0] if a else kw["hidden_states"], i), with_kwargs=True))
    llama.eager_attention_forward = eager
    try:
        with torch.no_grad():
            logits = model(**inputs).logits[0, -1]
    finally:
        llama.eager_attention_forward = original
        for h in handles:
            h.remove()
    return float(logits[lm.tokens.yes_id] - logits[lm.tokens.no_id])


def adhh_reference(heads, threshold):
    def edit(w, img, layer):
        w = w.clone()
        end = int(torch.nonzero(img).max()) + 1
        for lay, h in heads:
            if lay == layer and float(w[:, h, -1, end:].sum()) >= threshold:
                w[:, h, -1, end:] = 0
        return w
    return edit


HEADS = ((1, 0), (1, 2), (2, 1), (2, 3), (3, 0))


def test_registered_with_paper_defaults():
    assert REGISTRY["adhh"] is AdHH
    assert AdHH().knobs.threshold == 0.4 and AdHH().knobs.heads is None
    assert len(AdHH.presets["llava-1.5-7b"].heads) == 20
    with pytest.raises(UserError, match="out of range"):
        AdHH.from_preset("llava-1.5-7b").layers(4)


@pytest.mark.parametrize("threshold", [0.4, 0.1])
def test_trace_matches_patched_attention(embedded_model, questions, threshold):  # noqa: F811
    texts, images = questions
    iv = AdHH(AdHHKnobs(heads=HEADS, threshold=threshold))
    result = trace_sample(embedded_model, texts[0], images[0], iv)
    ref = probs_margin(embedded_model, build_prompt(texts[0]), images[0], adhh_reference(HEADS, threshold))
    s = result.summary()
    floor = floors.margin_floor(embedded_model, embedded_model.tokens.yes_id, embedded_model.tokens.no_id)
    assert s["margin_after"] == pytest.approx(ref, rel=0, abs=floor)  # the Yes − No margin's floor
    r = result.records
    fired = r[(r.metric == "adhh_heads_fired") & (r.condition == "steered")].value.sum()
    if threshold == 0.1:
        assert fired > 0 and s["margin_after"] != pytest.approx(s["margin_before"], abs=1e-4)
    assert all(documented(m, iv) for m in set(r.metric))


def test_batched_rows_equal_single_traces(embedded_model, questions):  # noqa: F811
    lm = embedded_model
    texts, images = questions
    prompts = [build_prompt(t) for t in texts]
    iv = AdHH(AdHHKnobs(heads=HEADS, threshold=0.1))
    _, steered = answer_pair(lm, prompts, images, iv, inputs=batch_inputs(lm, prompts, images))
    floor = floors.margin_floor(lm, lm.tokens.yes_id, lm.tokens.no_id)  # the Yes − No margin's floor
    for t, img, row in zip(texts, images, steered):
        assert row["margin"] == pytest.approx(trace_sample(lm, t, img, iv).summary()["margin_after"], rel=0, abs=floor)


def _influence_one_head_at_a_time(lm, questions, images):
    """The criterion as a plain loop: every head zero-ablated alone, one full forward each.

    Returns the scores and, per head, the mean over questions of the four probabilities each score is made of
    (p_wrong and p_right, before and after the ablation), which sets its floor."""
    from mclcbf_diag.data import build_prompt

    L, H = lm.n_layers, lm.text_config.num_attention_heads
    hd = lm.text_config.hidden_size // H
    model = plain_model(lm)
    layers = model.model.language_model.layers
    score = torch.zeros(L, H, dtype=torch.float64)
    mass = torch.zeros(L, H, dtype=torch.float64)
    with torch.no_grad():
        for q, image in zip(questions, images):
            inputs = lm.inputs(build_prompt(q.text), image)
            right, wrong = (lm.tokens.yes_id, lm.tokens.no_id) if q.label == "yes" else (lm.tokens.no_id,
                                                                                         lm.tokens.yes_id)
            p0 = model(**inputs).logits[0, -1].softmax(-1)
            for i in range(L):
                for h in range(H):
                    def zero(module, args, h=h):
                        x = args[0].clone()
                        x[..., h * hd:(h + 1) * hd] = 0
                        return (x,)
                    handle = layers[i].self_attn.o_proj.register_forward_pre_hook(zero)
                    p1 = model(**inputs).logits[0, -1].softmax(-1)
                    handle.remove()
                    score[i, h] += float((p0[wrong] - p1[wrong]) - (p0[right] - p1[right])) / len(questions)
                    mass[i, h] += float(p0[wrong] + p1[wrong] + p0[right] + p1[right]) / len(questions)
    return score, mass


def test_head_influence_equals_one_ablation_per_forward(saved_tiny_dir):
    from mclcbf_diag.data import PopeQuestion

    lm = load_model(str(saved_tiny_dir))
    qs = [PopeQuestion(1, "a.png", "Is there a dog in the image?", "yes", 0),
                 PopeQuestion(2, "b.png", "Is there a cat in the image?", "no", 1)]
    images = [sample_scene(3, 1).image(), sample_scene(4, 1).image()]
    got = head_influence(lm, qs, images)
    want, mass = _influence_one_head_at_a_time(lm, qs, images)
    assert got.shape == (lm.n_layers, lm.text_config.num_attention_heads)
    assert float(want.abs().max()) > 1e-5  # the ablations do move the answer probabilities
    # a score is a difference of four probabilities: not one prob_floor each (~4e-6, as large as the scores), but
    # δp_k = p_k(δl_k − Σ p δl) ≤ p_k · prob_floor (floors.prob_floor's derivation), summed over the four
    tol = floors.prob_floor(lm) * mass
    assert ((got - want).abs() <= tol).all(), ((got - want).abs() / tol).max()


def test_calibration_finds_heads_by_the_papers_criterion(embedded_model):
    """AdHH's prepare picks the top-k heads of head_influence on the split's first questions."""
    from mclcbf_diag.data import load_image, load_pope, resolve_image

    qs = load_pope(shipped.pope_file("adversarial"))[:2]
    images = [load_image(resolve_image(q, shipped.IMAGES)) for q in qs]
    scores = head_influence(embedded_model, qs, images)
    iv = AdHH(AdHHKnobs(top_k=3, calibration=2))
    assert iv.layers(embedded_model.n_layers) == tuple(range(embedded_model.n_layers))
    # runs end to end with the heads found in prepare
    assert answer_batch(embedded_model, ["USER: <image>\nIs there a dog in the image?\nASSISTANT:"],
                        [questions_image()], iv, steer=True)
    assert len(iv.found) == 3 and len(set(iv.found)) == 3
    # exact by construction: prepare ran head_influence itself, on the same questions and images in this process
    assert [float(scores[lh]) for lh in iv.found] == sorted(scores.flatten().tolist(), reverse=True)[:3]


def questions_image():
    from mclcbf_diag.data import load_image, load_pope, resolve_image

    return load_image(resolve_image(load_pope(shipped.pope_file("adversarial"))[0], shipped.IMAGES))

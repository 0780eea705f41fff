"""VISTA on the seam equals a plain re-implementation: two forwards for v, then layer pre-hooks.

The reference computes v_ℓ (residual entering layer ℓ at the last token, with the image minus
the same ids without the image tokens) with a fresh, plain copy of the model, and applies
``x' = ‖x‖·normalize(x̂ + λ·s·v̂)``, ``s = 1 + max(0, cos(x, −v))``, to every position of the
residual entering each layer with forward pre-hooks (``LzVv123456/VISTA``'s ``VSVLayer``).
"""

import floors
import pytest
import torch
import torch.nn.functional as F
from test_interventions_pai import plain_model, questions  # noqa: F401  (fixture)

from mclcbf_diag.data import build_prompt
from mclcbf_diag.engine.batch import answer_pair, batch_inputs
from mclcbf_diag.errors import UserError
from mclcbf_diag.experiments.trace import trace_sample
from mclcbf_diag.interventions import REGISTRY
from mclcbf_diag.interventions.vista import VISTA, VISTAKnobs
from mclcbf_diag.measurements.records import documented


def hooked_margin(lm, prompt, image, lam, similarity=True):
    model = plain_model(lm)
    inputs = lm.inputs(prompt, image)
    ids = inputs["input_ids"][0]
    with torch.no_grad():
        pos = model(**inputs, output_hidden_states=True).hidden_states
        neg = model(input_ids=ids[ids != lm.tokens.image_token_id][None], output_hidden_states=True).hidden_states
    vs = [(pos[i][0, -1] - neg[i][0, -1]).float() for i in range(lm.n_layers)]

    def hook_for(v):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            if v.norm() == 0:
                return
            xf = x[0].float()
            s = 1 + torch.clamp(F.cosine_similarity(xf, -v[None], dim=-1), min=0)[:, None] if similarity else 1
            new = xf.norm(dim=-1, keepdim=True) * F.normalize(F.normalize(xf, dim=-1) + lam * s * v / v.norm(), dim=-1)
            x[0] = new.to(x.dtype)
        return hook

    layers = model.model.language_model.layers
    handles = [layers[i].register_forward_pre_hook(hook_for(vs[i]), with_kwargs=True) for i in range(lm.n_layers)]
    try:
        with torch.no_grad():
            logits = model(**inputs).logits[0, -1]
    finally:
        for h in handles:
            h.remove()
    return float(logits[lm.tokens.yes_id] - logits[lm.tokens.no_id])


def test_registered_with_paper_defaults():
    assert REGISTRY["vista"] is VISTA
    k = VISTA().knobs
    assert (k.lam, k.similarity, k.logits_alpha) == (0.01, True, 0.0)
    assert VISTA().layers(32) == tuple(range(32))


@pytest.mark.parametrize("model,similarity", [("embedded_model", True), ("tiny_gqa_model", False)])
def test_trace_matches_plain_hooks(model, similarity, questions, request):  # noqa: F811
    lm = request.getfixturevalue(model)
    texts, images = questions
    iv = VISTA(VISTAKnobs(lam=0.3, similarity=similarity))
    result = trace_sample(lm, texts[0], images[0], iv)
    ref = hooked_margin(lm, build_prompt(texts[0]), images[0], 0.3, similarity)
    s = result.summary()
    floor = floors.margin_floor(lm, lm.tokens.yes_id, lm.tokens.no_id)
    assert s["margin_after"] == pytest.approx(ref, rel=0, abs=floor)  # the Yes − No margin's floor
    assert s["margin_after"] != pytest.approx(s["margin_before"], abs=1e-4)
    emitted = set(result.records.metric)
    assert {"vista_vector_norm", "vista_similarity", "rounding_survival"} <= emitted
    assert all(documented(m, iv) for m in emitted)


def test_paper_lambda_matches_too(embedded_model, questions):  # noqa: F811
    texts, images = questions
    ref = hooked_margin(embedded_model, build_prompt(texts[2]), images[2], 0.01)
    got = trace_sample(embedded_model, texts[2], images[2], VISTA()).summary()["margin_after"]
    floor = floors.margin_floor(embedded_model, embedded_model.tokens.yes_id, embedded_model.tokens.no_id)
    assert got == pytest.approx(ref, rel=0, abs=floor)  # the Yes − No margin's floor


def test_batched_rows_equal_single_traces(embedded_model, questions):  # noqa: F811
    lm = embedded_model
    texts, images = questions
    prompts = [build_prompt(t) for t in texts]
    iv = VISTA(VISTAKnobs(lam=0.3))
    _, steered = answer_pair(lm, prompts, images, iv, inputs=batch_inputs(lm, prompts, images))
    floor = floors.margin_floor(lm, lm.tokens.yes_id, lm.tokens.no_id)  # the Yes − No margin's floor
    for t, img, row in zip(texts, images, steered):
        assert row["margin"] == pytest.approx(trace_sample(lm, t, img, iv).summary()["margin_after"], rel=0, abs=floor)


def test_logit_augmentation_is_a_clear_user_error(embedded_model, questions):  # noqa: F811
    texts, images = questions
    with pytest.raises(UserError, match="final logits"):
        trace_sample(embedded_model, texts[0], images[0], VISTA(VISTAKnobs(logits_alpha=0.3)))

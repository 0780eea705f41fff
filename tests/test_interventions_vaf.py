"""ClearSight/VAF on the seam equals its released form: text-query logits scaled before the softmax.

The reference (a patched eager attention, as ``ustc-hyin/ClearSight``'s ``AttnAdapter``)
multiplies the logits of the text queries after the image by α on image keys and by β on the
keys before the image, in the targeted layers.
"""

import floors
import pytest
import torch
from test_interventions_pai import patched_margin, questions  # noqa: F401  (fixture)

from mclcbf_diag.data import build_prompt
from mclcbf_diag.engine.batch import answer_pair, batch_inputs
from mclcbf_diag.experiments.trace import trace_sample
from mclcbf_diag.interventions import REGISTRY
from mclcbf_diag.interventions.vaf import VAF, VAFKnobs
from mclcbf_diag.measurements.records import documented


def vaf_reference(alpha, beta):
    def edit(w, img, layer):
        w = w.clone()
        pos = torch.nonzero(img).flatten()
        first, last = int(pos.min()), int(pos.max())
        w[:, :, last + 1:, first:last + 1] *= alpha
        w[:, :, last + 1:, :first] *= beta
        return w
    return edit


def test_registered_with_paper_defaults():
    assert REGISTRY["vaf"] is VAF
    k = VAF().knobs
    assert (k.alpha, k.beta, k.include_bos) == (1.15, 0.95, True)
    assert VAF().layers(32) == tuple(range(9, 15))


@pytest.mark.parametrize("model", ["embedded_model", "tiny_gqa_model"])
def test_trace_matches_patched_attention(model, questions, request):  # noqa: F811
    lm = request.getfixturevalue(model)
    texts, images = questions
    iv = VAF(VAFKnobs(alpha=2.0, beta=0.5, layers=(0, 1, 2)))  # stronger, wider: the effect is visible
    result = trace_sample(lm, texts[0], images[0], iv)
    ref = patched_margin(lm, build_prompt(texts[0]), images[0], vaf_reference(2.0, 0.5), {0, 1, 2})
    s = result.summary()
    floor = floors.margin_floor(lm, lm.tokens.yes_id, lm.tokens.no_id)
    assert s["margin_after"] == pytest.approx(ref, rel=0, abs=floor)  # the Yes − No margin's floor
    assert s["margin_after"] != pytest.approx(s["margin_before"], abs=1e-4)
    emitted = set(result.records.metric)
    assert {"vaf_image_delta", "vaf_prefix_delta"} <= emitted
    assert all(documented(m, iv) for m in emitted)


def test_paper_defaults_match_too(embedded_model, questions):  # noqa: F811
    texts, images = questions
    iv = VAF()
    ref = patched_margin(embedded_model, build_prompt(texts[1]), images[1], vaf_reference(1.15, 0.95),
                         set(iv.layers(embedded_model.n_layers)))
    floor = floors.margin_floor(embedded_model, embedded_model.tokens.yes_id, embedded_model.tokens.no_id)
    got = trace_sample(embedded_model, texts[1], images[1], iv).summary()["margin_after"]
    assert got == pytest.approx(ref, rel=0, abs=floor)  # the Yes − No margin's floor


def test_batched_rows_equal_single_traces(embedded_model, questions):  # noqa: F811
    lm = embedded_model
    texts, images = questions
    prompts = [build_prompt(t) for t in texts]
    iv = VAF(VAFKnobs(alpha=2.0, beta=0.5, layers=(0, 1, 2)))
    _, steered = answer_pair(lm, prompts, images, iv, inputs=batch_inputs(lm, prompts, images))
    floor = floors.margin_floor(lm, lm.tokens.yes_id, lm.tokens.no_id)  # the Yes − No margin's floor
    for t, img, row in zip(texts, images, steered):
        assert row["margin"] == pytest.approx(trace_sample(lm, t, img, iv).summary()["margin_after"], rel=0, abs=floor)

"""The seam is real: an intervention written outside the package runs through trace, explain and pope.

``SteeringVector`` adds a fixed vector to the residual stream at chosen layers, at the
decision token (activation addition). It is defined here, in the test, and uses only the
public seam (:mod:`mclcbf_diag.interventions`); nothing inside the package knows it. The
README shows the same class. The reference is a plain PyTorch forward pre-hook on the
decoder layers, written here too.
"""

from dataclasses import dataclass

import floors
import pytest
import torch

from mclcbf_diag import shipped
from mclcbf_diag.data import build_prompt, load_image, load_pope, resolve_image
from mclcbf_diag.engine.batch import answer_pair, batch_inputs
from mclcbf_diag.experiments.explain import explain_sample
from mclcbf_diag.experiments.trace import trace_sample
from mclcbf_diag.interventions import Intervention

POPE = shipped.POPE


@dataclass(frozen=True)
class VectorKnobs:
    layers: tuple[int, ...] = (1, 2)
    scale: float = 1.0
    seed: int = 0


class SteeringVector(Intervention):
    """Add ``scale`` × a fixed unit-RMS random direction to the decision token's residual."""

    name = "steering-vector"
    Knobs = VectorKnobs
    presets = {"default": VectorKnobs()}
    sites = frozenset({"residual"})

    def layers(self, n_layers):
        return tuple(layer for layer in self.knobs.layers if layer < n_layers)

    def first_edited(self, row):
        return row.decision

    def vector(self, d: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.knobs.seed)
        return torch.randn(d, generator=g) * self.knobs.scale

    def residual(self, site):
        if not site.steer:
            return
        for row in site.rows:
            pos = [site.current(row)]
            site.add(row, pos, self.vector(site.tensor.shape[-1])[None] * site.dose)
            site.record(row, "vector_scale", self.knobs.scale * site.dose)

    def fixes(self):
        return {"stronger": {"scale": self.knobs.scale * 8}}


@pytest.fixture(scope="module")
def sample():
    q = load_pope(shipped.pope_file("adversarial"))[25]
    return q, load_image(resolve_image(q, shipped.IMAGES))


def _hooked_margin(lm, prompt, image, iv):
    """Reference: the same vector added by a plain forward pre-hook."""
    layers = lm.adapter.decoder_layers(lm.model)
    v = iv.vector(lm.text_config.hidden_size)

    def hook(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        x[:, -1] += v.to(x.dtype)

    handles = [layers[i].register_forward_pre_hook(hook, with_kwargs=True) for i in iv.layers(lm.n_layers)]
    try:
        with torch.no_grad():
            logits = lm.model(**lm.inputs(prompt, image)).logits[0, -1]
    finally:
        for h in handles:
            h.remove()
    return float(logits[lm.tokens.yes_id] - logits[lm.tokens.no_id])


def test_trace_with_a_user_intervention_matches_a_plain_hook(embedded_model, sample):
    q, image = sample
    iv = SteeringVector(VectorKnobs(layers=(1, 2), scale=3.0))
    result = trace_sample(embedded_model, q, image, iv)
    ref = _hooked_margin(embedded_model, build_prompt(q.text), image, iv)
    floor = floors.margin_floor(embedded_model, embedded_model.tokens.yes_id, embedded_model.tokens.no_id)
    assert result.summary()["margin_after"] == pytest.approx(ref, rel=0, abs=floor)  # the Yes − No margin's floor
    assert result.summary()["margin_after"] != pytest.approx(result.summary()["margin_before"], abs=1e-3)
    r = result.records
    steered = r[r.condition == "steered"]
    # the runner's shared probes see the user's step: size, rounding, Jacobian gain along it
    for metric in ("vector_scale", "rounding_survival", "ln1_gain_theta", "propagation", "attn_image_mass"):
        assert metric in set(steered.metric), metric
    assert set(steered[steered.metric == "vector_scale"].layer) == {1, 2}


def test_explain_and_pope_with_a_user_intervention(embedded_model, sample):
    q, image = sample
    iv = SteeringVector(VectorKnobs(layers=(1, 2), scale=3.0))
    ex = explain_sample(embedded_model, q, image, iv, k_max=4, bisect_steps=2)
    assert list(ex.fixes.fix) == ["stronger", "all"]
    assert len(ex.dose.curve) >= 1
    # pope's batched path: the same answers as the per-sample trace, through the cached prefix
    questions = load_pope(shipped.pope_file("adversarial"))[20:26]
    images = [load_image(resolve_image(x, shipped.IMAGES)) for x in questions]
    prompts = [build_prompt(x.text) for x in questions]
    base, steered = answer_pair(embedded_model, prompts, images, iv, inputs=batch_inputs(embedded_model, prompts,
                                                                                         images))
    floor = floors.margin_floor(embedded_model, embedded_model.tokens.yes_id, embedded_model.tokens.no_id)
    for x, img, s in zip(questions, images, steered):  # the Yes − No margin's floor
        ref = _hooked_margin(embedded_model, build_prompt(x.text), img, iv)
        assert s["margin"] == pytest.approx(ref, rel=0, abs=floor)

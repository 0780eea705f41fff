"""A literal span that hides a real failure: ``span_mismatch`` decisive under the default preset (#32).

The tiny 112-px LLaVA (Llama text model, BOS, 64 image tokens at 5–68) and the Qwen2-text LLaVA (no BOS, image at
4–67) of tests/test_models_adapter.py, with one change each: layer 1's query weights × 1000, a sharp attention. The
decision token of "Is there a dog in the image?" (scene 3 of seed 1, which holds a dog: label yes) then puts
almost all its layer-1 attention on the prompt's text tokens, not on the image (mass < 0.01), while the default
preset's literal span [1, 577), which covers the question and the decision token itself, reads h ≈ 1. The
default τ = 0.2 lies between the two: on the literal span the barrier stays idle; on the detected span it fires
at layer 1 (the steered layer of a 2-layer model) and the answer (the sign of logit Yes − No) flips from no to
yes. So undoing the span alone changes the answer: decisive in DESIGN §9's sense, with the run that shows it.

The seeds were found by a search (not part of the suite): seeds 0–29 (Llama) and 0–86 (Qwen2), query scales
between 300 and 3000, 8 POPE objects and 2–3 embedded scenes, keeping the runs where the detected span's barrier
fired and flipped the answer (27 of some 3,800 runs; most steps move the margin too little to flip it); Llama
seed 25 and Qwen2 seed 60 at × 1000 flip this question on this image. The contrast, where the image's real mass
(~0.77) is above τ whichever span is used and the span is "present, not decisive", stays in
tests/test_diagnosis_diagnose.py (same question, image and preset; only the sharpness and the seed differ).
"""

import dataclasses
import json

import pytest
from safetensors.torch import load_file, save_file

from mclcbf_diag import barrier as B
from mclcbf_diag.embedded.build import QUESTION
from mclcbf_diag.embedded.world import sample_scene

SHARP = 1000.0  # layer 1's query weights × this: a near one-hot attention
CASES = {"llama": 25, "qwen2": 60}  # backbone → seed (see the module docstring)
Q_WEIGHT = "language_model.model.layers.1.self_attn.q_proj.weight"
TAU = B.get_preset("seed-exp6").tau_prefill  # the default preset's τ (0.2)


@pytest.fixture(scope="module", params=list(CASES))
def sharp(request, tmp_path_factory):
    """``(loaded model, its folder, the POPE question, the image)``; the question file and image are written beside
    the checkpoint for the CLI."""
    from test_models_adapter import tiny_checkpoint

    from mclcbf_diag.data import load_pope
    from mclcbf_diag.models import load_model

    folder = tmp_path_factory.mktemp(request.param)
    extra = {"use_sliding_window": False} if request.param == "qwen2" else {}
    tiny_checkpoint(request.param, folder, seed=CASES[request.param], **extra)
    weights = load_file(folder / "model.safetensors")
    weights[Q_WEIGHT] = weights[Q_WEIGHT] * SHARP
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    image = sample_scene(3, 1).image()
    assert "dog" in {o.name for o in sample_scene(3, 1).objects if o.drawn}  # the label is the scene's truth
    image.save(folder / "scene.png")
    (folder / "pope.jsonl").write_text(json.dumps({"question_id": 1, "image": "scene.png",
                                                   "text": QUESTION.format(name="dog"), "label": "yes"}) + "\n")
    question = load_pope(folder / "pope.jsonl")[0]
    return load_model(str(folder)), folder, question, image


def test_trace_warns_of_the_span_on_screen_and_on_the_page(sharp, capsys):
    from mclcbf_diag.cli import main

    lm, folder, _, _ = sharp
    assert main(["trace", "--model", str(folder), "--pope-file", str(folder / "pope.jsonl"), "--image-dir",
                 str(folder), "--sample", "0", "--out", str(folder / "t")]) == 0
    out = capsys.readouterr().out
    warned = [x for x in out.splitlines() if "warning" in x]
    assert len(warned) == 1 and warned[0].startswith("  warning: the configured image span [1, 577) covers the "
                                                     "decision token (position ")
    assert "outcome  UNCHANGED" in out  # the literal span reads h ≥ τ: the barrier stays idle
    page = (folder / "t" / "trace.html").read_text()
    assert "Warning: The configured image span [1, 577) covers the decision token" in page


def test_explain_ranks_the_span_decisive_with_the_run_that_shows_it(sharp):
    from mclcbf_diag.experiments.explain import explain_sample
    from mclcbf_diag.experiments.trace import trace_sample

    lm, _, pope, image = sharp
    # unlabelled: a random model's top token is no Yes/No spelling, so with a label neither run is a valid answer
    # (outcome "unchanged" by POPE's rules, mclcbf_diag.measurements.outcomes); without one the answer is the sign
    question, preset = pope.text, B.get_preset("seed-exp6")
    ex = explain_sample(lm, question, image, preset, k_max=2, bisect_steps=1, sweep=False)
    t = ex.trace
    # why: at the steered layer the image's real mass is below τ, the literal span's h above it
    assert t.value("attn_image_mass", "baseline", layer=1) < 0.01 < TAU < 0.7 < t.value("barrier_h", "baseline",
                                                                                          layer=1)
    s = t.summary()
    assert s["layers_fired"] == [] and s["answer_before"] == "no" and s["outcome"] == "unchanged"
    found = [c for c in ex.causes if c.detected and c.status != "observed"]
    top = found[0]
    assert top.id == "span_mismatch" and top.status == "decisive"
    assert top.run.change == "span = detected" and top.run.outcome == "changed"
    assert "outcome unchanged → changed" in top.test
    # the run is the preset with the span alone corrected: traced independently, it fires at layer 1 and answers yes
    alone = trace_sample(lm, question, image, dataclasses.replace(preset, span="detected")).summary()
    assert alone["layers_fired"] == [1] and alone["answer_after"] == "yes" and alone["outcome"] == "changed"
    assert alone["margin_after"] == pytest.approx(top.run.margin, rel=0, abs=1e-5)
    assert alone["margin_before"] < 0 < alone["margin_after"]

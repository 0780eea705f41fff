"""The graded image-mass sweep: the only evidence for "steering the decision token cannot fix it"."""

import math
from pathlib import Path

import floors
import pandas as pd
import pytest
import torch

from mclcbf_diag.data import build_prompt, load_image, load_pope, resolve_image
from mclcbf_diag.diagnosis.diagnose import diagnose
from mclcbf_diag.engine.runner import forward
from mclcbf_diag.experiments.sweep import (
    FACTORS,
    TARGETS,
    GradedKnockout,
    edits,
    image_mass_sweep,
    layer_windows,
    sweep_records,
    sweep_settings,
    sweep_summary,
    sweep_windows,
)
from mclcbf_diag.experiments.trace import sample_inputs
from mclcbf_diag.measurements.records import frame

POPE = Path(__file__).resolve().parents[1] / "mclcbf_diag" / "embedded" / "pope"
KNOWN = (20,
         69)  # wrong answers (20: label yes answered no; 69: no answered yes) a decision-token mass of 0.1–0.7 fixes
WRONG = (30, 49, 63, 94)  # other wrong answers: label yes answered no (30, 94), label no answered yes (49, 63)


def test_grid_and_windows():
    assert TARGETS == (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9) and FACTORS == (0.5, 2.0)
    assert len(edits()) == 12
    assert layer_windows(4) == [None, (0,), (1,), (2,), (3,), (0, 1), (1, 2), (2, 3)]
    deep = layer_windows(32)
    assert deep[0] is None and (0, 1, 2, 3, 4, 5, 6, 7) in deep and all(len(w) < 32 for w in deep[1:])
    # every window at the decision token; all layers at once at the text after the image
    assert sweep_windows("decision", 4) == layer_windows(4) and sweep_windows("after_image", 4) == [None]
    settings = sweep_settings(4)
    assert len(settings) == 12 * (len(layer_windows(4)) + 1)
    assert [s[:2] for s in settings[-12:]] == [("after_image", None)] * 12
    assert len(sweep_settings(4, windows=[None, (1,)])) == 2 * 2 * 12


def test_each_row_gets_its_own_image_mass(embedded_model):
    q = load_pope(POPE / "embedded_pope_adversarial.json")[0]
    image = load_image(resolve_image(q, POPE / "images"))
    _, inputs = sample_inputs(embedded_model, q.text, image)
    plain = forward(embedded_model, inputs).captures[0]
    for t in (0.0, 0.4):
        cap = forward(embedded_model, inputs, GradedKnockout([("target", t)], "decision", (1, 2))).captures[0]
        img = cap.detected
        for layer, c in cap.steps[0].layers.items():
            mass = c.attn[:, img].sum(-1)
            if layer in (1, 2):  # the edited rows' image mass, summed again: t within its floor (0 exactly at t = 0)
                assert ((mass - t).abs() <= floors.mass_floor(t)).all(), (layer, t, float((mass - t).abs().max()))
            elif layer == 0:  # before the window: the unedited forward's mass, exactly (same kernels, same input)
                assert torch.equal(mass, plain.steps[0].layers[0].attn[:, img].sum(-1))
            elif t > 0:  # after it, each head's mass follows from the edited state, not set to t
                assert not torch.allclose(mass, torch.full_like(mass, t), atol=1e-4)


def _minimal_records(sw: pd.DataFrame, label: str, question_id) -> pd.DataFrame:
    mb = float(sw.base_margin.iloc[0])
    rows = {k: [] for k in ("question_id", "condition", "phase", "decode_step", "layer", "head", "metric", "value")}
    for cond, metric, v in (("baseline", "final_margin", mb), ("steered", "final_margin", mb),
                            ("baseline", "answer_yes", float(mb > 0)), ("steered", "answer_yes", float(mb > 0)),
                            ("baseline", "label_yes", float(label == "yes"))):
        for k, x in zip(rows, (question_id, cond, "prefill", 0, -1, -1, metric, v)):
            rows[k].append(x)
    return pd.concat([frame(rows), sweep_records(sw, question_id=question_id)], ignore_index=True)


@pytest.fixture(scope="module")
def subset():
    """Six wrong answers of the adversarial split, of both labels; each sweep asserts it is wrong.

    A fixed handful, not a scan of the split: one graded sweep is 204 runs, and the claim is per question.
    """
    qs = load_pope(POPE / "embedded_pope_adversarial.json")
    return [qs[i] for i in sorted(set(WRONG) | set(KNOWN))]


def test_no_wrong_answer_gets_the_off_path_claim_while_a_decision_token_mass_fixes_it(embedded_model, subset):
    assert {q.label for q in subset} == {"yes", "no"}
    claims = 0
    for q in subset:
        image = load_image(resolve_image(q, POPE / "images"))
        sw = image_mass_sweep(embedded_model, build_prompt(q.text), image, q.label)
        assert sw.base_answer.iloc[0] != q.label  # a wrong answer
        dec = sw[sw.tokens == "decision"]
        fixes = dec[(dec.outcome == "fixed") & dec.valid]
        cause = next(c for c in diagnose(_minimal_records(sw, q.label, q.question_id)) if
                     c.id == "decision_token_off_path")
        if len(fixes):
            assert not cause.detected, (q.index, cause.sentence)
            smallest = fixes[fixes.edit == "target"].value.min()
            # the same grid values picked from the same frame: exact by construction
            assert math.isclose(sweep_summary(sw)["decision"]["min_target"], smallest) or math.isnan(smallest)
        claims += cause.detected
        assert ((sw.outcome == "fixed") <= sw.valid).all()  # a fix is always a valid Yes/No answer
        if q.index in KNOWN:
            assert len(fixes) and not cause.detected
            assert 0.1 <= fixes[fixes.edit == "target"].value.min() <= 0.7
    assert claims < len(subset)

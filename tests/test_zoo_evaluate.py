"""The shipped model meets its bars on held-out scenes, and the evaluation is exact.

The model card reports 500 held-out images; here 120 keep the suite fast while the bars
(random accuracy ≥ 85%, partner prior ≥ 3×, adversarial false-yes above random) still
hold with a wide margin.
"""

import pandas as pd
import pytest
import torch

from mclcbf_diag.zoo.evaluate import evaluate, summarise


@pytest.fixture(scope="module")
def evaluation(embedded_model):
    return evaluate(embedded_model, n_images=120)


def test_bars(evaluation):
    table, _ = evaluation
    t = table.set_index("split")
    assert t.loc["random", "accuracy"] >= 0.85
    for split in t.index:
        assert t.loc[split, "false_yes_partner"] >= 3 * max(t.loc[split, "false_yes_no_partner"], 1e-3)
    assert t.loc["adversarial", "false_yes"] > t.loc["random", "false_yes"]


def test_margins_equal_single_question_logits(evaluation, embedded_model):
    _, answers = evaluation
    from mclcbf_diag.zoo.questions import image_name
    from mclcbf_diag.zoo.world import sample_scenes

    scenes = {image_name(s): s for s in sample_scenes(120, 1)}
    lm = embedded_model
    for row in answers.sample(5, random_state=0).itertuples():
        inputs = lm.inputs(f"USER: <image>\nIs there a {row.object} in the image?\nASSISTANT:",
                           scenes[row.image].image())
        with torch.no_grad():
            logits = lm.model(**inputs).logits[0, -1]
        assert row.margin == pytest.approx(float(logits[lm.tokens.yes_id] - logits[lm.tokens.no_id]), abs=1e-4)


def test_summary_is_a_hand_count():
    answers = pd.DataFrame({
        "split": ["random"] * 6, "label": ["yes", "yes", "no", "no", "no", "no"],
        "prediction": ["yes", "no", "yes", "no", "no", "yes"],
        "partner_in_image": [False, False, True, True, False, False],
    })
    row = summarise(answers).iloc[0]
    assert row.accuracy == pytest.approx(3 / 6)
    assert row.false_yes == pytest.approx(2 / 4)
    assert row.false_yes_partner == pytest.approx(1 / 2)
    assert row.false_yes_no_partner == pytest.approx(1 / 2)

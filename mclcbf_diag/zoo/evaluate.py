"""Held-out POPE figures for the embedded model, including its co-occurrence prior.

Fresh scenes from a seed the training never saw are turned into the three POPE splits.
Each question is answered from the first answer token: "yes" when the logit of ``Yes``
exceeds that of ``No`` at the last prompt token. Besides POPE's metrics, the report splits
the negatives by whether the asked object's usual partner is annotated in the image:
the false-"yes" rate with the partner present against without it is the model's
language prior, the hallucination that steering is meant to fix.
"""

from __future__ import annotations

import pandas as pd

from ..batch import answer_batch
from ..data.scoring import pope_metrics
from ..progress import tqdm
from .build import PROMPT
from .questions import SPLITS, image_name, pope_questions
from .world import PARTNER_OF, sample_scenes

EVAL_SEED = 1


def yes_no_margins(lm, images, questions, batch_size: int = 64) -> list[float]:
    """logit(Yes) − logit(No) at the last prompt token, one per (image, question)."""
    margins: list[float] = []
    for i in tqdm(range(0, len(questions), batch_size), desc="answering", mininterval=2, leave=False):
        prompts = [PROMPT.format(question=q) for q in questions[i:i + batch_size]]
        margins += [r["margin"] for r in answer_batch(lm, prompts, images[i:i + batch_size], None, steer=False)]
    return margins


def evaluate(lm, n_images: int = 500, seed: int = EVAL_SEED) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-split metrics and per-question answers on held-out scenes."""
    scenes = sample_scenes(n_images, seed)
    by_name = {image_name(s): s for s in scenes}
    rows = []
    for split in SPLITS:
        qs = pope_questions(scenes, split, seed)
        images = [by_name[q["image"]].image() for q in qs]
        names = [q["text"].split(" a ")[1].split(" in ")[0] for q in qs]
        margins = yes_no_margins(lm, images, [q["text"] for q in qs])
        for q, name, m in zip(qs, names, margins):
            scene = by_name[q["image"]]
            rows.append({"split": split, "question_id": q["question_id"], "image": q["image"],
                         "object": name, "label": q["label"], "margin": m,
                         "prediction": "yes" if m > 0 else "no",
                         "partner_in_image": PARTNER_OF.get(name) in scene.labels})
    answers = pd.DataFrame(rows)
    return summarise(answers), answers


def summarise(answers: pd.DataFrame) -> pd.DataFrame:
    out = []
    for split, df in answers.groupby("split", sort=False):
        m = pope_metrics(df["label"].tolist(), df["prediction"].tolist())
        neg = df[df["label"] == "no"]
        with_p, without_p = neg[neg["partner_in_image"]], neg[~neg["partner_in_image"]]
        out.append({"split": split, **{k: m[k] for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")},
                    "false_yes": (neg["prediction"] == "yes").mean(),
                    "false_yes_partner": (with_p["prediction"] == "yes").mean(),
                    "false_yes_no_partner": (without_p["prediction"] == "yes").mean(),
                    "n_partner": len(with_p), "n_no_partner": len(without_p), "n": len(df)})
    return pd.DataFrame(out)

"""The embedded model's training settings, as one frozen dataclass (no torch import, so the
CLI can show the defaults instantly). :mod:`.train` documents what each stage does."""

from __future__ import annotations

from dataclasses import dataclass

EVAL_SEED = 1  # held-out scenes: the shipped POPE set and the evaluation (training uses seed 0)
N_IMAGES = 150  # images in the shipped POPE set


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    pool: int = 6000  # training scenes (features cached once each)
    vision_steps: int = 300
    vision_batch: int = 32
    vision_lr: float = 2e-3
    steps: int = 1700
    batch_size: int = 8
    lr: float = 1e-3
    warmup: int = 60
    weight_decay: float = 0.1
    min_lr_ratio: float = 0.05
    caption_weight: float = 0.5  # the caption answer's loss, next to the balanced yes/no loss
    text_loss: float = 0.3
    text_steps: int = 300  # stage L: text-only language pre-training
    text_batch: int = 32
    text_mix: int = 8  # text-only sequences mixed into every stage-1 step
    text_mix_weight: float = 0.3
    projector_lr_mult: float = 2.0
    sink_weight: float = 0.5  # weight of the attention-sink prior (0: off; see SinkPrior)
    sink_target: float = 0.8  # head-mean BOS mass asked of text queries after the image
    sink_from_layer: int = 2  # the prior acts on this layer and every later one
    sink_start: float = 0.3  # fraction of stage-1 steps before the prior turns on

"""POPE data: question files, prompts, images and the official scoring rule."""

from mclcbf_diag.data.pope import (
    PopeQuestion,
    load_image,
    load_pope,
    questions_frame,
    resolve_image,
    select_question,
)
from mclcbf_diag.data.prompts import LLAVA_PROMPT, build_prompt
from mclcbf_diag.data.scoring import metrics_frame, parse_answer, pope_metrics

__all__ = [
    "LLAVA_PROMPT",
    "PopeQuestion",
    "build_prompt",
    "load_image",
    "load_pope",
    "metrics_frame",
    "parse_answer",
    "pope_metrics",
    "questions_frame",
    "resolve_image",
    "select_question",
]

"""Prompt templates for LLaVA-style models.

A template is a string holding the literal image placeholder ``<image>`` (which the
processor expands into the image tokens) and the field ``{question}``. The question is
substituted with ``str.replace``, not ``str.format``, so braces elsewhere in the template
or in the question are left alone.
"""

from __future__ import annotations

from mclcbf_diag.errors import UserError

LLAVA_PROMPT = "USER: <image>\n{question}\nASSISTANT:"


def build_prompt(question_text: str, template: str = LLAVA_PROMPT) -> str:
    """Fill ``template`` with the question; the template must contain ``<image>`` and
    ``{question}``."""
    missing = [part for part in ("<image>", "{question}") if part not in template]
    if missing:
        raise UserError(
            f"prompt template {template!r} lacks {' and '.join(missing)}; include '<image>' "
            "where the image goes and '{question}' where the question goes, e.g. "
            f"{LLAVA_PROMPT!r}"
        )
    return template.replace("{question}", question_text)

"""Prompt templates for LLaVA-style models.

A template is a string holding the literal image placeholder ``<image>`` (which the
processor expands into the image tokens) and the field ``{question}``. The question is
substituted with ``str.replace``, not ``str.format``, so braces elsewhere in the template
or in the question are left alone.

:data:`PROMPT_CONTROLS` are wordings to set an intervention's gain against (``--prompt NAME``):
one leans toward "No", one asks the model to look carefully. Run ``pope --prompt NAME`` and
``compare`` pairs that run's *baseline* answers with the default prompt's baseline answers of
the same questions: what wording alone does, beside what the intervention does.
"""

from __future__ import annotations

from mclcbf_diag.errors import UserError

LLAVA_PROMPT = "USER: <image>\n{question}\nASSISTANT:"
PROMPT_CONTROLS = {
    "lean-no": "USER: <image>\n{question} Answer Yes only if you are sure; otherwise answer No.\nASSISTANT:",
    "look-carefully": "USER: <image>\nLook carefully at every object in the image before you answer. "
                      "{question}\nASSISTANT:",
}


def prompt_template(text: str) -> str:
    """``--prompt``: a name of :data:`PROMPT_CONTROLS`, or a template itself."""
    return PROMPT_CONTROLS.get(text, text)


def control_name(template: str) -> str | None:
    """The name of a prompt control template (None for any other template)."""
    return next((name for name, t in PROMPT_CONTROLS.items() if t == template), None)


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

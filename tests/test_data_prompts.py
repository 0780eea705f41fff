"""Prompt templates."""

import pytest

from mclcbf_diag.data import LLAVA_PROMPT, build_prompt
from mclcbf_diag.errors import UserError


def test_default_llava_prompt():
    assert build_prompt("Is there a dog in the image?") == (
        "USER: <image>\nIs there a dog in the image?\nASSISTANT:"
    )
    assert LLAVA_PROMPT == "USER: <image>\n{question}\nASSISTANT:"


def test_custom_template_and_braces_kept():
    template = "<image> {x} Q: {question} A:"
    assert build_prompt("Is {it} here?", template) == "<image> {x} Q: Is {it} here? A:"


@pytest.mark.parametrize(
    "template, missing",
    [("USER: {question}\nASSISTANT:", "<image>"),
     ("USER: <image>\nASSISTANT:", "{question}"),
     ("plain", "<image> and {question}")],
)
def test_template_missing_parts(template, missing):
    with pytest.raises(UserError) as info:
        build_prompt("Is there a dog?", template)
    assert f"lacks {missing}" in str(info.value)
    assert "\n" not in str(info.value)

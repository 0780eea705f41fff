"""The README's one-question examples are real runs: each printed block equals a fresh run's output.

Every ```text block in README.md that starts with ``$ mclcbf-diag trace|explain|flow|attribute --sample …``
is rerun in-process on the embedded model. Text must match exactly, line by line (blank lines
and the ``wrote …`` line aside); numbers must agree to 2% (or 1e-6), which absorbs a different
CPU's float rounding but not a changed model, preset or rule. When the model or a rule changes
on purpose, rerun the commands and paste their output into the README.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from mclcbf_diag.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"
NUMBER = re.compile(r"[-+−]?\d+(?:\.\d+)?(?:e[-+]?\d+)?")


def _examples() -> list[tuple[str, list[str]]]:
    blocks = re.findall(r"```text\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    found = []
    for block in blocks:
        lines = block.splitlines()
        if re.match(r"\$ mclcbf-diag (trace|explain|flow|attribute) .*--sample \d+", lines[0]):
            found.append((lines[0][2:], lines[1:]))
    return found


def _shape(line: str) -> tuple[str, list[float]]:
    numbers = [float(x.replace("−", "-")) for x in NUMBER.findall(line)]
    return NUMBER.sub("#", line.rstrip()), numbers


def _printed(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip() and not line.startswith("wrote ")]


EXAMPLES = _examples()


def test_the_readme_has_the_examples_it_promises():
    commands = [c for c, _ in EXAMPLES]
    assert "mclcbf-diag trace --sample 42" in commands
    assert any(c.startswith("mclcbf-diag explain --sample") for c in commands)
    assert any(c.startswith("mclcbf-diag flow --sample") for c in commands)
    assert any(c.startswith("mclcbf-diag attribute --sample") for c in commands)


@pytest.mark.parametrize("command, shown", EXAMPLES, ids=[c for c, _ in EXAMPLES])
def test_readme_example_equals_a_fresh_run(command, shown, tmp_path, capsys, embedded_model):
    argv = shlex.split(command)[1:] + ["--out", str(tmp_path / "out")]
    assert main(argv) == 0
    got, want = _printed(capsys.readouterr().out), _printed("\n".join(shown))
    assert len(got) == len(want), "\n".join(got)
    for g, w in zip(got, want):
        (g_text, g_num), (w_text, w_num) = _shape(g), _shape(w)
        assert g_text == w_text, f"README: {w}\nrun:    {g}"
        for a, b in zip(g_num, w_num):
            assert a == pytest.approx(b, rel=2e-2, abs=1e-6), f"README: {w}\nrun:    {g}"

"""The one-question examples of the README and the documentation site are real runs: each printed block equals a
fresh run's output.

Every ```text block in README.md and docs/**/*.md that starts with
``$ mclcbf-diag trace|explain|flow|attribute … --sample …`` is rerun in-process on the embedded model, once per
distinct command however many pages show it (the README's trace and explain examples are also on their command's
page), and every block showing it is compared with that one run. Text must match exactly, line by line (blank
lines and the ``wrote …`` line aside); numbers must agree to 2% (or 1e-6), which absorbs a different CPU's float
rounding but not a changed model, preset or rule. When the model or a rule changes on purpose, rerun the commands
and paste their output into every page that shows them.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from mclcbf_diag.cli import main

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
NUMBER = re.compile(r"[-+−]?\d+(?:\.\d+)?(?:e[-+]?\d+)?")
COMMAND = re.compile(r"\$ mclcbf-diag (trace|explain|flow|attribute) .*--sample \d+")


def _examples() -> dict[str, list[tuple[str, list[str]]]]:
    """command → [(where it is shown, the lines printed under it)], over the README and every docs page."""
    found: dict[str, list[tuple[str, list[str]]]] = {}
    for path in SOURCES:
        for block in re.findall(r"```text\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.S):
            lines = block.splitlines()
            if lines and COMMAND.match(lines[0]):
                found.setdefault(lines[0][2:], []).append((str(path.relative_to(ROOT)), lines[1:]))
    return found


def _shape(line: str) -> tuple[str, list[float]]:
    numbers = [float(x.replace("−", "-")) for x in NUMBER.findall(line)]
    return NUMBER.sub("#", line.rstrip()), numbers


def _printed(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip() and not line.startswith("wrote ")]


EXAMPLES = _examples()


def test_the_readme_and_the_site_have_the_examples_they_promise():
    shown = {cmd: {where for where, _ in blocks} for cmd, blocks in EXAMPLES.items()}
    # the README's two: one trace, one explain, each also on its command's page
    assert "README.md" in shown["mclcbf-diag trace --sample 42"]
    assert "docs/commands/trace.md" in shown["mclcbf-diag trace --sample 42"]
    readme_explain = [c for c, w in shown.items() if c.startswith("mclcbf-diag explain --sample") and "README.md" in w]
    assert readme_explain and "docs/commands/explain.md" in shown[readme_explain[0]]
    assert {c.split()[1] for c, w in shown.items() if "README.md" in w} == {"trace", "explain"}
    for command in ("flow", "attribute"):
        assert any(c.startswith(f"mclcbf-diag {command} --sample") and f"docs/commands/{command}.md" in w
                   for c, w in shown.items()), command


@pytest.mark.parametrize("command", list(EXAMPLES))
def test_example_equals_a_fresh_run(command, tmp_path, capsys, embedded_model):
    argv = shlex.split(command)[1:] + ["--out", str(tmp_path / "out")]
    assert main(argv) == 0
    got = _printed(capsys.readouterr().out)
    for where, shown in EXAMPLES[command]:
        want = _printed("\n".join(shown))
        assert len(got) == len(want), f"{where}:\n" + "\n".join(got)
        for g, w in zip(got, want):
            (g_text, g_num), (w_text, w_num) = _shape(g), _shape(w)
            assert g_text == w_text, f"{where}: {w}\nrun: {g}"
            for a, b in zip(g_num, w_num):
                assert a == pytest.approx(b, rel=2e-2, abs=1e-6), f"{where}: {w}\nrun: {g}"

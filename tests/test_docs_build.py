"""The documentation site builds with ``mkdocs build --strict``, offline, and the strict build fails on a broken link,
a missing anchor or a missing cross-reference.

Needs the ``docs`` extra (``pip install -e ".[docs]"``: mkdocs, mkdocs-material, mkdocstrings[python]); without it
the tests are skipped, saying so. CI installs the extra after the main test run and builds the site in ``.ci/run``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SKIP = "the docs extra is not installed (pip install -e \".[docs]\"): mkdocs, mkdocs-material and mkdocstrings"
for _name in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
    pytest.importorskip(_name, reason=SKIP)

BUILD_TIMEOUT_S = 300

# an intervention registered in the building process, as a user's plugin would: its page must appear
BUILD = '''
import sys
from dataclasses import dataclass

from mclcbf_diag import interventions
from mclcbf_diag.interventions import Intervention
from mclcbf_diag.knobs import knob


@dataclass(frozen=True)
class EchoKnobs:
    gain: float = knob(2.5, "how loud the echo is")


class Echo(Intervention):
    """Repeat the decision token's residual, louder."""

    name = "echo-site"
    Knobs = EchoKnobs
    presets = {"soft": EchoKnobs(), "loud": EchoKnobs(gain=9.0)}
    paper = "Nobody et al., a test, 2026"


if sys.argv[3] == "register":
    interventions.register(Echo)
from mkdocs.__main__ import cli

cli(["build", "--strict", "-f", sys.argv[1], "-d", sys.argv[2]])
'''


def _build(tmp_path: Path, config: Path, register: bool) -> tuple[subprocess.CompletedProcess, Path]:
    script, site = tmp_path / "build.py", tmp_path / "site"
    script.write_text(BUILD, encoding="utf-8")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, str(script), str(config), str(site), "register" if register else "-"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    return done, site


def test_the_site_builds_strictly_offline_with_a_registered_interventions_page(tmp_path):
    done, site = _build(tmp_path, ROOT / "mkdocs.yml", register=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert not (ROOT / "site").exists(), "the build must not write into the repository"

    page = (site / "interventions" / "echo-site" / "index.html").read_text(encoding="utf-8")
    assert "Nobody et al., a test, 2026" in page and "how loud the echo is" in page and "gain=9.0" in page
    assert 'href="../echo-site/"' in (site / "interventions" / "pai" / "index.html").read_text(encoding="utf-8")
    from mclcbf_diag.interventions.catalog import SPECS

    for name in SPECS:
        assert (site / "interventions" / name / "index.html").is_file(), name
    api = (site / "api" / "mclcbf_diag.knobs" / "index.html").read_text(encoding="utf-8")
    assert "apply_overrides" in api and ":func:`" not in api  # docstrings rendered, Sphinx roles as code
    assert (site / "examples" / "trace-43-first-screen.png").is_file()
    rules = (site / "reference" / "rules" / "index.html").read_text(encoding="utf-8")
    assert "clamp_limited" in rules and "decision_token_off_path" in rules
    # nothing the pages load comes from the network (no web fonts, no external scripts or styles)
    external = re.compile(r"<(?:script|link|img)\b[^>]*(?:src|href)=\"(?:https?:)?//", re.I)
    for html in site.rglob("*.html"):
        assert not external.search(html.read_text(encoding="utf-8")), f"{html.relative_to(site)} loads from the web"


def test_the_strict_build_fails_on_a_broken_link_a_missing_anchor_or_reference(tmp_path):
    """The real configuration on a copy of the pages with three mistakes added: each is reported, and the build
    fails."""
    docs = tmp_path / "docs"
    shutil.copytree(ROOT / "docs", docs)
    concepts = docs / "concepts.md"
    concepts.write_text(concepts.read_text(encoding="utf-8") + "\n\nSee [a page](no-such-page.md), [an anchor]"
                        "(quickstart.md#no-such-anchor) and [an object][mclcbf_diag.no_such_object].\n",
                        encoding="utf-8")
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    python = config["plugins"][2]["mkdocstrings"]["handlers"]["python"]
    python["paths"] = [str(ROOT)]
    python["options"]["extensions"] = [str(ROOT / e) for e in python["options"]["extensions"]]
    config.update(docs_dir=str(docs), hooks=[str(ROOT / h) for h in config["hooks"]])
    path = tmp_path / "mkdocs.yml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True, sort_keys=False), encoding="utf-8")
    done, site = _build(tmp_path, path, register=False)
    out = done.stdout + done.stderr
    assert done.returncode != 0, out[-4000:]
    assert "no-such-page.md" in out and "no-such-anchor" in out and "mclcbf_diag.no_such_object" in out, out[-4000:]

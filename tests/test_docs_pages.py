"""The documentation site's generated pages, read through the same functions the site's build calls (docs/hooks.py),
without mkdocs: every registered intervention has its page (one registered here included, with no docs edit), the
records glossary holds every metric, the rule table every rule, the model families page every family, every
command its page, and the README keeps what a newcomer needs first."""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from mclcbf_diag import interventions
from mclcbf_diag.cli import build_parser
from mclcbf_diag.interventions import Intervention
from mclcbf_diag.interventions.catalog import SPECS
from mclcbf_diag.knobs import knob
from mclcbf_diag.measurements import records

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _hooks():
    spec = importlib.util.spec_from_file_location("mclcbf_docs_hooks", DOCS / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hooks = _hooks()


@pytest.fixture(scope="module")
def pages():
    return hooks.generated_pages()


def _nav_paths(nav) -> list[str]:
    out = []
    for item in nav:
        value = item if isinstance(item, str) else next(iter(item.values()))
        out += _nav_paths(value) if isinstance(value, list) else [value]
    return out


# ----------------------------------------------------------------------------- interventions
def test_every_registered_intervention_has_a_generated_page(pages):
    names = list(interventions.specs())
    assert sorted(SPECS) == sorted(names)
    got = {p for p in pages if p.startswith("interventions/")}
    assert got == {f"interventions/{hooks.slug(n)}.md" for n in names}
    pai = pages["interventions/pai.md"]
    assert hooks.cell(SPECS["pai"].paper) in pai and hooks.cell(SPECS["pai"].summary) in pai
    assert "| `alpha` | `float` | `0.2` | image-key logit amplification" in pai
    assert "[`mclcbf_diag.interventions.pai`][mclcbf_diag.interventions.pai]" in pai  # the API page it links
    mclcbf = pages["interventions/mclcbf.md"]
    assert "| `fixed` | `grad_dtype=float32`, `clamp=step_norm`, `span=detected`, `site=attn_logits` |" in mclcbf
    assert "| `original` | an alias of `seed-exp6` |" in mclcbf
    assert "`--set tau=V` sets `tau_prefill`, `tau_decode`" in mclcbf
    assert "| `clamp` | `clamp=none` |" in mclcbf  # its counterfactual fixes
    assert "`clamp_limited`<br>Clamp limited the step" in mclcbf  # its own rules
    assert "## The knobs in detail" in mclcbf  # the hand-written notes, appended


@dataclass(frozen=True)
class EchoKnobs:
    gain: float = knob(2.5, "how loud the echo is")
    plain: int = 3


class Echo(Intervention):
    """Repeat the decision token's residual, louder."""

    name = "echo-docs"
    Knobs = EchoKnobs
    presets = {"soft": EchoKnobs(), "loud": EchoKnobs(gain=9.0)}
    paper = "Nobody et al., a test, 2026"
    metrics = {"echo_gain": "Echo: the gain applied at the decision token"}

    def fixes(self):
        return {"quiet": {"gain": 0.0}}


def test_a_registered_intervention_gets_its_page_and_its_rows_without_any_docs_edit(monkeypatch):
    interventions.registry()  # the built-ins first, as the site's build sees them
    monkeypatch.setitem(interventions._REGISTRY, "echo-docs", Echo)
    pages = hooks.intervention_pages()
    page = pages["interventions/echo-docs.md"]
    assert page.startswith("# `echo-docs`\n\nRepeat the decision token's residual, louder.\n")
    assert "**Paper**: Nobody et al., a test, 2026" in page
    assert "| `soft` | the default: every knob at the default below |" in page
    assert "| `loud` | `gain=9.0` |" in page
    assert "| `gain` | `float` | `2.5` | how loud the echo is |" in page
    assert "| `plain` | `int` | `3` | – |" in page
    assert "| `echo_gain` | Echo: the gain applied at the decision token |" in page
    assert "| `quiet` | `gain=0.0` |" in page
    assert "**Code**" not in page  # defined outside the package: no API page to link
    assert "[`echo-docs`](echo-docs.md)" in hooks.expand("<!-- generated: interventions-table -->")
    assert "| `echo_gain` |" in hooks.expand("<!-- generated: glossary-interventions -->")
    assert "echo-docs: Repeat the decision token's residual, louder." in hooks.expand(
        "<!-- generated: interventions-listing -->")
    # and the navigation lists it after the index, as the site's build inserts it
    nav = [{"Interventions": ["interventions/index.md", {"Writing your own": "interventions/writing-your-own.md"}]}]
    assert hooks._insert_after(nav, "interventions/index.md", hooks.nav_titles(pages, "interventions"))
    assert {"echo-docs": "interventions/echo-docs.md"} in nav[0]["Interventions"]


def test_the_hand_written_table_of_published_interventions_names_exactly_the_builtins():
    text = (DOCS / "interventions" / "index.md").read_text(encoding="utf-8")
    section = text[text.index("## The published interventions"):]
    rows = [line.split("|")[1].strip().strip("`") for line in section.splitlines() if line.startswith("| `")]
    assert sorted(rows) == sorted(SPECS) and len(rows) == len(SPECS)


# ----------------------------------------------------------------------------- generated reference
def test_the_glossary_holds_every_shared_metric_and_every_interventions_own():
    shared = hooks.expand("<!-- generated: glossary-shared -->")
    for metric, meaning in records.METRICS.items():
        assert f"| {hooks.code(metric)} | {hooks.cell(meaning)} |" in shared, metric
    own = hooks.expand("<!-- generated: glossary-interventions -->")
    for name, cls in interventions.registry().items():
        for metric in cls.metrics:
            assert f"| {hooks.code(metric)} |" in own, (name, metric)


def test_the_rule_table_lists_every_rule_with_its_threshold_and_test():
    from mclcbf_diag.diagnosis.diagnose import GENERIC_RULES, rules_for

    text = hooks.expand("<!-- generated: rules -->")
    for name, cls in interventions.registry().items():
        for rule in rules_for(cls())[0]:
            assert f"`{rule.id}`<br>{hooks.cell(rule.title)} | {hooks.cell(rule.threshold)} |" in text, rule.id
    assert {r.id for r in GENERIC_RULES} <= set(re.findall(r"`(\w+)`<br>", text))
    assert "| clamp = none (decisive if it changes the step size, image mass, margin or outcome) |" in text
    assert "untestable here: restoring what the layers after the step removed" in text
    from mclcbf_diag.diagnosis.rulebook import DECISIVE_RULE

    assert DECISIVE_RULE in hooks.expand("<!-- generated: decisive -->")


def test_the_families_page_shows_every_family():
    from mclcbf_diag.models.families import FAMILIES

    text = hooks.expand("<!-- generated: families -->")
    for family in FAMILIES:
        assert f"## `{family.name}`: {family.architecture}" in text
        assert hooks.cell(family.layout) in text and all(hooks.cell(c) in text for c in family.checked)


def test_every_command_has_a_page_with_its_generated_help():
    commands = hooks.subcommands(build_parser())
    names = {name for name, parser in commands.items() if parser.prog.split()[-1] == name}  # no aliases (zoo)
    for name in names:
        page = (DOCS / "commands" / f"{name}.md").read_text(encoding="utf-8")
        assert f"<!-- generated: help {name} -->" in page, name
    text = hooks.expand("<!-- generated: help trace -->")
    assert text.startswith("```text\n$ mclcbf-diag trace --help\nusage: mclcbf-diag trace")
    assert "--intervention" in text and "pai" in text


def test_every_marker_in_the_pages_is_known_and_every_page_is_in_the_navigation(pages):
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    nav = _nav_paths(config["nav"])
    notes = DOCS / "interventions" / "notes"
    for path in sorted(DOCS.rglob("*.md")):
        rel = path.relative_to(DOCS).as_posix()
        if path.is_relative_to(notes):
            assert path.stem in interventions.specs(), f"{rel}: notes for no registered intervention"
            continue
        assert rel in nav, f"docs/{rel} is not in mkdocs.yml's nav"
        assert rel not in pages, f"docs/{rel} is generated by docs/hooks.py; remove the hand-written file"
        hooks.expand(path.read_text(encoding="utf-8"), where=rel)  # an unknown marker raises
    assert [p for p in nav if p not in pages and not (DOCS / p).is_file()] == []


def test_the_api_reference_documents_the_packages_modules_but_no_alias_of_a_moved_one(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text('"""A package."""\n')
    (pkg / "sub" / "__init__.py").write_text('"""A subpackage."""\n')
    (pkg / "real.py").write_text('"""A module."""\n')
    (pkg / "_private.py").write_text('"""Private."""\n')
    (pkg / "old.py").write_text('"""Moved."""\nimport sys\nfrom .sub import real as _m\nsys.modules[__name__] = _m\n')
    assert hooks.api_modules(pkg) == ["pkg.real", "pkg.sub"]
    assert hooks.api_page("pkg.real") == "# `pkg.real`\n\n::: pkg.real\n"
    real = hooks.api_modules(ROOT / "mclcbf_diag")
    assert {"mclcbf_diag.interventions", "mclcbf_diag.knobs", "mclcbf_diag.models"} <= set(real)


# ----------------------------------------------------------------------------- the README
def test_the_readme_keeps_what_a_newcomer_needs_first():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert '```bash\npip install "torch==2.13.0" -e ".[test]" && mclcbf-diag trace --sample 42\n```' in readme
    assert "```bash\npython -m pytest -q -n auto --dist loadfile\n```" in readme  # what .ci/run runs
    assert 'pip install -e ".[docs]"' in readme and "mkdocs serve" in readme
    assert "## What it finds on the embedded model" in readme and "676 questions: the model answers 619" in readme
    assert len(readme.splitlines()) < 200
    for target in re.findall(r"\]\((docs/[^)#]+|CONTRIBUTING\.md)[^)]*\)", readme):
        assert (ROOT / target).is_file(), target

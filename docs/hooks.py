"""MkDocs hooks (``hooks:`` in mkdocs.yml): the pages of the site that are generated from the code.

What the code already holds as data is never written by hand, so it cannot drift:

* ``interventions/<name>.md``: one page per registered intervention
  (:func:`mclcbf_diag.interventions.registry`, built-in and :func:`~mclcbf_diag.interventions.register`-ed
  alike): summary, paper, presets, knobs, the records it adds, its counterfactual fixes and its own rules.
  Hand-written notes for one intervention, if any, are appended from ``docs/interventions/notes/<name>.md``.
* ``api/<module>.md``: one API page per top-level module or subpackage of ``mclcbf_diag`` that exists in
  this checkout (mkdocstrings renders its docstrings; a module kept only as an alias of a moved one is skipped).
* ``contributing.md`` from ``CONTRIBUTING.md``, and ``examples/*.png`` from ``reports/examples/``.
* In hand-written pages, a line ``<!-- generated: NAME -->`` is replaced by the table ``NAME`` of
  :data:`MARKERS` (the records glossary, the rule table, the model families, a command's ``--help``, …).

The page builders (``*_page``, ``*_table``, :func:`expand`) are pure: data in, Markdown out. They and
:func:`generated_pages` import without mkdocs, so tests read the pages exactly as the site shows them
(``tests/test_docs_pages.py``). Only the ``on_*`` event functions touch mkdocs.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PACKAGE = "mclcbf_diag"
NOTES = DOCS / "interventions" / "notes"  # hand-written notes per intervention (excluded from the site as pages)
EXAMPLES = ROOT / "reports" / "examples"  # the screenshots the README and the site show
MARKER = re.compile(r"^<!-- generated: ([a-z0-9_-]+(?: [a-z0-9_-]+)?) -->$", re.M)
HELP_COLUMNS = "100"  # argparse wraps --help to the terminal; the site shows it at this width

# the site documents this checkout, whatever else is installed
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


# =========================================================================== Markdown helpers
CODE_SPAN = re.compile(r"(`+)(.+?)\1")


def cell(text) -> str:
    """Plain ``text`` as one Markdown table cell, on one line: pipes, ``*``, ``_`` and ``<`` escaped outside its
    code spans, so that ``atp_* and patch_*`` or ``final_logit:<token>`` show as written."""
    text = " ".join(str(text).split())
    parts, last = [], 0
    for m in CODE_SPAN.finditer(text):
        parts += [_escape(text[last:m.start()]), m.group(0)]
        last = m.end()
    return "".join(parts + [_escape(text[last:])])


def _escape(text: str) -> str:
    for char, escaped in (("\\", "\\\\"), ("|", "\\|"), ("*", "\\*"), ("_", "\\_"), ("<", "&lt;")):
        text = text.replace(char, escaped)
    return text


def code(text) -> str:
    """``text`` as an inline code span inside a table cell (backticks inside it widen the fence; a pipe inside a
    code span needs no escape: Python-Markdown's tables do not split code spans)."""
    text = " ".join(str(text).split())
    if not text:
        return ""
    fence = "``" if "`" in text else "`"
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def table(head: list[str], rows: list[list[str]]) -> str:
    """A Markdown table; the cells are written as given (use :func:`cell` / :func:`code`)."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def slug(name: str) -> str:
    """A file name for an intervention name (letters, digits, ``-`` and ``_`` kept)."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-") or "intervention"


def summary(doc: str | None) -> str:
    """The first paragraph of a docstring, on one line, its Sphinx roles as code spans ("" without one)."""
    return roles_to_code(inspect.cleandoc(doc).split("\n\n")[0].replace("\n", " ").strip()) if doc else ""


ROLE = re.compile(r":(?:py:)?(?:func|class|mod|data|meth|attr|exc|obj|const|ref):`([^`]+)`")  # as griffe_roles.py


def roles_to_code(text: str) -> str:
    """Sphinx roles (``:class:`~a.b.C```) as Markdown code spans (`` `C` ``), as the API pages show them."""
    def one(m):
        target = re.sub(r"^.*<(.+)>$", r"\1", m.group(1))
        return f"`{target.rsplit('.', 1)[-1] if target.startswith('~') else target}`"

    return ROLE.sub(one, text)


# =========================================================================== interventions
def preset_rows(spec) -> list[tuple[str, str]]:
    """``(preset, what it sets)`` for every preset of ``spec``, as ``mclcbf-diag interventions`` words them
    (the first is the default; an alias says which preset it equals; the others list the knobs they change)."""
    from mclcbf_diag.interventions.catalog import preset_changes
    from mclcbf_diag.knobs import show_value

    rows = []
    for n, (name, same, changes) in enumerate(preset_changes(spec)):
        text = ("the default: every knob at the default below" if n == 0 else f"an alias of `{same}`" if same else
                ", ".join(code(f"{k}={show_value(v)}") for k, v in changes) or "the knob defaults")
        rows.append((name, text))
    return rows


def intervention_page(spec, *, metrics: dict | None = None, fixes: dict | None = None, rules=(),
                      module: str | None = None, notes: str = "") -> str:
    """The page of one intervention: what it edits, its paper, presets, knobs, records, fixes and rules.

    ``spec`` is its :class:`~mclcbf_diag.interventions.catalog.Spec` (``interventions.specs()[name]``);
    ``metrics`` its records' glossary (``cls.metrics``), ``fixes`` its counterfactual fixes
    (``cls().fixes()``), ``rules`` its own diagnosis rules (``cls().rules()``), ``module`` the module that
    defines it when the API reference documents that module, ``notes`` hand-written Markdown appended last.
    """
    from mclcbf_diag.knobs import knob_rows, show_value

    out = [f"# `{spec.name}`", "", cell(spec.summary) or "No summary.", ""]
    facts = [f"**Paper**: {cell(spec.paper)}" if spec.paper else "**Paper**: none (a probe of the toolkit)",
             f"**Use**: `--intervention {spec.name}` on `trace`, `explain`, `pope` and `attribute`; "
             f"`mclcbf-diag interventions --intervention {spec.name}` prints this page's presets and knobs."]
    if module:
        facts.append(f"**Code**: [`{module}`][{module}]")
    out += ["\n".join(f"* {f}" for f in facts), ""]

    out += ["## Presets", "", "`--preset P`; the first is the default.", ""]
    out += [table(["preset", "sets"], [[code(n), t] for n, t in preset_rows(spec)]), ""]

    first = next(iter(spec.presets.values()))
    rows = knob_rows(first)
    out += ["## Knobs", ""]
    if rows:
        out += ["`--set KNOB=VALUE`, repeatable; the default is the first preset's value.", ""]
        out += [table(["knob", "type", "default", "what it does"],
                      [[code(n), code(t), code(d), cell(h) or "–"] for n, t, d, h in rows]), ""]
        if spec.aliases:
            out += ["Short names: " + "; ".join(f"`--set {a}=V` sets {', '.join(f'`{t}`' for t in targets)}"
                                                for a, targets in spec.aliases.items()) + ".", ""]
    else:
        out += ["None.", ""]

    out += ["## Records it adds", ""]
    if metrics:
        out += ["Beside the records every intervention shares ([records glossary](../reference/records.md)):", ""]
        out += [table(["metric", "meaning"], [[code(k), cell(v)] for k, v in metrics.items()]), ""]
    else:
        out += ["Only the records every intervention shares ([records glossary](../reference/records.md)).", ""]

    out += ["## Counterfactual fixes", ""]
    if fixes:
        out += ["`explain` reruns the question with each fix alone (and all together) and reports what it changes.",
                ""]
        out += [table(["fix", "knobs it sets"], [[code(n), ", ".join(code(f"{k}={show_value(v)}")
                                                                     for k, v in knobs.items())]
                                                 for n, knobs in fixes.items()]), ""]
    else:
        out += ["None of its own: `explain` tests it with the generic experiments (knockouts, the graded sweep, "
                "the dose-response).", ""]

    out += ["## Diagnosis rules of its own", ""]
    if rules:
        out += ["Besides the generic rules; the whole table in causal order is in the "
                "[rule table](../reference/rules.md).", "", rules_table(rules), ""]
    else:
        out += ["None: `explain` diagnoses it with the generic rules ([rule table](../reference/rules.md)).", ""]

    if notes.strip():
        out += [notes.strip(), ""]
    return "\n".join(out)


def interventions_table(specs: dict) -> str:
    """Every registered intervention: its page, what it edits, its paper and its presets."""
    rows = [[f"[`{name}`]({slug(name)}.md)", cell(spec.summary), cell(spec.paper) or "(probe)",
             ", ".join(code(p) for p in spec.presets)] for name, spec in specs.items()]
    return table(["name", "what it edits", "paper", "presets (first: default)"], rows)


# =========================================================================== records
def glossary_table(metrics: dict) -> str:
    """A metric → meaning table (``{norm}``, ``{layer}``, ``{kind}`` are placeholders in a name)."""
    return table(["metric", "meaning"], [[code(k), cell(v)] for k, v in metrics.items()])


def intervention_glossaries(per: dict) -> str:
    """One section per intervention that adds records: ``per`` is name → its ``metrics``."""
    out = []
    for name, metrics in per.items():
        if metrics:
            out += [f"### `{name}`", "", f"[The `{name}` page](../interventions/{slug(name)}.md).", "",
                    glossary_table(metrics), ""]
    none = [f"[`{n}`](../interventions/{slug(n)}.md)" for n, m in per.items() if not m]
    if none:
        out += [f"Adding only the shared records: {', '.join(none)}.", ""]
    return "\n".join(out)


# =========================================================================== rules
JUDGED = {"step_size": "step size, image mass, margin or outcome", "answer": "margin or outcome"}


def counterfactual_text(rule) -> str:
    """What undoing ``rule``'s cause means, in words, from the rule itself, and what decides it.

    A counterfactual that needs no evidence (a knob change, a dtype, an untestable reason) is asked with none
    and its own ``why`` is shown; one computed from the question's records says what it does in its docstring.
    """
    cf = rule.counterfactual
    if cf is None:
        return "none of its own: read off the run, or off the experiment its threshold names"
    try:
        spec = cf(None, None)
    except (AttributeError, TypeError, KeyError):  # it reads the question's evidence: its docstring says how
        text = summary(cf.__doc__) or "computed from the question's records"
    else:
        if not spec:
            return "none"
        if spec.untestable:
            return "untestable here: " + cell(spec.untestable)
        text = spec.why or "a counterfactual run"
    return f"{cell(text)} (decisive if it changes the {JUDGED.get(rule.judged_on, rule.judged_on)})"


def rules_table(rules) -> str:
    """Rules in causal order: their place, id and title, threshold and test."""
    rows = [[f"{r.rank:g}", f"`{r.id}`<br>{cell(r.title)}", cell(r.threshold), counterfactual_text(r)]
            for r in sorted(rules, key=lambda r: r.rank)]
    return table(["order", "cause", "detected when", "its test: undo the cause alone"], rows)


def rules_sections(generic, per: dict) -> str:
    """The generic rules, then each intervention's whole table (generic and its own, in causal order)."""
    out = ["## Generic rules", "", "Every intervention is diagnosed with these; they read only what the runner "
           "records for any intervention.", "", rules_table(generic), ""]
    for name, (table_rules, own) in per.items():
        if not own:
            continue
        where = sorted({r.check.__module__ for r in own})
        out += [f"## `{name}`", "", f"Its own rules ({', '.join(f'`{w}`' for w in where)}) among the generic ones, "
                "in the causal order `explain` ranks by:", "", rules_table(table_rules), ""]
    plain = [f"[`{n}`](../interventions/{slug(n)}.md)" for n, (_, own) in per.items() if not own]
    if plain:
        out += [f"Diagnosed with the generic rules only: {', '.join(plain)}.", ""]
    return "\n".join(out)


# =========================================================================== model families
FAMILY_LABELS = {"name": "adapter", "architecture": "architecture (config.json `architectures`)",
                 "model_type": "config.json `model_type`", "layout": "layout", "checked": "run on",
                 "covers": "also covers", "not_covered": "not covered"}


def families_page(families) -> str:
    """One section per supported family, every field of its :class:`~mclcbf_diag.models.families.Family`."""
    out = []
    for fam in families:
        out += [f"## `{fam.name}`: {fam.architecture}", ""]
        rows = []
        for f in dataclasses.fields(fam):
            value = getattr(fam, f.name)
            if value in ("", (), None):
                continue
            if isinstance(value, (tuple, list)):
                value = "<br>".join(cell(v) for v in value)
            else:
                value = cell(value)
            rows.append([FAMILY_LABELS.get(f.name, f.name.replace("_", " ")), value])
        out += [table(["", ""], rows), ""]
    return "\n".join(out)


# =========================================================================== the command line
def subcommands(parser: argparse.ArgumentParser) -> dict:
    """``mclcbf-diag``'s sub-command parsers by name (aliases included)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def help_block(command: str, text: str) -> str:
    """A command's ``--help`` as the page shows it."""
    return f"```text\n$ mclcbf-diag {command} --help\n{text.rstrip()}\n```"


def listing_block(command: str, lines: list[str]) -> str:
    return f"```text\n$ mclcbf-diag {command}\n" + "\n".join(lines).rstrip() + "\n```"


# =========================================================================== API reference
def api_modules(package_dir: Path) -> list[str]:
    """The top-level modules and subpackages of the package at ``package_dir`` that the API reference documents:
    public names only, and no module that only aliases a moved one (``sys.modules[__name__] = …``)."""
    names = []
    for path in sorted(package_dir.iterdir()):
        if path.name.startswith("_"):
            continue
        if path.is_dir() and (path / "__init__.py").is_file():
            source = (path / "__init__.py").read_text(encoding="utf-8")
        elif path.suffix == ".py":
            source = path.read_text(encoding="utf-8")
        else:
            continue
        if "sys.modules[__name__]" in source:
            continue
        names.append(f"{package_dir.name}.{path.stem if path.suffix == '.py' else path.name}")
    return names


def api_page(module: str) -> str:
    return f"# `{module}`\n\n::: {module}\n"


# =========================================================================== what the live code says
def registry_data() -> dict:
    """name → (spec, class) for every registered intervention, as ``--intervention`` sees them."""
    from mclcbf_diag import interventions

    reg, specs = interventions.registry(), interventions.specs()
    return {name: (specs[name], reg[name]) for name in specs}


def intervention_pages(notes_dir: Path = NOTES, documented: set | None = None) -> dict[str, str]:
    """``interventions/<name>.md`` for every registered intervention, from the registry itself."""
    documented = set(api_modules(ROOT / PACKAGE)) if documented is None else documented
    pages = {}
    for name, (spec, cls) in registry_data().items():
        iv = cls()
        module = cls.__module__ if any(cls.__module__ == m or cls.__module__.startswith(m + ".")
                                       for m in documented) else None
        note = notes_dir / f"{slug(name)}.md"
        pages[f"interventions/{slug(name)}.md"] = intervention_page(
            spec, metrics=dict(cls.metrics), fixes=iv.fixes(), rules=iv.rules(), module=module,
            notes=note.read_text(encoding="utf-8") if note.is_file() else "")
    return pages


def _rules_by_intervention():
    from mclcbf_diag.diagnosis import diagnose
    per = {}
    for name, (_, cls) in registry_data().items():
        iv = cls()
        per[name] = (diagnose.rules_for(iv)[0], list(iv.rules()))
    return diagnose.GENERIC_RULES, per


def _help(command: str) -> str:
    from mclcbf_diag.cli import build_parser

    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = HELP_COLUMNS
    try:
        parser = build_parser()
        return help_block(command, subcommands(parser)[command].format_help())
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old


def _interventions_listing() -> str:
    from mclcbf_diag.cli.interventions import describe
    from mclcbf_diag.interventions import specs

    table_ = specs()
    lines = [f"{len(table_)} interventions (--intervention NAME, --preset P, --set KNOB=VALUE on trace, explain, "
             "pope and attribute; `--intervention NAME --help-knobs` shows one):"]
    for spec in table_.values():
        lines += ["", *describe(spec)]
    return listing_block("interventions", lines)


def _models_listing() -> str:
    import io
    from contextlib import redirect_stdout

    from mclcbf_diag.cli import main

    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["models"]) == 0
    return listing_block("models", buf.getvalue().splitlines())


def _decisive() -> str:
    from mclcbf_diag.diagnosis import rulebook
    return f"A cause is **decisive** when {rulebook.DECISIVE_RULE}."


def _glossary_shared() -> str:
    from mclcbf_diag.measurements import records
    return glossary_table(records.METRICS)


def _glossary_interventions() -> str:
    return intervention_glossaries({name: dict(cls.metrics) for name, (_, cls) in registry_data().items()})


def _rules() -> str:
    generic, per = _rules_by_intervention()
    return rules_sections(generic, per)


def _families() -> str:
    from mclcbf_diag.models.families import FAMILIES

    return families_page(FAMILIES)


def _interventions_table() -> str:
    from mclcbf_diag.interventions import specs

    return interventions_table(specs())


MARKERS = {  # <!-- generated: NAME --> in a hand-written page → this function's Markdown
    "interventions-table": _interventions_table,
    "interventions-listing": _interventions_listing,
    "models-listing": _models_listing,
    "glossary-shared": _glossary_shared,
    "glossary-interventions": _glossary_interventions,
    "rules": _rules,
    "decisive": _decisive,
    "families": _families,
}


def expand(markdown: str, where: str = "a page", markers: dict | None = None) -> str:
    """``markdown`` with every ``<!-- generated: NAME -->`` line replaced by its generated Markdown
    (``help COMMAND`` gives that command's ``--help``). An unknown name is an error, not an empty section."""
    markers = MARKERS if markers is None else markers

    def one(m):
        name = m.group(1)
        if name.startswith("help "):
            return _help(name.split(" ", 1)[1])
        if name not in markers:
            raise ValueError(f"{where}: unknown generated section {name!r}; known: {', '.join(markers)}, help CMD")
        return markers[name]()

    return MARKER.sub(one, markdown)


def generated_pages() -> dict[str, str]:
    """Every page the site generates (path under docs/ → Markdown), from this checkout's code."""
    pages = intervention_pages()
    pages.update({f"api/{m}.md": api_page(m) for m in api_modules(ROOT / PACKAGE)})
    pages["contributing.md"] = (ROOT / "CONTRIBUTING.md").read_text(encoding="utf-8")
    return pages


def nav_titles(pages: dict[str, str], folder: str) -> list[dict]:
    """Nav entries (title → path) for the generated pages under ``folder``, in the order generated."""
    out = []
    for path in pages:
        if path.startswith(folder + "/"):
            stem = path[len(folder) + 1:-3]
            out.append({stem if folder == "interventions" else stem.removeprefix(PACKAGE + "."): path})
    return out


# =========================================================================== mkdocs events
_PAGES: dict[str, str] = {}


def _insert_after(nav: list, target: str, entries: list) -> bool:
    """Put ``entries`` after the nav item whose path is ``target`` (searched in nested sections)."""
    for i, item in enumerate(nav):
        path = item if isinstance(item, str) else next(iter(item.values()))
        if path == target:
            nav[i + 1:i + 1] = entries
            return True
        if isinstance(path, list) and _insert_after(path, target, entries):
            return True
    return False


def on_config(config):
    _PAGES.clear()
    _PAGES.update(generated_pages())
    for folder in ("interventions", "api"):
        if not _insert_after(config.nav, f"{folder}/index.md", nav_titles(_PAGES, folder)):
            raise ValueError(f"mkdocs.yml: the nav needs {folder}/index.md, after which the generated pages go")
    return config


def on_files(files, config):
    from mkdocs.structure.files import File

    for path, content in _PAGES.items():
        if files.get_file_from_path(path) is not None:
            raise ValueError(f"docs/{path} is generated (docs/hooks.py); remove the hand-written file")
        files.append(File.generated(config, path, content=content))
    for png in sorted(EXAMPLES.glob("*.png")):
        files.append(File.generated(config, f"examples/{png.name}", abs_src_path=str(png)))
    return files


def on_page_markdown(markdown, page, config, files):
    return expand(markdown, where=page.file.src_uri)

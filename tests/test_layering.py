"""The package's import graph: one-way layering, no cycles, and nothing imports the command line."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "mclcbf_diag"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PKG.rglob("*.py") if "__main__" not in p.name}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(max(node.level - 1, 0)):
                    base = base.rpartition(".")[0]
                target = (f"{base}.{node.module}" if node.module else base) if node.level else (node.module or "")
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    dest = sub if sub in modules else target
                    if dest in modules and dest != name:
                        graph[name].add(dest)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in modules:
                        graph[name].add(alias.name)
        graph[name] |= _lazy_imports(path, package, modules) - {name}
    return graph


def _lazy_imports(path: Path, package: str, modules) -> set[str]:
    """Modules loaded with ``importlib.import_module``: in a module that calls it, every string literal
    that names a module (relative ``".base"`` or absolute ``"mclcbf_diag.x"``) counts as an import."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    calls = any(isinstance(n, ast.Attribute) and n.attr == "import_module" for n in ast.walk(tree))
    found = set()
    for node in ast.walk(tree) if calls else ():
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value
            if text.startswith("."):
                level = len(text) - len(text.lstrip("."))
                base = package
                for _ in range(level - 1):
                    base = base.rpartition(".")[0]
                text = f"{base}.{text.lstrip('.')}" if text.strip(".") else base
            if text in modules:
                found.add(text)
    return found


def test_lazy_imports_are_in_the_graph():
    """interventions/__init__ loads its classes with importlib; the graph must see those edges."""
    graph = _graph()
    assert {"mclcbf_diag.interventions.base", "mclcbf_diag.interventions.mclcbf",
            "mclcbf_diag.interventions.knockout"} <= graph["mclcbf_diag.interventions"]
    assert "mclcbf_diag.interventions.mclcbf.intervention" in graph["mclcbf_diag.interventions.mclcbf"]


def test_no_module_outside_the_cli_imports_it():
    offenders = {m: sorted(d for d in deps if d.startswith("mclcbf_diag.cli"))
                 for m, deps in _graph().items() if not m.startswith("mclcbf_diag.cli")}
    assert not {m: d for m, d in offenders.items() if d}


def test_the_import_graph_has_no_cycle():
    graph, state, stack = _graph(), {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                cycle = stack[stack.index(d):] + [d]
                raise AssertionError("import cycle: " + " → ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_models_and_probes_know_no_intervention():
    graph = _graph()
    low = [m for m in graph if m.startswith(("mclcbf_diag.models", "mclcbf_diag.measurements.probes",
                                             "mclcbf_diag.measurements.records",
                                              "mclcbf_diag.knobs", "mclcbf_diag.diagnosis.rulebook"))]
    for m in low:
        above = {d for d in graph[m] if d.startswith(("mclcbf_diag.interventions", "mclcbf_diag.engine.runner",
                                                      "mclcbf_diag.barrier"))}
        assert not above, (m, above)


# ----------------------------------------------------------------------------- tests mirror modules
# Every module ``mclcbf_diag/a/b.py`` has ``tests/test_a_b.py`` (a package's ``__init__.py``:
# ``tests/test_a.py``), so a reader finds a module's tests by its name. The exceptions below
# say why; a listed module that gets its own mirror file (or goes away) must leave the list.
TESTS = Path(__file__).resolve().parent

SKIPPED = {
    "embedded": "the embedded model's builder, trainer and evaluation (tests/test_embedded_*.py)",
    "population": "being rewritten by a concurrent change (tests/test_experiments_verdict.py); mirror it when it lands",
}

COVERED_BY = {  # module → (test file that holds its tests, why not the mirror name)
    "models/loading.py": ("test_loading.py", "predates the mirror rule; loading is the models package's main job"),
    "models/real_width.py": ("test_real_width.py", "predates the mirror rule"),
    "models/mrope.py": ("test_models_qwen_vl.py", "the Qwen-VL family end to end, the file named by its family"),
    "models/deepstack.py": ("test_models_qwen3_vl.py", "the Qwen3-VL family end to end, the file named by its "
                                                       "family"),
    "models/projection.py": ("test_models.py", "key projection = the layer's own cache, with the adapter's weights"),
    "models/tokens.py": ("test_models.py", "answer and image tokens on several vocabularies"),
    "pope/compare.py": ("test_compare.py", "predates the mirror rule"),
    "pope/distributed.py": ("test_distributed.py", "predates the mirror rule"),
    "pope/jobs.py": ("test_pope.py", "shards, limits and image checks, through the pope command"),
    "pope/store.py": ("test_pope.py", "the run folder: resume, torn lines, refusals, through the pope command"),
    "pope/answer.py": ("test_pope.py", "batched answering and resume, through the pope command"),
    "pope/metrics.py": ("test_pope.py", "metrics against a hand recomputation"),
    "interventions/attention_edits.py": ("test_barrier.py", "each edit against a softmax of shifted logits"),
    "interventions/mclcbf/config.py": ("test_barrier.py", "presets, overrides, spans and targets"),
    "interventions/mclcbf/math.py": ("test_barrier.py", "h, ∇h and the step vs eager attention and finite differences"),
    "interventions/mclcbf/intervention.py": ("test_experiments_trace.py",
                                             "the step on real models against HF references"),
    "interventions/mclcbf/rules.py": ("test_diagnosis_diagnose.py", "each rule on hand-built records"),
    "interventions/mclcbf/__init__.py": ("test_barrier.py", "re-exports; barrier.py gathers the same names"),
    "interventions/mclcbf/names.py": ("test_barrier.py", "the flat namespace users import as mclcbf_diag.barrier"),
    "interventions/mclcbf/report.py": ("test_report_plots.py", "its figures beside the generic ones; its page "
                                       "sentences in test_report_pages.py"),
    "experiments/evidence.py": ("test_experiments_explain.py", "the pieces of a verdict, through explain's runs"),
}

EXEMPT = {
    "__init__.py": "the package's version only",
    "cli/__main__.py": "calls cli.main; every tests/test_cli_*.py refusal runs the command line in a fresh process",
    "data/__init__.py": "re-exports of data/pope.py, prompts.py and scoring.py, each mirrored",
    "engine/__init__.py": "the package's docstring only",
    "measurements/__init__.py": "the package's docstring only",
    "diagnosis/__init__.py": "the package's docstring only",
    "experiments/__init__.py": "the sweep's names under the old module path (tests/test_experiments_sweep.py)",
    "report/__init__.py": "the HTML module's names under the old module path (tests/test_report_html.py)",
}


def _mirror(rel: str) -> str:
    parts = rel[:-3].split("/")
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return "test_" + "_".join(parts) + ".py"


def _moved(path: Path) -> bool:
    """An old import path kept for one release: its module is the moved one (``sys.modules`` alias)."""
    return "sys.modules[__name__] = _moved" in path.read_text(encoding="utf-8")


def _modules() -> list[str]:
    rels = sorted(p.relative_to(PKG).as_posix() for p in PKG.rglob("*.py") if not _moved(p))
    return [r for r in rels if r.split("/")[0] not in SKIPPED and not r.startswith("population")]


def test_every_module_has_a_mirroring_test_file():
    missing = [m for m in _modules() if m not in EXEMPT and m not in COVERED_BY and not (TESTS / _mirror(m)).exists()]
    assert not missing, "modules without tests/" + ", tests/".join(f"{_mirror(m)} ({m})" for m in missing)


def test_the_exceptions_are_current():
    modules = set(_modules())
    for m, (test, _) in COVERED_BY.items():
        assert m in modules, f"{m} no longer exists: drop it from COVERED_BY"
        assert not (TESTS / _mirror(m)).exists(), f"{m} has tests/{_mirror(m)} now: drop it from COVERED_BY"
        assert (TESTS / test).exists(), f"COVERED_BY names tests/{test} for {m}, which does not exist"
    for m in EXEMPT:
        assert not (TESTS / _mirror(m)).exists() or m == "__init__.py", f"{m} has tests/{_mirror(m)}: drop it"


def test_every_test_file_names_a_module_or_says_what_it_covers():
    """The other direction: a test file with no module is a cross-cutting test, listed here."""
    cross_cutting = {"test_bad_inputs.py", "test_benchmarks.py", "test_browser.py", "test_notebooks.py",
                     "test_pinned_records.py", "test_user_intervention.py", "test_device_map.py", "test_layering.py",
                     "test_docs_examples.py", "test_docs_pages.py", "test_docs_build.py", "test_planted_wrong.py",
                     "test_nonfinite.py", "test_hostile_inputs.py",
                     "test_comparison_tables.py",  # the kept comparison (reports/comparison) against its answers
                     "test_cli_labels.py",
                     "test_interventions_aux_rows.py",  # auxiliary forwards in the question's own: views, runner, batch
                     "test_experiments_trace_generate.py",  # trace's generation under a decoding-level method:
                     # experiments/trace.py, engine/decode.py, cli/trace.py and pope's text, together
                     "test_engine_decode_views.py",  # generation's views continued by their caches: engine/decode.py,
                     # the methods' decode_views (interventions/), trace's view records, together
                     "test_engine_decode_vista.py",  # VISTA under generation: engine/decode.py's loop with the
                     # prompt's vector (interventions/vista.py) against plain PyTorch and the runner's generate
                     "test_models_gemma3.py"}  # a family end to end: its pieces live in adapter.py and processing.py
    mirrors = {_mirror(m) for m in _modules()} | {t for t, _ in COVERED_BY.values()}
    for p in sorted(PKG.rglob("*.py")):
        rel = p.relative_to(PKG).as_posix()
        if rel.split("/")[0] in SKIPPED or rel.startswith("population"):
            mirrors.add(_mirror(rel))
    orphans = sorted(p.name for p in TESTS.glob("test_*.py") if p.name not in mirrors | cross_cutting
                     and not p.name.startswith(tuple(f"test_{s}" for s in SKIPPED)))
    assert not orphans, f"test files that mirror no module (rename, or list as cross-cutting): {orphans}"


# ----------------------------------------------------------------------------- the seam
def _mclcbf_vocabulary() -> tuple[set[str], set[str], set[str]]:
    """MC-LCBF's metric names and its own knob names (those no other intervention has), compound ones only (a bare
    ``scale``, ``span``, ``guard``, ``clamp`` or ``site`` also names a tensor's scale, a token span, torch's
    ``Tensor.clamp`` or the runner's ``Site``), and its class names."""
    import dataclasses

    from mclcbf_diag.interventions import registry
    from mclcbf_diag.interventions.mclcbf import METRICS, BarrierConfig

    others = {f.name for name, cls in registry().items() if name != "mclcbf" and dataclasses.is_dataclass(cls.Knobs)
              for f in dataclasses.fields(cls.Knobs)}
    knobs = {f.name for f in dataclasses.fields(BarrierConfig)} - others
    return {m for m in METRICS if "_" in m}, {k for k in knobs if "_" in k}, {"MCLCBF", "BarrierConfig"}


def test_nothing_outside_the_intervention_names_mc_lcbf():
    """A new intervention touches only interventions/: the generic code reaches MC-LCBF through Intervention's
    methods, never through its metric names, knobs or classes (the registry names every class it lists)."""
    metrics, knobs, classes = _mclcbf_vocabulary()
    registry_files = {"interventions/__init__.py", "interventions/catalog.py"}
    leaks = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG).as_posix()
        if rel.startswith("interventions/mclcbf/") or _moved(path):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            name = (node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else
                    node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else
                    node.name if isinstance(node, ast.alias) else None)
            if name in metrics | knobs or (name in classes and rel not in registry_files):
                leaks.setdefault(rel, set()).add(name)
    assert not leaks, sorted((k, sorted(v)) for k, v in leaks.items())


def test_no_private_name_is_imported_across_modules():
    found = []
    for path in PKG.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        modules = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("mclcbf_diag")):
                modules |= {a.asname or a.name for a in node.names}
                found += [f"{path.relative_to(PKG)}: {a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
        found += [f"{path.relative_to(PKG)}: {n.value.id}.{n.attr}" for n in ast.walk(tree)
                  if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in modules
                  and n.attr.startswith("_") and not n.attr.startswith("__")]
    assert not found, found


def test_no_function_is_longer_than_60_lines_without_saying_why():
    """Function bodies (the docstring aside) stay within 60 lines; a longer one says why in its docstring
    ("Over 60 lines: …")."""
    long = []
    for path in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node) or ""
            first = node.body[0]
            skip = first.end_lineno - first.lineno + 1 if doc and isinstance(first, ast.Expr) else 0
            if node.end_lineno - node.lineno + 1 - skip > 60 and "Over 60 lines" not in doc:
                long.append(f"{path.relative_to(PKG)}:{node.lineno} {node.name}")
    assert not long, long

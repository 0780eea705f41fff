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
    return graph


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
    low = [m for m in graph if m.startswith(("mclcbf_diag.models", "mclcbf_diag.probes", "mclcbf_diag.records",
                                              "mclcbf_diag.knobs", "mclcbf_diag.rulebook"))]
    for m in low:
        above = {d for d in graph[m] if d.startswith(("mclcbf_diag.interventions", "mclcbf_diag.runner",
                                                      "mclcbf_diag.barrier"))}
        assert not above, (m, above)

"""The package's import arrows run one way: no import cycle inside dynamo/, and dynamo_kernels never
imports dynamo (the kernels depend on torch and triton only; the glue lives in dynamo.packed).

Read from the source with `ast`, every import counts, the ones inside functions too: a lazy import
hides a cycle from Python's import machinery, not from a reader, who still cannot understand one
module without the other. Importing `a.b.c` also runs the packages `a` and `a.b` (their __init__),
so those count as edges too: a package __init__ that imports its submodules closes a cycle as
surely as the submodule would. A module's own packages are not its imports: Python runs them
before the module itself.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO


def modules_of(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of `package` (a folder of `root`)."""
    found = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute name `from <node.module> import ...` means inside `module`."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """The modules of `known` that importing `module` runs: each imported name and its packages, except
    `module`'s own packages (already running when it is imported)."""
    named = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            named.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, path.name == "__init__.py", node)
            named.add(target)
            named.update(f"{target}.{alias.name}" for alias in node.names)  # `from pkg import submodule`
    edges = set()
    for name in named:
        parts = name.split(".")
        edges.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    parts = module.split(".")
    own = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    return (edges & known) - own


def import_graph(root: Path, packages: tuple[str, ...]) -> dict[str, set[str]]:
    known = {}
    for package in packages:
        known.update(modules_of(root, package))
    return {m: imports_of(m, p, set(known)) for m, p in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted, as a list."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def test_no_import_cycle_inside_dynamo():
    graph = import_graph(REPO, ("dynamo",))
    assert len(graph) > 50  # the walk found the package (a wrong root would pass on an empty graph)
    assert cycles(graph) == [], "import cycles (each a set of modules that import each other, lazily or not)"


def test_dynamo_kernels_never_imports_dynamo():
    graph = import_graph(REPO, ("dynamo", "dynamo_kernels"))
    wrong = {m: sorted(t for t in targets if t.split(".")[0] == "dynamo")
             for m, targets in graph.items() if m.split(".")[0] == "dynamo_kernels"}
    assert {m: t for m, t in wrong.items() if t} == {}
    assert any(t.startswith("dynamo_kernels") for t in graph["dynamo.packed.model"])  # the edges are seen


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for target in graph[todo.pop()] - seen:
            seen.add(target)
            todo.append(target)
    return seen


def test_the_packed_layout_depends_on_no_switching_policy_and_no_exporter():
    """The packed model and its checkpoint format are read by the switchers and the exporters, never the
    reverse (dynamo.packed.switching is the glue that may see both)."""
    graph = import_graph(REPO, ("dynamo",))
    for module in ("dynamo.packed.model", "dynamo.packed.format", "dynamo.packed.attached"):
        wrong = sorted(t for t in reachable(graph, module) if t.startswith(("dynamo.switching", "dynamo.export")))
        assert wrong == [], f"{module} reaches {wrong}"


def test_the_check_finds_a_cycle_hidden_in_a_function_and_through_a_package_init(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("import os\n\ndef f():\n    from ..c import g\n    return g\n")
    (pkg / "c.py").write_text("def g():\n    import pkg.a\n")
    (pkg / "d.py").write_text("from pkg import a\n")  # imports into the cycle, is not part of it
    assert cycles(import_graph(tmp_path, ("pkg",))) == [["pkg.a", "pkg.c", "pkg.sub.b"]]

    (pkg / "c.py").write_text("def g():\n    pass\n")
    assert cycles(import_graph(tmp_path, ("pkg",))) == []

    (pkg / "sub" / "__init__.py").write_text("from .b import f\n")  # the package runs b, b runs c, c runs sub
    (pkg / "c.py").write_text("from pkg.sub import b\n")
    assert cycles(import_graph(tmp_path, ("pkg",))) == [["pkg.c", "pkg.sub", "pkg.sub.b"]]

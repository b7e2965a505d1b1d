"""The import graph of the vqfast package: layers point one way (STYLE.md item 17).

Read from the sources (ast), not by importing them: every `import` and `from ... import` of a vqfast
module, at module level and inside functions alike (a function-level import is still a dependency,
only a deferred one). Imports under `if TYPE_CHECKING:` never run and are left out.

    no cycle                 among vqfast's modules, counting the package itself (`from vqfast import
                             name` depends on vqfast/__init__.py, which imports most of the package)
    models/ -> compat/       never: the foreign-library twins build on vqfast's models, not the reverse
    -> vqfast.cli            only from the command-line entry modules (__main__); nothing in the
                             library depends on the CLI
"""
from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vqfast"


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).parts)
    parts[-1] = parts[-1].removesuffix(".py")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules(package: Path = PACKAGE) -> dict[str, Path]:
    """{dotted module name: source path} for every .py file of the package."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(package):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for f in sorted(filenames):
            path = Path(dirpath) / f
            if f.endswith(".py"):
                out[module_name(path, package.parent)] = path
            elif f.endswith((".so", ".pyd")):  # a compiled module (vqfast._C): imported, imports nothing
                out[module_name(path.with_name(f.split(".")[0]), package.parent)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Every Import / ImportFrom node outside `if TYPE_CHECKING:` blocks, at any depth."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of dotted ``name`` that is a module of the package (None: not vqfast's)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def import_edges(modules: dict[str, Path]) -> dict[str, dict[str, int]]:
    """{importer: {imported vqfast module: first line}} for every module of the package."""
    edges: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        if path.suffix != ".py":
            edges[name] = {}
            continue
        is_package = path.name == "__init__.py"
        targets: dict[str, int] = {}
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            found = []
            if isinstance(node, ast.Import):
                found = [_resolve(alias.name, modules) for alias in node.names]
            else:
                if node.level:  # relative: from the importer's package, up level - 1 packages
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                for alias in node.names:
                    # `from vqfast import reference` imports the submodule; `from vqfast import name`
                    # depends on the package's __init__.
                    found.append(_resolve(f"{source}.{alias.name}", modules) if f"{source}.{alias.name}" in modules
                                 else _resolve(source, modules))
            for target in found:
                if target is not None and target != name:
                    targets.setdefault(target, node.lineno)
        edges[name] = targets
    return edges


def find_cycles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle (a list of modules, first repeated at the end) per strongly connected component."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = [0]

    def connect(v: str) -> None:  # Tarjan; the package has ~60 modules, recursion depth is no issue
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, {}):
            if w not in index:
                connect(w)
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
                components.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            connect(v)

    cycles = []
    for component in components:  # a shortest cycle through the component's first module
        members, start = set(component), component[0]
        previous = {start: None}
        queue = [start]
        end = None
        while queue and end is None:
            v = queue.pop(0)
            for w in sorted(edges[v]):
                if w == start:
                    end = v
                    break
                if w in members and w not in previous:
                    previous[w] = v
                    queue.append(w)
        path = [start]  # walked back from the module that closes the cycle: start, v, ..., start
        while end is not None:
            path.append(end)
            end = previous[end]
        cycles.append(path[::-1])
    return cycles


def _where(modules, name: str) -> str:
    return str(modules[name].relative_to(ROOT))


def _describe(cycle: list[str], edges, modules) -> str:
    steps = [f"{a} ({_where(modules, a)}:{edges[a][b]}) -> {b}" for a, b in zip(cycle, cycle[1:])]
    return "\n    ".join(steps)


@pytest.fixture(scope="module")
def graph():
    modules = package_modules()
    return modules, import_edges(modules)


def test_the_walk_sees_function_level_and_relative_imports(tmp_path):
    pkg = tmp_path / "vqfast"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from vqfast.a import f\n")
    (pkg / "a.py").write_text("def f():\n    from vqfast.sub import b\n    return b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import vqfast.c\n"
                                      "from .. import a\n")
    (pkg / "c.py").write_text("from vqfast import f\n")
    edges = import_edges(package_modules(pkg))
    assert edges["vqfast"] == {"vqfast.a": 1}
    assert edges["vqfast.a"] == {"vqfast.sub.b": 2}
    assert edges["vqfast.sub.b"] == {"vqfast.a": 4}  # the TYPE_CHECKING import left out
    assert edges["vqfast.c"] == {"vqfast": 1}  # a name from the package: its __init__
    assert find_cycles(edges) == [["vqfast.a", "vqfast.sub.b", "vqfast.a"]]


def test_no_import_cycle(graph):
    modules, edges = graph
    assert len(modules) > 10, sorted(modules)
    cycles = find_cycles(edges)
    assert not cycles, "import cycles among vqfast's modules (function-level imports included):\n  " + "\n  ".join(
        _describe(c, edges, modules) for c in cycles)


def test_models_import_nothing_from_compat(graph):
    modules, edges = graph
    bad = [f"{a} ({_where(modules, a)}:{line}) -> {b}"
           for a, targets in sorted(edges.items()) if a == "vqfast.models" or a.startswith("vqfast.models.")
           for b, line in sorted(targets.items()) if b == "vqfast.compat" or b.startswith("vqfast.compat.")]
    assert not bad, "vqfast/models imports vqfast/compat:\n  " + "\n  ".join(bad)


def test_only_the_command_line_entry_modules_import_the_cli(graph):
    modules, edges = graph
    assert "vqfast.cli" in modules
    entry = {m for m in modules if m.rsplit(".", 1)[-1] == "__main__"}
    bad = [f"{a} ({_where(modules, a)}:{line})"
           for a, targets in sorted(edges.items()) if a not in entry
           for b, line in targets.items() if b == "vqfast.cli"]
    assert not bad, "modules other than the command-line entry points import vqfast.cli:\n  " + "\n  ".join(bad)

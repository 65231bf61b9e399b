"""No import circles among the modules of operators/, schemas/, streams/ and deploy/, nor among
the subpackages of operators/. Imports inside functions count: deferring one hides a circle,
it does not remove it."""

from __future__ import annotations

import ast
from collections import deque
from collections.abc import Iterable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("operators", "schemas", "streams", "deploy")
Graph = Mapping[str, set[str]]


def _modules(root: Path = ROOT, packages: Iterable[str] = PACKAGES) -> dict[str, Path]:
    """Dotted module name → file, packages named by their ``__init__.py``."""
    found: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _imported(name: str, source: str, is_package: bool, known: Iterable[str]) -> set[str]:
    """The known modules that module ``name`` imports anywhere in ``source``.

    ``from a.b import c`` imports module a.b.c when there is one, else (a name defined in a.b)
    module a.b; relative imports resolve against the importing module's package.
    """
    modules = set(known)
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):  # every statement, function bodies included
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".") if is_package else name.split(".")[:-1]
                anchor = package[: len(package) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in modules else base)
    return (found & modules) - {name}


def _graph(modules: Mapping[str, Path]) -> dict[str, set[str]]:
    return {
        name: _imported(name, path.read_text(), path.name == "__init__.py", modules)
        for name, path in modules.items()
    }


def _cycles(graph: Graph) -> list[list[str]]:
    """One shortest cycle (first node repeated at the end) per strongly connected component."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            components.append(component)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    cycles = []
    for component in components:
        if len(component) < 2:
            continue
        start = min(component)
        came_from: dict[str, str] = {}
        queue = deque([start])
        while queue:  # breadth first inside the component, back to start: a shortest cycle
            v = queue.popleft()
            for w in sorted(graph[v] & component):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    cycles.append([*reversed(path), start])
                    queue.clear()
                    break
                if w not in came_from:
                    came_from[w] = v
                    queue.append(w)
    return sorted(cycles)


def _report(cycles: list[list[str]]) -> str:
    return "import cycles:\n" + "\n".join("  " + " -> ".join(c) for c in cycles)


def _subpackage(module: str, subpackages: set[str]) -> str:
    """operators.x.y → operators.x for a subpackage x; top-level modules stand for themselves."""
    parts = module.split(".")
    return ".".join(parts[:2]) if ".".join(parts[:2]) in subpackages else module


def test_no_import_cycle_between_modules() -> None:
    graph = _graph(_modules())
    assert len(graph) > 20
    cycles = _cycles(graph)
    assert not cycles, _report(cycles)


def test_no_import_cycle_between_the_subpackages_of_operators() -> None:
    modules = _modules(packages=["operators"])
    subpackages = {
        name
        for name, path in modules.items()
        if path.name == "__init__.py" and name.count(".") == 1
    }
    assert {"operators.model", "operators.training", "operators.evaluation"} <= subpackages
    graph: dict[str, set[str]] = {}
    for name, imports in _graph(modules).items():
        node = _subpackage(name, subpackages)
        targets = {_subpackage(m, subpackages) for m in imports} - {node}
        graph.setdefault(node, set()).update(targets)
    cycles = _cycles(graph)
    assert not cycles, _report(cycles)


def test_deferred_and_relative_imports_are_followed(tmp_path: Path) -> None:
    files = {
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg import b\n",
        "pkg/b.py": "def late():\n    from .c import thing\n",
        "pkg/c.py": "import os\n\ndef f():\n    from pkg.a import name\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    graph = _graph(_modules(tmp_path, ["pkg"]))
    assert graph == {"pkg": set(), "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.c"}, "pkg.c": {"pkg.a"}}
    assert _cycles(graph) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]

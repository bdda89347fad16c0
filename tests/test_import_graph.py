"""No import cycle in ``opera/``, between modules or between subpackages, read from the AST of every
``opera/**/*.py`` (nothing is imported).

An edge ``a -> b`` is any import statement of ``a`` that names ``b``: at module level and also
inside functions. A deferred import is still a dependency, and deferring one is how a cycle hides:
``ablate/report.py`` and ``ablate/study.py`` imported each other only inside functions, so a graph
of module-level imports alone was acyclic while the cycle was there. Imports under
``if TYPE_CHECKING:`` are left out. ``from p import n`` points at the module ``p.n`` when that file
exists, else at ``p``. Importing ``p.n`` also runs ``p/__init__.py`` first; that implicit edge is
left out, as it closes a cycle with every package that re-exports its own submodules.

The subpackage graph (``opera.engine.pretrain -> opera.evals.knn`` counts as ``opera.engine ->
opera.evals``) must be acyclic too: a layering, so that ``opera.evals`` can be read without the
training engine depending back on it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "opera"

#: Package edges allowed to close a cycle: none. (The engine -> evals edge of the in-training k-NN
#: went away with the leaf ``opera/features.py``; diagnose builds hierarchies with
#: ``SupervisionHierarchy.from_config``, not through the engine.)
ALLOWED_PACKAGE_EDGES: frozenset[tuple[str, str]] = frozenset()


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(node: ast.AST):
    """Every import statement under ``node`` (functions included), except under ``if TYPE_CHECKING:``."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for other in child.orelse:
                yield from _imports(ast.Module(body=[other], type_ignores=[]))
        else:
            yield from _imports(child)


def import_graph(root: Path = ROOT, package: str = PACKAGE) -> dict[str, set[str]]:
    """``{module: modules of the package it imports}``."""
    files = {module_name(p, root): p for p in sorted((root / package).rglob("*.py"))}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:  # relative: from the package of this module, level - 1 packages up
                    anchor = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            graph[mod] |= {t for t in targets if t in files and t != mod}
    return graph


def find_cycle(graph: dict[str, set[str]], allowed: frozenset[tuple[str, str]] = frozenset()) -> list[str] | None:
    """One cycle as ``[a, b, ..., a]``, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif (path[-1], nxt) in allowed:
                continue
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def subpackage_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The module graph with every module merged into its first-level subpackage (or top module)."""
    def unit(m: str) -> str:
        return ".".join(m.split(".")[:2])

    out: dict[str, set[str]] = {unit(m): set() for m in graph}
    for a, targets in graph.items():
        out[unit(a)] |= {unit(b) for b in targets if unit(b) != unit(a)}
    return out


def test_no_module_imports_itself_through_others():
    graph = import_graph()
    assert len(graph) > 50 and "opera.engine.checkpoint" in graph["opera.evals.common"]  # deferred imports are read
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle in opera/: " + " -> ".join(cycle)


def test_subpackages_are_layered():
    graph = subpackage_graph(import_graph())
    assert {"opera.engine", "opera.evals", "opera.ablate", "opera.cli"} <= set(graph)
    for edge in ALLOWED_PACKAGE_EDGES:  # an allowance that no cycle needs any more must go
        assert find_cycle(graph, ALLOWED_PACKAGE_EDGES - {edge}) is not None, (
            f"ALLOWED_PACKAGE_EDGES lists {edge[0]} -> {edge[1]}, but no cycle runs through it now: remove the allowance")
    cycle = find_cycle(graph, ALLOWED_PACKAGE_EDGES)
    assert cycle is None, "import cycle between subpackages of opera/: " + " -> ".join(cycle)


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def test_a_cycle_is_found_and_named(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "from pkg.a import f\n",
        "pkg/a.py": "import os\nfrom pkg.sub import b\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/b.py": "def g():\n    from ..c import h  # deferred: still an edge\n",
        "pkg/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.sub.b\nelse:\n    from . import a\n",
    })
    graph = import_graph(tmp_path, "pkg")
    assert graph == {"pkg": {"pkg.a"}, "pkg.a": {"pkg.sub.b"}, "pkg.sub": set(), "pkg.sub.b": {"pkg.c"}, "pkg.c": {"pkg.a"}}
    assert find_cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]
    assert find_cycle(graph, frozenset({("pkg.c", "pkg.a")})) is None
    assert subpackage_graph(graph) == {"pkg": {"pkg.a"}, "pkg.a": {"pkg.sub"}, "pkg.sub": {"pkg.c"}, "pkg.c": {"pkg.a"}}


@pytest.mark.parametrize("text", ["import pkg.a\n", "from pkg import a\n", "from . import a\n"])
def test_each_spelling_of_an_import_is_an_edge(tmp_path, text):
    _write(tmp_path, {"pkg/__init__.py": "", "pkg/a.py": "", "pkg/b.py": text})
    assert import_graph(tmp_path, "pkg")["pkg.b"] == {"pkg.a"}

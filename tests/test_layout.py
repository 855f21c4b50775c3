"""The structure is part of the product: data flows one way through the package, so no
module imports another that imports it back, not even inside a function (a lazy import
hides a cycle, it does not remove it)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {
    "ray_workflows": ROOT / "src" / "ray_workflows",
    "ray_workflows._core": ROOT / "src" / "ray_workflows" / "_core",
    "ray_workflows.backends": ROOT / "backends",
    "ray_workflows.listeners": ROOT / "listeners",
}


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.glob("*.py"):
            found[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return found


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``path`` imports, anywhere in it (``from package
    import module`` counts as importing the module)."""
    deps: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            named = [f"{node.module}.{a.name}" for a in node.names]
            subs = [name for name in named if name in modules]
            deps.update(subs or ([node.module] if node.module in modules else []))
        elif isinstance(node, ast.Import):
            deps.update(a.name for a in node.names if a.name in modules)
    return deps


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a path (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = 1
        path.append(name)
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                return path[path.index(dep) :] + [dep]
            if dep not in state and (found := visit(dep)) is not None:
                return found
        path.pop()
        state[name] = 2
        return None

    for name in sorted(graph):
        if name not in state and (found := visit(name)) is not None:
            return found
    return None


def test_no_import_cycles_even_inside_functions() -> None:
    modules = _modules()
    # The package root re-exports the public API: it imports, nobody imports it.
    graph = {
        name: _imports(path, modules) - {name, "ray_workflows"} for name, path in modules.items()
    }
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None

"""The picture of the house: the package's import graph has no circle and its floors are kept.

Read from the source (``ast``), so the test sees every module-level import, including those a
run would not reach. Imports inside functions (the command line's lazy ones) and under
``if TYPE_CHECKING`` are not edges: they never run at import time.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "tanbr"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _top_level_imports(tree: ast.Module, module: str, is_package: bool) -> set[str]:
    found: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = module.split(".")
                    base = base[: len(base) - node.level + (1 if is_package else 0)]
                    name = ".".join([*base, node.module] if node.module else base)
                else:
                    name = node.module or ""
                found.add(name)
                found.update(f"{name}.{a.name}" for a in node.names)
            elif isinstance(node, ast.If) and not _is_type_checking(node):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)

    visit(tree.body)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the tanbr modules it imports at module level."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = _top_level_imports(tree, module, path.name == "__init__.py")
        graph[module] = {n for n in names if n in files and n != module}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


def test_the_import_graph_has_no_circle() -> None:
    graph = import_graph()
    assert len(graph) > 50
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_a_circle_is_found_when_there_is_one() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_the_floors_are_kept() -> None:
    """bandit and model are independent worlds; the backend seam sits on the model and below the
    online system; nothing above the seam imports the embedded default model."""
    graph = import_graph()

    def imports(prefix: str) -> set[str]:
        return {n for m, deps in graph.items() if m.startswith(prefix) for n in deps}

    assert not {n for n in imports("tanbr.bandit") if not n.startswith("tanbr.bandit")}
    assert not {
        n for n in imports("tanbr.model") if n.startswith(("tanbr.bandit", "tanbr.experiment"))
    }
    assert not {n for n in imports("tanbr.model") if n.startswith(("tanbr.serve", "tanbr.backend"))}
    assert not {
        n for n in imports("tanbr.backend") if n.startswith(("tanbr.experiment", "tanbr.serve"))
    }
    assert not {n for n in imports("tanbr.experiment") if n.startswith("tanbr.serve")}


def test_nothing_above_the_seam_names_the_default_model() -> None:
    """``grep -rn "model.default" src/tanbr/experiment src/tanbr/serve``: the default model is
    one backend among others, reached through the registry."""
    hits = [
        f"{path.relative_to(SRC)}:{i}"
        for folder in ("experiment", "serve")
        for path in (PACKAGE / folder).rglob("*.py")
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if "model.default" in line
    ]
    assert len(hits) <= 1, hits

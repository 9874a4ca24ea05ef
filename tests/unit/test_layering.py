"""The project's structure: no import circle among our modules, the floors of the layout kept
(state imports nothing of ours, jobs never imports pipeline, views on top), and every
function-local import of our modules saying why it is one.

Every import statement counts: at the top of a module, inside a function, under TYPE_CHECKING.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("state", "jobs", "pipeline", "tools")


def module_names(root: Path) -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (root / package).rglob("*.py"):
            name = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
            modules[name] = path
    return modules


def imports(root: Path) -> dict[str, dict[str, list[tuple[int, bool]]]]:
    """Module -> the modules of ours it imports -> (line, whether the import is inside a function)."""
    modules = module_names(root)

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, dict[str, list[tuple[int, bool]]]] = {name: {} for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        local: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                local |= {id(sub) for sub in ast.walk(node)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            else:
                continue
            for target in {resolve(t) for t in targets if t.split(".")[0] in PACKAGES} - {None, name}:
                graph[name].setdefault(target, []).append((node.lineno, id(node) in local))
    return graph


def circles(graph: dict[str, dict[str, list[tuple[int, bool]]]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_module_of_ours_imports_itself_through_others() -> None:
    assert circles(imports(ROOT)) == []


def test_a_circle_put_back_is_found(tmp_path: Path) -> None:
    """The check sees a circle closed by a function-local import, and one closed under TYPE_CHECKING."""
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "config.py").write_text("def load():\n    from pipeline.recipes import check  # late\n")
    (tmp_path / "pipeline" / "recipes.py").write_text("from pipeline.config import load\n")
    (tmp_path / "pipeline" / "stage.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pipeline.planner import Planner\n")
    (tmp_path / "pipeline" / "planner.py").write_text("from pipeline.stage import Task\n")
    assert circles(imports(tmp_path)) == [["pipeline.config", "pipeline.recipes"], ["pipeline.planner", "pipeline.stage"]]


# Which of our packages (and floors of pipeline) each may import; views stand on top.
FLOORS = {
    "state": ("state",),
    "jobs": ("state", "jobs"),
    "pipeline": ("state", "jobs", "pipeline"),
    "tools": ("state", "jobs", "pipeline", "tools"),
}


def test_the_layers_import_only_downwards() -> None:
    graph = imports(ROOT)
    upward = [f"{module} -> {target}" for module, targets in graph.items() for target in targets
              if target.split(".")[0] not in FLOORS[module.split(".")[0]]]
    # Nothing below the views imports them: they learn what happened through callbacks.
    upward += [f"{module} -> {target}" for module, targets in graph.items() for target in targets
               if target.startswith("pipeline.views") and module.startswith("pipeline.") and not module.startswith("pipeline.views")
               and module not in ("pipeline.run",)]
    assert upward == []


def test_every_function_local_import_of_ours_says_why() -> None:
    unexplained = []
    for module, targets in imports(ROOT).items():
        lines = module_names(ROOT)[module].read_text(encoding="utf-8").splitlines()
        for target, places in targets.items():
            for line, local in places:
                if local and "#" not in lines[line - 1] + (lines[line - 2] if line > 1 else ""):
                    unexplained.append(f"{module}:{line} imports {target}")
    assert unexplained == []

"""The package layout holds: each stage imports on its own, and no two packages import each other.

A stage that needs another stage's internals to import is not a stage; an import
circle between packages means neither can be understood, tested or replaced alone.
Values that cross stages live in `dicom_ai_node/values.py`, which imports nothing of ours.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "dicom_ai_node"
STAGES = ["ingest", "series", "routing", "inference", "results", "delivery", "notify", "fetch", "web", "store"]


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_imports_alone(stage: str) -> None:
    """The stage and each of its modules, in a fresh interpreter: an import that works only once another
    package was loaded first (a circle) fails here."""
    code = (
        f"import importlib, pkgutil, dicom_ai_node.{stage} as stage\n"
        "for module in pkgutil.iter_modules(stage.__path__, stage.__name__ + '.'):\n"
        "    importlib.import_module(module.name)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=PACKAGE.parent, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr


def _component(module: str) -> str | None:
    """The package (or top-level module) under dicom_ai_node that `module` is in; None outside ours."""
    parts = module.split(".")
    if parts[0] != "dicom_ai_node" or len(parts) < 2:
        return None
    if (PACKAGE / parts[1]).is_dir() or (PACKAGE / f"{parts[1]}.py").is_file():
        return parts[1]
    return None  # a name from dicom_ai_node/__init__.py, e.g. __version__


def _imported_modules(path: Path) -> set[str]:
    """Absolute names of everything `path` imports, at any depth (function-level imports too)."""
    package = ["dicom_ai_node", *path.relative_to(PACKAGE).parent.parts]
    imported: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            imported.add(module)
            # `from dicom_ai_node import demo` or `from . import x` may import modules by name
            imported.update(f"{module}.{alias.name}" for alias in node.names)
    return imported


def package_import_graph() -> dict[str, set[str]]:
    """Package (first component under dicom_ai_node) -> the other packages it imports."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        source = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        if source == "__init__":
            continue
        targets = {_component(module) for module in _imported_modules(path)}
        graph.setdefault(source, set()).update(target for target in targets if target and target != source)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle, as [a, b, ..., a], or None."""
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        if node in path:
            return [*path[path.index(node):], node]
        if node in done:
            return None
        path.append(node)
        for target in sorted(graph.get(node, ())):
            cycle = visit(target)
            if cycle:
                return cycle
        path.pop()
        done.add(node)
        return None

    for start in sorted(graph):
        cycle = visit(start)
        if cycle:
            return cycle
    return None


def test_find_cycle_reports_the_circle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_values_import_nothing_of_ours() -> None:
    assert package_import_graph().get("values", set()) == set()


def test_no_import_circle_between_packages() -> None:
    cycle = find_cycle(package_import_graph())
    assert cycle is None, "import circle between packages: " + " -> ".join(cycle or [])


def module_import_graph() -> dict[str, set[str]]:
    """Module -> the modules of ours it imports, at any depth (a lazy import is still a dependency)."""
    modules = {
        ".".join(("dicom_ai_node", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__"): path
        for path in PACKAGE.rglob("*.py")
    }
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        imported = _imported_modules(path)
        graph[name] = {module for module in imported if module in modules and module != name}
    return graph


def test_no_import_circle_between_modules() -> None:
    """Inside a package too: e.g. the model kinds import the model contract, never the registry that loads them."""
    graph = module_import_graph()
    for package in (path.parent for path in PACKAGE.rglob("__init__.py")):
        # A package's __init__ naming its own modules is how Python finds them, not a circle.
        graph[".".join(("dicom_ai_node", *package.relative_to(PACKAGE).parts)).rstrip(".")] = set()
    cycle = find_cycle(graph)
    assert cycle is None, "import circle between modules: " + " -> ".join(cycle or [])

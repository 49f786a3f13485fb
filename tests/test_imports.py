"""The three packages import cleanly, and their module import graph has no cycle.

The graph is read statically (``ast``) from every ``import`` statement, those inside
functions included (a deferred import still ties two modules together), except the ones
under ``if TYPE_CHECKING:``, which never run. An edge goes from a module to each module of
``lipcert``, ``attacks`` or ``reports`` that it names; importing ``a.b`` also runs
``a/__init__.py``, but that implicit edge is left out, as every submodule has it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lipcert", "attacks", "reports")


def module_files() -> dict[str, Path]:
    """Every module of the three packages, by dotted name."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported_names(tree: ast.Module, module: str, is_package: bool,
                    modules: set[str] | dict[str, Path]) -> list[str]:
    """The dotted names that the import statements of ``module`` load (outside
    TYPE_CHECKING); ``modules`` tells a submodule from a name defined in a module."""
    names: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:  # a submodule if there is one, else the module itself
                names.append(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules
                             else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return names


def import_graph() -> dict[str, set[str]]:
    """Module → the package modules it imports."""
    files = module_files()
    graph = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        named = _imported_names(tree, module, path.name == "__init__.py", files)
        graph[module] = {n for n in named if n in files and n != module}
    return graph


def test_the_module_graph_has_no_cycle() -> None:
    graph = import_graph()
    assert {"lipcert.cli", "lipcert.commands.demo", "attacks.run"} <= set(graph)
    try:
        list(TopologicalSorter(graph).static_order())
    except CycleError as err:
        pytest.fail("import cycle: " + " -> ".join(err.args[1]))


def test_the_graph_reader_sees_a_cycle() -> None:
    """The reader is what the test above relies on: a planted cycle must show."""
    tree_a = ast.parse("def f():\n    from lipcert import cli\n")
    tree_b = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                       "    import lipcert.demo\nelse:\n    from .cli import main\n")
    known = {"lipcert", "lipcert.cli", "lipcert.demo", "lipcert.x"}
    assert _imported_names(tree_a, "lipcert.demo", False, known) == ["lipcert.cli"]
    named = _imported_names(tree_b, "lipcert.x", False, known)
    assert "lipcert.cli" in named and "lipcert.demo" not in named
    graph = {"lipcert.demo": {"lipcert.cli"}, "lipcert.cli": {"lipcert.demo"}}
    with pytest.raises(CycleError):
        list(TopologicalSorter(graph).static_order())


def test_only_the_command_line_parses_arguments() -> None:
    """Argument helpers live in ``lipcert.commands``; the packages under it, and reports in
    particular, take nothing from the command line (nor from attacks)."""
    graph = import_graph()
    for module, path in module_files().items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        uses_argparse = "argparse" in _imported_names(tree, module, False, {"argparse"})
        if module != "lipcert.cli" and not module.startswith("lipcert.commands"):
            assert not uses_argparse, f"{module} imports argparse"
            assert not {m for m in graph[module] if m.startswith("lipcert.commands")}, module
        if module.startswith("reports"):
            assert not {m for m in graph[module] if m.startswith("attacks")}, module


def test_every_module_imports_in_a_fresh_interpreter() -> None:
    modules = sorted(module_files())
    script = ("import importlib, sys\nfailed = []\n"
              f"for name in {modules!r}:\n"
              "    try:\n        importlib.import_module(name)\n"
              "    except Exception as err:\n        failed.append(f'{name}: {err!r}')\n"
              "print('\\n'.join(failed))\nsys.exit(1 if failed else 0)\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr

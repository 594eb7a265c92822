"""Imports of the harness (evaluation) and leaderboard (analysis) packages: no cycle, and no dependence of
the evaluation side on the analysis side beyond the two commands that build a site.

The import graph is read from the source with ast: an edge for every import of one of these modules,
at module level (run when the module is imported) or inside a function (run when it is called).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("harness", "leaderboard")
# The only imports of the analysis side by the evaluation side: inside the functions of the jtc
# leaderboard command and of the sweep's last step, both of which build a site (leaderboard.build,
# and so its package), and of the jtc claims and results-page commands, which report on finished runs.
ROOT_PACKAGE = "jtc_lens"  # the import root the wheel maps both folders under
ALLOWED_LAZY = ({(f"{ROOT_PACKAGE}.{importer}", f"{ROOT_PACKAGE}.{m}")
                 for importer in ("harness.cli", "harness.sweep") for m in ("leaderboard", "leaderboard.build")}
                | {(f"{ROOT_PACKAGE}.harness.cli", f"{ROOT_PACKAGE}.leaderboard.{m}") for m in ("claims", "results_page", "read")})


def module_files() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join((ROOT_PACKAGE,) + (parts[:-1] if parts[-1] == "__init__" else parts))] = path
    return out


MODULES = module_files()


def _imported_names(node: ast.AST, module: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    package = module if is_package else module.rpartition(".")[0]
    if node.level:
        base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    # "from a import b" imports a, and a.b too when b is a module
    return [source] + [f"{source}.{alias.name}" for alias in node.names]


def _known(name: str, importer: str) -> set[str]:
    """The modules of ours that importing ``name`` runs: it and its packages, except packages that
    enclose the importer (already being imported when the importer runs)."""
    parts = name.split(".")
    found = set()
    for k in range(1, len(parts) + 1):
        candidate = ".".join(parts[:k])
        if candidate in MODULES and candidate != importer and not importer.startswith(candidate + "."):
            found.add(candidate)
    return found


def import_graph(module_level_only: bool) -> dict[str, set[str]]:
    graph = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text("utf-8"), filename=str(path))
        edges: set[str] = set()

        def visit(node: ast.AST, in_function: bool) -> None:
            if isinstance(node, (ast.Import, ast.ImportFrom)) and not (module_level_only and in_function):
                for name in _imported_names(node, module, path.name == "__init__.py"):
                    edges.update(_known(name, module))
            inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            for child in ast.iter_child_nodes(node):
                visit(child, inner)

        visit(tree, False)
        graph[module] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def walk(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = walk(nxt, path)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = walk(start, [])
            if found:
                return found
    return None


def test_graph_reader_sees_both_kinds_of_import():
    every = import_graph(module_level_only=False)
    top = import_graph(module_level_only=True)
    def m(name):
        return f"{ROOT_PACKAGE}.{name}"

    assert m("harness.stats") in top[m("leaderboard.tables")]  # module level, across the two folders
    assert m("harness.bundled") in every[m("harness.cli")] and m("harness.bundled") not in top[m("harness.cli")]  # in a function
    assert m("harness.lmeval.handler") in top[m("harness.lmeval.task")]  # from . import handler


@pytest.mark.parametrize("module_level_only", [True, False], ids=["module-level", "with-function-level"])
def test_no_import_cycle(module_level_only):
    cycle = find_cycle(import_graph(module_level_only))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_evaluation_side_does_not_depend_on_the_analysis_side():
    top = import_graph(module_level_only=True)
    every = import_graph(module_level_only=False)
    for module in MODULES:
        if not module.startswith(f"{ROOT_PACKAGE}.harness"):
            continue
        analysis = f"{ROOT_PACKAGE}.leaderboard"
        assert not [m for m in top[module] if m.startswith(analysis)], f"{module} imports the leaderboard at module level"
        lazy = {(module, m) for m in every[module] if m.startswith(analysis)}
        assert lazy <= ALLOWED_LAZY, f"{module} imports {sorted(m for _, m in lazy - ALLOWED_LAZY)}"


def test_leaderboard_takes_shared_definitions_from_the_harness():
    from jtc_lens.harness.lmeval import task
    from jtc_lens.harness.metrics import HIGHER_IS_BETTER
    from jtc_lens.harness.options import FITTED
    from jtc_lens.leaderboard import read, tables

    assert tables.HIGHER_IS_BETTER is HIGHER_IS_BETTER and task.HIGHER_IS_BETTER is HIGHER_IS_BETTER
    assert read.FITTED is FITTED


@pytest.mark.slow  # one interpreter per module: about a second each, most of it importing torch
@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_imports_in_a_fresh_interpreter(module):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

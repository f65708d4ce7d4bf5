"""The benchmark scripts' imports go one way: no module of scripts/ or scripts/benchlib/ imports, even
inside a function, one that imports it back. (`contenders` -> `harness` -> `limits` -> `contenders` and
`scale` <-> `scale_ray` were such circles.)"""

from __future__ import annotations

import ast
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def import_graph(scripts: Path) -> dict[str, set[str]]:
    """Module -> the modules of ``scripts`` it imports anywhere in its body, functions included
    (``benchlib.x`` for the package's)."""
    files = {path.stem: path for path in scripts.glob("*.py")}
    files.update({f"benchlib.{path.stem}": path for path in scripts.glob("benchlib/*.py")})
    files.pop("benchlib.__init__", None)
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = node.module or ""
                if node.level:  # relative: inside benchlib
                    module = f"benchlib.{module}"
                imported.add(module)
            elif isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
        graph[name] = {module for module in imported if module in files and module != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, done = [], set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            found.append(path[path.index(name) :] + [name])
            return
        if name in done:
            return
        for child in sorted(graph[name]):
            visit(child, path + [name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])
    return found


def test_the_benchmark_scripts_import_each_other_without_circles():
    graph = import_graph(SCRIPTS)
    assert "benchlib.harness" in graph and "bench" in graph, sorted(graph)
    assert not cycles(graph), cycles(graph)


def test_the_benchmark_machinery_lives_apart_from_the_scripts_a_user_runs():
    machinery = {"harness", "contenders", "limits", "report", "workloads"}
    assert not machinery & {path.stem for path in SCRIPTS.glob("*.py")}
    assert machinery <= {path.stem for path in (SCRIPTS / "benchlib").glob("*.py")}

"""The package's shape: modules import downward only (no cycle, counting imports inside functions)."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "launcher"


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the package's modules it imports anywhere in its file (top level or in a function)."""
    modules = {p.stem for p in package.glob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module in modules:
        for node in ast.walk(ast.parse((package / f"{module}.py").read_text())):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module == "launcher":
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("launcher."):
                names = [node.module.split(".")[1]]
            elif isinstance(node, ast.Import):
                names = [a.name.split(".")[1] for a in node.names if a.name.startswith("launcher.")]
            graph[module] |= {n for n in names if n in modules and n != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_in_the_package():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_cycles(tmp_path):
    (tmp_path / "a.py").write_text("def f():\n    from launcher import b\n")
    (tmp_path / "b.py").write_text("from launcher.c import x\n")
    (tmp_path / "c.py").write_text("import launcher.a\n")
    (tmp_path / "d.py").write_text("from launcher import a\n")
    assert cycles(import_graph(tmp_path)) == [["a", "b", "c"]]


def test_leaf_modules_stay_leaves():
    """What everything reads (errors, the input readers, the architecture table) imports almost nothing."""
    graph = import_graph()
    assert graph["errors"] == set() and graph["userio"] == {"errors"} and graph["archs"] == {"errors"}


def _readme_recipe_rows() -> list[tuple[list[str], str]]:
    """(dotted keys, default column) of each row of README's Recipe table."""
    import re

    text = (ROOT / "README.md").read_text()
    section_text = text.split("## Recipe", 1)[1]
    table = section_text[section_text.index("\n| key") :].strip().split("\n\n")[0]
    rows = []
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        names = re.findall(r"`([^`]+)`", cells[0])
        section = names[0].split(".")[0]
        rows.append(([n if "." in n else f"{section}.{n}" for n in names], cells[1]))
    return rows


def test_readme_recipe_table_matches_the_schema():
    """Every key README's Recipe table names exists, and a single key's stated default is the schema's."""
    from launcher.recipe import Recipe

    rows = _readme_recipe_rows()
    assert len(rows) >= 15
    for keys, default in rows:
        for key in keys:
            section, name = key.split(".")
            assert name in Recipe.model_fields[section].annotation.model_fields, key
        if len(keys) == 1:
            section, name = keys[0].split(".")
            field = Recipe.model_fields[section].annotation.model_fields[name]
            actual = "required" if field.is_required() else field.get_default(call_default_factory=True)
            shown = default.replace("`", "")
            expected = {
                "required" if actual == "required" else None,
                str(actual),
                str(actual).lower(),
                "null" if actual is None else None,
                f"[{', '.join(actual)}]" if isinstance(actual, list) else None,
            }
            assert shown in expected, (key, shown, actual)

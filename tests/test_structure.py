"""The package's shape: layer folders that import downward only, and no module cycle (counting imports
inside functions)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import ROOT

PACKAGE = ROOT / "launcher"
# Bottom to top. A module may import its own layer and the layers below it; the entry points on top
# (cli, trace, train, __main__) may import anything.
LAYERS = ("config", "demo", "plan", "run", "cluster")


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """module ("run.loop", "cli") -> the package's modules it imports anywhere in its file (top level or
    in a function)."""
    files = {".".join(p.relative_to(package).with_suffix("").parts): p for p in package.rglob("*.py")}
    modules = {m.removesuffix(".__init__") for m in files}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module_file, path in files.items():
        module = module_file.removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "launcher":
                base = node.module.removeprefix("launcher").lstrip(".")
                names = [f"{base}.{a.name}".lstrip(".") for a in node.names]
                names = [n if n in modules else base for n in names]  # `from launcher.run import loop` or a name
            elif isinstance(node, ast.Import):
                names = [a.name.removeprefix("launcher.") for a in node.names if a.name.startswith("launcher.")]
            graph[module] |= {n for n in names if n in modules and n != module}
    return graph


def layer(module: str) -> int:
    """Height of a module's layer: its folder's place in LAYERS, the top for the entry points."""
    folder = module.split(".")[0]
    return LAYERS.index(folder) if folder in LAYERS else len(LAYERS)


def upward(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(importer, imported) pairs where a module imports a layer above its own."""
    return sorted((m, n) for m, deps in graph.items() for n in deps if layer(n) > layer(m))


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


def test_layers_import_downward_only():
    graph = import_graph()
    assert {m.split(".")[0] for m in graph if "." in m} == set(LAYERS)  # every folder is a known layer
    assert upward(graph) == []


def test_the_cycle_finder_finds_cycles(tmp_path):
    (tmp_path / "a.py").write_text("def f():\n    from launcher import b\n")
    (tmp_path / "b.py").write_text("from launcher.c import x\n")
    (tmp_path / "c.py").write_text("import launcher.a\n")
    (tmp_path / "d.py").write_text("from launcher import a\n")
    assert cycles(import_graph(tmp_path)) == [["a", "b", "c"]]


def test_the_layer_check_finds_an_upward_import(tmp_path):
    for folder in ("config", "run"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text("")
    (tmp_path / "config" / "recipe.py").write_text("def f():\n    from launcher.run import loop\n")
    (tmp_path / "run" / "loop.py").write_text("from launcher.config.recipe import f\n")
    (tmp_path / "cli.py").write_text("from launcher.run.loop import x\nfrom launcher.config import recipe\n")
    graph = import_graph(tmp_path)
    assert graph["cli"] == {"run.loop", "config.recipe"}
    assert upward(graph) == [("config.recipe", "run.loop")]


def test_leaf_modules_stay_leaves():
    """What everything reads (errors, the input readers, the architecture table) imports almost nothing."""
    graph = import_graph()
    assert graph["config.errors"] == set() and graph["config.userio"] == {"config.errors"}
    assert graph["plan.archs"] == {"config.errors"}


def _recipe_rows(path: Path, heading: str) -> list[tuple[list[str], str]]:
    """(dotted keys, default column) of each row of the recipe table under `heading` in a Markdown file."""
    import re

    text = path.read_text()
    section_text = text.split(heading, 1)[1]
    table = section_text[section_text.index("\n| key") :].strip().split("\n\n")[0]
    rows = []
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        names = re.findall(r"`([^`]+)`", cells[0])
        section = names[0].split(".")[0]
        rows.append(([n if "." in n else f"{section}.{n}" for n in names], cells[1]))
    return rows


@pytest.mark.parametrize("page, heading, least", [("docs/recipe.md", "## Recipe", 15), ("README.md", "## A recipe", 8)])
def test_recipe_tables_match_the_schema(page, heading, least):
    """Every key the docs' and README's recipe tables name exists, and a single key's stated default is
    the schema's."""
    from launcher.config.recipe import Recipe

    rows = _recipe_rows(ROOT / page, heading)
    assert len(rows) >= least
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


def _functions():
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path.relative_to(PACKAGE), node


def test_long_functions_and_wide_signatures_say_why():
    """Over 80 lines: the docstring says why it is one piece ("on purpose"). Over 6 parameters: a docstring
    (each of those says why its values travel separately)."""
    for path, fn in _functions():
        doc = ast.get_docstring(fn) or ""
        if fn.end_lineno - fn.lineno + 1 > 80:
            assert "on purpose" in doc, f"{path}:{fn.lineno} {fn.name} is over 80 lines without saying why"
        a = fn.args
        params = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs if p.arg not in ("self", "cls")]
        if len(params) > 6:
            assert doc, f"{path}:{fn.lineno} {fn.name} takes {len(params)} parameters without a docstring"

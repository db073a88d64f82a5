"""The package's layering, read from the source: ``data`` never imports ``model``, the library never
imports the command line (``model.cli``) nor the scripts (the benchmark and experiments live outside
the installed package), no two modules import each other, directly or in a ring (imports inside
functions included: they hide cycles, they do not remove them); and the rooms stay small (no library
module over 500 lines, no function over 100)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("data", "model", "scripts")
LIBRARY = ("data", "model")  # what setup.py installs
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 100
# `python -m model.convert` and `python -m model.info` must stay where users call them: a command entry point, not library code.
ENTRY_POINTS = {"model.convert", "model.info"}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's own modules that ``path`` imports, anywhere in the file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
            names = [n if n in modules else node.module for n in names]
        else:
            continue
        for name in names:
            while name and name not in modules:  # `import a.b.c` of a name that is not a module: its module
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_data_never_imports_model() -> None:
    bad = {m: sorted(d for d in deps if d.split(".")[0] == "model") for m, deps in _graph().items() if m.split(".")[0] == "data"}
    assert not {m: d for m, d in bad.items() if d}, "data/ is the lower layer"


def test_library_never_imports_the_command_line() -> None:
    def cli(m: str) -> bool:
        return m == "model.cli" or m.startswith("model.cli.")

    library = {m: deps for m, deps in _graph().items() if m.split(".")[0] in LIBRARY}  # scripts are commands too
    bad = {m: sorted(filter(cli, deps)) for m, deps in library.items() if not cli(m) and m not in ENTRY_POINTS}
    assert not {m: d for m, d in bad.items() if d}


def test_the_library_never_imports_the_scripts() -> None:
    bad = {m: sorted(d for d in deps if d.split(".")[0] == "scripts") for m, deps in _graph().items() if m.split(".")[0] in LIBRARY}
    assert not {m: d for m, d in bad.items() if d}, "scripts/ (benchmark, experiments, benches) sits on top of the library"


def test_library_rooms_stay_small() -> None:
    """No library module over MAX_MODULE_LINES lines, no function over MAX_FUNCTION_LINES."""
    too_big = []
    for name, path in _modules().items():
        if name.split(".")[0] not in LIBRARY:
            continue
        text = path.read_text(encoding="utf-8")
        if len(text.splitlines()) > MAX_MODULE_LINES:
            too_big.append(f"{name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
                too_big.append(f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not too_big


def test_no_import_cycles() -> None:
    assert _cycles(_graph()) == []


def test_the_checks_see_what_they_check() -> None:
    """The graph holds the imports inside functions too, and the cycle finder finds a ring."""
    graph = _graph()
    assert "model.plots" in graph["model.annotation"]  # imported inside Annotation.to_plots
    assert "model.novelty.rule" in graph["model.annotation"] and "model.novelty.record" in graph["model.checkpoint.format"]
    assert "model.nn.network" in graph["model.checkpoint.format"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]

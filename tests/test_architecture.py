"""The layering rules of docs/architecture.md, checked on the source: no import cycles (imports inside functions
count), a CLI that imports no heavy module before a command runs, a pipeline that never imports the CLI."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "surgery"


def module_files() -> dict[str, Path]:
    """Dotted module name → file, for every module of the package."""
    files = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        files[".".join(parts)] = path
    return files


def import_graph() -> dict[str, set[str]]:
    """Module → the package's modules it imports anywhere in its file (top level or inside a function).

    ``from package import name`` is an edge to ``package.name`` when that is a module, else to ``package``."""
    files = module_files()

    def owner(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parents = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parents + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            graph[name] |= {owner(t) for t in targets if owner(t) not in (None, name)}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
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


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_counting_imports_inside_functions():
    assert cycles(import_graph()) == []


def test_the_pipeline_never_imports_the_command_line():
    graph = import_graph()
    reachable, todo = set(), ["surgery.pipeline"]
    while todo:
        for other in graph[todo.pop()] - reachable:
            reachable.add(other)
            todo.append(other)
    assert not {name for name in reachable if name == "surgery.cli" or name.startswith("surgery.cli.")}


def test_importing_the_command_line_loads_no_heavy_module():
    """``surgery --version`` and the parsing of any command pay for typer only: torch, triton, transformers and the
    merge methods load when a command that needs them runs."""
    code = ("import sys, surgery.cli; heavy = [m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'triton', 'transformers', 'numpy') or m.startswith(('surgery.merge', 'surgery.quantize'))]; "
            "print(heavy)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_every_command_resolves_to_its_module():
    import click
    import typer

    from surgery.cli import COMMANDS, app

    group = typer.main.get_command(app)
    for name in COMMANDS:
        command = group.get_command(click.Context(group), name)
        assert command is not None and command.name == name, name


def test_the_package_is_typed():
    assert (PACKAGE / "py.typed").is_file()


@pytest.mark.parametrize("name", sorted(module_files()))
def test_every_module_has_a_docstring(name):
    path = module_files()[name]
    if path.read_text().strip():
        assert ast.get_docstring(ast.parse(path.read_text())), f"{path} has no module docstring"


def undocumented(path: Path) -> list[str]:
    """The module-level public functions of ``path`` whose docstring lacks Args (when they take any), Returns
    (or Yields; not needed for ``-> None``) or a usage example (``Example``, ``>>>`` or a ``::`` block)."""
    missing = []
    for node in ast.parse(path.read_text()).body:
        if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
            continue
        doc = ast.get_docstring(node) or ""
        takes = [a for a in node.args.posonlyargs + node.args.args + node.args.kwonlyargs if a.arg not in ("self", "cls")]
        returns_none = isinstance(node.returns, ast.Constant) and node.returns.value is None
        lacks = [what for what, ok in (("Args", not takes or "Args:" in doc),
                                       ("Returns", returns_none or "Returns:" in doc or "Yields:" in doc),
                                       ("an example", "Example" in doc or ">>>" in doc or "::" in doc)) if not ok]
        if lacks:
            missing.append(f"{node.name} ({', '.join(lacks)})")
    return missing


@pytest.mark.parametrize("name", sorted(name for name in module_files() if not name.startswith("surgery.cli")))
def test_every_public_function_has_args_returns_and_an_example(name):
    assert undocumented(module_files()[name]) == []

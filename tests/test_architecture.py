"""The package's import graph has no cycles, counting imports inside functions too: every module
can be read (and loaded) after the modules it uses, none reaches back into its users."""

from __future__ import annotations

import ast
from pathlib import Path

import dualres_ext

PACKAGE = Path(dualres_ext.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _extensions() -> set:
    """Compiled modules (``_C``): imported, importing nothing of the package."""
    return {_module_name(p).split(".cpython")[0].split(".abi3")[0] for p in PACKAGE.rglob("*.so")}


def _imports(name: str, path: Path, known: set) -> set:
    """The package's modules that ``name`` imports anywhere in its body."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # ``from pkg import sub`` imports the submodule when there is one, else pkg itself
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in known else module for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def test_no_import_cycles():
    modules = _modules()
    known = set(modules) | _extensions()
    graph = {name: _imports(name, path, known) for name, path in modules.items()}
    graph.update({name: set() for name in _extensions()})
    state: dict = {}

    def visit(node, trail):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycle = trail[trail.index(nxt) :] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert len(graph) > 10 and graph["dualres_ext.codec"], "the graph was not read"

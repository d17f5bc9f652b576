"""The package's import graph: no module imports itself back, lazily or not."""

import ast
from pathlib import Path

import sklearn_moe

PACKAGE = "sklearn_moe"
ROOT = Path(sklearn_moe.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in ROOT.rglob("*.py")}


def _imported_modules(name: str) -> set[str]:
    """The package modules that ``name`` imports anywhere in its code (function bodies
    included), with the packages a dotted import runs on the way (other than those
    holding ``name``)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            targets = [stem] + [f"{stem}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            parts = target.split(".")
            for end in range(1, len(parts) + 1):  # importing a.b.c runs a, a.b and a.b.c
                candidate = ".".join(parts[:end])
                # the packages holding ``name`` are already being imported when it runs
                if candidate in MODULES and not name.startswith(candidate + "."):
                    found.add(candidate)
    found.discard(name)
    return found


def _cycles(graph: dict) -> list[list[str]]:
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def test_no_import_cycles_inside_the_package():
    # The package's own __init__ imports the public names of everything; chains through it
    # (e.g. a lazy ``from . import __version__``) are not cycles of the modules.
    graph = {name: _imported_modules(name) - {PACKAGE} for name in MODULES if name != PACKAGE}
    assert _cycles(graph) == []


def test_the_cycle_finder_sees_lazy_imports():
    graph = {name: _imported_modules(name) for name in MODULES}
    assert "sklearn_moe.persistence" in graph["sklearn_moe._base"]  # imported inside save()
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]

"""The shm subpackage's modules form layers: no module imports, even lazily
or only for type checking, a module that (transitively) imports it back."""

from __future__ import annotations

import ast
from pathlib import Path

import aiokvpipe.shm

PACKAGE = Path(aiokvpipe.shm.__file__).parent


def _shm_imports(path: Path) -> set[str]:
    """The sibling modules ``path`` imports anywhere in its source."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:  # from .x import y / from . import x
                if node.module:
                    found.add(node.module.split(".")[0])
                else:
                    found.update(alias.name for alias in node.names)
            elif node.module and node.module.startswith("aiokvpipe.shm."):
                found.add(node.module.split(".")[2])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("aiokvpipe.shm."):
                    found.add(alias.name.split(".")[2])
    return found


def test_shm_modules_import_without_cycles() -> None:
    modules = {p.stem: p for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    graph = {name: _shm_imports(path) & modules.keys() for name, path in modules.items()}
    assert graph["io"] >= {"endpoint", "ring"}, "the walker sees io's imports"

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(nxt == goal or reaches(nxt, goal, seen | {nxt}) for nxt in graph[start] - seen)

    cycles = sorted(name for name in graph if reaches(name, name, set()))
    assert not cycles, f"modules on an import cycle: {cycles} ({graph})"

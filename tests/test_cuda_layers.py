"""The layer rule for ``cuda/``: it sits below ``transport/`` and never imports it."""

from __future__ import annotations

import ast
from pathlib import Path

import aiokvpipe.cuda

CUDA_DIR = Path(aiokvpipe.cuda.__file__).parent


def _imports(path: Path) -> list[str]:
    """Absolute names of every module ``path`` imports (relative ones resolved)."""
    package = ["aiokvpipe", "cuda"]
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            names.append(module)
            names.extend(f"{module}.{alias.name}" for alias in node.names)
    return names


def test_cuda_never_imports_the_transport_layer() -> None:
    offenders = {
        path.name: name
        for path in sorted(CUDA_DIR.glob("*.py"))
        for name in _imports(path)
        if name == "aiokvpipe.transport" or name.startswith("aiokvpipe.transport.")
    }
    assert not offenders, f"cuda/ imports the layer above it: {offenders}"

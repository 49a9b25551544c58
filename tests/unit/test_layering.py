"""The package graph has no cycles, and the engine's docstring states the order its code applies."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import plait.engine
from plait.engine import Engine

ROOT = Path(plait.engine.__file__).parent


def _package_imports() -> dict[str, set[str]]:
    """plait's top-level packages (and modules) -> those they import, anywhere in a file (TYPE_CHECKING too)."""
    edges: dict[str, set[str]] = {}
    for file in ROOT.rglob("*.py"):
        source = file.relative_to(ROOT).parts[0].removesuffix(".py")
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                parts = name.split(".")
                if len(parts) > 1 and parts[0] == "plait" and parts[1] != source and source != "__init__":
                    edges.setdefault(source, set()).add(parts[1])
    return edges


def test_no_package_imports_another_that_imports_it_back() -> None:
    edges = _package_imports()
    cycles = sorted(f"plait.{a} <-> plait.{b}" for a in edges for b in edges[a] if a < b and a in edges.get(b, ()))
    assert not cycles, f"package cycles: {cycles}; move the shared code below both packages"


def test_the_engine_docstring_states_the_order_the_strands_apply() -> None:
    code = inspect.getsource(Engine.__init__)
    steps = {
        "TP": "_apply_tp(",
        "recompute": "apply_recompute(",
        "PP split": "build_pipeline(",
        "compile": "apply_compile(",
        "ZeRO/DP": "build_data_parallel(",
    }
    applied = sorted(steps, key=lambda name: code.index(steps[name]))
    assert " -> ".join(applied) in " ".join(plait.engine.__doc__.split())

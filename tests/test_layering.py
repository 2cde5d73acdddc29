"""The layering docs/architecture.md promises: formats and injector import neither each other
nor applier; applier may import both."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.procs import REPO

FORBIDDEN = {"formats": {"injector", "applier"}, "injector": {"formats", "applier"}}


def _imports(path: Path) -> set[str]:
    """Top-level package names a module imports (lazy imports inside functions too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_lower_layers_stay_apart(package: str) -> None:
    """No module of formats/ or injector/ imports the other package or applier."""
    modules = sorted((REPO / package).rglob("*.py"))
    assert modules
    bad = {str(m.relative_to(REPO)): sorted(_imports(m) & FORBIDDEN[package]) for m in modules}
    assert {m: names for m, names in bad.items() if names} == {}


def test_the_check_can_fail() -> None:
    """The import scanner sees ``from applier.x import y`` inside a function."""
    sample = REPO / "tests" / "test_layering.py"
    assert "tests" in _imports(sample) and "ast" in _imports(sample)

"""Shared fixtures. Real-process helpers live in ``tests/procs.py``."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.procs import Target, build_c, spawn

# The project's clone sits next to shared/ (on developer machines and in CI alike).
SHARED = Path(os.environ.get("APPLIER_SHARED", Path(__file__).resolve().parents[2] / "shared"))
GOLDEN = SHARED / "criu-golden" / "basic-criu-4.2"


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """The real CRIU 4.2 dump shipped in ../shared/criu-golden/."""
    if not GOLDEN.exists():
        pytest.fail(f"golden images missing: {GOLDEN}")
    return GOLDEN


@pytest.fixture
def target() -> Iterator[Target]:
    """A running tests/targets/apply_target.c, idle in read(); killed (by pid) afterwards.
    Test files whose target is another program define their own ``target``."""
    with spawn(build_c("apply_target.c")) as t:
        t.expect("ready")
        t.wait_in_syscall(0)
        yield t

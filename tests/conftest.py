"""Shared fixtures. Real-process helpers live in ``tests/procs.py``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.procs import Target, build_c, spawn

# Real CRIU 4.2 dumps kept in the repository (tests/data/README.md says what they hold).
DATA = Path(__file__).resolve().parent / "data"
GOLDEN = DATA / "basic-criu-4.2"
GOLDEN_STATE = DATA / "state-criu-4.2"


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """The real CRIU 4.2 dump of memory and threads (tests/data/basic-criu-4.2)."""
    return GOLDEN


@pytest.fixture(scope="session")
def golden_state_dir() -> Path:
    """The real CRIU 4.2 dump of descriptors, signals and timers (tests/data/state-criu-4.2)."""
    return GOLDEN_STATE


@pytest.fixture
def target() -> Iterator[Target]:
    """A running tests/targets/apply_target.c, idle in read(); killed (by pid) afterwards.
    Test files whose target is another program define their own ``target``."""
    with spawn(build_c("apply_target.c")) as t:
        t.expect("ready")
        t.wait_in_syscall(0)
        yield t

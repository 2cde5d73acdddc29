"""Checkpoint / pytest plugin: one checkpoint, many in-place resets of a live process."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from applier.api import apply
from applier.errors import MismatchError
from applier.fixture import Checkpoint
from tests.live_state import assert_same, command, snapshot
from tests.procs import Target, assert_untouched

pytestmark = pytest.mark.live


def userfaultfds(pid: int | str) -> int:
    """How many userfaultfd descriptors the process holds."""
    fds = Path(f"/proc/{pid}/fd")
    found = 0
    for fd in os.listdir(fds):
        with contextlib.suppress(FileNotFoundError):  # listdir's own descriptor, closed since
            found += os.readlink(fds / fd) == "anon_inode:[userfaultfd]"
    return found


def test_checkpoint_restores_many_times_and_cleans_up(target: Target) -> None:
    """take, then scribble/restore three times: equal each time; close leaves nothing behind.
    The tracker's userfaultfd is this process's, never the target's."""
    (checksum,) = command(target, "sum", "sum")
    own = userfaultfds("self")
    with Checkpoint.take(target.pid) as cp:
        at_checkpoint = snapshot(target.pid)
        assert cp.tracked and userfaultfds(target.pid) == 0
        assert userfaultfds("self") == own + 1
        for _ in range(3):
            command(target, "scribble", "done")
            stats = cp.restore()
            assert stats.verified and stats.pages_written > 0
            assert_same(at_checkpoint, snapshot(target.pid))
            assert command(target, "sum", "sum") == [checksum]
        path = cp.path
    assert cp.restores == 3 and not path.exists()
    assert userfaultfds(target.pid) == 0 and userfaultfds("self") == own
    assert_untouched(target)
    with pytest.raises(ValueError, match="closed"):
        cp.restore()


def test_plugin_fixture(applier_checkpoint: Callable[[int], Checkpoint], target: Target) -> None:
    """The pytest plugin's factory checkpoints once per pid and restores in place."""
    cp = applier_checkpoint(target.pid)
    assert applier_checkpoint(target.pid) is cp
    (checksum,) = command(target, "sum", "sum")
    command(target, "touch", "touched")
    assert command(target, "sum", "sum") != [checksum]
    cp.restore()
    assert command(target, "sum", "sum") == [checksum]
    cp.close()  # the target dies with this test; the session-end close must not mind


def test_dry_runs_and_refusals_leak_no_descriptors(target: Target) -> None:
    """apply --only-dirty resumes the tracker; dry runs and refused plans release it again."""
    with Checkpoint.take(target.pid) as cp:
        command(target, "touch", "touched")
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(3):
            result = apply(cp.path, target.pid, only_dirty=True, dry_run=True)
            assert result.dry_run and result.dirty_source == "tracker:uffd-wp"
        command(target, "threads 1", "threads")  # now refused in the session (thread count)
        for _ in range(3):
            with pytest.raises(MismatchError, match="threads"):
                apply(cp.path, target.pid, only_dirty=True)
        assert len(os.listdir("/proc/self/fd")) == before
        # the tracker still works afterwards (registers left out: the thread counts differ)
        assert cp.restore(parts=["memory", "brk"]).pages_written > 0
    assert_untouched(target)

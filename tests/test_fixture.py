"""Checkpoint / pytest plugin: one checkpoint, many in-place resets of a live process."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from applier import executor as execute
from applier.api import apply, recover
from applier.errors import MismatchError, RollbackFailed
from applier.fixture import Checkpoint
from applier.journal import Journal
from applier.plan.steps import SetRegs, Step
from injector import NoSuchProcess, attach
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
        for verify in (False, True, False):
            command(target, "scribble", "done")
            stats = cp.restore(verify=verify)
            assert stats.verified == verify and stats.pages_written > 0
            assert_same(at_checkpoint, snapshot(target.pid))
            assert command(target, "sum", "sum") == [checksum]
        path = cp.path
    assert cp.restores == 3 and not path.exists()
    assert userfaultfds(target.pid) == 0 and userfaultfds("self") == own
    assert_untouched(target)
    with pytest.raises(ValueError, match="closed"):
        cp.restore()


def test_a_failed_restore_rolls_forward(target: Target, monkeypatch: pytest.MonkeyPatch) -> None:
    """A restore whose first attempt fails part-way (after its pages were written) applies
    the checkpoint again: the process ends at the checkpoint, running and untraced. When
    the second attempt fails too, it is held with a journal and ``recover`` finishes it."""

    real = execute.Executor._do
    failures = [1]

    def failing(self: execute.Executor, step: Step) -> None:
        if isinstance(step, SetRegs) and failures[0] > 0:
            failures[0] -= 1
            raise OSError(5, "injected failure")
        real(self, step)

    with Checkpoint.take(target.pid) as cp:
        at_checkpoint = snapshot(target.pid)
        monkeypatch.setattr(execute.Executor, "_do", failing)
        command(target, "scribble", "done")
        stats = cp.restore()
        assert failures == [0] and stats.verified  # the second attempt verifies
        assert_same(at_checkpoint, snapshot(target.pid))
        assert_untouched(target)
        assert Journal.find(target.pid) is None

        failures[0] = 2
        command(target, "scribble", "done")
        with pytest.raises(RollbackFailed, match=f"applier recover {target.pid}"):
            cp.restore()
        assert Journal.find(target.pid) is not None
        with open(f"/proc/{target.pid}/stat") as fh:
            assert fh.read().rsplit(")", 1)[1].split()[0] == "T"  # held
        recover(target.pid)
        assert Journal.find(target.pid) is None
        assert_same(at_checkpoint, snapshot(target.pid))
        assert_untouched(target)
        command(target, "scribble", "done")
        cp.restore()
        assert_same(at_checkpoint, snapshot(target.pid))


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
        # A new thread keeps its registers without "regs", and the layout would take its
        # stack away: refused in the session.
        command(target, "threads 1", "threads")
        for i in range(4):
            with pytest.raises(MismatchError, match="would crash"):
                apply(cp.path, target.pid, only_dirty=True, parts=["memory", "layout", "brk"])
            if i == 0:
                # the first apply leaves the undo spool's memfd in its pool, for the next one
                # (applier.undo.log): one descriptor, then no more
                assert len(os.listdir("/proc/self/fd")) <= before + 1
                before = len(os.listdir("/proc/self/fd"))
        assert len(os.listdir("/proc/self/fd")) == before
        # the tracker still works afterwards (registers left out: the thread stays)
        assert cp.restore(parts=["memory", "brk"]).pages_written > 0
    assert_untouched(target)


XMM = slice(160, 416)  # xmm0-15 in the XSAVE area's legacy part


def test_restores_put_the_sse_registers_back_every_time(target: Target) -> None:
    """xmm0 changed behind the target's back (it sits in read(), so nothing else changes
    them) is the checkpoint's again after a restore, and after a second one: each restore
    lays the same image thread's FP state over a new live buffer."""
    with Checkpoint.take(target.pid) as cp:
        target.wait_in_syscall(0)
        with attach(target.pid) as s:
            saved = s.get_xstate(target.pid)
        for fill in (0xAB, 0x5C):
            with attach(target.pid) as s:
                spoiled = bytearray(s.get_xstate(target.pid))
                spoiled[XMM.start : XMM.start + 16] = bytes([fill]) * 16
                s.set_xstate(target.pid, bytes(spoiled))
                assert s.get_xstate(target.pid)[XMM] != saved[XMM]
            cp.restore()
            target.wait_in_syscall(0)
            with attach(target.pid) as s:
                got = s.get_xstate(target.pid)
            assert got[XMM] == saved[XMM]
            assert got[:32] == saved[:32]  # control and status words, MXCSR
    assert_untouched(target)
    assert command(target, "sum", "sum")


def test_a_restore_of_a_target_that_died_says_so(target: Target) -> None:
    """The target killed after its checkpoint: a restore raises NoSuchProcess, one line that
    names the pid (no traceback of a /proc read), and closing the checkpoint still works."""
    cp = Checkpoint.take(target.pid)
    try:
        command(target, "scribble", "done")
        target.kill()
        with pytest.raises(NoSuchProcess) as info:
            cp.restore()
        assert f"pid {target.pid}" in str(info.value) and "\n" not in str(info.value)
    finally:
        cp.close()
    assert not cp.path.exists()

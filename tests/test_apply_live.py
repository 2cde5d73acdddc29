"""applier apply on real processes: dump, change, apply, compare byte for byte."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from applier import executor as execute
from applier.api import apply, diff
from applier.dump import dump
from applier.errors import ApplyFailed, MismatchError, TargetGone
from applier.plan import SetRegs, Step, WritePages
from formats.errors import ImageError
from injector import attach
from injector.errors import NoSuchProcess
from tests.live_state import assert_same, checkpoint, command, snapshot
from tests.procs import Target, assert_untouched, build_c, spawn

pytestmark = pytest.mark.live


def test_apply_reverts_memory_layout_brk_and_registers(target: Target, tmp_path: Path) -> None:
    """After scribbling on everything, apply makes the process equal to its checkpoint."""
    image, before, checksum = checkpoint(target, tmp_path)
    command(target, "scribble", "done")
    changed = snapshot(target.pid)
    assert changed.layout != before.layout and changed.brk != before.brk
    result = apply(image, target.pid)
    assert result.stats.verified and result.stats.layout_changes > 0
    assert_untouched(target)
    assert_same(before, snapshot(target.pid))
    assert command(target, "sum", "sum") == [checksum]  # keeps running, memory is the old one
    assert command(target, "sum", "sum") == [checksum]


def test_apply_multithreaded_with_threads_blocked_in_syscalls(
    target: Target, tmp_path: Path
) -> None:
    """Eight threads sleeping or blocked in read(): registers restored, all keep working."""
    command(target, "threads 8", "threads")
    image, before, checksum = checkpoint(target, tmp_path)
    assert len(before.regs) == 9
    command(target, "scribble", "done")
    result = apply(image, target.pid)
    assert result.stats.threads == 9
    assert_same(before, snapshot(target.pid))
    assert_untouched(target)
    assert command(target, "sum", "sum") == [checksum]


def test_only_dirty_writes_only_changed_pages(target: Target, tmp_path: Path) -> None:
    """--only-dirty compares page by page and skips the pages that did not change."""
    image, before, checksum = checkpoint(target, tmp_path)
    command(target, "scribble", "done")
    result = apply(image, target.pid, only_dirty=True)
    st = result.stats
    assert st.pages_skipped > 0 and st.pages_written > 0
    assert st.pages_written + st.pages_skipped == result.plan.pages_to_write
    assert_same(before, snapshot(target.pid))
    assert command(target, "sum", "sum") == [checksum]


def test_tracked_dump_makes_only_dirty_write_just_the_written_pages(
    target: Target, tmp_path: Path
) -> None:
    """dump --track + apply --only-dirty: the tracker names the pages; two cycles in a row."""

    image = tmp_path / "tracked"
    (checksum,) = command(target, "sum", "sum")
    stats = dump(target.pid, image, track=True)
    assert stats.tracking == "uffd-wp"
    before = snapshot(target.pid)
    for _ in range(2):
        command(target, "scribble", "done")
        result = apply(image, target.pid, only_dirty=True)
        assert result.dirty_source == "tracker:uffd-wp"
        full = apply(image, target.pid, dry_run=True).plan.pages_to_write
        assert 0 < result.stats.pages_written < full
        got = snapshot(target.pid)
        assert got.memory == before.memory and got.layout == before.layout
        assert command(target, "sum", "sum") == [checksum]
    assert_untouched(target)


def test_dry_run_and_diff_change_nothing(target: Target, tmp_path: Path) -> None:
    """diff and --dry-run print a plan and leave every byte of the target as it was."""
    image, _, _ = checkpoint(target, tmp_path)
    command(target, "scribble", "done")
    changed = snapshot(target.pid)
    plan = diff(image, target.pid)
    assert plan.pages_to_write > 0 and plan.summary()["layout_changes"] > 0
    result = apply(image, target.pid, dry_run=True)
    assert result.dry_run and result.stats.pages_written == 0
    assert_same(changed, snapshot(target.pid))
    assert_untouched(target)


def test_corrupt_image_is_refused_before_any_write(target: Target, tmp_path: Path) -> None:
    """A truncated pagemap: one ImageError, the target untouched and running."""
    image, _, _ = checkpoint(target, tmp_path)
    command(target, "scribble", "done")
    changed = snapshot(target.pid)
    pm = image / f"pagemap-{target.pid}.img"
    pm.write_bytes(pm.read_bytes()[:-3])
    with pytest.raises(ImageError, match=f"pagemap-{target.pid}.img"):
        apply(image, target.pid)
    assert_same(changed, snapshot(target.pid))
    assert_untouched(target)


def test_image_of_another_process_is_refused(target: Target, tmp_path: Path) -> None:
    """Same program, other process (other ASLR layout): refused as a mismatch, nothing written."""
    image, _, _ = checkpoint(target, tmp_path)
    with spawn(build_c("apply_target.c")) as other:
        other.expect("ready")
        other.wait_in_syscall(0)
        before = snapshot(other.pid)
        with pytest.raises(MismatchError):
            apply(image, other.pid)
        assert_same(before, snapshot(other.pid))
        assert_untouched(other)


def test_failure_mid_apply_rolls_back_everything(
    target: Target, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step that fails after layout and pages changed: the target is put back exactly."""

    image, _, _ = checkpoint(target, tmp_path)
    command(target, "scribble", "done")
    changed = snapshot(target.pid)
    real = execute.Executor._do
    calls: list[Any] = []

    def failing(self: execute.Executor, step: Step) -> None:
        calls.append(step)
        if isinstance(step, SetRegs):
            raise OSError(5, "injected failure")
        real(self, step)

    monkeypatch.setattr(execute.Executor, "_do", failing)
    with pytest.raises(ApplyFailed, match="rolled back"):
        apply(image, target.pid)
    assert any(isinstance(s, WritePages) for s in calls)
    assert_same(changed, snapshot(target.pid))
    assert_untouched(target)


def test_target_that_exits_mid_apply_gives_a_clear_error(
    target: Target, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The target killed between two steps: an error naming the pid, no hang, no traceback."""

    image, _, _ = checkpoint(target, tmp_path)
    command(target, "scribble", "done")
    real = execute.Executor._do

    def killing(self: execute.Executor, step: Step) -> None:
        if isinstance(step, WritePages):
            os.kill(target.pid, 9)
        real(self, step)

    monkeypatch.setattr(execute.Executor, "_do", killing)
    with pytest.raises(TargetGone, match=f"pid {target.pid} exited during the apply"):
        apply(image, target.pid)


def test_no_such_process() -> None:
    """A pid that does not exist: NoSuchProcess before anything else happens."""
    with pytest.raises(NoSuchProcess), attach(2**22 + 1):
        pass

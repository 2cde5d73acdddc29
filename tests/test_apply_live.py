"""applier apply on real processes: dump, change, apply, compare byte for byte."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from applier import execute
from applier.api import apply, diff
from applier.dump import dump
from applier.errors import ApplyFailed, MismatchError, TargetGone
from applier.model import Kind
from applier.plan import SetRegs, WritePages
from applier.regs import gpregs_values, restart_adjusted
from applier.sides import region_from_mapping
from formats.errors import ImageError
from formats.imagedir import ImageDir
from injector import attach
from injector.errors import NoSuchProcess
from tests.procs import Target, assert_untouched, build_c, spawn

pytestmark = pytest.mark.live
PTRACE_GET_RSEQ_CONFIGURATION = 0x420F


@attrs.frozen
class Snapshot:
    """Everything apply promises to restore, read from a stopped target."""

    layout: tuple[tuple[int, int, int, str, str | None, int], ...]
    memory: dict[int, bytes]
    regs: dict[int, dict[str, int]]
    brk: int


def snapshot(pid: int) -> Snapshot:
    """Layout, private memory (all of it, unreadable pages too), registers and break.

    Registers of a thread stopped inside a restartable syscall are taken as the values that
    restart it (what apply sets), so a thread that re-entered the same call compares equal.
    """
    with attach(pid) as s:
        layout, memory = [], {}
        for m in s.maps():
            r = region_from_mapping(m)
            if r.kind is Kind.SPECIAL:
                continue
            layout.append((r.start, r.end, r.prot, r.kind.value, r.path, r.offset))
            if r.kind.private:
                memory[r.start] = s.read(r.start, r.end - r.start)
        regs = {}
        for tid in s.tids:
            mask_rseq(memory, tid)
            values = s.get_regs(tid).as_dict()
            regs[tid] = restart_adjusted(values)[0]
        brk = s.syscall(12, 0)
    return Snapshot(tuple(layout), memory, regs, brk)


def mask_rseq(memory: dict[int, bytes], tid: int) -> None:
    """Zero the kernel-owned fields of the thread's rseq area (cpu_id_start, cpu_id, node_id,
    mm_cid): the kernel rewrites them whenever the thread returns to user mode on another CPU."""
    conf = (ctypes.c_uint64 * 3)()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    if libc.ptrace(PTRACE_GET_RSEQ_CONFIGURATION, tid, ctypes.sizeof(conf), conf) <= 0:
        return
    addr = int(conf[0])
    for start, data in memory.items():
        if start <= addr < start + len(data):
            buf = bytearray(data)
            off = addr - start
            buf[off : off + 8] = bytes(8)
            buf[off + 20 : off + 28] = bytes(8)
            memory[start] = bytes(buf)


def assert_same(want: Snapshot, got: Snapshot) -> None:
    """Layout, break, registers and every private byte equal (first difference named)."""
    assert got.layout == want.layout
    assert got.brk == want.brk
    for tid, values in want.regs.items():
        differ = {k: (v, got.regs[tid][k]) for k, v in values.items() if got.regs[tid][k] != v}
        assert not differ, f"thread {tid} registers differ: {differ}"
    for start, data in want.memory.items():
        other = got.memory[start]
        if other != data:
            i = next(k for k in range(len(data)) if data[k] != other[k])
            pytest.fail(f"memory differs at {start + i:#x}: {data[i]:#x} != {other[i]:#x}")


def command(t: Target, line: str, key: str) -> list[str]:
    """Send a command, read its answer, wait until the target is idle in read() again."""
    t.send(line)
    words = t.expect(key)
    t.wait_in_syscall(0)
    return words


@pytest.fixture
def target() -> Iterator[Target]:
    with spawn(build_c("apply_target.c")) as t:
        t.expect("ready")
        t.wait_in_syscall(0)
        yield t


def checkpoint(t: Target, tmp_path: Path) -> tuple[Path, Snapshot, str]:
    """Dump the target; the expected state is its memory now and the registers of the image.

    (Registers come from the image because every stop and resume of a thread sleeping in
    clock_nanosleep turns its saved call into restart_syscall.)
    """

    (checksum,) = command(t, "sum", "sum")
    image = tmp_path / "checkpoint"
    dump(t.pid, image)
    snap = snapshot(t.pid)
    img = ImageDir.open(image)
    regs = {}
    for tid in snap.regs:
        info = img.core(tid).thread_info
        assert info is not None
        regs[tid] = restart_adjusted(gpregs_values(info.gpregs))[0]
    return image, attrs.evolve(snap, regs=regs), checksum


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

    def failing(self: execute.Executor, step: object) -> None:
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

    def killing(self: execute.Executor, step: object) -> None:
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

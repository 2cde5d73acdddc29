"""State of a live target that apply promises to restore, read and compared byte for byte
(shared by the live apply tests)."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from pathlib import Path

import attrs
import pytest

from applier.capture import region_from_mapping
from applier.dump import dump
from applier.model import Kind, merge_regions
from applier.regs import gpregs_values, restart_adjusted
from formats.imagedir import ImageDir
from injector import attach
from tests.procs import Target

__all__ = ["Snapshot", "assert_same", "checkpoint", "command", "mask_rseq", "snapshot"]

PTRACE_GET_RSEQ_CONFIGURATION = 0x420F


@attrs.frozen
class Snapshot:
    """Everything apply promises to restore, read from a stopped target."""

    layout: tuple[tuple[int, int, int, str, str | None, int], ...]
    memory: dict[int, bytes]
    regs: dict[int, dict[str, int]]
    brk: int


def snapshot(pid: int, *, unread: Sequence[int] = ()) -> Snapshot:
    """Layout, private memory (all of it, unreadable pages too), registers and break.

    Regions (merged like the planner's) starting at an address in ``unread`` are left out of
    ``memory`` (reading makes pages present: the zero page).

    Registers of a thread stopped inside a restartable syscall are taken as the values that
    restart it (what apply sets), so a thread that re-entered the same call compares equal.
    """
    with attach(pid) as s:
        layout, memory = [], {}
        # Merged as the planner merges them: the kernel may keep two adjacent VMAs of the same
        # kind and protection apart (different anon_vma), which no program can observe.
        regions = merge_regions(region_from_mapping(m) for m in s.maps())
        for r in regions:
            if r.kind is Kind.SPECIAL:
                continue
            layout.append((r.start, r.end, r.prot, r.kind.value, r.path, r.offset))
            if r.kind.private and r.start not in unread:
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


def dumped_state(pid: int, image: Path) -> Snapshot:
    """Dump ``pid`` into ``image``; the expected state is its memory now and the registers of
    the image (what apply sets).

    (Registers come from the image because every stop and resume of a thread sleeping in
    clock_nanosleep turns its saved call into restart_syscall.)
    """
    dump(pid, image)
    snap = snapshot(pid)
    img = ImageDir.open(image)
    regs = {}
    for tid in snap.regs:
        info = img.core(tid).thread_info
        assert info is not None
        regs[tid] = restart_adjusted(gpregs_values(info.gpregs))[0]
    return attrs.evolve(snap, regs=regs)


def checkpoint(t: Target, tmp_path: Path) -> tuple[Path, Snapshot, str]:
    """The target's checksum, then ``dumped_state`` into ``tmp_path/checkpoint``."""
    (checksum,) = command(t, "sum", "sum")
    image = tmp_path / "checkpoint"
    return image, dumped_state(t.pid, image), checksum

"""What the applier does inside the target besides writing pages: system calls run there by
injection (map a region at its old address, open and map a file, set the mm fields), and the
rollback that replays an undo log."""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import attrs
import numpy as np
import numpy.typing as npt

from applier.errors import MismatchError
from applier.model import Kind, Region
from applier.undo import (
    SavedRange,
    UndoBrk,
    UndoLog,
    UndoMapping,
    UndoMm,
    UndoPages,
    UndoPageTable,
    UndoProtect,
    UndoRecord,
    UndoRegs,
    UndoUnmap,
)

__all__ = ["SessionLike", "map_region", "rollback", "scratch_memory", "set_mm_map"]

SYS_mmap, SYS_mprotect, SYS_munmap, SYS_brk = 9, 10, 11, 12
SYS_madvise, SYS_close, SYS_prctl, SYS_openat = 28, 3, 157, 257
MAP_PRIVATE, MAP_ANONYMOUS, MAP_FIXED, MAP_GROWSDOWN = 0x2, 0x20, 0x10, 0x100
MAP_FIXED_NOREPLACE = 0x100000
MADV_DONTNEED = 4
AT_FDCWD = -100
O_RDONLY, O_CLOEXEC = 0, 0o2000000
PR_SET_MM = 35


class SessionLike(Protocol):
    """What the executor needs of ``injector.Session``."""

    pid: int

    def syscall(self, nr: int, *args: int, tid: int | None = None) -> int: ...
    def read(self, addr: int, size: int) -> bytes: ...
    def read_into(self, addr: int, buffer: memoryview) -> None: ...
    def read_runs(self, runs: Sequence[tuple[int, memoryview]]) -> None: ...
    def read_iov(self, local: npt.NDArray[np.uint64], remote: npt.NDArray[np.uint64]) -> None: ...
    def write_iov(self, local: npt.NDArray[np.uint64], remote: npt.NDArray[np.uint64]) -> None: ...
    def write(self, addr: int, data: bytes | memoryview) -> None: ...
    def write_runs(self, runs: Sequence[tuple[int, bytes | memoryview]]) -> None: ...
    def page_flags(self, start: int, end: int) -> Any: ...
    def get_regs(self, tid: int) -> Any: ...
    def set_regs(self, tid: int, regs: Any) -> None: ...
    def get_xstate(self, tid: int) -> bytes: ...
    def rseq_config(self, tid: int) -> tuple[int, int, int] | None: ...
    def set_xstate(self, tid: int, data: bytes) -> None: ...


def map_region(s: SessionLike, region: Region) -> None:
    """Create ``region`` in the target at its exact address (never over an existing mapping)."""
    length = region.end - region.start
    if region.kind is Kind.ANON:
        flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE
        if region.growsdown:
            flags |= MAP_GROWSDOWN
        got = s.syscall(SYS_mmap, region.start, length, region.prot, flags, -1 & 0xFFFFFFFF, 0)
    elif region.kind is Kind.FILE:
        got = _map_file(s, region)
    else:
        raise MismatchError(f"cannot re-create {region.describe()}")
    if got != region.start:
        raise MismatchError(f"mmap placed {region.describe()} at {got:#x}")


@contextlib.contextmanager
def scratch_memory(s: SessionLike, data: bytes) -> Iterator[int]:
    """``data`` in a fresh anonymous mapping of the target, for syscalls that take a pointer;
    unmapped afterwards."""
    length = (len(data) + 4095) // 4096 * 4096
    addr = s.syscall(SYS_mmap, 0, length, 3, MAP_PRIVATE | MAP_ANONYMOUS, -1 & 0xFFFFFFFF, 0)
    try:
        s.write(addr, data)
        yield addr
    finally:
        s.syscall(SYS_munmap, addr, length)


# struct prctl_mm_map (include/uapi/linux/prctl.h): 11 u64 bounds, auxv pointer, auxv_size,
# exe_fd. auxv NULL/0 and exe_fd -1 leave the saved auxv and /proc/PID/exe as they are.
_MM_MAP_ORDER = (
    "mm_start_code", "mm_end_code", "mm_start_data", "mm_end_data", "mm_start_brk", "brk",
    "mm_start_stack", "mm_arg_start", "mm_arg_end", "mm_env_start", "mm_env_end",
)  # fmt: skip


PR_SET_MM_MAP = 14


def set_mm_map(s: SessionLike, fields: dict[str, int]) -> None:
    """prctl(PR_SET_MM, PR_SET_MM_MAP) with ``fields``; the program break stays where it is
    now (brk is the brk step's business)."""
    values = {**fields, "brk": s.syscall(SYS_brk, 0)}
    blob = struct.pack("<11QQII", *(values[n] for n in _MM_MAP_ORDER), 0, 0, 0xFFFFFFFF)
    with scratch_memory(s, blob) as addr:
        s.syscall(SYS_prctl, PR_SET_MM, PR_SET_MM_MAP, addr, len(blob), 0)


def _map_file(s: SessionLike, region: Region) -> int:
    """openat + mmap + close inside the target, with the path in a scratch page."""
    path = (region.path or "").encode() + b"\0"
    with scratch_memory(s, path) as scratch:
        fd = s.syscall(SYS_openat, AT_FDCWD & ((1 << 64) - 1), scratch, O_RDONLY | O_CLOEXEC, 0)
        try:
            return s.syscall(
                SYS_mmap,
                region.start,
                region.end - region.start,
                region.prot,
                MAP_PRIVATE | MAP_FIXED_NOREPLACE,
                fd,
                region.offset,
            )
        finally:
            s.syscall(SYS_close, fd)


def rollback(s: SessionLike, undo: UndoLog) -> None:
    """Replay the undo log newest first. Raises on the first inverse that fails."""
    records: list[UndoRecord] = list(reversed(undo.records))
    for rec in records:
        if isinstance(rec, UndoPages):
            _restore_pages(s, undo, rec.ranges)
        elif isinstance(rec, UndoPageTable):
            undo.restore_table(rec, s.write_iov)
        elif isinstance(rec, UndoMapping):
            s.syscall(SYS_munmap, rec.start, rec.end - rec.start)
        elif isinstance(rec, UndoUnmap):
            region = attrs.evolve(rec.region, prot=rec.region.prot)
            map_region(s, region)
            _restore_pages(s, undo, rec.pages)
        elif isinstance(rec, UndoProtect):
            s.syscall(SYS_mprotect, rec.start, rec.end - rec.start, rec.prot)
        elif isinstance(rec, UndoBrk):
            s.syscall(SYS_brk, rec.brk)
        elif isinstance(rec, UndoMm):
            set_mm_map(s, dict(rec.values))
        elif isinstance(rec, UndoRegs):
            if rec.xstate is not None:
                s.set_xstate(rec.tid, rec.xstate)
            s.set_regs(rec.tid, rec.regs)
    undo.records.clear()


def _restore_pages(s: SessionLike, undo: UndoLog, ranges: tuple[SavedRange, ...]) -> None:
    for addr, data in undo.iter_saved(ranges):
        s.write(addr, data)

"""Dirty tracking with the kernel's soft-dirty bits (``CONFIG_MEM_SOFT_DIRTY``, x86_64 only).

Follows ``Documentation/admin-guide/mm/soft-dirty.rst``: writing ``4`` to
``/proc/PID/clear_refs`` clears the bits of every page (and write-protects them); a later
write sets bit 55 of the page's ``/proc/PID/pagemap`` entry. Mappings created after the clear
carry ``VM_SOFTDIRTY`` and report every page dirty, which is the conservative answer the
interface wants. Like CRIU's pre-dump, it does not see a page dropped by ``MADV_DONTNEED``
(its entry reads "not present, not soft-dirty").

Many kernels lack it (not configured, or arm64): :func:`probe_soft_dirty` measures on a page of
this process instead of trusting a config file, and the auto choice skips it when absent.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from injector.maps import PAGEMAP_SOFT_DIRTY, read_page_flags
from injector.process import Process
from injector.procfs import read_start_time
from injector.tracking.base import (
    PAGE_SIZE,
    DirtyTracker,
    PageArray,
    Range,
    TrackerLost,
    TrackerState,
    TrackingError,
    intersect,
    normalise,
    tracked_ranges,
)

__all__ = ["SoftDirtyTracker", "probe_soft_dirty"]

CLEAR_SOFT_DIRTY = b"4"
# 256 Ki entries (2 MiB of pagemap, 1 GiB of address space) per read.
_PAGEMAP_CHUNK = (1 << 18) * PAGE_SIZE

_probe_cache: list[str | None] = []


def measure_soft_dirty(procfs: Path = Path("/proc")) -> str | None:
    """Clear the bits of this process, write a page, look at bit 55: ``None`` if it set."""
    page = mmap.mmap(-1, PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        page[0] = 1  # populated before the clear
        addr = ctypes.addressof(ctypes.c_char.from_buffer(page))
        pagemap = os.open(procfs / "self" / "pagemap", os.O_RDONLY | os.O_CLOEXEC)
        try:
            (procfs / "self" / "clear_refs").write_bytes(CLEAR_SOFT_DIRTY)
            before = int(read_page_flags(pagemap, addr, addr + PAGE_SIZE)[0])
            page[0] = 2
            after = int(read_page_flags(pagemap, addr, addr + PAGE_SIZE)[0])
        finally:
            os.close(pagemap)
    except OSError as exc:
        return f"clear_refs/pagemap not usable: {exc}"
    finally:
        with contextlib.suppress(BufferError):  # a ctypes view still alive: the GC frees it
            page.close()
    bit = int(PAGEMAP_SOFT_DIRTY)
    if before & bit:
        return "clear_refs=4 did not clear pagemap bit 55"
    if not after & bit:
        return (
            "pagemap bit 55 stayed clear after a write following clear_refs=4 "
            "(kernel built without CONFIG_MEM_SOFT_DIRTY?)"
        )
    return None


def probe_soft_dirty() -> str | None:
    """``None`` if soft-dirty tracking works on this kernel, else why not (measured once)."""
    if not _probe_cache:
        _probe_cache.append(measure_soft_dirty())
    return _probe_cache[0]


class SoftDirtyTracker(DirtyTracker):
    """Soft-dirty tracker; its state lives in the kernel's page tables."""

    backend_name = "soft-dirty"

    def __init__(
        self,
        session: Process,
        *,
        procfs: Path = Path("/proc"),
        start_time: int | None = None,
    ) -> None:
        super().__init__(session)
        self._proc = procfs / str(self.pid)
        self.start_time = read_start_time(self.pid, procfs) if start_time is None else start_time

    @classmethod
    def open(cls, session: Process, *, procfs: Path = Path("/proc")) -> SoftDirtyTracker:
        """Start tracking now (clears the target's soft-dirty bits)."""
        tracker = cls(session, procfs=procfs)
        tracker.reset()
        return tracker

    @classmethod
    def resume(
        cls, session: Process, state: TrackerState, *, procfs: Path = Path("/proc")
    ) -> SoftDirtyTracker:
        """Continue: the bits set since the last clear are still in the page tables."""
        pid = session.pid
        if state.backend != cls.backend_name:
            raise TrackerLost(pid, f"state is for backend {state.backend!r}, not soft-dirty")
        if state.pid != pid or read_start_time(pid, procfs) != state.start_time:
            raise TrackerLost(pid, f"state belongs to another process (pid {state.pid})")
        return cls(session, procfs=procfs, start_time=state.start_time)

    def state(self) -> TrackerState:
        return TrackerState(backend=self.backend_name, pid=self.pid, start_time=self.start_time)

    def reset(self) -> None:
        self._check_open()
        try:
            (self._proc / "clear_refs").write_bytes(CLEAR_SOFT_DIRTY)
        except OSError as exc:
            raise TrackingError(self.pid, "writing clear_refs failed", exc.errno or 0) from exc

    def dirty_pages(self, ranges: Iterable[Range] | None = None) -> PageArray:
        self._check_open()
        writable, _ = tracked_ranges(self.session.maps())
        wanted = normalise(ranges)
        if wanted is not None:
            writable = intersect(writable, wanted)
        parts: list[PageArray] = [np.zeros(0, dtype=np.uint64)]
        try:
            fd = os.open(self._proc / "pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise TrackingError(self.pid, "opening pagemap failed", exc.errno or 0) from exc
        try:
            for start, end in writable:
                for pos in range(start, end, _PAGEMAP_CHUNK):
                    stop = min(end, pos + _PAGEMAP_CHUNK)
                    entries = read_page_flags(fd, pos, stop)
                    hits = np.flatnonzero(entries & PAGEMAP_SOFT_DIRTY)
                    parts.append(hits.astype(np.uint64) * np.uint64(PAGE_SIZE) + np.uint64(pos))
        except OSError as exc:
            raise TrackingError(self.pid, "reading pagemap failed", exc.errno or 0) from exc
        finally:
            os.close(fd)
        return np.concatenate(parts)

    def _release_local(self) -> None:
        """Nothing is held in this process."""

    def _stop(self) -> None:
        """The bits need no undoing; a clear leaves the target as it would any other."""

"""What an apply overwrote, kept so a failed apply can put the target back exactly.

Every step records its inverse *before* it changes anything. Page contents go to a spool file
(never held in memory as a whole, so a 1 GiB apply stays within a small RSS), everything else
(regions, protections, registers) is small and stays in memory. ``rollback`` replays the
inverses newest first.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import attrs

from applier.model import Region

__all__ = ["SavedRange", "UndoLog"]

CHUNK = 4 << 20
_MADV_POPULATE_WRITE = 23  # Linux 5.14+: allocate a whole window in one call


@attrs.frozen
class SavedRange:
    """``length`` bytes that were at ``addr``, stored at ``spool_offset`` in the spool."""

    addr: int
    length: int
    spool_offset: int


@attrs.frozen
class UndoPages:
    ranges: tuple[SavedRange, ...]


@attrs.frozen
class UndoMapping:
    """A region that the apply created: rollback unmaps it."""

    start: int
    end: int


@attrs.frozen
class UndoUnmap:
    """A region that the apply removed: rollback maps it again and rewrites its pages."""

    region: Region
    pages: tuple[SavedRange, ...]


@attrs.frozen
class UndoProtect:
    start: int
    end: int
    prot: int


@attrs.frozen
class UndoBrk:
    brk: int


@attrs.frozen
class UndoMm:
    field: str
    value: int


@attrs.frozen
class UndoRegs:
    tid: int
    regs: object
    xstate: bytes | None


UndoRecord = UndoPages | UndoMapping | UndoUnmap | UndoProtect | UndoBrk | UndoMm | UndoRegs


@attrs.define
class UndoLog:
    """Inverse operations, newest last, with page contents in a spool file."""

    spool: BinaryIO | None  # None: a disabled log (``--no-undo``) that keeps nothing
    records: list[UndoRecord] = attrs.field(factory=list)
    saved_bytes: int = 0

    @classmethod
    def disabled(cls) -> UndoLog:
        """A log that records nothing: an apply that fails cannot be rolled back."""
        return cls(None)

    @property
    def enabled(self) -> bool:
        return self.spool is not None

    @classmethod
    def create(cls, directory: Path | None = None) -> UndoLog:
        """A spool in ``directory``, or in memory (a memfd: RAM that is not the applier's RSS,
        written at memory speed, gone when closed)."""
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
            return cls(tempfile.TemporaryFile(prefix="applier-undo-", dir=directory))
        fd = os.memfd_create("applier-undo", os.MFD_CLOEXEC)
        return cls(os.fdopen(fd, "w+b", buffering=0))

    def close(self) -> None:
        if self.spool is not None:
            self.spool.close()

    def _spool(self) -> BinaryIO:
        if self.spool is None:
            raise RuntimeError("the undo log is disabled")
        return self.spool

    @contextlib.contextmanager
    def window(self, length: int) -> Iterator[tuple[int, memoryview]]:
        """(spool offset, writable view) of ``length`` new bytes at the end of the spool.

        The caller reads target memory straight into the view (one copy, no bounce buffer);
        afterwards the window is dropped from this process's memory, the bytes stay in the
        spool. Every slice of the view must be gone when the ``with`` block ends.
        """
        spool = self._spool()
        offset = spool.seek(0, os.SEEK_END)
        os.ftruncate(spool.fileno(), offset + length)
        m = mmap.mmap(spool.fileno(), length, offset=offset)
        with contextlib.suppress(OSError):
            m.madvise(_MADV_POPULATE_WRITE, 0, length)
        view = memoryview(m)
        try:
            yield offset, view
        finally:
            view.release()
            m.madvise(mmap.MADV_DONTNEED)  # keeps the RSS small even if a slice lingers
            with contextlib.suppress(BufferError):
                m.close()
            self.saved_bytes += length

    def save_ranges(
        self,
        ranges: list[tuple[int, int]],
        read_runs: Callable[[list[tuple[int, memoryview]]], None],
    ) -> tuple[SavedRange, ...]:
        """Copy target memory [start, end) of each range into the spool, CHUNK at a time."""
        if self.spool is None:
            return ()
        out: list[SavedRange] = []
        for start, end in ranges:
            for addr in range(start, end, CHUNK):
                n = min(CHUNK, end - addr)
                with self.window(n) as (offset, view):
                    read_runs([(addr, view)])
                out.append(SavedRange(addr, n, offset))
        return tuple(out)

    def iter_saved(self, ranges: tuple[SavedRange, ...]) -> Iterator[tuple[int, bytes]]:
        """(address, bytes) of saved ranges, read back from the spool."""
        spool = self._spool()
        for r in ranges:
            spool.seek(r.spool_offset)
            yield r.addr, spool.read(r.length)

    def add(self, record: UndoRecord) -> None:
        if self.spool is not None:
            self.records.append(record)

"""What an apply overwrote, kept so a failed apply can put the target back exactly.

Every step records its inverse *before* it changes anything. Page contents go to a spool file
(never held in memory as a whole, so a 1 GiB apply stays within a small RSS), everything else
(regions, protections, registers) is small and stays in memory. ``rollback`` replays the
inverses newest first.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import attrs

from applier.model import Region

__all__ = ["SavedRange", "UndoLog"]

CHUNK = 4 << 20


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

    spool: BinaryIO
    records: list[UndoRecord] = attrs.field(factory=list)
    saved_bytes: int = 0

    @classmethod
    def create(cls, directory: Path | None = None) -> UndoLog:
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
        spool = tempfile.TemporaryFile(prefix="applier-undo-", dir=directory)
        return cls(spool)

    def close(self) -> None:
        self.spool.close()

    def save_ranges(
        self,
        ranges: list[tuple[int, int]],
        read_into: Callable[[int, memoryview], None],
    ) -> tuple[SavedRange, ...]:
        """Copy target memory [start, end) of each range into the spool, in CHUNK pieces."""
        out: list[SavedRange] = []
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        self.spool.seek(0, os.SEEK_END)
        for start, end in ranges:
            addr = start
            while addr < end:
                n = min(CHUNK, end - addr)
                read_into(addr, view[:n])
                offset = self.spool.tell()
                self.spool.write(view[:n])
                out.append(SavedRange(addr, n, offset))
                self.saved_bytes += n
                addr += n
        return tuple(out)

    def save_bytes(self, addr: int, data: memoryview) -> tuple[SavedRange, ...]:
        """Store bytes the caller already read from the target at ``addr``."""
        offset = self.spool.seek(0, os.SEEK_END)
        self.spool.write(data)
        self.saved_bytes += len(data)
        return (SavedRange(addr, len(data), offset),)

    def iter_saved(self, ranges: tuple[SavedRange, ...]) -> Iterator[tuple[int, bytes]]:
        """(address, bytes) of saved ranges, read back from the spool."""
        for r in ranges:
            self.spool.seek(r.spool_offset)
            yield r.addr, self.spool.read(r.length)

    def add(self, record: UndoRecord) -> None:
        self.records.append(record)

"""Rollback: the undo log replayed newest first, one handler per record type."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

from applier.executor.fds import undo_closed, undo_opened, undo_state
from applier.executor.layout import map_region, set_mm_map
from applier.executor.threads import recreate
from applier.undo.log import (
    SavedRange,
    UndoBrk,
    UndoFdClosed,
    UndoFdOpened,
    UndoFdState,
    UndoLog,
    UndoMapping,
    UndoMm,
    UndoPages,
    UndoPageTable,
    UndoProtect,
    UndoRecord,
    UndoRegs,
    UndoSigactions,
    UndoSigmask,
    UndoThreadCreated,
    UndoThreadEnded,
    UndoUnmap,
)
from injector.process import Process

__all__ = ["rollback"]


def _restore_pages(process: Process, undo: UndoLog, ranges: tuple[SavedRange, ...]) -> None:
    for addr, data in undo.iter_saved(ranges):
        process.write(addr, data)


def _pages(process: Process, undo: UndoLog, rec: UndoPages) -> None:
    _restore_pages(process, undo, rec.ranges)


def _table(process: Process, undo: UndoLog, rec: UndoPageTable) -> None:
    undo.restore_table(rec, process.write_iov)


def _mapping(process: Process, undo: UndoLog, rec: UndoMapping) -> None:
    process.munmap(rec.start, rec.end - rec.start)


def _unmapped(process: Process, undo: UndoLog, rec: UndoUnmap) -> None:
    map_region(process, attrs.evolve(rec.region))
    _restore_pages(process, undo, rec.pages)


def _protect(process: Process, undo: UndoLog, rec: UndoProtect) -> None:
    process.mprotect(rec.start, rec.end - rec.start, rec.prot)


def _brk(process: Process, undo: UndoLog, rec: UndoBrk) -> None:
    process.brk(rec.brk)


def _mm(process: Process, undo: UndoLog, rec: UndoMm) -> None:
    set_mm_map(process, dict(rec.values))


def _regs(process: Process, undo: UndoLog, rec: UndoRegs) -> None:
    if rec.xstate is not None:
        process.set_xstate(rec.tid, rec.xstate)
    process.set_regs(rec.tid, rec.regs)


def _fd_closed(process: Process, undo: UndoLog, rec: UndoFdClosed) -> None:
    undo_closed(process, rec)


def _fd_opened(process: Process, undo: UndoLog, rec: UndoFdOpened) -> None:
    undo_opened(process, rec)


def _fd_state(process: Process, undo: UndoLog, rec: UndoFdState) -> None:
    undo_state(process, rec)


def _sigactions(process: Process, undo: UndoLog, rec: UndoSigactions) -> None:
    process.set_sigactions(dict(rec.actions))


def _sigmask(process: Process, undo: UndoLog, rec: UndoSigmask) -> None:
    process.set_sigmask(rec.tid, rec.mask)


def _thread_created(process: Process, undo: UndoLog, rec: UndoThreadCreated) -> None:
    process.end_thread(rec.tid)


def _thread_ended(process: Process, undo: UndoLog, rec: UndoThreadEnded) -> None:
    recreate(process, rec)


_INVERSES: dict[type[Any], Callable[[Process, UndoLog, Any], None]] = {
    UndoPages: _pages,
    UndoPageTable: _table,
    UndoMapping: _mapping,
    UndoUnmap: _unmapped,
    UndoProtect: _protect,
    UndoBrk: _brk,
    UndoMm: _mm,
    UndoRegs: _regs,
    UndoFdClosed: _fd_closed,
    UndoFdOpened: _fd_opened,
    UndoFdState: _fd_state,
    UndoSigactions: _sigactions,
    UndoSigmask: _sigmask,
    UndoThreadCreated: _thread_created,
    UndoThreadEnded: _thread_ended,
}


def rollback(process: Process, undo: UndoLog) -> None:
    """Replay the undo log newest first. Raises on the first inverse that fails."""
    records: list[UndoRecord] = list(reversed(undo.records))
    for rec in records:
        _INVERSES[type(rec)](process, undo, rec)
    undo.records.clear()

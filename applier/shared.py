"""Writing shared anonymous memory (shmem objects) back from pagemap-shmem images.

The object is reached through the target's own mapping of it: saved pages are written with
process_vm_writev, and the parts of the window the image holds no pages for were holes in the
object, so they are punched again with an injected ``madvise(MADV_REMOVE)`` (a plain
MADV_DONTNEED would only unmap them; the data would stay in the object). The old contents of
the whole window are kept in the undo log first.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from applier.errors import VerifyFailed
from applier.plan import WriteShared
from applier.undo import UndoLog, UndoPages
from injector.maps import PAGEMAP_PRESENT

__all__ = ["verify_shared", "write_shared"]

SYS_madvise = 28
MADV_REMOVE = 9
CHUNK = 8 << 20


def _pieces(step: WriteShared, page: int) -> list[tuple[int, memoryview]]:
    out: list[tuple[int, memoryview]] = []
    for run in step.runs:
        src: Any = run.source
        for addr in range(run.vaddr, run.vaddr + run.nr_pages * page, CHUNK):
            n = min(CHUNK, run.vaddr + run.nr_pages * page - addr)
            out.append((addr, src.pages.view(src.offset + (addr - src.vaddr), n)))
    return out


def write_shared(session: Any, undo: UndoLog, step: WriteShared, page: int) -> int:
    """Apply ``step``; returns the number of pages written."""
    undo.add(UndoPages(undo.save_ranges([(step.region.start, step.region.end)], session.read_runs)))
    pieces = _pieces(step, page)
    if pieces:
        session.write_runs(pieces)
    for a, b in step.holes:
        session.syscall(SYS_madvise, a, b - a, MADV_REMOVE)
    return step.nr_pages


def verify_shared(session: Any, step: WriteShared, page: int) -> None:
    """Saved pages read back equal; the holes are not mapped any more (checked through
    pagemap: reading a shmem hole would allocate a page for it again)."""
    for addr, data in _pieces(step, page):
        live = bytearray(len(data))
        session.read_runs([(addr, memoryview(live))])
        if live != data:
            raise VerifyFailed(f"pid {session.pid}: shared memory near {addr:#x} differs")
    for a, b in step.holes:
        present = (session.page_flags(a, b) & PAGEMAP_PRESENT) != 0
        if present.any():
            addr = a + int(np.argmax(present)) * page
            raise VerifyFailed(f"pid {session.pid}: shared memory at {addr:#x} not punched")

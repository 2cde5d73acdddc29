"""Writing shared anonymous memory (shmem objects) back from pagemap-shmem images.

The object is reached through the target's own mapping of it: saved pages are written with
process_vm_writev, and the parts of the window the image holds no pages for were holes in the
object, so they are punched again with an injected ``madvise(MADV_REMOVE)`` (a plain
MADV_DONTNEED would only unmap them; the data would stay in the object). The old contents of
the whole window are kept in the undo log first.
"""

from __future__ import annotations

import numpy as np

from applier.errors import VerifyFailed
from applier.executor.context import Context
from applier.executor.pages import page_source
from applier.limits import CHUNK
from applier.plan import WriteShared
from applier.undo.log import UndoPages
from injector.calls import MADV_REMOVE
from injector.maps import PAGEMAP_PRESENT

__all__ = ["verify_shared", "write_shared"]


def _pieces(step: WriteShared, page: int) -> list[tuple[int, memoryview]]:
    out: list[tuple[int, memoryview]] = []
    for run in step.runs:
        src = page_source(run.source)
        for addr in range(run.vaddr, run.vaddr + run.nr_pages * page, CHUNK):
            n = min(CHUNK, run.vaddr + run.nr_pages * page - addr)
            out.append((addr, src.pages.view(src.offset + (addr - src.vaddr), n)))
    return out


def write_shared(ctx: Context, step: WriteShared) -> None:
    """Apply ``step``: the old window to the undo log, saved pages written, holes punched."""
    ctx.undo.add(UndoPages(ctx.save([(step.region.start, step.region.end)])))
    pieces = _pieces(step, ctx.page)
    if pieces:
        ctx.process.write_runs(pieces)
    for a, b in step.holes:
        ctx.process.madvise(a, b - a, MADV_REMOVE)
    ctx.stats.pages_written += step.nr_pages


def verify_shared(ctx: Context, step: WriteShared) -> None:
    """Saved pages read back equal; the holes are not mapped any more (checked through
    pagemap: reading a shmem hole would allocate a page for it again)."""
    process, page = ctx.process, ctx.page
    for addr, data in _pieces(step, page):
        live = bytearray(len(data))
        process.read_runs([(addr, memoryview(live))])
        if live != data:
            raise VerifyFailed(f"pid {process.pid}: shared memory near {addr:#x} differs")
    for a, b in step.holes:
        present = (process.page_flags(a, b) & PAGEMAP_PRESENT) != 0
        if present.any():
            addr = a + int(np.argmax(present)) * page
            raise VerifyFailed(f"pid {process.pid}: shared memory at {addr:#x} not punched")

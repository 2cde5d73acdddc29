"""The layout steps, run as system calls inside the target: the program break, the mm fields
(``PR_SET_MM_MAP``), unmapping, mapping a region at its old address (anonymous, or a private
file opened and mapped by the target itself), protections, and discards. Each handler
records its inverse in the undo log before it changes anything (the mm fields: after the
kernel accepted them, as a refused call changed nothing)."""

from __future__ import annotations

import os
import struct

import numpy as np

from applier.errors import MismatchError, VerifyFailed
from applier.executor.context import Context
from applier.model import Kind, Region
from applier.plan import Discard, MapAnon, MapFile, Protect, SetBrk, SetMm, Unmap
from applier.ranges import align_up
from applier.undo.log import UndoBrk, UndoMapping, UndoMm, UndoPages, UndoProtect, UndoUnmap
from injector.calls import (
    MADV_DONTNEED,
    MAP_ANONYMOUS,
    MAP_FIXED_NOREPLACE,
    MAP_GROWSDOWN,
    MAP_PRIVATE,
    PR_SET_MM,
    PR_SET_MM_MAP,
)
from injector.maps import PAGEMAP_FILE, PAGEMAP_PRESENT
from injector.process import Process

__all__ = [
    "discard",
    "map_new",
    "map_region",
    "protect",
    "set_brk",
    "set_mm",
    "set_mm_map",
    "unmap",
    "validate_map_file",
    "verify_discard",
]

# struct prctl_mm_map (include/uapi/linux/prctl.h): 11 u64 bounds, auxv pointer, auxv_size,
# exe_fd. auxv NULL/0 and exe_fd -1 leave the saved auxv and /proc/PID/exe as they are.
_MM_MAP_ORDER = (
    "mm_start_code", "mm_end_code", "mm_start_data", "mm_end_data", "mm_start_brk", "brk",
    "mm_start_stack", "mm_arg_start", "mm_arg_end", "mm_env_start", "mm_env_end",
)  # fmt: skip


def map_region(process: Process, region: Region) -> None:
    """Create ``region`` in the target at its exact address (never over an existing mapping)."""
    length = region.end - region.start
    if region.kind is Kind.ANON:
        flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE
        if region.growsdown:
            flags |= MAP_GROWSDOWN
        got = process.mmap(region.start, length, region.prot, flags)
    elif region.kind is Kind.FILE:
        fd = process.openat(region.path or "")
        try:
            got = process.mmap(
                region.start,
                length,
                region.prot,
                MAP_PRIVATE | MAP_FIXED_NOREPLACE,
                fd=fd,
                offset=region.offset,
            )
        finally:
            process.close(fd)
    else:
        raise MismatchError(f"cannot re-create {region.describe()}")
    if got != region.start:
        raise MismatchError(f"mmap placed {region.describe()} at {got:#x}")


def set_mm_map(process: Process, fields: dict[str, int]) -> None:
    """prctl(PR_SET_MM, PR_SET_MM_MAP) with ``fields``; the program break stays where it is
    now (brk is the brk step's business)."""
    values = {**fields, "brk": process.brk(0)}
    blob = struct.pack("<11QQII", *(values[n] for n in _MM_MAP_ORDER), 0, 0, 0xFFFFFFFF)
    with process.scratch(blob) as addr:
        process.prctl(PR_SET_MM, PR_SET_MM_MAP, addr, len(blob), 0)


def set_brk(ctx: Context, step: SetBrk) -> None:
    old = ctx.process.brk(0)
    lost = (align_up(step.new, ctx.page), align_up(old, ctx.page))
    if lost[0] < lost[1]:
        # brk shrinking unmaps the heap's tail: keep it; on rollback brk(old) comes first
        # (records replay newest first) and these pages are rewritten after it.
        ctx.undo.add(UndoPages(ctx.save([lost])))
    ctx.undo.add(UndoBrk(old))
    got = ctx.process.brk(step.new)
    if got != step.new:
        raise MismatchError(f"brk({step.new:#x}) refused by the kernel (break {got:#x})")


def set_mm(ctx: Context, step: SetMm) -> None:
    set_mm_map(ctx.process, step.new)
    # Recorded after the call: a call the kernel refused changed nothing to undo.
    ctx.undo.add(UndoMm(tuple(step.old.items())))


def unmap(ctx: Context, step: Unmap) -> None:
    # all of it: the contents must survive the unmap (rollback maps it again)
    saved = ctx.save([(step.region.start, step.region.end)])
    ctx.undo.add(UndoUnmap(step.region, saved))
    ctx.process.munmap(step.start, step.end - step.start)
    ctx.stats.layout_changes += 1


def map_new(ctx: Context, step: MapAnon | MapFile) -> None:
    ctx.undo.add(UndoMapping(step.region.start, step.region.end))
    map_region(ctx.process, step.region)
    ctx.stats.layout_changes += 1


def protect(ctx: Context, step: Protect) -> None:
    ctx.undo.add(UndoProtect(step.start, step.end, step.old))
    ctx.process.mprotect(step.start, step.end - step.start, step.new)
    ctx.stats.layout_changes += 1


def discard(ctx: Context, step: Discard) -> None:
    ctx.undo.add(UndoPages(ctx.save(list(step.ranges))))
    for a, b in step.ranges:
        ctx.process.madvise(a, b - a, MADV_DONTNEED)
    ctx.stats.bytes_discarded += step.nr_bytes


def verify_discard(ctx: Context, step: Discard) -> None:
    """Checked through pagemap, not by reading: a read would fault the zero page (or the
    file's page) in and make the page present again. Only bit 63: a page discarded a moment
    ago is not in swap, and in a range registered for userfaultfd write-protection the
    kernel leaves a PTE marker that pagemap shows with the swap bit set."""
    for a, b in step.ranges:
        flags = ctx.process.page_flags(a, b)
        present = (flags & PAGEMAP_PRESENT) != 0
        own = present & ((flags & PAGEMAP_FILE) == 0)
        left = np.nonzero(own if step.reason == "file" else present)[0]
        if len(left):
            raise VerifyFailed(
                f"pid {ctx.process.pid}: page {a + int(left[0]) * ctx.page:#x} still holds "
                "data after discarding",
            )


def validate_map_file(ctx: Context, step: MapFile) -> None:
    """The file to map again exists and reaches the mapping's offset."""
    path = step.region.path or ""
    try:
        size = os.stat(path).st_size
    except OSError as exc:
        raise MismatchError(f"cannot map {path} again: {exc.strerror}") from exc
    if step.region.offset >= max(size, 1) and size:
        raise MismatchError(f"{path} is shorter than the image's mapping needs")

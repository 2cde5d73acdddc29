"""Sizes that bound applier's own memory and batch its kernel calls: one place for all."""

from __future__ import annotations

__all__ = [
    "CHUNK",
    "CHUNK_PAGES",
    "HEAD_BYTES",
    "IOV_BATCH",
    "MEMORY_SPOOL_BYTES",
    "PAGE",
    "POOL_BYTES",
    "POOL_IDLE",
]

PAGE = 4096  # x86_64; images say their own page size (AT_PAGESZ)
CHUNK = 8 << 20  # bytes of page data handled per batch (read, compared, written, spooled)
CHUNK_PAGES = CHUNK // PAGE  # pages per pagemap run written at most
IOV_BATCH = 1024  # iovecs per process_vm_readv/writev call: IOV_MAX
# Undo spool bytes a closed in-memory log leaves allocated for the next one in this process
# (one memfd kept at most); 0 disables the pool. A larger spool is kept whole for POOL_IDLE
# seconds (applies one after the other, as fixture resets are, reuse all of it), then cut.
POOL_BYTES = 256 << 20
POOL_IDLE = 10.0
# An in-memory undo spool grows to at most this (and a quarter of MemAvailable); past it the
# spool goes on in a file in $TMPDIR or /var/tmp (what the memory holds stays there).
MEMORY_SPOOL_BYTES = 1 << 30
# The first bytes of an in-memory undo spool are this process's own memory, which an apply
# reads the old pages straight into (no copy into the memfd: the pwrite of the 10 MiB that an
# apply of 1% of 1 GiB keeps measured 2 ms a time here). One head is pooled.
HEAD_BYTES = 16 << 20

"""What an apply overwrote, kept so a failed apply can put the target back exactly.

Every step records its inverse *before* it changes anything. Page contents go to a spool file
(never held in memory as a whole, so a 1 GiB apply stays within a small RSS), everything else
(regions, protections, registers) is small and stays in memory. ``rollback`` replays the
inverses newest first.

The in-memory spool is a memfd. Allocating shared memory is slow on some machines (0.5-1 GB/s
measured), so a closed log hands its memfd to a per-process pool and the next log starts with
pages that are already there: a fixture reset every test pays the allocation once (the pool
keeps a memfd whole for ``POOL_IDLE`` seconds, then cuts it to ``POOL_BYTES``), and
the spool grows by ``fallocate`` before each write past its end (a pwrite into a hole
allocates page by page: 0.66-1.9 s for 1 GiB here, against 0.55 s with the fallocate). Its
first ``HEAD_BYTES`` are this process's own memory (a pooled, page-aligned buffer) that the
caller reads old pages straight into (``reserve``), so a small apply copies nothing. It is
bounded (``MEMORY_SPOOL_BYTES``, and a quarter of the memory available when the log is made):
what an apply overwrites past the bound goes on in a file on disk, at the offsets that follow
(the memfd keeps what it holds: nothing is copied).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import attrs
import numpy as np
import numpy.typing as npt

from applier.limits import (
    CHUNK,
    HEAD_BYTES,
    IOV_BATCH,
    MEMORY_SPOOL_BYTES,
    POOL_BYTES,
    POOL_IDLE,
)
from applier.model import Region
from injector.memory import aligned_buffer, buffer_address
from injector.regs import X86Regs

__all__ = [
    "SavedRange",
    "UndoBrk",
    "UndoFdClosed",
    "UndoFdOpened",
    "UndoFdState",
    "UndoLog",
    "UndoMapping",
    "UndoMm",
    "UndoPageTable",
    "UndoPages",
    "UndoProtect",
    "UndoRecord",
    "UndoRegs",
    "UndoSigactions",
    "UndoSigmask",
    "UndoThreadCreated",
    "UndoThreadEnded",
    "UndoUnmap",
]


def _mem_available() -> int:
    """MemAvailable of /proc/meminfo in bytes (unbounded if it cannot be read)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 1 << 62


_pool: list[BinaryIO] = []
_heads: list[npt.NDArray[np.uint8]] = []  # one pooled head (under _pool_lock)
_pool_lock = threading.Lock()
_trim: list[threading.Timer] = []  # the pending trim, if any


def _trim_pool() -> None:
    """Cut a pooled memfd left idle down to POOL_BYTES (one in use is not in the pool)."""
    with _pool_lock:
        for spool in _pool:
            with contextlib.suppress(OSError):
                if os.fstat(spool.fileno()).st_size > POOL_BYTES:
                    os.ftruncate(spool.fileno(), POOL_BYTES)


def _trim_later() -> None:
    """Trim the pool POOL_IDLE seconds from now (called with _pool_lock held)."""
    while _trim:
        _trim.pop().cancel()
    timer = threading.Timer(POOL_IDLE, _trim_pool)
    timer.daemon = True
    timer.start()
    _trim.append(timer)


IovWriter = Callable[[npt.NDArray[np.uint64], npt.NDArray[np.uint64]], None]


@attrs.frozen
class SavedRange:
    """``length`` bytes that were at ``addr``, stored at ``spool_offset`` in the spool."""

    addr: int
    length: int
    spool_offset: int


Spooled = tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64], npt.NDArray[np.uint64]]


def _spooled(ranges: tuple[SavedRange, ...]) -> Spooled | None:
    if not ranges:
        return None
    return (
        np.array([r.addr for r in ranges], dtype=np.uint64),
        np.array([r.length for r in ranges], dtype=np.uint64),
        np.array([r.spool_offset for r in ranges], dtype=np.uint64),
    )


class _NothingSpooled:
    def spooled(self) -> Spooled | None:
        """(addresses, lengths, spool offsets) of the page contents this record keeps."""
        return None


@attrs.frozen
class UndoPages:
    ranges: tuple[SavedRange, ...]

    def spooled(self) -> Spooled | None:
        return _spooled(self.ranges)


@attrs.frozen(eq=False)
class UndoPageTable:
    """``UndoPages`` as arrays, for many small ranges: ``length[i]`` bytes that were at
    ``addr[i]``, stored at ``spool_offset[i]`` (one record per batch of a page write)."""

    addr: npt.NDArray[np.uint64]
    length: npt.NDArray[np.uint64]
    spool_offset: npt.NDArray[np.uint64]

    def spooled(self) -> Spooled | None:
        return self.addr, self.length, self.spool_offset


@attrs.frozen
class UndoMapping(_NothingSpooled):
    """A region that the apply created: rollback unmaps it."""

    start: int
    end: int


@attrs.frozen
class UndoUnmap:
    """A region that the apply removed: rollback maps it again and rewrites its pages."""

    region: Region
    pages: tuple[SavedRange, ...]

    def spooled(self) -> Spooled | None:
        return _spooled(self.pages)


@attrs.frozen
class UndoProtect(_NothingSpooled):
    start: int
    end: int
    prot: int


@attrs.frozen
class UndoBrk(_NothingSpooled):
    brk: int


@attrs.frozen
class UndoMm(_NothingSpooled):
    """The mm fields before a PR_SET_MM_MAP (recorded once the kernel accepted the call)."""

    values: tuple[tuple[str, int], ...]


@attrs.frozen
class UndoRegs(_NothingSpooled):
    tid: int
    regs: X86Regs
    xstate: bytes | None


@attrs.frozen
class UndoThreadCreated(_NothingSpooled):
    """A thread the apply created: rollback ends it."""

    tid: int


@attrs.frozen
class UndoThreadEnded(_NothingSpooled):
    """A thread the apply ended, with what it takes to create it again (rollback)."""

    tid: int
    regs: X86Regs
    xstate: bytes
    sigmask: int
    rseq: tuple[int, int, int] | None
    robust: tuple[int, int]
    clear_tid: int
    name: str
    altstack: tuple[int, int, int]  # (ss_sp, ss_size, ss_flags)


@attrs.frozen
class UndoFdClosed(_NothingSpooled):
    """A descriptor the apply closed (or replaced), kept alive at ``parked`` in the target
    until the apply is done: rollback puts it back at ``fd`` (dup3) and closes ``parked``."""

    fd: int
    parked: int
    cloexec: bool


@attrs.frozen
class UndoFdOpened(_NothingSpooled):
    """A descriptor number the apply opened a file at: rollback closes it."""

    fd: int


@attrs.frozen
class UndoFdState(_NothingSpooled):
    """A descriptor's position, status flags and close-on-exec before the apply (None: left
    as they were)."""

    fd: int
    pos: int | None
    flags: int | None
    cloexec: bool | None


@attrs.frozen
class UndoSigactions(_NothingSpooled):
    """Dispositions before a sigaction step: (signal, (handler, flags, restorer, mask))."""

    actions: tuple[tuple[int, tuple[int, int, int, int]], ...]


@attrs.frozen
class UndoSigmask(_NothingSpooled):
    tid: int
    mask: int


UndoRecord = (
    UndoPages | UndoPageTable | UndoMapping | UndoUnmap | UndoProtect | UndoBrk | UndoMm | UndoRegs
    | UndoFdClosed | UndoFdOpened | UndoFdState | UndoSigactions | UndoSigmask | UndoThreadCreated
    | UndoThreadEnded
)  # fmt: skip


@attrs.define
class UndoLog:
    """Inverse operations, newest last, with page contents in a spool.

    The spool is one range of offsets, ``[0, end)``, in up to three places: ``head`` (this
    process's memory, an in-memory log only) holds ``[0, base)``, ``spool`` ``[base, split)``
    at ``offset - base`` (all the rest until the in-memory bound is passed) and ``disk``, once
    there is one, ``[split, end)`` at ``offset - split``. One append never straddles two: an
    append that does not fit in what is left of the head closes it (``base`` becomes the
    end)."""

    spool: BinaryIO | None  # None: a disabled log (``--no-undo``) that keeps nothing
    records: list[UndoRecord] = attrs.field(factory=list)
    saved_bytes: int = 0
    end: int = 0  # bytes of the spool in use (a pooled memfd can be larger)
    capacity: int = 0  # the first file's allocated size
    pooled: bool = False  # an in-memory spool: goes back to the pool when closed
    memory_bound: int = 0  # an in-memory spool goes on on disk past this many bytes
    spilled: Path | None = None  # the directory of the disk part, once there is one
    disk: BinaryIO | None = None  # offsets from ``split`` on
    split: int = 1 << 62  # where the disk part starts
    head: npt.NDArray[np.uint8] | None = None  # offsets below ``base``, in this process
    base: int = 0  # where the memfd's part starts (its offset 0); the head's size while open

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
        with _pool_lock:
            spool = _pool.pop() if _pool else None
            head = _heads.pop() if _heads else None
        if spool is None:
            fd = os.memfd_create("applier-undo", os.MFD_CLOEXEC)
            spool = os.fdopen(fd, "w+b", buffering=0)
        if head is None:
            head = aligned_buffer(HEAD_BYTES, np.uint8)
        bound = min(MEMORY_SPOOL_BYTES, _mem_available() // 4)
        return cls(
            spool,
            capacity=os.fstat(spool.fileno()).st_size,
            pooled=True,
            memory_bound=bound,
            head=head,
            base=min(len(head), bound),
        )

    def _spill(self) -> None:
        """Go on in a nameless file on disk from the current end (the memfd keeps its part)."""
        where = Path(os.environ.get("TMPDIR") or "/var/tmp")
        self.disk = tempfile.TemporaryFile(prefix="applier-undo-", dir=where)  # noqa: SIM115 - the log keeps it
        self.split, self.spilled = self.end, where

    def close(self) -> None:
        spool, self.spool = self.spool, None
        disk, self.disk = self.disk, None
        head, self.head = self.head, None
        if disk is not None:
            disk.close()
        if head is not None:
            with _pool_lock:
                if not _heads:
                    _heads.append(head)
        if spool is None:
            return
        if self.pooled and POOL_BYTES > 0:
            with _pool_lock:
                if not _pool:
                    _pool.append(spool)
                    if self.capacity > POOL_BYTES:
                        _trim_later()
                    return
        spool.close()

    def _spool(self) -> BinaryIO:
        if self.spool is None:
            raise RuntimeError("the undo log is disabled")
        return self.spool

    def _file_at(self, offset: int) -> tuple[int, int]:
        """(descriptor, offset in it) of spool offset ``offset`` (at or past ``base``)."""
        if offset >= self.split and self.disk is not None:
            return self.disk.fileno(), offset - self.split
        return self._spool().fileno(), offset - self.base

    def reserve(self, nbytes: int) -> npt.NDArray[np.uint8] | None:
        """The next ``nbytes`` of the spool when they fit in the head: a view of this
        process's memory to read the bytes straight into, then ``append`` that view (which
        copies nothing). None: they do not fit (read elsewhere; ``append`` copies)."""
        if self.head is None or self.spool is None or self.end + nbytes > self.base:
            return None
        return self.head[self.end : self.end + nbytes]

    def append(self, data: memoryview) -> int:
        """Store ``data`` at the end of the spool; returns its spool offset. Into the head
        while it has room (nothing to do for the view ``reserve`` gave); past it a ``pwrite``
        from the caller's buffer: into a memfd that is a memcpy (plus the allocation of new
        pages, done first by ``fallocate``), measured about twice as fast here as mapping the
        spool and reading into it."""
        view = data.cast("B") if data.format != "B" or data.ndim != 1 else data
        offset, n = self.end, view.nbytes
        if self.head is not None and offset + n <= self.base:
            room = self.head[offset : offset + n]
            if room.ctypes.data != buffer_address(view):
                room[:] = np.frombuffer(view, dtype=np.uint8)
            self.end = offset + n
            self.saved_bytes += n
            return offset
        self.base = min(self.base, offset)  # the head closes here: the memfd starts at it
        if self.pooled and self.disk is None and offset + n > self.memory_bound:
            self._spill()
        fd, at = self._file_at(offset)
        if self.pooled and self.disk is None and at + n > self.capacity:
            with contextlib.suppress(OSError):  # only an allocation ahead of the write
                os.posix_fallocate(fd, self.capacity, at + n - self.capacity)
        done = 0
        while done < n:
            done += os.pwrite(fd, view[done:], at + done)
        self.end = offset + done
        if self.disk is None:
            self.capacity = max(self.capacity, at + done)
        self.saved_bytes += done
        return offset

    def save_ranges(
        self,
        ranges: list[tuple[int, int]],
        read_runs: Callable[[list[tuple[int, memoryview]]], None],
    ) -> tuple[SavedRange, ...]:
        """Copy target memory [start, end) of each range into the spool: pieces of at most
        CHUNK bytes, up to IOV_BATCH of them (small ranges) read in one batch into a buffer
        and appended."""
        if self.spool is None:
            return ()
        pieces = [
            (addr, min(CHUNK, end - addr))
            for start, end in ranges
            for addr in range(start, end, CHUNK)
        ]
        out: list[SavedRange] = []
        own: memoryview | None = None  # a buffer for what does not fit in the head
        i = 0
        while i < len(pieces):
            j, size = i + 1, pieces[i][1]
            while j < len(pieces) and j - i < IOV_BATCH and size + pieces[j][1] <= CHUNK:
                size += pieces[j][1]
                j += 1
            room = self.reserve(size)
            if room is not None:
                buf = room.data
            else:
                if own is None:
                    own = aligned_buffer(min(CHUNK, sum(n for _, n in pieces)), np.uint8).data
                buf = own
            runs, places, pos = [], [], 0
            for addr, n in pieces[i:j]:
                runs.append((addr, buf[pos : pos + n]))
                places.append((addr, n, pos))
                pos += n
            read_runs(runs)
            del runs
            offset = self.append(buf[:size])
            out.extend(SavedRange(addr, n, offset + at) for addr, n, at in places)
            i = j
        return tuple(out)

    def iter_saved(self, ranges: tuple[SavedRange, ...]) -> Iterator[tuple[int, bytes]]:
        """(address, bytes) of saved ranges, read back from the spool."""
        for r in ranges:
            yield r.addr, self.read(r.spool_offset, r.length)

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes of the spool from ``offset`` (across its two files if need be)."""
        out = bytearray()
        while len(out) < length:
            pos = offset + len(out)
            limit = length - len(out)
            if pos < self.base and self.head is not None:
                out += self.head[pos : min(pos + limit, self.base)].tobytes()
                continue
            fd, at = self._file_at(pos)
            if pos < self.split:
                limit = min(limit, self.split - pos)
            got = os.pread(fd, limit, at)
            if not got:
                raise OSError(f"the undo spool ends at {pos}, {length - len(out)} bytes short")
            out += got
        return bytes(out)

    def restore_table(self, record: UndoPageTable, write_iov: IovWriter) -> None:
        """Write the ranges of ``record`` back with ``write_iov`` straight from the spool:
        from the head where it is, the files mapped read-only, a CHUNK of spool at a time
        (each file on its own)."""
        offset = record.spool_offset
        in_head = offset < np.uint64(self.base)
        if self.head is not None and in_head.any():
            local = np.uint64(self.head.ctypes.data) + offset[in_head]
            length = record.length[in_head]
            write_iov(
                np.stack((local, length), axis=1), np.stack((record.addr[in_head], length), axis=1)
            )
        on_disk = offset >= np.uint64(self.split)
        parts = [(~on_disk & ~in_head, self._spool().fileno(), self.base)]
        if self.disk is not None:
            parts.append((on_disk, self.disk.fileno(), self.split))
        for sel, fd, base_offset in parts:
            if sel.any():
                self._restore_from(
                    fd,
                    record.addr[sel],
                    record.length[sel],
                    record.spool_offset[sel] - np.uint64(base_offset),
                    write_iov,
                )

    @staticmethod
    def _restore_from(
        fd: int,
        addr: npt.NDArray[np.uint64],
        length: npt.NDArray[np.uint64],
        offset: npt.NDArray[np.uint64],
        write_iov: IovWriter,
    ) -> None:
        order = np.argsort(offset, kind="stable")
        addr, length, offset = addr[order], length[order], offset[order]
        ends = offset + length
        i = 0
        while i < len(order):
            lo = int(offset[i]) // mmap.ALLOCATIONGRANULARITY * mmap.ALLOCATIONGRANULARITY
            j = max(i + 1, int(np.searchsorted(ends, lo + CHUNK, side="right")))
            hi = int(ends[j - 1])
            m = mmap.mmap(fd, hi - lo, offset=lo, access=mmap.ACCESS_READ)
            try:
                anchor = np.frombuffer(m, dtype=np.uint8)
                base = np.uint64(anchor.__array_interface__["data"][0])
                local = np.stack((base + (offset[i:j] - np.uint64(lo)), length[i:j]), axis=1)
                remote = np.stack((addr[i:j], length[i:j]), axis=1)
                write_iov(local, remote)
                del anchor
            finally:
                m.close()
            i = j

    def add(self, record: UndoRecord) -> None:
        if self.spool is not None:
            self.records.append(record)

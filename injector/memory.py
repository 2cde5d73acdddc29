"""Bulk reads and writes of a stopped process's memory.

The fast path is ``process_vm_readv``/``process_vm_writev`` (``mm/process_vm_access.c``) with up
to IOV_MAX iovecs per call. Those refuse pages the target itself could not access: a read-only
page gives EFAULT, and with several iovecs a short count instead of an error, so every count is
checked and the copy continues after the short point. Whatever they refuse goes through
/proc/PID/mem (``fs/proc/base.c`` ``mem_rw``), whose access is forced (FOLL_FORCE) and so
reaches read-only and PROT_NONE pages. Kernels can forbid forced access (``proc_mem.force_override``
since 6.12); then the last resort is an ``mprotect`` round trip injected into the target, which
the owning session provides as a callback. ptrace word pokes are never used for page data.

``read_iov``/``write_iov`` take the iovec arrays themselves ((n, 2) uint64 numpy arrays), for
callers that compute addresses with numpy: no Python object per piece at all.

Large ``write_runs`` calls are pipelined: a worker thread issues the ``process_vm_writev`` of one
batch (the call releases the GIL) while the caller's thread builds the iovecs of the next, so
the Python cost of building iovecs hides behind the kernel's copying. The worker never issues
ptrace requests (they belong to the tracing thread); pages it cannot write are handed back to
the calling thread.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import errno
import functools
import mmap
import os
import platform
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import attrs
import numpy as np
import numpy.typing as npt

from injector import _libc
from injector.workers import worker

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["MemoryIO", "aligned_buffer", "buffer_address"]

_CHUNK = 64 << 20  # /proc/PID/mem fallbacks copy at most this much per call


def _calibrate_view_offset() -> int | None:
    """Where CPython keeps ``view.buf`` inside a memoryview object, found and double-checked
    on two views whose data address is known; ``None`` elsewhere (the slow path is used)."""
    if platform.python_implementation() != "CPython":
        return None
    data = bytearray(256)
    anchor = (ctypes.c_char * len(data)).from_buffer(data)
    base = ctypes.addressof(anchor)
    found: set[int] | None = None
    for delta in (8, 72):
        view = memoryview(data)[delta:]
        raw = ctypes.string_at(id(view), type(view).__basicsize__)
        offsets = {
            o
            for o in range(0, len(raw) - 7, 8)
            if int.from_bytes(raw[o : o + 8], sys.byteorder) == base + delta
        }
        found = offsets if found is None else found & offsets
        view.release()
    del anchor
    return found.pop() if found is not None and len(found) == 1 else None


_VIEW_BUF_OFFSET = _calibrate_view_offset()
_void_p_at = ctypes.c_void_p.from_address


def aligned_buffer(nbytes: int, dtype: type[np.generic] = np.uint64) -> npt.NDArray[Any]:
    """A zeroed array of ``nbytes`` that starts on a page boundary, for process_vm_readv and
    process_vm_writev. A buffer from malloc (``np.empty``, ``bytearray``) starts 16 bytes
    past a page, so every page copied to or from the target straddles two local pages:
    reading 1 GiB into such a buffer measured 0.56-0.76 s here, against 0.18-0.22 s into an
    aligned one. The anonymous mapping lives as long as the array."""
    size = max(mmap.PAGESIZE, -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE)
    area = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return np.frombuffer(area, dtype=dtype, count=nbytes // np.dtype(dtype).itemsize)


def buffer_address(view: memoryview) -> int:
    """Address of the first byte of a C-contiguous memoryview (read-only ones too).

    ctypes' ``from_buffer`` needs a writable buffer and numpy's ``frombuffer`` costs about a
    microsecond per call, as much as the kernel needs to copy a 4 KiB page; reading the view's
    own ``buf`` pointer costs a tenth of that. The view must stay alive while the address is
    used.
    """
    if _VIEW_BUF_OFFSET is not None:
        value = _void_p_at(id(view) + _VIEW_BUF_OFFSET).value
        return value if value is not None else 0
    if view.nbytes == 0:
        return 0
    return int(np.frombuffer(view, dtype=np.uint8).__array_interface__["data"][0])


def _as_bytes_view(data: Buffer) -> memoryview:
    view = data if isinstance(data, memoryview) else memoryview(data)
    if not view.c_contiguous:
        view = memoryview(view.tobytes())
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


@attrs.define
class _Batch:
    """Up to IOV_MAX (remote address, local view) pairs as ready-to-use iovec arrays."""

    local: npt.NDArray[np.uint64]  # (n, 2): iov_base, iov_len
    remote: npt.NDArray[np.uint64]
    views: list[memoryview] | None  # keeps the local buffers alive; None: caller's memory


@attrs.define
class _Refused:
    """A piece that neither process_vm_writev nor a /proc/PID/mem write could store."""

    address: int
    view: memoryview
    err: int


# (start, end, action): make [start, end) accessible, run action, restore the protection.
ProtectRoundTrip = Callable[[int, int, Callable[[], None]], None]
# (error, address) -> the exception to raise (the session knows about exited targets).
ErrorTranslator = Callable[[OSError, int, str], Exception]


class MemoryIO:
    """Memory of one process: fast vm_rw calls, forced /proc/PID/mem, mprotect last resort."""

    def __init__(
        self,
        pid: int,
        mem_fd: int,
        translate: ErrorTranslator,
        protect_round_trip: ProtectRoundTrip | None,
    ) -> None:
        self.pid = pid
        self.mem_fd = mem_fd
        # False makes every page that process_vm_* refuses go through the mprotect round trip,
        # as on kernels that forbid forced /proc/PID/mem access (also a test seam).
        self.force_via_proc_mem = True
        self._translate = translate
        self._protect_round_trip = protect_round_trip

    def close(self) -> None:
        """Nothing to release: the fd belongs to the caller, the worker thread (``_pool``) to
        the process. No copy is left running: each call waits for its worker half."""

    # ---- reads -------------------------------------------------------------------------

    def read(self, address: int, size: int) -> bytes:
        out = bytearray(size)
        self.read_into(address, out)
        return bytes(out)

    def read_into(self, address: int, buffer: Buffer) -> None:
        view = memoryview(buffer)
        if view.readonly:
            raise TypeError("read_into needs a writable buffer")
        view = _as_bytes_view(view)
        size = view.nbytes
        if size == 0:
            return
        base = ctypes.addressof((ctypes.c_char * size).from_buffer(view))
        done = 0
        local = _libc.Iovec()
        remote = _libc.Iovec()
        while done < size:
            local.iov_base, local.iov_len = base + done, size - done
            remote.iov_base, remote.iov_len = address + done, size - done
            try:
                n = _libc.process_vm_readv(
                    self.pid, ctypes.addressof(local), 1, ctypes.addressof(remote), 1
                )
            except OSError as exc:
                if exc.errno != errno.EFAULT:
                    raise self._translate(exc, address + done, "read") from exc
                n = 0
            if n == 0:
                done += self._read_slow(address + done, view[done:])
            done += n

    def read_runs(self, runs: Iterable[tuple[int, Buffer]]) -> None:
        """Fill every writable buffer from its address: one process_vm_readv per IOV_MAX
        pieces; a piece that comes back short is finished by ``read_into`` (/proc/PID/mem,
        then the mprotect round trip)."""
        for batch in self._iter_batches(runs):
            self._read_batch(batch.local, batch.remote, batch.views)

    def read_iov(self, local: npt.NDArray[np.uint64], remote: npt.NDArray[np.uint64]) -> None:
        """``read_runs`` for callers that already hold iovec arrays: ``local`` and ``remote``
        are (n, 2) uint64 arrays of (address, length) rows, row i of ``remote`` read into row
        i of ``local`` (equal lengths). No Python object per piece; the local memory must be
        writable and stay mapped for the call. Short counts are handled as in ``read_runs``."""
        local, remote = _iov_pair(local, remote)
        halves = _halves(local, remote) if _CPUS > 1 else None
        if halves is None:
            self._read_rows(local, remote)
            return
        # As ``write_iov`` (10 MiB in 2,621 runs: 1.5 ms against 2.6, medians of 11, a
        # throwaway timing on 2026-12-04).
        _, future = self._side_by_side(self._read_rows, halves)
        if future.exception() is not None:
            # A piece that process_vm_readv refused may need the mprotect round trip, which
            # only the tracing thread can inject: that half again, here.
            self._read_rows(*halves[1])

    def _read_rows(self, local: npt.NDArray[np.uint64], remote: npt.NDArray[np.uint64]) -> None:
        for i in range(0, len(local), _libc.IOV_MAX):
            self._read_batch(local[i : i + _libc.IOV_MAX], remote[i : i + _libc.IOV_MAX], None)

    def _read_batch(
        self,
        local: npt.NDArray[np.uint64],
        remote: npt.NDArray[np.uint64],
        views: list[memoryview] | None,
    ) -> None:
        """One process_vm_readv of at most IOV_MAX rows, continuing after short counts."""
        for index, within in self._transfer(_libc.process_vm_readv, local, remote, "read"):
            view = _local_view(local, views, index)
            self.read_into(int(remote[index, 0]) + within, view[within:])

    def _transfer(
        self,
        call: Callable[[int, int, int, int, int], int],
        local: npt.NDArray[np.uint64],
        remote: npt.NDArray[np.uint64],
        what: str,
    ) -> Iterator[tuple[int, int]]:
        """Run ``call`` (process_vm_readv/writev) over the iovec rows until all are done; at
        each short count, yield (row, bytes of it done) for the caller to finish that row the
        slow way, then continue after it. EFAULT counts as a short count of 0."""
        count = len(local)
        first = 0  # the first row not fully transferred
        while first < count:
            try:
                n = call(
                    self.pid,
                    local.ctypes.data + first * 16,
                    count - first,
                    remote.ctypes.data + first * 16,
                    count - first,
                )
            except OSError as exc:
                if exc.errno != errno.EFAULT:
                    raise self._translate(exc, int(remote[first, 0]), what) from exc
                n = 0
            ends = np.cumsum(local[first:, 1])
            if n == int(ends[-1]):
                return
            full = int(np.searchsorted(ends, n, side="right"))
            index = first + full
            yield index, n - (int(ends[full - 1]) if full else 0)
            first = index + 1

    def _read_slow(self, address: int, view: memoryview) -> int:
        """Read at least one byte at ``address`` past what process_vm_readv could reach."""
        err = errno.EIO
        if self.force_via_proc_mem:
            try:
                n = os.preadv(self.mem_fd, [view[:_CHUNK]], address)
            except OSError as exc:
                if exc.errno != errno.EIO:
                    raise self._translate(exc, address, "read") from exc
                n = 0
            if n > 0:
                return n
        else:
            err = errno.EFAULT
        self._round_trip(address, view, err, write=False)
        return view.nbytes

    # ---- writes ------------------------------------------------------------------------

    def write(self, address: int, data: Buffer) -> None:
        self.write_runs(((address, data),))

    def write_runs(self, runs: Iterable[tuple[int, Buffer]]) -> None:
        """Write every (address, buffer) pair; the runs must not overlap each other."""
        batches = self._iter_batches(runs)
        first = next(batches, None)
        if first is None:
            return
        if len(first.local) < _libc.IOV_MAX:  # everything fits in one call: no pipeline
            refused = self._write_batch(first)
        else:
            refused = self._write_pipelined(first, batches)
        for piece in refused:
            self._round_trip(piece.address, piece.view, piece.err, write=True)

    def write_iov(self, local: npt.NDArray[np.uint64], remote: npt.NDArray[np.uint64]) -> None:
        """``write_runs`` for callers that already hold iovec arrays ((n, 2) uint64 rows of
        (address, length), equal lengths row by row, rows must not overlap in the target).
        The local memory must stay mapped for the call; refused pieces take the same
        /proc/PID/mem and mprotect fallbacks as ``write_runs``.

        From ``SPLIT_BYTES`` on, and with a second CPU to run it, the second half of
        the bytes is written by the worker thread while this one writes the first: two
        ``process_vm_writev`` of different pages run side by side in the kernel (10 MiB in
        2,621 runs: 2.7 ms against 4.1 in one thread, medians of 11, on 2026-12-04;
        bench/bench_reset.py times both ways as its floors)."""
        local, remote = _iov_pair(local, remote)
        halves = _halves(local, remote) if _CPUS > 1 else None
        if halves is None:
            refused = self._write_rows(local, remote)
        else:
            refused, future = self._side_by_side(self._write_rows, halves)
            refused += future.result()
        for piece in refused:
            self._round_trip(piece.address, piece.view, piece.err, write=True)

    def _side_by_side(
        self, copy: Callable[[IovArray, IovArray], R], halves: tuple[IovPair, IovPair]
    ) -> tuple[R, concurrent.futures.Future[R]]:
        """``copy`` of the second half on the worker while this thread does the first: (what
        the first gave, the worker's future, done). Not ``_start``: this thread goes straight
        into its own system call, which lets the worker have the GIL (waiting for it to run
        first cost 0.26 ms a write)."""
        (first_l, first_r), second = halves
        future = self._pool().submit(copy, *second)
        try:
            first = copy(first_l, first_r)
        finally:
            # Never return (or raise) while the worker still copies to or from the caller's
            # memory.
            concurrent.futures.wait((future,))
        return first, future

    def _write_rows(
        self, local: npt.NDArray[np.uint64], remote: npt.NDArray[np.uint64]
    ) -> list[_Refused]:
        refused: list[_Refused] = []
        for i in range(0, len(local), _libc.IOV_MAX):
            part_l, part_r = local[i : i + _libc.IOV_MAX], remote[i : i + _libc.IOV_MAX]
            refused += self._write_batch(_Batch(part_l, part_r, None))
        return refused

    def _write_pipelined(self, first: _Batch, rest: Iterator[_Batch]) -> list[_Refused]:
        refused: list[_Refused] = []
        future = self._start(lambda: self._write_batch(first))
        try:
            for batch in rest:  # each next batch is built while the previous one is written
                refused += future.result()
                future = self._start(functools.partial(self._write_batch, batch))
        finally:
            # Never return (or raise) while the worker still writes from the caller's buffers.
            concurrent.futures.wait((future,))
        refused += future.result()
        return refused

    def _start(
        self, write: Callable[[], list[_Refused]]
    ) -> concurrent.futures.Future[list[_Refused]]:
        """Hand ``write`` to the worker and return once it runs. The worker needs the GIL to
        get into its system call; without this wait the caller's thread keeps the GIL while
        it goes on and the two never overlap."""
        started = threading.Event()

        def run() -> list[_Refused]:
            started.set()
            return write()

        future = self._pool().submit(run)
        started.wait()
        return future

    @staticmethod
    def _pool() -> concurrent.futures.ThreadPoolExecutor:
        """The copy worker thread (``injector.workers``: one per process, kept)."""
        return worker("copy")

    @staticmethod
    def _iter_batches(runs: Iterable[tuple[int, Buffer]]) -> Iterator[_Batch]:
        addresses: list[int] = []
        lengths: list[int] = []
        bases: list[int] = []
        views: list[memoryview] = []
        for address, data in runs:
            view = _as_bytes_view(data)
            size = view.nbytes
            if size == 0:
                continue
            addresses.append(address)
            lengths.append(size)
            bases.append(buffer_address(view))
            views.append(view)
            if len(views) == _libc.IOV_MAX:
                yield _make_batch(addresses, lengths, bases, views)
                addresses, lengths, bases, views = [], [], [], []
        if views:
            yield _make_batch(addresses, lengths, bases, views)

    def _write_batch(self, batch: _Batch) -> list[_Refused]:
        """process_vm_writev the batch, continuing after short counts; refused pieces go to
        /proc/PID/mem, and what that refuses too is returned."""
        refused: list[_Refused] = []
        local, remote = batch.local, batch.remote
        for index, within in self._transfer(_libc.process_vm_writev, local, remote, "write"):
            view = _local_view(local, batch.views, index)[within:]
            piece = self._write_proc_mem(int(remote[index, 0]) + within, view)
            if piece is not None:
                refused.append(piece)
        return refused

    def _write_proc_mem(self, address: int, view: memoryview) -> _Refused | None:
        if not self.force_via_proc_mem:
            return _Refused(address, view, errno.EFAULT)
        done = 0
        while done < view.nbytes:
            try:
                n = os.pwrite(self.mem_fd, view[done : done + _CHUNK], address + done)
            except OSError as exc:
                if exc.errno not in (errno.EIO, errno.EFAULT, errno.EPERM, errno.EACCES):
                    raise self._translate(exc, address + done, "write") from exc
                return _Refused(address + done, view[done:], exc.errno)
            if n <= 0:
                return _Refused(address + done, view[done:], errno.EIO)
            done += n
        return None

    def _round_trip(self, address: int, view: memoryview, err: int, *, write: bool) -> None:
        """The last resort: make the pages accessible with an injected mprotect, copy, and
        restore their protection. Raises MemoryAccessError for memory that is not mapped."""
        if self._protect_round_trip is None:
            raise self._translate(OSError(err, os.strerror(err)), address, "access")
        size = view.nbytes

        def copy() -> None:
            local = _libc.Iovec(buffer_address(view), size)
            remote = _libc.Iovec(address, size)
            call = _libc.process_vm_writev if write else _libc.process_vm_readv
            try:
                n = call(self.pid, ctypes.addressof(local), 1, ctypes.addressof(remote), 1)
            except OSError as exc:
                raise self._translate(exc, address, "write" if write else "read") from exc
            if n != size:
                raise self._translate(OSError(errno.EFAULT, "short copy"), address + n, "copy")

        self._protect_round_trip(address, address + size, copy)


# A read or write of at least this much is cut in two halves copied side by side
# (``read_iov``, ``write_iov``): below it, handing half to the worker (about 0.1 ms) costs more
# than it saves.
SPLIT_BYTES = 2 << 20
_CPUS = len(os.sched_getaffinity(0))

IovArray = npt.NDArray[np.uint64]
IovPair = tuple[IovArray, IovArray]
R = TypeVar("R")


def _halves(
    local: npt.NDArray[np.uint64], remote: npt.NDArray[np.uint64]
) -> tuple[IovPair, IovPair] | None:
    """The rows cut in two parts of equal bytes (to the page; the row across the middle is
    cut in two), or None below ``SPLIT_BYTES``."""
    if not len(local):
        return None
    ends = np.cumsum(local[:, 1])
    total = int(ends[-1])
    if total < SPLIT_BYTES:
        return None
    half = total // 2 // mmap.PAGESIZE * mmap.PAGESIZE
    k = int(np.searchsorted(ends, half, side="right"))  # the row holding byte ``half``
    cut = half - (int(ends[k - 1]) if k else 0)  # bytes of row k in the first part
    first_l, first_r = local[: k + 1].copy(), remote[: k + 1].copy()
    second_l, second_r = local[k:].copy(), remote[k:].copy()
    first_l[-1, 1] = first_r[-1, 1] = cut
    for part in (second_l, second_r):
        part[0, 0] += np.uint64(cut)
        part[0, 1] -= np.uint64(cut)
    if cut == 0:  # the middle falls between rows
        first_l, first_r = first_l[:-1], first_r[:-1]
    return (first_l, first_r), (second_l, second_r)


def _iov_pair(
    local: npt.NDArray[np.uint64], remote: npt.NDArray[np.uint64]
) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64]]:
    """Checked, C-contiguous (n, 2) uint64 iovec arrays without empty rows."""
    local = np.ascontiguousarray(local, dtype=np.uint64)
    remote = np.ascontiguousarray(remote, dtype=np.uint64)
    if local.ndim != 2 or local.shape[1:] != (2,) or local.shape != remote.shape:
        raise ValueError("iovec arrays must both have shape (n, 2)")
    if not np.array_equal(local[:, 1], remote[:, 1]):
        raise ValueError("local and remote iovec lengths differ")
    if len(local) and not local[:, 1].all():
        keep = local[:, 1] != 0
        local, remote = local[keep], remote[keep]
    return local, remote


def _local_view(
    local: npt.NDArray[np.uint64], views: list[memoryview] | None, index: int
) -> memoryview:
    """The local buffer of iovec row ``index``: the caller's view, or one made from the
    address (for ``read_iov``/``write_iov``, whose caller keeps the memory mapped)."""
    if views is not None:
        return views[index]
    size = int(local[index, 1])
    return memoryview((ctypes.c_char * size).from_address(int(local[index, 0]))).cast("B")


def _make_batch(
    addresses: list[int], lengths: list[int], bases: list[int], views: list[memoryview]
) -> _Batch:
    n = len(views)
    local = np.empty((n, 2), dtype=np.uint64)
    remote = np.empty((n, 2), dtype=np.uint64)
    local[:, 0] = bases
    local[:, 1] = lengths
    remote[:, 0] = addresses
    remote[:, 1] = lengths
    return _Batch(local, remote, views)

"""The executor: walks a plan inside one ptrace session, transactionally.

Order of work (``run``): every step first records its inverse in the undo log, then changes
the target. If any step fails, the log is replayed newest-first and the error says whether the
target is back as it was. After the last step the result is read back and compared with the
image (``verify``).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import struct
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol, TypeVar

import attrs
import numpy as np
import numpy.typing as npt

from applier import regs as regmod
from applier import shared, xsave
from applier.errors import ApplyFailed, MismatchError, RollbackFailed, TargetGone, VerifyFailed
from applier.model import Kind, Region
from applier.plan import (
    Discard,
    MapAnon,
    MapFile,
    Plan,
    Protect,
    SavedRuns,
    SetBrk,
    SetMm,
    SetRegs,
    Unmap,
    WritePages,
    WriteShared,
)
from applier.undo import (
    SavedRange,
    UndoBrk,
    UndoLog,
    UndoMapping,
    UndoMm,
    UndoPages,
    UndoPageTable,
    UndoProtect,
    UndoRecord,
    UndoRegs,
    UndoUnmap,
)
from injector.errors import TargetExited
from injector.memory import buffer_address

__all__ = ["ApplyStats", "Executor", "SessionLike", "set_mm_map"]

SYS_mmap, SYS_mprotect, SYS_munmap, SYS_brk = 9, 10, 11, 12
SYS_madvise, SYS_close, SYS_prctl, SYS_openat = 28, 3, 157, 257
MAP_PRIVATE, MAP_ANONYMOUS, MAP_FIXED, MAP_GROWSDOWN = 0x2, 0x20, 0x10, 0x100
MAP_FIXED_NOREPLACE = 0x100000
MADV_DONTNEED = 4
AT_FDCWD = -100
O_RDONLY, O_CLOEXEC = 0, 0o2000000
PR_SET_MM = 35
PM_PRESENT, PM_FILE = 1 << 63, 1 << 61  # /proc/PID/pagemap bits
IOV_BATCH = 1024  # pieces per batch: IOV_MAX, what one process_vm_readv/writev call takes
PREFETCH_MIN = 256 << 10  # pieces this large are mapped in one madvise, not page by page
CHUNK = 8 << 20  # bytes of page data handled per batch: bounds the applier's memory use
DIRECT_MAX = 8  # batches of at most this many pieces are compared piece by piece, in place
RELEASE_BYTES = 32 << 20  # page data used before its pages-file spans are dropped from memory
RELEASE_SPAN = 2 << 30  # ... or pages-file bytes spanned, for sparse page data


class SessionLike(Protocol):
    """What the executor needs of ``injector.Session``."""

    pid: int

    def syscall(self, nr: int, *args: int, tid: int | None = None) -> int: ...
    def read(self, addr: int, size: int) -> bytes: ...
    def read_into(self, addr: int, buffer: memoryview) -> None: ...
    def read_runs(self, runs: Sequence[tuple[int, memoryview]]) -> None: ...
    def read_iov(self, local: npt.NDArray[np.uint64], remote: npt.NDArray[np.uint64]) -> None: ...
    def write_iov(self, local: npt.NDArray[np.uint64], remote: npt.NDArray[np.uint64]) -> None: ...
    def write(self, addr: int, data: bytes | memoryview) -> None: ...
    def write_runs(self, runs: Sequence[tuple[int, bytes | memoryview]]) -> None: ...
    def page_flags(self, start: int, end: int) -> Any: ...
    def get_regs(self, tid: int) -> Any: ...
    def set_regs(self, tid: int, regs: Any) -> None: ...
    def get_xstate(self, tid: int) -> bytes: ...
    def rseq_config(self, tid: int) -> tuple[int, int, int] | None: ...
    def set_xstate(self, tid: int, data: bytes) -> None: ...


@attrs.define
class ApplyStats:
    pages_written: int = 0
    pages_skipped: int = 0  # identical already (--only-dirty)
    bytes_discarded: int = 0
    layout_changes: int = 0
    threads: int = 0
    syscalls_restarted: int = 0
    verified: bool = False
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


U64 = npt.NDArray[np.uint64]
T = TypeVar("T")
IovIO = Callable[[U64, U64], None]  # read_iov / write_iov: (local, remote) iovec arrays
Reader = Callable[[int, int, int, IovIO], T]  # (first, end, buffer slot, read_iov)


def _iov(addr: U64, length: U64) -> U64:
    """(n, 2) iovec rows from address and length columns."""
    out = np.empty((len(addr), 2), dtype=np.uint64)
    out[:, 0] = addr
    out[:, 1] = length
    return out


def _expand(start: U64, length: U64, step: int) -> U64:
    """``start[i], start[i] + step, ...`` for ``length[i] // step`` values of every i."""
    counts = (length // np.uint64(step)).astype(np.intp)
    index = np.arange(int(counts.sum()), dtype=np.intp)
    index -= np.repeat(np.cumsum(counts) - counts, counts)  # position inside each range
    return np.repeat(start, counts) + index.astype(np.uint64) * np.uint64(step)


class Pieces:
    """The write set of a WritePages step as columns, one row per piece of at most CHUNK
    bytes: target address, length, pages file (index into ``files``) and offset in it, and
    the local address of the bytes in this process's mapping of that file. No Python object
    per page: batches are slices, iovecs are built by numpy.

    The pages files stay mapped while the object is open; the spans used are dropped from
    this process's memory (``release``, see ``used``), so the RSS stays bounded whatever the
    image size. The write pass leaves its last spans mapped for the verification pass that
    follows (which releases them).
    """

    def __init__(self, runs: SavedRuns, page: int) -> None:
        self.page = page
        self.files: list[Any] = []  # formats PagesFile
        self._views: list[memoryview] = []
        used = np.unique(runs.source)
        src_file = np.zeros(len(runs.sources), dtype=np.intp)
        src_delta = np.zeros(len(runs.sources), dtype=np.uint64)  # file offset - vaddr, mod 2**64
        index: dict[int, int] = {}
        for i in used.tolist():
            src: Any = runs.sources[i]
            f = index.setdefault(id(src.pages), len(self.files))
            if f == len(self.files):
                self.files.append(src.pages)
            src_file[i] = f
            src_delta[i] = (src.offset - src.vaddr) % (1 << 64)
        length = runs.npages * np.uint64(page)
        vaddr, source = runs.vaddr, runs.source
        if len(length) and int(length.max()) > CHUNK:  # cut long runs into CHUNK pieces
            counts = ((length + np.uint64(CHUNK - 1)) // np.uint64(CHUNK)).astype(np.intp)
            piece_of = np.repeat(np.arange(len(length)), counts)
            vaddr = _expand(vaddr, counts.astype(np.uint64) * np.uint64(CHUNK), CHUNK)
            end = runs.vaddr[piece_of] + length[piece_of]
            length = np.minimum(np.uint64(CHUNK), end - vaddr)
            source = source[piece_of]
        self.vaddr: U64 = vaddr
        self.length: U64 = length
        self.file = src_file[source]
        self.offset: U64 = vaddr + src_delta[source]
        bases = np.zeros(len(self.files), dtype=np.uint64)
        try:
            for f, pages in enumerate(self.files):
                on = self.file == f
                if on.any():
                    ends = self.offset[on] + self.length[on]
                    worst = int(np.argmax(ends))
                    if int(ends[worst]) > pages.size:  # raises the formats error
                        pages.view(int(self.offset[on][worst]), int(self.length[on][worst]))
                view = pages.view(0, pages.size)
                self._views.append(view)
                bases[f] = buffer_address(view)
        except BaseException:
            self.close()
            raise
        self.local: U64 = bases[self.file] + self.offset
        self._span: dict[int, tuple[int, int]] = {}
        self._unreleased = 0

    def bounds(self) -> list[tuple[int, int]]:
        """(first, end) row slices of at most IOV_BATCH pieces and CHUNK bytes each (or one
        larger piece)."""
        cum = np.cumsum(self.length)
        out: list[tuple[int, int]] = []
        i, n = 0, len(self.length)
        while i < n:
            before = int(cum[i - 1]) if i else 0
            j = int(np.searchsorted(cum, before + CHUNK, side="right"))
            j = min(max(j, i + 1), i + IOV_BATCH)
            out.append((i, j))
            i = j
        return out

    def prefetch(self, i: int, j: int) -> None:
        """Map pieces of PREFETCH_MIN bytes and more of batch ``i:j`` in one call each."""
        big = np.nonzero(self.length[i:j] >= PREFETCH_MIN)[0]
        for k in (i + big).tolist():
            self.files[int(self.file[k])].prefetch(int(self.offset[k]), int(self.length[k]))

    def used(self, i: int, j: int) -> None:
        """Batch ``i:j`` is done with: drop the spans of the pages files used so far once
        RELEASE_BYTES of dense page data went through, or the spans reach RELEASE_SPAN.

        A sparse batch maps more than its pages (fault-around, large folios: touching 1%
        of a 1 GiB file maps all of it here), so dropping sparse spans early bounds nothing
        but makes the next pass over the same pages (the verification) fault them in
        again."""
        for f in np.unique(self.file[i:j]).tolist():
            on = self.file[i:j] == f
            lo = int(self.offset[i:j][on].min())
            hi = int((self.offset[i:j][on] + self.length[i:j][on]).max())
            old = self._span.get(f, (lo, hi))
            self._span[f] = (min(old[0], lo), max(old[1], hi))
        self._unreleased += int(self.length[i:j].sum())
        span = sum(hi - lo for lo, hi in self._span.values())
        dense = span < 4 * self._unreleased
        if (dense and self._unreleased >= RELEASE_BYTES) or span >= RELEASE_SPAN:
            self.release()

    def release(self) -> None:
        for f, (lo, hi) in self._span.items():
            self.files[f].release(lo, hi - lo)
        self._span.clear()
        self._unreleased = 0

    def image_words(self, k: int) -> U64:
        """The image's bytes of piece ``k`` as uint64 words: a view of the mapping, no copy."""
        view = self._views[int(self.file[k])]
        return np.frombuffer(
            view, dtype=np.uint64, count=int(self.length[k]) // 8, offset=int(self.offset[k])
        )

    def image_rows(
        self, i: int, j: int, into: U64, mask: npt.NDArray[np.bool_] | None = None
    ) -> U64:
        """The image's bytes of pieces ``i:j`` (``mask`` selects some), one row per page:
        an (n, page // 8) uint64 array, gathered into the start of ``into``."""
        offset, length, file = self.offset[i:j], self.length[i:j], self.file[i:j]
        if mask is not None:
            offset, length, file = offset[mask], length[mask], file[mask]
        page, words = self.page, self.page // 8
        page_off = _expand(offset, length, page)
        out = into[: len(page_off) * words].reshape(-1, words)
        files = np.unique(file).tolist()
        page_file = (
            None
            if len(files) == 1
            else np.repeat(file, (length // np.uint64(page)).astype(np.intp))
        )
        for f in files:
            flat = np.frombuffer(self._views[f], dtype=np.uint8)
            offs = page_off if page_file is None else page_off[page_file == f]
            if not (offs % np.uint64(page)).any():
                rows = flat[: len(flat) // page * page].view(np.uint64).reshape(-1, words)
                idx = (offs // np.uint64(page)).astype(np.intp)
                if page_file is None:
                    np.take(rows, idx, axis=0, out=out)
                else:
                    out[page_file == f] = rows[idx]
            else:  # pages not at page offsets in the file: gather byte by byte
                idx = offs.astype(np.intp)[:, None] + np.arange(page, dtype=np.intp)
                got = flat[idx].view(np.uint64).reshape(-1, words)
                if page_file is None:
                    out[:] = got
                else:
                    out[page_file == f] = got
            del flat
        return out

    def close(self, *, release: bool = True) -> None:
        if release:
            self.release()
        for view in self._views:
            view.release()
        self._views.clear()


def _inside_any(ranges: list[tuple[int, int]], start: U64, length: U64) -> npt.NDArray[np.bool_]:
    """For each [start, start + length), whether it lies inside one of ``ranges`` (few)."""
    out = np.zeros(len(start), dtype=bool)
    for a, b in ranges:
        out |= (start >= np.uint64(a)) & (start + length <= np.uint64(b))
    return out


def _coalesce(remote: U64, local: U64, length: U64) -> tuple[U64, U64]:
    """Rows that continue each other in both address spaces merged: (local, remote) iovecs."""
    if len(remote) == 0:
        empty = np.empty((0, 2), dtype=np.uint64)
        return empty, empty
    ends_r, ends_l = remote + length, local + length
    starts = np.ones(len(remote), dtype=bool)
    starts[1:] = (remote[1:] != ends_r[:-1]) | (local[1:] != ends_l[:-1])
    firsts = np.nonzero(starts)[0]
    lasts = np.append(firsts[1:] - 1, len(remote) - 1)
    size = ends_r[lasts] - remote[firsts]
    return _iov(local[firsts], size), _iov(remote[firsts], size)


class Progress:
    """A one-line progress bar on stderr, only when stderr is a terminal."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.done = max(total, 1), 0
        self.enabled = enabled and sys.stderr.isatty() and total >= (64 << 20)
        self.last = 0.0

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and (now - self.last > 0.1 or self.done >= self.total):
            self.last = now
            frac = min(1.0, self.done / self.total)
            bar = "#" * int(frac * 30)
            sys.stderr.write(f"\rapplying [{bar:<30}] {frac:4.0%} {self.done >> 20} MiB")
            if self.done >= self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()


@attrs.define
class Executor:
    session: SessionLike
    plan: Plan
    cores: dict[int, Any]  # image tid -> CoreEntry
    undo: UndoLog
    only_dirty: bool = False
    progress: bool = True
    stats: ApplyStats = attrs.field(factory=ApplyStats)
    _buffers: list[npt.NDArray[np.uint64]] = attrs.field(factory=list, init=False, repr=False)

    @property
    def page(self) -> int:
        return self.plan.page_size

    # ------------------------------------------------------------------ validation

    def validate(self) -> None:
        """Checks that need the live process but change nothing; run before the first write."""
        for step in self.plan.steps:
            if isinstance(step, MapFile):
                path = step.region.path or ""
                try:
                    size = os.stat(path).st_size
                except OSError as exc:
                    raise MismatchError(f"cannot map {path} again: {exc.strerror}") from exc
                if step.region.offset >= max(size, 1) and size:
                    raise MismatchError(f"{path} is shorter than the image's mapping needs")
            elif isinstance(step, SetRegs):
                self._image_regs(step)  # raises for foreign register sets
                self._image_xstate(step)
                self._check_rseq(step)

    def _image_regs(self, step: SetRegs) -> tuple[dict[str, int], bool]:
        core = self.cores.get(step.image_tid)
        ti = getattr(core, "thread_info", None) if core is not None else None
        if ti is None:
            raise MismatchError(f"core-{step.image_tid}.img has no x86_64 registers")
        try:
            values = regmod.gpregs_values(ti.gpregs)
        except ValueError as exc:
            raise MismatchError(f"core-{step.image_tid}.img: {exc}") from exc
        adjusted, rewound = regmod.restart_adjusted(values)
        if rewound:
            insn = self.session.read(adjusted["ip"], 2)
            if insn != regmod.SYSCALL_INSN:
                raise MismatchError(
                    f"thread {step.tid}: saved inside a syscall, but no syscall instruction "
                    f"at {adjusted['ip']:#x} to restart it from",
                )
        return adjusted, rewound

    def _check_rseq(self, step: SetRegs) -> None:
        """Refuse to rewind a thread whose rseq registration changed since the checkpoint.

        The registration is kernel state that applying cannot undo: a thread checkpointed
        before glibc registered its rseq area (a thread that was just starting) would run the
        registration again, the kernel would refuse it and glibc would abort the process.
        """
        tc = getattr(self.cores[step.image_tid], "thread_core", None)
        saved = getattr(tc, "rseq_entry", None) if tc is not None else None
        if tc is None:
            return  # no thread state in the image (older dumps): nothing to compare
        want = None if saved is None else (int(saved.rseq_abi_pointer), int(saved.signature))
        live = self.session.rseq_config(step.tid)
        have = None if live is None else (live[0], live[2])
        if want != have:
            raise MismatchError(
                f"thread {step.tid}: rseq area {_rseq_text(have)} now, {_rseq_text(want)} in "
                "the image "
                "(registered after the checkpoint: its registers cannot be rewound; leave "
                "registers out with --restore memory,layout,brk)",
            )

    def _image_xstate(self, step: SetRegs) -> bytes | None:
        """The thread's XSAVE buffer with the image's FP state, or None if the image has none."""
        fpregs = getattr(self.cores[step.image_tid].thread_info, "fpregs", None)
        if fpregs is None:
            return None
        try:
            return xsave.fpregs_into_xstate(fpregs, self.session.get_xstate(step.tid))
        except ValueError as exc:
            raise MismatchError(f"thread {step.tid}: {exc}") from exc

    # ------------------------------------------------------------------ running

    def run(self) -> ApplyStats:
        started = time.perf_counter()
        self.validate()
        try:
            for step in self.plan.steps:
                self._do(step)
        except BaseException as exc:
            self._rollback_after(exc)
            raise AssertionError("unreachable") from exc
        self.stats.seconds = time.perf_counter() - started
        return self.stats

    def _rollback_after(self, exc: BaseException) -> None:
        # A target killed a moment ago may not be a zombie yet; the injector's TargetExited
        # says so for certain.
        if isinstance(exc, TargetExited) or not _alive(self.session.pid):
            raise TargetGone(f"pid {self.session.pid} exited during the apply ({exc})") from exc
        if not self.undo.enabled:
            raise RollbackFailed(
                f"apply failed ({exc}) and was not rolled back (--no-undo); "
                f"pid {self.session.pid} may be inconsistent",
            ) from exc
        try:
            rollback(self.session, self.undo)
        except TargetExited as rb_exc:
            raise TargetGone(f"pid {self.session.pid} exited during the apply ({exc})") from rb_exc
        except Exception as rb_exc:
            raise RollbackFailed(
                f"apply failed ({exc}) and rolling back failed too ({rb_exc}); "
                f"pid {self.session.pid} may be inconsistent",
            ) from rb_exc
        if isinstance(exc, KeyboardInterrupt):
            raise exc
        raise ApplyFailed(
            f"apply failed ({exc}); pid {self.session.pid} was rolled back to its state "
            "before the apply",
        ) from exc

    def _do(self, step: object) -> None:
        s = self.session
        if isinstance(step, SetBrk):
            old = s.syscall(SYS_brk, 0)
            lost = (_align(step.new, self.page), _align(old, self.page))
            if lost[0] < lost[1]:
                # brk shrinking unmaps the heap's tail: keep it; on rollback brk(old) comes
                # first (records replay newest first) and these pages are rewritten after it.
                self.undo.add(UndoPages(self._save([lost])))
            self.undo.add(UndoBrk(old))
            got = s.syscall(SYS_brk, step.new)
            if got != step.new:
                raise MismatchError(f"brk({step.new:#x}) refused by the kernel (break {got:#x})")
        elif isinstance(step, SetMm):
            set_mm_map(s, step.new)
            # Recorded after the call: a call the kernel refused changed nothing to undo.
            self.undo.add(UndoMm(tuple(step.old.items())))
        elif isinstance(step, Unmap):
            saved = self._save(_saveable(step.region, self.page, s))
            self.undo.add(UndoUnmap(step.region, saved))
            s.syscall(SYS_munmap, step.start, step.end - step.start)
            self.stats.layout_changes += 1
        elif isinstance(step, MapAnon | MapFile):
            self.undo.add(UndoMapping(step.region.start, step.region.end))
            map_region(s, step.region)
            self.stats.layout_changes += 1
        elif isinstance(step, Protect):
            self.undo.add(UndoProtect(step.start, step.end, step.old))
            s.syscall(SYS_mprotect, step.start, step.end - step.start, step.new)
            self.stats.layout_changes += 1
        elif isinstance(step, WritePages):
            self._write_pages(step)
        elif isinstance(step, Discard):
            self.undo.add(UndoPages(self._save(list(step.ranges))))
            for a, b in step.ranges:
                s.syscall(SYS_madvise, a, b - a, MADV_DONTNEED)
            self.stats.bytes_discarded += step.nr_bytes
        elif isinstance(step, WriteShared):
            self.stats.pages_written += shared.write_shared(s, self.undo, step, self.page)
        elif isinstance(step, SetRegs):
            self._set_regs(step)
        else:  # pragma: no cover - the plan's step union is closed
            raise TypeError(f"unknown step {step!r}")

    def _save(self, ranges: list[tuple[int, int]]) -> tuple[SavedRange, ...]:
        return self.undo.save_ranges(ranges, self.session.read_runs)

    def _recreated(self) -> list[tuple[int, int]]:
        return [
            (st.region.start, st.region.end)
            for st in self.plan.steps
            if isinstance(st, MapAnon | MapFile)
        ]

    def _scratch(self, which: int) -> U64:
        """CHUNK-byte buffers of this executor, allocated on first use: 0 and 1 for target
        memory read (old contents, read-back; two so that one batch is read while the one
        before is handled), 2 for image pages gathered for a compare."""
        while len(self._buffers) <= which:
            self._buffers.append(np.empty(CHUNK // 8, dtype=np.uint64))
        return self._buffers[which]

    def _read_ahead(
        self, pieces: Pieces, read: Reader[T], *, ahead: bool = True
    ) -> Iterator[tuple[int, int, T]]:
        """(first, end, read(first, end, slot, read_iov)) for every batch of ``pieces``, in
        order. With ``ahead``, the read of the next batch runs on a worker thread
        (process_vm_readv releases the GIL) while the caller handles the current one, which
        uses the other buffer slot (0, 1). The worker reads through the session's MemoryIO
        (the session itself takes requests from the attaching thread only); a read that
        fails there, e.g. one that needs the mprotect round trip (ptrace), is run again on
        the caller's thread."""
        bounds = pieces.bounds()
        memory = getattr(self.session, "memory", None) if ahead else None  # Session.memory
        offload: IovIO | None = getattr(memory, "read_iov", None)
        if len(bounds) < 2 or offload is None:
            for i, j in bounds:
                pieces.prefetch(i, j)
                yield i, j, read(i, j, 0, self.session.read_iov)
            return
        self._scratch(1)  # both slots exist before the worker uses one
        worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="applier-read")
        try:
            future = worker.submit(read, *bounds[0], 0, offload)
            for n, (i, j) in enumerate(bounds):
                pieces.prefetch(i, j)
                try:
                    got = future.result()
                except Exception:
                    got = read(i, j, n % 2, self.session.read_iov)
                if n + 1 < len(bounds):
                    future = worker.submit(read, *bounds[n + 1], (n + 1) % 2, offload)
                yield i, j, got
        finally:
            worker.shutdown(wait=True)  # never leave it writing into a buffer

    def _write_pages(self, step: WritePages) -> None:
        """Write the saved pages in batches: per batch one read of the old contents (then
        appended to the undo spool), optionally one compare, one batched write."""
        page = self.page
        progress = Progress(step.nr_pages * page, self.progress)
        pieces = Pieces(step.runs, page)
        release = True
        try:
            # Pieces in regions this apply created hold nothing worth keeping.
            olds = ~_inside_any(self._recreated(), pieces.vaddr, pieces.length)
            read_old = self.undo.enabled or self.only_dirty

            def read(i: int, j: int, slot: int, read_iov: IovIO) -> U64 | None:
                """The old contents of batch ``i:j`` (its pieces to keep), or None."""
                keep = olds[i:j]
                if not (read_old and keep.any()):
                    return None
                length = pieces.length[i:j][keep]
                pos = np.cumsum(length) - length
                old = self._scratch(slot)[: int(length.sum()) // 8]
                base = np.uint64(old.ctypes.data)
                read_iov(_iov(base + pos, length), _iov(pieces.vaddr[i:j][keep], length))
                return old

            # No read-ahead of old contents: reading the next batch while this one is
            # written makes both copies slower (measured: they contend in the target).
            for i, j, old in self._read_ahead(pieces, read, ahead=False):
                keep = olds[i:j]
                total = int(pieces.length[i:j].sum())
                local, remote = _iov(pieces.local[i:j], pieces.length[i:j]), None
                if old is not None:
                    length = pieces.length[i:j][keep]
                    addr = pieces.vaddr[i:j][keep]
                    pos = np.cumsum(length) - length
                    if self.undo.enabled:
                        offset = self.undo.append(old.data)
                        self.undo.add(UndoPageTable(addr, length, pos + np.uint64(offset)))
                    if self.only_dirty:
                        local, remote = self._differing(pieces, i, j, keep, old)
                if remote is None:
                    remote = _iov(pieces.vaddr[i:j], pieces.length[i:j])
                if len(remote):
                    self.session.write_iov(local, remote)
                written = int(remote[:, 1].sum())
                self.stats.pages_written += written // page
                self.stats.pages_skipped += (total - written) // page
                progress.advance(total)
                pieces.used(i, j)
            release = False  # the verification reads the same pages of the image again
        finally:
            pieces.close(release=release)

    def _differing(
        self, pieces: Pieces, i: int, j: int, keep: npt.NDArray[np.bool_], old: U64
    ) -> tuple[U64, U64]:
        """(local, remote) iovecs of what batch ``i:j`` must write with --only-dirty: the
        pieces without old contents (``keep`` false) whole, and of the others (whose old
        contents are in ``old``, back to back) the pages that differ from the image."""
        page = self.page
        want = pieces.image_rows(i, j, self._scratch(2), keep)
        differs = (want != old.reshape(want.shape)).any(axis=1)
        length = pieces.length[i:j]
        page_addr = _expand(pieces.vaddr[i:j][keep], length[keep], page)[differs]
        page_local = _expand(pieces.local[i:j][keep], length[keep], page)[differs]
        remote = np.concatenate((pieces.vaddr[i:j][~keep], page_addr))
        local = np.concatenate((pieces.local[i:j][~keep], page_local))
        sizes = np.concatenate((length[~keep], np.full(len(page_addr), page, dtype=np.uint64)))
        order = np.argsort(remote, kind="stable")
        return _coalesce(remote[order], local[order], sizes[order])

    def _set_regs(self, step: SetRegs) -> None:
        s = self.session
        values, rewound = self._image_regs(step)
        live_regs = s.get_regs(step.tid)
        live_x = s.get_xstate(step.tid)
        self.undo.add(UndoRegs(step.tid, live_regs, live_x))
        new_xstate = self._image_xstate(step)
        if new_xstate is not None:
            s.set_xstate(step.tid, new_xstate)
        s.set_regs(step.tid, attrs.evolve(live_regs, **values))
        self.stats.threads += 1
        self.stats.syscalls_restarted += rewound

    # ------------------------------------------------------------------ verification

    def _verify_pages(self, step: WritePages) -> None:
        """Read every written piece back (one process_vm_readv per batch) and compare it with
        the image, one numpy compare per batch."""
        page = self.page
        pieces = Pieces(step.runs, page)
        rows = self._scratch(2)

        def read(i: int, j: int, slot: int, read_iov: IovIO) -> U64:
            length = pieces.length[i:j]
            pos = np.cumsum(length) - length
            buf = self._scratch(slot)
            base = np.uint64(buf.ctypes.data)
            read_iov(_iov(base + pos, length), _iov(pieces.vaddr[i:j], length))
            return buf

        try:
            for i, j, buf in self._read_ahead(pieces, read):
                length = pieces.length[i:j]
                pos = np.cumsum(length) - length
                if (
                    j - i <= DIRECT_MAX
                    and all(  # few large pieces: compare in place
                        np.array_equal(buf[p // 8 : (p + n) // 8], pieces.image_words(k))
                        for k, p, n in zip(range(i, j), pos.tolist(), length.tolist(), strict=True)
                    )
                ):
                    pieces.used(i, j)
                    continue
                want = pieces.image_rows(i, j, rows)
                have = buf[: want.size].reshape(want.shape)
                if not np.array_equal(want, have):
                    bad = int(np.argmax((want != have).any(axis=1)))
                    addr = _expand(pieces.vaddr[i:j], length, page)[bad]
                    raise VerifyFailed(
                        f"pid {self.session.pid}: page {int(addr):#x} differs from the image "
                        "after writing",
                    )
                pieces.used(i, j)
        finally:
            pieces.close()

    def verify(self) -> None:
        """Read back what was written and compare it with the image; raise VerifyFailed."""
        page = self.page
        for step in self.plan.steps:
            if isinstance(step, WritePages):
                self._verify_pages(step)
            elif isinstance(step, Discard):
                # Checked through pagemap, not by reading: a read would fault the zero page
                # (or the file's page) in and make the page present again.
                # Only bit 63: a page discarded a moment ago is not in swap, and in a range
                # registered for userfaultfd write-protection the kernel leaves a PTE marker
                # that pagemap shows with the swap bit set.
                for a, b in step.ranges:
                    flags = self.session.page_flags(a, b)
                    present = (flags & np.uint64(PM_PRESENT)) != 0
                    own = present & ((flags & np.uint64(PM_FILE)) == 0)
                    left = np.nonzero(own if step.reason == "file" else present)[0]
                    if len(left):
                        raise VerifyFailed(
                            f"pid {self.session.pid}: page {a + int(left[0]) * page:#x} still "
                            "holds data after discarding",
                        )
            elif isinstance(step, WriteShared):
                shared.verify_shared(self.session, step, page)
            elif isinstance(step, SetRegs):
                values, _ = self._image_regs(step)
                got = self.session.get_regs(step.tid)
                for name, expected in values.items():
                    if name in ("fs", "gs", "ds", "es", "cs", "ss"):
                        continue  # the kernel may normalise selectors
                    if int(getattr(got, name)) & ((1 << 64) - 1) != expected:
                        raise VerifyFailed(f"thread {step.tid}: register {name} not restored")
        self.stats.verified = True


def _rseq_text(rseq: tuple[int, int] | None) -> str:
    return "none" if rseq is None else f"{rseq[0]:#x}"


def _alive(pid: int) -> bool:
    """Whether ``pid`` still exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2 :][:1] not in (b"Z", b"X")


def _align(x: int, page: int) -> int:
    return (x + page - 1) // page * page


def _inside(ranges: list[tuple[int, int]], a: int, b: int) -> bool:
    """Whether [a, b) lies inside one of ``ranges`` (few: the regions an apply re-creates)."""
    return any(s <= a and b <= e for s, e in ranges)


def _u64(view: memoryview) -> np.ndarray:
    """A page-aligned byte view as uint64 words, for fast numpy compares."""
    return np.frombuffer(view, dtype=np.uint64)


def _first_difference(a: memoryview, b: memoryview) -> int:
    x = np.frombuffer(a, dtype=np.uint8)
    y = np.frombuffer(b, dtype=np.uint8)
    return int(np.argmax(x != y))


def _differing_pages(
    addr: int, data: memoryview, live: memoryview, page: int
) -> list[tuple[int, memoryview]]:
    """Runs of pages whose saved bytes differ from the live bytes (numpy, one compare)."""
    want = _u64(data).reshape(-1, page // 8)
    have = _u64(live).reshape(-1, page // 8)
    differs = np.nonzero((want != have).any(axis=1))[0]
    out: list[tuple[int, memoryview]] = []
    if len(differs) == 0:
        return out
    breaks = np.nonzero(np.diff(differs) != 1)[0]
    firsts = np.concatenate(([0], breaks + 1))
    lasts = np.concatenate((breaks, [len(differs) - 1]))
    for f, last in zip(firsts, lasts, strict=True):
        i, j = int(differs[f]), int(differs[last]) + 1
        out.append((addr + i * page, data[i * page : j * page]))
    return out


def _saveable(region: Region, page: int, s: SessionLike) -> list[tuple[int, int]]:
    """Ranges of a region worth saving before it goes away (all of it: contents must survive)."""
    del page, s
    return [(region.start, region.end)]


def map_region(s: SessionLike, region: Region) -> None:
    """Create ``region`` in the target at its exact address (never over an existing mapping)."""
    length = region.end - region.start
    if region.kind is Kind.ANON:
        flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE
        if region.growsdown:
            flags |= MAP_GROWSDOWN
        got = s.syscall(SYS_mmap, region.start, length, region.prot, flags, -1 & 0xFFFFFFFF, 0)
    elif region.kind is Kind.FILE:
        got = _map_file(s, region)
    else:
        raise MismatchError(f"cannot re-create {region.describe()}")
    if got != region.start:
        raise MismatchError(f"mmap placed {region.describe()} at {got:#x}")


@contextlib.contextmanager
def scratch_memory(s: SessionLike, data: bytes) -> Iterator[int]:
    """``data`` in a fresh anonymous mapping of the target, for syscalls that take a pointer;
    unmapped afterwards."""
    length = (len(data) + 4095) // 4096 * 4096
    addr = s.syscall(SYS_mmap, 0, length, 3, MAP_PRIVATE | MAP_ANONYMOUS, -1 & 0xFFFFFFFF, 0)
    try:
        s.write(addr, data)
        yield addr
    finally:
        s.syscall(SYS_munmap, addr, length)


# struct prctl_mm_map (include/uapi/linux/prctl.h): 11 u64 bounds, auxv pointer, auxv_size,
# exe_fd. auxv NULL/0 and exe_fd -1 leave the saved auxv and /proc/PID/exe as they are.
_MM_MAP_ORDER = (
    "mm_start_code", "mm_end_code", "mm_start_data", "mm_end_data", "mm_start_brk", "brk",
    "mm_start_stack", "mm_arg_start", "mm_arg_end", "mm_env_start", "mm_env_end",
)  # fmt: skip
PR_SET_MM_MAP = 14


def set_mm_map(s: SessionLike, fields: dict[str, int]) -> None:
    """prctl(PR_SET_MM, PR_SET_MM_MAP) with ``fields``; the program break stays where it is
    now (brk is the brk step's business)."""
    values = {**fields, "brk": s.syscall(SYS_brk, 0)}
    blob = struct.pack("<11QQII", *(values[n] for n in _MM_MAP_ORDER), 0, 0, 0xFFFFFFFF)
    with scratch_memory(s, blob) as addr:
        s.syscall(SYS_prctl, PR_SET_MM, PR_SET_MM_MAP, addr, len(blob), 0)


def _map_file(s: SessionLike, region: Region) -> int:
    """openat + mmap + close inside the target, with the path in a scratch page."""
    path = (region.path or "").encode() + b"\0"
    with scratch_memory(s, path) as scratch:
        fd = s.syscall(SYS_openat, AT_FDCWD & ((1 << 64) - 1), scratch, O_RDONLY | O_CLOEXEC, 0)
        try:
            return s.syscall(
                SYS_mmap,
                region.start,
                region.end - region.start,
                region.prot,
                MAP_PRIVATE | MAP_FIXED_NOREPLACE,
                fd,
                region.offset,
            )
        finally:
            s.syscall(SYS_close, fd)


def rollback(s: SessionLike, undo: UndoLog) -> None:
    """Replay the undo log newest first. Raises on the first inverse that fails."""
    records: list[UndoRecord] = list(reversed(undo.records))
    for rec in records:
        if isinstance(rec, UndoPages):
            _restore_pages(s, undo, rec.ranges)
        elif isinstance(rec, UndoPageTable):
            undo.restore_table(rec, s.write_iov)
        elif isinstance(rec, UndoMapping):
            s.syscall(SYS_munmap, rec.start, rec.end - rec.start)
        elif isinstance(rec, UndoUnmap):
            region = attrs.evolve(rec.region, prot=rec.region.prot)
            map_region(s, region)
            _restore_pages(s, undo, rec.pages)
        elif isinstance(rec, UndoProtect):
            s.syscall(SYS_mprotect, rec.start, rec.end - rec.start, rec.prot)
        elif isinstance(rec, UndoBrk):
            s.syscall(SYS_brk, rec.brk)
        elif isinstance(rec, UndoMm):
            set_mm_map(s, dict(rec.values))
        elif isinstance(rec, UndoRegs):
            if rec.xstate is not None:
                s.set_xstate(rec.tid, rec.xstate)
            s.set_regs(rec.tid, rec.regs)
    undo.records.clear()


def _restore_pages(s: SessionLike, undo: UndoLog, ranges: tuple[SavedRange, ...]) -> None:
    for addr, data in undo.iter_saved(ranges):
        s.write(addr, data)

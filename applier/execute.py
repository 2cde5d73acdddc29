"""The executor: walks a plan inside one ptrace session, transactionally.

Order of work (``run``): every step first records its inverse in the undo log, then changes
the target. If any step fails, the log is replayed newest-first and the error says whether the
target is back as it was. After the last step the result is read back and compared with the
image (``verify``).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import attrs
import numpy as np

from applier import regs as regmod
from applier import xsave
from applier.errors import ApplyFailed, MismatchError, RollbackFailed, TargetGone, VerifyFailed
from applier.model import Kind, Region, SavedPages
from applier.plan import (
    Discard,
    MapAnon,
    MapFile,
    Plan,
    Protect,
    SetBrk,
    SetMm,
    SetRegs,
    Unmap,
    WritePages,
)
from applier.undo import (
    SavedRange,
    UndoBrk,
    UndoLog,
    UndoMapping,
    UndoMm,
    UndoPages,
    UndoProtect,
    UndoRecord,
    UndoRegs,
    UndoUnmap,
)

__all__ = ["PR_SET_MM_OPTIONS", "ApplyStats", "Executor", "SessionLike"]

SYS_mmap, SYS_mprotect, SYS_munmap, SYS_brk = 9, 10, 11, 12
SYS_madvise, SYS_close, SYS_prctl, SYS_openat = 28, 3, 157, 257
MAP_PRIVATE, MAP_ANONYMOUS, MAP_FIXED, MAP_GROWSDOWN = 0x2, 0x20, 0x10, 0x100
MAP_FIXED_NOREPLACE = 0x100000
MADV_DONTNEED = 4
AT_FDCWD = -100
O_RDONLY, O_CLOEXEC = 0, 0o2000000
PR_SET_MM = 35
# mm_entry field -> PR_SET_MM_* option (include/uapi/linux/prctl.h)
PR_SET_MM_OPTIONS = {
    "mm_start_code": 1,
    "mm_end_code": 2,
    "mm_start_data": 3,
    "mm_end_data": 4,
    "mm_start_stack": 5,
    "mm_start_brk": 6,
    "mm_arg_start": 8,
    "mm_arg_end": 9,
    "mm_env_start": 10,
    "mm_env_end": 11,
}
PM_PRESENT, PM_FILE = 1 << 63, 1 << 61  # /proc/PID/pagemap bits
IOV_BATCH = 1024  # pieces per batch: IOV_MAX, what one process_vm_readv/writev call takes
PREFETCH_MIN = 256 << 10  # pieces this large are mapped in one madvise, not page by page
CHUNK = 8 << 20  # bytes of page data handled per batch: bounds the applier's memory use


class SessionLike(Protocol):
    """What the executor needs of ``injector.Session``."""

    pid: int

    def syscall(self, nr: int, *args: int, tid: int | None = None) -> int: ...
    def read(self, addr: int, size: int) -> bytes: ...
    def read_into(self, addr: int, buffer: memoryview) -> None: ...
    def read_runs(self, runs: Sequence[tuple[int, memoryview]]) -> None: ...
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


def page_view(run: SavedPages, vaddr: int, length: int) -> memoryview:
    """Saved bytes of ``[vaddr, vaddr+length)`` inside ``run`` (a formats PageRun source)."""
    src: Any = run.source
    return memoryview(src.pages.view(src.offset + (vaddr - src.vaddr), length))


def iter_batches(runs: Sequence[SavedPages], page: int) -> Iterator[list[tuple[int, memoryview]]]:
    """Lists of (address, saved bytes) pieces: at most IOV_BATCH pieces and CHUNK bytes each.

    Large pieces are mapped from the pages file in one call before the batch is handed out;
    once the consumer asks for the next batch, the span of the pages file this batch used is
    dropped from this process's memory, so the RSS stays at about one batch whatever the
    image size.
    """
    batch: list[tuple[int, memoryview]] = []
    spans: dict[Any, tuple[int, int]] = {}  # PagesFile -> (first offset, end offset) used
    size = 0

    def flush() -> Iterator[list[tuple[int, memoryview]]]:
        yield batch
        for pages, (lo, hi) in spans.items():
            pages.release(lo, hi - lo)

    for run in runs:
        src: Any = run.source
        addr, end = run.vaddr, run.vaddr + run.nr_pages * page
        while addr < end:
            n = min(CHUNK, end - addr)
            if batch and (len(batch) >= IOV_BATCH or size + n > CHUNK):
                yield from flush()
                batch, spans, size = [], {}, 0
            offset = src.offset + (addr - src.vaddr)
            if n >= PREFETCH_MIN:
                src.pages.prefetch(offset, n)
            lo, hi = spans.get(src.pages, (offset, offset + n))
            spans[src.pages] = (min(lo, offset), max(hi, offset + n))
            batch.append((addr, page_view(run, addr, n)))
            size += n
            addr += n
    if batch:
        yield from flush()


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
        if not _alive(self.session.pid):
            raise TargetGone(f"pid {self.session.pid} exited during the apply ({exc})") from exc
        if not self.undo.enabled:
            raise RollbackFailed(
                f"apply failed ({exc}) and was not rolled back (--no-undo); "
                f"pid {self.session.pid} may be inconsistent",
            ) from exc
        try:
            rollback(self.session, self.undo)
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
            self.undo.add(UndoMm(step.field, step.old))
            s.syscall(SYS_prctl, PR_SET_MM, PR_SET_MM_OPTIONS[step.field], step.new, 0, 0)
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

    def _write_pages(self, step: WritePages) -> None:
        """Write the saved pages in batches: per batch one read of the old contents (straight
        into the undo spool), optionally one compare, one batched write."""
        page = self.page
        fresh = self._recreated()
        progress = Progress(step.nr_pages * page, self.progress)
        scratch = bytearray(CHUNK) if not self.undo.enabled else None
        for batch in iter_batches(step.runs, page):
            # Pieces in regions this apply created hold nothing worth keeping.
            olds = [
                (addr, len(data))
                for addr, data in batch
                if not (fresh and _inside(fresh, addr, addr + len(data)))
            ]
            pieces = batch
            if olds and self.undo.enabled:
                with self.undo.window(sum(n for _, n in olds)) as (offset, window):
                    pieces = self._keep_and_compare(batch, olds, window)
                    ranges, pos = [], offset
                    for addr, n in olds:
                        ranges.append(SavedRange(addr, n, pos))
                        pos += n
                    self.undo.add(UndoPages(tuple(ranges)))
                    del window
            elif olds and scratch is not None and self.only_dirty:
                pieces = self._keep_and_compare(batch, olds, memoryview(scratch))
            if pieces:
                self.session.write_runs(pieces)
            written = sum(len(d) for _, d in pieces)
            self.stats.pages_written += written // page
            self.stats.pages_skipped += (sum(len(d) for _, d in batch) - written) // page
            progress.advance(sum(len(d) for _, d in batch))

    def _keep_and_compare(
        self,
        batch: list[tuple[int, memoryview]],
        olds: list[tuple[int, int]],
        into: memoryview,
    ) -> list[tuple[int, memoryview]]:
        """Read the old contents of ``olds`` into ``into``; return the pieces to write (with
        --only-dirty, just the pages that differ from the image)."""
        views: list[tuple[int, memoryview]] = []
        pos = 0
        for addr, n in olds:
            views.append((addr, into[pos : pos + n]))
            pos += n
        self.session.read_runs(views)
        if not self.only_dirty:
            return batch
        old_of = dict(views)
        out: list[tuple[int, memoryview]] = []
        for addr, data in batch:
            live = old_of.get(addr)
            out += [(addr, data)] if live is None else _differing_pages(addr, data, live, self.page)
        return out

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

    def verify(self) -> None:
        """Read back what was written and compare it with the image; raise VerifyFailed."""
        page = self.page
        buf = bytearray(CHUNK)
        for step in self.plan.steps:
            if isinstance(step, WritePages):
                for batch in iter_batches(step.runs, page):
                    lives: list[tuple[int, memoryview]] = []
                    used = 0
                    for addr, data in batch:
                        lives.append((addr, memoryview(buf)[used : used + len(data)]))
                        used += len(data)
                    self.session.read_runs(lives)
                    want = b"".join(data for _, data in batch)
                    if not np.array_equal(_u64(memoryview(buf)[:used]), _u64(memoryview(want))):
                        for (addr, data), (_, live) in zip(batch, lives, strict=True):
                            if not np.array_equal(_u64(live), _u64(data)):
                                bad = _first_difference(data, live)
                                raise VerifyFailed(
                                    f"pid {self.session.pid}: page "
                                    f"{addr + bad // page * page:#x} differs from the image "
                                    "after writing",
                                )
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


def _map_file(s: SessionLike, region: Region) -> int:
    """openat + mmap + close inside the target, with the path in a scratch page."""
    path = (region.path or "").encode() + b"\0"
    scratch_len = (len(path) + 4095) // 4096 * 4096
    scratch = s.syscall(
        SYS_mmap, 0, scratch_len, 3, MAP_PRIVATE | MAP_ANONYMOUS, -1 & 0xFFFFFFFF, 0
    )
    try:
        s.write(scratch, path)
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
    finally:
        s.syscall(SYS_munmap, scratch, scratch_len)


def rollback(s: SessionLike, undo: UndoLog) -> None:
    """Replay the undo log newest first. Raises on the first inverse that fails."""
    records: list[UndoRecord] = list(reversed(undo.records))
    for rec in records:
        if isinstance(rec, UndoPages):
            _restore_pages(s, undo, rec.ranges)
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
            s.syscall(SYS_prctl, PR_SET_MM, PR_SET_MM_OPTIONS[rec.field], rec.value, 0, 0)
        elif isinstance(rec, UndoRegs):
            if rec.xstate is not None:
                s.set_xstate(rec.tid, rec.xstate)
            s.set_regs(rec.tid, rec.regs)
    undo.records.clear()


def _restore_pages(s: SessionLike, undo: UndoLog, ranges: tuple[SavedRange, ...]) -> None:
    for addr, data in undo.iter_saved(ranges):
        s.write(addr, data)

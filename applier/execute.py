"""The executor: walks a plan inside one ptrace session, transactionally.

Order of work (``run``): every step first records its inverse in the undo log, then changes
the target. If any step fails, the log is replayed newest-first and the error says whether the
target is back as it was. After the last step the result is read back and compared with the
image (``verify``).
"""

from __future__ import annotations

import concurrent.futures
import os
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import attrs
import numpy as np
import numpy.typing as npt

from applier import regs as regmod
from applier import shared, xsave
from applier.errors import ApplyFailed, MismatchError, RollbackFailed, TargetGone, VerifyFailed
from applier.pieces import (
    CHUNK,
    U64,
    Pieces,
    coalesce,
    expand_ranges,
    inside_any,
    iov_rows,
)
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
    WriteShared,
)
from applier.progress import Progress
from applier.ranges import align_up
from applier.target_ops import (
    MADV_DONTNEED,
    SessionLike,
    SYS_brk,
    SYS_madvise,
    SYS_mprotect,
    SYS_munmap,
    map_region,
    rollback,
    set_mm_map,
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
    UndoRegs,
    UndoUnmap,
)
from injector.errors import TargetExited
from injector.maps import PAGEMAP_FILE, PAGEMAP_PRESENT, read_stat

__all__ = ["ApplyStats", "Executor"]

DIRECT_MAX = 8  # batches of at most this many pieces are compared piece by piece, in place


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


T = TypeVar("T")
IovIO = Callable[[U64, U64], None]  # read_iov / write_iov: (local, remote) iovec arrays
Reader = Callable[[int, int, int, IovIO], T]  # (first, end, buffer slot, read_iov)


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
            lost = (align_up(step.new, self.page), align_up(old, self.page))
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
            # all of it: the contents must survive the unmap (rollback maps it again)
            saved = self._save([(step.region.start, step.region.end)])
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
            olds = ~inside_any(self._recreated(), pieces.vaddr, pieces.length)
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
                read_iov(iov_rows(base + pos, length), iov_rows(pieces.vaddr[i:j][keep], length))
                return old

            # No read-ahead of old contents: reading the next batch while this one is
            # written makes both copies slower (measured: they contend in the target).
            for i, j, old in self._read_ahead(pieces, read, ahead=False):
                keep = olds[i:j]
                total = int(pieces.length[i:j].sum())
                local, remote = iov_rows(pieces.local[i:j], pieces.length[i:j]), None
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
                    remote = iov_rows(pieces.vaddr[i:j], pieces.length[i:j])
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
        page_addr = expand_ranges(pieces.vaddr[i:j][keep], length[keep], page)[differs]
        page_local = expand_ranges(pieces.local[i:j][keep], length[keep], page)[differs]
        remote = np.concatenate((pieces.vaddr[i:j][~keep], page_addr))
        local = np.concatenate((pieces.local[i:j][~keep], page_local))
        sizes = np.concatenate((length[~keep], np.full(len(page_addr), page, dtype=np.uint64)))
        order = np.argsort(remote, kind="stable")
        return coalesce(remote[order], local[order], sizes[order])

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
            read_iov(iov_rows(base + pos, length), iov_rows(pieces.vaddr[i:j], length))
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
                    addr = expand_ranges(pieces.vaddr[i:j], length, page)[bad]
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
                    present = (flags & PAGEMAP_PRESENT) != 0
                    own = present & ((flags & PAGEMAP_FILE) == 0)
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
        return read_stat(pid)[0][:1] not in (b"Z", b"X")
    except OSError:
        return False


def _u64(view: memoryview) -> np.ndarray:
    """A page-aligned byte view as uint64 words, for fast numpy compares."""
    return np.frombuffer(view, dtype=np.uint64)

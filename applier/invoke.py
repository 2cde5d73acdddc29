"""``applier call``: run one function inside a live process, and undo what it did if asked.

>>> result = call(pid, "bump", 7)                 # the value it returned, the pages it wrote
>>> result = call(pid, "bump", 7, rollback=True)  # and the process is back as before the call
>>> with rollback(pid):                           # a checkpoint on entry, restored on exit
...     poke(server)

How a call runs (x86_64, System V ABI), with every thread of the target stopped:

1. The target is held (a group stop under ptrace, ``Tracer.hold``) and a journal names the
   checkpoint (``applier.journal``): if applier dies during the call, the target stays
   stopped and ``applier recover`` applies the checkpoint. Then a full checkpoint
   (``applier.dump.dump_process``, into a temporary directory or ``record/before``) and a
   dirty-page tracker (``injector.tracking``, uffd-wp here, its userfaultfd open in this
   process only) are taken: "before the call" is that moment.
2. String arguments are copied into one fresh anonymous mapping (scratch) of the target.
3. The calling thread (the leader, or ``thread``) gets new registers: ``rip`` = the function,
   the arguments in ``rdi, rsi, rdx, rcx, r8, r9``, ``rax`` = 0 (no vector arguments for a
   variadic callee), the direction flag clear, ``orig_rax`` = -1 (an interrupted system call
   is not restarted into the function). The stack pointer goes 128 bytes below the thread's
   own (the red zone stays as it was), aligned to 16, and the return address pushed there is
   ``RETURN_TRAP``: an address no mapping covers, so the function's ``ret`` faults on the
   instruction fetch. The tracer sees that SIGSEGV (``rip`` = the trap, ``rsp`` just above
   the pushed slot), discards it and reads ``rax``. No code is written anywhere.
4. Only that thread is resumed (``PTRACE_CONT``); the others stay in their ptrace stops for
   the whole call. Signals other than crash signals that reach the thread during the call are
   delivered to it, as they would be during a real call.
5. Afterwards the thread is stopped again (``PTRACE_INTERRUPT``) and its general-purpose and
   XSAVE registers are put back exactly; the scratch mapping is unmapped.
6. The tracker says which pages were written during the call (the scratch mapping left out).
   If another tracker follows the target (``dump --track``'s holder, an open
   ``Checkpoint``, ``rollback()``), the call's tracker compares page contents instead, so as
   not to disturb the other one's write-protection.
   With ``record``, ``record/after`` is an incremental image on top of ``record/before``
   holding exactly those pages (``applier.dump.dump_layer``).
7. If the function crashed (SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT, SIGTRAP, SIGSYS), did
   not return within ``timeout`` seconds, or ``rollback`` was asked, the checkpoint is applied
   back in the same session with the tracker's pages as the dirty set (``applier.api``): only
   what the call changed is written, layout and break are put back, registers too.
8. The tracker is closed (nothing of it was ever left in the target), the journal removed,
   and the target let go (SIGCONT ends the hold).

Kernel state the function changes (descriptors it opens or closes, file offsets, the signal
mask, threads it starts) is not rolled back: only memory, layout, program break and registers.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import attrs
import numpy as np
import numpy.typing as npt

from applier.errors import (
    ApplierError,
    CallCrashed,
    CallTimedOut,
    RollbackFailed,
    TargetBusy,
    UsageError,
)
from applier.symbols import NotExecutable, Symbol, resolve
from injector import _libc
from injector.errors import InjectorError, StopTimeout
from injector.maps import find
from injector.regs import UserRegsStruct
from injector.session import Session, attach
from injector.tracer import EVENT_STOP, OTHER_EVENT, SIGNAL_STOP
from injector.tracking import DirtyTracker, open_tracker

__all__ = [
    "RETURN_TRAP",
    "CallCrashed",
    "CallResult",
    "CallTimedOut",
    "call",
    "parse_arg",
    "rollback",
]

logger = logging.getLogger(__name__)

RETURN_TRAP = 0xCA10  # below mmap_min_addr (64 KiB by default): nothing can be mapped there
RED_ZONE = 128
PAGE = 4096
MAX_ARGS = 6
_ARG_REGS = ("di", "si", "dx", "cx", "r8", "r9")
_MASK64 = (1 << 64) - 1
_DF = 1 << 10  # EFLAGS direction flag
_TF = 1 << 8  # EFLAGS trap flag
_PTRACE_GETSIGINFO = 0x4202
_CRASH_SIGNALS = frozenset(
    {
        signal.SIGSEGV,
        signal.SIGBUS,
        signal.SIGILL,
        signal.SIGFPE,
        signal.SIGABRT,
        signal.SIGTRAP,
        signal.SIGSYS,
    }
)
_FAULT_SIGNALS = frozenset({signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE})

Arg = int | str | bytes


@attrs.frozen
class CallResult:
    """What one call did. ``value`` is ``rax`` as a signed 64-bit integer (None if the
    function did not return); ``pages`` every page written during the call."""

    pid: int
    tid: int
    function: str
    address: int
    args: tuple[str, ...]
    value: int | None
    pages: tuple[int, ...]
    seconds: float  # the whole command: checkpoint, call, roll back
    timeout: float = 10.0
    signal: str | None = None  # the crash signal's name
    fault_address: int | None = None  # si_addr of a fault (SIGSEGV, SIGBUS, SIGILL, SIGFPE)
    fault_ip: int | None = None  # where the function was when it crashed
    timed_out: bool = False
    rolled_back: bool = False
    pages_restored: int = 0  # pages the roll back wrote
    record: str | None = None
    # threads the function started: held from their first instruction until the call is
    # done, then ended by a roll back or let run
    threads: tuple[int, ...] = ()

    @property
    def returned(self) -> bool:
        return self.value is not None

    @property
    def unsigned(self) -> int | None:
        return None if self.value is None else self.value & _MASK64

    def failure(self) -> ApplierError | None:
        """The error a crash or a timeout is (``check`` raises it); None if it returned."""
        where = f"pid {self.pid}: {self.function}"
        if self.signal is not None:
            at = f" at address {self.fault_address:#x}" if self.fault_address is not None else ""
            ip = f" (ip {self.fault_ip:#x})" if self.fault_ip is not None else ""
            return CallCrashed(
                f"{where} crashed with {self.signal}{at}{ip}; the process was put back to its "
                "state before the call"
            )
        if self.timed_out:
            return CallTimedOut(
                f"{where} did not return within {self.timeout:g}s; the process was put back "
                "to its state before the call"
            )
        return None

    def check(self) -> CallResult:
        """Raise ``CallCrashed`` or ``CallTimedOut`` if the function did not return."""
        error = self.failure()
        if error is not None:
            raise error
        return self

    def as_dict(self) -> dict[str, object]:
        return {
            "pid": self.pid,
            "tid": self.tid,
            "function": self.function,
            "address": f"{self.address:#x}",
            "args": list(self.args),
            "value": self.value,
            "hex": None if self.unsigned is None else f"{self.unsigned:#x}",
            "signal": self.signal,
            "fault_address": None if self.fault_address is None else f"{self.fault_address:#x}",
            "timed_out": self.timed_out,
            "pages_written": len(self.pages),
            "pages": [f"{p:#x}" for p in self.pages],
            "rolled_back": self.rolled_back,
            "pages_restored": self.pages_restored,
            "record": self.record,
            "threads": list(self.threads),
            "seconds": self.seconds,
            "timeout": self.timeout,
        }


def parse_arg(text: str) -> Arg:
    """A command-line argument: an integer (decimal, ``0x`` hex, ``-`` allowed), or a string
    in double or single quotes (copied into the target, passed as a pointer)."""
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        return text[1:-1]
    try:
        return int(text, 0)
    except ValueError:
        raise UsageError(
            f"argument {text!r} is neither an integer (decimal or 0x hex) nor a quoted string "
            "(quote it twice in a shell: '\"text\"')"
        ) from None


def _c_bytes(arg: str | bytes) -> bytes:
    data = arg.encode() if isinstance(arg, str) else bytes(arg)
    return data + b"\0"


def _describe_args(args: Sequence[Arg]) -> tuple[str, ...]:
    return tuple(repr(a) if not isinstance(a, int) else str(a) for a in args)


def _resolve(pid: int, function: str | int) -> Symbol:
    spec = f"{function:#x}" if isinstance(function, int) else function
    return resolve(pid, spec)


@attrs.define
class _Outcome:
    value: int | None = None
    signal: str | None = None
    fault_address: int | None = None
    fault_ip: int | None = None
    timed_out: bool = False
    threads: list[int] = attrs.field(factory=list)  # started by the function, held


def call(
    pid: int,
    function: str | int,
    *args: Arg,
    thread: int | None = None,
    timeout: float = 10.0,
    rollback: bool = False,
    record: str | os.PathLike[str] | None = None,
    force: bool = False,
) -> CallResult:
    """Call ``function`` (a symbol, ``lib:symbol``, or an address) in process ``pid`` with up
    to six integer, pointer or string arguments, on the leader or on ``thread``; every other
    thread stays stopped. Returns what happened: a crash or a timeout is reported in the
    result (``signal``, ``timed_out``; ``check()`` raises them), after the process was put
    back to its state just before the call. ``rollback``: put it back after a normal return
    too. ``record``: a new or empty directory; ``record/before`` is a checkpoint from just
    before the call, ``record/after`` an incremental image on top of it holding the pages
    the call wrote. ``force``: also pid 1, applier itself or one of its ancestors."""
    if len(args) > MAX_ARGS:
        raise UsageError(f"at most {MAX_ARGS} arguments can be passed, not {len(args)}")
    for a in args:
        if not isinstance(a, int | str | bytes):
            raise UsageError(f"argument {a!r}: only integers and strings can be passed")
        if isinstance(a, int) and not -(1 << 63) <= a <= _MASK64:
            raise UsageError(f"argument {a}: does not fit in 64 bits")
    if timeout <= 0:
        raise UsageError(f"--timeout must be positive, not {timeout:g}")
    from applier.dump import prepare_output_dir  # noqa: PLC0415 - heavy imports per use
    from applier.journal import Journal  # noqa: PLC0415
    from applier.lock import TargetLock  # noqa: PLC0415
    from applier.parts import Part  # noqa: PLC0415
    from applier.trust import check_target_allowed  # noqa: PLC0415

    check_target_allowed(pid, force=force)
    symbol = _resolve(pid, function)
    record_dir = Path(record) if record is not None else None
    record_created = record_dir is not None and prepare_output_dir(record_dir)
    started = time.perf_counter()
    temp = None
    if record_dir is None:
        temp = Path(tempfile.mkdtemp(prefix=f"applier-call-{pid}-"))
        before = temp / "before"
    else:
        before = record_dir / "before"
    progress = _Progress()
    journal: Journal | None = None
    keep = False  # the target is left held, with its journal and the checkpoint
    done = False
    try:
        with (
            TargetLock.acquire(pid, "work", f"calling {symbol.name} in it"),
            attach(pid) as session,
        ):
            if Journal.find(pid) is not None:
                raise TargetBusy(
                    f"pid {pid} is held by an applier that died: 'applier recover {pid}' first"
                )
            # Held (a group stop under ptrace) before anything changes, as apply does: if
            # applier dies during the call, the target is left stopped, never running on
            # half-changed, and the journal names the checkpoint that recover applies.
            was_stopped = session.was_stopped
            journal = Journal.begin(
                pid, before, task=None, parts=Part.ALL.labels(), only_dirty=False,
                leave_shared=False, was_stopped=was_stopped,
            )  # fmt: skip
            session.hold()
            journal.mark_held()
            session.resume_on_detach = not was_stopped
            try:
                result = _call_stopped(
                    session, symbol, args, thread=thread, timeout=timeout, rollback=rollback,
                    before=before, record=record_dir, started=started, progress=progress,
                )  # fmt: skip
                done = True
                return result
            except BaseException as exc:
                if progress.safe or not session.alive():
                    raise
                keep = True
                session.resume_on_detach = False
                raise RollbackFailed(
                    f"pid {pid}: the call of {symbol.name} was cut short and the process could "
                    f"not be put back ({exc}); it is held (stopped): 'applier recover {pid}' "
                    f"applies {before} again"
                ) from exc
    finally:
        if journal is not None and not keep:
            journal.remove()
        if temp is not None and not keep:
            shutil.rmtree(temp, ignore_errors=True)
        if record_dir is not None and not done and not keep:
            _empty(record_dir, remove=record_created)


def _empty(directory: Path, *, remove: bool) -> None:
    """Leave nothing half-written in a --record directory after a failed call: remove it if
    this call created it, else empty it again."""
    if remove:
        shutil.rmtree(directory, ignore_errors=True)
        return
    with contextlib.suppress(OSError):
        for child in directory.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink()


@attrs.define
class _Progress:
    """Whether the target is in a state a caller can be handed back: before the call, or
    after a call that returned (False while the function runs, and after a crash until the
    roll back is done)."""

    safe: bool = True


def _call_stopped(
    s: Session,
    symbol: Symbol,
    args: Sequence[Arg],
    *,
    thread: int | None,
    timeout: float,
    rollback: bool,
    before: Path,
    record: Path | None,
    started: float,
    progress: _Progress,
) -> CallResult:
    from applier.dump import dump_layer, dump_process  # noqa: PLC0415

    tid = s.pid if thread is None else thread
    if tid not in s.tids:
        raise UsageError(f"pid {s.pid}: no thread {tid} (threads: {', '.join(map(str, s.tids))})")
    maps = s.maps()
    mapping = find(maps, symbol.address)
    if mapping is None or not mapping.executable:
        raise NotExecutable(s.pid, symbol.address, symbol.name, mapping)
    if find(maps, RETURN_TRAP) is not None:
        raise ApplierError(f"pid {s.pid}: {RETURN_TRAP:#x} is mapped: no address to return to")
    before.mkdir(parents=True, exist_ok=True)
    dump_process(s, before)
    # Another tracker of this process (``dump --track``'s holder, an open Checkpoint, an
    # older dump's userfaultfd in the target): a second uffd-wp tracker would re-protect its
    # pages and hide what was written from it, so the call then compares contents instead.
    backend = "content" if _tracked_elsewhere(s.pid) else "auto"
    tracker = open_tracker(s, backend, in_target=False)
    try:
        scratch = _Scratch.make(s, args, tid)
        values = [a if isinstance(a, int) else scratch.address_of(i) for i, a in enumerate(args)]
        progress.safe = False
        try:
            outcome = _run(s, tid, symbol.address, values, timeout)
        except BaseException:
            # Interrupted (Ctrl-C, SIGTERM) or an error in the middle: the thread has its
            # registers back; put the memory back too, then let the exception go on.
            progress.safe = _abandon(s, tracker, scratch, tid, before)
            raise
        progress.safe = outcome.value is not None  # returned: the state after the call
        scratch.drop(s, tid)
        written = tracker.dirty_pages()
        written = written[
            ~((written >= np.uint64(scratch.start)) & (written < np.uint64(scratch.end)))
        ]
        if record is not None:
            dump_layer(s, record / "after", before, written)
        failed = outcome.value is None
        restored = 0
        if failed or rollback:
            restored = _restore(s, before, written)
            progress.safe = True
    finally:
        tracker.close()
    seconds = time.perf_counter() - started
    result = CallResult(
        pid=s.pid,
        tid=tid,
        function=symbol.describe() if symbol.table is not None else symbol.name,
        address=symbol.address,
        args=_describe_args(args),
        value=outcome.value,
        pages=tuple(int(p) for p in written),
        seconds=seconds,
        timeout=timeout,
        signal=outcome.signal,
        fault_address=outcome.fault_address,
        fault_ip=outcome.fault_ip,
        timed_out=outcome.timed_out,
        rolled_back=failed or rollback,
        pages_restored=restored,
        record=None if record is None else str(record),
        threads=tuple(outcome.threads),
    )
    logger.info(
        "pid %d: %s in %.1f ms, %d pages written%s",
        s.pid,
        "returned" if not failed else (outcome.signal or "timed out"),
        seconds * 1e3,
        len(written),
        ", rolled back" if result.rolled_back else "",
    )
    return result


def _abandon(s: Session, tracker: DirtyTracker, scratch: _Scratch, tid: int, before: Path) -> bool:
    """After a call that was cut short: unmap the scratch memory and apply the checkpoint
    back (only the pages written since); whether that worked."""
    try:
        scratch.drop(s, tid)
        _restore(s, before, tracker.dirty_pages())
    except Exception as exc:  # the original error is the one to report
        logger.warning("pid %d: call cut short, and not rolled back: %s", s.pid, exc)
        return False
    return True


def _tracked_elsewhere(pid: int) -> bool:
    """Whether another dirty tracker follows ``pid``: a holder (``dump --track``), an open
    ``Checkpoint`` (its claim), or a userfaultfd in the target itself."""
    from applier import holder  # noqa: PLC0415

    if holder.checkpointed(pid) is not None or _has_userfaultfd(pid):
        return True
    try:
        return holder.status(pid) is not None
    except holder.HolderError:
        return True  # a holder that does not answer may still hold a tracker


def _has_userfaultfd(pid: int) -> bool:
    """Whether process ``pid`` holds a userfaultfd descriptor."""
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for name in names:
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{name}") == "anon_inode:[userfaultfd]":
                return True
    return False


@attrs.define
class _Scratch:
    """The string arguments, in one anonymous mapping of the target (none if there are no
    strings)."""

    start: int = 0
    end: int = 0
    offsets: dict[int, int] = attrs.Factory(dict)

    @classmethod
    def make(cls, s: Session, args: Sequence[Arg], tid: int) -> _Scratch:
        blobs = {i: _c_bytes(a) for i, a in enumerate(args) if not isinstance(a, int)}
        if not blobs:
            return cls()
        offsets, data = {}, bytearray()
        for i, blob in blobs.items():
            offsets[i] = len(data)
            data += blob
            data += bytes(-len(data) % 16)
        length = -(-len(data) // PAGE) * PAGE
        start = s.mmap(0, length, 0x3, 0x22, tid=tid)  # PROT_READ|WRITE, MAP_PRIVATE|ANON
        s.write(start, bytes(data))
        return cls(start, start + length, offsets)

    def address_of(self, index: int) -> int:
        return self.start + self.offsets[index]

    def drop(self, s: Session, tid: int) -> None:
        if self.end > self.start:
            s.munmap(self.start, self.end - self.start, tid=tid)


def _call_regs(saved: UserRegsStruct, address: int, args: Sequence[int], sp: int) -> UserRegsStruct:
    regs = UserRegsStruct.from_buffer_copy(saved)
    regs.ip, regs.sp = address, sp
    regs.ax, regs.orig_ax = 0, _MASK64
    regs.flags = regs.flags & ~(_DF | _TF)
    for name, value in zip(_ARG_REGS, args, strict=False):
        setattr(regs, name, value & _MASK64)
    return regs


def _siginfo(s: Session, tid: int) -> tuple[int, int]:
    """(si_code, si_addr) of the signal ``tid`` is stopped for."""
    buf = (ctypes.c_uint8 * 128)()
    s.request(_PTRACE_GETSIGINFO, tid, 0, ctypes.addressof(buf))
    code = int.from_bytes(bytes(buf[8:12]), "little", signed=True)
    return code, int.from_bytes(bytes(buf[16:24]), "little")


def _run(s: Session, tid: int, address: int, args: Sequence[int], timeout: float) -> _Outcome:
    """Run the function on the stopped thread ``tid``; it is stopped again afterwards (an
    interrupt stop) with every register as it was before."""
    saved = s.raw_regs(tid)
    saved_x = s.get_xstate(tid)
    base = (saved.sp - RED_ZONE) & ~0xF
    slot = base - 8  # at entry rsp + 8 is 16-aligned, as after a call instruction
    s.write(slot, RETURN_TRAP.to_bytes(8, "little"))
    out = _Outcome()
    delivered = False

    def put_back() -> None:
        s.set_raw_regs(tid, saved)
        s.set_xstate(tid, saved_x)

    def deliver_with_own_regs() -> None:
        # A signal that arrives on the way back is delivered to the thread as it was before
        # the call: its handler frame holds the thread's own registers.
        nonlocal delivered
        put_back()
        delivered = True

    s.set_raw_regs(tid, _call_regs(saved, address, args, slot))
    deadline = time.monotonic() + timeout
    # Threads the function starts are attached by the kernel and held from their first
    # instruction, as every other thread is during the call (a rollback ends them).
    s.request(_libc.PTRACE_SETOPTIONS, tid, 0, s.options | _libc.PTRACE_O_TRACECLONE)
    try:
        s.request(_libc.PTRACE_CONT, tid)
        while True:
            try:
                kind, sig = s.wait(tid, deadline)
            except StopTimeout:
                out.timed_out = True
                break
            if kind == OTHER_EVENT and sig == _libc.PTRACE_EVENT_CLONE:
                new = s.event_message(tid)
                if s.adopt(new, deadline):
                    out.threads.append(new)
                s.request(_libc.PTRACE_CONT, tid)
                continue
            if kind == SIGNAL_STOP and sig in _CRASH_SIGNALS:
                regs = s.raw_regs(tid)
                if sig == signal.SIGSEGV and regs.ip == RETURN_TRAP and regs.sp == slot + 8:
                    out.value = ctypes.c_int64(regs.ax).value
                else:
                    out.signal = signal.Signals(sig).name
                    out.fault_ip = int(regs.ip)
                    if sig in _FAULT_SIGNALS:
                        out.fault_address = _siginfo(s, tid)[1]
                break
            # Another signal (delivered, as during a real call) or a group stop: go on.
            s.request(_libc.PTRACE_CONT, tid, 0, sig if kind == SIGNAL_STOP else 0)
        # Back to an interrupt stop, the crash or trap signal discarded; a signal that comes
        # first is delivered with the thread's own registers back in place.
        s.request(_libc.PTRACE_INTERRUPT, tid)
        if not out.timed_out:
            s.request(_libc.PTRACE_CONT, tid, 0, 0)
        s.wait_event_stop(tid, time.monotonic() + s.timeout, on_signal=deliver_with_own_regs)
    except BaseException:
        with contextlib.suppress(InjectorError):
            _settle(s, tid)
        with contextlib.suppress(InjectorError):
            put_back()
        raise
    finally:
        with contextlib.suppress(InjectorError):
            s.request(_libc.PTRACE_SETOPTIONS, tid, 0, s.options)
    if not delivered:  # else the thread is at its handler, with its own registers saved
        put_back()
    return out


def _settle(s: Session, tid: int) -> None:
    """Stop ``tid`` again after an error or an interruption in the middle of a call. Signals
    it reports on the way are dropped, not delivered: its registers are still the call's.
    If no stop comes, it is in a stop already reported (and collected) before the error."""
    with contextlib.suppress(InjectorError):
        s.request(_libc.PTRACE_INTERRUPT, tid)
    deadline = time.monotonic() + 2.0
    while True:
        try:
            kind, _sig = s.wait(tid, deadline)
        except StopTimeout:
            return
        if kind == EVENT_STOP:
            return
        s.request(_libc.PTRACE_INTERRUPT, tid)
        s.request(_libc.PTRACE_CONT, tid, 0, 0)


def _restore(s: Session, before: Path, written: npt.NDArray[np.uint64]) -> int:
    """Apply the checkpoint ``before`` in this session, writing only the ``written`` pages;
    the number of pages written back."""
    from applier.api import apply_in_session  # noqa: PLC0415

    result = apply_in_session(before, s, dirty=written)
    return result.stats.pages_written


@contextlib.contextmanager
def rollback(pid: int) -> Iterator[object]:
    """Checkpoint ``pid`` on entry (a dump and a dirty tracker) and put it back on exit, also
    when the block raises; the tracker leaves the process at the end. Yields the
    ``applier.fixture.Checkpoint`` (its ``restore()`` goes back early)."""
    from applier.fixture import Checkpoint  # noqa: PLC0415

    with Checkpoint.take(pid) as checkpoint:
        try:
            yield checkpoint
        finally:
            checkpoint.restore()

"""The ptrace side of a session: attach every thread of a process, stop it, wait, detach.

``Tracer`` seizes every thread of the thread group with ``PTRACE_SEIZE`` and stops each with
``PTRACE_INTERRUPT`` (no signal is sent, so the target's signal state is untouched),
re-reading /proc/PID/task until no new thread appears; leaving it detaches every thread, also
on errors and Ctrl-C (which are held back while ptrace state is in flux). Threads stay
stopped for the whole session. :mod:`injector.inject` runs system calls in a stopped thread;
:class:`injector.session.Session` adds memory, registers and /proc facts on top.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Self

from injector import _libc
from injector.errors import (
    InjectorError,
    MemoryAccessError,
    NoSuchProcess,
    PermissionDenied,
    StopTimeout,
    TargetExited,
    ZombieProcess,
)
from injector.procfs import read_stat
from injector.regs import Arch, UserRegsStruct

if TYPE_CHECKING:
    pass

__all__ = ["Tracer", "signal_deferred", "signals_deferred"]

_PROC: Final = "/proc"
_MASK64: Final = (1 << 64) - 1
_PAGE: Final = 4096
_CAP_SYS_PTRACE: Final = 19
_SYSGOOD_SIG: Final = signal.SIGTRAP | 0x80  # PTRACE_O_TRACESYSGOOD
_GROUP_STOP_SIGNALS: Final = frozenset(
    {signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU}
)
_DEFERRED_SIGNALS: Final = frozenset(
    int(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
)
try:  # the C module behind signal.py, whose wrappers turn every number into an enum member
    import _signal as _csignal  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - a Python without it
    _csignal = signal
_XSTATE_MAX: Final = 1 << 16
_STATUS_KEYS: Final = frozenset(
    {b"State", b"Tgid", b"PPid", b"TracerPid", b"Uid", b"CapEff", b"Seccomp"}
)
_SPIN_NS: Final = 200_000  # how long a wait polls waitpid before it starts sleeping

# What a waited-for thread reported.
EVENT_STOP: Final = 0  # PTRACE_EVENT_STOP: interrupt or group stop
SYSCALL_STOP: Final = 1  # syscall-entry or syscall-exit stop
SIGNAL_STOP: Final = 2  # signal-delivery stop (the signal is in the second value)
OTHER_EVENT: Final = 3  # another PTRACE_EVENT_* stop (the event number is the second value)


_PTRACE_GET_RSEQ_CONFIGURATION = 0x420F
_PTRACE_GETSIGMASK: Final = 0x420A
_PTRACE_SETSIGMASK: Final = 0x420B


_deferring = 0  # depth of the sections that hold signals back
_held_back: list[int] = []  # signals that arrived inside one, to raise again at its end


def _hold_back(signum: int, frame: object) -> None:
    _held_back.append(signum)


def signal_deferred(signum: int) -> bool:
    """For a Python signal handler: whether ``signum`` arrived while ptrace state is half
    changed; it is then kept and raised again when that section ends, and the handler
    should return at once. (Blocking the signal in the main thread is not enough: another
    thread of the process, numpy's OpenBLAS pool for one, may take it, and Python then runs
    the handler in the main thread anyway.)"""
    if _deferring:
        _held_back.append(signum)
        return True
    return False


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold back Ctrl-C and friends while ptrace state is half changed, or in work that must
    not stop half-way (a layout step whose result its undo needs, a rollback); main thread
    only: Python runs signal handlers there. They are delivered right after. Handlers that ask
    :func:`signal_deferred` (applier's command line) and Python's own KeyboardInterrupt
    handler are held back whichever thread the kernel gives the signal to."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    global _deferring  # noqa: PLW0603 - one per process, like signal handlers
    if _deferring:  # inside another section: the signals are blocked and caught already
        _deferring += 1
        try:
            yield
        finally:
            _deferring -= 1
        return
    # Through _signal: a section is entered for every injected call, and signal.py's enum
    # conversions made up most of its cost (27 -> 9 us a section, a loop of 4,000).
    old = _csignal.pthread_sigmask(_csignal.SIG_BLOCK, _DEFERRED_SIGNALS)
    swapped: dict[int, Any] = {}
    for sig in _DEFERRED_SIGNALS:
        if _csignal.getsignal(sig) is _csignal.default_int_handler:
            swapped[sig] = _csignal.signal(sig, _hold_back)
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
        for signum, handler in swapped.items():
            _csignal.signal(signum, handler)
        _csignal.pthread_sigmask(_csignal.SIG_SETMASK, old)
        if not _deferring and _held_back:
            first = _held_back[0]
            _held_back.clear()
            signal.raise_signal(first)  # its handler runs now, outside the section


@contextlib.contextmanager
def _undisturbed(needed: bool = True) -> Iterator[None]:
    """Run the calling thread SCHED_FIFO while it releases threads, when allowed and
    ``needed`` (several threads to let go: with one, nothing is left to do once it runs, and
    the two scheduler changes cost more than they save).

    Every thread that PTRACE_DETACH wakes may preempt the tracer for a whole time slice (about
    3 ms with EEVDF) before it can let the next thread go: detaching 8 busy threads then takes
    milliseconds instead of microseconds. Only the detach loop runs boosted: it never waits for
    a target thread, which a boosted tracer polling on the same CPU would starve.
    """
    if not needed:
        yield
        return
    try:
        policy, param = os.sched_getscheduler(0), os.sched_getparam(0)
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
    except OSError:  # no CAP_SYS_NICE: run as is, only slower
        yield
        return
    try:
        yield
    finally:
        os.sched_setscheduler(0, policy, param)


def _status_fields(pid: int, tid: int | None = None) -> dict[str, str]:
    """Selected /proc/PID/status fields (of thread ``tid`` when given)."""
    path = f"{_PROC}/{pid}/status" if tid is None else f"{_PROC}/{pid}/task/{tid}/status"
    with open(path, "rb") as f:
        data = f.read()
    fields = {}
    for line in data.split(b"\n"):
        key, sep, value = line.partition(b":")
        if sep and key in _STATUS_KEYS:
            fields[key.decode()] = value.strip().decode(errors="replace")
    return fields


def _errno(exc: OSError) -> int:
    return exc.errno or 0


def _comm(pid: int) -> str:
    try:
        return Path(f"{_PROC}/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


class Tracer:
    """The ptrace side of a session: every thread of one process seized and stopped, waited
    for, and let go. :class:`injector.session.Session` builds the process interface on it."""

    def __init__(self, pid: int, *, timeout: float = 10.0) -> None:
        self.pid = pid
        self.timeout = timeout
        self.arch = Arch.host()
        self._order: list[int] = []  # attached tids, leader first
        self._stop_signal: dict[int, int] = {}
        self._unreaped: list[int] = []  # exited threads still to be waited for
        self._active = False
        self._owner = 0
        self._pidfd = -1
        self._held = False
        self._initially_stopped = False
        # Send SIGCONT after the detach: set by hold() unless the process was stopped
        # already; clear it to leave a held process stopped (see hold()).
        self.resume_on_detach = False
        # Seccomp filters are suspended for traced threads where the kernel lets us
        # (CAP_SYS_ADMIN): an injected call a filter forbids would otherwise kill the target.
        self.seccomp_suspended = True
        self.options = _libc.PTRACE_O_TRACESYSGOOD  # the ptrace options every thread has

    # ---- lifecycle ---------------------------------------------------------------------

    def __enter__(self) -> Self:
        if self._active:
            raise InjectorError(self.pid, "session already entered")
        if self.arch is not Arch.X86_64:
            raise InjectorError(self.pid, f"architecture {self.arch.value} is not implemented")
        self._owner = threading.get_ident()
        with signals_deferred():
            try:
                self._open_target()
                self._stop_all()
            except BaseException:
                try:
                    with _undisturbed():
                        self._release()
                finally:
                    self._close_fds()
                raise
            self._active = True
            self._initially_stopped = self._stop_signal.get(self.pid) in _GROUP_STOP_SIGNALS
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.detach()

    def detach(self) -> None:
        """Let every thread go (idempotent). Threads that were in a group stop stay stopped;
        a process held by :meth:`hold` is continued (SIGCONT) after the detach, unless
        ``resume_on_detach`` was cleared."""
        if not self._active and not self._order and not self._unreaped:
            return
        if threading.get_ident() != self._owner:
            raise InjectorError(self.pid, "detach must come from the thread that attached")
        with signals_deferred(), _undisturbed(len(self._order) + len(self._unreaped) > 1):
            try:
                self._release()
                if self._held and self.resume_on_detach:
                    self._send(signal.SIGCONT)
            finally:
                self._active = False
                self._held = False
                self._close_fds()

    @property
    def was_stopped(self) -> bool:
        """Whether the process was in a group stop (SIGSTOP, Ctrl-Z) when it was attached."""
        return self._initially_stopped

    @property
    def held(self) -> bool:
        return self._held

    def hold(self) -> None:
        """Put the whole process in a group stop (as SIGSTOP does) while every thread stays
        traced, so that if this process dies, whatever kills it, the target is left stopped
        and untraced (kernel/ptrace.c ``__ptrace_unlink`` re-instates the group stop on every
        thread), never running half-changed. It stops there until SIGCONT: :meth:`detach`
        sends it unless the process was stopped already or ``resume_on_detach`` is cleared.

        Signals pending when the hold starts are delivered first (their handler frames are
        set up, the handlers run only after the hold ends). Its parent sees a stop and a
        continue (SIGCHLD, as for Ctrl-Z); a SIGCONT handler of the target runs once.
        """
        self.check()
        if self._held:
            return
        self._held = True
        if self._initially_stopped:
            return  # the group stop is in effect already
        self.resume_on_detach = True
        deadline = time.monotonic() + self.timeout
        with signals_deferred():
            self._send(signal.SIGSTOP)
            leader, *others = self._order
            self._to_group_stop(leader, deadline)  # it takes SIGSTOP and starts the stop
            # The group stop is pending for all of them now: let every other thread go at
            # once, then collect their stops, instead of a round trip each in turn.
            for tid in others:
                self.request(_libc.PTRACE_CONT, tid, 0, 0)
            for tid in others:
                self._to_group_stop(tid, deadline, resumed=True)

    def _to_group_stop(self, tid: int, deadline: float, *, resumed: bool = False) -> None:
        """Resume ``tid`` from its interrupt stop (``resumed``: the caller did) until it
        reports the group stop."""
        inject = 0
        while True:
            if not resumed:
                self.request(_libc.PTRACE_CONT, tid, 0, inject)
            resumed = False
            kind, sig = self.wait(tid, deadline)
            if kind == EVENT_STOP and sig in _GROUP_STOP_SIGNALS:
                self._stop_signal[tid] = sig
                return
            inject = 0
            if kind == SIGNAL_STOP and sig == signal.SIGSTOP:
                inject = sig  # let it act: the group stop begins
            elif kind == SIGNAL_STOP:
                # Another pending signal: deliver it, and stop again before user mode.
                self.request(_libc.PTRACE_INTERRUPT, tid)
                inject = sig

    def _send(self, sig: int) -> None:
        try:
            signal.pidfd_send_signal(self._pidfd, sig)
        except ProcessLookupError as exc:
            raise TargetExited(self.pid, "exited during the session", errno.ESRCH) from exc

    def _close_fds(self) -> None:
        """Close what the session opened on the target (subclasses add theirs)."""
        if self._pidfd >= 0:
            os.close(self._pidfd)
        self._pidfd = -1

    @property
    def tids(self) -> list[int]:
        """Threads held stopped, leader first."""
        return list(self._order)

    @property
    def active(self) -> bool:
        return self._active

    # ---- attaching ---------------------------------------------------------------------

    def _open_target(self) -> None:
        """A pidfd for the target: cheap proof that ``pid`` is a live thread-group leader
        (the reasons a seize fails are looked up only when it does)."""
        try:
            self._pidfd = _libc.pidfd_open(self.pid)
        except OSError as exc:
            if exc.errno == errno.ESRCH:
                raise NoSuchProcess(self.pid, "no such process", errno.ESRCH) from exc
            if exc.errno in (errno.EINVAL, errno.ENOENT):  # ENOENT: a thread (Linux 6.9+)
                try:
                    tgid = _status_fields(self.pid).get("Tgid", "?")
                except OSError:
                    raise NoSuchProcess(self.pid, "not a valid process id", _errno(exc)) from exc
                raise NoSuchProcess(
                    self.pid, f"is a thread of process {tgid}, not a process", _errno(exc)
                ) from exc
            raise InjectorError(self.pid, "pidfd_open failed", _errno(exc)) from exc

    def _is_parent(self) -> bool:
        """Are we the target's real parent (then its exit status is ours to collect)?"""
        try:
            return int(_status_fields(self.pid).get("PPid", "0")) == os.getpid()
        except OSError:
            return False

    def _seize(self, tid: int) -> None:
        """PTRACE_SEIZE with seccomp suspended; without CAP_SYS_ADMIN (EPERM for that option
        alone) again without it, remembering that injection is then unsafe under seccomp."""
        options = _libc.PTRACE_O_TRACESYSGOOD
        if self.seccomp_suspended:
            try:
                _libc.ptrace(_libc.PTRACE_SEIZE, tid, 0, options | _libc.PTRACE_O_SUSPEND_SECCOMP)
            except OSError as exc:
                if exc.errno != errno.EPERM:
                    raise
            else:
                self.options = options | _libc.PTRACE_O_SUSPEND_SECCOMP
                return
            self.seccomp_suspended = False
        _libc.ptrace(_libc.PTRACE_SEIZE, tid, 0, options)
        self.options = options

    def _refuse_if_thread_traced(self, tid: int, exc: OSError) -> None:
        try:
            tracer = int(_status_fields(self.pid, tid).get("TracerPid", "0") or 0)
        except (OSError, ValueError):
            return  # the thread is gone
        if tracer and tracer != os.getpid():
            raise PermissionDenied(
                self.pid,
                f"cannot trace: thread {tid} is already traced by pid {tracer} "
                f"({_comm(tracer)}): detach gdb/strace first",
                errno.EPERM,
            ) from exc

    def _permission_error(self, exc: OSError) -> NoSuchProcess | PermissionDenied:
        """Name the likely reason a PTRACE_SEIZE of the leader was refused."""
        try:
            fields = _status_fields(self.pid)
        except OSError:
            fields = {}
        if fields.get("State", "").startswith(("Z", "X")):
            return ZombieProcess(self.pid, "is a zombie (exited, not yet reaped)", errno.ESRCH)
        tracer = int(fields.get("TracerPid", "0") or 0)
        own = _status_fields(os.getpid())
        cap_eff = int(own.get("CapEff", "0"), 16)
        try:
            yama = int(Path(f"{_PROC}/sys/kernel/yama/ptrace_scope").read_text())
        except OSError:
            yama = 0
        if tracer:
            cause = f"already traced by pid {tracer} ({_comm(tracer)}): detach gdb/strace first"
        elif (
            not cap_eff & (1 << _CAP_SYS_PTRACE)
            and fields.get("Uid", "").split()[:1] != own.get("Uid", "").split()[:1]
        ):
            cause = "target belongs to another user and CAP_SYS_PTRACE is missing"
        elif yama:
            cause = f"Yama ptrace_scope is {yama} (see /proc/sys/kernel/yama/ptrace_scope)"
        elif not cap_eff & (1 << _CAP_SYS_PTRACE):
            cause = "CAP_SYS_PTRACE is missing (target may be non-dumpable)"
        else:
            cause = "refused by the kernel or a security module"
        return PermissionDenied(self.pid, f"cannot trace: {cause}", _errno(exc) or errno.EPERM)

    def _list_tasks(self) -> list[int]:
        try:
            names = os.listdir(f"{_PROC}/{self.pid}/task")
        except FileNotFoundError as exc:
            raise TargetExited(self.pid, "exited while attaching", errno.ESRCH) from exc
        tids = sorted(int(name) for name in names)
        if self.pid in tids:
            tids.remove(self.pid)
            tids.insert(0, self.pid)
        return tids

    def _stop_all(self) -> None:
        """SEIZE + INTERRUPT every thread, again for threads that appear meanwhile, and wait
        until all are stopped. When a scan finds no new thread while every known one is stopped,
        no thread can be created any more (only a running thread can clone)."""
        deadline = time.monotonic() + self.timeout
        while True:
            new = [tid for tid in self._list_tasks() if tid not in self._stop_signal]
            if not new:
                return
            if time.monotonic() > deadline:
                raise StopTimeout(self.pid, f"threads {new} could not be seized in time")
            seized = []
            for tid in new:
                try:
                    self._seize(tid)
                except OSError as exc:
                    if exc.errno in (errno.ESRCH, errno.EPERM) and self.pid in self._stop_signal:
                        # The leader is ours, so the thread's credentials are fine: it exited
                        # between the scan and the seize (ESRCH), is exiting (EPERM), or
                        # another tracer holds that one thread (EPERM, refused at once).
                        # Otherwise the next scan shows whether it is gone.
                        if exc.errno == errno.EPERM:
                            self._refuse_if_thread_traced(tid, exc)
                        continue
                    if exc.errno == errno.ESRCH:
                        raise TargetExited(self.pid, "exited while attaching", _errno(exc)) from exc
                    if exc.errno == errno.EPERM:
                        raise self._permission_error(exc) from exc
                    raise InjectorError(
                        self.pid, f"PTRACE_SEIZE of {tid} failed", _errno(exc)
                    ) from (exc)
                self._order.append(tid)
                self._stop_signal[tid] = 0
                seized.append(tid)
                with contextlib.suppress(ProcessLookupError):
                    _libc.ptrace(_libc.PTRACE_INTERRUPT, tid)
            for tid in seized:
                try:
                    self.wait_event_stop(tid, deadline)
                except TargetExited:
                    if tid == self.pid or self.gone():
                        raise
                    # a short-lived thread exited before it stopped; _wait forgot it

    # ---- waiting -----------------------------------------------------------------------

    def wait(self, tid: int, deadline: float) -> tuple[int, int]:
        """The next stop of ``tid`` as (kind, signal); raises TargetExited if it exited and
        StopTimeout after ``deadline``."""
        spins = 0
        spin_until = time.perf_counter_ns() + _SPIN_NS
        while True:
            try:
                got, status = _libc.waitpid(tid, _libc.WALL | os.WNOHANG)
            except ChildProcessError as exc:
                self._forget(tid)
                raise TargetExited(self.pid, f"thread {tid} is gone", _errno(exc)) from exc
            if got:
                break
            if not spins and time.perf_counter_ns() < spin_until:
                continue  # most stops arrive within microseconds: poll without sleeping
            spins += 1
            if self._thread_state(tid) in (None, b"Z", b"X", b"x"):
                # An exited leader is reported only after every other thread is reaped, which
                # happens when the session ends; say so now instead of waiting for it.
                self._forget(tid, reaped=False)
                raise TargetExited(self.pid, f"thread {tid} exited during the session")
            if time.monotonic() > deadline:
                raise StopTimeout(
                    self.pid,
                    f"thread {tid} did not stop within {self.timeout:g}s "
                    "(uninterruptible sleep or a vfork parent?)",
                )
            # Sleep rather than sched_yield(): a stopping thread may need this very CPU.
            time.sleep(min(0.00005 * spins, 0.002))
        if os.WIFEXITED(status) or os.WIFSIGNALED(status):
            self._forget(tid)
            how = (
                f"exited with status {os.WEXITSTATUS(status)}"
                if os.WIFEXITED(status)
                else f"was killed by {signal.Signals(os.WTERMSIG(status)).name}"
            )
            raise TargetExited(self.pid, f"thread {tid} {how} during the session")
        sig = os.WSTOPSIG(status)
        if status >> 16 == _libc.PTRACE_EVENT_STOP:
            return EVENT_STOP, sig
        if status >> 16:
            return OTHER_EVENT, status >> 16
        if sig == _SYSGOOD_SIG:
            return SYSCALL_STOP, 0
        return SIGNAL_STOP, sig

    def wait_event_stop(
        self, tid: int, deadline: float, on_signal: Callable[[], None] | None = None
    ) -> None:
        """Wait for the PTRACE_EVENT_STOP that a queued INTERRUPT produces. A signal that
        arrives first is delivered (as a real one would be) and the wait goes on: the queued
        interrupt stops the thread right after, as CRIU's compel does."""
        while True:
            kind, sig = self.wait(tid, deadline)
            if kind == EVENT_STOP:
                self._stop_signal[tid] = sig
                return
            if kind == SIGNAL_STOP and on_signal is not None:
                on_signal()
            self.request(_libc.PTRACE_INTERRUPT, tid)
            self.request(_libc.PTRACE_CONT, tid, 0, sig if kind == SIGNAL_STOP else 0)

    def event_message(self, tid: int) -> int:
        """PTRACE_GETEVENTMSG: for a PTRACE_EVENT_CLONE stop, the new thread's id."""
        msg = ctypes.c_ulong(0)
        self.request(_libc.PTRACE_GETEVENTMSG, tid, 0, ctypes.addressof(msg))
        return int(msg.value)

    def get_sigmask(self, tid: int) -> int:
        """The thread's blocked signals (PTRACE_GETSIGMASK): bit N-1 for signal N."""
        mask = ctypes.c_uint64(0)
        self.request(_PTRACE_GETSIGMASK, self.check(tid), 8, ctypes.addressof(mask))
        return int(mask.value)

    def set_sigmask(self, tid: int, mask: int) -> None:
        """Replace the thread's blocked signals (PTRACE_SETSIGMASK; the kernel never blocks
        SIGKILL and SIGSTOP, whatever the mask says)."""
        value = ctypes.c_uint64(mask & _MASK64)
        self.request(_PTRACE_SETSIGMASK, self.check(tid), 8, ctypes.addressof(value))

    def adopt(self, tid: int, deadline: float) -> bool:
        """Hold a thread the kernel attached to us (PTRACE_O_TRACECLONE): wait for its first
        stop, which comes before it runs a single instruction, and give it the options every
        held thread has. A clone that is not a thread of this process (a ``clone()`` without
        CLONE_THREAD) is let go at once; False then."""
        kind, sig = self.wait(tid, deadline)
        if kind != EVENT_STOP:
            raise InjectorError(self.pid, f"new thread {tid}: unexpected first stop")
        try:
            tgid = int(_status_fields(tid).get("Tgid", "0"))
        except (OSError, ValueError):
            tgid = 0
        if tgid != self.pid:
            with contextlib.suppress(OSError):
                _libc.ptrace(_libc.PTRACE_DETACH, tid, 0, 0)
            return False
        self._order.append(tid)
        self._stop_signal[tid] = sig
        self.request(_libc.PTRACE_SETOPTIONS, tid, 0, self.options)
        return True

    def _forget(self, tid: int, *, reaped: bool = True) -> None:
        """Drop ``tid`` from the held threads; one that exited but was not waited for yet is
        kept for reaping when the session ends."""
        if tid in self._stop_signal:
            del self._stop_signal[tid]
            self._order.remove(tid)
        if not reaped and tid not in self._unreaped:
            self._unreaped.append(tid)

    # ---- detaching ---------------------------------------------------------------------

    def _release(self) -> None:
        """Detach every thread; reap the ones that died (a traced thread stays a zombie until
        its tracer waits for it, which would keep the leader from being reaped)."""
        failed: list[tuple[int, OSError]] = []
        tids = [tid for tid in (*self._order, *self._unreaped) if tid != self.pid]
        if self.pid in self._order or self.pid in self._unreaped:
            tids.append(self.pid)  # the leader last: it can be reaped only after the others
        self._unreaped.clear()
        for tid in tids:
            try:
                _libc.ptrace(_libc.PTRACE_DETACH, tid, 0, 0)
            except OSError as exc:
                if exc.errno != errno.ESRCH:
                    failed.append((tid, exc))
                self._settle(tid)
            self._forget(tid)
        if failed:
            bad, error = failed[0]
            raise InjectorError(
                self.pid, f"PTRACE_DETACH of {bad} failed", _errno(error)
            ) from error

    def _settle(self, tid: int) -> None:
        """``tid`` refused DETACH: it is dying (reap it), or running after a failed step (stop
        it, then detach)."""
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            state = self._thread_state(tid)
            if state is None:
                return
            if state in (b"Z", b"X", b"x") and tid == self.pid and self._is_parent():
                return  # its exit status belongs to us as the real parent: the owner reaps it
            if state not in (b"Z", b"X", b"x"):
                with contextlib.suppress(OSError):
                    _libc.ptrace(_libc.PTRACE_INTERRUPT, tid)
            try:
                got, status = _libc.waitpid(tid, _libc.WALL | os.WNOHANG)
            except ChildProcessError:
                return
            if got and (os.WIFEXITED(status) or os.WIFSIGNALED(status)):
                return
            if got:
                try:
                    _libc.ptrace(_libc.PTRACE_DETACH, tid, 0, 0)
                except OSError:
                    pass
                else:
                    return
            time.sleep(0.0005)

    def _thread_state(self, tid: int) -> bytes | None:
        try:
            return read_stat(self.pid, tid, Path(_PROC))[0][:1]
        except OSError:
            return None

    # ---- error translation -------------------------------------------------------------

    def gone(self) -> bool:
        try:
            return read_stat(self.pid, procfs=Path(_PROC))[0][:1] in (b"Z", b"X", b"x")
        except OSError:
            return True

    def request(self, request: int, tid: int, addr: int = 0, data: int = 0) -> int:
        try:
            return _libc.ptrace(request, tid, addr, data)
        except OSError as exc:
            if exc.errno == errno.ESRCH and self.gone():
                raise TargetExited(self.pid, "exited during the session", _errno(exc)) from exc
            raise InjectorError(
                self.pid, f"ptrace request {request:#x} on thread {tid} failed", _errno(exc)
            ) from exc

    def _translate_memory(self, exc: OSError, address: int, what: str) -> Exception:
        if exc.errno == errno.ESRCH or (exc.errno in (errno.EIO, errno.EFAULT) and self.gone()):
            return TargetExited(self.pid, f"exited during a memory {what}", errno.ESRCH)
        return MemoryAccessError(self.pid, address, f"cannot {what} memory", _errno(exc))

    def check(self, tid: int | None = None) -> int:
        if not self._active:
            raise InjectorError(self.pid, "the session is not active (use it inside `with`)")
        if threading.get_ident() != self._owner:
            raise InjectorError(self.pid, "ptrace requests must come from the attaching thread")
        if tid is None:
            return self.pid
        if tid not in self._stop_signal:
            raise InjectorError(self.pid, f"thread {tid} is not held by this session")
        return tid

    # ---- register sets ---------------------------------------------------------------------

    def raw_regs(self, tid: int) -> UserRegsStruct:
        regs = UserRegsStruct()
        self.regset(_libc.PTRACE_GETREGSET, tid, _libc.NT_PRSTATUS, regs)
        return regs

    def set_raw_regs(self, tid: int, regs: UserRegsStruct) -> None:
        self.regset(_libc.PTRACE_SETREGSET, tid, _libc.NT_PRSTATUS, regs)

    def regset(
        self, request: int, tid: int, note: int, buf: ctypes.Structure | ctypes.Array[ctypes.c_char]
    ) -> int:
        try:
            return _libc.ptrace_regset(
                request, tid, note, ctypes.addressof(buf), ctypes.sizeof(buf)
            )
        except OSError as exc:
            if exc.errno == errno.ESRCH and self.gone():
                raise TargetExited(self.pid, "exited during the session", _errno(exc)) from exc
            raise InjectorError(
                self.pid, f"regset {note:#x} of thread {tid} refused", _errno(exc)
            ) from exc

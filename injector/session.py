"""A stopped live process: attach, inspect, write, inject syscalls, detach.

``attach(pid)`` returns a :class:`Session`; entering it seizes every thread of the thread group
with ``PTRACE_SEIZE`` and stops each with ``PTRACE_INTERRUPT`` (no signal is sent, so the
target's signal state is untouched), re-reading /proc/PID/task until no new thread appears;
leaving it detaches every thread, also on errors and Ctrl-C (which are held back while ptrace
state is in flux). Threads stay stopped for the whole session: only an injected syscall runs the
thread it is injected into, and that thread is stopped again before the call returns.

Syscall injection (``kernel/ptrace.c``, ``arch/x86/kernel/signal.c``, ``kernel/entry/common.c``):
a thread stopped by PTRACE_INTERRUPT sits in ``get_signal()`` on its way back to user mode; if it
was inside a blocking syscall, ``ip`` already points past the ``syscall`` instruction, ``ax``
holds a restart code (-ERESTARTSYS, ...) and ``orig_ax`` the interrupted call, and the kernel
rewinds for the restart only *after* that stop. So the injection

1. saves every register, points ``ip`` at a ``syscall`` instruction inside the target's vDSO
   (text is never written), sets ``ax`` = nr, the arguments, and ``orig_ax`` = -1 so that no
   restart is applied to the injected state;
2. resumes with PTRACE_SYSCALL to the syscall-entry stop and again to the syscall-exit stop,
   so the call runs exactly once, and reads the result from ``ax``;
3. queues PTRACE_INTERRUPT and continues: the thread stops in ``get_signal()`` again before it
   returns to user mode, now in the same kind of stop as at the start;
4. restores every saved register there, so on detach the kernel restarts the interrupted
   syscall exactly as if nothing had happened.

Single-stepping is not used: a step trap leaves a SIGTRAP that kills the target if it is still
queued at detach.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Final

import numpy as np
import numpy.typing as npt

from injector import _libc
from injector.errors import (
    InjectedSyscallError,
    InjectorError,
    MemoryAccessError,
    NoSuchProcess,
    PermissionDenied,
    StopTimeout,
    TargetExited,
    ZombieProcess,
)
from injector.maps import (
    PROT_READ,
    PROT_WRITE,
    Mapping,
    read_maps,
    read_page_flags,
    read_stat,
    read_vmflags,
)
from injector.memory import MemoryIO
from injector.regs import Arch, UserRegsStruct, X86Regs
from injector.syscalls import NR, syscall_name

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["Session", "attach"]

_PROC: Final = "/proc"
_MASK64: Final = (1 << 64) - 1
_PAGE: Final = 4096
_CAP_SYS_PTRACE: Final = 19
_SYSCALL_STOP: Final = signal.SIGTRAP | 0x80  # PTRACE_O_TRACESYSGOOD
_GROUP_STOP_SIGNALS: Final = frozenset(
    {signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU}
)
_DEFERRED_SIGNALS: Final = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT}
_XSTATE_MAX: Final = 1 << 16
_STATUS_KEYS: Final = frozenset(
    {b"State", b"Tgid", b"PPid", b"TracerPid", b"Uid", b"CapEff", b"Seccomp"}
)
_SPIN_NS: Final = 200_000  # how long a wait polls waitpid before it starts sleeping

# What a waited-for thread reported.
_EVENT_STOP: Final = 0  # PTRACE_EVENT_STOP: interrupt or group stop
_SYSCALL: Final = 1  # syscall-entry or syscall-exit stop
_SIGNAL: Final = 2  # signal-delivery stop (the signal is in the second value)


_PTRACE_GET_RSEQ_CONFIGURATION = 0x420F


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold back Ctrl-C and friends while ptrace state is half changed (main thread only:
    Python runs signal handlers there); they are delivered right after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _DEFERRED_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextlib.contextmanager
def _undisturbed() -> Iterator[None]:
    """Run the calling thread SCHED_FIFO while it releases threads, when allowed.

    Every thread that PTRACE_DETACH wakes may preempt the tracer for a whole time slice (about
    3 ms with EEVDF) before it can let the next thread go: detaching 8 busy threads then takes
    milliseconds instead of microseconds. Only the detach loop runs boosted: it never waits for
    a target thread, which a boosted tracer polling on the same CPU would starve.
    """
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


def attach(pid: int, *, timeout: float = 10.0) -> Session:
    """A session on ``pid``; the threads are stopped when it is entered (``with``)."""
    return Session(pid, timeout=timeout)


class Session:
    """One stopped process. Use as a context manager; every method needs an active session and
    must be called from the thread that entered it (ptrace is per tracer thread)."""

    def __init__(self, pid: int, *, timeout: float = 10.0) -> None:
        self.pid = pid
        self.timeout = timeout
        self.arch = Arch.host()
        self._order: list[int] = []  # attached tids, leader first
        self._stop_signal: dict[int, int] = {}
        self._unreaped: list[int] = []  # exited threads still to be waited for
        self._active = False
        self._owner = 0
        self._mem_fd = -1
        self._pagemap_fd = -1
        self._pidfd = -1
        self._memory: MemoryIO | None = None
        self._insn: int | None = None
        # Seccomp filters are suspended for traced threads where the kernel lets us
        # (CAP_SYS_ADMIN): an injected call a filter forbids would otherwise kill the target.
        self.seccomp_suspended = True

    # ---- lifecycle ---------------------------------------------------------------------

    def __enter__(self) -> Session:
        if self._active:
            raise InjectorError(self.pid, "session already entered")
        if self.arch is not Arch.X86_64:
            raise InjectorError(self.pid, f"architecture {self.arch.value} is not implemented")
        self._owner = threading.get_ident()
        with _signals_deferred():
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
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.detach()

    def detach(self) -> None:
        """Let every thread go (idempotent). Threads that were in a group stop stay stopped."""
        if not self._active and not self._order and not self._unreaped:
            return
        if threading.get_ident() != self._owner:
            raise InjectorError(self.pid, "detach must come from the thread that attached")
        with _signals_deferred(), _undisturbed():
            try:
                self._release()
            finally:
                self._active = False
                self._close_fds()

    def _close_fds(self) -> None:
        if self._memory is not None:
            self._memory.close()
            self._memory = None
        for fd in (self._mem_fd, self._pagemap_fd, self._pidfd):
            if fd >= 0:
                os.close(fd)
        self._mem_fd = self._pagemap_fd = self._pidfd = -1

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
                return
            self.seccomp_suspended = False
        _libc.ptrace(_libc.PTRACE_SEIZE, tid, 0, options)

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
                    self._wait_event_stop(tid, deadline)
                except TargetExited:
                    if tid == self.pid or self._gone():
                        raise
                    # a short-lived thread exited before it stopped; _wait forgot it

    # ---- waiting -----------------------------------------------------------------------

    def _wait(self, tid: int, deadline: float) -> tuple[int, int]:
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
            return _EVENT_STOP, sig
        if sig == _SYSCALL_STOP:
            return _SYSCALL, 0
        return _SIGNAL, sig

    def _wait_event_stop(
        self, tid: int, deadline: float, on_signal: Callable[[], None] | None = None
    ) -> None:
        """Wait for the PTRACE_EVENT_STOP that a queued INTERRUPT produces. A signal that
        arrives first is delivered (as a real one would be) and the wait goes on: the queued
        interrupt stops the thread right after, as CRIU's compel does."""
        while True:
            kind, sig = self._wait(tid, deadline)
            if kind == _EVENT_STOP:
                self._stop_signal[tid] = sig
                return
            if kind == _SIGNAL and on_signal is not None:
                on_signal()
            self._ptrace(_libc.PTRACE_INTERRUPT, tid)
            self._ptrace(_libc.PTRACE_CONT, tid, 0, sig if kind == _SIGNAL else 0)

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

    def _gone(self) -> bool:
        try:
            return read_stat(self.pid, procfs=Path(_PROC))[0][:1] in (b"Z", b"X", b"x")
        except OSError:
            return True

    def _ptrace(self, request: int, tid: int, addr: int = 0, data: int = 0) -> int:
        try:
            return _libc.ptrace(request, tid, addr, data)
        except OSError as exc:
            if exc.errno == errno.ESRCH and self._gone():
                raise TargetExited(self.pid, "exited during the session", _errno(exc)) from exc
            raise InjectorError(
                self.pid, f"ptrace request {request:#x} on thread {tid} failed", _errno(exc)
            ) from exc

    def _translate_memory(self, exc: OSError, address: int, what: str) -> Exception:
        if exc.errno == errno.ESRCH or (exc.errno in (errno.EIO, errno.EFAULT) and self._gone()):
            return TargetExited(self.pid, f"exited during a memory {what}", errno.ESRCH)
        return MemoryAccessError(self.pid, address, f"cannot {what} memory", _errno(exc))

    def _check(self, tid: int | None = None) -> int:
        if not self._active:
            raise InjectorError(self.pid, "the session is not active (use it inside `with`)")
        if threading.get_ident() != self._owner:
            raise InjectorError(self.pid, "ptrace requests must come from the attaching thread")
        if tid is None:
            return self.pid
        if tid not in self._stop_signal:
            raise InjectorError(self.pid, f"thread {tid} is not held by this session")
        return tid

    # ---- memory ------------------------------------------------------------------------

    def _mem(self) -> MemoryIO:
        self._check()
        if self._memory is None:
            try:
                self._mem_fd = os.open(f"{_PROC}/{self.pid}/mem", os.O_RDWR | os.O_CLOEXEC)
            except OSError as exc:
                if self._gone():
                    raise TargetExited(self.pid, "exited during the session", _errno(exc)) from exc
                raise PermissionDenied(self.pid, "cannot open /proc/PID/mem", _errno(exc)) from exc
            self._memory = MemoryIO(
                self.pid, self._mem_fd, self._translate_memory, self._protect_round_trip
            )
        return self._memory

    @property
    def memory(self) -> MemoryIO:
        """The memory accessor itself (``force_via_proc_mem`` can be switched off there)."""
        return self._mem()

    def maps(self) -> list[Mapping]:
        """The target's mappings, in address order."""
        self._check()
        try:
            result = read_maps(self.pid)
        except (FileNotFoundError, ProcessLookupError) as exc:
            raise TargetExited(self.pid, "exited during the session", errno.ESRCH) from exc
        except OSError as exc:
            raise InjectorError(self.pid, "cannot read /proc/PID/maps", _errno(exc)) from exc
        if not result and self._gone():  # a zombie has no memory left
            raise TargetExited(self.pid, "exited during the session", errno.ESRCH)
        return result

    def vm_flags(self) -> dict[int, frozenset[str]]:
        """smaps ``VmFlags`` of every mapping, keyed by start address."""
        self._check()
        try:
            return read_vmflags(self.pid)
        except (FileNotFoundError, ProcessLookupError) as exc:
            raise TargetExited(self.pid, "exited during the session", errno.ESRCH) from exc

    def page_flags(self, start: int, end: int) -> npt.NDArray[np.uint64]:
        """/proc/PID/pagemap entries for ``[start, end)``, one uint64 per page (bit 63 present,
        62 swapped, 61 file/shared, 57 uffd-wp, 56 exclusive; see ``injector.maps``)."""
        self._check()
        try:
            if self._pagemap_fd < 0:
                self._pagemap_fd = os.open(
                    f"{_PROC}/{self.pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC
                )
            return read_page_flags(self._pagemap_fd, start, end, _PAGE)
        except OSError as exc:
            raise self._translate_memory(exc, start, "pagemap read") from exc

    def read(self, address: int, size: int) -> bytes:
        """``size`` bytes at ``address`` (PROT_NONE and unreadable pages too)."""
        return self._mem().read(address, size)

    def read_into(self, address: int, buffer: Buffer) -> None:
        """Fill the writable ``buffer`` from ``address``."""
        self._mem().read_into(address, buffer)

    def read_runs(self, runs: Iterable[tuple[int, Buffer]]) -> None:
        """Fill each (address, writable buffer) pair, batched like ``write_runs``."""
        self._mem().read_runs(runs)

    def read_iov(self, local: npt.NDArray[np.uint64], remote: npt.NDArray[np.uint64]) -> None:
        """``read_runs`` from (n, 2) uint64 iovec arrays (see ``MemoryIO.read_iov``)."""
        self._mem().read_iov(local, remote)

    def write(self, address: int, data: Buffer) -> None:
        """Store ``data`` at ``address`` (read-only and PROT_NONE pages too)."""
        self._mem().write(address, data)

    def write_runs(self, runs: Iterable[tuple[int, Buffer]]) -> None:
        """Store many non-overlapping (address, buffer) runs with batched process_vm_writev."""
        self._mem().write_runs(runs)

    def write_iov(self, local: npt.NDArray[np.uint64], remote: npt.NDArray[np.uint64]) -> None:
        """``write_runs`` from (n, 2) uint64 iovec arrays (see ``MemoryIO.write_iov``)."""
        self._mem().write_iov(local, remote)

    def _protect_round_trip(self, start: int, end: int, action: Callable[[], None]) -> None:
        """Make ``[start, end)`` readable and writable with injected mprotect calls, run
        ``action``, and give every mapping its protection back."""
        lo, hi = start & ~(_PAGE - 1), (end + _PAGE - 1) & ~(_PAGE - 1)
        changed: list[tuple[int, int, int]] = []
        covered = lo
        for m in self.maps():
            if m.end <= covered or m.start >= hi:
                continue
            if m.start > covered:
                break
            seg_end = min(m.end, hi)
            if m.prot & (PROT_READ | PROT_WRITE) != PROT_READ | PROT_WRITE:
                changed.append((covered, seg_end, m.prot))
            covered = seg_end
            if covered >= hi:
                break
        if covered < hi:
            raise MemoryAccessError(self.pid, max(covered, start), "not mapped", errno.EFAULT)
        done: list[tuple[int, int, int]] = []
        try:
            for seg_start, seg_end, prot in changed:
                self.mprotect(seg_start, seg_end - seg_start, prot | PROT_READ | PROT_WRITE)
                done.append((seg_start, seg_end, prot))
            action()
        except InjectedSyscallError as exc:
            raise MemoryAccessError(
                self.pid, start, "mprotect round trip refused", _errno(exc)
            ) from exc
        finally:
            for seg_start, seg_end, prot in done:
                self.mprotect(seg_start, seg_end - seg_start, prot)

    # ---- registers ---------------------------------------------------------------------

    def _getregs(self, tid: int) -> UserRegsStruct:
        regs = UserRegsStruct()
        self._regset(_libc.PTRACE_GETREGSET, tid, _libc.NT_PRSTATUS, regs)
        return regs

    def _setregs(self, tid: int, regs: UserRegsStruct) -> None:
        self._regset(_libc.PTRACE_SETREGSET, tid, _libc.NT_PRSTATUS, regs)

    def _regset(
        self, request: int, tid: int, note: int, buf: ctypes.Structure | ctypes.Array[ctypes.c_char]
    ) -> int:
        try:
            return _libc.ptrace_regset(
                request, tid, note, ctypes.addressof(buf), ctypes.sizeof(buf)
            )
        except OSError as exc:
            if exc.errno == errno.ESRCH and self._gone():
                raise TargetExited(self.pid, "exited during the session", _errno(exc)) from exc
            raise InjectorError(
                self.pid, f"regset {note:#x} of thread {tid} refused", _errno(exc)
            ) from exc

    def get_regs(self, tid: int) -> X86Regs:
        """General-purpose registers of a stopped thread (NT_PRSTATUS)."""
        return X86Regs.from_struct(self._getregs(self._check(tid)))

    def set_regs(self, tid: int, regs: X86Regs) -> None:
        """Replace the general-purpose registers of a stopped thread."""
        self._setregs(self._check(tid), regs.to_struct())

    def get_xstate(self, tid: int) -> bytes:
        """The XSAVE area (NT_X86_XSTATE): the 512-byte FXSAVE legacy area, the XSAVE header,
        then the extended components, as long as this CPU's xstate size."""
        buf = ctypes.create_string_buffer(_XSTATE_MAX)
        size = self._regset(_libc.PTRACE_GETREGSET, self._check(tid), _libc.NT_X86_XSTATE, buf)
        return buf.raw[:size]

    def set_xstate(self, tid: int, data: bytes) -> None:
        """Load an XSAVE area (as ``get_xstate`` returns it) into a stopped thread."""
        buf = ctypes.create_string_buffer(bytes(data), len(data))
        self._regset(_libc.PTRACE_SETREGSET, self._check(tid), _libc.NT_X86_XSTATE, buf)

    def rseq_config(self, tid: int) -> tuple[int, int, int] | None:
        """(rseq area address, size, signature) the thread registered, or None if it has
        none (PTRACE_GET_RSEQ_CONFIGURATION, Linux 5.13+)."""
        conf = (ctypes.c_uint64 * 3)()  # struct ptrace_rseq_configuration
        n = self._ptrace(
            _PTRACE_GET_RSEQ_CONFIGURATION, self._check(tid), ctypes.sizeof(conf),
            ctypes.addressof(conf),
        )  # fmt: skip
        if n <= 0 or conf[0] == 0:
            return None
        return int(conf[0]), int(conf[1]) & 0xFFFFFFFF, int(conf[1]) >> 32

    def get_fpregs(self, tid: int) -> bytes:
        """The 512-byte FXSAVE area (NT_PRFPREG, ``struct user_fpregs_struct``)."""
        buf = ctypes.create_string_buffer(512)
        size = self._regset(_libc.PTRACE_GETREGSET, self._check(tid), _libc.NT_PRFPREG, buf)
        return buf.raw[:size]

    def set_fpregs(self, tid: int, data: bytes) -> None:
        """Load a 512-byte FXSAVE area into a stopped thread."""
        if len(data) != 512:
            raise ValueError("an FXSAVE area is 512 bytes")
        buf = ctypes.create_string_buffer(bytes(data), 512)
        self._regset(_libc.PTRACE_SETREGSET, self._check(tid), _libc.NT_PRFPREG, buf)

    # ---- syscall injection -------------------------------------------------------------

    def syscall_site(self) -> int:
        """Address of a ``syscall`` instruction in the target: the vDSO's (cached and checked
        on every use, as the vDSO can be moved), else one in other executable text."""
        insn = self.arch.syscall_insn
        if self._insn is not None and self._mem().read(self._insn, len(insn)) == insn:
            return self._insn
        maps = self.maps()
        candidates = [m for m in maps if m.path == "[vdso]"]
        candidates += [m for m in maps if m.executable and m.readable and m.path != "[vdso]"]
        for m in candidates:
            data = self._mem().read(m.start, m.size)
            at = data.find(insn)
            if at >= 0:
                self._insn = m.start + at
                return self._insn
        raise InjectorError(self.pid, "no syscall instruction found in the vDSO or any text")

    def syscall(self, nr: int, *args: int, tid: int | None = None) -> int:
        """Run syscall ``nr`` with up to six integer arguments in a stopped thread (default:
        the leader) and return its result; -4095..-1 raises InjectedSyscallError."""
        if len(args) > 6:
            raise TypeError("a syscall takes at most six arguments")
        tid = self._check(self.pid if tid is None else tid)
        if not self.seccomp_suspended:
            mode = _status_fields(self.pid, tid).get("Seccomp", "0")
            if mode != "0":
                raise InjectorError(
                    self.pid,
                    f"thread {tid} runs under seccomp (mode {mode}) and seccomp could not be "
                    f"suspended (needs CAP_SYS_ADMIN): an injected {syscall_name(self.arch, nr)}"
                    "() could kill it",
                )
        insn = self.syscall_site()
        with _signals_deferred():
            result = self._inject(tid, nr, args, insn)
        if -4095 <= result < 0:
            raise InjectedSyscallError(self.pid, syscall_name(self.arch, nr), -result)
        return result

    @staticmethod
    def _injected_regs(
        saved: UserRegsStruct, nr: int, args: tuple[int, ...], insn: int
    ) -> UserRegsStruct:
        regs = UserRegsStruct.from_buffer_copy(saved)
        regs.ip, regs.ax, regs.orig_ax = insn, nr & _MASK64, _MASK64
        for name, value in zip(("di", "si", "dx", "r10", "r8", "r9"), args, strict=False):
            setattr(regs, name, value & _MASK64)
        return regs

    def _inject(self, tid: int, nr: int, args: tuple[int, ...], insn: int) -> int:
        deadline = time.monotonic() + self.timeout
        saved = self._getregs(tid)
        entered = False
        restored = False

        def deliver_with_own_regs() -> None:
            # A signal-delivery stop after the call: the signal frame must hold the thread's
            # own registers, not the injected ones.
            nonlocal restored
            self._setregs(tid, saved)
            restored = True

        try:
            # 1-2: to the syscall-entry stop. A signal that arrives first is delivered with the
            # thread's own registers back in place, then the injection starts over.
            for _ in range(16):
                self._setregs(tid, self._injected_regs(saved, nr, args, insn))
                self._ptrace(_libc.PTRACE_SYSCALL, tid)
                kind, sig = self._wait(tid, deadline)
                if kind == _SYSCALL:
                    entered = True
                    break
                if kind == _SIGNAL:
                    self._setregs(tid, saved)
                    self._ptrace(_libc.PTRACE_INTERRUPT, tid)
                    self._ptrace(_libc.PTRACE_CONT, tid, 0, sig)
                    self._wait_event_stop(tid, deadline)
                    saved = self._getregs(tid)
            else:
                raise InjectorError(self.pid, f"thread {tid} never entered the injected syscall")
            self._ptrace(_libc.PTRACE_SYSCALL, tid)
            self._wait_syscall_exit(tid, deadline)
            result = ctypes.c_int64(self._getregs(tid).ax).value
            # 3: back to an interrupt stop before user mode.
            self._ptrace(_libc.PTRACE_INTERRUPT, tid)
            self._ptrace(_libc.PTRACE_CONT, tid)
            self._wait_event_stop(tid, deadline, on_signal=deliver_with_own_regs)
        except BaseException:
            if not entered:
                with contextlib.suppress(InjectorError):
                    self._setregs(tid, saved)
            raise
        # 4: the thread's own registers; the kernel restarts an interrupted syscall on resume.
        if not restored:
            self._setregs(tid, saved)
        return result

    def _wait_syscall_exit(self, tid: int, deadline: float) -> None:
        """Wait for the syscall-exit stop; an injected call still blocking at the deadline is
        interrupted (it then returns -ERESTARTSYS or -EINTR) instead of hanging the session."""
        interrupted = False
        while True:
            try:
                kind, _sig = self._wait(tid, deadline)
            except StopTimeout:
                if interrupted:
                    raise
                interrupted = True
                self._ptrace(_libc.PTRACE_INTERRUPT, tid)
                deadline = time.monotonic() + self.timeout
                continue
            if kind == _SYSCALL:
                return
            raise InjectorError(self.pid, f"thread {tid}: unexpected stop in an injected syscall")

    def _nr(self, name: str) -> int:
        return NR[self.arch][name]

    def mmap(
        self, addr: int, length: int, prot: int, flags: int, *, fd: int = -1, offset: int = 0
    ) -> int:
        """Injected ``mmap``; returns the mapping's address."""
        return self.syscall(self._nr("mmap"), addr, length, prot, flags, fd, offset)

    def munmap(self, addr: int, length: int) -> None:
        self.syscall(self._nr("munmap"), addr, length)

    def mprotect(self, addr: int, length: int, prot: int) -> None:
        self.syscall(self._nr("mprotect"), addr, length, prot)

    def madvise(self, addr: int, length: int, advice: int) -> None:
        self.syscall(self._nr("madvise"), addr, length, advice)

    def brk(self, addr: int) -> int:
        """Injected ``brk``: the new program break (the old one when refused, as the kernel
        reports failure). glibc's cached break in the target is stale afterwards."""
        return self.syscall(self._nr("brk"), addr)

    def prctl(self, option: int, *args: int) -> int:
        return self.syscall(self._nr("prctl"), option, *args)

    def close(self, fd: int) -> None:
        """Close a descriptor in the target."""
        self.syscall(self._nr("close"), fd)

    def ioctl(self, fd: int, request: int, arg: int = 0) -> int:
        return self.syscall(self._nr("ioctl"), fd, request, arg)

    def userfaultfd(self, flags: int) -> int:
        """A userfaultfd created inside the target (its descriptor number there)."""
        return self.syscall(self._nr("userfaultfd"), flags)

    def pidfd_getfd(self, remote_fd: int) -> int:
        """A duplicate, in this process, of the target's descriptor ``remote_fd`` (the caller
        closes it)."""
        self._check()
        try:
            if self._pidfd < 0:
                self._pidfd = _libc.pidfd_open(self.pid)
            return _libc.pidfd_getfd(self._pidfd, remote_fd)
        except OSError as exc:
            if exc.errno == errno.ESRCH or self._gone():
                raise TargetExited(self.pid, "exited during the session", errno.ESRCH) from exc
            raise InjectorError(
                self.pid, f"cannot take descriptor {remote_fd}", _errno(exc)
            ) from exc

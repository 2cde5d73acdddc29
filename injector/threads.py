"""Ending and creating threads of a stopped process, as CRIU's restorer does it from inside
(``criu/pie/restorer.c``), but from a tracer: a thread ends with an ``exit`` run in it, a
thread is created with a ``clone3`` run in another one (``kernel/fork.c``).

Ending: the thread's signals are blocked first (a process-directed signal must not be taken by
a thread that is about to go), then ``exit(0)`` runs in it and the tracer reaps it. Nothing
of the thread's survives: no signal frame, no handler runs.

Creating: ``clone3`` runs in a held thread with PTRACE_O_TRACECLONE set for that one call, so
the kernel attaches the new thread to us and stops it before its first instruction
(``ptrace_init_task``: a seized tracer's child starts with a PTRACE_EVENT_STOP). The caller
then gives it its registers; it runs only once the session lets every thread go. Signals of
the calling thread are blocked during the call (the new thread inherits that mask, and the
caller sets the one it wants).
"""

from __future__ import annotations

import contextlib
import ctypes
import struct
import time
from typing import Final

import attrs

from injector import _libc
from injector.errors import InjectedSyscallError, InjectorError, TargetExited
from injector.inject import _injected_regs, _wait_syscall_exit
from injector.tracer import OTHER_EVENT, SYSCALL_STOP, Tracer

__all__ = [
    "CLONE_THREAD_FLAGS",
    "SS_DISABLE",
    "STACK_T_SIZE",
    "ThreadExtras",
    "clone_args",
    "pack_stack_t",
    "run_clone",
    "run_exit",
    "thread_clone_args",
    "unpack_stack_t",
]

_MASK64: Final = (1 << 64) - 1
_NR_EXIT: Final = 60
_NR_CLONE3: Final = 435
_ALL_SIGNALS: Final = _MASK64

CLONE_VM: Final = 0x100
CLONE_FS: Final = 0x200
CLONE_FILES: Final = 0x400
CLONE_SIGHAND: Final = 0x800
CLONE_THREAD: Final = 0x10000
CLONE_SYSVSEM: Final = 0x40000
CLONE_SETTLS: Final = 0x80000
CLONE_CHILD_CLEARTID: Final = 0x200000
# What pthread_create passes (glibc sysdeps/unix/sysv/linux/createthread.c), CLONE_SETTLS and
# CLONE_CHILD_CLEARTID added where the image has a TLS base and a tid address.
CLONE_THREAD_FLAGS: Final = (
    CLONE_VM | CLONE_FS | CLONE_FILES | CLONE_SIGHAND | CLONE_THREAD | CLONE_SYSVSEM
)
CLONE_ARGS_SIZE: Final = 88  # CLONE_ARGS_SIZE_VER2: up to cgroup
STACK_T_SIZE: Final = 24  # stack_t: ss_sp, ss_flags (int, padded), ss_size
SS_DISABLE: Final = 2


@attrs.frozen
class ThreadExtras:
    """Kernel state of a thread that only the thread itself can read (injected calls):
    its clear_child_tid address and its alternate signal stack (ss_sp, ss_size, ss_flags),
    as CRIU's ``thread_info.clear_tid_addr`` and ``thread_core.sas`` hold them."""

    clear_tid: int
    altstack: tuple[int, int, int] = (0, 0, SS_DISABLE)


def pack_stack_t(sp: int, size: int, flags: int) -> bytes:
    return struct.pack("<QiiQ", sp, flags, 0, size)


def unpack_stack_t(data: bytes) -> tuple[int, int, int]:
    """(ss_sp, ss_size, ss_flags) of a ``stack_t``."""
    sp, flags, _, size = struct.unpack("<QiiQ", data[:STACK_T_SIZE])
    return sp, size, flags & 0xFFFFFFFF


def clone_args(
    flags: int, *, child_tid: int = 0, tls: int = 0, set_tid: int = 0, set_tid_size: int = 0
) -> bytes:
    """``struct clone_args`` (include/uapi/linux/sched.h): flags, pidfd, child_tid,
    parent_tid, exit_signal, stack, stack_size, tls, set_tid, set_tid_size, cgroup."""
    return struct.pack("<11Q", flags, 0, child_tid, 0, 0, 0, 0, tls, set_tid, set_tid_size, 0)


def thread_clone_args(*, tls: int, clear_tid: int, set_tid_at: int = 0) -> bytes:
    """clone_args for a thread as pthread_create makes one, with TLS base ``tls`` and
    clear_child_tid ``clear_tid`` where non-zero; ``set_tid_at``: the offset, from the
    arguments, of one pid_t with the id wanted (the caller fills in the pointer)."""
    flags = CLONE_THREAD_FLAGS
    if tls:
        flags |= CLONE_SETTLS
    if clear_tid:
        flags |= CLONE_CHILD_CLEARTID
    return clone_args(
        flags, child_tid=clear_tid, tls=tls, set_tid=set_tid_at, set_tid_size=1 if set_tid_at else 0
    )


def run_exit(t: Tracer, tid: int, insn: int) -> None:
    """End thread ``tid`` (not the leader): block its signals, run ``exit(0)`` in it through
    the ``syscall`` instruction at ``insn`` and reap it."""
    if tid == t.pid:
        raise InjectorError(t.pid, "the leader cannot be ended alone")
    deadline = time.monotonic() + t.timeout
    t.set_sigmask(tid, _ALL_SIGNALS)
    regs = _injected_regs(t.raw_regs(tid), _NR_EXIT, (0,), insn)
    t.set_raw_regs(tid, regs)
    t.request(_libc.PTRACE_CONT, tid)
    while True:
        try:
            t.wait(tid, deadline)  # a stop before it exits (SIGKILL/SIGSTOP only): go on
        except TargetExited:
            if t.gone():
                raise
            return  # reaped and forgotten by wait()
        t.request(_libc.PTRACE_CONT, tid)


def run_clone(t: Tracer, tid: int, insn: int, args: int, size: int = CLONE_ARGS_SIZE) -> int:
    """Run ``clone3(args, size)`` in the held thread ``tid``; the new thread is held too,
    stopped before its first instruction, with every signal blocked. Its tid."""
    deadline = time.monotonic() + t.timeout
    saved = t.raw_regs(tid)
    mask = t.get_sigmask(tid)
    t.set_sigmask(tid, _ALL_SIGNALS)
    t.request(_libc.PTRACE_SETOPTIONS, tid, 0, t.options | _libc.PTRACE_O_TRACECLONE)
    new_tid = 0
    try:
        t.set_raw_regs(tid, _injected_regs(saved, _NR_CLONE3, (args, size), insn))
        t.request(_libc.PTRACE_SYSCALL, tid)
        kind, _ = t.wait(tid, deadline)
        if kind != SYSCALL_STOP:
            raise InjectorError(t.pid, f"thread {tid} never entered the injected clone3")
        t.request(_libc.PTRACE_SYSCALL, tid)
        kind, event = t.wait(tid, deadline)
        if kind == OTHER_EVENT and event == _libc.PTRACE_EVENT_CLONE:
            new_tid = t.event_message(tid)
            t.request(_libc.PTRACE_SYSCALL, tid)
            _wait_syscall_exit(t, tid, deadline)
        elif kind != SYSCALL_STOP:
            raise InjectorError(t.pid, f"thread {tid}: unexpected stop in an injected clone3")
        result = ctypes.c_int64(t.raw_regs(tid).ax).value
        if new_tid:
            t.adopt(new_tid, deadline)
        # back to an interrupt stop before user mode, as after any injected call
        t.request(_libc.PTRACE_INTERRUPT, tid)
        t.request(_libc.PTRACE_CONT, tid)
        t.wait_event_stop(tid, deadline)
    except BaseException:
        # A thread made but not handed back would run the injected registers once let go.
        if new_tid and new_tid in t.tids:
            with contextlib.suppress(InjectorError):
                run_exit(t, new_tid, insn)
        raise
    finally:
        t.request(_libc.PTRACE_SETOPTIONS, tid, 0, t.options)
        t.set_raw_regs(tid, saved)
        t.set_sigmask(tid, mask)
    if -4095 <= result < 0:
        raise InjectedSyscallError(t.pid, "clone3", -result)
    if result != new_tid:
        raise InjectorError(t.pid, f"clone3 returned {result}, the kernel reported {new_tid}")
    return new_tid

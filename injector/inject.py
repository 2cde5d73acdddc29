"""Running one system call inside a stopped thread (``kernel/ptrace.c``,
``arch/x86/kernel/signal.c``, ``kernel/entry/common.c``).

A thread stopped by PTRACE_INTERRUPT sits in ``get_signal()`` on its way back to user mode; if
it was inside a blocking syscall, ``ip`` already points past the ``syscall`` instruction,
``ax`` holds a restart code (-ERESTARTSYS, ...) and ``orig_ax`` the interrupted call, and the
kernel rewinds for the restart only *after* that stop. So the injection

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
import time
from collections.abc import Callable, Sequence
from typing import Final

from injector import _libc
from injector.errors import InjectorError, StopTimeout
from injector.maps import Mapping
from injector.regs import UserRegsStruct
from injector.tracer import SIGNAL_STOP, SYSCALL_STOP, Tracer

__all__ = ["find_syscall_site", "run_syscall", "run_syscalls"]

_MASK64: Final = (1 << 64) - 1
_ARG_REGS: Final = ("di", "si", "dx", "r10", "r8", "r9")


def find_syscall_site(
    maps: list[Mapping], read: Callable[[int, int], bytes], insn: bytes
) -> int | None:
    """Address of a ``syscall`` instruction: in the vDSO if it has one, else in other
    readable executable text; None if there is none."""
    candidates = [m for m in maps if m.path == "[vdso]"]
    candidates += [m for m in maps if m.executable and m.readable and m.path != "[vdso]"]
    for m in candidates:
        at = read(m.start, m.size).find(insn)
        if at >= 0:
            return m.start + at
    return None


def _injected_regs(
    saved: UserRegsStruct, nr: int, args: tuple[int, ...], insn: int
) -> UserRegsStruct:
    regs = UserRegsStruct.from_buffer_copy(saved)
    regs.ip, regs.ax, regs.orig_ax = insn, nr & _MASK64, _MASK64
    for name, value in zip(_ARG_REGS, args, strict=False):
        setattr(regs, name, value & _MASK64)
    return regs


def run_syscall(t: Tracer, tid: int, nr: int, args: tuple[int, ...], insn: int) -> int:
    """Run syscall ``nr`` once in the stopped thread ``tid`` through the ``syscall``
    instruction at ``insn``, then put every register back; the raw result (``ax``)."""
    return run_syscalls(t, tid, [(nr, args)], insn)[0]


def run_syscalls(
    t: Tracer, tid: int, calls: Sequence[tuple[int, tuple[int, ...]]], insn: int
) -> list[int]:
    """``run_syscall`` of each of ``calls`` in turn, chained: from one call's syscall-exit
    stop the thread goes straight on to the next (it runs the ``syscall`` instruction alone
    in between), and back to an interrupt stop once, after the last (steps 3-4): two stops
    a call instead of three. The raw results, in order."""
    deadline = time.monotonic() + t.timeout
    saved = t.raw_regs(tid)
    entered = False
    restored = False
    results: list[int] = []

    def deliver_with_own_regs() -> None:
        # A signal-delivery stop after the call: the signal frame must hold the thread's
        # own registers, not the injected ones.
        nonlocal restored
        t.set_raw_regs(tid, saved)
        restored = True

    try:
        for nr, args in calls:
            # 1-2: to the syscall-entry stop. A signal that arrives first (also on the way
            # from the previous call back to user mode) is delivered with the thread's own
            # registers in place, then this call starts over from the interrupt stop.
            for _ in range(16):
                t.set_raw_regs(tid, _injected_regs(saved, nr, args, insn))
                t.request(_libc.PTRACE_SYSCALL, tid)
                kind, sig = t.wait(tid, deadline)
                if kind == SYSCALL_STOP:
                    entered = True
                    break
                if kind == SIGNAL_STOP:
                    t.set_raw_regs(tid, saved)
                    t.request(_libc.PTRACE_INTERRUPT, tid)
                    t.request(_libc.PTRACE_CONT, tid, 0, sig)
                    t.wait_event_stop(tid, deadline)
                    saved = t.raw_regs(tid)
            else:
                raise InjectorError(t.pid, f"thread {tid} never entered the injected syscall")
            t.request(_libc.PTRACE_SYSCALL, tid)
            _wait_syscall_exit(t, tid, deadline)
            results.append(ctypes.c_int64(t.raw_regs(tid).ax).value)
        # 3: back to an interrupt stop before user mode.
        t.request(_libc.PTRACE_INTERRUPT, tid)
        t.request(_libc.PTRACE_CONT, tid)
        t.wait_event_stop(tid, deadline, on_signal=deliver_with_own_regs)
    except BaseException:
        if not entered:
            with contextlib.suppress(InjectorError):
                t.set_raw_regs(tid, saved)
        raise
    # 4: the thread's own registers; the kernel restarts an interrupted syscall on resume.
    if not restored:
        t.set_raw_regs(tid, saved)
    return results


def _wait_syscall_exit(t: Tracer, tid: int, deadline: float) -> None:
    """Wait for the syscall-exit stop; an injected call still blocking at the deadline is
    interrupted (it then returns -ERESTARTSYS or -EINTR) instead of hanging the session."""
    interrupted = False
    while True:
        try:
            kind, _sig = t.wait(tid, deadline)
        except StopTimeout:
            if interrupted:
                raise
            interrupted = True
            t.request(_libc.PTRACE_INTERRUPT, tid)
            deadline = time.monotonic() + t.timeout
            continue
        if kind == SYSCALL_STOP:
            return
        raise InjectorError(t.pid, f"thread {tid}: unexpected stop in an injected syscall")

"""Timers and pending signals of a task, as ``core-<tid>.img`` carries them (CRIU
images/timer.proto, siginfo.proto; criu/timer.c, criu/cr-dump.c ``dump_task_signals``), and the
signal numbers, masks and ``SA_*`` bits needed to read them and ``sa_entry`` (x86-64 / generic
Linux values).

A ``sigset`` word holds signal N in bit N-1, as the kernel's ``sigset_t`` does; signals above 64
would be in the ``*_extended`` words, which x86-64 and aarch64 never use.
"""

# Message fields are attrs field specifiers made by formats.pb, not mutable defaults:
# ruff: noqa: RUF009

from __future__ import annotations

from collections.abc import Iterable

import attrs

from formats.pb import Kind, Message, optional, repeated, required

__all__ = [
    "SA_NOCLDSTOP",
    "SA_NOCLDWAIT",
    "SA_NODEFER",
    "SA_ONSTACK",
    "SA_RESETHAND",
    "SA_RESTART",
    "SA_RESTORER",
    "SA_SIGINFO",
    "SIGACTION_SIGNALS",
    "SIGNALS",
    "SIG_DFL",
    "SIG_IGN",
    "ItimerEntry",
    "PosixTimerEntry",
    "SiginfoEntry",
    "SignalQueueEntry",
    "TaskTimersEntry",
    "signal_number",
    "signals_to_sigset",
    "sigset_to_signals",
]

U32, U64, MSG = Kind.UINT32, Kind.UINT64, Kind.MESSAGE

# Linux signal numbers (asm-generic / x86 signal.h); 32..64 are the real-time signals.
SIGNALS: dict[int, str] = {
    1: "SIGHUP", 2: "SIGINT", 3: "SIGQUIT", 4: "SIGILL", 5: "SIGTRAP", 6: "SIGABRT",
    7: "SIGBUS", 8: "SIGFPE", 9: "SIGKILL", 10: "SIGUSR1", 11: "SIGSEGV", 12: "SIGUSR2",
    13: "SIGPIPE", 14: "SIGALRM", 15: "SIGTERM", 16: "SIGSTKFLT", 17: "SIGCHLD", 18: "SIGCONT",
    19: "SIGSTOP", 20: "SIGTSTP", 21: "SIGTTIN", 22: "SIGTTOU", 23: "SIGURG", 24: "SIGXCPU",
    25: "SIGXFSZ", 26: "SIGVTALRM", 27: "SIGPROF", 28: "SIGWINCH", 29: "SIGIO", 30: "SIGPWR",
    31: "SIGSYS",
}  # fmt: skip
_SIGMAX = 64

# task_core_entry.sigactions holds one sa_entry per signal 1..64 except SIGKILL and SIGSTOP, in
# that order (criu/cr-dump.c dump_sigact / sigact.c: "if (sig == SIGKILL || sig == SIGSTOP)").
SIGACTION_SIGNALS: tuple[int, ...] = tuple(s for s in range(1, _SIGMAX + 1) if s not in (9, 19))

# sa_entry.sigaction values that are not addresses, and sa_entry.flags bits (x86 signal.h).
SIG_DFL, SIG_IGN = 0, 1
SA_NOCLDSTOP = 0x00000001
SA_NOCLDWAIT = 0x00000002
SA_SIGINFO = 0x00000004
SA_RESTORER = 0x04000000
SA_ONSTACK = 0x08000000
SA_RESTART = 0x10000000
SA_NODEFER = 0x40000000
SA_RESETHAND = 0x80000000


def signal_number(name: str) -> int:
    """The number of a standard signal given by name (``"SIGWINCH"`` -> 28)."""
    for number, known in SIGNALS.items():
        if known == name:
            return number
    raise ValueError(f"unknown signal name {name!r}")


def sigset_to_signals(mask: int) -> frozenset[int]:
    """Signal numbers whose bit (N-1) is set in a 64-bit sigset word."""
    if mask < 0 or mask >> _SIGMAX:
        raise ValueError(f"sigset 0x{mask:x} does not fit 64 bits")
    return frozenset(n + 1 for n in range(_SIGMAX) if mask >> n & 1)


def signals_to_sigset(signals: Iterable[int]) -> int:
    """The sigset word of the given signal numbers (1..64)."""
    mask = 0
    for signo in signals:
        if not 1 <= signo <= _SIGMAX:
            raise ValueError(f"signal {signo} is outside 1..{_SIGMAX}")
        mask |= 1 << (signo - 1)
    return mask


@attrs.define(kw_only=True)
class ItimerEntry(Message):
    """itimer_entry: one of getitimer's timers, value (time left) and interval."""

    isec: int = required(1, U64)  # it_interval.tv_sec
    iusec: int = required(2, U64)  # it_interval.tv_usec
    vsec: int = required(3, U64)  # it_value.tv_sec (time left at dump time)
    vusec: int = required(4, U64)  # it_value.tv_usec


@attrs.define(kw_only=True)
class PosixTimerEntry(Message):
    """posix_timer_entry: one timer_create() timer and its sigevent."""

    it_id: int = required(1, U32)
    clock_id: int = required(2, U32)
    si_signo: int = required(3, U32)
    it_sigev_notify: int = required(4, U32)  # SIGEV_SIGNAL 0, SIGEV_NONE 1, SIGEV_THREAD_ID 4
    sival_ptr: int = required(5, U64)
    overrun: int = required(6, U32)
    isec: int = required(7, U64)  # it_interval
    insec: int = required(8, U64)
    vsec: int = required(9, U64)  # it_value (time left)
    vnsec: int = required(10, U64)
    notify_thread_id: int | None = optional(11, Kind.INT32)


@attrs.define(kw_only=True)
class TaskTimersEntry(Message):
    """task_timers_entry (task_core_entry.timers): ITIMER_REAL/VIRTUAL/PROF and POSIX timers."""

    real: ItimerEntry = required(1, MSG, message=ItimerEntry)
    virt: ItimerEntry = required(2, MSG, message=ItimerEntry)
    prof: ItimerEntry = required(3, MSG, message=ItimerEntry)
    posix: list[PosixTimerEntry] = repeated(4, MSG, message=PosixTimerEntry)


@attrs.define(kw_only=True)
class SiginfoEntry(Message):
    """siginfo_entry: one queued signal, the kernel's 128-byte ``siginfo_t`` as read by
    PTRACE_PEEKSIGINFO."""

    siginfo: bytes = required(1, Kind.BYTES)

    @property
    def si_signo(self) -> int:
        """``si_signo`` (the first int of ``siginfo_t``)."""
        return int.from_bytes(self.siginfo[0:4], "little", signed=True)

    @property
    def si_code(self) -> int:
        """``si_code`` (the third int of ``siginfo_t``: after si_signo and si_errno)."""
        return int.from_bytes(self.siginfo[8:12], "little", signed=True)


@attrs.define(kw_only=True)
class SignalQueueEntry(Message):
    """signal_queue_entry: pending signals, shared (``signals_s``) or per thread (``signals_p``)."""

    signals: list[SiginfoEntry] = repeated(1, MSG, message=SiginfoEntry)

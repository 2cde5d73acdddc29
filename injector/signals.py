"""The part of a live process's signal state that /proc shows without ptrace.

From /proc/PID/task/TID/status (``fs/proc/array.c`` ``task_sig``), per thread: ``SigPnd``
(pending for that thread), ``SigBlk`` (its blocked mask: CRIU's ``blk_sigset`` in
``core-TID.img``), ``SigIgn`` and ``SigCgt`` (ignored and caught; the handler table is shared
by all threads, so these agree between threads); for the process: ``ShdPnd`` (pending for the
whole thread group) and ``SigQ`` (queued signals of the real user, and RLIMIT_SIGPENDING).
Masks are kept as the kernel prints them, bit N-1 for signal N, which is also how CRIU's
images store sigsets; :func:`signals_in` and :func:`sigmask` convert.

From /proc/PID/timers (``fs/proc/base.c`` ``show_timer``, CONFIG_CHECKPOINT_RESTORE), the
POSIX timers: id, signal, sigev value, notification and clock, as ``criu/proc_parse.c``
``parse_posix_timers`` reads them.

What /proc does not show, and what therefore needs code running in the target (an injected
syscall through ``injector.Session`` or a parasite), is not read here:

- handlers: ``sa_handler``, ``sa_flags``, ``sa_mask`` and ``sa_restorer`` of every signal
  (CRIU's ``sa_entry`` in ``core.tc.sigactions``): an injected ``rt_sigaction(sig, NULL,
  &old)`` per signal. ``SigCgt``/``SigIgn`` only tell which signals have a handler or are
  ignored;
- the ``siginfo`` of pending signals (CRIU's ``signal_queue``): PTRACE_PEEKSIGINFO;
- interval timers (``ITIMER_REAL/VIRTUAL/PROF``: injected ``getitimer``), the time left and
  interval of POSIX timers (injected ``timer_gettime``), overrun counts;
- the alternate signal stack (injected ``sigaltstack``).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import attrs

from injector.errors import InjectorError, NoSuchProcess, PermissionDenied

__all__ = [
    "PosixTimer",
    "SignalState",
    "ThreadSignals",
    "parse_posix_timers",
    "parse_status_signals",
    "read_posix_timers",
    "read_signals",
    "sigmask",
    "signals_in",
]


def signals_in(mask: int) -> frozenset[int]:
    """The signal numbers in a mask (bit N-1 for signal N)."""
    return frozenset(n + 1 for n in range(mask.bit_length()) if mask >> n & 1)


def sigmask(*signals: int) -> int:
    """The mask holding ``signals``."""
    mask = 0
    for sig in signals:
        mask |= 1 << (sig - 1)
    return mask


@attrs.frozen
class ThreadSignals:
    """One thread's signal masks from its status file."""

    tid: int
    pending: int
    blocked: int
    ignored: int
    caught: int


@attrs.frozen
class SignalState:
    """``threads`` leader first, then by tid; ``queued``/``queue_limit`` from ``SigQ``."""

    pid: int
    shared_pending: int
    queued: int | None
    queue_limit: int | None
    threads: tuple[ThreadSignals, ...]

    @property
    def leader(self) -> ThreadSignals:
        return self.threads[0]

    def thread(self, tid: int) -> ThreadSignals:
        for t in self.threads:
            if t.tid == tid:
                return t
        raise KeyError(tid)


_KEYS = (b"SigQ", b"SigPnd", b"ShdPnd", b"SigBlk", b"SigIgn", b"SigCgt")


def parse_status_signals(data: bytes) -> dict[str, int]:
    """The signal lines of a status file: ``SigPnd ShdPnd SigBlk SigIgn SigCgt`` (hex masks)
    and ``SigQ`` split into ``SigQ`` and ``SigQLimit``. Raises ``ValueError`` when one of the
    masks is missing or malformed."""
    found: dict[str, int] = {}
    for line in data.split(b"\n"):
        key, sep, value = line.partition(b":")
        if not sep or key not in _KEYS:
            continue
        text = value.strip()
        try:
            if key == b"SigQ":
                queued, _, limit = text.partition(b"/")
                found["SigQ"] = int(queued)
                found["SigQLimit"] = int(limit)
            else:
                found[key.decode()] = int(text, 16)
        except ValueError as exc:
            raise ValueError(f"status: malformed {key.decode()} line {line!r}") from exc
    missing = [k.decode() for k in _KEYS[1:] if k.decode() not in found]
    if missing:
        raise ValueError(f"status: no {', '.join(missing)} line")
    return found


def _error(pid: int, exc: OSError, what: str) -> InjectorError:
    if isinstance(exc, PermissionError):
        return PermissionDenied(pid, f"cannot read {what}", exc.errno or errno.EACCES)
    if isinstance(exc, FileNotFoundError | ProcessLookupError):
        return NoSuchProcess(pid, "no such process", errno.ESRCH)
    return InjectorError(pid, f"cannot read {what}", exc.errno or 0)


def read_signals(pid: int, procfs: Path = Path("/proc")) -> SignalState:
    """The signal masks of every thread of ``pid`` (a thread that exits meanwhile is left
    out). Raises ``NoSuchProcess`` or ``PermissionDenied``; ``InjectorError`` for a status file
    that cannot be parsed."""
    base = procfs / str(pid)
    try:
        leader = parse_status_signals((base / "status").read_bytes())
        tids = sorted(int(t) for t in os.listdir(base / "task") if t.isdigit())
    except OSError as exc:
        raise _error(pid, exc, "/proc/PID/status") from exc
    except ValueError as exc:
        raise InjectorError(pid, str(exc)) from exc
    threads = []
    for tid in sorted(tids, key=lambda t: (t != pid, t)):
        try:
            fields = parse_status_signals((base / "task" / str(tid) / "status").read_bytes())
        except (FileNotFoundError, ProcessLookupError):
            continue
        except OSError as exc:
            raise _error(pid, exc, f"/proc/PID/task/{tid}/status") from exc
        except ValueError as exc:
            raise InjectorError(pid, f"thread {tid}: {exc}") from exc
        threads.append(
            ThreadSignals(
                tid=tid,
                pending=fields["SigPnd"],
                blocked=fields["SigBlk"],
                ignored=fields["SigIgn"],
                caught=fields["SigCgt"],
            )
        )
    if not threads:
        raise NoSuchProcess(pid, "exited while its signal state was read", errno.ESRCH)
    return SignalState(
        pid=pid,
        shared_pending=leader["ShdPnd"],
        queued=leader.get("SigQ"),
        queue_limit=leader.get("SigQLimit"),
        threads=tuple(threads),
    )


@attrs.frozen
class PosixTimer:
    """One POSIX timer (``posix_timer_entry`` without the times): ``it_id``, ``signal``
    (``si_signo``), ``sigev_value`` (the ``sival_ptr`` given to timer_create), ``notify``
    (``signal``, ``none`` or ``thread``), ``thread_id`` (whether SIGEV_THREAD_ID was given),
    ``notify_pid`` (the pid or tid it notifies, in the reader's pid namespace) and
    ``clock_id``."""

    it_id: int
    signal: int
    sigev_value: int
    notify: str
    thread_id: bool
    notify_pid: int
    clock_id: int


def parse_posix_timers(data: bytes) -> list[PosixTimer]:
    """The bytes of /proc/PID/timers; raises ``ValueError`` for a malformed record."""
    timers = []
    record: dict[bytes, bytes] = {}

    def finish() -> None:
        try:
            signal, _, value = record[b"signal"].partition(b"/")
            notify, _, target = record[b"notify"].partition(b"/")
            kind, _, notify_pid = target.partition(b".")
            timers.append(
                PosixTimer(
                    it_id=int(record[b"ID"]),
                    signal=int(signal),
                    sigev_value=int(value, 16),
                    notify=notify.decode(),
                    thread_id=kind == b"tid",
                    notify_pid=int(notify_pid),
                    clock_id=int(record[b"ClockID"]),
                )
            )
        except (KeyError, ValueError) as exc:
            raise ValueError(f"timers: malformed record {record!r}") from exc

    for line in data.split(b"\n"):
        key, sep, value = line.partition(b":")
        if not sep:
            continue
        key = key.strip()
        if key == b"ID" and record:
            finish()
            record = {}
        record[key] = value.strip()
    if record:
        finish()
    return timers


def read_posix_timers(pid: int, procfs: Path = Path("/proc")) -> list[PosixTimer]:
    """The POSIX timers of ``pid`` (empty when it has none)."""
    try:
        data = (procfs / str(pid) / "timers").read_bytes()
    except OSError as exc:
        raise _error(pid, exc, "/proc/PID/timers") from exc
    try:
        return parse_posix_timers(data)
    except ValueError as exc:
        raise InjectorError(pid, str(exc)) from exc

"""Facts about a process that /proc gives without stopping it: executable, auxv, comm, the mm
fields of /proc/PID/stat, process ids, start time, per-thread state and the syscall a thread
is in (``fs/proc/array.c``, ``fs/proc/base.c``, proc(5)).

Files are read as bytes and parsed defensively (a command name may hold spaces and
parentheses); a process that is gone raises ``FileNotFoundError``/``ProcessLookupError``,
which :class:`injector.session.Session` turns into ``TargetExited``. The procfs root is a
parameter so the parsers can be tested on saved files.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "MM_STAT_FIELDS",
    "read_auxv",
    "read_children",
    "read_comm",
    "read_exe",
    "read_mm_fields",
    "read_start_time",
    "read_stat",
    "read_stat_ids",
    "read_status",
    "thread_state",
]

PROC = Path("/proc")

# /proc/PID/stat field (1-based, proc(5)) -> the kernel's mm_struct name (CRIU's mm_entry
# calls them mm_<name>). These are the fields PR_SET_MM_MAP sets.
MM_STAT_FIELDS = {
    26: "start_code",
    27: "end_code",
    28: "start_stack",
    45: "start_data",
    46: "end_data",
    47: "start_brk",
    48: "arg_start",
    49: "arg_end",
    50: "env_start",
    51: "env_end",
}


def read_exe(pid: int, procfs: Path = PROC) -> str | None:
    """The executable's path (``" (deleted)"`` kept), or None if the link cannot be read
    (a kernel thread, no permission)."""
    try:
        return os.readlink(procfs / str(pid) / "exe")
    except FileNotFoundError:
        if not (procfs / str(pid)).exists():
            raise
        return None
    except PermissionError:
        return None


def read_auxv(pid: int, procfs: Path = PROC) -> list[int]:
    """The auxiliary vector as flat u64 words: type, value, ..., 0, 0 (CRIU's mm_saved_auxv)."""
    raw = (procfs / str(pid) / "auxv").read_bytes()
    n = len(raw) // 8
    return [int.from_bytes(raw[8 * i : 8 * i + 8], "little") for i in range(n)]


def read_comm(pid: int, tid: int | None = None, procfs: Path = PROC) -> str:
    """The command name (of thread ``tid`` when given)."""
    base = procfs / str(pid) if tid is None else procfs / str(pid) / "task" / str(tid)
    return (base / "comm").read_bytes().rstrip(b"\n").decode(errors="replace")


def read_mm_fields(pid: int, procfs: Path = PROC) -> dict[str, int]:
    """The mm fields of :data:`MM_STAT_FIELDS` from /proc/PID/stat (those the kernel shows:
    without ptrace access it prints 0 for some, and old kernels lack the later fields)."""
    rest = read_stat(pid, procfs=procfs)  # field 3 (state) first
    return {
        name: int(rest[number - 3])
        for number, name in MM_STAT_FIELDS.items()
        if number - 3 < len(rest)
    }


def read_stat_ids(pid: int, procfs: Path = PROC) -> tuple[int, int, int]:
    """(ppid, process group, session) from /proc/PID/stat."""
    rest = read_stat(pid, procfs=procfs)
    return int(rest[1]), int(rest[2]), int(rest[3])


def read_stat(pid: int, tid: int | None = None, procfs: Path = Path("/proc")) -> list[bytes]:
    """The fields of /proc/PID/stat (of thread ``tid`` when given) from field 3, the state,
    on: ``[state, ppid, pgrp, session, ...]``. The command name before them may hold spaces
    and parentheses, so the split starts after its last ``)``. Raises OSError if gone."""
    path = (
        procfs / str(pid) / "stat"
        if tid is None
        else procfs / str(pid) / "task" / str(tid) / "stat"
    )
    stat = path.read_bytes()
    return stat[stat.rindex(b")") + 2 :].split()


def read_start_time(pid: int, procfs: Path = PROC) -> int:
    """Field 22 of /proc/PID/stat, the start time in clock ticks since boot: tells a reused
    pid apart."""
    return int(read_stat(pid, procfs=procfs)[19])


def read_children(pid: int, procfs: Path = PROC) -> list[int]:
    """The pids of the children of every thread of ``pid`` (/proc/PID/task/TID/children,
    CONFIG_PROC_CHILDREN); empty when the kernel does not offer the file."""
    out: list[int] = []
    for task in sorted((procfs / str(pid) / "task").iterdir()):
        try:
            out.extend(int(w) for w in (task / "children").read_bytes().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return sorted(set(out))


def thread_state(pid: int, tid: int | None = None, procfs: Path = PROC) -> str | None:
    """The one-letter state (R, S, D, T, t, Z, X) of the process or one thread; None if gone."""
    try:
        return read_stat(pid, tid, procfs)[0][:1].decode()
    except OSError:
        return None


def read_status(pid: int, tid: int | None = None, procfs: Path = PROC) -> dict[str, str]:
    """Every ``Key: value`` line of /proc/PID/status (of thread ``tid`` when given)."""
    base = procfs / str(pid) if tid is None else procfs / str(pid) / "task" / str(tid)
    out: dict[str, str] = {}
    for line in (base / "status").read_bytes().split(b"\n"):
        key, sep, value = line.partition(b":")
        if sep:
            out[key.decode(errors="replace")] = value.strip().decode(errors="replace")
    return out

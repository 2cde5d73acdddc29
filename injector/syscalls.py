"""Syscall numbers the injector and its users inject, per architecture, and the names and
prototypes of every other call, for telling a person which call a thread is blocked in.

x86_64 numbers of the calls we inject follow ``arch/x86/entry/syscalls/syscall_64.tbl``.
Names and argument lists of all the others come from python-ptrace's tables
(``ptrace.syscall.linux.x86_64.SYSCALL_NAMES``, ``ptrace.syscall.prototypes``), imported only
when a name outside our own table is asked for: they cost about 40 ms to import.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Final

from injector.regs import Arch

__all__ = ["ARG_REGS", "NR", "format_call", "syscall_name"]

_X86_64: Final[dict[str, int]] = {
    "read": 0,
    "write": 1,
    "open": 2,
    "close": 3,
    "lseek": 8,
    "mmap": 9,
    "mprotect": 10,
    "munmap": 11,
    "brk": 12,
    "rt_sigaction": 13,
    "rt_sigprocmask": 14,
    "ioctl": 16,
    "mremap": 25,
    "msync": 26,
    "mincore": 27,
    "madvise": 28,
    "dup": 32,
    "dup2": 33,
    "dup3": 292,
    "nanosleep": 35,
    "getitimer": 36,
    "setitimer": 38,
    "getpid": 39,
    "clone": 56,
    "exit": 60,
    "kill": 62,
    "fcntl": 72,
    "getppid": 110,
    "prctl": 157,
    "sigaltstack": 131,
    "arch_prctl": 158,
    "gettid": 186,
    "set_tid_address": 218,
    "restart_syscall": 219,
    "set_robust_list": 273,
    "rseq": 334,
    "exit_group": 231,
    "openat": 257,
    "memfd_create": 319,
    "userfaultfd": 323,
    "pidfd_open": 434,
    "close_range": 436,
    "pidfd_getfd": 438,
    "clone3": 435,
    "process_madvise": 440,
}

NR: Final[dict[Arch, dict[str, int]]] = {Arch.X86_64: _X86_64}
_NAMES: Final[dict[Arch, dict[int, str]]] = {
    arch: {nr: name for name, nr in table.items()} for arch, table in NR.items()
}


def syscall_name(arch: Arch, nr: int) -> str:
    """The name of syscall ``nr`` on ``arch`` (``syscall_<nr>`` when no table knows it)."""
    name = _NAMES.get(arch, {}).get(nr)
    if name is not None:
        return name
    return _ptrace_names(arch).get(nr, f"syscall_{nr}")


# The registers that carry syscall arguments, in order (x86_64 syscall ABI).
ARG_REGS: Final[dict[Arch, tuple[str, ...]]] = {
    Arch.X86_64: ("di", "si", "dx", "r10", "r8", "r9"),
}


def format_call(arch: Arch, nr: int, args: Sequence[int] = ()) -> str:
    """``read(fd=0, buf=0x7ffc..., count=4096)``: the call with its argument names (from
    python-ptrace's prototypes) and ``args``, the values of the argument registers; just
    ``name()`` when no arguments are given."""
    name = syscall_name(arch, nr)
    if not args:
        return f"{name}()"
    from ptrace.syscall.prototypes import SYSCALL_PROTOTYPES  # noqa: PLC0415 - costly import

    proto = SYSCALL_PROTOTYPES.get(name)
    params: Sequence[tuple[str, str]] = proto[1] if proto else ()
    shown = []
    for (ctype, pname), value in zip(params, args, strict=False):
        text = f"{value:#x}" if "*" in ctype or value > 0xFFFF else str(value)
        shown.append(f"{pname}={text}")
    return f"{name}({', '.join(shown)})"


@functools.cache
def _ptrace_names(arch: Arch) -> dict[int, str]:
    if arch is not Arch.X86_64:
        return {}
    from ptrace.syscall.linux.x86_64 import SYSCALL_NAMES  # noqa: PLC0415 - costly import

    return {int(nr): str(name) for nr, name in SYSCALL_NAMES.items()}

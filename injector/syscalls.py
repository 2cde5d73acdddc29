"""Syscall numbers the injector and its users inject, per architecture.

x86_64 numbers follow ``arch/x86/entry/syscalls/syscall_64.tbl``. Only names listed here can be
named in errors; any other number is injected as-is and reported as ``syscall_<nr>``.
"""

from __future__ import annotations

from typing import Final

from injector.regs import Arch

__all__ = ["NR", "syscall_name"]

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
    "rt_sigprocmask": 14,
    "ioctl": 16,
    "mremap": 25,
    "msync": 26,
    "mincore": 27,
    "madvise": 28,
    "dup": 32,
    "dup2": 33,
    "nanosleep": 35,
    "getpid": 39,
    "exit": 60,
    "kill": 62,
    "fcntl": 72,
    "getppid": 110,
    "prctl": 157,
    "arch_prctl": 158,
    "gettid": 186,
    "set_tid_address": 218,
    "restart_syscall": 219,
    "exit_group": 231,
    "openat": 257,
    "memfd_create": 319,
    "userfaultfd": 323,
    "pidfd_open": 434,
    "close_range": 436,
    "pidfd_getfd": 438,
    "process_madvise": 440,
}

NR: Final[dict[Arch, dict[str, int]]] = {Arch.X86_64: _X86_64}
_NAMES: Final[dict[Arch, dict[int, str]]] = {
    arch: {nr: name for name, nr in table.items()} for arch, table in NR.items()
}


def syscall_name(arch: Arch, nr: int) -> str:
    """The name of syscall ``nr`` on ``arch`` (``syscall_<nr>`` when not in the table)."""
    return _NAMES.get(arch, {}).get(nr, f"syscall_{nr}")

"""A small typed interface to a stopped live process.

ptrace thread-group control, memory I/O, registers, injected syscalls (and, in
``injector.tracking``, dirty-page tracking). See docs/injector.md.
"""

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
from injector.maps import Mapping
from injector.regs import Arch, X86Regs
from injector.session import Session, attach

__all__ = [
    "Arch",
    "InjectedSyscallError",
    "InjectorError",
    "Mapping",
    "MemoryAccessError",
    "NoSuchProcess",
    "PermissionDenied",
    "Session",
    "StopTimeout",
    "TargetExited",
    "X86Regs",
    "ZombieProcess",
    "attach",
]

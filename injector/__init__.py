"""A small typed interface to a stopped live process.

ptrace thread-group control, memory I/O, registers, injected syscalls (and, in
``injector.tracking``, dirty-page tracking). See docs/injector.md.

The names below are imported on first use (PEP 562), so that importing ``injector.errors``
alone (the CLI's error table does) does not load numpy and the session machinery.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

_HOME = {
    "Mapping": "injector.maps",
    "Arch": "injector.regs",
    "X86Regs": "injector.regs",
    "Session": "injector.session",
    "attach": "injector.session",
}


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'injector' has no attribute {name!r}")
    module = importlib.import_module(_HOME.get(name, "injector.errors"))
    value = getattr(module, name)
    globals()[name] = value
    return value

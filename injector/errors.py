"""The one error root of the ``injector`` package.

OS errors are translated here, at the edge, into errors that carry what a person needs:
pid, address, errno, the likely cause.
"""

from __future__ import annotations

import errno as _errno
import os

__all__ = [
    "InjectedSyscallError",
    "InjectorError",
    "MemoryAccessError",
    "NoSuchProcess",
    "PermissionDenied",
    "StopTimeout",
    "TargetExited",
    "ZombieProcess",
]


class InjectorError(OSError):
    """Root of every error raised while working on a live process."""

    def __init__(self, pid: int, message: str, err: int = 0) -> None:
        self.pid = pid
        self.message = message
        super().__init__(err, message)

    def __str__(self) -> str:
        text = f"pid {self.pid}: {self.message}"
        if self.errno:
            text += f" ({_errno.errorcode.get(self.errno, self.errno)}: {os.strerror(self.errno)})"
        return text


class NoSuchProcess(InjectorError, ProcessLookupError):
    """The pid does not exist (or is a zombie that cannot be traced)."""


class ZombieProcess(NoSuchProcess):
    """The pid is a zombie: it has exited and only waits to be reaped."""


class PermissionDenied(InjectorError, PermissionError):
    """ptrace or /proc access refused; the message names the likely cause."""


class TargetExited(InjectorError):
    """The target exited (or was killed) while a session was working on it."""


class StopTimeout(InjectorError):
    """A thread did not reach a ptrace stop in time (uninterruptible sleep, vfork parent)."""


class MemoryAccessError(InjectorError):
    """A read or write of target memory failed or came back short."""

    def __init__(self, pid: int, address: int, message: str, err: int = 0) -> None:
        self.address = address
        super().__init__(pid, f"{message} at {address:#x}", err)


class InjectedSyscallError(InjectorError):
    """A syscall injected into the target returned an error."""

    def __init__(self, pid: int, name: str, err: int) -> None:
        self.syscall = name
        super().__init__(pid, f"injected {name}() failed in the target", err)

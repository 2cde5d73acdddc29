"""ctypes bindings for the few libc calls the injector needs, and nothing else.

Every wrapper returns the call's result or raises ``OSError`` carrying ``errno``; the callers
(``session``, ``memory``) translate those into :mod:`injector.errors` classes, because only they
know the pid and address a person needs to see. Request numbers and structures follow
``include/uapi/linux/ptrace.h``, ``include/uapi/linux/elf.h`` and ``include/uapi/linux/uio.h``.
"""

from __future__ import annotations

import ctypes
import os
from typing import Final

__all__ = [
    "IOV_MAX",
    "NT_PRFPREG",
    "NT_PRSTATUS",
    "NT_X86_XSTATE",
    "PTRACE_CONT",
    "PTRACE_DETACH",
    "PTRACE_EVENT_CLONE",
    "PTRACE_EVENT_STOP",
    "PTRACE_GETEVENTMSG",
    "PTRACE_GETREGSET",
    "PTRACE_INTERRUPT",
    "PTRACE_O_SUSPEND_SECCOMP",
    "PTRACE_O_TRACECLONE",
    "PTRACE_O_TRACESYSGOOD",
    "PTRACE_SEIZE",
    "PTRACE_SETOPTIONS",
    "PTRACE_SETREGSET",
    "PTRACE_SYSCALL",
    "WALL",
    "Iovec",
    "IovecArray",
    "get_robust_list",
    "kcmp_files",
    "pidfd_getfd",
    "pidfd_open",
    "process_vm_readv",
    "process_vm_writev",
    "ptrace",
    "ptrace_regset",
    "waitpid",
]

PTRACE_CONT: Final = 7
PTRACE_DETACH: Final = 17
PTRACE_SYSCALL: Final = 24
PTRACE_SETOPTIONS: Final = 0x4200
PTRACE_GETEVENTMSG: Final = 0x4201
PTRACE_GETREGSET: Final = 0x4204
PTRACE_SETREGSET: Final = 0x4205
PTRACE_SEIZE: Final = 0x4206
PTRACE_INTERRUPT: Final = 0x4207
PTRACE_O_TRACESYSGOOD: Final = 0x1
PTRACE_O_TRACECLONE: Final = 0x8
PTRACE_O_SUSPEND_SECCOMP: Final = 0x200000  # needs CAP_SYS_ADMIN
PTRACE_EVENT_CLONE: Final = 3
PTRACE_EVENT_STOP: Final = 128

NT_PRSTATUS: Final = 1
NT_PRFPREG: Final = 2
NT_X86_XSTATE: Final = 0x202

WALL: Final = 0x40000000  # __WALL: wait for clone and non-clone children (threads too)
IOV_MAX: Final = 1024

# x86_64 syscall numbers used here through syscall(2); pidfd_* are the same on every arch.
_SYS_PIDFD_OPEN: Final = 434
_SYS_PIDFD_GETFD: Final = 438
_SYS_KCMP: Final = 312  # x86_64
_SYS_GET_ROBUST_LIST: Final = 274  # x86_64
KCMP_FILE: Final = 0

_libc = ctypes.CDLL(None, use_errno=True)


class Iovec(ctypes.Structure):
    """``struct iovec``."""

    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


IovecArray = Iovec * IOV_MAX

_ptrace = _libc.ptrace
_ptrace.restype = ctypes.c_long
_ptrace.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]

_waitpid = _libc.waitpid
_waitpid.restype = ctypes.c_int
_waitpid.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_int), ctypes.c_int]

# The iovec pointers are passed as plain addresses (c_void_p) so callers can hand in
# numpy-built iovec arrays as well as ctypes ones without conversion.
_process_vm_readv = _libc.process_vm_readv
_process_vm_writev = _libc.process_vm_writev
for _fn in (_process_vm_readv, _process_vm_writev):
    _fn.restype = ctypes.c_ssize_t
    _fn.argtypes = [
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_ulong,
        ctypes.c_void_p,
        ctypes.c_ulong,
        ctypes.c_ulong,
    ]

_memcmp = _libc.memcmp
_memcmp.restype = ctypes.c_int
_memcmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]

_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def _raise_errno() -> None:
    err = ctypes.get_errno()
    raise OSError(err, os.strerror(err))


def memequal_rows(a: list[int], b: list[int], n: list[int]) -> bool:
    """Whether every row's ``n[k]`` bytes at ``a[k]`` and ``b[k]`` are equal: one memcmp per
    row (the GIL released for each), stopping at the first that differs (numpy's
    ``array_equal`` of 8 MiB builds a temporary array first: 3x slower here)."""
    return not any(map(_memcmp, a, b, n))


def first_unequal(a: list[int], b: list[int], n: list[int]) -> int:
    """The index of the first row of ``memequal_rows`` that differs, -1 if none does."""
    for k, differs in enumerate(map(_memcmp, a, b, n)):
        if differs:
            return k
    return -1


def ptrace(request: int, tid: int, addr: int = 0, data: int = 0) -> int:
    """One ``ptrace(2)`` request with integer arguments; raises ``OSError`` on failure."""
    ctypes.set_errno(0)
    result: int = _ptrace(request, tid, addr, data)
    if result == -1 and ctypes.get_errno():
        _raise_errno()
    return result


def ptrace_regset(request: int, tid: int, note: int, address: int, size: int) -> int:
    """PTRACE_GETREGSET / PTRACE_SETREGSET of ``note`` through the ``size`` bytes at
    ``address``; returns the length the kernel used."""
    iov = Iovec(address, size)
    if _ptrace(request, tid, note, ctypes.addressof(iov)) == -1:
        _raise_errno()
    return int(iov.iov_len)


def waitpid(tid: int, options: int) -> tuple[int, int]:
    """``waitpid(tid, &status, options)`` -> (pid or 0, status); retries on EINTR."""
    status = ctypes.c_int(0)
    while True:
        pid: int = _waitpid(tid, ctypes.byref(status), options)
        if pid != -1:
            return pid, status.value
        if ctypes.get_errno() != 4:  # EINTR
            _raise_errno()


def process_vm_readv(pid: int, local: int, nlocal: int, remote: int, nremote: int) -> int:
    """``process_vm_readv`` with iovec arrays given by address; returns bytes read."""
    n: int = _process_vm_readv(pid, local, nlocal, remote, nremote, 0)
    if n == -1:
        _raise_errno()
    return n


def process_vm_writev(pid: int, local: int, nlocal: int, remote: int, nremote: int) -> int:
    """``process_vm_writev`` with iovec arrays given by address; returns bytes written."""
    n: int = _process_vm_writev(pid, local, nlocal, remote, nremote, 0)
    if n == -1:
        _raise_errno()
    return n


def pidfd_open(pid: int) -> int:
    """``pidfd_open(pid, 0)`` -> a new pidfd."""
    fd: int = _syscall(ctypes.c_long(_SYS_PIDFD_OPEN), ctypes.c_long(pid), ctypes.c_long(0))
    if fd == -1:
        _raise_errno()
    return fd


def pidfd_getfd(pidfd: int, remote_fd: int) -> int:
    """``pidfd_getfd(pidfd, remote_fd, 0)`` -> a local duplicate of the target's descriptor."""
    fd: int = _syscall(
        ctypes.c_long(_SYS_PIDFD_GETFD),
        ctypes.c_long(pidfd),
        ctypes.c_long(remote_fd),
        ctypes.c_long(0),
    )
    if fd == -1:
        _raise_errno()
    return fd


def kcmp_files(pid: int, fd_a: int, fd_b: int, other: int | None = None) -> int:
    """``kcmp(pid, other, KCMP_FILE, fd_a, fd_b)`` (``other`` defaults to ``pid``): 0 when
    the two descriptors share one open file description (1 or 2 order them otherwise)."""
    got: int = _syscall(
        ctypes.c_long(_SYS_KCMP),
        ctypes.c_long(pid),
        ctypes.c_long(pid if other is None else other),
        ctypes.c_long(KCMP_FILE),
        ctypes.c_long(fd_a),
        ctypes.c_long(fd_b),
    )
    if got == -1:
        _raise_errno()
    return got


def get_robust_list(tid: int) -> tuple[int, int]:
    """``get_robust_list(tid, &head, &len)``: the thread's robust futex list (head, length)."""
    head, size = ctypes.c_uint64(0), ctypes.c_uint64(0)
    got: int = _syscall(
        ctypes.c_long(_SYS_GET_ROBUST_LIST),
        ctypes.c_long(tid),
        ctypes.byref(head),
        ctypes.byref(size),
    )
    if got == -1:
        _raise_errno()
    return int(head.value), int(size.value)

"""ctypes layer for userfaultfd write-protection and the ``PAGEMAP_SCAN`` ioctl.

Follows the kernel UAPI headers ``include/uapi/linux/userfaultfd.h`` and
``include/uapi/linux/fs.h`` (Linux 6.7+: ``UFFD_FEATURE_WP_ASYNC``, ``PAGEMAP_SCAN``); the
system headers on Debian 12 predate both, so the numbers are spelled out here.

Nothing in this module knows about ptrace: every call is a plain ioctl on a descriptor the
tracer holds (a userfaultfd taken out of the target with ``pidfd_getfd``, or
``/proc/PID/pagemap``). Errors are raised as ``OSError`` with the errno; the tracker
translates them into the injector's errors.
"""

from __future__ import annotations

import ctypes
import errno
import os
from typing import Final

import numpy as np
import numpy.typing as npt

__all__ = [
    "NR_USERFAULTFD",
    "PAGEMAP_SCAN_MAX_END",
    "PAGE_IS_FILE",
    "PAGE_IS_PRESENT",
    "PAGE_IS_SOFT_DIRTY",
    "PAGE_IS_WPALLOWED",
    "PAGE_IS_WRITTEN",
    "PAGE_SIZE",
    "PM_SCAN_CHECK_WPASYNC",
    "PM_SCAN_WP_MATCHING",
    "UFFDIO_REGISTER_MODE_WP",
    "UFFD_FEATURE_WP_ASYNC",
    "UFFD_FEATURE_WP_UNPOPULATED",
    "UFFD_USER_MODE_ONLY",
    "PageScanner",
    "errno_name",
    "regions_to_pages",
    "uffd_api",
    "uffd_register",
    "uffd_unregister",
    "uffd_writeprotect",
    "userfaultfd",
]

PAGE_SIZE: Final = 4096
PAGE_SHIFT: Final = 12

# x86_64 with 4-level paging: PAGEMAP_SCAN rejects an end at or past TASK_SIZE; the last page
# below 1 << 47 is the highest end that is always accepted (kernel-notes.md).
PAGEMAP_SCAN_MAX_END: Final = (1 << 47) - PAGE_SIZE

NR_USERFAULTFD: Final = 323  # x86_64
UFFD_USER_MODE_ONLY: Final = 1
UFFD_API: Final = 0xAA

# include/uapi/linux/userfaultfd.h
UFFD_FEATURE_WP_UNPOPULATED: Final = 1 << 13
UFFD_FEATURE_WP_ASYNC: Final = 1 << 15
UFFDIO_REGISTER_MODE_WP: Final = 1 << 1
UFFDIO_WRITEPROTECT_MODE_WP: Final = 1 << 0

# include/uapi/linux/fs.h
PAGE_IS_WPALLOWED: Final = 1 << 0
PAGE_IS_WRITTEN: Final = 1 << 1
PAGE_IS_FILE: Final = 1 << 2
PAGE_IS_PRESENT: Final = 1 << 3
PAGE_IS_SWAPPED: Final = 1 << 4
PAGE_IS_PFNZERO: Final = 1 << 5
PAGE_IS_HUGE: Final = 1 << 6
PAGE_IS_SOFT_DIRTY: Final = 1 << 7
PM_SCAN_WP_MATCHING: Final = 1 << 0
PM_SCAN_CHECK_WPASYNC: Final = 1 << 1


class UffdioApi(ctypes.Structure):
    """``struct uffdio_api``."""

    _fields_ = [
        ("api", ctypes.c_uint64),
        ("features", ctypes.c_uint64),
        ("ioctls", ctypes.c_uint64),
    ]


class UffdioRange(ctypes.Structure):
    """``struct uffdio_range``."""

    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class UffdioRegister(ctypes.Structure):
    """``struct uffdio_register``."""

    _fields_ = [("range", UffdioRange), ("mode", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class UffdioWriteprotect(ctypes.Structure):
    """``struct uffdio_writeprotect``."""

    _fields_ = [("range", UffdioRange), ("mode", ctypes.c_uint64)]


class PmScanArg(ctypes.Structure):
    """``struct pm_scan_arg``."""

    _fields_ = [
        ("size", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
        ("start", ctypes.c_uint64),
        ("end", ctypes.c_uint64),
        ("walk_end", ctypes.c_uint64),
        ("vec", ctypes.c_uint64),
        ("vec_len", ctypes.c_uint64),
        ("max_pages", ctypes.c_uint64),
        ("category_inverted", ctypes.c_uint64),
        ("category_mask", ctypes.c_uint64),
        ("category_anyof_mask", ctypes.c_uint64),
        ("return_mask", ctypes.c_uint64),
    ]


def _ioc(direction: int, kind: int, nr: int, size: int) -> int:
    """``_IOC()`` from ``include/uapi/asm-generic/ioctl.h``."""
    return (direction << 30) | (size << 16) | (kind << 8) | nr


_IOC_WRITE: Final = 1
_IOC_READ: Final = 2

UFFDIO_API: Final = _ioc(_IOC_READ | _IOC_WRITE, 0xAA, 0x3F, ctypes.sizeof(UffdioApi))
UFFDIO_REGISTER: Final = _ioc(_IOC_READ | _IOC_WRITE, 0xAA, 0x00, ctypes.sizeof(UffdioRegister))
UFFDIO_UNREGISTER: Final = _ioc(_IOC_READ, 0xAA, 0x01, ctypes.sizeof(UffdioRange))
UFFDIO_WRITEPROTECT: Final = _ioc(
    _IOC_READ | _IOC_WRITE, 0xAA, 0x06, ctypes.sizeof(UffdioWriteprotect)
)
PAGEMAP_SCAN: Final = _ioc(_IOC_READ | _IOC_WRITE, ord("f"), 16, ctypes.sizeof(PmScanArg))

_libc = ctypes.CDLL(None, use_errno=True)
_ioctl = _libc.ioctl
_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_ioctl.restype = ctypes.c_int
_syscall = _libc.syscall
_syscall.argtypes = [ctypes.c_long, ctypes.c_long]
_syscall.restype = ctypes.c_long


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def userfaultfd(flags: int) -> int:
    """A userfaultfd in *this* process (the probe and the self-tests use it)."""
    return _check(int(_syscall(NR_USERFAULTFD, flags)), "userfaultfd")


def uffd_api(fd: int, features: int) -> tuple[int, int]:
    """``UFFDIO_API`` handshake; returns (features, ioctls) as the kernel reports them.

    The kernel answers with every feature it supports, not only the requested ones.
    """
    arg = UffdioApi(UFFD_API, features, 0)
    _check(_ioctl(fd, UFFDIO_API, ctypes.addressof(arg)), "UFFDIO_API")
    return int(arg.features), int(arg.ioctls)


def uffd_register(fd: int, start: int, length: int, mode: int = UFFDIO_REGISTER_MODE_WP) -> int:
    """``UFFDIO_REGISTER`` of [start, start+length); returns the range ioctls allowed."""
    arg = UffdioRegister(UffdioRange(start, length), mode, 0)
    _check(_ioctl(fd, UFFDIO_REGISTER, ctypes.addressof(arg)), "UFFDIO_REGISTER")
    return int(arg.ioctls)


def uffd_unregister(fd: int, start: int, length: int) -> None:
    """``UFFDIO_UNREGISTER`` (also drops the write-protection of the range)."""
    arg = UffdioRange(start, length)
    _check(_ioctl(fd, UFFDIO_UNREGISTER, ctypes.addressof(arg)), "UFFDIO_UNREGISTER")


def uffd_writeprotect(fd: int, start: int, length: int, protect: bool = True) -> None:
    """``UFFDIO_WRITEPROTECT``: protect (or unprotect) every page of the range.

    With ``UFFD_FEATURE_WP_UNPOPULATED`` this also marks pages that are not populated yet,
    so a later first touch counts as a write.
    """
    mode = UFFDIO_WRITEPROTECT_MODE_WP if protect else 0
    arg = UffdioWriteprotect(UffdioRange(start, length), mode)
    _check(_ioctl(fd, UFFDIO_WRITEPROTECT, ctypes.addressof(arg)), "UFFDIO_WRITEPROTECT")


# One returned region: struct page_region {start, end, categories}.
Regions = npt.NDArray[np.uint64]  # shape (n, 3)


class PageScanner:
    """``PAGEMAP_SCAN`` on one open ``/proc/PID/pagemap`` with a reusable output buffer.

    The loop follows the pitfall in kernel-notes.md: ``walk_end`` is unreliable once the kernel
    refilled its internal buffer, so the walk continues only while the caller's buffer came back
    full, and resumes from the later of ``walk_end`` and the end of the last region.
    """

    def __init__(self, pagemap_fd: int, capacity: int = 8192) -> None:
        self.fd = pagemap_fd
        self._buf: Regions = np.zeros((capacity, 3), dtype=np.uint64)
        self._arg = PmScanArg()
        self._arg.size = ctypes.sizeof(PmScanArg)
        self._arg.vec = self._buf.ctypes.data
        self._arg.vec_len = capacity
        self._argp = ctypes.addressof(self._arg)

    def scan(
        self,
        start: int,
        end: int,
        *,
        flags: int = 0,
        category_mask: int = 0,
        category_inverted: int = 0,
        category_anyof_mask: int = 0,
        return_mask: int = PAGE_IS_WRITTEN,
    ) -> Regions:
        """Every matching region of [start, end), as an (n, 3) array of start/end/categories."""
        end = min(end, PAGEMAP_SCAN_MAX_END)
        arg = self._arg
        arg.flags = flags
        arg.category_mask = category_mask
        arg.category_inverted = category_inverted
        arg.category_anyof_mask = category_anyof_mask
        arg.return_mask = return_mask
        arg.max_pages = 0
        buf = self._buf
        capacity = len(buf)
        parts: list[Regions] = []
        pos = start
        while pos < end:
            arg.start = pos
            arg.end = end
            arg.walk_end = 0
            n = _ioctl(self.fd, PAGEMAP_SCAN, self._argp)
            if n < 0:
                err = ctypes.get_errno()
                raise OSError(err, f"PAGEMAP_SCAN [{pos:#x}, {end:#x}): {os.strerror(err)}")
            if n:
                parts.append(buf[:n].copy())
            if n < capacity:
                break
            pos = max(int(arg.walk_end), int(buf[n - 1, 1]))
        if not parts:
            return np.zeros((0, 3), dtype=np.uint64)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


def regions_to_pages(regions: Regions) -> npt.NDArray[np.uint64]:
    """Page start addresses of the (n, 3) regions, in region order."""
    if len(regions) == 0:
        return np.zeros(0, dtype=np.uint64)
    starts = regions[:, 0]
    counts = ((regions[:, 1] - starts) >> np.uint64(PAGE_SHIFT)).astype(np.int64)
    total = int(counts.sum())
    if total == len(regions):
        return starts.copy()
    # offset of each page inside its region: global index minus the region's first index
    first = np.repeat(np.cumsum(counts) - counts, counts)
    index = np.arange(total, dtype=np.int64) - first
    return np.repeat(starts, counts) + (index.astype(np.uint64) << np.uint64(PAGE_SHIFT))


def errno_name(err: int) -> str:
    """``EPERM`` for 1, for messages."""
    return errno.errorcode.get(err, str(err))

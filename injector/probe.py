"""What this kernel and this process's privileges allow, measured rather than assumed
(``applier check``): userfaultfd write-protection, ``PAGEMAP_SCAN``, soft-dirty, ptrace.

Each probe works on this process or on a child it forks; no other process is touched.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import signal
from pathlib import Path

import attrs

from injector import _uffd
from injector.session import attach
from injector.tracking import probe_backends

__all__ = [
    "PtraceAccess",
    "probe_pagemap_scan",
    "probe_ptrace",
    "probe_userfaultfd_wp",
    "tracking_backend",
]

CAP_SYS_PTRACE = 19
CAP_SYS_ADMIN = 21
_WP_FEATURES = _uffd.UFFD_FEATURE_WP_ASYNC | _uffd.UFFD_FEATURE_WP_UNPOPULATED


def probe_userfaultfd_wp() -> str | None:
    """``None`` if userfaultfd offers asynchronous write-protection (Linux 6.7+), else why not."""
    try:
        fd = _uffd.userfaultfd(os.O_CLOEXEC | _uffd.UFFD_USER_MODE_ONLY)
    except OSError as exc:
        return f"userfaultfd() failed: {exc.strerror}"
    try:
        features, _ = _uffd.uffd_api(fd, 0)
    except OSError as exc:
        return f"UFFDIO_API failed: {exc.strerror}"
    finally:
        os.close(fd)
    if _WP_FEATURES & ~features:
        return f"no UFFD_FEATURE_WP_ASYNC/WP_UNPOPULATED (features {features:#x})"
    return None


def probe_pagemap_scan() -> str | None:
    """``None`` if the PAGEMAP_SCAN ioctl (Linux 6.7+) answers on this process's pagemap."""
    page = mmap.mmap(-1, _uffd.PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    fd = -1
    try:
        page[0] = 1
        addr = ctypes.addressof(ctypes.c_char.from_buffer(page))
        fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        found = _uffd.PageScanner(fd, 4).scan(
            addr,
            addr + _uffd.PAGE_SIZE,
            category_mask=_uffd.PAGE_IS_PRESENT,
            return_mask=_uffd.PAGE_IS_PRESENT,
        )
        if len(found) != 1:
            return "PAGEMAP_SCAN did not report a present page"
        return None
    except OSError as exc:
        return f"PAGEMAP_SCAN failed: {exc.strerror or exc}"
    finally:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(BufferError):
            page.close()


@attrs.frozen
class PtraceAccess:
    """Whether this process may trace others, and why."""

    yama_scope: int | None  # /proc/sys/kernel/yama/ptrace_scope; None without Yama
    cap_sys_ptrace: bool
    cap_sys_admin: bool  # needed to suspend a target's seccomp filter while injecting
    works: bool  # a forked child was seized, read, written and released
    reason: str | None  # why ``works`` is False, or what limits tracing non-children

    @property
    def others(self) -> bool:
        """Whether processes that are not our children can be traced."""
        if not self.works or self.yama_scope == 3:
            return False
        if self.yama_scope in (1, 2):
            return self.cap_sys_ptrace
        return True  # scope 0 or no Yama: same uid, or CAP_SYS_PTRACE for others


def _effective_caps() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def _yama_scope() -> int | None:
    try:
        return int(Path("/proc/sys/kernel/yama/ptrace_scope").read_text())
    except (OSError, ValueError):
        return None


def probe_ptrace() -> PtraceAccess:
    """Seize a forked child, read and write a word of its stack, release it; report Yama and
    the capabilities that decide whether other processes can be traced too."""
    caps = _effective_caps()
    scope = _yama_scope()
    has_ptrace, has_admin = bool(caps >> CAP_SYS_PTRACE & 1), bool(caps >> CAP_SYS_ADMIN & 1)
    child = os.fork()
    if child == 0:  # pragma: no cover - the child only waits to be killed
        try:
            signal.pause()
        finally:
            os._exit(0)
    reason = None
    try:
        with attach(child) as s:
            sp = s.get_regs(child).sp
            word = s.read(sp, 8)
            s.write(sp, word)
    except OSError as exc:
        reason = str(exc)
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
    if reason is None and scope in (1, 2) and not has_ptrace:
        reason = f"Yama ptrace_scope {scope} without CAP_SYS_PTRACE: only children can be traced"
    elif reason is None and scope == 3:
        reason = "Yama ptrace_scope 3: no process can be traced"
    works = reason is None or "only children" in reason
    return PtraceAccess(scope, has_ptrace, has_admin, works, reason)


def tracking_backend() -> tuple[str, dict[str, str | None]]:
    """The backend ``dump --track`` would choose here, and why each one is (not) available."""
    found = probe_backends()
    chosen = next(name for name, why in found.items() if why is None)
    return chosen, found

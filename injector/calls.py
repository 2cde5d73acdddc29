"""The system calls applier runs inside a target, by name, on top of one ``syscall(nr, ...)``.

Mixed into :class:`injector.session.Session` (real injection) and
:class:`injector.testing.FakeProcess` (an in-memory emulation), so both offer the same named
calls and the same scratch-memory helper for calls that take a pointer. Numbers come from
``injector.syscalls.NR``; a call the kernel refuses raises ``InjectedSyscallError``.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

from injector.errors import InjectorError
from injector.regs import Arch
from injector.syscalls import NR
from injector.tracer import signals_deferred

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = [
    "AT_FDCWD",
    "MADV_DONTNEED",
    "MADV_REMOVE",
    "MAP_ANONYMOUS",
    "MAP_FIXED",
    "MAP_FIXED_NOREPLACE",
    "MAP_GROWSDOWN",
    "MAP_PRIVATE",
    "MAP_SHARED",
    "PR_SET_MM",
    "PR_SET_MM_MAP",
    "NamedCalls",
]

MAP_SHARED, MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS = 0x1, 0x2, 0x10, 0x20
MAP_GROWSDOWN, MAP_FIXED_NOREPLACE = 0x100, 0x100000
MADV_DONTNEED, MADV_REMOVE = 4, 9
AT_FDCWD = -100
O_RDONLY, O_CLOEXEC = 0, 0o2000000
PR_SET_MM, PR_SET_MM_MAP = 35, 14
PAGE = 4096
_U64 = (1 << 64) - 1
# struct kernel_sigaction (x86-64): handler, flags, restorer, one 64-bit mask word
_SIGACTION = struct.Struct("<QQQQ")
SIGSET_SIZE = 8


class NamedCalls:
    """Named wrappers over ``syscall``; the class mixing this in provides ``arch``,
    ``syscall`` and ``write``."""

    arch: Arch
    _lent: int | None = None  # a page of the target's memory that ``scratch`` may borrow

    def syscall(self, nr: int, *args: int, tid: int | None = None) -> int:
        raise NotImplementedError

    def syscalls(
        self, calls: Sequence[tuple[int, tuple[int, ...]]], *, tid: int | None = None
    ) -> list[int]:
        """``syscall`` of each (nr, args) in turn, for calls independent of each other: a
        failure raises (whether the calls after it ran is not said). A real session chains
        them in the thread, which saves a ptrace stop a call."""
        return [self.syscall(nr, *args, tid=tid) for nr, args in calls]

    def write(self, address: int, data: Buffer) -> None:
        raise NotImplementedError

    def _layout_mark(self) -> object:
        """An opaque mark of the layout as known now (``_layout_back``)."""
        return None

    def _layout_back(self, mark: object, calls: int) -> None:
        """The layout is what it was at ``mark`` after ``calls`` injected calls (nothing to do
        where no layout is cached)."""

    def read(self, address: int, size: int) -> bytes:
        raise NotImplementedError

    def nr(self, name: str) -> int:
        """The number of syscall ``name`` on this target's architecture."""
        return NR[self.arch][name]

    def call(self, name: str, *args: int, tid: int | None = None) -> int:
        """``syscall`` by name (``call("getpid")``), with up to six integer arguments."""
        return self.syscall(self.nr(name), *(a & _U64 for a in args), tid=tid)

    def mmap(
        self,
        addr: int,
        length: int,
        prot: int,
        flags: int,
        *,
        fd: int = -1,
        offset: int = 0,
        tid: int | None = None,
    ) -> int:
        """Injected ``mmap``; returns the mapping's address."""
        return self.call("mmap", addr, length, prot, flags, fd, offset, tid=tid)

    def munmap(self, addr: int, length: int, *, tid: int | None = None) -> None:
        self.call("munmap", addr, length, tid=tid)

    def mprotect(self, addr: int, length: int, prot: int, *, tid: int | None = None) -> None:
        self.call("mprotect", addr, length, prot, tid=tid)

    def madvise(self, addr: int, length: int, advice: int, *, tid: int | None = None) -> None:
        self.call("madvise", addr, length, advice, tid=tid)

    def brk(self, addr: int, *, tid: int | None = None) -> int:
        """Injected ``brk``: the new program break (the old one when refused, as the kernel
        reports failure). glibc's cached break in the target is stale afterwards."""
        return self.call("brk", addr, tid=tid)

    def prctl(self, option: int, *args: int, tid: int | None = None) -> int:
        return self.call("prctl", option, *args, tid=tid)

    def close(self, fd: int, *, tid: int | None = None) -> None:
        """Close a descriptor in the target."""
        self.call("close", fd, tid=tid)

    def ioctl(self, fd: int, request: int, arg: int = 0, *, tid: int | None = None) -> int:
        return self.call("ioctl", fd, request, arg, tid=tid)

    def lseek(self, fd: int, offset: int, whence: int, *, tid: int | None = None) -> int:
        return self.call("lseek", fd, offset, whence, tid=tid)

    def fcntl(self, fd: int, cmd: int, arg: int = 0, *, tid: int | None = None) -> int:
        return self.call("fcntl", fd, cmd, arg, tid=tid)

    def userfaultfd(self, flags: int) -> int:
        """A userfaultfd created inside the target (its descriptor number there)."""
        return self.call("userfaultfd", flags)

    def sigactions(self, signals: Iterable[int]) -> dict[int, tuple[int, int, int, int]]:
        """(handler, flags, restorer, mask) of each of ``signals``, read with injected
        ``rt_sigaction(sig, NULL, &old)`` calls (the table is the process's: any thread)."""
        wanted = list(signals)
        out: dict[int, tuple[int, int, int, int]] = {}
        if not wanted:
            return out
        nr, size = self.nr("rt_sigaction"), _SIGACTION.size
        with self.scratch(bytes(size * len(wanted))) as where:
            self.syscalls(
                [(nr, (sig, 0, where + i * size, SIGSET_SIZE)) for i, sig in enumerate(wanted)]
            )
            data = self.read(where, size * len(wanted))
        for i, sig in enumerate(wanted):
            out[sig] = _SIGACTION.unpack_from(data, i * size)
        return out

    def set_sigactions(self, actions: dict[int, tuple[int, int, int, int]]) -> None:
        """Install each (handler, flags, restorer, mask) with an injected ``rt_sigaction``,
        as given: ``sa_restorer`` and the flags are the saved ones (no libc in between)."""
        if not actions:
            return
        blob = b"".join(_SIGACTION.pack(*(v & _U64 for v in a)) for a in actions.values())
        with self.scratch(blob) as where:
            for i, sig in enumerate(actions):
                self.call("rt_sigaction", sig, where + i * _SIGACTION.size, 0, SIGSET_SIZE)

    def getitimers(self) -> list[tuple[int, int, int, int]]:
        """ITIMER_REAL, ITIMER_VIRTUAL, ITIMER_PROF, each as (interval s, interval us,
        value s, value us) (injected ``getitimer``; the value is the time left)."""
        size = 32  # struct itimerval: it_interval, it_value (timeval: s, us)
        with self.scratch(bytes(3 * size)) as where:
            for which in range(3):
                self.call("getitimer", which, where + which * size)
            data = self.read(where, 3 * size)
        return [struct.unpack_from("<QQQQ", data, i * size) for i in range(3)]

    @contextlib.contextmanager
    def lending(self, page: int | None) -> Iterator[None]:
        """Within the block, ``scratch`` of at most a page borrows the page at ``page`` (the
        target's own private, writable memory, while it is stopped) instead of mapping one:
        the bytes it uses are read first and written back afterwards, so the target's memory
        ends as it was, with an injected mmap and munmap fewer (about 0.3 ms)."""
        before, self._lent = self._lent, page
        try:
            yield
        finally:
            self._lent = before

    def _borrowed(self, size: int) -> tuple[int, bytes] | None:
        """(address, its bytes now) of the lent page for ``size`` bytes of scratch; None
        when there is none, it is too small, or it cannot be read (it is not lent again)."""
        if self._lent is None or not 0 < size <= PAGE:
            return None
        try:
            return self._lent, self.read(self._lent, size)
        except InjectorError:
            self._lent = None
            return None

    @contextlib.contextmanager
    def scratch(self, data: bytes, *, tid: int | None = None) -> Iterator[int]:
        """``data`` in a fresh anonymous mapping of the target, for calls that take a
        pointer; unmapped afterwards. Inside ``lending``, in the lent page instead."""
        lent = self._borrowed(len(data))
        if lent is not None:
            where, saved = lent
            with signals_deferred():  # never stopped before its bytes are back
                try:
                    self.write(where, data)
                    yield where
                finally:
                    self.write(where, saved)
            return
        length = max(PAGE, -(-len(data) // PAGE) * PAGE)
        with signals_deferred():  # never stopped between the mmap and the munmap
            mark = self._layout_mark()
            addr = self.mmap(0, length, 3, MAP_PRIVATE | MAP_ANONYMOUS, tid=tid)
            try:
                if data:
                    self.write(addr, data)
                yield addr
            finally:
                self.munmap(addr, length, tid=tid)
            # A fresh anonymous mapping, gone again: no other mapping changed (it cannot merge
            # with a userfaultfd-registered one, and its removal undoes any merge it made).
            self._layout_back(mark, 2)

    def openat(
        self, path: str, flags: int = O_RDONLY | O_CLOEXEC, mode: int = 0, *, tid: int | None = None
    ) -> int:
        """Open ``path`` inside the target (relative paths from its cwd); its fd there."""
        with self.scratch(path.encode() + b"\0", tid=tid) as where:
            return self.call("openat", AT_FDCWD, where, flags, mode, tid=tid)

"""The one typed interface to a stopped process that the rest of the project uses.

:class:`injector.session.Session` implements it over ptrace and /proc;
:class:`injector.testing.FakeProcess` implements it in memory, for tests of planning and
execution logic that need no kernel. Everything outside ``injector`` that works on a process
takes a ``Process``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Protocol

import numpy as np
import numpy.typing as npt

from injector.maps import Mapping
from injector.regs import Arch, X86Regs

if TYPE_CHECKING:
    from typing_extensions import Buffer

    from injector.fdinfo import Descriptor
    from injector.fds import FsState
    from injector.threads import ThreadExtras

__all__ = ["IovIO", "Process"]

U64Array = npt.NDArray[np.uint64]
IovIO = Callable[[U64Array, U64Array], None]  # (local, remote) (n, 2) iovec tables


class Process(Protocol):
    """A stopped process: layout, memory, registers, /proc facts, calls run inside it."""

    @property
    def pid(self) -> int: ...
    @property
    def tids(self) -> list[int]:
        """Threads held stopped, leader first."""
        ...

    @property
    def arch(self) -> Arch: ...

    resume_on_detach: bool  # after hold(): SIGCONT once detached (clear it to leave it held)

    @property
    def was_stopped(self) -> bool:
        """Whether the process was in a group stop (SIGSTOP) when attached."""
        ...

    @property
    def held(self) -> bool: ...
    def hold(self) -> None:
        """A group stop under ptrace: if this process dies, the target stays stopped."""
        ...

    def alive(self) -> bool:
        """Whether the process still exists and is not a zombie (no ptrace request needed)."""
        ...

    # layout and memory
    def maps(self) -> list[Mapping]: ...
    @property
    def layout_epoch(self) -> int:
        """A number that changes whenever the layout may have changed since it was last read
        (the target ran, or a call that can map or unmap ran in it)."""
        ...

    def page_flags(self, start: int, end: int) -> U64Array:
        """/proc/PID/pagemap entries, one uint64 per page (``injector.maps`` bits)."""
        ...

    def data_pages(self, start: int, end: int, *, own: bool = False) -> npt.NDArray[np.bool_]:
        """Per page of ``[start, end)``: whether it holds data (``injector.maps.holds_data``;
        with ``own``, data of the process's own: ``own_copies``). What ``page_flags`` says,
        found without reading every pagemap entry where the kernel can say it by ranges."""
        ...

    def read(self, address: int, size: int) -> bytes: ...
    def read_into(self, address: int, buffer: Buffer) -> None: ...
    def read_runs(self, runs: Iterable[tuple[int, Buffer]]) -> None: ...
    def read_iov(self, local: U64Array, remote: U64Array) -> None: ...
    def threadsafe_read_iov(self) -> IovIO:
        """A ``read_iov`` another thread may call while the owner works on."""
        ...

    def write(self, address: int, data: Buffer) -> None: ...
    def write_runs(self, runs: Iterable[tuple[int, Buffer]]) -> None: ...
    def write_iov(self, local: U64Array, remote: U64Array) -> None: ...

    # registers
    def get_regs(self, tid: int) -> X86Regs: ...
    def set_regs(self, tid: int, regs: X86Regs) -> None: ...
    def get_xstate(self, tid: int) -> bytes: ...
    def set_xstate(self, tid: int, data: bytes) -> None: ...
    def rseq_config(self, tid: int) -> tuple[int, int, int] | None:
        """(rseq area, size, signature) the thread registered, or None."""
        ...

    # threads
    def robust_list(self, tid: int) -> tuple[int, int]:
        """(head, length) of the thread's robust futex list."""
        ...

    def thread_extras(self, tids: Iterable[int]) -> dict[int, ThreadExtras]:
        """Each thread's clear_child_tid address and alternate signal stack (injected)."""
        ...

    def end_thread(self, tid: int) -> None:
        """End a thread other than the leader (an ``exit`` run in it); no longer held."""
        ...

    def new_thread(
        self,
        *,
        tls: int = 0,
        clear_tid: int = 0,
        tid: int = 0,
        name: str = "",
        altstack: tuple[int, int, int] | None = None,
    ) -> int:
        """A new thread (``clone3`` with pthread's flags), held stopped before its first
        instruction with every signal blocked; ``tid``: the id it must get. Its id."""
        ...

    def tid_unavailable(self, tid: int) -> str | None:
        """Why a thread with id ``tid`` cannot be created (None: it can)."""
        ...

    # signal state (ptrace, no injection)
    def get_sigmask(self, tid: int) -> int:
        """The thread's blocked signals, bit N-1 for signal N."""
        ...

    def set_sigmask(self, tid: int, mask: int) -> None: ...
    def sig_dispositions(self) -> tuple[int, int]:
        """(ignored, caught) signal masks of the process (/proc/PID/status SigIgn, SigCgt)."""
        ...

    def pending_signals(self, tid: int, *, shared: bool = False) -> list[bytes]:
        """Queued signals of the thread (``shared``: of the process), 128-byte siginfos."""
        ...

    # facts from /proc
    def exe(self) -> str | None: ...
    def auxv(self) -> list[int]: ...
    def comm(self, tid: int | None = None) -> str: ...
    def mm_fields(self) -> dict[str, int]:
        """The mm fields of /proc/PID/stat by kernel name (``start_code`` ... ``env_end``)."""
        ...

    def stat_ids(self) -> tuple[int, int, int]:
        """(ppid, process group, session)."""
        ...

    def start_time(self) -> int: ...
    def children(self) -> list[tuple[int, str, int]]:
        """(pid, comm, start time in clock ticks) of each child process."""
        ...

    def open_map_file(self, start: int, end: int) -> int:
        """A local read-only descriptor of the file behind a mapping (caller closes it)."""
        ...

    def pidfd_getfd(self, remote_fd: int) -> int:
        """A local duplicate of the target's descriptor ``remote_fd`` (caller closes it)."""
        ...

    def descriptors(
        self, *, sock_diag: bool = True, only_sockets: bool = False
    ) -> list[Descriptor]:
        """The descriptor table (``injector.fds.read_fds``), in fd order; ``sock_diag=False``
        skips the netlink queries about sockets and ``only_sockets`` the local duplicates of
        other descriptors (what planning an apply can do without)."""
        ...

    def fs_state(self) -> FsState:
        """cwd, root and umask (``injector.fds.read_fs``)."""
        ...

    def file_shared_with(self, fd: int) -> int | None:
        """Another process (an ancestor or a child) whose descriptor shares the open file
        description of ``fd``, or None."""
        ...

    def same_open_file(self, fd_a: int, fd_b: int) -> bool:
        """Whether two descriptors share one open file description (kcmp KCMP_FILE)."""
        ...

    # system calls run inside the target (-4095..-1 raise InjectedSyscallError)
    def syscall(self, nr: int, *args: int, tid: int | None = None) -> int: ...
    def nr(self, name: str) -> int: ...
    def call(self, name: str, *args: int, tid: int | None = None) -> int: ...
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
    ) -> int: ...
    def munmap(self, addr: int, length: int, *, tid: int | None = None) -> None: ...
    def mprotect(self, addr: int, length: int, prot: int, *, tid: int | None = None) -> None: ...
    def madvise(self, addr: int, length: int, advice: int, *, tid: int | None = None) -> None: ...
    def brk(self, addr: int, *, tid: int | None = None) -> int: ...
    def prctl(self, option: int, *args: int, tid: int | None = None) -> int: ...
    def close(self, fd: int, *, tid: int | None = None) -> None: ...
    def ioctl(self, fd: int, request: int, arg: int = 0, *, tid: int | None = None) -> int: ...
    def lseek(self, fd: int, offset: int, whence: int, *, tid: int | None = None) -> int: ...
    def fcntl(self, fd: int, cmd: int, arg: int = 0, *, tid: int | None = None) -> int: ...
    def userfaultfd(self, flags: int) -> int: ...
    def sigactions(self, signals: Iterable[int]) -> dict[int, tuple[int, int, int, int]]:
        """(handler, flags, restorer, mask) of each signal (injected ``rt_sigaction``)."""
        ...

    def set_sigactions(self, actions: dict[int, tuple[int, int, int, int]]) -> None: ...
    def getitimers(self) -> list[tuple[int, int, int, int]]:
        """ITIMER_REAL, _VIRTUAL, _PROF as (interval s, us, value s, us) (``getitimer``)."""
        ...

    def openat(
        self, path: str, flags: int = ..., mode: int = 0, *, tid: int | None = None
    ) -> int: ...
    def scratch(
        self, data: bytes, *, tid: int | None = None
    ) -> contextlib.AbstractContextManager[int]:
        """``data`` in fresh anonymous memory of the target (its address), unmapped after."""
        ...

    def lending(self, page: int | None) -> contextlib.AbstractContextManager[None]:
        """Within the block ``scratch`` borrows ``page`` (private writable memory of the
        target), putting its bytes back after each use, instead of mapping one."""
        ...

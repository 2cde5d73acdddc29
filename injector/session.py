"""A stopped live process: the :class:`injector.process.Process` interface over ptrace.

``attach(pid)`` returns a :class:`Session`; entering it stops every thread of the process
(:class:`injector.tracer.Tracer`), leaving it lets every thread go, whatever happened. In
between it offers what applier needs of a process: its mappings and pagemap, bulk memory I/O
(:mod:`injector.memory`), registers and the XSAVE area of each thread, the rseq registration,
facts from /proc (:mod:`injector.procfs`), and system calls run inside a thread
(:mod:`injector.inject`), by number or by name (:class:`injector.calls.NamedCalls`).
Every method needs an entered session and must be called from the thread that entered it
(ptrace belongs to one tracer thread).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Final

import attrs
import numpy as np
import numpy.typing as npt

from injector import _libc, _uffd, procfs
from injector.calls import NamedCalls
from injector.errors import (
    InjectedSyscallError,
    InjectorError,
    MemoryAccessError,
    PermissionDenied,
    TargetExited,
)
from injector.fdinfo import Descriptor
from injector.fds import FsState, read_fds, read_fs
from injector.inject import find_syscall_site, run_syscalls
from injector.maps import (
    PROT_READ,
    PROT_WRITE,
    Mapping,
    holds_data,
    own_copies,
    read_maps,
    read_page_flags,
    read_vmflags,
)
from injector.memo import remember
from injector.memory import MemoryIO
from injector.process import IovIO
from injector.procfs import read_stat
from injector.regs import UserRegsStruct, X86Regs
from injector.signals import parse_status_signals
from injector.syscalls import NR, syscall_name
from injector.threads import (
    CLONE_ARGS_SIZE,
    SS_DISABLE,
    STACK_T_SIZE,
    ThreadExtras,
    pack_stack_t,
    run_clone,
    run_exit,
    thread_clone_args,
    unpack_stack_t,
)
from injector.tracer import Tracer, _errno, _status_fields, signals_deferred

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["Session", "attach"]

_PROC: Final = "/proc"
_PAGE: Final = 4096
_XSTATE_MAX: Final = 1 << 16
_PTRACE_GET_RSEQ_CONFIGURATION: Final = 0x420F
_PTRACE_PEEKSIGINFO: Final = 0x4209
_PEEKSIGINFO_SHARED: Final = 1
_SIGINFO_SIZE: Final = 128
_RESUMING: Final = frozenset({_libc.PTRACE_CONT, _libc.PTRACE_SYSCALL, _libc.PTRACE_DETACH})
# Calls that never change the address space: an injected one keeps the cached layout (the
# other threads stay stopped meanwhile). ``brk(0)`` only asks for the break.
_LAYOUT_NEUTRAL: Final = frozenset(
    {"close", "lseek", "fcntl", "dup", "dup2", "dup3", "getpid", "gettid", "getppid",
     "openat", "rt_sigprocmask", "rt_sigaction", "set_robust_list", "rseq", "set_tid_address",
     "sigaltstack"}
)  # fmt: skip
# (pid, fd) -> (another process, its fd) sharing that open file, as ``file_shared_with``
# last found it: a server's stdout shared with the process that started it is asked about
# at every reset, and scanning that process's descriptors cost 0.7 ms a time (memcached
# under bench_server.py); one kcmp confirms it. Bounded: cleared past 1024 entries.
_SHARED_WITH: dict[tuple[int, int], tuple[int, int]] = {}
_PR_GET_TID_ADDRESS: Final = 40
_PR_SET_NAME: Final = 15
_CAP_SYS_ADMIN: Final = 21
_CAP_CHECKPOINT_RESTORE: Final = 40
_NS_LAST_PID: Final = "/proc/sys/kernel/ns_last_pid"


@attrs.frozen
class _LayoutMark:
    maps: list[Mapping] | None
    epoch: int


def attach(pid: int, *, timeout: float = 10.0) -> Session:
    """A session on ``pid``; the threads are stopped when it is entered (``with``)."""
    return Session(pid, timeout=timeout)


class Session(Tracer, NamedCalls):
    """One stopped process. Use as a context manager."""

    def __init__(self, pid: int, *, timeout: float = 10.0) -> None:
        super().__init__(pid, timeout=timeout)
        self._mem_fd = -1
        self._pagemap_fd = -1
        self._scanner: _uffd.PageScanner | None = None  # PAGEMAP_SCAN on _pagemap_fd
        self._scan_refused = False  # the kernel has no PAGEMAP_SCAN
        self._memory: MemoryIO | None = None
        self._insn: int | None = None
        self._maps: list[Mapping] | None = None  # until something runs in the target
        self._epoch = 0  # layout_epoch
        self._regs: dict[int, X86Regs] = {}  # get_regs, until a thread runs or is set

    def _close_fds(self) -> None:
        if self._memory is not None:
            self._memory.close()
            self._memory = None
        for fd in (self._mem_fd, self._pagemap_fd):
            if fd >= 0:
                os.close(fd)
        self._mem_fd = self._pagemap_fd = -1
        self._scanner = None
        super()._close_fds()

    # ---- memory ------------------------------------------------------------------------

    def _mem(self) -> MemoryIO:
        self.check()
        if self._memory is None:
            try:
                self._mem_fd = os.open(f"{_PROC}/{self.pid}/mem", os.O_RDWR | os.O_CLOEXEC)
            except OSError as exc:
                if self.gone():
                    raise TargetExited(self.pid, "exited during the session", _errno(exc)) from exc
                raise PermissionDenied(self.pid, "cannot open /proc/PID/mem", _errno(exc)) from exc
            self._memory = MemoryIO(
                self.pid, self._mem_fd, self._translate_memory, self._protect_round_trip
            )
        return self._memory

    @property
    def memory(self) -> MemoryIO:
        """The memory accessor itself (``force_via_proc_mem`` can be switched off there)."""
        return self._mem()

    def threadsafe_read_iov(self) -> IovIO:
        """``read_iov`` that another thread of this process may call while the session's own
        thread works on (process_vm_readv needs no ptrace stop); for read-ahead."""
        return self._mem().read_iov

    @property
    def layout_epoch(self) -> int:
        return self._epoch

    def maps(self) -> list[Mapping]:
        """The target's mappings, in address order. Read once per stretch of the session in
        which nothing ran in the target: stopped threads cannot change their layout, so the
        list is kept until the next injected syscall."""
        self.check()
        if self._maps is not None:
            return list(self._maps)
        try:
            result = read_maps(self.pid)
        except (FileNotFoundError, ProcessLookupError) as exc:
            raise TargetExited(self.pid, "exited during the session", errno.ESRCH) from exc
        except OSError as exc:
            raise InjectorError(self.pid, "cannot read /proc/PID/maps", _errno(exc)) from exc
        if not result and self.gone():  # a zombie has no memory left
            raise TargetExited(self.pid, "exited during the session", errno.ESRCH)
        self._maps = result
        return list(result)

    def vm_flags(self) -> dict[int, frozenset[str]]:
        """smaps ``VmFlags`` of every mapping, keyed by start address."""
        self.check()
        try:
            return read_vmflags(self.pid)
        except (FileNotFoundError, ProcessLookupError) as exc:
            raise TargetExited(self.pid, "exited during the session", errno.ESRCH) from exc

    def page_flags(self, start: int, end: int) -> npt.NDArray[np.uint64]:
        """/proc/PID/pagemap entries for ``[start, end)``, one uint64 per page (bit 63 present,
        62 swapped, 61 file/shared, 57 uffd-wp, 56 exclusive; see ``injector.maps``)."""
        self.check()
        try:
            if self._pagemap_fd < 0:
                self._pagemap_fd = os.open(
                    f"{_PROC}/{self.pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC
                )
            return read_page_flags(self._pagemap_fd, start, end, _PAGE)
        except OSError as exc:
            raise self._translate_memory(exc, start, "pagemap read") from exc

    def data_pages(self, start: int, end: int, *, own: bool = False) -> npt.NDArray[np.bool_]:
        """Which pages hold data, from one ``PAGEMAP_SCAN`` for present and swapped pages;
        pagemap entries are read only for the swapped ranges (a PTE marker is reported as
        swapped too, and only its entry tells it apart). Without PAGEMAP_SCAN (Linux < 6.7)
        every entry is read."""
        count = (end - start + _PAGE - 1) // _PAGE
        if self._scan_refused:
            flags = self.page_flags(start, end)
            return own_copies(flags) if own else holds_data(flags)
        self.page_flags(start, start)  # opens the pagemap
        if self._scanner is None:
            self._scanner = _uffd.PageScanner(self._pagemap_fd, 4096)
        try:
            # PAGE_IS_FILE costs a folio lookup per page (3.5x the walk): asked only for ``own``
            kinds = _uffd.PAGE_IS_PRESENT | _uffd.PAGE_IS_SWAPPED
            regions = self._scanner.scan(
                start, end, category_anyof_mask=kinds,
                return_mask=kinds | (_uffd.PAGE_IS_FILE if own else 0),
            )  # fmt: skip
        except OSError as exc:
            if exc.errno not in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP):
                raise self._translate_memory(exc, start, "PAGEMAP_SCAN") from exc
            self._scan_refused = True
            return self.data_pages(start, end, own=own)
        out = np.zeros(count, dtype=bool)
        first = ((regions[:, 0] - np.uint64(start)) // np.uint64(_PAGE)).astype(np.int64)
        last = ((regions[:, 1] - np.uint64(start)) // np.uint64(_PAGE)).astype(np.int64)
        cats = regions[:, 2]
        present = (cats & np.uint64(_uffd.PAGE_IS_PRESENT)) != 0
        if own:
            present &= (cats & np.uint64(_uffd.PAGE_IS_FILE)) == 0
        if len(regions) == 1 and present[0] and first[0] == 0 and last[0] >= count:
            return np.ones(count, dtype=bool)  # all of it, the common case
        if present.any():
            edges = np.zeros(count + 1, dtype=np.int32)
            np.add.at(edges, first[present], 1)
            np.add.at(edges, last[present], -1)
            out |= np.cumsum(edges[:-1]) > 0
        swapped = ((cats & np.uint64(_uffd.PAGE_IS_PRESENT)) == 0).nonzero()[0]
        for i in swapped.tolist():
            a, b = int(first[i]), int(last[i])
            flags = self.page_flags(start + a * _PAGE, start + b * _PAGE)
            out[a:b] = own_copies(flags) if own else holds_data(flags)
        return out

    def read(self, address: int, size: int) -> bytes:
        """``size`` bytes at ``address`` (PROT_NONE and unreadable pages too)."""
        return self._mem().read(address, size)

    def read_into(self, address: int, buffer: Buffer) -> None:
        """Fill the writable ``buffer`` from ``address``."""
        self._mem().read_into(address, buffer)

    def read_runs(self, runs: Iterable[tuple[int, Buffer]]) -> None:
        """Fill each (address, writable buffer) pair, batched like ``write_runs``."""
        self._mem().read_runs(runs)

    def read_iov(self, local: npt.NDArray[np.uint64], remote: npt.NDArray[np.uint64]) -> None:
        """``read_runs`` from (n, 2) uint64 iovec arrays (see ``MemoryIO.read_iov``)."""
        self._mem().read_iov(local, remote)

    def write(self, address: int, data: Buffer) -> None:
        """Store ``data`` at ``address`` (read-only and PROT_NONE pages too)."""
        self._mem().write(address, data)

    def write_runs(self, runs: Iterable[tuple[int, Buffer]]) -> None:
        """Store many non-overlapping (address, buffer) runs with batched process_vm_writev."""
        self._mem().write_runs(runs)

    def write_iov(self, local: npt.NDArray[np.uint64], remote: npt.NDArray[np.uint64]) -> None:
        """``write_runs`` from (n, 2) uint64 iovec arrays (see ``MemoryIO.write_iov``)."""
        self._mem().write_iov(local, remote)

    def _protect_round_trip(self, start: int, end: int, action: Callable[[], None]) -> None:
        """Make ``[start, end)`` readable and writable with injected mprotect calls, run
        ``action``, and give every mapping its protection back."""
        lo, hi = start & ~(_PAGE - 1), (end + _PAGE - 1) & ~(_PAGE - 1)
        changed: list[tuple[int, int, int]] = []
        covered = lo
        for m in self.maps():
            if m.end <= covered or m.start >= hi:
                continue
            if m.start > covered:
                break
            seg_end = min(m.end, hi)
            if m.prot & (PROT_READ | PROT_WRITE) != PROT_READ | PROT_WRITE:
                changed.append((covered, seg_end, m.prot))
            covered = seg_end
            if covered >= hi:
                break
        if covered < hi:
            raise MemoryAccessError(self.pid, max(covered, start), "not mapped", errno.EFAULT)
        done: list[tuple[int, int, int]] = []
        try:
            for seg_start, seg_end, prot in changed:
                self.mprotect(seg_start, seg_end - seg_start, prot | PROT_READ | PROT_WRITE)
                done.append((seg_start, seg_end, prot))
            action()
        except InjectedSyscallError as exc:
            raise MemoryAccessError(
                self.pid, start, "mprotect round trip refused", _errno(exc)
            ) from exc
        finally:
            for seg_start, seg_end, prot in done:
                self.mprotect(seg_start, seg_end - seg_start, prot)

    # ---- registers ---------------------------------------------------------------------

    def get_regs(self, tid: int) -> X86Regs:
        """General-purpose registers of a stopped thread (NT_PRSTATUS). Kept until that
        thread runs (an injected call) or its registers are set: an apply reads each thread's
        for the plan and again for its register step."""
        tid = self.check(tid)
        regs = self._regs.get(tid)
        if regs is None:
            regs = self._regs[tid] = X86Regs.from_struct(self.raw_regs(tid))
        return regs

    def set_raw_regs(self, tid: int, regs: UserRegsStruct) -> None:
        self._regs.pop(tid, None)
        super().set_raw_regs(tid, regs)

    def set_regs(self, tid: int, regs: X86Regs) -> None:
        """Replace the general-purpose registers of a stopped thread."""
        self.set_raw_regs(self.check(tid), regs.to_struct())

    def get_xstate(self, tid: int) -> bytes:
        """The XSAVE area (NT_X86_XSTATE): the 512-byte FXSAVE legacy area, the XSAVE header,
        then the extended components, as long as this CPU's xstate size."""
        buf = ctypes.create_string_buffer(_XSTATE_MAX)
        size = self.regset(_libc.PTRACE_GETREGSET, self.check(tid), _libc.NT_X86_XSTATE, buf)
        return buf.raw[:size]

    def set_xstate(self, tid: int, data: bytes) -> None:
        """Load an XSAVE area (as ``get_xstate`` returns it) into a stopped thread."""
        buf = ctypes.create_string_buffer(bytes(data), len(data))
        self.regset(_libc.PTRACE_SETREGSET, self.check(tid), _libc.NT_X86_XSTATE, buf)

    def rseq_config(self, tid: int) -> tuple[int, int, int] | None:
        """(rseq area address, size, signature) the thread registered, or None if it has
        none (PTRACE_GET_RSEQ_CONFIGURATION, Linux 5.13+)."""
        conf = (ctypes.c_uint64 * 3)()  # struct ptrace_rseq_configuration
        n = self.request(
            _PTRACE_GET_RSEQ_CONFIGURATION, self.check(tid), ctypes.sizeof(conf),
            ctypes.addressof(conf),
        )  # fmt: skip
        if n <= 0 or conf[0] == 0:
            return None
        return int(conf[0]), int(conf[1]) & 0xFFFFFFFF, int(conf[1]) >> 32

    # ---- signal state that ptrace shows ---------------------------------------------------

    def sig_dispositions(self) -> tuple[int, int]:
        """(ignored, caught) masks of the process's handler table, from /proc/PID/status
        (SigIgn, SigCgt): which signals are ignored or handled, without injecting anything."""

        def read() -> tuple[int, int]:
            with open(f"{_PROC}/{self.pid}/status", "rb") as f:
                fields = parse_status_signals(f.read())
            return fields["SigIgn"], fields["SigCgt"]

        got = self._proc(read, "/proc/PID/status")
        assert isinstance(got, tuple)
        return got

    def pending_signals(self, tid: int, *, shared: bool = False) -> list[bytes]:
        """The queued signals of thread ``tid`` (``shared``: of the whole thread group), each
        as the kernel's 128-byte ``siginfo_t`` (PTRACE_PEEKSIGINFO, as CRIU dumps them);
        nothing is dequeued."""
        out: list[bytes] = []
        batch = 32
        buf = ctypes.create_string_buffer(batch * _SIGINFO_SIZE)
        # struct ptrace_peeksiginfo_args {u64 off; u32 flags; s32 nr}
        args = (ctypes.c_uint64 * 2)()
        while True:
            args[0] = len(out)
            args[1] = (_PEEKSIGINFO_SHARED if shared else 0) | (batch << 32)
            n = self.request(
                _PTRACE_PEEKSIGINFO, self.check(tid), ctypes.addressof(args), ctypes.addressof(buf)
            )
            if n <= 0:
                return out
            out.extend(buf.raw[i * _SIGINFO_SIZE : (i + 1) * _SIGINFO_SIZE] for i in range(n))

    def get_fpregs(self, tid: int) -> bytes:
        """The 512-byte FXSAVE area (NT_PRFPREG, ``struct user_fpregs_struct``)."""
        buf = ctypes.create_string_buffer(512)
        size = self.regset(_libc.PTRACE_GETREGSET, self.check(tid), _libc.NT_PRFPREG, buf)
        return buf.raw[:size]

    def set_fpregs(self, tid: int, data: bytes) -> None:
        """Load a 512-byte FXSAVE area into a stopped thread."""
        if len(data) != 512:
            raise ValueError("an FXSAVE area is 512 bytes")
        buf = ctypes.create_string_buffer(bytes(data), 512)
        self.regset(_libc.PTRACE_SETREGSET, self.check(tid), _libc.NT_PRFPREG, buf)

    # ---- facts from /proc ------------------------------------------------------------------

    def alive(self) -> bool:
        """Whether the process still exists and is not a zombie."""
        return procfs.thread_state(self.pid) not in (None, "Z", "X")

    def _proc(self, read: Callable[[], object], what: str) -> object:
        self.check()
        try:
            return read()
        except (FileNotFoundError, ProcessLookupError) as exc:
            raise TargetExited(self.pid, "exited during the session", errno.ESRCH) from exc
        except OSError as exc:
            raise InjectorError(self.pid, f"cannot read {what}", _errno(exc)) from exc

    def exe(self) -> str | None:
        """The executable's path (None if the kernel will not say)."""
        got = self._proc(lambda: procfs.read_exe(self.pid), "/proc/PID/exe")
        return got if isinstance(got, str) else None

    def auxv(self) -> list[int]:
        """The auxiliary vector as flat u64 words (type, value, ..., 0, 0)."""
        got = self._proc(lambda: procfs.read_auxv(self.pid), "/proc/PID/auxv")
        return list(got) if isinstance(got, list) else []

    def comm(self, tid: int | None = None) -> str:
        """The command name of the process (or of thread ``tid``)."""
        return str(self._proc(lambda: procfs.read_comm(self.pid, tid), "/proc/PID/comm"))

    def mm_fields(self) -> dict[str, int]:
        """The mm fields of /proc/PID/stat by kernel name (``start_code``, ... ``env_end``)."""
        got = self._proc(lambda: procfs.read_mm_fields(self.pid), "/proc/PID/stat")
        return dict(got) if isinstance(got, dict) else {}

    def stat_ids(self) -> tuple[int, int, int]:
        """(ppid, process group, session)."""
        got = self._proc(lambda: procfs.read_stat_ids(self.pid), "/proc/PID/stat")
        assert isinstance(got, tuple)
        return got

    def start_time(self) -> int:
        """Start time in clock ticks since boot (tells a reused pid apart)."""
        return int(str(self._proc(lambda: procfs.read_start_time(self.pid), "/proc/PID/stat")))

    def children(self) -> list[tuple[int, str, int]]:
        """(pid, comm, start time in clock ticks) of each child process (gone ones left out)."""
        out = []
        for child in procfs.read_children(self.pid):
            try:
                out.append((child, procfs.read_comm(child), procfs.read_start_time(child)))
            except OSError:
                continue
        return out

    def open_map_file(self, start: int, end: int) -> int:
        """A read-only descriptor, in this process, of the file behind mapping
        ``[start, end)`` (/proc/PID/map_files: memfd and shared anonymous memory too); the
        caller closes it."""
        got = self._proc(
            lambda: os.open(f"{_PROC}/{self.pid}/map_files/{start:x}-{end:x}", os.O_RDONLY),
            "/proc/PID/map_files",
        )
        assert isinstance(got, int)
        return got

    # ---- system calls in the target --------------------------------------------------------

    def syscall_site(self) -> int:
        """Address of a ``syscall`` instruction in the target: the vDSO's (cached and checked
        on every use, as the vDSO can be moved), else one in other executable text."""
        insn = self.arch.syscall_insn
        if self._insn is not None and self._mem().read(self._insn, len(insn)) == insn:
            return self._insn
        self._insn = find_syscall_site(self.maps(), self._mem().read, insn)
        if self._insn is None:
            raise InjectorError(self.pid, "no syscall instruction found in the vDSO or any text")
        return self._insn

    def _layout_mark(self) -> object:
        return _LayoutMark(self._maps, self._epoch)

    def _layout_back(self, mark: object, calls: int) -> None:
        """``calls`` injected calls since ``mark`` left the layout as it was (a scratch mapping
        made and removed): the layout cached then, and its epoch, hold again. Not if anything
        else could have changed it meanwhile (another call, the target run)."""
        if not isinstance(mark, _LayoutMark):
            return
        if self._epoch == mark.epoch + calls:
            self._maps, self._epoch = mark.maps, mark.epoch

    def request(self, request: int, tid: int, addr: int = 0, data: int = 0) -> int:
        if request in _RESUMING:  # the target runs: the cached layout may go stale
            self._maps = None
            self._epoch += 1
            self._regs.pop(tid, None)  # the others stay stopped: theirs cannot change
        return super().request(request, tid, addr, data)

    def syscall(self, nr: int, *args: int, tid: int | None = None) -> int:
        """Run syscall ``nr`` with up to six integer arguments in a stopped thread (default:
        the leader) and return its result; -4095..-1 raises InjectedSyscallError."""
        return self.syscalls([(nr, args)], tid=tid)[0]

    def syscalls(
        self, calls: Sequence[tuple[int, tuple[int, ...]]], *, tid: int | None = None
    ) -> list[int]:
        """``syscall`` of each (nr, args) in turn, chained in the thread (``run_syscalls``:
        two ptrace stops a call instead of three); every call runs, then the first that
        failed raises InjectedSyscallError."""
        if any(len(args) > 6 for _, args in calls):
            raise TypeError("a syscall takes at most six arguments")
        tid = self.check(self.pid if tid is None else tid)
        if not self.seccomp_suspended:
            mode = _status_fields(self.pid, tid).get("Seccomp", "0")
            if mode != "0":
                names = ", ".join(f"{syscall_name(self.arch, nr)}()" for nr, _ in calls)
                raise InjectorError(
                    self.pid,
                    f"thread {tid} runs under seccomp (mode {mode}) and seccomp could not be "
                    f"suspended (needs CAP_SYS_ADMIN): an injected {names} could kill it",
                )
        insn = self.syscall_site()
        table = NR.get(self.arch, {})
        neutral = all(
            any(table.get(n) == nr for n in _LAYOUT_NEUTRAL)
            or (nr == table.get("brk") and args[:1] in ((), (0,)))
            for nr, args in calls
        )
        keep, epoch = (self._maps, self._epoch) if neutral else (None, self._epoch + len(calls))
        self._maps = None  # whatever the calls do, the layout may change
        try:
            with signals_deferred():
                results = run_syscalls(self, tid, calls, insn)
        finally:
            self._maps, self._epoch = keep, epoch
        for (nr, _), result in zip(calls, results, strict=True):
            if -4095 <= result < 0:
                raise InjectedSyscallError(self.pid, syscall_name(self.arch, nr), -result)
        return results

    # ---- threads -------------------------------------------------------------------------

    def robust_list(self, tid: int) -> tuple[int, int]:
        """(head, length) of the thread's robust futex list (get_robust_list: no injection)."""
        self.check(tid)
        try:
            return _libc.get_robust_list(tid)
        except OSError as exc:
            if exc.errno == errno.ESRCH or self.gone():
                raise TargetExited(self.pid, "exited during the session", errno.ESRCH) from exc
            raise InjectorError(self.pid, f"get_robust_list of {tid} refused", _errno(exc)) from exc

    def thread_extras(self, tids: Iterable[int]) -> dict[int, ThreadExtras]:
        """What each of ``tids`` alone can say about itself, with injected calls in it: its
        clear_child_tid address (PR_GET_TID_ADDRESS: where the kernel writes 0 and wakes a
        futex when the thread ends, what pthread_join waits on) and its alternate signal
        stack (``sigaltstack``). One scratch page for all."""
        tids = [self.check(t) for t in tids]
        slot = 8 + STACK_T_SIZE
        if not tids:
            return {}
        with self.scratch(bytes(slot * len(tids))) as where:
            for i, tid in enumerate(tids):
                self.prctl(_PR_GET_TID_ADDRESS, where + slot * i, tid=tid)
                self.call("sigaltstack", 0, where + slot * i + 8, tid=tid)
            raw = self.read(where, slot * len(tids))
        return {
            tid: ThreadExtras(
                int.from_bytes(raw[slot * i : slot * i + 8], "little"),
                unpack_stack_t(raw[slot * i + 8 : slot * (i + 1)]),
            )
            for i, tid in enumerate(tids)
        }

    def end_thread(self, tid: int) -> None:
        """End thread ``tid`` (not the leader) with an ``exit(0)`` run in it
        (``injector.threads.run_exit``); it is reaped and no longer held."""
        self.check(tid)
        insn = self.syscall_site()
        with signals_deferred():
            run_exit(self, tid, insn)

    def tid_unavailable(self, tid: int) -> str | None:
        """Why :meth:`new_thread` could not create a thread with id ``tid`` (None: it can)."""
        try:
            owner = _status_fields(tid).get("Tgid", "?")
        except OSError:
            pass  # free
        else:
            return f"id {tid} belongs to pid {owner} now"
        caps = int(_status_fields(self.pid).get("CapEff", "0"), 16)
        if caps & (1 << _CAP_SYS_ADMIN | 1 << _CAP_CHECKPOINT_RESTORE):
            return None
        if not self._own_pid_ns():
            return (
                "the target may not choose thread ids (no CAP_CHECKPOINT_RESTORE) and lives "
                "in another pid namespace"
            )
        if not os.access(_NS_LAST_PID, os.W_OK):
            return f"the target may not choose thread ids and {_NS_LAST_PID} is not writable"
        return None

    def _own_pid_ns(self) -> bool:
        return (
            os.stat(f"{_PROC}/self/ns/pid").st_ino == os.stat(f"{_PROC}/{self.pid}/ns/pid").st_ino
        )

    def new_thread(
        self,
        *,
        tls: int = 0,
        clear_tid: int = 0,
        tid: int = 0,
        name: str = "",
        altstack: tuple[int, int, int] | None = None,
    ) -> int:
        """A new thread of the process, created by a ``clone3`` with pthread's flags run in
        the leader, held stopped before its first instruction with every signal blocked
        (``injector.threads.run_clone``); its id. ``tls``: its TLS base (CLONE_SETTLS);
        ``clear_tid``: its clear_child_tid address; ``name``: its comm (PR_SET_NAME in it,
        else it has the leader's); ``altstack``: its (ss_sp, ss_size, ss_flags), set with
        ``sigaltstack`` in it (a new thread has none); ``tid``: the id it must have. That id
        is asked for with ``set_tid`` where the target may (CAP_CHECKPOINT_RESTORE), else
        through ns_last_pid (applier's privilege, same pid namespace); a thread that got
        another id is ended again and the call fails."""
        self.check()
        insn = self.syscall_site()
        own_pid_ns = self._own_pid_ns()
        for via_set_tid in (True, False):
            if tid and not via_set_tid and not own_pid_ns:
                break
            want = [tid] if tid and via_set_tid else []
            data = thread_clone_args(
                tls=tls, clear_tid=clear_tid, set_tid_at=CLONE_ARGS_SIZE if want else 0
            )
            stack_at, name_at = CLONE_ARGS_SIZE + 8, CLONE_ARGS_SIZE + 8 + STACK_T_SIZE
            blob = data + b"".join(t.to_bytes(4, "little", signed=True) for t in want)
            stack = altstack if altstack is not None else (0, 0, SS_DISABLE)
            blob = blob.ljust(stack_at, b"\0") + pack_stack_t(*stack)
            blob += name.encode()[:15] + b"\0"
            with self.scratch(blob) as where:
                args = bytearray(data)
                if want:  # the set_tid pointer is absolute: patch it in
                    args[64:72] = (where + CLONE_ARGS_SIZE).to_bytes(8, "little")
                    self.write(where, bytes(args))
                if tid and not via_set_tid:
                    try:
                        with open(_NS_LAST_PID, "w") as fh:
                            fh.write(str(tid - 1))
                    except OSError as exc:
                        raise InjectorError(
                            self.pid,
                            f"cannot ask for thread id {tid} ({_NS_LAST_PID})",
                            _errno(exc),
                        ) from exc
                try:
                    with signals_deferred():
                        got = run_clone(self, self.pid, insn, where)
                except InjectedSyscallError as exc:
                    if tid and via_set_tid and exc.errno == errno.EPERM:
                        continue  # the target may not choose its ids: try ns_last_pid
                    raise
                if not tid or got == tid:
                    try:
                        if name:
                            self.prctl(_PR_SET_NAME, where + name_at, tid=got)
                        if not stack[2] & SS_DISABLE:
                            self.call("sigaltstack", where + stack_at, 0, tid=got)
                    except BaseException:
                        # never leave a half-made thread: it would run the leader's
                        # injected registers once let go
                        with contextlib.suppress(InjectorError):
                            self.end_thread(got)
                        raise
            if tid and got != tid:
                self.end_thread(got)
                raise InjectorError(
                    self.pid, f"the new thread got id {got}, not {tid} (taken meanwhile?)"
                )
            return got
        raise InjectorError(
            self.pid,
            f"cannot create a thread with id {tid}: the target lacks CAP_CHECKPOINT_RESTORE "
            "and lives in another pid namespace",
            errno.EPERM,
        )

    def descriptors(
        self, *, sock_diag: bool = True, only_sockets: bool = False
    ) -> list[Descriptor]:
        """The descriptor table, read from /proc and sock_diag (``injector.fds.read_fds``)."""
        self.check()
        return read_fds(self.pid, sock_diag=sock_diag, only_sockets=only_sockets)

    def fs_state(self) -> FsState:
        self.check()
        return read_fs(self.pid)

    def same_open_file(self, fd_a: int, fd_b: int) -> bool:
        """kcmp(KCMP_FILE): whether fds ``fd_a`` and ``fd_b`` share an open file description."""
        if fd_a == fd_b:
            return True
        try:
            return _libc.kcmp_files(self.pid, fd_a, fd_b) == 0
        except OSError as exc:
            if exc.errno == errno.ESRCH or self.gone():
                raise TargetExited(self.pid, "exited during the session", errno.ESRCH) from exc
            raise InjectorError(
                self.pid, f"cannot compare descriptors {fd_a} and {fd_b}", _errno(exc)
            ) from exc

    def file_shared_with(self, fd: int) -> int | None:
        """Another process whose descriptor shares the open file description of the
        target's ``fd`` (its position and status flags), or None: its ancestors and its
        children are asked (kcmp KCMP_FILE on the descriptors that name the same file), where
        an inherited stdout or log file lives."""
        self.check()
        known = _SHARED_WITH.get((self.pid, fd))
        if known is not None:  # found at an earlier apply: one kcmp says whether it still is
            other, other_fd = known
            with contextlib.suppress(OSError):
                if _libc.kcmp_files(self.pid, fd, other_fd, other) == 0:
                    return other
            del _SHARED_WITH[(self.pid, fd)]
        try:
            link = os.readlink(f"{_PROC}/{self.pid}/fd/{fd}")
        except OSError:
            return None
        for other in self._relatives():
            try:
                names = os.listdir(f"{_PROC}/{other}/fd")
            except OSError:
                continue
            for name in names:
                try:
                    if os.readlink(f"{_PROC}/{other}/fd/{name}") != link:
                        continue
                    if _libc.kcmp_files(self.pid, fd, int(name), other) == 0:
                        remember(_SHARED_WITH, (self.pid, fd), (other, int(name)), 1024)
                        return other
                except OSError:
                    continue
        return None

    def _relatives(self) -> list[int]:
        """The target's ancestors (up to, not including, init) and children."""
        out: list[int] = []
        pid = self.pid
        while True:
            try:
                ppid = int(read_stat(pid)[1])
            except (OSError, ValueError, IndexError):
                break
            if ppid <= 1 or ppid in out:
                break
            out.append(ppid)
            pid = ppid
        out.extend(child for child, _, _ in self.children() if child not in out)
        return out

    def pidfd_getfd(self, remote_fd: int) -> int:
        """A duplicate, in this process, of the target's descriptor ``remote_fd`` (the caller
        closes it)."""
        self.check()
        try:
            if self._pidfd < 0:
                self._pidfd = _libc.pidfd_open(self.pid)
            return _libc.pidfd_getfd(self._pidfd, remote_fd)
        except OSError as exc:
            if exc.errno == errno.ESRCH or self.gone():
                raise TargetExited(self.pid, "exited during the session", errno.ESRCH) from exc
            raise InjectorError(
                self.pid, f"cannot take descriptor {remote_fd}", _errno(exc)
            ) from exc

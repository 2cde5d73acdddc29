"""An in-memory process that implements :class:`injector.process.Process`, for tests of the
logic above the injector (planning, executing, rolling back) that need no kernel.

It follows the kernel's rules for what applier does to a process, as far as applier can
tell them apart: mappings with protections, private anonymous pages that read as zero until
written, private file mappings that read as the file until a page is written (then the page
is the process's own copy), ``MAP_FIXED_NOREPLACE``, ``munmap``/``mprotect`` splitting
mappings, ``madvise(MADV_DONTNEED)`` dropping own copies, a program break, mm fields set with
``PR_SET_MM_MAP`` read from the fake's memory, ``openat``/``close`` on a fake file system,
registers and XSAVE areas per thread. Every system call is logged in ``calls``; ``fail``
makes the n-th call of a name fail with an errno, to drive rollbacks.

It is never the proof that something works on a real process: the tests in
``tests/test_apply_*.py`` are. What it does not model raises ``NotImplementedError``.
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import struct
from collections.abc import Iterable
from typing import TYPE_CHECKING

import attrs
import numpy as np
import numpy.typing as npt

from injector.calls import (
    MADV_DONTNEED,
    MADV_REMOVE,
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_FIXED_NOREPLACE,
    MAP_SHARED,
    PR_SET_MM,
    PR_SET_MM_MAP,
    NamedCalls,
)
from injector.errors import InjectedSyscallError, MemoryAccessError, TargetExited
from injector.fdinfo import Descriptor
from injector.fds import FsState, PathInfo
from injector.maps import (
    PAGEMAP_EXCLUSIVE,
    PAGEMAP_FILE,
    PAGEMAP_PRESENT,
    PROT_READ,
    PROT_WRITE,
    Mapping,
    holds_data,
    own_copies,
)
from injector.process import IovIO
from injector.regs import REG_NAMES, Arch, X86Regs
from injector.syscalls import NR, syscall_name
from injector.threads import SS_DISABLE, ThreadExtras

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["FakeProcess", "FakeVma"]

PAGE = 4096
_U64 = (1 << 64) - 1
_MM_MAP_ORDER = (
    "start_code", "end_code", "start_data", "end_data", "start_brk", "brk",
    "start_stack", "arg_start", "arg_end", "env_start", "env_end",
)  # fmt: skip
_UNBLOCKABLE = (1 << 8) | (1 << 18)  # SIGKILL, SIGSTOP
_NAMES = {nr: name for name, nr in NR[Arch.X86_64].items()}
_NO_SS = (0, 0, SS_DISABLE)


@attrs.define
class FakeVma:
    """One mapping of the fake process."""

    start: int
    end: int
    prot: int
    shared: bool = False
    path: str | None = None  # a file of ``FakeProcess.files``, or "[heap]", "[stack]", ...
    offset: int = 0
    inode: int = 0

    @property
    def is_file(self) -> bool:
        return self.inode != 0 and not self.shared


def _signed(value: int) -> int:
    value &= _U64
    return value - (1 << 64) if value >= 1 << 63 else value


class FakeProcess(NamedCalls):
    """An in-memory stand-in for a stopped process (see the module docstring)."""

    def __init__(
        self,
        pid: int = 4242,
        *,
        tids: Iterable[int] | None = None,
        exe: str | None = "/usr/bin/fake",
        files: dict[str, bytes] | None = None,
    ) -> None:
        self._pid = pid
        self._tids = list(tids) if tids is not None else [pid]
        self.arch = Arch.X86_64
        self.exe_path = exe
        self.files: dict[str, bytes] = dict(files or {})
        self.vmas: list[FakeVma] = []
        self.own: dict[int, bytearray] = {}  # private pages written (own copies)
        self.shmem: dict[tuple[int, int], bytearray] = {}  # (inode, offset) -> page
        self.brk_start = 0
        self.brk_value = 0
        self.mm: dict[str, int] = {}
        self.regs: dict[int, X86Regs] = {t: X86Regs(*([0] * len(REG_NAMES))) for t in self._tids}
        self.xstate: dict[int, bytes] = {t: bytes(576) for t in self._tids}
        self.rseq: dict[int, tuple[int, int, int] | None] = dict.fromkeys(self._tids)
        self.fds: dict[int, str] = {}
        self.calls: list[tuple[str, tuple[int, ...]]] = []
        self.fail: dict[str, tuple[int, int]] = {}  # name -> (calls to let through, errno)
        self.unreadable: set[int] = set()  # page addresses whose reads fail (EFAULT)
        self.gone = False
        self.child_processes: list[tuple[int, str, int]] = []
        # signal state: the handler table (signal -> handler, flags, restorer, mask), each
        # thread's blocked mask, queued siginfos (tid, or 0 for the shared queue), itimers
        self.actions: dict[int, tuple[int, int, int, int]] = {}
        self.sigmasks: dict[int, int] = dict.fromkeys(self._tids, 0)
        self.queued: dict[int, list[bytes]] = {}
        self.itimers: list[tuple[int, int, int, int]] = [(0, 0, 0, 0)] * 3
        self.stopped_before = False  # as if it had been in a group stop when attached
        self._held = False
        self.epoch = 0  # layout_epoch: every injected call counts as a possible change
        self.resume_on_detach = False
        self._next_inode = 1000
        self.fd_table: list[Descriptor] = []  # what descriptors() reports
        # threads: robust list (head, length) and clear_child_tid address of each
        self.robust: dict[int, tuple[int, int]] = {}
        self.tid_addr: dict[int, int] = {}
        self._caller = pid  # the thread an injected call runs in
        self.taken_tids: dict[int, str] = {}  # tid -> why a new thread cannot have it
        self.thread_names: dict[int, str] = {}
        self.shared_files: dict[int, int] = {}  # fd -> a process sharing its open file
        self.altstacks: dict[int, tuple[int, int, int]] = {}  # (ss_sp, ss_size, ss_flags)

    # ---- building the fake ---------------------------------------------------------------

    def map_anon(
        self,
        start: int,
        npages: int,
        prot: int = PROT_READ | PROT_WRITE,
        *,
        name: str | None = None,
    ) -> FakeVma:
        vma = FakeVma(start, start + npages * PAGE, prot, path=name)
        self._insert(vma)
        return vma

    def map_file(self, start: int, path: str, offset: int, npages: int, prot: int) -> FakeVma:
        if path not in self.files:
            raise ValueError(f"{path} is not one of the fake's files")
        vma = FakeVma(start, start + npages * PAGE, prot, path=path, offset=offset,
                      inode=self._inode_of(path))  # fmt: skip
        self._insert(vma)
        return vma

    def map_shared_anon(self, start: int, npages: int, inode: int, offset: int = 0) -> FakeVma:
        vma = FakeVma(start, start + npages * PAGE, PROT_READ | PROT_WRITE, shared=True,
                      path="/dev/zero (deleted)", offset=offset, inode=inode)  # fmt: skip
        self._insert(vma)
        return vma

    def set_heap(self, start: int, brk: int) -> None:
        """A heap from ``start`` to ``brk`` (page-rounded): the ``[heap]`` mapping."""
        self.brk_start, self.brk_value = start, brk
        if brk > start:
            self._insert(FakeVma(start, _up(brk), PROT_READ | PROT_WRITE, path="[heap]"))

    def poke(self, address: int, data: bytes) -> None:
        """Write into the fake's memory as the program itself would (no protection check)."""
        self._store(address, data)

    def _inode_of(self, path: str) -> int:
        return 1 + sorted(self.files).index(path)

    def _insert(self, vma: FakeVma) -> None:
        if any(v.start < vma.end and vma.start < v.end for v in self.vmas):
            raise ValueError(f"{vma.start:#x}-{vma.end:#x} overlaps a mapping of the fake")
        bisect.insort(self.vmas, vma, key=lambda v: v.start)

    # ---- Process: identity and layout ----------------------------------------------------

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def tids(self) -> list[int]:
        return list(self._tids)

    def alive(self) -> bool:
        return not self.gone

    @property
    def was_stopped(self) -> bool:
        return self.stopped_before

    @property
    def held(self) -> bool:
        return self._held

    def hold(self) -> None:
        self._alive()
        self._held = True
        self.resume_on_detach = not self.stopped_before

    def _alive(self) -> None:
        if self.gone:
            raise TargetExited(self._pid, "exited during the session", errno.ESRCH)

    @property
    def layout_epoch(self) -> int:
        return self.epoch

    def maps(self) -> list[Mapping]:
        self._alive()
        return [
            Mapping(
                v.start, v.end, v.prot, v.shared, v.offset, 0, v.inode,
                v.path.removesuffix(" (deleted)") if v.path else None,
                deleted=bool(v.path and v.path.endswith(" (deleted)")),
            )
            for v in self.vmas
        ]  # fmt: skip

    def _vma(self, address: int) -> FakeVma | None:
        for v in self.vmas:
            if v.start <= address < v.end:
                return v
        return None

    def data_pages(self, start: int, end: int, *, own: bool = False) -> npt.NDArray[np.bool_]:
        flags = self.page_flags(start, end)
        return own_copies(flags) if own else holds_data(flags)

    def page_flags(self, start: int, end: int) -> npt.NDArray[np.uint64]:
        self._alive()
        out = np.zeros((end - start + PAGE - 1) // PAGE, dtype=np.uint64)
        for i, addr in enumerate(range(start, end, PAGE)):
            v = self._vma(addr)
            if v is None:
                continue
            if v.shared:
                if (v.inode, v.offset + addr - v.start) in self.shmem:
                    out[i] = PAGEMAP_PRESENT | PAGEMAP_FILE
            elif addr in self.own:
                out[i] = PAGEMAP_PRESENT | PAGEMAP_EXCLUSIVE
            elif v.is_file:
                out[i] = PAGEMAP_PRESENT | PAGEMAP_FILE  # the file's page cache page
        return out

    # ---- Process: memory -----------------------------------------------------------------

    def _page(self, addr: int) -> bytes:
        """What the page at ``addr`` reads as (it must be mapped)."""
        v = self._vma(addr)
        if v is None:
            raise MemoryAccessError(self._pid, addr, "not mapped", errno.EFAULT)
        if addr in self.unreadable:
            raise MemoryAccessError(self._pid, addr, "unreadable", errno.EFAULT)
        if v.shared:
            return bytes(self.shmem.get((v.inode, v.offset + addr - v.start), bytes(PAGE)))
        if addr in self.own:
            return bytes(self.own[addr])
        if v.is_file and v.path is not None:
            off = v.offset + addr - v.start
            return self.files[v.path][off : off + PAGE].ljust(PAGE, b"\0")
        return bytes(PAGE)

    def _load(self, address: int, size: int) -> bytes:
        self._alive()
        out = bytearray()
        addr = address
        while len(out) < size:
            base = addr - addr % PAGE
            chunk = self._page(base)[addr - base :]
            out += chunk[: size - len(out)]
            addr = base + PAGE
        return bytes(out)

    def _store(self, address: int, data: bytes) -> None:
        """Write ``data``; read-only pages too, as a forced /proc/PID/mem write does."""
        self._alive()
        pos = 0
        while pos < len(data):
            addr = address + pos
            base = addr - addr % PAGE
            v = self._vma(base)
            if v is None:
                raise MemoryAccessError(self._pid, addr, "not mapped", errno.EFAULT)
            page = bytearray(self._page(base))
            n = min(PAGE - (addr - base), len(data) - pos)
            page[addr - base : addr - base + n] = data[pos : pos + n]
            if v.shared:
                self.shmem[(v.inode, v.offset + base - v.start)] = page
            else:
                self.own[base] = page
            pos += n

    def read(self, address: int, size: int) -> bytes:
        return self._load(address, size)

    def read_into(self, address: int, buffer: Buffer) -> None:
        view = memoryview(buffer).cast("B")
        view[:] = self._load(address, view.nbytes)

    def read_runs(self, runs: Iterable[tuple[int, Buffer]]) -> None:
        for address, buffer in runs:
            self.read_into(address, buffer)

    def read_iov(self, local: npt.NDArray[np.uint64], remote: npt.NDArray[np.uint64]) -> None:
        data = b"".join(self._load(int(a), int(n)) for a, n in remote.reshape(-1, 2).tolist())
        pos = 0
        for a, n in local.reshape(-1, 2).tolist():
            ctypes.memmove(int(a), data[pos : pos + int(n)], int(n))
            pos += int(n)

    def threadsafe_read_iov(self) -> IovIO:
        return self.read_iov

    def write(self, address: int, data: Buffer) -> None:
        self._store(address, bytes(memoryview(data).cast("B")))

    def write_runs(self, runs: Iterable[tuple[int, Buffer]]) -> None:
        for address, data in runs:
            self.write(address, data)

    def write_iov(self, local: npt.NDArray[np.uint64], remote: npt.NDArray[np.uint64]) -> None:
        data = b"".join(ctypes.string_at(int(a), int(n)) for a, n in local.reshape(-1, 2).tolist())
        pos = 0
        for a, n in remote.reshape(-1, 2).tolist():
            self._store(int(a), data[pos : pos + int(n)])
            pos += int(n)

    # ---- Process: registers --------------------------------------------------------------

    def _thread(self, tid: int) -> int:
        self._alive()
        if tid not in self._tids:
            raise ValueError(f"thread {tid} is not one of the fake's")
        return tid

    def get_regs(self, tid: int) -> X86Regs:
        return self.regs[self._thread(tid)]

    def set_regs(self, tid: int, regs: X86Regs) -> None:
        self.regs[self._thread(tid)] = regs

    def get_xstate(self, tid: int) -> bytes:
        return self.xstate[self._thread(tid)]

    def set_xstate(self, tid: int, data: bytes) -> None:
        self.xstate[self._thread(tid)] = bytes(data)

    def rseq_config(self, tid: int) -> tuple[int, int, int] | None:
        return self.rseq[self._thread(tid)]

    # ---- Process: threads ------------------------------------------------------------------

    def robust_list(self, tid: int) -> tuple[int, int]:
        return self.robust.get(self._thread(tid), (0, 0))

    def thread_extras(self, tids: Iterable[int]) -> dict[int, ThreadExtras]:
        return {
            t: ThreadExtras(self.tid_addr.get(self._thread(t), 0), self.altstacks.get(t, _NO_SS))
            for t in tids
        }

    def end_thread(self, tid: int) -> None:
        if self._thread(tid) == self._pid:
            raise ValueError("the leader cannot be ended alone")
        self._failing("exit")
        self.calls.append(("exit", (tid,)))
        self._tids.remove(tid)
        del self.regs[tid], self.xstate[tid], self.rseq[tid], self.sigmasks[tid]
        self.robust.pop(tid, None)
        self.tid_addr.pop(tid, None)
        self.altstacks.pop(tid, None)

    def tid_unavailable(self, tid: int) -> str | None:
        return self.taken_tids.get(tid)

    def new_thread(
        self,
        *,
        tls: int = 0,
        clear_tid: int = 0,
        tid: int = 0,
        name: str = "",
        altstack: tuple[int, int, int] | None = None,
    ) -> int:
        self._alive()
        self._failing("clone3")
        new = tid or max(self._tids) + 1
        if new in self._tids:
            raise InjectedSyscallError(self._pid, "clone3", errno.EEXIST)
        self.calls.append(("clone3", (tls, clear_tid, tid)))
        self._tids.append(new)
        self.regs[new] = attrs.evolve(X86Regs(*([0] * len(REG_NAMES))), fs_base=tls)
        self.xstate[new] = bytes(576)
        self.rseq[new] = None
        self.sigmasks[new] = _U64 & ~_UNBLOCKABLE
        self.tid_addr[new] = clear_tid
        self.thread_names[new] = name
        self.altstacks[new] = altstack or _NO_SS
        return new

    def _sys_rseq(self, area: int, size: int, flags: int, sig: int) -> int:
        if self.rseq.get(self._caller) is not None:
            raise _Errno(errno.EBUSY)
        self.rseq[self._caller] = (area, size, sig)
        return 0

    def _sys_set_robust_list(self, head: int, size: int) -> int:
        self.robust[self._caller] = (head, size)
        return 0

    # ---- Process: signal state -------------------------------------------------------------

    def get_sigmask(self, tid: int) -> int:
        return self.sigmasks.get(self._thread(tid), 0)

    def set_sigmask(self, tid: int, mask: int) -> None:
        self.calls.append(("PTRACE_SETSIGMASK", (tid, mask)))
        self.sigmasks[self._thread(tid)] = mask & ~_UNBLOCKABLE & _U64

    def sig_dispositions(self) -> tuple[int, int]:
        ignored = caught = 0
        for sig, (handler, *_rest) in self.actions.items():
            if handler == 1:
                ignored |= 1 << (sig - 1)
            elif handler:
                caught |= 1 << (sig - 1)
        return ignored, caught

    def pending_signals(self, tid: int, *, shared: bool = False) -> list[bytes]:
        return list(self.queued.get(0 if shared else self._thread(tid), []))

    # ---- Process: facts ------------------------------------------------------------------

    def exe(self) -> str | None:
        return self.exe_path

    def auxv(self) -> list[int]:
        return [6, PAGE, 0, 0]  # AT_PAGESZ, AT_NULL

    def comm(self, tid: int | None = None) -> str:
        return self.thread_names.get(tid or self._pid) or "fake"

    def mm_fields(self) -> dict[str, int]:
        return {**self.mm, "start_brk": self.brk_start} if self.brk_start else dict(self.mm)

    def stat_ids(self) -> tuple[int, int, int]:
        return 1, self._pid, self._pid

    def start_time(self) -> int:
        return 12345

    def children(self) -> list[tuple[int, str, int]]:
        return list(self.child_processes)

    def open_map_file(self, start: int, end: int) -> int:
        raise NotImplementedError("the fake has no map_files")

    def pidfd_getfd(self, remote_fd: int) -> int:
        raise NotImplementedError("the fake has no descriptors to take")

    def descriptors(
        self, *, sock_diag: bool = True, only_sockets: bool = False
    ) -> list[Descriptor]:
        """The fake's descriptor table: ``fd_table`` (empty unless a test fills it)."""
        return list(self.fd_table)

    def fs_state(self) -> FsState:
        root = PathInfo("/", False, None)
        return FsState(cwd=root, root=root, umask=0o22)

    def file_shared_with(self, fd: int) -> int | None:
        return self.shared_files.get(fd)

    def same_open_file(self, fd_a: int, fd_b: int) -> bool:
        return fd_a == fd_b

    # ---- Process: system calls -----------------------------------------------------------

    def syscall(self, nr: int, *args: int, tid: int | None = None) -> int:
        self.epoch += 1
        self._alive()
        self._caller = self._thread(self._pid if tid is None else tid)
        name = _NAMES.get(nr, f"syscall_{nr}")
        self.calls.append((name, tuple(args)))
        self._failing(name)
        handler = getattr(self, f"_sys_{name}", None)
        if handler is None:
            raise NotImplementedError(f"the fake does not emulate {syscall_name(self.arch, nr)}")
        try:
            result: int = handler(*args)
        except _Errno as exc:
            raise InjectedSyscallError(self._pid, name, exc.err) from None
        return result

    def _failing(self, name: str) -> None:
        """Fail the call as ``fail`` asks (after the calls it lets through)."""
        if name in self.fail:
            let_through, err = self.fail[name]
            if let_through <= 0:
                del self.fail[name]
                raise InjectedSyscallError(self._pid, name, err)
            self.fail[name] = (let_through - 1, err)

    def _sys_getpid(self) -> int:
        return self._pid

    def _sys_mmap(  # noqa: PLR0917 - the syscall's own arguments
        self, addr: int, length: int, prot: int, flags: int, fd: int = -1, offset: int = 0
    ) -> int:
        if length <= 0 or addr % PAGE or offset % PAGE:
            raise _Errno(errno.EINVAL)
        length = _up(length)
        if not flags & (MAP_FIXED | MAP_FIXED_NOREPLACE):
            addr = self._free_area(length)
        overlaps = [v for v in self.vmas if v.start < addr + length and addr < v.end]
        if overlaps and flags & MAP_FIXED_NOREPLACE:
            raise _Errno(errno.EEXIST)
        if overlaps:
            self._sys_munmap(addr, length)
        if flags & MAP_ANONYMOUS:
            vma = FakeVma(addr, addr + length, prot, shared=bool(flags & MAP_SHARED))
            if vma.shared:
                vma.inode = self._next_inode
                self._next_inode += 1
        else:
            path = self.fds.get(_signed(fd))
            if path is None:
                raise _Errno(errno.EBADF)
            vma = FakeVma(addr, addr + length, prot, path=path, offset=offset,
                          inode=self._inode_of(path))  # fmt: skip
        self._insert(vma)
        self._merge()
        return addr

    def _free_area(self, length: int) -> int:
        addr = 0x7F0000000000
        for v in self.vmas:
            if v.start >= addr + length:
                break
            addr = max(addr, v.end)
        return addr

    def _split(self, at: int) -> None:
        for i, v in enumerate(self.vmas):
            if v.start < at < v.end:
                moved = v.offset + (at - v.start) if v.inode else 0  # anonymous: no offset
                tail = attrs.evolve(v, start=at, offset=moved)
                v.end = at
                self.vmas.insert(i + 1, tail)
                return

    def _merge(self) -> None:
        """Join neighbours the kernel would keep as one VMA (same protection and backing)."""
        out: list[FakeVma] = []
        for v in self.vmas:
            p = out[-1] if out else None
            if (
                p is not None
                and p.end == v.start
                and (p.prot, p.shared, p.path, p.inode) == (v.prot, v.shared, v.path, v.inode)
                and (not v.inode or p.offset + (p.end - p.start) == v.offset)
            ):
                p.end = v.end
            else:
                out.append(v)
        self.vmas = out

    def _range(self, addr: int, length: int) -> list[FakeVma]:
        if addr % PAGE or length <= 0:
            raise _Errno(errno.EINVAL)
        end = addr + _up(length)
        self._split(addr)
        self._split(end)
        return [v for v in self.vmas if addr <= v.start and v.end <= end]

    def _sys_munmap(self, addr: int, length: int) -> int:
        for v in self._range(addr, length):
            self.vmas.remove(v)
            for page in range(v.start, v.end, PAGE):
                self.own.pop(page, None)
        self._merge()
        return 0

    def _sys_mprotect(self, addr: int, length: int, prot: int) -> int:
        inside = self._range(addr, length)
        if sum(v.end - v.start for v in inside) != _up(length):
            raise _Errno(errno.ENOMEM)
        for v in inside:
            v.prot = prot
        self._merge()
        return 0

    def _sys_madvise(self, addr: int, length: int, advice: int) -> int:
        if advice not in (MADV_DONTNEED, MADV_REMOVE):
            return 0
        for page in range(addr, addr + _up(length), PAGE):
            v = self._vma(page)
            if v is None:
                raise _Errno(errno.ENOMEM)
            if v.shared and advice == MADV_REMOVE:
                self.shmem.pop((v.inode, v.offset + page - v.start), None)
            self.own.pop(page, None)
        return 0

    def _sys_brk(self, addr: int) -> int:
        if addr == 0 or addr < self.brk_start:
            return self.brk_value
        old_end, new_end = _up(self.brk_value), _up(addr)
        heap = next((v for v in self.vmas if v.path == "[heap]"), None)
        if new_end > old_end:
            if any(v.start < new_end and old_end < v.end for v in self.vmas if v is not heap):
                return self.brk_value  # refused: the kernel reports the old break
            if heap is None:
                self._insert(FakeVma(old_end, new_end, PROT_READ | PROT_WRITE, path="[heap]"))
            else:
                heap.end = new_end
        elif new_end < old_end and heap is not None:
            self._sys_munmap(new_end, old_end - new_end)
            if new_end > heap.start:
                heap.end = new_end
        self.brk_value = addr
        self._merge()
        return addr

    def _sys_prctl(
        self, option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0
    ) -> int:
        if option != PR_SET_MM or arg2 != PR_SET_MM_MAP:
            raise _Errno(errno.EINVAL)
        blob = self._load(arg3, arg4)
        values = dict(zip(_MM_MAP_ORDER, struct.unpack_from("<11Q", blob), strict=True))
        if values["arg_start"] > values["arg_end"] or values["env_start"] > values["env_end"]:
            raise _Errno(errno.EINVAL)
        if values["brk"] != self.brk_value:
            raise _Errno(errno.EINVAL)  # the caller passes the current break
        self.brk_start = values.pop("start_brk")
        values.pop("brk")
        self.mm.update(values)
        return 0

    def _sys_rt_sigaction(self, sig: int, new: int, old: int, size: int) -> int:
        if size != 8 or not 1 <= sig <= 64:
            raise _Errno(errno.EINVAL)
        if new and sig in (9, 19):
            raise _Errno(errno.EINVAL)
        if old:
            self._store(old, struct.pack("<4Q", *self.actions.get(sig, (0, 0, 0, 0))))
        if new:
            h, f, r, m = struct.unpack("<4Q", self._load(new, 32))
            self.actions[sig] = (h, f, r, m & ~_UNBLOCKABLE)
        return 0

    def _sys_getitimer(self, which: int, addr: int) -> int:
        if not 0 <= which < 3:
            raise _Errno(errno.EINVAL)
        self._store(addr, struct.pack("<4Q", *self.itimers[which]))
        return 0

    def _sys_openat(self, dirfd: int, path_addr: int, flags: int = 0, mode: int = 0) -> int:
        raw = self._load(path_addr, PAGE - path_addr % PAGE)
        path = raw.split(b"\0", 1)[0].decode()
        if path not in self.files:
            raise _Errno(errno.ENOENT)
        fd = 3
        while fd in self.fds:
            fd += 1
        self.fds[fd] = path
        return fd

    def _sys_close(self, fd: int) -> int:
        if self.fds.pop(_signed(fd), None) is None:
            raise _Errno(errno.EBADF)
        return 0


class _Errno(Exception):
    def __init__(self, err: int) -> None:
        self.err = err


def _up(n: int) -> int:
    return -(-n // PAGE) * PAGE

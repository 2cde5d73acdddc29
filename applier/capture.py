"""Capturing a live process: the planner's view of it (``LiveTask``) and its CRIU image entries
(``TaskEntries``: pstree, mm, cores, files), from one :class:`injector.process.Process`.

Both ``applier dump`` and the undo image of an apply use it, so a dump and "the target as it
was before the apply" are recorded the same way, as CRIU records a task (criu/proc_parse.c,
criu/cr-dump.c): VMA status bits and flags, the mm fields of /proc/PID/stat, the auxv, the
program break, and per thread the general-purpose, FPU/xsave and rseq registers.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

import attrs
import numpy as np
import numpy.typing as npt

from applier import xsave
from applier.fds import elf_build_id
from applier.limits import PAGE
from applier.model import PROT_READ, PROT_WRITE, Kind, LiveTask, Region, Sigaction, SignalState
from formats.core import (
    CoreEntry,
    RseqEntry,
    SaEntry,
    TaskCoreEntry,
    ThreadCoreEntry,
    ThreadInfoX86,
    ThreadSasEntry,
    UserX86FpregsEntry,
    UserX86RegsEntry,
    UserX86XsaveEntry,
)
from formats.files import FileEntry
from formats.imagewriter import regular_file
from formats.inventory import PstreeEntry
from formats.mm import MAP_ANONYMOUS, MAP_GROWSDOWN, MAP_PRIVATE, MAP_SHARED, MmEntry, VmaEntry
from formats.mm import VmaStatus as S
from formats.signals import (
    SIGACTION_SIGNALS,
    ItimerEntry,
    SiginfoEntry,
    SignalQueueEntry,
    TaskTimersEntry,
)
from injector.maps import Mapping, holds_data, own_copies
from injector.process import Process
from injector.regs import X86Regs
from injector.threads import ThreadExtras

__all__ = [
    "TaskEntries",
    "dump_selection",
    "live_signals",
    "live_task",
    "mm_fields",
    "present_pages",
    "region_from_mapping",
    "task_entries",
]

_CLK_TCK = os.sysconf("SC_CLK_TCK")

# /proc/PID/maps names of shmem objects: shared anonymous memory, memfd, SysV segments
SHMEM_PREFIXES = ("/memfd:", "/dev/zero", "/SYSV")
SPECIAL_NAMES = {"[vdso]", "[vvar]", "[vvar_vclock]", "[vsyscall]", "[uprobes]", "[vectors]"}


def mm_fields(process: Process) -> dict[str, int]:
    """The mm fields of /proc/PID/stat by their mm_entry names (``mm_start_code``, ...)."""
    return {f"mm_{name}": value for name, value in process.mm_fields().items()}


def region_from_mapping(m: Mapping) -> Region:
    """The planner's view of one /proc/PID/maps line."""
    path = m.path
    if path in SPECIAL_NAMES:
        return Region(m.start, m.end, m.prot, Kind.SPECIAL, name=path)
    if m.shared:
        if path is None or path.startswith(SHMEM_PREFIXES) or m.inode == 0:
            return Region(
                m.start, m.end, m.prot, Kind.SHARED_ANON, path=path, offset=m.offset, inode=m.inode
            )
        return Region(m.start, m.end, m.prot, Kind.SHARED_FILE, path=path, offset=m.offset)
    if m.inode == 0:
        name = path if path in ("[heap]", "[stack]") else None
        return Region(m.start, m.end, m.prot, Kind.ANON, name=name, growsdown=path == "[stack]")
    return Region(m.start, m.end, m.prot, Kind.FILE, path=path, offset=m.offset)


def present_pages(
    process: Process, regions: Iterable[Region], page: int
) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64]]:
    """(pages holding data, those that are the process's own copies) of the private regions."""
    present: list[npt.NDArray[np.uint64]] = []
    anon: list[npt.NDArray[np.uint64]] = []
    for r in regions:
        if not r.kind.private:
            continue
        flags = process.page_flags(r.start, r.end)
        addrs = np.arange(r.start, r.end, page, dtype=np.uint64)
        present.append(addrs[holds_data(flags)])
        anon.append(addrs[own_copies(flags)])
    empty = np.zeros(0, dtype=np.uint64)
    return (
        np.concatenate(present) if present else empty,
        np.concatenate(anon) if anon else empty,
    )


def _ip_sp(regs: X86Regs) -> tuple[int, int]:
    return regs.ip, regs.sp


_SIGCHLD = 17  # its flags matter even for SIG_DFL (SA_NOCLDSTOP, SA_NOCLDWAIT)


def live_signals(process: Process, image: SignalState, *, read_only: bool) -> SignalState:
    """The live signal state to compare with the image's: every thread's blocked mask
    (PTRACE_GETSIGMASK) and which signals are ignored or handled (/proc/PID/status), which
    need no injection; and, unless ``read_only``, the exact disposition (injected
    ``rt_sigaction``) of each signal that may differ from the image: handled now or in the
    image, of another kind than in the image, and SIGCHLD. A signal left out is of the same
    kind (default or ignored) on both sides, which no flag or mask changes."""
    ignored, caught = process.sig_dispositions()
    blocked = {tid: process.get_sigmask(tid) for tid in process.tids}
    live = SignalState({}, ignored, caught, blocked)
    if read_only:
        return live
    want = [
        sig
        for sig in SIGACTION_SIGNALS
        if sig == _SIGCHLD
        or (caught | image.caught) >> (sig - 1) & 1
        or live.kind(sig) != image.kind(sig)
    ]
    actions = {sig: Sigaction(*value) for sig, value in process.sigactions(want).items()}
    return attrs.evolve(live, actions=actions)


def live_task(
    process: Process,
    page: int,
    *,
    read_only: bool = False,
    dirty: npt.NDArray[np.uint64] | Callable[[], npt.NDArray[np.uint64] | None] | None = None,
    signals: SignalState | None = None,
) -> LiveTask:
    """The planner's view of the stopped ``process``.

    ``read_only``: inject nothing (diff, dry runs); the program break is then unknown
    (``brk`` None) and the planner takes it to the page from the ``[heap]`` mapping.

    With ``dirty`` (every page written since the target equalled the image) the pagemap is
    not read: only dirty pages can need discarding, and discarding a page that turns out not
    to be present, or to be the file's own page, changes nothing. ``dirty`` may be a function
    that waits for them (a tracker scanning on another thread): it is called once what does
    not depend on them (threads, registers, the mm fields, children) has been read.

    ``signals``: the image's signal state, to read the live one against (``live_signals``);
    None leaves the signal state unread.
    """
    pid = process.pid
    regions = sorted((region_from_mapping(m) for m in process.maps()), key=lambda r: r.start)
    exe = process.exe()
    threads = list(process.tids)
    thread_ip_sp = {tid: _ip_sp(process.get_regs(tid)) for tid in threads}
    mm = mm_fields(process)
    children = tuple(
        (child, comm, ticks * 1_000_000 // _CLK_TCK) for child, comm, ticks in process.children()
    )
    if callable(dirty):
        dirty = dirty()
    lent = None
    if dirty is None:
        present, anon = present_pages(process, regions, page)
    else:
        present = anon = np.asarray(dirty, dtype=np.uint64)
        lent = _lendable(regions, present)
    brk = None if read_only else process.brk(0)
    with process.lending(lent):
        signal_state = (
            None if signals is None else live_signals(process, signals, read_only=read_only)
        )
    return LiveTask(
        pid=pid,
        regions=regions,
        threads=threads,
        thread_ip_sp=thread_ip_sp,
        exe=exe,
        present=present,
        anon=anon,
        brk=brk,
        mm_fields=mm,
        children=children,
        signals=signal_state,
    )


_RW = PROT_READ | PROT_WRITE


def _lendable(regions: list[Region], written: npt.NDArray[np.uint64]) -> int | None:
    """A page the signal reads may borrow as scratch (``Process.lending``): one written
    since the checkpoint (tracking already counts it written) of private anonymous memory
    that can be read and written; None if there is none."""
    if len(written) == 0:
        return None
    if len(written) > 1 and not bool(np.all(written[1:] >= written[:-1])):
        written = np.sort(written)
    for r in regions:
        if r.kind is not Kind.ANON or r.growsdown or r.prot & _RW != _RW:
            continue
        i = int(np.searchsorted(written, np.uint64(r.start)))
        if i < len(written) and int(written[i]) < r.end:
            return int(written[i])
    return None


# ---- CRIU entries ------------------------------------------------------------------------


def _status(m: Mapping) -> tuple[int, int]:
    """(vma_entry.status, vma_entry.flags) of one live mapping, as CRIU would record them."""
    region = region_from_mapping(m)
    if m.path == "[vdso]":
        return S.REGULAR | S.ANON_PRIVATE | S.VDSO, MAP_PRIVATE | MAP_ANONYMOUS
    if m.path in ("[vvar]", "[vvar_vclock]"):
        return S.REGULAR | S.ANON_PRIVATE | S.VVAR, MAP_PRIVATE | MAP_ANONYMOUS
    if m.path == "[vsyscall]":
        return S.VSYSCALL, MAP_PRIVATE | MAP_ANONYMOUS
    if region.kind is Kind.SHARED_ANON:
        return S.REGULAR | S.ANON_SHARED, MAP_SHARED | MAP_ANONYMOUS
    if region.kind is Kind.SHARED_FILE:
        return S.REGULAR | S.FILE_SHARED, MAP_SHARED
    if region.kind is Kind.FILE:
        return S.REGULAR | S.FILE_PRIVATE, MAP_PRIVATE
    status = S.REGULAR | S.ANON_PRIVATE | (S.HEAP if m.path == "[heap]" else 0)
    flags = MAP_PRIVATE | MAP_ANONYMOUS | (MAP_GROWSDOWN if m.path == "[stack]" else 0)
    return status, flags


def _core(
    process: Process, tid: int, leader: bool, comm: str, extras: dict[int, ThreadExtras]
) -> CoreEntry:
    regs = process.get_regs(tid)
    gp = UserX86RegsEntry(mode=1)
    for name, value in regs.as_dict().items():  # the same names, in the same order
        setattr(gp, name, value)
    fp_values = xsave.xstate_to_fpregs(process.get_xstate(tid))
    xs = fp_values.pop("xsave", None)
    fpregs = UserX86FpregsEntry(**fp_values)
    if xs is not None:
        fpregs.xsave = UserX86XsaveEntry(**xs)
    core = CoreEntry(
        mtype=1,
        thread_info=ThreadInfoX86(clear_tid_addr=extras[tid].clear_tid, gpregs=gp, fpregs=fpregs),
    )
    # The robust futex list, the tid address and the sigaltstack are what a thread created
    # again needs (applier.executor.threads), as CRIU records them.
    head, length = process.robust_list(tid)
    sp, size, flags = extras[tid].altstack
    core.thread_core = ThreadCoreEntry(
        futex_rla=head,
        futex_rla_len=length,
        comm=comm if leader else process.comm(tid),
        sas=ThreadSasEntry(ss_sp=sp, ss_size=size, ss_flags=flags),
    )
    rseq = process.rseq_config(tid)
    if rseq is not None:
        core.thread_core.rseq_entry = RseqEntry(
            rseq_abi_pointer=rseq[0], rseq_abi_size=rseq[1], signature=rseq[2]
        )
    mask = process.get_sigmask(tid)
    core.thread_core.signals_p = _queue(process.pending_signals(tid))
    if leader:
        core.tc = TaskCoreEntry(
            task_state=1, exit_code=0, personality=0, flags=0, blk_sigset=mask, comm=comm
        )
    else:
        core.thread_core.blk_sigset = mask  # the leader's is tc.blk_sigset, as CRIU has it
    return core


def _queue(siginfos: list[bytes]) -> SignalQueueEntry:
    return SignalQueueEntry(signals=[SiginfoEntry(siginfo=bytes(si)) for si in siginfos])


def _task_signals(process: Process, tc: TaskCoreEntry) -> None:
    """The process-wide signal state into the leader's ``tc``, as CRIU 4.2 records it: 62
    ``sigactions`` (injected ``rt_sigaction``, native: ``compat_sigaction`` false), the
    interval timers (injected ``getitimer``) and the shared pending queue."""
    actions = process.sigactions(SIGACTION_SIGNALS)
    tc.sigactions = [
        SaEntry(sigaction=h, flags=f, restorer=r, mask=m, compat_sigaction=False)
        for h, f, r, m in (actions[sig] for sig in SIGACTION_SIGNALS)
    ]
    real, virt, prof = (
        ItimerEntry(isec=isec, iusec=iusec, vsec=vsec, vusec=vusec)
        for isec, iusec, vsec, vusec in process.getitimers()
    )
    tc.timers = TaskTimersEntry(real=real, virt=virt, prof=prof)
    tc.signals_s = _queue(process.pending_signals(process.pid, shared=True))


@attrs.frozen
class TaskEntries:
    """A stopped task as CRIU image entries, all but its pages: pstree, mm (every VMA, mm
    fields, auxv), one core per thread and files.img (the executable and mapped files)."""

    proc: PstreeEntry
    mm: MmEntry
    cores: dict[int, CoreEntry]
    files: list[FileEntry]


def task_entries(process: Process, maps: list[Mapping]) -> TaskEntries:
    """The entries of the stopped task ``process`` whose mappings are ``maps`` (what a dump
    writes; the undo image records the target as it was before an apply the same way)."""
    pid = process.pid
    comm = process.comm()
    exe = (process.exe() or "").removesuffix(" (deleted)")
    file_ids: dict[str, int] = {}
    files: list[FileEntry] = []

    def file_id(path: str) -> int:
        if path not in file_ids:
            file_ids[path] = len(file_ids) + 1
            try:
                st: os.stat_result | None = os.stat(path)
            except OSError:
                st = None
            entry = regular_file(file_ids[path], path, size=None if st is None else st.st_size)
            if entry.reg is not None and st is not None:
                entry.reg.mode = st.st_mode  # as CRIU: the mode of every regular file
                entry.reg.build_id = elf_build_id(path) or []  # and the build-id of ELF ones
            files.append(entry)
        return file_ids[path]

    exe_id = file_id(exe)
    vmas: list[VmaEntry] = []
    for m in maps:
        status, flags = _status(m)
        is_file = bool(status & (S.FILE_PRIVATE | S.FILE_SHARED))
        vmas.append(
            VmaEntry(
                start=m.start,
                end=m.end,
                shmid=(
                    file_id(m.path)
                    if is_file and m.path
                    else m.inode
                    if status & S.ANON_SHARED
                    else 0
                ),
                pgoff=m.offset if is_file or status & S.ANON_SHARED else 0,
                prot=m.prot,
                flags=flags,
                status=status,
                fd=-1,
            )
        )
    fields = mm_fields(process)
    brk = process.brk(0)
    mm = MmEntry(
        mm_start_code=fields.get("mm_start_code", 0),
        mm_end_code=fields.get("mm_end_code", 0),
        mm_start_data=fields.get("mm_start_data", 0),
        mm_end_data=fields.get("mm_end_data", 0),
        mm_start_stack=fields.get("mm_start_stack", 0),
        mm_start_brk=fields.get("mm_start_brk", 0),
        mm_arg_start=fields.get("mm_arg_start", 0),
        mm_arg_end=fields.get("mm_arg_end", 0),
        mm_env_start=fields.get("mm_env_start", 0),
        mm_env_end=fields.get("mm_env_end", 0),
        mm_brk=brk,
        exe_file_id=exe_id,
        mm_saved_auxv=process.auxv(),
        vmas=vmas,
    )
    extras = process.thread_extras(process.tids)
    cores = {tid: _core(process, tid, tid == pid, comm, extras) for tid in process.tids}
    tc = cores[pid].tc
    assert tc is not None
    _task_signals(process, tc)
    _ppid, pgid, sid = process.stat_ids()
    # ppid 0: the root of the dumped tree, as CRIU writes it (crit x ps looks parents up in
    # the image and fails on a pid that is not there).
    proc = PstreeEntry(pid=pid, ppid=0, pgid=pgid, sid=sid, threads=process.tids)
    return TaskEntries(proc, mm, cores, files)


def dump_selection(process: Process, m: Mapping) -> npt.NDArray[np.bool_]:
    """Which pages of mapping ``m`` CRIU would dump (section 5.5 of the format notes): every
    page of the vDSO, the process's own copies in a private file mapping, else every page
    that holds data."""
    if m.path == "[vdso]":
        return np.ones((m.end - m.start) // PAGE, dtype=bool)
    return process.data_pages(m.start, m.end, own=region_from_mapping(m).kind is Kind.FILE)

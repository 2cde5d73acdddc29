"""The image side: one task of an image directory reduced to the planner's values
(``ImageTask``): regions from the VMAs (the VMA status bits of criu/include/vma.h), the saved
page runs resolved through the parent chain, threads, break, mm fields, shared objects."""

from __future__ import annotations

from applier.errors import MismatchError
from applier.fds import image_fds
from applier.model import (
    MM_FIELDS,
    ImageTask,
    Kind,
    Region,
    SavedPages,
    SharedObject,
    Sigaction,
    SignalState,
)
from formats import names
from formats.core import CoreEntry
from formats.imagedir import ImageDir
from formats.mm import MAP_GROWSDOWN, VmaEntry
from formats.mm import VmaStatus as S
from formats.signals import SIGACTION_SIGNALS, SignalQueueEntry

__all__ = ["image_signals", "image_task", "region_from_vma"]


def region_from_vma(vma: VmaEntry, path: str | None) -> Region | None:
    """The planner's view of one ``vma_entry`` (None for CRIU 4.2 guard pseudo-VMAs)."""
    st, start, end, prot = int(vma.status), int(vma.start), int(vma.end), int(vma.prot)
    if vma.is_guard:
        return None
    growsdown = bool(int(vma.flags) & MAP_GROWSDOWN)
    if st & S.VDSO:
        return Region(start, end, prot, Kind.SPECIAL, name="[vdso]")
    if st & S.VVAR:
        return Region(start, end, prot, Kind.SPECIAL, name="[vvar]")
    if st & (S.VSYSCALL | S.UPROBES):
        return Region(start, end, prot, Kind.SPECIAL, name="[vsyscall]")
    if st & (S.AIORING | S.SOCKET | S.EXT_PLUGIN):
        return Region(start, end, prot, Kind.OTHER, path=path)
    if st & S.FILE_SHARED and not st & S.MEMFD:
        return Region(start, end, prot, Kind.SHARED_FILE, path=path, offset=int(vma.pgoff))
    if st & (S.ANON_SHARED | S.MEMFD):
        # VMA_ANON_SHARED: shmid is the shmem inode; memfd-style entries name a files.img id
        inode = int(vma.shmid) if st & S.ANON_SHARED else -1
        return Region(
            start, end, prot, Kind.SHARED_ANON, path=path, offset=int(vma.pgoff), inode=inode
        )
    if st & S.FILE_PRIVATE:
        return Region(start, end, prot, Kind.FILE, path=path, offset=int(vma.pgoff))
    if st & S.ANON_PRIVATE:
        name = "[heap]" if st & S.HEAP else ("[stack]" if growsdown else None)
        return Region(start, end, prot, Kind.ANON, name=name, growsdown=growsdown)
    return Region(start, end, prot, Kind.OTHER, path=path)


def image_task(img: ImageDir, pid: int | None = None) -> ImageTask:
    """The planner's view of task ``pid`` (default: the root of the process tree) of ``img``."""
    pid = img.root_pid if pid is None else pid
    entry = next((e for e in img.pstree if int(e.pid) == pid), None)
    if entry is None:
        known = ", ".join(str(e.pid) for e in img.pstree)
        raise MismatchError(f"{img.path}: no task {pid} in pstree.img (tasks: {known})")
    mm = img.mm(pid)
    regions = []
    for vma in mm.vmas:
        path = (
            img.vma_path(pid, vma) if int(vma.status) & (S.FILE_PRIVATE | S.FILE_SHARED) else None
        )
        region = region_from_vma(vma, path)
        if region is not None:
            regions.append(region)
    regions.sort(key=lambda r: r.start)
    saved = [SavedPages(run.vaddr, run.nr_pages, run) for run in img.page_runs(pid)]
    threads = [int(t) for t in entry.threads] or [pid]
    if pid in threads:
        threads.remove(pid)
        threads.insert(0, pid)
    mm_fields = {name: int(getattr(mm, name)) for name in MM_FIELDS}
    shared = {}
    for r in regions:
        if (
            r.kind is Kind.SHARED_ANON
            and r.inode > 0
            and r.inode not in shared
            and img.has(names.pagemap_shmem(r.inode))
        ):
            runs = img.shmem_page_runs(r.inode)  # validated here, before any write
            shared[r.inode] = SharedObject(
                r.inode, [SavedPages(run.vaddr, run.nr_pages, run) for run in runs]
            )
    return ImageTask(
        pid=pid,
        page_size=img.page_size,
        regions=regions,
        saved=saved,
        brk=int(mm.mm_brk),
        start_brk=int(mm.mm_start_brk),
        exe=img.exe_path(pid),
        threads=threads,
        mm_fields=mm_fields,
        shared=shared,
        children=tuple(int(e.pid) for e in img.pstree if int(e.ppid) == pid),
        dump_uptime=img.inventory.dump_uptime,
        fds=image_fds(img, pid),
        signals=(
            image_signals({t: img.core(t) for t in threads}, pid)
            if all(img.has(names.core(t)) for t in threads)
            else None
        ),
    )


def _queued(tid: int, queue: SignalQueueEntry | None) -> list[tuple[int, int, int]]:
    return [(tid, q.si_signo, q.si_code) for q in (queue.signals if queue else [])]


def image_signals(cores: dict[int, CoreEntry], pid: int) -> SignalState | None:
    """The signal state CRIU keeps in the cores (criu/cr-dump.c, parasite-syscall.c):
    ``tc.sigactions`` (62 entries, signals 1..64 without SIGKILL and SIGSTOP), the leader's
    blocked mask in ``tc.blk_sigset``, every other thread's in ``thread_core.blk_sigset``
    (CRIU's restore takes the leader's where a thread has none), the shared pending queue
    ``tc.signals_s`` and each thread's ``thread_core.signals_p``, the itimers ``tc.timers``.
    None when the image has no sigactions (older images and applier's own before 0.x): then
    there is nothing to restore."""
    tc = cores[pid].tc
    if tc is None or len(tc.sigactions) != len(SIGACTION_SIGNALS):
        return None
    actions = {
        sig: Sigaction(int(e.sigaction), int(e.flags), int(e.restorer), int(e.mask))
        for sig, e in zip(SIGACTION_SIGNALS, tc.sigactions, strict=True)
    }
    ignored = caught = 0
    for sig, a in actions.items():
        if a.kind == "ignore":
            ignored |= 1 << (sig - 1)
        elif a.kind == "handler":
            caught |= 1 << (sig - 1)
    blocked: dict[int, int] = {}
    pending = _queued(0, tc.signals_s)
    for tid, core in cores.items():
        th = core.thread_core
        own = th.blk_sigset if th is not None and tid != pid else None
        blocked[tid] = int(own if own is not None else tc.blk_sigset)
        pending += _queued(tid, th.signals_p if th is not None else None)
    timers = tc.timers
    itimers: tuple[tuple[int, int, int, int], ...] = ()
    if timers is not None:
        itimers = tuple(
            (int(t.isec), int(t.iusec), int(t.vsec), int(t.vusec))
            for t in (timers.real, timers.virt, timers.prof)
        )
    return SignalState(actions, ignored, caught, blocked, tuple(pending), itimers)

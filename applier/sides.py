"""Adapters: an image directory and a live session, each reduced to the planner's values."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import numpy as np
import numpy.typing as npt

from applier.errors import MismatchError
from applier.model import (
    ImageTask,
    Kind,
    LiveTask,
    Region,
    SavedPages,
    SharedObject,
)
from formats.mm import MAP_GROWSDOWN
from formats.mm import VmaStatus as S
from injector.maps import Mapping, holds_data, own_copies, read_stat

__all__ = ["MM_STAT_FIELDS", "image_task", "live_task", "region_from_mapping", "region_from_vma"]

# /proc/PID/maps names of shmem objects: shared anonymous memory, memfd, SysV segments
SHMEM_PREFIXES = ("/memfd:", "/dev/zero", "/SYSV")
SPECIAL_NAMES = {"[vdso]", "[vvar]", "[vvar_vclock]", "[vsyscall]", "[uprobes]", "[vectors]"}

# /proc/PID/stat field (1-based, proc(5)) -> mm_entry field that PR_SET_MM can set
MM_STAT_FIELDS = {
    26: "mm_start_code",
    27: "mm_end_code",
    28: "mm_start_stack",
    45: "mm_start_data",
    46: "mm_end_data",
    47: "mm_start_brk",
    48: "mm_arg_start",
    49: "mm_arg_end",
    50: "mm_env_start",
    51: "mm_env_end",
}


# --------------------------------------------------------------------------- image side


def region_from_vma(vma: Any, path: str | None) -> Region | None:
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


def image_task(img: Any, pid: int | None = None) -> ImageTask:
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
    mm_fields = {name: int(getattr(mm, name)) for name in MM_STAT_FIELDS.values()}
    shared = {}
    for r in regions:
        if (
            r.kind is Kind.SHARED_ANON
            and r.inode > 0
            and r.inode not in shared
            and (img.path / f"pagemap-shmem-{r.inode}.img").exists()
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
    )


# --------------------------------------------------------------------------- live side


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


def read_mm_fields(pid: int) -> dict[str, int]:
    rest = read_stat(pid)  # field 3 (state) first
    out: dict[str, int] = {}
    for number, name in MM_STAT_FIELDS.items():
        if number - 3 < len(rest):
            out[name] = int(rest[number - 3])
    return out


def present_pages(
    session: Any, regions: Iterable[Region], page: int
) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64]]:
    """(pages holding data, those that are the process's own copies) of the private regions."""
    present: list[npt.NDArray[np.uint64]] = []
    anon: list[npt.NDArray[np.uint64]] = []
    for r in regions:
        if not r.kind.private:
            continue
        flags = session.page_flags(r.start, r.end)
        addrs = np.arange(r.start, r.end, page, dtype=np.uint64)
        present.append(addrs[holds_data(flags)])
        anon.append(addrs[own_copies(flags)])
    empty = np.zeros(0, dtype=np.uint64)
    return (
        np.concatenate(present) if present else empty,
        np.concatenate(anon) if anon else empty,
    )


def _ip_sp(regs: Any) -> tuple[int, int]:
    return int(regs.ip), int(regs.sp)


def live_task(
    session: Any,
    page: int,
    *,
    with_brk: bool = True,
    dirty: npt.NDArray[np.uint64] | None = None,
) -> LiveTask:
    """The planner's view of the stopped target behind ``session``.

    With ``dirty`` (every page written since the target equalled the image) the pagemap is
    not read: only dirty pages can need discarding, and discarding a page that turns out not
    to be present, or to be the file's own page, changes nothing.
    """
    pid = int(session.pid)
    regions = sorted((region_from_mapping(m) for m in session.maps()), key=lambda r: r.start)
    if dirty is None:
        present, anon = present_pages(session, regions, page)
    else:
        present = anon = np.asarray(dirty, dtype=np.uint64)
    try:
        exe: str | None = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        exe = None
    brk = int(session.syscall(12, 0)) if with_brk else None
    return LiveTask(
        pid=pid,
        regions=regions,
        threads=list(session.tids),
        thread_ip_sp={tid: _ip_sp(session.get_regs(tid)) for tid in session.tids},
        exe=exe,
        present=present,
        anon=anon,
        brk=brk,
        mm_fields=read_mm_fields(pid),
    )

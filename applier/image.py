"""The image side: one task of an image directory reduced to the planner's values
(``ImageTask``): regions from the VMAs (the VMA status bits of criu/include/vma.h), the saved
page runs resolved through the parent chain, threads, break, mm fields, shared objects."""

from __future__ import annotations

from applier.errors import MismatchError
from applier.fds import image_fds
from applier.model import MM_FIELDS, ImageTask, Kind, Region, SavedPages, SharedObject
from formats import names
from formats.imagedir import ImageDir
from formats.mm import MAP_GROWSDOWN, VmaEntry
from formats.mm import VmaStatus as S

__all__ = ["image_task", "region_from_vma"]


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
    )

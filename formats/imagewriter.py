"""Write a whole image directory in the form CRIU 3.x-4.2 and both crits accept (format doc
section 8, "A writer ... should"): inventory with img_version 2, fdinfo_per_id and ns_per_id;
common magic on every image but the inventory; pagemaps with fields 1, 2, 4 and 5; a
directory-unique ``pages_id`` naming ``pages-<id>.img``; an optional ``parent`` symlink.

Descriptor state is laid out as CRIU 4.2 does: ``ids-<pid>.img`` per process, whose ``files_id``
names the ``fdinfo-<files_id>.img`` descriptor table (shared by processes that share it),
``fs-<pid>.img``, every file object of the dump in one ``files.img``, and the queued bytes of
pipes in ``pipes-data.img`` (each entry followed by its bytes), memfd inodes in ``memfd.img``.
The root process of the tree must have ppid 0, as CRIU writes it (crit 3.17's ``x ps`` needs it).
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from formats import names
from formats.core import (
    CoreEntry,
    TaskCoreEntry,
    ThreadCoreEntry,
    ThreadInfoX86,
    UserX86RegsEntry,
)
from formats.fdkinds import MemfdInodeEntry, PipeDataEntry
from formats.files import FD_CLOEXEC, FdinfoEntry, FileEntry, FownEntry, FsEntry, RegFileEntry
from formats.imagefile import build_image, dump_image
from formats.inventory import CRTOOLS_IMAGES_V1_1, InventoryEntry, PstreeEntry, TaskKobjIdsEntry
from formats.mm import MAP_ANONYMOUS, MAP_PRIVATE, MmEntry, VmaEntry, VmaStatus
from formats.pagemap import PE_PRESENT, entries_bytes
from formats.pagemap_msgs import PagemapHead

__all__ = ["ImageWriter", "PageData", "anon_vma", "fd_entry", "regular_file", "x86_core"]

# One run to write: (vaddr, nr_pages, flags, data); data is required with PE_PRESENT and must
# hold exactly nr_pages pages, and must be None otherwise.
PageData = tuple[int, int, int, bytes | None]


class ImageWriter:
    """Collects processes and files, writes images as it goes; ``finish()`` writes inventory,
    pstree and files.img.  Usable as a context manager (``finish`` on a clean exit)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        parent: str | os.PathLike[str] | None = None,
        page_size: int = 4096,
    ) -> None:
        self.path = Path(path)
        self.page_size = page_size
        self.path.mkdir(parents=True, exist_ok=True)
        if parent is not None:
            (self.path / names.PARENT).symlink_to(parent)
        self._pstree: list[PstreeEntry] = []
        self._files: list[FileEntry] = []
        self._pipe_data: list[PipeDataEntry] = []
        self._memfd_inodes: list[MemfdInodeEntry] = []
        self._fdinfo_written: set[int] = set()
        self._next_pages_id = 1
        self._finished = False

    def __enter__(self) -> ImageWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.finish()

    def add_file(self, entry: FileEntry) -> None:
        """Add an entry to files.img (open files, the executable, files behind mappings)."""
        self._files.append(entry)

    def add_pipe_data(self, pipe_id: int, data: bytes, *, size: int | None = None) -> None:
        """Queue ``data`` for pipe ``pipe_id`` in pipes-data.img (``size``: F_GETPIPE_SZ)."""
        entry = PipeDataEntry(pipe_id=pipe_id, bytes=len(data), size=size, extra=bytes(data))
        self._pipe_data.append(entry)

    def add_memfd_inode(self, entry: MemfdInodeEntry) -> None:
        """Add a memfd inode to memfd.img (MEMFD files name it by ``inode_id``)."""
        self._memfd_inodes.append(entry)

    def write_fdinfo(self, files_id: int, fds: Iterable[FdinfoEntry]) -> None:
        """Write the descriptor table ``fdinfo-<files_id>.img`` (once per files_id)."""
        if files_id in self._fdinfo_written:
            raise ValueError(f"fdinfo-{files_id}.img is already written")
        self._fdinfo_written.add(files_id)
        dump_image(self.path / names.fdinfo(files_id), "FDINFO", list(fds))

    def add_process(
        self,
        proc: PstreeEntry,
        *,
        mm: MmEntry | None = None,
        cores: dict[int, CoreEntry] | None = None,
        runs: Iterable[PageData] | None = None,
        ids: TaskKobjIdsEntry | None = None,
        fs: FsEntry | None = None,
        fds: Iterable[FdinfoEntry] | None = None,
    ) -> None:
        """Add a process: pstree entry, ``mm-<pid>``, ``core-<tid>`` per thread, pagemap,
        ``ids-<pid>``, ``fs-<pid>`` and its descriptors, written to ``fdinfo-<ids.files_id>``
        (leave ``fds`` out for a process sharing an already written table)."""
        if fds is not None and ids is None:
            raise ValueError("descriptors need ids: its files_id names the fdinfo image")
        self._pstree.append(proc)
        if mm is not None:
            dump_image(self.path / names.mm(proc.pid), "MM", [mm])
        for tid, core in (cores or {}).items():
            dump_image(self.path / names.core(tid), "CORE", [core])
        if runs is not None:
            self.write_pagemap(names.pagemap(proc.pid), runs)
        if ids is not None:
            dump_image(self.path / names.ids(proc.pid), "IDS", [ids])
            if fds is not None:
                self.write_fdinfo(ids.files_id, fds)
        if fs is not None:
            dump_image(self.path / names.fs(proc.pid), "FS", [fs])

    def write_pagemap(self, name: str, runs: Iterable[PageData]) -> int:
        """Write pagemap ``name`` and its pages file; returns the pages_id."""
        pages_id = self._next_pages_id
        self._next_pages_id += 1
        plain: list[tuple[int, int, int]] = []
        with (self.path / names.pages(pages_id)).open("wb") as pages:
            for vaddr, nr_pages, flags, data in runs:
                if flags & PE_PRESENT:
                    if data is None or len(data) != nr_pages * self.page_size:
                        raise ValueError(f"run at 0x{vaddr:x}: data must be {nr_pages} pages")
                    pages.write(data)
                elif data is not None:
                    raise ValueError(f"run at 0x{vaddr:x}: data without PE_PRESENT")
                plain.append((vaddr, nr_pages, flags))
        self._write_pagemap_image(name, pages_id, plain)
        return pages_id

    def _write_pagemap_image(
        self, name: str, pages_id: int, runs: Sequence[tuple[int, int, int]]
    ) -> None:
        head = build_image("PAGEMAP", [PagemapHead(pages_id=pages_id)])
        (self.path / name).write_bytes(head + entries_bytes(runs, self.page_size))

    def write_pagemap_filled(
        self,
        name: str,
        runs: Sequence[tuple[int, int, int]],
        fill: Callable[[memoryview, list[tuple[int, int, int]]], None],
        *,
        window: int = 64 << 20,
    ) -> int:
        """Write pagemap ``name`` whose data runs (``PE_PRESENT``) ``fill`` copies straight
        into the pages file: the file is sized first and mapped a window at a time, and
        ``fill(view, [(offset in view, vaddr, bytes), ...])`` writes each window's runs (a
        dumper reads the target's memory into it: one copy, no buffer in between). Returns
        the pages_id."""
        pages_id = self._next_pages_id
        self._next_pages_id += 1
        page = self.page_size
        placed: list[tuple[int, int, int]] = []  # (file offset, vaddr, bytes)
        total = 0
        for vaddr, nr_pages, flags in runs:
            if flags & PE_PRESENT:
                placed.append((total, vaddr, nr_pages * page))
                total += nr_pages * page
        with (self.path / names.pages(pages_id)).open("w+b") as pages:
            if total:
                os.ftruncate(pages.fileno(), total)
            i = 0
            while i < len(placed):
                lo = placed[i][0]
                j = i + 1
                while j < len(placed) and placed[j][0] + placed[j][2] - lo <= window:
                    j += 1
                hi = placed[j - 1][0] + placed[j - 1][2]
                with mmap.mmap(pages.fileno(), hi - lo, offset=lo) as m:
                    view = memoryview(m)
                    try:
                        fill(view, [(off - lo, vaddr, n) for off, vaddr, n in placed[i:j]])
                    finally:
                        view.release()
                i = j
        self._write_pagemap_image(name, pages_id, runs)
        return pages_id

    def write_shmem_pagemap(self, shmid: int, runs: Iterable[PageData]) -> int:
        """Write ``pagemap-shmem-<shmid>.img`` (vaddr = offset in the object)."""
        return self.write_pagemap(names.pagemap_shmem(shmid), runs)

    def finish(
        self, inventory: InventoryEntry | None = None, *, dump_uptime: int | None = None
    ) -> None:
        """Write inventory.img, pstree.img, files.img, and pipes-data.img and memfd.img when
        they have entries (once: later calls do nothing)."""
        if self._finished:
            return
        self._finished = True
        inv = inventory or InventoryEntry(
            img_version=CRTOOLS_IMAGES_V1_1,
            fdinfo_per_id=True,
            ns_per_id=True,
            lsmtype=0,
            dump_uptime=dump_uptime,  # µs since boot: tells a process started later apart
        )
        dump_image(self.path / names.INVENTORY, "INVENTORY", [inv])
        dump_image(self.path / names.PSTREE, "PSTREE", self._pstree)
        dump_image(self.path / names.FILES, "FILES", self._files)
        if self._pipe_data:
            dump_image(self.path / names.PIPES_DATA, "PIPES_DATA", self._pipe_data)
        if self._memfd_inodes:
            dump_image(self.path / names.MEMFD, "MEMFD_INODE", self._memfd_inodes)


# --------------------------------------------------------------------------------------------
# small constructors for the common cases


def regular_file(file_id: int, name: str, *, flags: int = 0, size: int | None = None) -> FileEntry:
    """A files.img entry for a regular file (type REG = 1)."""
    reg = RegFileEntry(id=file_id, flags=flags, pos=0, fown=FownEntry(), name=name, size=size)
    return FileEntry(type=1, id=file_id, reg=reg)


def fd_entry(fd: int, file: FileEntry, *, cloexec: bool = False) -> FdinfoEntry:
    """The fdinfo entry of descriptor ``fd`` open on ``file`` (its id and type)."""
    return FdinfoEntry(id=file.id, flags=FD_CLOEXEC if cloexec else 0, type=file.type, fd=fd)


def anon_vma(start: int, end: int, prot: int = 3, *, heap: bool = False) -> VmaEntry:
    """A private anonymous VMA (status REGULAR|ANON_PRIVATE, plus HEAP if asked)."""
    status = VmaStatus.REGULAR | VmaStatus.ANON_PRIVATE | (VmaStatus.HEAP if heap else 0)
    return VmaEntry(
        start=start,
        end=end,
        pgoff=0,
        shmid=0,
        prot=prot,
        flags=MAP_PRIVATE | MAP_ANONYMOUS,
        status=status,
        fd=-1,
    )


def x86_core(ip: int, sp: int, *, comm: str | None = None) -> CoreEntry:
    """An x86-64 core with the given ip/sp and otherwise zero registers."""
    regs = UserX86RegsEntry(ip=ip, sp=sp, cs=0x33, ss=0x2B, mode=1)
    core = CoreEntry(mtype=1, thread_info=ThreadInfoX86(gpregs=regs))
    if comm is not None:
        core.tc = TaskCoreEntry(task_state=1, comm=comm)
        core.thread_core = ThreadCoreEntry(comm=comm)
    return core

"""A CRIU image directory: every image decoded and validated, the ``parent`` chain followed, the
pagemaps resolved to page runs (format doc sections 1, 5.4 and 8; criu/cr-restore.c, mem.c); the
files, descriptor tables, fs and pipe contents through :class:`~formats.fdstate.FdState`.

Page bytes are never read here: :class:`~formats.pages.PagesFile` maps them on demand.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from formats import names
from formats.core import CoreEntry
from formats.errors import ImageError
from formats.fdkinds import MemfdInodeEntry, PipeDataEntry
from formats.fdstate import FdState
from formats.files import FdinfoEntry, FileEntry, FsEntry
from formats.imagefile import load_image
from formats.imagewriter import ImageWriter
from formats.inventory import InventoryEntry, PstreeEntry, TaskKobjIdsEntry
from formats.mm import AT_PAGESZ, MmEntry, VmaEntry, VmaStatus
from formats.pagemap import Pagemap, PageRun, check_within_vmas, load_pagemap, resolve_runs
from formats.pages import PagesFile

__all__ = ["ImageDir", "ImageWriter", "PageRun", "PagesFile"]

_TOP_VERSIONS = (1, 2)  # CRTOOLS_IMAGES_V1, CRTOOLS_IMAGES_V1_1
_PARENT_VERSIONS = (0, 1, 2)  # pre-dump directories say 0
DEFAULT_PAGE_SIZE = 4096


def _load(path: Path, magic: str) -> list[Any]:
    name, entries = load_image(path)
    if name != magic:
        raise ImageError(path, f"expected a {magic} image, found {name}", offset=0)
    return entries


def _load_one(path: Path, magic: str) -> Any:
    entries = _load(path, magic)
    if not entries:
        raise ImageError(path, f"{magic} image has no entry", offset=0)
    return entries[0]  # CRIU reads only the first entry of single-entry images


def _check_inventory(path: Path, inv: InventoryEntry, *, top: bool) -> None:
    allowed = _TOP_VERSIONS if top else _PARENT_VERSIONS
    if inv.img_version not in allowed:
        raise ImageError(path, f"unsupported img_version {inv.img_version}", entry=0)
    if top and not inv.fdinfo_per_id:
        raise ImageError(path, "fdinfo_per_id is not set (CRIU refuses such images)", entry=0)


class ImageDir:
    """A decoded, validated image directory (see docs/architecture.md for the contract)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.inventory: InventoryEntry = _load_one(path / names.INVENTORY, "INVENTORY")
        _check_inventory(path / names.INVENTORY, self.inventory, top=True)
        self.pstree: list[PstreeEntry] = _load(path / names.PSTREE, "PSTREE")
        if not self.pstree:
            raise ImageError(path / names.PSTREE, "no processes in pstree", offset=0)
        self.root_pid: int = self.pstree[0].pid
        self._mms: dict[int, MmEntry] = {}
        self._cores: dict[int, CoreEntry] = {}
        for proc in self.pstree:
            mm_img = path / names.mm(proc.pid)
            if mm_img.exists():
                mm: MmEntry = _load_one(mm_img, "MM")
                legacy = path / names.vmas(proc.pid)  # VMAs before they moved into mm_entry
                if not mm.vmas and legacy.exists():
                    mm.vmas = _load(legacy, "VMAS")
                self._mms[proc.pid] = mm
            for tid in proc.threads or [proc.pid]:
                self._cores[tid] = _load_one(path / names.core(tid), "CORE")
        self._fds = FdState(path, self.pstree, self._cores)
        self.files: dict[int, FileEntry] = self._fds.files
        self.page_size = self._page_size()
        self._pagemaps: dict[Path, Pagemap] = {}
        self._runs: dict[int, list[PageRun]] = {}
        self._shmem_runs: dict[int, list[PageRun]] = {}
        for proc in self.pstree:
            if (path / names.pagemap(proc.pid)).exists():
                self._runs[proc.pid] = self._resolve_task(proc.pid)

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> ImageDir:
        """Parse and validate the directory, its parent chain and every pagemap."""
        where = Path(path)
        if not where.is_dir():
            raise ImageError(where, "not an image directory")
        return cls(where)

    def _page_size(self) -> int:
        mm = self._mms.get(self.root_pid)
        value = mm.auxv(AT_PAGESZ) if mm is not None else None
        if value is None:
            return DEFAULT_PAGE_SIZE
        if value < 4096 or value & (value - 1):
            where = self.path / names.mm(self.root_pid)
            raise ImageError(where, f"AT_PAGESZ {value} is not a power of two >= 4096")
        return value

    # ---------------------------------------------------------------------------------------
    # lookups

    def file(self, name: str) -> Path:
        """The path of file ``name`` of this directory (a ``formats.names`` name: an image,
        or one of applier's sidecars, ``names.TRACKING`` and ``names.UNDO_SCOPE``)."""
        return self.path / name

    def has(self, name: str) -> bool:
        """Whether this directory holds file ``name``."""
        return (self.path / name).exists()

    def mm(self, pid: int) -> MmEntry:
        """The mm image of process ``pid``."""
        try:
            return self._mms[pid]
        except KeyError:
            raise ImageError(self.path / names.mm(pid), "no mm image for this pid") from None

    def core(self, tid: int) -> CoreEntry:
        """The core image of thread ``tid``: registers, and the signal state (``tc`` of the
        leader: sigactions, blocked mask, shared pending queue, timers; ``thread_core`` of every
        thread: its blocked mask and private pending queue)."""
        try:
            return self._cores[tid]
        except KeyError:
            raise ImageError(self.path / names.core(tid), "no core image for this tid") from None

    def ids(self, pid: int) -> TaskKobjIdsEntry:
        """The kernel-object ids of process ``pid`` (ids-<pid>.img, else legacy core ids)."""
        return self._fds.ids(pid)

    def fdinfo(self, pid: int) -> list[FdinfoEntry]:
        """The descriptors of process ``pid`` (``fdinfo-<files_id>.img``); each ``id`` is a key
        of :attr:`files`."""
        return self._fds.fdinfo(pid)

    def fs(self, pid: int) -> FsEntry:
        """cwd/root file ids and umask of process ``pid`` (fs-<pid>.img)."""
        return self._fds.fs(pid)

    def pipe_data(self, pipe_id: int) -> bytes:
        """The bytes queued in pipe ``pipe_id`` (pipes-data.img; empty if it has no entry)."""
        return self._fds.pipe_data(pipe_id)

    def pipe_data_entry(self, pipe_id: int) -> PipeDataEntry | None:
        """The pipes-data.img entry of ``pipe_id`` (buffer ``size``, ``extra``), if any."""
        return self._fds.pipe_data_entry(pipe_id)

    def memfd_inode(self, inode_id: int) -> MemfdInodeEntry:
        """The memfd.img entry that a MEMFD file's ``inode_id`` names."""
        return self._fds.memfd_inode(inode_id)

    def _file_name(self, file_id: int) -> str | None:
        entry = self.files.get(file_id)
        return entry.reg.name if entry is not None and entry.reg is not None else None

    def exe_path(self, pid: int) -> str | None:
        """Path of the executable (``mm.exe_file_id`` in files.img)."""
        return self._file_name(self.mm(pid).exe_file_id)

    def vma_path(self, pid: int, vma: VmaEntry) -> str | None:
        """Path of the file behind a file-backed VMA (``vma.shmid`` is its files.img id)."""
        del pid  # file ids are dump-wide; kept for symmetry with the other per-process lookups
        if vma.status & (VmaStatus.FILE_PRIVATE | VmaStatus.FILE_SHARED):
            return self._file_name(vma.shmid)
        return None

    def pagemap(self, pid: int) -> Pagemap:
        """The top-level (unresolved) pagemap of ``pid``: per-run flags for reporting."""
        return self._pagemap(self.path / names.pagemap(pid))

    def page_runs(self, pid: int) -> list[PageRun]:
        """Resolved page runs of ``pid``, sorted and non-overlapping."""
        runs = self._runs.get(pid)
        if runs is None:
            raise ImageError(self.path / names.pagemap(pid), "no pagemap for this pid")
        return runs

    def shmem_page_runs(self, shmid: int) -> list[PageRun]:
        """Resolved runs of ``pagemap-shmem-<shmid>.img`` (vaddr = offset in the object)."""
        runs = self._shmem_runs.get(shmid)
        if runs is None:
            name = names.pagemap_shmem(shmid)
            top = self._pagemap(self.path / name)
            runs = resolve_runs(top, self._parent_loader(name))
            self._shmem_runs[shmid] = runs
        return runs

    def close(self) -> None:
        """Unmap every pages file."""
        for pm in self._pagemaps.values():
            if pm.pages is not None:
                pm.pages.close()

    def __enter__(self) -> ImageDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------------------------------
    # pagemaps and the parent chain

    def _pagemap(self, path: Path) -> Pagemap:
        key = Path(os.path.realpath(path))
        pm = self._pagemaps.get(key)
        if pm is None:
            if not path.exists():
                raise ImageError(path, "pagemap image is missing")
            pm = load_pagemap(path, self.page_size)
            self._pagemaps[key] = pm
        return pm

    def _resolve_task(self, pid: int) -> list[PageRun]:
        name = names.pagemap(pid)
        top = self._pagemap(self.path / name)
        mm = self._mms.get(pid)
        if mm is None:
            raise ImageError(self.path / names.mm(pid), "pagemap without mm image")
        check_within_vmas(top, mm.vmas, names.mm(pid))
        return resolve_runs(top, self._parent_loader(name))

    def _parent_loader(self, name: str) -> Callable[[Pagemap], Pagemap]:
        seen = {os.path.realpath(self.path)}

        def parent_of(child: Pagemap) -> Pagemap:
            link = child.path.parent / names.PARENT
            if not link.exists():
                raise ImageError(
                    child.path, "PE_PARENT entries but the directory has no (valid) parent link"
                )
            real = os.path.realpath(link)
            if real in seen:
                raise ImageError(link, f"parent chain loops back to {real}")
            seen.add(real)
            parent_dir = Path(real)  # name parent files by where they are, not via the links
            inventory = parent_dir / names.INVENTORY
            if inventory.exists():
                _check_inventory(inventory, _load_one(inventory, "INVENTORY"), top=False)
            pm_path = parent_dir / name
            if not pm_path.exists():
                raise ImageError(pm_path, f"missing: the PE_PARENT entries of {child.path} need it")
            return self._pagemap(pm_path)

        return parent_of

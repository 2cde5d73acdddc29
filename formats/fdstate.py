"""The descriptor side of an image directory: ``files.img``, every task's ``ids-<pid>.img``,
``fdinfo-<files_id>.img`` and ``fs-<pid>.img``, ``pipes-data.img`` and ``memfd.img``, read and
cross-checked the way CRIU's restore relies on them (criu/files.c ``collect_one_file`` and
``find_file_desc``, criu/pipes.c, criu/memfd.c, criu/cr-restore.c).

Checks, each an :class:`~formats.errors.ImageError` naming the file and the entry (and its byte
offset): a files.img id given twice; a modelled kind whose sub-message is missing or carries
another id (CRIU: "ID mismatch"); a memfd whose inode is not in memfd.img; an fdinfo entry naming
a file id that files.img lacks, or of another type than that file, or a descriptor number given
twice; cwd/root ids of fs-<pid>.img that files.img lacks; pipes-data for a pipe no PIPE file has,
or twice for one pipe.  A short extra payload in pipes-data is caught by the framing
(:mod:`formats.imagefile`).  Images that are absent are not required: lookups of them fail.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from formats import names
from formats.core import CoreEntry
from formats.errors import ImageError
from formats.fdkinds import MemfdInodeEntry, PipeDataEntry
from formats.files import FD_TYPES, FdinfoEntry, FileEntry, FsEntry
from formats.imagefile import load_image_located
from formats.inventory import PstreeEntry, TaskKobjIdsEntry

__all__ = ["FdState"]


def _load(path: Path, magic: str) -> tuple[list[Any], list[int]]:
    name, entries, offsets = load_image_located(path)
    if name != magic:
        raise ImageError(path, f"expected a {magic} image, found {name}", offset=0)
    return entries, offsets


def _load_one(path: Path, magic: str) -> Any:
    entries, _ = _load(path, magic)
    if not entries:
        raise ImageError(path, f"{magic} image has no entry", offset=0)
    return entries[0]  # CRIU reads only the first entry of single-entry images


class FdState:
    """Files, descriptor tables, fs and pipe contents of one image directory, validated."""

    def __init__(self, path: Path, pstree: list[PstreeEntry], cores: dict[int, CoreEntry]) -> None:
        self.path = path
        self.files: dict[int, FileEntry] = {}
        self._memfd_inodes: dict[int, MemfdInodeEntry] = {}
        self._ids: dict[int, TaskKobjIdsEntry] = {}
        self._fdinfo: dict[int, list[FdinfoEntry]] = {}  # by files_id
        self._fs: dict[int, FsEntry] = {}
        self._pipe_data: dict[int, PipeDataEntry] = {}
        self._load_memfd_inodes()
        self._load_files()
        for proc in pstree:
            self._load_task(proc.pid, cores.get(proc.pid))
        self._load_pipe_data()

    # ---------------------------------------------------------------------------------------
    # loading and checks

    def _load_memfd_inodes(self) -> None:
        path = self.path / names.MEMFD
        if not path.exists():
            return
        entries, offsets = _load(path, "MEMFD_INODE")
        for index, (inode, at) in enumerate(zip(entries, offsets, strict=True)):
            if inode.inode_id in self._memfd_inodes:
                raise ImageError(path, f"memfd inode_id {inode.inode_id} given twice", offset=at,
                                 entry=index)  # fmt: skip
            self._memfd_inodes[inode.inode_id] = inode

    def _load_files(self) -> None:
        path = self.path / names.FILES
        if not path.exists():
            return
        entries, offsets = _load(path, "FILES")
        for index, (entry, at) in enumerate(zip(entries, offsets, strict=True)):
            self._check_file(path, entry, index, at)
            self.files[entry.id] = entry

    def _check_file(self, path: Path, entry: FileEntry, index: int, at: int) -> None:
        def fail(message: str) -> ImageError:
            return ImageError(path, f"file id {entry.id}: {message}", offset=at, entry=index)

        if entry.id in self.files:
            raise fail("given twice")
        kind = entry.kind_entry()
        if kind is None:
            if entry.kind_modelled:
                raise fail(f"type {entry.type_name} but no {entry.type_name} message")
            return  # a kind not modelled here: kept as unknown fields
        if kind.id != entry.id:
            raise fail(f"its {entry.type_name} message says id {kind.id} (ID mismatch)")
        if entry.memfd is not None and entry.memfd.inode_id not in self._memfd_inodes:
            raise fail(f"memfd inode_id {entry.memfd.inode_id} is not in memfd.img")

    def _load_task(self, pid: int, core: CoreEntry | None) -> None:
        ids_img = self.path / names.ids(pid)
        if ids_img.exists():
            self._ids[pid] = _load_one(ids_img, "IDS")
        elif core is not None and core.ids is not None:
            self._ids[pid] = core.ids  # dumps before ids-<pid>.img (legacy core_entry.ids)
        ids = self._ids.get(pid)
        if ids is not None and ids.files_id not in self._fdinfo:
            fdinfo_img = self.path / names.fdinfo(ids.files_id)
            if fdinfo_img.exists():
                self._fdinfo[ids.files_id] = self._load_fdinfo(fdinfo_img)
        fs_img = self.path / names.fs(pid)
        if fs_img.exists():
            entries, offsets = _load(fs_img, "FS")
            if not entries:
                raise ImageError(fs_img, "FS image has no entry", offset=0)
            fs: FsEntry = entries[0]
            for what, file_id in (("cwd_id", fs.cwd_id), ("root_id", fs.root_id)):
                if file_id not in self.files:
                    raise ImageError(fs_img, f"{what} {file_id} is not in files.img",
                                     offset=offsets[0], entry=0)  # fmt: skip
            self._fs[pid] = fs

    def _load_fdinfo(self, path: Path) -> list[FdinfoEntry]:
        entries, offsets = _load(path, "FDINFO")
        seen: set[int] = set()
        for index, (fdi, at) in enumerate(zip(entries, offsets, strict=True)):
            where = {"offset": at, "entry": index}
            target = self.files.get(fdi.id)
            if target is None:
                raise ImageError(path, f"fd {fdi.fd} names file id {fdi.id}, which files.img "
                                 "lacks", **where)  # fmt: skip
            if target.type != fdi.type:
                raise ImageError(
                    path,
                    f"fd {fdi.fd} is of type {FD_TYPES.get(fdi.type, fdi.type)} but file id "
                    f"{fdi.id} is {target.type_name}",
                    **where,
                )
            if fdi.fd in seen:
                raise ImageError(path, f"fd {fdi.fd} given twice", **where)
            seen.add(fdi.fd)
        return entries

    def _load_pipe_data(self) -> None:
        path = self.path / names.PIPES_DATA
        if not path.exists():
            return
        pipes = {f.pipe.pipe_id for f in self.files.values() if f.pipe is not None}
        entries, offsets = _load(path, "PIPES_DATA")
        for index, (data, at) in enumerate(zip(entries, offsets, strict=True)):
            if data.pipe_id not in pipes:
                raise ImageError(path, f"data for pipe_id {data.pipe_id}, which no PIPE file in "
                                 "files.img has", offset=at, entry=index)  # fmt: skip
            if data.pipe_id in self._pipe_data:
                raise ImageError(path, f"pipe_id {data.pipe_id} given twice", offset=at,
                                 entry=index)  # fmt: skip
            self._pipe_data[data.pipe_id] = data

    # ---------------------------------------------------------------------------------------
    # lookups

    def ids(self, pid: int) -> TaskKobjIdsEntry:
        """ids-<pid>.img (or the legacy ``core_entry.ids``) of process ``pid``."""
        try:
            return self._ids[pid]
        except KeyError:
            raise ImageError(self.path / names.ids(pid), "no ids image for this pid") from None

    def fdinfo(self, pid: int) -> list[FdinfoEntry]:
        """The descriptor table of process ``pid``: ``fdinfo-<files_id>.img``, in file order."""
        files_id = self.ids(pid).files_id
        try:
            return self._fdinfo[files_id]
        except KeyError:
            raise ImageError(self.path / names.fdinfo(files_id), "no fdinfo image") from None

    def fs(self, pid: int) -> FsEntry:
        """fs-<pid>.img: cwd and root (files.img ids) and umask."""
        try:
            return self._fs[pid]
        except KeyError:
            raise ImageError(self.path / names.fs(pid), "no fs image for this pid") from None

    def pipe_data(self, pipe_id: int) -> bytes:
        """The bytes queued in pipe ``pipe_id`` (empty for a pipe without a pipes-data entry)."""
        found = self._pipe_data.get(pipe_id)
        if found is not None:
            return found.extra
        if any(f.pipe is not None and f.pipe.pipe_id == pipe_id for f in self.files.values()):
            return b""
        raise ImageError(self.path / names.FILES, f"no pipe with pipe_id {pipe_id}")

    def pipe_data_entry(self, pipe_id: int) -> PipeDataEntry | None:
        """The pipes-data entry of ``pipe_id`` (with the pipe's buffer ``size``), if any."""
        return self._pipe_data.get(pipe_id)

    def memfd_inode(self, inode_id: int) -> MemfdInodeEntry:
        """The memfd.img entry a MEMFD file names by ``inode_id``."""
        try:
            return self._memfd_inodes[inode_id]
        except KeyError:
            raise ImageError(self.path / names.MEMFD, f"no memfd inode {inode_id}") from None

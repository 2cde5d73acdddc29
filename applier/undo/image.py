"""The undo image: what an apply overwrote, as a CRIU image directory (``apply --undo DIR``).

``applier apply IMAGE --into PID --undo DIR`` leaves in DIR an image of the target as it was
just before the apply, restricted to what the apply touched, so that ``applier apply DIR
--into PID`` later puts the target back. It is a normal image directory, written with
``formats.imagewriter.ImageWriter`` (``crit decode`` and ``ImageDir.open`` accept it):

* ``inventory.img``, ``pstree.img``, ``files.img``;
* ``core-<tid>.img`` per thread: the registers before the apply;
* ``mm-<pid>.img``: the whole layout before the apply (every VMA, built by
  ``applier.capture.task_entries`` like a dump), the mm fields and the program break;
* ``pagemap-<pid>.img`` + ``pages-1.img``: the contents before the apply of every private page
  the apply wrote, discarded (MADV_DONTNEED) or unmapped, taken from the undo log's records
  and its spool (oldest record first: that one holds what was there before the apply);
* ``pagemap-shmem-<inode>.img``: the same for shared memory the apply wrote.

A normal image speaks for every page: a page of a private VMA absent from its pagemap is zero
(anonymous) or the file's. An undo image holds only the pages the apply touched; applied as a
normal image it would zero everything else. So next to the images, ``applier-undo.json``
(``UNDO_FILE``; CRIU ignores files it does not know) names the *scope*: the address ranges
the pagemap speaks for, plus the parts the apply restored and the pid. ``applier.api`` reads
it and passes the scope to the planner (``make_plan(..., scope=...)``), which then writes and
discards pages inside the scope only; a page inside the scope but absent from the pagemap was
not present before the apply (never touched, or the file's own page) and is discarded. The
parts are limited to those the apply changed: an apply of memory only is undone in memory
only. Layout, break and registers are those of the moment before the apply.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import attrs
import numpy as np
import numpy.typing as npt

from applier.capture import TaskEntries, task_entries
from applier.errors import OutputDirError
from applier.limits import CHUNK_PAGES
from applier.model import LiveTask
from applier.parts import Part
from applier.ranges import covered, intervals, member, page_ranges
from applier.trust import uptime_us
from applier.undo.log import SavedRange, UndoLog
from formats import names
from formats.errors import ImageError
from formats.imagewriter import ImageWriter, PageData
from formats.mm import VmaEntry
from formats.mm import VmaStatus as S
from formats.pagemap import PE_PRESENT
from injector.process import Process

__all__ = [
    "UNDO_FILE",
    "Before",
    "UndoDirNotEmpty",
    "UndoImageStats",
    "UndoImageWriter",
    "UndoScope",
    "capture",
    "check_undo_dir",
    "load_scope",
    "write_undo_image",
]

UNDO_FILE = names.UNDO_SCOPE
FORMAT = "applier-undo/1"


@attrs.frozen
class UndoScope:
    """``applier-undo.json``: which task, which parts, which address ranges an undo image
    speaks for."""

    pid: int
    parts: tuple[str, ...]
    ranges: tuple[tuple[int, int], ...]  # sorted, coalesced [start, end)
    page_size: int = 4096
    outcome: str = "applied"  # or "rollback-failed": the apply failed half-way
    image: str | None = None  # the image the apply wrote

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": FORMAT,
                "pid": self.pid,
                "parts": list(self.parts),
                "page_size": self.page_size,
                "outcome": self.outcome,
                "image": self.image,
                "scope": [[f"{a:#x}", f"{b:#x}"] for a, b in self.ranges],
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str) -> UndoScope:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"not an {FORMAT} file")
        ranges = tuple((int(a, 16), int(b, 16)) for a, b in data["scope"])
        if any(a >= b for a, b in ranges):
            raise ValueError("empty or inverted scope range")
        return cls(
            pid=int(data["pid"]),
            parts=tuple(str(p) for p in data["parts"]),
            ranges=ranges,
            page_size=int(data.get("page_size", 4096)),
            outcome=str(data.get("outcome", "applied")),
            image=data.get("image"),
        )


def load_scope(image_dir: Path) -> UndoScope | None:
    """The scope of an undo image, or None for a normal image (no ``UNDO_FILE``)."""
    path = image_dir / UNDO_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ImageError(path, f"cannot read: {exc.strerror}") from exc
    try:
        return UndoScope.from_json(text)
    except (ValueError, KeyError, TypeError) as exc:
        raise ImageError(path, f"malformed undo scope: {exc}") from exc


class UndoDirNotEmpty(OutputDirError, FileExistsError):
    """``--undo DIR`` names a directory that holds something already (a usage error)."""


def check_undo_dir(directory: Path) -> None:
    """Refuse a DIR that already holds something (an older undo image must not be lost)."""
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise UndoDirNotEmpty(f"undo directory {directory} is not empty")


@attrs.frozen
class Before:
    """The target just before an apply, all but page contents (read while it is stopped)."""

    task: TaskEntries
    parts: tuple[str, ...]
    image: str | None
    # Pages present before the apply and, of those, the process's own (anonymous) copies;
    # None when not known exactly (a dirty tracker's page list stood in for the pagemap):
    # then every saved page is kept.
    present: npt.NDArray[np.uint64] | None
    anon: npt.NDArray[np.uint64] | None


def capture(
    process: Process,
    live: LiveTask,
    parts: Part,
    *,
    exact_presence: bool,
    image: str | None = None,
) -> Before:
    """Read what the undo image needs besides pages: layout, mm fields, registers, files."""
    task = task_entries(process, process.maps())
    return Before(
        task=task,
        # The undo image holds no descriptor state: it speaks for the other parts only.
        parts=(parts & ~Part.FDS).labels(),
        image=image,
        present=np.asarray(live.present, dtype=np.uint64) if exact_presence else None,
        anon=np.asarray(live.anon, dtype=np.uint64) if exact_presence else None,
    )


@attrs.frozen
class UndoImageStats:
    path: Path
    pages: int  # pages the undo image holds
    scope_pages: int  # pages it speaks for (held, or to be discarded)
    shared_pages: int
    seconds: float = 0.0


def _saved_arrays(
    log: UndoLog,
) -> Iterator[tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64], npt.NDArray[np.uint64]]]:
    """(addresses, lengths, spool offsets) of every saved range of the log, oldest record
    first, whichever representation the executor used for a record."""
    for rec in log.records:
        found = rec.spooled()
        if found is not None:
            yield found


def _pages_of(
    addr: npt.NDArray[np.uint64],
    length: npt.NDArray[np.uint64],
    offset: npt.NDArray[np.uint64],
    page: int,
) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64]]:
    """Ranges -> (address, spool offset) of each of their pages."""
    if np.any(addr % np.uint64(page)) or np.any(length % np.uint64(page)):
        raise ValueError("the undo log holds ranges that are not page-aligned")
    counts = (length // np.uint64(page)).astype(np.int64)
    total = int(counts.sum())
    firsts = np.repeat(np.cumsum(counts) - counts, counts)
    within = (np.arange(total, dtype=np.int64) - firsts).astype(np.uint64) * np.uint64(page)
    return np.repeat(addr, counts) + within, np.repeat(offset, counts) + within


def _first_saved(log: UndoLog, page: int) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64]]:
    """(page addresses, spool offsets), sorted by address: for a page saved more than once,
    the oldest copy, which is what the page held before the apply."""
    addrs: list[npt.NDArray[np.uint64]] = []
    offsets: list[npt.NDArray[np.uint64]] = []
    for addr, length, offset in _saved_arrays(log):
        a, o = _pages_of(
            np.asarray(addr, dtype=np.uint64),
            np.asarray(length, dtype=np.uint64),
            np.asarray(offset, dtype=np.uint64),
            page,
        )
        addrs.append(a)
        offsets.append(o)
    if not addrs:
        empty = np.zeros(0, dtype=np.uint64)
        return empty, empty
    a, o = np.concatenate(addrs), np.concatenate(offsets)
    uniq, first = np.unique(a, return_index=True)  # index of the first (oldest) occurrence
    return uniq, o[first]


def _spans(vmas: Iterable[VmaEntry], want: int, without: int = 0) -> list[tuple[int, int]]:
    """Merged [start, end) of the VMAs with a ``want`` status bit and no ``without`` bit."""
    out: list[tuple[int, int]] = []
    for v in sorted(vmas, key=lambda v: v.start):
        if v.is_guard or not v.status & want or v.status & without:
            continue
        if out and v.start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], v.end))
        else:
            out.append((v.start, v.end))
    return out


def _page_data(
    log: UndoLog,
    keys: npt.NDArray[np.uint64],
    offsets: npt.NDArray[np.uint64],
    page: int,
) -> Iterator[PageData]:
    """Runs of consecutive pages of ``keys`` with their bytes, read back from the spool in
    batches of CHUNK_PAGES pages (one read per stretch of consecutive spool offsets)."""
    n = len(keys)
    breaks = np.flatnonzero(np.diff(keys) != np.uint64(page)) + 1  # where a new run starts
    for lo in range(0, n, CHUNK_PAGES):
        hi = min(lo + CHUNK_PAGES, n)
        pieces = _spool_pieces(offsets[lo:hi], 0, page)
        data = b"".join(chunk for _, chunk in log.iter_saved(pieces))
        inner = breaks[(breaks > lo) & (breaks < hi)].tolist()
        for a, b in itertools.pairwise([lo, *inner, hi]):
            yield int(keys[a]), b - a, PE_PRESENT, data[(a - lo) * page : (b - lo) * page]


def _spool_pieces(offsets: npt.NDArray[np.uint64], addr: int, page: int) -> tuple[SavedRange, ...]:
    """Consecutive pages as few spool reads as their spool offsets allow."""
    breaks = np.nonzero(np.diff(offsets) != page)[0]
    firsts = np.concatenate(([0], breaks + 1))
    lasts = np.concatenate((breaks, [len(offsets) - 1]))
    return tuple(
        SavedRange(addr + f * page, (e - f + 1) * page, int(offsets[f]))
        for f, e in zip(firsts.tolist(), lasts.tolist(), strict=True)
    )


def write_undo_image(
    directory: Path,
    before: Before,
    log: UndoLog,
    page: int,
    *,
    outcome: str = "applied",
) -> UndoImageStats:
    """Write the undo image of an apply whose undo log is ``log`` into ``directory``.

    The log's records and spool are only read; call this after a successful apply, or after
    one that failed and could not be rolled back (its records are then all still there).
    """
    addrs, offsets = _first_saved(log, page)
    vmas = before.task.mm.vmas
    # Private memory: the task pagemap. The vDSO and VVAR are never written by an apply.
    private = _spans(vmas, S.ANON_PRIVATE | S.FILE_PRIVATE, S.VDSO | S.VVAR)
    in_private = covered(addrs, *intervals(private))
    scope_pages = addrs[in_private]
    keep = in_private.copy()
    if before.present is not None and before.anon is not None:
        # Pages that were not present (zero), or a private file mapping's own file pages:
        # left out, so applying the undo image discards them again (the scope covers them).
        files = covered(addrs, *intervals(_spans(vmas, S.FILE_PRIVATE)))
        was = np.where(files, member(addrs, before.anon), member(addrs, before.present))
        keep &= was
    task_keys, task_offs = addrs[keep], offsets[keep]

    writer = ImageWriter(directory, page_size=page)
    for entry in before.task.files:
        writer.add_file(entry)
    writer.add_process(
        before.task.proc,
        mm=before.task.mm,
        cores=before.task.cores,
        runs=_page_data(log, task_keys, task_offs, page),
    )
    shared_pages = 0
    for shmid, keys, offs in _shared(vmas, addrs, offsets):
        writer.write_shmem_pagemap(shmid, _page_data(log, keys, offs, page))
        shared_pages += len(keys)
    scope = UndoScope(
        pid=int(before.task.proc.pid),
        parts=before.parts,
        ranges=page_ranges(scope_pages, page),
        page_size=page,
        outcome=outcome,
        image=before.image,
    )
    # The scope before inventory.img (written by finish): at no moment does the directory
    # look like a complete normal image, which would zero every page outside the scope.
    (directory / UNDO_FILE).write_text(scope.to_json() + "\n")
    writer.finish(dump_uptime=uptime_us())
    return UndoImageStats(directory, len(task_keys), len(scope_pages), shared_pages)


def _shared(
    vmas: Sequence[VmaEntry],
    addrs: npt.NDArray[np.uint64],
    offsets: npt.NDArray[np.uint64],
) -> Iterator[tuple[int, npt.NDArray[np.uint64], npt.NDArray[np.uint64]]]:
    """Per shmem object (VMA_ANON_SHARED, ``shmid`` = inode): (shmid, object offsets, spool
    offsets) of the saved pages seen through its mappings, each offset once."""
    objects: dict[int, tuple[list[npt.NDArray[np.uint64]], list[npt.NDArray[np.uint64]]]] = {}
    for v in vmas:
        if v.is_guard or not v.status & S.ANON_SHARED or not v.shmid:
            continue
        sel = (addrs >= np.uint64(v.start)) & (addrs < np.uint64(v.end))
        if not sel.any():
            continue
        keys, offs = objects.setdefault(int(v.shmid), ([], []))
        keys.append(addrs[sel] - np.uint64(v.start) + np.uint64(v.pgoff))
        offs.append(offsets[sel])
    for shmid, (keys, offs) in sorted(objects.items()):
        k, o = np.concatenate(keys), np.concatenate(offs)
        uniq, first = np.unique(k, return_index=True)
        yield shmid, uniq, o[first]


@attrs.define
class UndoImageWriter:
    """Writes the undo image of one apply into ``path`` when the executor asks (its
    ``UndoKeeper``); on failure removes what was written of it, so DIR is empty again."""

    path: Path
    before: Before
    log: UndoLog
    page: int

    @property
    def where(self) -> str:
        return str(self.path)

    def write(self, outcome: str) -> UndoImageStats:
        started = time.perf_counter()
        try:
            kept = write_undo_image(self.path, self.before, self.log, self.page, outcome=outcome)
        except BaseException:
            for f in self.path.iterdir():  # the directory was empty before (check_undo_dir)
                with contextlib.suppress(OSError):
                    f.unlink()
            raise
        return attrs.evolve(kept, seconds=time.perf_counter() - started)

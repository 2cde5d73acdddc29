"""``applier dump``: checkpoint a live process into a CRIU image directory.

What is written follows CRIU's own dump (criu/mem.c ``generate_vma_iovs``, criu/proc_parse.c)
for the images applying needs: inventory, pstree, mm (VMAs, mm fields, auxv), one core per
thread (general-purpose and FPU/xsave registers), files.img for the executable and every
mapped file, and the pagemap with its pages file. Pages are selected as CRIU selects them:
present pages of private anonymous VMAs (PE_PRESENT|PE_LAZY), copied-on-write pages of private
file VMAs (PE_PRESENT), the whole vDSO; never VVAR, never shared mappings. Page data streams
from the target to the pages file in chunks, so dumping 1 GiB needs a few MiB of memory.

The signal state goes where CRIU 4.2 keeps it (criu/cr-dump.c, criu/parasite-syscall.c): in
the leader's ``core.tc`` the 62 ``sigactions`` (injected ``rt_sigaction``), the leader's
blocked mask ``blk_sigset``, the interval timers ``timers`` (injected ``getitimer``) and the
shared pending queue ``signals_s``; in every other thread's ``thread_core`` its blocked mask
``blk_sigset`` (PTRACE_GETSIGMASK); in every thread's its private queue ``signals_p``
(PTRACE_PEEKSIGINFO, nothing dequeued).

The process is stopped (every thread) for the duration of the dump and detached at the end.
Descriptors are recorded as CRIU 4.2 records them (``applier.fds``: ids, fdinfo, fs, the file
objects in files.img, pipes-data, memfd), and the signal state CRIU keeps in core
(dispositions, blocked masks, itimers, pending queues); namespaces are not dumped, nor TCP
stream state or socket queues: an image written here is for ``applier apply``, not for
``criu restore``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import numpy.typing as npt

from applier.capture import dump_selection, region_from_mapping, task_entries
from applier.errors import MismatchError, OutputDirError, TargetBusy
from applier.fds import fd_entries
from applier.holder import (
    CallerKeeper,
    HolderKeeper,
    Keeper,
    checkpointed,
    new_token,
    reuse,
    set_baseline,
)
from applier.holder import resume as resume_held
from applier.limits import CHUNK_PAGES
from applier.lock import TargetLock
from applier.model import Kind
from applier.progress import Progress
from applier.ranges import align_up, intervals, joined
from applier.trackfile import drop_tracking, load_tracking, save_tracking
from applier.trust import check_target_allowed, uptime_us
from formats import names
from formats.imagedir import ImageDir
from formats.imagewriter import ImageWriter, PageData
from formats.mm import VmaEntry
from formats.mm import VmaStatus as S
from formats.pagemap import PE_LAZY, PE_PARENT, PE_PRESENT
from injector import attach
from injector.maps import Mapping
from injector.memory import aligned_buffer, buffer_address
from injector.process import Process
from injector.tracking import (
    DirtyTracker,
    TrackerState,
    TrackingError,
    UffdWpTracker,
    open_tracker,
)

__all__ = [
    "DumpStats",
    "dump",
    "dump_layer",
    "dump_process",
    "dump_tracked",
    "prepare_output_dir",
]

logger = logging.getLogger(__name__)

U64 = npt.NDArray[np.uint64]


@attrs.define
class DumpStats:
    pid: int = 0
    threads: int = 0
    vmas: int = 0
    pages: int = 0
    parent_pages: int = 0  # incremental dumps: pages left to the parent (PE_PARENT)
    seconds: float = 0.0
    tracking: str | None = None  # tracker backend left running, if any
    tracking_note: str | None = None  # why tracking was not started
    holder: int | None = None  # pid of the process that keeps the tracker's userfaultfd
    tracking_reused: bool = False  # the tracker already ran (a new baseline, no new one)
    fds: int = 0  # descriptors written to fdinfo-<files_id>.img
    fds_skipped: list[str] = attrs.field(factory=list)  # kinds CRIU's formats here lack

    def as_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


def _runs(sel: npt.NDArray[np.bool_], hole: npt.NDArray[np.bool_]) -> list[tuple[int, int, bool]]:
    """(first index, count, is a hole) of the selected pages, in order: consecutive selected
    pages of the same kind (hole or data) form one run. Found with numpy alone (1M pages
    with 2,621 written among parent holes: 1.0 ms, against 9.0 for a loop over the edges)."""
    kind = sel.astype(np.int8)
    kind += sel & hole
    if not kind.any():
        return []
    padded = np.zeros(len(kind) + 2, dtype=np.int8)
    padded[1:-1] = kind
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    starts, counts = edges[:-1], np.diff(edges)
    kinds = kind[starts]
    keep = kinds != 0
    return list(
        zip(
            starts[keep].tolist(),
            counts[keep].tolist(),
            (kinds[keep] == 2).tolist(),
            strict=True,
        )
    )


def dump(
    pid: int,
    image_dir: str | os.PathLike[str],
    *,
    page_size: int = 4096,
    track: bool = False,
    parent: str | os.PathLike[str] | None = None,
    progress: bool = False,
    force: bool = False,
) -> DumpStats:
    """Checkpoint ``pid`` (all threads) into ``image_dir`` (created; must be empty if it exists).

    ``track``: also start dirty-page tracking in the target at the moment of the checkpoint
    (userfaultfd write-protect, or soft-dirty where the kernel has it) and record its state
    in ``names.TRACKING``, so ``apply --only-dirty`` writes only the pages written since. The
    userfaultfd is not left in the target: a holder process keeps it (``applier.holder``;
    ``stats.holder``, ended by ``applier untrack`` / ``holder.stop``); a holder already
    running for the target is reused, with the new baseline. :func:`dump_tracked` keeps it
    in the calling process instead.

    ``parent``: an incremental dump on top of a tracked checkpoint of the same process (CRIU's
    ``--prev-images-dir``): pages the tracker saw written since, or that the parent chain does
    not hold, are stored; every other page is a ``PE_PARENT`` hole. The tracker moves on to
    this image (its state file leaves the parent), so tracking continues from here.

    ``progress``: show a progress bar on stderr while pages are copied (a terminal only).

    ``force``: also pid 1, applier itself and its ancestors (refused otherwise).
    """
    keeper = HolderKeeper()
    return _checked_dump(
        pid, Path(image_dir), page_size, track, parent, keeper=keeper, progress=progress,
        force=force,
    )  # fmt: skip


def dump_tracked(
    pid: int, image_dir: str | os.PathLike[str], *, force: bool = False
) -> tuple[DumpStats, DirtyTracker | None, bool]:
    """``dump(pid, image_dir, track=True)`` with the tracker kept in this process: (stats,
    tracker or None if tracking could not start, whether it is borrowed from a running
    holder). The caller moves it from session to session (``rebind``) and ends it with
    ``close()`` (own) or ``release()`` (borrowed: the holder's tracking goes on)."""
    keeper = CallerKeeper()
    stats = _checked_dump(pid, Path(image_dir), 4096, True, None, keeper=keeper, force=force)
    return stats, keeper.tracker, keeper.borrowed


def _checked_dump(
    pid: int,
    out: Path,
    page_size: int,
    track: bool,
    parent: str | os.PathLike[str] | None,
    *,
    keeper: Keeper,
    progress: bool = False,
    force: bool = False,
) -> DumpStats:
    check_target_allowed(pid, force=force)
    base = _Parent.load(Path(parent), pid) if parent is not None else None
    created = prepare_output_dir(out)
    try:
        with TargetLock.acquire(pid, "work", f"dumping into {out}"):
            return _dump(pid, out, page_size, track, base, progress=progress, keeper=keeper)
    except BaseException:
        if isinstance(keeper, HolderKeeper):
            keeper.abandon()
        elif isinstance(keeper, CallerKeeper) and keeper.tracker is not None:
            _drop_kept(keeper)
        # Leave nothing half-written behind: what was there before was an empty directory.
        if created:
            shutil.rmtree(out, ignore_errors=True)
        else:
            for child in out.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        raise


def prepare_output_dir(out: Path) -> bool:
    """Make sure ``out`` is an empty directory; returns whether it was created here."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputDirError(f"{out} is not empty")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputDirError(f"cannot create {out}: {exc.strerror}") from exc
    return created


@attrs.frozen
class _Parent:
    """What an incremental dump needs of its parent image: where it is, the tracker state it
    owns, and which page addresses its pagemap chain holds."""

    path: Path
    state: TrackerState | None  # None: the caller knows the pages written since
    starts: npt.NDArray[np.uint64]
    ends: npt.NDArray[np.uint64]

    @classmethod
    def pages_of(cls, path: Path, pid: int) -> _Parent:
        """The parent ``path`` without a tracker state (see :func:`dump_layer`)."""
        img = ImageDir.open(path)
        page = img.page_size
        starts, ends = intervals((r.vaddr, r.vaddr + r.nr_pages * page) for r in img.page_runs(pid))
        return cls(path, None, *joined(starts, ends))

    @classmethod
    def load(cls, path: Path, pid: int) -> _Parent:
        img = ImageDir.open(path)  # validated in full (and its own parents) before anything
        state = load_tracking(path)
        if state is None:
            raise MismatchError(
                f"{path}: no dirty tracking of pid {pid} to build on (dump the parent with "
                "--track, or take a full dump)",
            )
        if state.pid != pid:
            raise MismatchError(f"{path}: its tracker follows pid {state.pid}, not {pid}")
        page = img.page_size
        starts, ends = intervals((r.vaddr, r.vaddr + r.nr_pages * page) for r in img.page_runs(pid))
        return cls(path, state, *joined(starts, ends))


def dump_process(
    s: Process,
    out: Path,
    page_size: int = 4096,
    *,
    track: bool = False,
    base: _Parent | None = None,
    progress: bool = False,
    keeper: Keeper | None = None,
    written: npt.NDArray[np.uint64] | None = None,
) -> DumpStats:
    """Write the image of the stopped process ``s`` into ``out`` (an empty directory); see
    :func:`dump`. Works on any :class:`injector.process.Process` (tracking needs a real one).
    ``keeper`` takes a new tracker (``track``); without one, a holder is started here.

    ``written`` (with ``base``): the pages written since ``base``, known to the caller; the
    base's tracker is then neither resumed nor moved."""
    pid = s.pid
    stats = DumpStats(pid=pid)
    tracker = None
    changed = written
    if base is not None and written is None:
        if base.state is None:
            raise ValueError("an incremental dump needs a tracker state or the written pages")
        busy = checkpointed(pid)
        if busy is not None:
            raise TargetBusy(f"{busy}: an incremental dump would move its tracker's baseline")
        try:
            tracker = resume_held(s, base.state, base.path)
            changed = tracker.dirty_pages()
        except TrackingError as exc:
            raise MismatchError(
                f"{base.path}: the tracking of pid {pid} was lost since ({exc}); take a full dump",
            ) from exc
    maps = s.maps()
    task = task_entries(s, maps)
    proc, mm, cores, vmas = task.proc, task.mm, task.cores, task.mm.vmas
    link = os.path.relpath(base.path.resolve(), out.resolve()) if base else None
    writer = ImageWriter(out, page_size=page_size, parent=link)
    for entry in task.files:
        writer.add_file(entry)
    fds = fd_entries(s, len(task.files) + 1)
    for entry in fds.files:
        writer.add_file(entry)
    for data in fds.pipe_data:
        writer.add_pipe_data(data.pipe_id, data.extra, size=data.size)
    for memfd in fds.memfd_inodes:
        writer.add_memfd_inode(memfd)
    stats.fds = len(fds.fdinfo)
    stats.fds_skipped = fds.skipped
    holes = None
    if base is not None and changed is not None:
        holes = (changed, base.starts, base.ends)
    plan = _select(s, maps, vmas, page_size, holes)
    bar = Progress(plan.data_pages * page_size, progress, verb="dumping")
    writer.add_process(proc, mm=mm, cores=cores, ids=fds.ids, fs=fds.fs, fds=fds.fdinfo)
    writer.write_pagemap_filled(
        names.pagemap(proc.pid), _pagemap_runs(plan, stats), _reader(s, stats, bar, page_size)
    )
    bar.finish()
    for inode, windows in _shared_objects(maps).items():
        runs = _shared_data(s, inode, windows, page_size, stats)
        writer.write_shmem_pagemap(inode, runs)
    writer.finish(dump_uptime=uptime_us())
    if tracker is not None and base is not None:
        # The new image owns the baseline now; the parent's state must not be used again
        # (an apply --only-dirty of the parent would trust a baseline that has moved).
        tracker.reset()
        token = new_token()
        save_tracking(out, tracker.state(), baseline=token)
        drop_tracking(base.path)
        if isinstance(tracker, UffdWpTracker) and tracker.remote_fd < 0:
            stats.holder = set_baseline(pid, tracker.start_time, token, out.resolve()).holder
            stats.tracking_reused = True
        tracker.release()
        stats.tracking = tracker.backend_name
    elif track:
        own = keeper is None
        keeper = HolderKeeper() if keeper is None else keeper
        _start_tracking(s, out, stats, keeper)
        if own:
            _finish_keeping(keeper, out, stats)
    stats.threads = len(s.tids)
    stats.vmas = len(vmas)
    return stats


def dump_layer(
    s: Process, out: Path, parent: Path, written: npt.NDArray[np.uint64], page_size: int = 4096
) -> DumpStats:
    """An incremental image of the stopped ``s`` in ``out`` on top of ``parent`` (a dump of the
    same process), holding the present pages in ``written`` (sorted page addresses) and those
    the parent chain lacks; every other page is a ``PE_PARENT`` hole. Tracking is untouched."""
    started = time.perf_counter()
    prepare_output_dir(out)
    stats = dump_process(s, out, page_size, base=_Parent.pages_of(parent, s.pid), written=written)
    stats.seconds = time.perf_counter() - started
    return stats


def _dump(
    pid: int,
    out: Path,
    page_size: int,
    track: bool,
    base: _Parent | None = None,
    *,
    progress: bool = False,
    keeper: Keeper | None = None,
) -> DumpStats:
    started = time.perf_counter()
    with attach(pid) as s:
        stats = dump_process(
            s, out, page_size, track=track, base=base, progress=progress, keeper=keeper
        )
    stats.seconds = time.perf_counter() - started
    if track and keeper is not None and stats.tracking is not None:
        _finish_keeping(keeper, out, stats)
    logger.info(
        "dumped pid %d: %d pages, %d VMAs in %.1f ms",
        pid,
        stats.pages,
        stats.vmas,
        stats.seconds * 1e3,
    )
    return stats


def _shared_objects(maps: list[Mapping]) -> dict[int, list[Mapping]]:
    """Shared anonymous / memfd / SysV mappings by shmem inode (one object, several maps)."""
    out: dict[int, list[Mapping]] = {}
    for m in maps:
        if region_from_mapping(m).kind is Kind.SHARED_ANON and m.inode:
            out.setdefault(m.inode, []).append(m)
    return out


def _data_ranges(process: Process, m: Mapping, page: int) -> list[tuple[int, int]]:
    """Object offsets [start, end) inside ``m``'s window that hold data (not holes), found
    with SEEK_DATA/SEEK_HOLE on /proc/PID/map_files; the whole window if that is refused."""
    lo, hi = m.offset, m.offset + m.size
    try:
        fd = process.open_map_file(m.start, m.end)
    except OSError:
        return [(lo, hi)]
    out: list[tuple[int, int]] = []
    try:
        pos = lo
        while pos < hi:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break  # ENXIO: no data after pos
            if data >= hi:
                break
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), hi)
            out.append((data - data % page, align_up(hole, page)))
            pos = hole
    finally:
        os.close(fd)
    return out


def _shared_data(
    s: Process, inode: int, windows: list[Mapping], page: int, stats: DumpStats
) -> Iterator[PageData]:
    """pagemap-shmem runs of one object: vaddr = offset in the object, data read through the
    target's mapping. Offsets seen through several mappings are dumped once."""
    done: set[int] = set()
    buf = aligned_buffer(CHUNK_PAGES * page, np.uint8)  # one, reused: each run is a copy of it
    for m in windows:
        for a, b in _data_ranges(s, m, page):
            for off in range(a, b, CHUNK_PAGES * page):
                n = min(CHUNK_PAGES * page, b - off)
                if off in done:
                    continue
                done.add(off)
                s.read_into(m.start + (off - m.offset), buf[:n].data)
                stats.pages += n // page
                yield off, n // page, PE_PRESENT, buf[:n].tobytes()


Holes = tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64], npt.NDArray[np.uint64]]


@attrs.frozen
class _Selection:
    """The pages a dump stores: per mapping, (start, runs of (first index, count, is a
    PE_PARENT hole), PE_LAZY or 0 for its data runs), and the number of data pages."""

    mappings: list[tuple[int, list[tuple[int, int, bool]], int]]
    data_pages: int
    page: int


def _select(
    s: Process,
    maps: list[Mapping],
    vmas: list[VmaEntry],
    page: int,
    holes: Holes | None,
) -> _Selection:
    """Which pages the task pagemap holds, in address order (read from pagemap before any page
    is copied, so that the copy can show its progress). With ``holes`` = (pages written since
    the parent, parent chain starts, ends): a page neither written nor missing from the
    parent becomes a PE_PARENT hole (no data), as CRIU's incremental dumps do."""
    out: list[tuple[int, list[tuple[int, int, bool]], int]] = []
    data = 0
    for m, vma in zip(maps, vmas, strict=True):
        if not vma.has_pagemap or vma.status & S.VVAR:
            continue
        sel = dump_selection(s, m)
        lazy = PE_LAZY if vma.status & S.ANON_PRIVATE and not vma.status & S.VDSO else 0
        in_parent = np.zeros(len(sel), dtype=bool)
        if holes is not None:
            changed, p_starts, p_ends = holes
            in_parent = sel & _in_ranges(m, p_starts, p_ends, page)
            in_parent[_indices(m, changed, page)] = False
        runs = _runs(sel, in_parent)
        data += sum(count for _, count, hole in runs if not hole)
        out.append((m.start, runs, lazy))
    return _Selection(out, data, page)


def _in_ranges(m: Mapping, starts: U64, ends: U64, page: int) -> npt.NDArray[np.bool_]:
    """Per page of ``m``: whether one of the sorted, disjoint [start, end) ranges holds it
    (a running count over the range edges: no per-page search)."""
    count = (m.end - m.start) // page
    lo = int(np.searchsorted(ends, np.uint64(m.start), side="right"))
    hi = int(np.searchsorted(starts, np.uint64(m.end), side="left"))
    if lo >= hi:
        return np.zeros(count, dtype=bool)
    if hi - lo == 1 and starts[lo] <= m.start and ends[lo] >= m.end:
        return np.ones(count, dtype=bool)
    a = np.clip(starts[lo:hi].astype(np.int64) - m.start, 0, m.end - m.start) // page
    b = (np.clip(ends[lo:hi].astype(np.int64) - m.start, 0, m.end - m.start) + page - 1) // page
    edges = np.zeros(count + 1, dtype=np.int32)
    np.add.at(edges, a, 1)
    np.add.at(edges, b, -1)
    return np.cumsum(edges[:-1]) > 0


def _indices(m: Mapping, pages: U64, page: int) -> npt.NDArray[np.int64]:
    """Page indices inside ``m`` of the sorted page addresses ``pages`` that fall in it."""
    lo = int(np.searchsorted(pages, np.uint64(m.start), side="left"))
    hi = int(np.searchsorted(pages, np.uint64(m.end), side="left"))
    return (pages[lo:hi].astype(np.int64) - m.start) // page


def _pagemap_runs(sel: _Selection, stats: DumpStats) -> list[tuple[int, int, int]]:
    """The task pagemap's runs in address order: (vaddr, pages, flags); data runs cut to
    CHUNK_PAGES (8 MiB) as CRIU's page-pipe does."""
    page = sel.page
    out: list[tuple[int, int, int]] = []
    for start, runs, lazy in sel.mappings:
        for first, count, hole in runs:
            if hole:
                stats.parent_pages += count
                out.append((start + first * page, count, PE_PARENT))
                continue
            for off in range(0, count, CHUNK_PAGES):
                n = min(CHUNK_PAGES, count - off)
                out.append((start + (first + off) * page, n, PE_PRESENT | lazy))
    return out


def _reader(
    s: Process, stats: DumpStats, bar: Progress, page: int
) -> Callable[[memoryview, list[tuple[int, int, int]]], None]:
    """Copies runs of the target's memory straight into a window of the pages file."""

    def fill(view: memoryview, placed: list[tuple[int, int, int]]) -> None:
        base = np.uint64(buffer_address(view))
        table = np.array(placed, dtype=np.uint64).reshape(-1, 3)
        local = np.stack((base + table[:, 0], table[:, 2]), axis=1)
        remote = np.ascontiguousarray(table[:, 1:3])
        s.read_iov(np.ascontiguousarray(local), remote)
        done = int(table[:, 2].sum())
        stats.pages += done // page
        bar.advance(done)

    return fill


def _start_tracking(session: Process, out: Path, stats: DumpStats, keeper: Keeper) -> None:
    """Start a resumable tracker while the target is still stopped (or take the one that
    runs: a new baseline); record its state and give it to ``keeper``."""
    reasons = []
    tracker: DirtyTracker | None = None
    reused = False
    busy = checkpointed(session.pid) if isinstance(keeper, HolderKeeper) else None
    if busy is not None:
        stats.tracking_note = f"{busy}: its tracker's baseline stays with that checkpoint"
        return
    try:
        running = reuse(session)
    except TrackingError as exc:
        # A holder that does not answer still holds the registrations: a second
        # userfaultfd could register nothing.
        stats.tracking_note = str(exc)
        return
    if running is not None:
        tracker, info = running
        try:
            tracker.reset()
        except BaseException:
            tracker.release()
            raise
        reused = True
        stats.holder = info.holder
    else:
        for backend in ("uffd-wp", "soft-dirty"):
            try:
                tracker = open_tracker(session, backend, in_target=False)
            except TrackingError as exc:
                reasons.append(str(exc))
                continue
            break
    if tracker is None:
        stats.tracking_note = "; ".join(reasons)
        return
    try:
        token = new_token()
        save_tracking(out, tracker.state(), baseline=token)
        keeper.keep(session, tracker, out, token, reused)
    except BaseException:
        if reused:
            tracker.release()
        else:
            tracker.close()
        drop_tracking(out)
        raise
    stats.tracking = tracker.backend_name
    stats.tracking_reused = reused


def _finish_keeping(keeper: Keeper, out: Path, stats: DumpStats) -> None:
    """Hand the new tracker to its keeper once the target runs (a holder is started); if
    that fails the image stays, untracked, and the note says why."""
    try:
        holder = keeper.finish()
    except TrackingError as exc:
        drop_tracking(out)
        stats.tracking, stats.tracking_note = None, str(exc)
        return
    if holder is not None:
        stats.holder = holder


def _drop_kept(keeper: CallerKeeper) -> None:
    """A dump that failed after the tracker was kept: let it go again."""
    tracker, keeper.tracker = keeper.tracker, None
    if tracker is None:
        return
    # Closing this process's copy: a borrowed tracker runs on in its holder, an own one ends.
    with contextlib.suppress(TrackingError):
        tracker.release()

"""The Python API: ``diff`` (what differs) and ``apply`` (revert), one call each.

>>> from applier.api import apply
>>> result = apply("checkpoint/", pid)          # revert pid to the checkpoint
>>> result.stats.pages_written

This module opens and closes: the image directory (validated whole when it is opened), the
target (stopped while the call lasts, always detached at the end), the dirty tracker a
tracked dump left, the undo log. Planning is ``applier.plan``; everything between the first
write and the detach, rollback included, is ``applier.executor``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

import attrs
import numpy as np
import numpy.typing as npt

from applier.capture import live_task, present_pages, region_from_mapping
from applier.compare import narrow, rseq_masks
from applier.errors import MismatchError, RollbackFailed, UsageError
from applier.executor import ApplyStats, Executor
from applier.executor.pages import differing_pages, page_source
from applier.fds import live_fds
from applier.image import image_task
from applier.journal import Journal
from applier.lock import KeptClaim, TargetLock
from applier.model import ImageTask, Kind, LiveTask, SavedPages
from applier.overrides import NONE as NO_OVERRIDES
from applier.overrides import Overrides
from applier.parts import Part
from applier.plan import (
    NewThread,
    Plan,
    ResetFd,
    SavedRuns,
    SetRegs,
    Step,
    WritePages,
    make_plan,
)
from applier.ranges import member
from applier.trackfile import load_tracking, save_tracking
from applier.trust import (
    check_identity,
    check_target_allowed,
    check_trusted,
    check_undo_dir_trusted,
)
from applier.undo.image import (
    UNDO_FILE,
    UndoImageStats,
    UndoImageWriter,
    UndoScope,
    capture,
    check_undo_dir,
    load_scope,
)
from applier.undo.log import UndoLog
from formats.core import CoreEntry
from formats.imagedir import ImageDir
from injector.errors import InjectorError
from injector.process import Process
from injector.procfs import read_start_time
from injector.session import attach
from injector.tracer import signals_deferred
from injector.tracking import (
    DirtyTracker,
    Pending,
    TrackerState,
    TrackingError,
    resume_tracker,
)

__all__ = [
    "ApplyResult",
    "Overrides",
    "Prepared",
    "apply",
    "apply_in_session",
    "diff",
    "recover",
]

logger = logging.getLogger(__name__)


class _OpenImages:
    """Image directories kept open and parsed between applies, in a process that applies
    again and again (the tracker holder: ``applier.remote``). An entry is used again only
    while no image file (``*.img``) of the directory, or of its parent chain, has changed
    (name, inode, size, mtime); applier's own files beside them (the tracker's state, which
    every apply rewrites) are read afresh each time anyway. The least recently used beyond
    ``size`` is closed."""

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self.enabled = False
        self._kept: dict[str, tuple[tuple[object, ...], ImageDir, dict[int | None, Any]]] = {}

    @staticmethod
    def _signature(path: Path) -> tuple[object, ...]:
        out: list[object] = []
        for _ in range(16):  # the parent chain (incremental images), as far as it goes
            with os.scandir(path) as entries:
                for e in entries:
                    if e.name.endswith(".img") or e.name == "parent":
                        st = e.stat(follow_symlinks=False)
                        out.append((str(path), e.name, st.st_ino, st.st_size, st.st_mtime_ns))
            parent = path / "parent"
            if not parent.is_dir():
                break
            path = parent.resolve()
        return tuple(sorted(out, key=str))

    @contextlib.contextmanager
    def open(self, path: Path) -> Iterator[tuple[ImageDir, dict[int | None, Any]]]:
        """The parsed directory and a per-directory memo (``{task: ImageTask}``)."""
        if not self.enabled:
            with ImageDir.open(path) as img:
                yield img, {}
            return
        key = os.path.realpath(path)
        signature = self._signature(Path(key))
        kept = self._kept.pop(key, None)
        if kept is not None and kept[0] != signature:
            kept[1].close()
            kept = None
        if kept is None:
            kept = (signature, ImageDir.open(path), {})
        self._kept[key] = kept  # the most recent last
        while len(self._kept) > self.size:
            oldest = next(iter(self._kept))
            self._kept.pop(oldest)[1].close()
        yield kept[1], kept[2]


OPEN_IMAGES = _OpenImages()

U64 = npt.NDArray[np.uint64]


@attrs.frozen
class ApplyResult:
    plan: Plan
    stats: ApplyStats
    dry_run: bool = False
    dirty_source: str | None = None  # "tracker:<backend>", "content", "layer" or None (all)
    undo: UndoImageStats | None = None  # the undo image written (``undo_dir``)


@attrs.frozen
class _Image:
    """An opened image and what an apply takes from it, before the target is stopped."""

    dir: ImageDir
    task: ImageTask
    scope: UndoScope | None
    parts: Part
    keep_fds: frozenset[int] = frozenset()  # descriptors left as they are (--keep-fd)

    def cores(self, plan: Plan) -> dict[int, CoreEntry]:
        tids = [s.image_tid for s in plan.of(SetRegs)] + [s.tid for s in plan.of(NewThread)]
        return {tid: self.dir.core(tid) for tid in tids}

    def plan(
        self,
        process: Process,
        *,
        leave_shared: bool,
        dirty: _Later,
        read_only: bool = False,
        tracker: DirtyTracker | None = None,
    ) -> tuple[Plan, LiveTask, U64 | None]:
        """The plan, the live state it was made from and the written pages (None: no
        tracker). What does not depend on the written pages is read first, while the
        tracker may still be scanning (``_resume_later``)."""
        signals = self.task.signals if Part.SIGNALS in self.parts else None
        table = None
        if Part.FDS in self.parts and self.task.fds is not None:
            table = process.descriptors(sock_diag=False, only_sockets=True)
        live = live_task(
            process, self.task.page_size, dirty=dirty.result, read_only=read_only, signals=signals
        )
        written = dirty.result()
        if table is not None:
            live = attrs.evolve(live, fds=live_fds(table))
        if written is None:
            tracker = None
        keep = set(self.keep_fds)
        if tracker is not None:  # the tracker's userfaultfd, opened after the checkpoint
            keep.add(tracker.state().remote_fd)
        ranges = None if self.scope is None else self.scope.ranges
        plan = make_plan(
            self.task, live, self.parts, dirty=written, leave_shared=leave_shared, scope=ranges,
            keep_fds=keep,
        )  # fmt: skip
        return _unshared(process, plan), live, written


@contextlib.contextmanager
def _opened(
    image_dir: str | os.PathLike[str],
    pid: int,
    task: int | None,
    parts: Part | Iterable[str],
    overrides: Overrides,
) -> Iterator[_Image]:
    """The image directory, checked (trusted, of this process), opened and validated, with
    its task and the parts to restore: an undo image restores at most the parts the apply it
    undoes changed, in that pid."""
    path = Path(image_dir)
    if not overrides.trust_image and path.is_dir():
        check_trusted(path)
    with OPEN_IMAGES.open(path) as (img, memo):
        check_target_allowed(pid, force=overrides.force)
        scope = load_scope(img.path)
        chosen = Part.of(parts)
        if scope is not None:
            if scope.pid != pid:
                raise MismatchError(
                    f"{UNDO_FILE}: this undo image is of pid {scope.pid}, not {pid}"
                )
            chosen &= Part.of(scope.parts)
        image = memo.get(task)
        if image is None:
            image = memo[task] = image_task(img, task)
        check_identity(
            image.pid,
            img.inventory.dump_uptime,
            pid,
            other_process=overrides.other_process,
            where=img.path,
        )
        yield _Image(img, image, scope, chosen)


def _unshared(process: Process, plan: Plan) -> Plan:
    """The plan without position and status-flag changes to open files another process
    shares (an inherited stdout or log file: the parent's, pytest's capture file): they
    belong to the open file description, and setting them back would move the other
    process's writes too. Close-on-exec is the descriptor's own and is still set."""
    steps: list[Step] = []
    notes = list(plan.notes)
    for step in plan.steps:
        if isinstance(step, ResetFd) and (step.pos is not None or step.flags is not None):
            other = process.file_shared_with(step.fd)
            if other is not None:
                notes.append(
                    f"fd {step.fd} ({step.path or step.kind.lower()}): its open file is shared "
                    f"with pid {other}: position and status flags left as they are"
                )
                if step.cloexec is None:
                    continue
                step = attrs.evolve(step, pos=None, flags=None)
        steps.append(step)
    if len(notes) == len(plan.notes):
        return plan
    return attrs.evolve(plan, steps=tuple(steps), notes=tuple(notes))


def _narrowed(process: Process, plan: Plan, cores: dict[int, CoreEntry]) -> Plan:
    """The plan with only what differs, marked as compared."""
    started = time.perf_counter()
    got = narrow(process, plan, cores)
    logger.info(
        "pid %d: %d saved pages differ, %d the same, %d steps differ (compared in %.1f ms)",
        plan.pid,
        got.plan.pages_to_write,
        got.pages_unchanged,
        len(got.plan.steps),
        (time.perf_counter() - started) * 1e3,
    )
    return attrs.evolve(got.plan, compared=True, pages_unchanged=got.pages_unchanged)


def diff(
    image_dir: str | os.PathLike[str],
    pid: int,
    *,
    task: int | None = None,
    parts: Part | Iterable[str] = Part.ALL,
    leave_shared: bool = False,
    overrides: Overrides = NO_OVERRIDES,
    keep_fds: Iterable[int] = (),
) -> Plan:
    """What differs between ``pid`` and the image, as the plan narrowed to it: the steps and
    pages whose effect would change the target (``applier.compare``). An empty plan means
    equal. The target is stopped while it is read and not changed: nothing is injected."""
    with (
        _opened(image_dir, pid, task, parts, overrides) as opened,
        TargetLock.acquire(pid, "work", f"compared with {opened.dir.path}"),
        attach(pid) as process,
    ):
        image = attrs.evolve(opened, keep_fds=frozenset(keep_fds))
        plan, _, _ = image.plan(
            process, leave_shared=leave_shared, dirty=Pending.ready(None), read_only=True
        )
        cores = image.cores(plan)
        Executor(process, plan, cores, UndoLog.disabled()).validate()
        return _narrowed(process, plan, cores)


def apply(
    image_dir: str | os.PathLike[str],
    pid: int,
    *,
    task: int | None = None,
    parts: Part | Iterable[str] = Part.ALL,
    leave_shared: bool = False,
    only_dirty: bool = False,
    verify: bool = True,
    dry_run: bool = False,
    undo_dir: str | os.PathLike[str] | None = None,
    undo: bool = True,
    progress: bool = False,
    overrides: Overrides = NO_OVERRIDES,
    layer: bool = False,
    keep_fds: Iterable[int] = (),
) -> ApplyResult:
    """Revert ``pid`` to the checkpoint in ``image_dir``; roll back if anything fails.

    Before the first write the target is held (a group stop under ptrace, so that if this
    process dies the target stays stopped, never running half-applied) and a journal says
    what is being applied (``applier.journal``; ``recover`` finishes it).

    ``undo=False`` keeps no copy of what is overwritten: faster for large applies, but a
    step that fails then leaves the target half-applied (RollbackFailed; it stays held).

    ``undo_dir``: write there (an empty or new directory) an undo image: what the apply
    overwrote, in CRIU's format (``applier/undo/image.py``); ``apply(undo_dir, pid)`` puts it
    back. Written while the target is still stopped: if it cannot be written, the apply is
    rolled back (ApplyFailed). An apply that fails and cannot be rolled back (RollbackFailed)
    leaves it too. ``image_dir`` may itself be an undo image: then only its scope (the pages
    the earlier apply touched) and the parts that apply restored are written.

    ``dry_run``: plan and validate only; nothing is injected or written.

    ``layer``: ``image_dir`` is an incremental layer (``dump --parent``, ``call --record``)
    and ``pid`` is at the layer's parent state: write only the pages the layer itself holds
    (plus layout, break, registers, and discards of pages the layer's chain does not hold).
    Before anything is written, every page the layer leaves to its parent is compared with
    the target; if one differs the apply is refused (MismatchError).

    ``keep_fds``: descriptor numbers the ``fds`` part leaves exactly as they are.
    """
    undo_path = Path(undo_dir) if undo_dir is not None and not dry_run else None
    if undo_path is not None:
        if not undo:
            raise ValueError("undo_dir needs undo=True")
        check_undo_dir(undo_path)
        if not overrides.trust_image:
            check_undo_dir_trusted(undo_path)
    with _opened(image_dir, pid, task, parts, overrides) as opened:
        image = attrs.evolve(opened, keep_fds=frozenset(keep_fds))
        tracking: _Tracking | None = None
        if layer:
            if only_dirty:
                raise UsageError("--layer and --only-dirty cannot be combined")
            tracking = _LayerCheck.of(image)
        elif only_dirty:
            tracking = _SavedTracker(image.dir.path, pid)
        return _apply_image(
            image, pid, tracking,
            task=task, leave_shared=leave_shared, only_dirty=only_dirty, verify=verify,
            dry_run=dry_run, undo_path=undo_path, undo=undo, progress=progress,
            write_code=overrides.write_code,
        )  # fmt: skip
    raise AssertionError("unreachable")  # pragma: no cover - the with block returns


def apply_in_session(
    image_dir: str | os.PathLike[str],
    process: Process,
    *,
    dirty: npt.NDArray[np.uint64],
    verify: bool = True,
) -> ApplyResult:
    """Apply ``image_dir``, a checkpoint of this very process taken by the caller, inside the
    caller's session (every thread stopped already), writing and discarding only the
    ``dirty`` pages (every page written since the checkpoint) plus layout, break and
    registers; rolled back if a step fails. ``applier.call`` puts a process back with it."""
    trusted = Overrides(trust_image=True)  # the caller wrote it
    with _opened(image_dir, process.pid, None, Part.ALL, trusted) as image:
        log = UndoLog.create()
        try:
            return _apply_held(
                image, process, log, None, Pending.ready(np.asarray(dirty, dtype=np.uint64)),
                leave_shared=False, only_dirty=True, verify=verify, dry_run=False,
                undo_path=None, progress=False, write_code=False,
            )  # fmt: skip
        finally:
            log.close()
    raise AssertionError("unreachable")  # pragma: no cover - the with block returns


class _Tracking(Protocol):
    """Where an apply's dirty tracker comes from and goes back to."""

    def resume(self, process: Process) -> tuple[DirtyTracker | None, U64 | None]: ...
    def done(self, tracker: DirtyTracker, *, applied: bool) -> None: ...


# The written pages an apply goes by, once the tracker's scan is done (None: no tracker, or
# it was lost).
_Later = Pending[U64 | None]


def _resume_later(
    tracking: _Tracking | None, process: Process
) -> tuple[DirtyTracker | None, _Later]:
    """The tracker and its written pages; a tracker kept between applies scans on a worker
    thread meanwhile (``DirtyTracker.dirty_pages_later``)."""
    if isinstance(tracking, _KeptTracker):
        return tracking.resume_later(process)
    tracker, dirty = tracking.resume(process) if tracking is not None else (None, None)
    return tracker, Pending.ready(dirty)


@attrs.define
class _SavedTracker:
    """The tracker state a tracked dump saved beside the image (``applier.trackfile``)."""

    image_dir: Path
    pid: int

    def resume(self, process: Process) -> tuple[DirtyTracker | None, U64 | None]:
        return _resume(process, load_tracking(self.image_dir, self.pid), self.image_dir)

    def done(self, tracker: DirtyTracker, *, applied: bool) -> None:
        if applied:
            # The target now equals the image: "written since" starts again here.
            tracker.reset()
            save_tracking(self.image_dir, tracker.release(), must=False)
        else:
            tracker.release()  # keep tracking: the target is as it was


@attrs.define
class _LayerCheck:
    """An incremental layer applied onto its parent state: no tracker, but the pages the
    layer leaves to its parent are compared with the target first (all must be equal), and
    the dirty set is what the layer holds plus the present pages its chain does not hold."""

    path: Path
    page_size: int
    own: U64  # the pages the layer holds itself, sorted
    parent: U64  # the pages it leaves to its parent chain (PE_PARENT), sorted
    inherited: tuple[SavedPages, ...]  # the same, as the planner's runs

    @classmethod
    def of(cls, image: _Image) -> _LayerCheck:
        if not (image.dir.path / "parent").exists():
            raise UsageError(f"{image.dir.path}: not an incremental layer (no parent)")
        here = image.dir.path.resolve()
        page = image.task.page_size
        own: list[SavedPages] = []
        inherited: list[SavedPages] = []
        for run in image.task.saved:
            mine = page_source(run.source).pages.path.parent.resolve() == here
            (own if mine else inherited).append(run)
        return cls(
            image.dir.path, page, _pages(own, page), _pages(inherited, page), tuple(inherited)
        )

    def resume(self, process: Process) -> tuple[DirtyTracker | None, U64 | None]:
        page = self.page_size
        if self.inherited:
            step = WritePages(SavedRuns.of(self.inherited))
            try:
                differ = differing_pages(process, step, page, rseq_masks(process, page))
            except InjectorError as exc:
                raise MismatchError(
                    f"pid {process.pid} is not at the parent state of {self.path}: the pages "
                    f"it leaves to its parent cannot all be read ({exc})"
                ) from exc
            if len(differ):
                raise MismatchError(
                    f"pid {process.pid} is not at the parent state of {self.path}: "
                    f"{len(differ)} of the {len(self.parent)} pages it leaves to its parent "
                    f"differ, the first at {int(differ[0]):#x}; apply the parent first"
                )
        # Pages holding data that the layer's chain does not hold: to be discarded. Of a
        # private file mapping only the process's own copies count (the others are the
        # file's pages, which a discard would leave as they are).
        regions = [region_from_mapping(m) for m in process.maps()]
        anon, _ = present_pages(process, [r for r in regions if r.kind is not Kind.FILE], page)
        _, copies = present_pages(process, [r for r in regions if r.kind is Kind.FILE], page)
        present = np.concatenate([anon, copies])
        extra = present[~member(present, self.parent)]
        return None, np.unique(np.concatenate([extra, self.own]))

    def done(self, tracker: DirtyTracker, *, applied: bool) -> None:
        """No tracker to hand back."""


def _pages(runs: Iterable[SavedPages], page: int) -> U64:
    parts = [np.arange(r.vaddr, r.vaddr + r.nr_pages * page, page, dtype=np.uint64) for r in runs]
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.uint64)


@attrs.define
class _KeptTracker:
    """A tracker kept open in this process between applies (``Prepared``): resumed from the
    saved state once, then moved from session to session; its state file follows."""

    saved: _SavedTracker
    tracker: DirtyTracker | None = None
    borrowed: bool = False  # a copy of a holder's userfaultfd: closing it leaves tracking on
    written: TrackerState | None = None  # the state last saved in the image directory

    def resume(self, process: Process) -> tuple[DirtyTracker | None, U64 | None]:
        tracker, later = self.resume_later(process)
        return tracker, later.result()

    def resume_later(self, process: Process) -> tuple[DirtyTracker | None, _Later]:
        """The tracker and its written pages, found on the scan worker while the caller reads
        the rest of the stopped target (1 GiB with 1% written: a 0.3-0.6 ms walk)."""
        if self.tracker is None:
            self.tracker, dirty = self.saved.resume(process)
            return self.tracker, Pending.ready(dirty)
        tracker = self.tracker
        try:
            tracker.rebind(process)
            pending = tracker.dirty_pages_later()
        except TrackingError as exc:
            self._lost(process, exc)
            return None, Pending.ready(None)

        def get() -> U64 | None:
            try:
                return pending.result()
            except TrackingError as exc:
                self._lost(process, exc)
                return None

        return tracker, Pending(get, pending.future)

    def _lost(self, process: Process, exc: TrackingError) -> None:
        logger.warning(
            "dirty tracking of pid %d lost (%s): comparing page contents", process.pid, exc
        )
        self.tracker = None

    def done(self, tracker: DirtyTracker, *, applied: bool) -> None:
        if tracker is not self.tracker:
            return  # lost during the apply (``_lost``)
        if applied:
            tracker.reset()
            state = tracker.state()
            if state != self.written:  # most resets leave it as it was
                save_tracking(self.saved.image_dir, state, must=False)
                self.written = state

    def close(self) -> None:
        """Stop tracking (in a session of its own; nothing to do if the target is gone)."""
        tracker, self.tracker = self.tracker, None
        if tracker is not None and self.borrowed:
            tracker.release()
            return
        if tracker is None:
            state = load_tracking(self.saved.image_dir, self.saved.pid)
            if state is None:
                return
            with contextlib.suppress(InjectorError), attach(self.saved.pid) as process:
                resume_tracker(process, state).close()
            return
        with contextlib.suppress(InjectorError), attach(self.saved.pid) as process:
            tracker.rebind(process)
            tracker.close()


class Prepared:
    """An image opened and checked once for many applies into one process (what
    ``applier.fixture.Checkpoint`` restores with): the parsed image and its task, the trust
    and identity checks, the dirty tracker kept open in this process, the image's pages left
    mapped. Each ``apply`` then does only the work that depends on what changed."""

    def __init__(
        self,
        image_dir: str | os.PathLike[str],
        pid: int,
        *,
        overrides: Overrides = NO_OVERRIDES,
        tracker: DirtyTracker | None = None,
        borrowed: bool = False,
    ) -> None:
        """``tracker``: the one ``dump.dump_tracked`` kept in this process (``borrowed`` from
        a holder); without it, the state saved beside the image is resumed."""
        self.pid = pid
        self._stack = contextlib.ExitStack()
        self.image = self._stack.enter_context(_opened(image_dir, pid, None, Part.ALL, overrides))
        saved = _SavedTracker(self.image.dir.path, pid)
        self.tracking = _KeptTracker(saved, tracker, borrowed=borrowed)
        self.claim = KeptClaim(pid, "work")  # the lock file stays open between applies
        self._stack.callback(self.claim.close)

    def apply(
        self,
        *,
        parts: Part | Iterable[str] = Part.ALL,
        verify: bool = True,
        undo: bool = True,
        keep_fds: Iterable[int] = (),
    ) -> ApplyResult:
        """``apply(image_dir, pid, only_dirty=True, ...)`` with everything kept warm."""
        image = attrs.evolve(
            self.image, parts=self.image.parts & Part.of(parts), keep_fds=frozenset(keep_fds)
        )
        return _apply_image(
            image, self.pid, self.tracking,
            task=None, leave_shared=False, only_dirty=True, verify=verify, dry_run=False,
            undo_path=None, undo=undo, progress=False, write_code=False, keep_mapped=True,
            claim=self.claim,
        )  # fmt: skip

    def close(self) -> None:
        """Stop the tracker and close the image."""
        try:
            self.tracking.close()
        finally:
            self._stack.close()


def _apply_image(
    image: _Image,
    pid: int,
    tracking: _Tracking | None,
    *,
    task: int | None,
    leave_shared: bool,
    only_dirty: bool,
    verify: bool,
    dry_run: bool,
    undo_path: Path | None,
    undo: bool,
    progress: bool,
    write_code: bool,
    keep_mapped: bool = False,
    claim: KeptClaim | None = None,
) -> ApplyResult:
    """Everything of an apply once the image is open and checked: claim the target (with
    ``claim``, kept between applies), attach, hold and journal, resume the tracker, plan,
    carry out, let go."""
    with contextlib.ExitStack() as stack:
        what = "a dry run of" if dry_run else "applying"
        purpose = f"{what} {image.dir.path}"
        if claim is not None:
            stack.enter_context(claim.held(purpose))
        else:
            stack.enter_context(TargetLock.acquire(pid, "work", purpose))
        # with --undo, the spool is a (nameless) file in DIR
        log = UndoLog.create(undo_path) if undo else UndoLog.disabled()
        stack.callback(log.close)
        started = None
        if not dry_run:
            with contextlib.suppress(OSError):  # gone: attach says so, as it says everything
                started = read_start_time(pid)
        stale = None if started is None else Journal.find(pid, started)  # left by one that died
        journal: Journal | None = None
        finished = False  # the journal goes once the target is detached and continued

        def end_journal() -> None:
            if journal is not None and finished:
                journal.remove()

        stack.callback(end_journal)
        process = stack.enter_context(attach(pid))
        tracker: DirtyTracker | None = None
        try:
            if not dry_run:
                was_stopped = stale.was_stopped if stale is not None else process.was_stopped
                with signals_deferred():  # the journal, then the hold: both or neither
                    journal = Journal.begin(
                        pid,
                        image.dir.path,
                        task=task,
                        parts=image.parts.labels(),
                        only_dirty=only_dirty,
                        leave_shared=leave_shared,
                        was_stopped=was_stopped,
                        start_time=started,
                        replace=stale is not None,
                    )
                    process.hold()
                    journal.mark_held()
                    process.resume_on_detach = not was_stopped
            tracker, later = _resume_later(tracking, process)
            stack.callback(later.wait)  # never leave a scan running past the session
            result = _apply_held(
                image, process, log, tracker, later,
                leave_shared=leave_shared, only_dirty=only_dirty, verify=verify,
                dry_run=dry_run, undo_path=undo_path, progress=progress,
                write_code=write_code, keep_mapped=keep_mapped,
            )  # fmt: skip
        except BaseException as exc:
            if tracker is not None and tracking is not None:
                tracking.done(tracker, applied=False)
            if journal is not None:
                if isinstance(exc, RollbackFailed):
                    # Half-applied: it stays held, and the journal tells how to finish.
                    process.resume_on_detach = False
                    raise RollbackFailed(
                        f"{exc}; pid {pid} is held (stopped): 'applier recover {pid}' applies "
                        f"{image.dir.path} again"
                    ) from exc
                finished = True
            raise
        if tracker is not None and tracking is not None:
            tracking.done(tracker, applied=not result.dry_run)
        if isinstance(tracking, _LayerCheck):
            result = attrs.evolve(result, dirty_source="layer")
        finished = True
        return result
    raise AssertionError("unreachable")  # pragma: no cover - the with block returns


def _apply_held(
    image: _Image,
    process: Process,
    log: UndoLog,
    tracker: DirtyTracker | None,
    later: _Later,
    *,
    leave_shared: bool,
    only_dirty: bool,
    verify: bool,
    dry_run: bool,
    undo_path: Path | None,
    progress: bool,
    write_code: bool,
    keep_mapped: bool = False,
) -> ApplyResult:
    """Plan and carry out the apply on the stopped (and, unless a dry run, held) target."""
    plan, live, dirty = image.plan(
        process, leave_shared=leave_shared, dirty=later, read_only=dry_run, tracker=tracker
    )
    if dirty is None:
        tracker = None  # none, or lost while it scanned
    logger.info(
        "pid %d: %d steps planned (%d pages to write, %d layout changes)",
        plan.pid,
        len(plan.steps),
        plan.pages_to_write,
        plan.summary()["layout_changes"],
    )
    executor = Executor(
        process,
        plan,
        image.cores(plan),
        log,
        only_dirty=only_dirty and dirty is None,
        progress=progress,
        allow_code_writes=write_code,
        keep_mapped=keep_mapped,
    )
    source = (
        f"tracker:{tracker.backend_name}"
        if tracker is not None
        else ("content" if only_dirty else None)
    )
    if dry_run:
        executor.validate()
        if only_dirty:  # count what the apply would find unchanged and skip
            plan = _narrowed(process, plan, executor.cores)
            executor.stats.pages_skipped = plan.pages_unchanged
        return ApplyResult(plan, executor.stats, dry_run=True, dirty_source=source)
    keeper = None
    if undo_path is not None:
        before = capture(
            process,
            live,
            image.parts,
            exact_presence=dirty is None,
            image=str(image.dir.path.resolve()),
        )
        keeper = UndoImageWriter(undo_path, before, log, plan.page_size)
    kept = executor.apply(verify=verify, keep=keeper)
    logger.info(
        "pid %d: %d steps done in %.1f ms", plan.pid, len(plan.steps), executor.stats.seconds * 1e3
    )
    assert kept is None or isinstance(kept, UndoImageStats)
    return ApplyResult(plan, executor.stats, dirty_source=source, undo=kept)


def recover(pid: int) -> ApplyResult:
    """Finish an apply that died: the journal names the image; apply it again (the target
    is stopped, held by the dead applier) and let the target continue as before the apply.
    Raises UsageError when there is no journal for ``pid``."""
    journal = Journal.find(pid)
    if journal is None:
        raise UsageError(f"pid {pid}: no apply journal, nothing to recover")
    return apply(
        journal.image,
        pid,
        task=journal.task,
        parts=journal.parts,
        leave_shared=journal.leave_shared,
        only_dirty=journal.only_dirty,
    )


def _resume(
    process: Process, state: TrackerState | None, image_dir: Path
) -> tuple[DirtyTracker | None, npt.NDArray[np.uint64] | None]:
    """(tracker, dirty pages) from a saved state; (None, None) if there is none or it is lost
    (then ``--only-dirty`` falls back to comparing contents): the holder of its userfaultfd
    gone, or serving a newer image's baseline (``applier.holder``)."""
    if state is None:
        return None, None
    from applier.holder import resume as resume_held  # noqa: PLC0415 - only when tracked

    try:
        tracker = resume_held(process, state, image_dir)
        return tracker, tracker.dirty_pages()
    except TrackingError as exc:
        logger.warning(
            "dirty tracking of pid %d lost (%s): comparing page contents", state.pid, exc
        )
        return None, None

"""The Python API: ``diff`` (plan only) and ``apply`` (plan, execute, verify), one call each.

>>> from applier.api import apply
>>> result = apply("checkpoint/", pid)          # revert pid to the checkpoint
>>> result.stats.pages_written

Everything is validated before the first byte is written: the whole image directory when it
is opened, the plan against the live layout, the files to map again and the registers to set.
The target is stopped for the duration of the call and always detached at the end.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import numpy.typing as npt

from applier.compare import narrow
from applier.dump import TRACKING_FILE
from applier.errors import ApplyFailed, MismatchError, RollbackFailed, VerifyFailed
from applier.execute import ApplyStats, Executor
from applier.model import ImageTask
from applier.parts import Part
from applier.plan import Plan, SetRegs, make_plan
from applier.sides import image_task, live_task
from applier.target_ops import rollback
from applier.undo import UndoLog
from applier.undo_image import (
    UNDO_FILE,
    Before,
    UndoImageStats,
    UndoScope,
    capture,
    check_undo_dir,
    load_scope,
    write_undo_image,
)
from formats.imagedir import ImageDir
from injector import Session, attach
from injector.tracking import DirtyTracker, TrackerState, TrackingError, resume_tracker

__all__ = ["ApplyResult", "apply", "diff"]

logger = logging.getLogger(__name__)


@attrs.frozen
class ApplyResult:
    plan: Plan
    stats: ApplyStats
    dry_run: bool = False
    dirty_source: str | None = None  # "tracker:<backend>", "content" or None (all pages)
    undo: UndoImageStats | None = None  # the undo image written (``undo_dir``)


def _open(image_dir: str | os.PathLike[str]) -> ImageDir:
    return ImageDir.open(Path(image_dir))


def _cores(img: ImageDir, plan: Plan) -> dict[int, Any]:
    return {s.image_tid: img.core(s.image_tid) for s in plan.steps if isinstance(s, SetRegs)}


def diff(
    image_dir: str | os.PathLike[str],
    pid: int,
    *,
    task: int | None = None,
    parts: Part | Iterable[str] = Part.ALL,
    leave_shared: bool = False,
) -> Plan:
    """What differs between ``pid`` and the image, as the plan narrowed to it: the steps and
    pages whose effect would change the target (``applier.compare``). An empty plan means
    equal. The target is not changed."""
    with _open(image_dir) as img:
        image = image_task(img, task)
        scope = load_scope(Path(image_dir))
        parts = _scoped_parts(parts, scope, pid)
        with attach(pid) as session:
            live = live_task(session, image.page_size)
            plan = make_plan(image, live, parts, leave_shared=leave_shared, scope=_ranges(scope))
            cores = _cores(img, plan)
            Executor(session, plan, cores, UndoLog.disabled()).validate()
            return _narrowed(session, plan, cores)


def _narrowed(session: Session, plan: Plan, cores: dict[int, Any]) -> Plan:
    """The plan with only what differs, marked as compared."""
    started = time.perf_counter()
    got = narrow(session, plan, cores)
    logger.info(
        "pid %d: %d saved pages differ, %d the same, %d steps differ (compared in %.1f ms)",
        plan.pid,
        got.plan.pages_to_write,
        got.pages_unchanged,
        len(got.plan.steps),
        (time.perf_counter() - started) * 1e3,
    )
    return attrs.evolve(got.plan, compared=True, pages_unchanged=got.pages_unchanged)


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
) -> ApplyResult:
    """Revert ``pid`` to the checkpoint in ``image_dir``; roll back if anything fails.

    ``undo=False`` keeps no copy of what is overwritten: faster for large applies, but a
    step that fails then leaves the target half-applied (RollbackFailed).

    ``undo_dir``: write there (an empty or new directory) an undo image: what the apply
    overwrote, in CRIU's format (``applier/undo_image.py``); ``apply(undo_dir, pid)`` puts it
    back. Written while the target is still stopped: if it cannot be written, the apply is
    rolled back (ApplyFailed). An apply that fails and cannot be rolled back (RollbackFailed)
    leaves it too. ``image_dir`` may itself be an undo image: then only its scope (the pages
    the earlier apply touched) and the parts that apply restored are written.
    """
    with _open(image_dir) as img:
        image = image_task(img, task)
        scope = load_scope(Path(image_dir))
        parts = _scoped_parts(parts, scope, pid)
        undo_path = Path(undo_dir) if undo_dir is not None and not dry_run else None
        if undo_path is not None:
            if not undo:
                raise ValueError("undo_dir needs undo=True")
            check_undo_dir(undo_path)
        state = _tracking_state(Path(image_dir), pid) if only_dirty else None
        req = _Request(
            img=img,
            image=image,
            image_dir=Path(image_dir),
            pid=pid,
            parts=parts,
            scope=scope,
            undo_path=undo_path,
            leave_shared=leave_shared,
            only_dirty=only_dirty,
            verify=verify,
            dry_run=dry_run,
            progress=progress,
        )
        log = (
            UndoLog.create(undo_path)  # with --undo, the spool is a (nameless) file in DIR
            if undo
            else UndoLog.disabled()
        )
        try:
            with attach(pid) as session:
                tracker, dirty = _resume(session, state)
                try:
                    result = _apply_in_session(req, session, log, dirty=dirty, tracker=tracker)
                except BaseException:
                    if tracker is not None:
                        tracker.release()  # keep tracking: the target is as it was
                    raise
                if tracker is not None:
                    if not result.dry_run:
                        # The target now equals the image: "written since" starts again here.
                        tracker.reset()
                        _save_tracking(Path(image_dir), tracker.release())
                    else:
                        tracker.release()
                return result
        finally:
            log.close()


@attrs.frozen
class _Request:
    """One apply's inputs, decided before the target is stopped."""

    img: ImageDir
    image: ImageTask
    image_dir: Path
    pid: int
    parts: Part
    scope: UndoScope | None
    undo_path: Path | None
    leave_shared: bool
    only_dirty: bool
    verify: bool
    dry_run: bool
    progress: bool


def _apply_in_session(
    req: _Request,
    session: Session,
    log: UndoLog,
    *,
    dirty: npt.NDArray[np.uint64] | None,
    tracker: DirtyTracker | None,
) -> ApplyResult:
    """Plan, validate, run, verify and keep the undo image, with the target stopped."""
    live = live_task(session, req.image.page_size, dirty=dirty)
    plan = make_plan(
        req.image,
        live,
        req.parts,
        dirty=dirty,
        leave_shared=req.leave_shared,
        scope=_ranges(req.scope),
    )
    executor = Executor(
        session,
        plan,
        _cores(req.img, plan),
        log,
        only_dirty=req.only_dirty and dirty is None,
        progress=req.progress,
    )
    logger.info(
        "pid %d: %d steps planned (%d pages to write, %d layout changes)",
        plan.pid,
        len(plan.steps),
        plan.pages_to_write,
        plan.summary()["layout_changes"],
    )
    source = None
    if tracker is not None:
        source = f"tracker:{tracker.backend_name}"
    elif req.only_dirty:
        source = "content"
    if req.dry_run:
        executor.validate()
        if req.only_dirty:  # count what the apply would find unchanged and skip
            plan = _narrowed(session, plan, executor.cores)
            executor.stats.pages_skipped = plan.pages_unchanged
        return ApplyResult(plan, executor.stats, dry_run=True, dirty_source=source)
    before = (
        capture(
            session,
            live,
            req.parts,
            exact_presence=dirty is None,
            image=str(req.image_dir.resolve()),
        )
        if req.undo_path is not None
        else None
    )
    try:
        stats = executor.run()
        logger.info(
            "pid %d: %d steps done in %.1f ms", plan.pid, len(plan.steps), stats.seconds * 1e3
        )
    except RollbackFailed as exc:
        if req.undo_path is None or before is None or not log.records:
            raise
        try:
            _write_undo(req.undo_path, before, log, req.image.page_size, "rollback-failed")
        except Exception as undo_exc:
            raise RollbackFailed(
                f"{exc}; writing the undo image to {req.undo_path} failed too ({undo_exc})"
            ) from exc
        raise RollbackFailed(
            f"{exc}; what the apply overwrote is in {req.undo_path}: "
            f"'applier apply {req.undo_path} --into {req.pid}' puts it back",
        ) from exc
    if req.verify:
        try:
            executor.verify()
        except VerifyFailed as exc:
            if not log.enabled:
                raise
            rollback(session, log)
            raise VerifyFailed(
                f"{exc}; pid {req.pid} was rolled back to its state before the apply"
            ) from exc
    kept = None
    if req.undo_path is not None and before is not None:
        kept = _undo_or_roll_back(session, req.undo_path, before, log, req.image.page_size)
    return ApplyResult(plan, stats, dirty_source=source, undo=kept)


def _scoped_parts(parts: Part | Iterable[str], scope: UndoScope | None, pid: int) -> Part:
    """An undo image restores at most the parts the apply it undoes changed, in that pid."""
    parts = Part.of(parts)
    if scope is None:
        return parts
    if scope.pid != pid:
        raise MismatchError(f"{UNDO_FILE}: this undo image is of pid {scope.pid}, not {pid}")
    return parts & Part.of(scope.parts)


def _ranges(scope: UndoScope | None) -> tuple[tuple[int, int], ...] | None:
    return None if scope is None else scope.ranges


def _write_undo(
    path: Path, before: Before, log: UndoLog, page: int, outcome: str
) -> UndoImageStats:
    """Write the undo image; on failure remove what was written of it and raise."""
    started = time.perf_counter()
    try:
        kept = write_undo_image(path, before, log, page, outcome=outcome)
    except BaseException:
        for f in path.iterdir():  # the directory was empty before (check_undo_dir)
            with contextlib.suppress(OSError):
                f.unlink()
        raise
    return attrs.evolve(kept, seconds=time.perf_counter() - started)


def _undo_or_roll_back(
    session: Session, path: Path, before: Before, log: UndoLog, page: int
) -> UndoImageStats:
    """The undo image of a finished apply; if it cannot be written, roll the apply back."""
    try:
        return _write_undo(path, before, log, page, "applied")
    except Exception as exc:
        try:
            rollback(session, log)
        except Exception as rb_exc:
            raise RollbackFailed(
                f"could not write the undo image to {path} ({exc}) and rolling back failed "
                f"({rb_exc}); pid {session.pid} may be inconsistent",
            ) from rb_exc
        raise ApplyFailed(
            f"could not write the undo image to {path} ({exc}); pid {session.pid} was rolled "
            "back to its state before the apply",
        ) from exc


def _tracking_state(image_dir: Path, pid: int) -> TrackerState | None:
    """The tracker state a tracked dump left for this pid, or None."""
    path = image_dir / TRACKING_FILE
    try:
        state = TrackerState.from_json(path.read_text())
    except (OSError, ValueError):
        return None
    return state if state.pid == pid else None


def _resume(
    session: Session, state: TrackerState | None
) -> tuple[DirtyTracker | None, npt.NDArray[np.uint64] | None]:
    """(tracker, dirty pages) from a saved state; (None, None) if there is none or it is lost
    (then ``--only-dirty`` falls back to comparing contents)."""
    if state is None:
        return None, None
    try:
        tracker = resume_tracker(session, state)
        return tracker, tracker.dirty_pages()
    except TrackingError as exc:
        logger.warning(
            "dirty tracking of pid %d lost (%s): comparing page contents", state.pid, exc
        )
        return None, None


def _save_tracking(image_dir: Path, state: TrackerState) -> None:
    # A read-only image directory keeps the older state: the tracker's descriptor is the same,
    # so the next apply still resumes it (and counts as written what changed since then).
    with contextlib.suppress(OSError):
        (image_dir / TRACKING_FILE).write_text(state.to_json() + "\n")

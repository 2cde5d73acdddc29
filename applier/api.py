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
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import numpy.typing as npt

from applier.dump import TRACKING_FILE
from applier.errors import VerifyFailed
from applier.execute import ApplyStats, Executor, rollback
from applier.plan import PARTS, Plan, SetRegs, make_plan
from applier.sides import image_task, live_task
from applier.undo import UndoLog
from formats.imagedir import ImageDir
from injector import Session, attach
from injector.tracking import DirtyTracker, TrackerState, TrackingError, resume_tracker

__all__ = ["ApplyResult", "apply", "diff", "parse_parts"]


@attrs.frozen
class ApplyResult:
    plan: Plan
    stats: ApplyStats
    dry_run: bool = False
    dirty_source: str | None = None  # "tracker:<backend>", "content" or None (all pages)


def parse_parts(text: str | None) -> tuple[str, ...]:
    """``--restore memory,layout`` -> ('memory', 'layout'); None/'all' -> every part."""
    if text is None or text.strip() in ("", "all"):
        return PARTS
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ValueError(f"unknown part {unknown[0]!r} (choose from {', '.join(PARTS)})")
    return parts


def _open(image_dir: str | os.PathLike[str]) -> ImageDir:
    return ImageDir.open(Path(image_dir))


def _cores(img: ImageDir, plan: Plan) -> dict[int, Any]:
    return {s.image_tid: img.core(s.image_tid) for s in plan.steps if isinstance(s, SetRegs)}


def diff(
    image_dir: str | os.PathLike[str],
    pid: int,
    *,
    task: int | None = None,
    parts: Iterable[str] = PARTS,
) -> Plan:
    """The plan that would make ``pid`` equal to the image; the target is not changed."""
    img = _open(image_dir)
    image = image_task(img, task)
    with attach(pid) as session:
        live = live_task(session, image.page_size)
        plan = make_plan(image, live, parts)
        Executor(session, plan, _cores(img, plan), UndoLog.disabled()).validate()
    return plan


def apply(
    image_dir: str | os.PathLike[str],
    pid: int,
    *,
    task: int | None = None,
    parts: Iterable[str] = PARTS,
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
    """
    img = _open(image_dir)
    image = image_task(img, task)
    state = _tracking_state(Path(image_dir), pid) if only_dirty else None
    log = (
        UndoLog.create(Path(undo_dir) if undo_dir is not None else None)
        if undo
        else UndoLog.disabled()
    )
    try:
        with attach(pid) as session:
            tracker, dirty = _resume(session, state)
            live = live_task(session, image.page_size, dirty=dirty)
            plan = make_plan(image, live, parts, dirty=dirty)
            executor = Executor(
                session,
                plan,
                _cores(img, plan),
                log,
                only_dirty=only_dirty and dirty is None,
                progress=progress,
            )
            source = (
                f"tracker:{tracker.backend_name}"
                if tracker
                else ("content" if only_dirty else None)
            )
            try:
                if dry_run:
                    executor.validate()
                    return ApplyResult(plan, executor.stats, dry_run=True, dirty_source=source)
                stats = executor.run()
                if verify:
                    try:
                        executor.verify()
                    except VerifyFailed:
                        if log.enabled:
                            rollback(session, log)
                        raise
            except BaseException:
                if tracker is not None:
                    tracker.release()  # keep tracking: the target is as it was
                raise
            if tracker is not None:
                # The target now equals the image: "written since" starts again from here.
                tracker.reset()
                _save_tracking(Path(image_dir), tracker.release())
            return ApplyResult(plan, stats, dirty_source=source)
    finally:
        log.close()


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
    except TrackingError:
        return None, None


def _save_tracking(image_dir: Path, state: TrackerState) -> None:
    # A read-only image directory keeps the older state: the tracker's descriptor is the same,
    # so the next apply still resumes it (and counts as written what changed since then).
    with contextlib.suppress(OSError):
        (image_dir / TRACKING_FILE).write_text(state.to_json() + "\n")

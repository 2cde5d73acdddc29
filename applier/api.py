"""The Python API: ``diff`` (plan only) and ``apply`` (plan, execute, verify), one call each.

>>> from applier.api import apply
>>> result = apply("checkpoint/", pid)          # revert pid to the checkpoint
>>> result.stats.pages_written

Everything is validated before the first byte is written: the whole image directory when it
is opened, the plan against the live layout, the files to map again and the registers to set.
The target is stopped for the duration of the call and always detached at the end.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import attrs

from applier.errors import VerifyFailed
from applier.execute import ApplyStats, Executor, rollback
from applier.plan import PARTS, Plan, SetRegs, make_plan
from applier.sides import image_task, live_task
from applier.undo import UndoLog

__all__ = ["ApplyResult", "apply", "diff", "parse_parts"]


@attrs.frozen
class ApplyResult:
    plan: Plan
    stats: ApplyStats
    dry_run: bool = False


def parse_parts(text: str | None) -> tuple[str, ...]:
    """``--restore memory,layout`` -> ('memory', 'layout'); None/'all' -> every part."""
    if text is None or text.strip() in ("", "all"):
        return PARTS
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ValueError(f"unknown part {unknown[0]!r} (choose from {', '.join(PARTS)})")
    return parts


def _open(image_dir: str | os.PathLike[str]) -> Any:
    from formats.imagedir import ImageDir

    return ImageDir.open(Path(image_dir))


def _cores(img: Any, plan: Plan) -> dict[int, Any]:
    return {s.image_tid: img.core(s.image_tid) for s in plan.steps if isinstance(s, SetRegs)}


def diff(
    image_dir: str | os.PathLike[str],
    pid: int,
    *,
    task: int | None = None,
    parts: Iterable[str] = PARTS,
) -> Plan:
    """The plan that would make ``pid`` equal to the image; the target is not changed."""
    from injector import attach

    img = _open(image_dir)
    image = image_task(img, task)
    with attach(pid) as session:
        live = live_task(session, image.page_size)
        plan = make_plan(image, live, parts)
        Executor(session, plan, _cores(img, plan), UndoLog.create()).validate()
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
    progress: bool = False,
) -> ApplyResult:
    """Revert ``pid`` to the checkpoint in ``image_dir``; roll back if anything fails."""
    from injector import attach

    img = _open(image_dir)
    image = image_task(img, task)
    undo = UndoLog.create(Path(undo_dir) if undo_dir is not None else None)
    try:
        with attach(pid) as session:
            live = live_task(session, image.page_size)
            plan = make_plan(image, live, parts)
            executor = Executor(
                session,
                plan,
                _cores(img, plan),
                undo,
                only_dirty=only_dirty,
                progress=progress,
            )
            if dry_run:
                executor.validate()
                return ApplyResult(plan, executor.stats, dry_run=True)
            stats = executor.run()
            if verify:
                try:
                    executor.verify()
                except VerifyFailed:
                    rollback(session, undo)
                    raise
            return ApplyResult(plan, stats)
    finally:
        undo.close()

"""Dirty-page tracking of a live process: one interface, three backends chosen by probing.

>>> with attach(pid) as s:
...     tracker = open_tracker(s)             # baseline: now
...     state = tracker.release()             # keep tracking after detach
>>> with attach(pid) as s:
...     tracker = resume_tracker(s, state)
...     pages = tracker.dirty_pages()         # sorted uint64 page addresses written since
...     tracker.reset()
...     tracker.close()                       # stop tracking, nothing left in the target

Backends, in the order ``backend="auto"`` tries them:

``uffd-wp``     userfaultfd async write-protection + ``PAGEMAP_SCAN`` (Linux 6.7+, any arch);
                the userfaultfd lives in the target, so tracking survives detach.
``soft-dirty``  ``/proc/PID/clear_refs`` + pagemap bit 55 (``CONFIG_MEM_SOFT_DIRTY``, x86_64).
``content``     a saved copy compared page by page; works everywhere, costs a full copy.

See docs/tracking.md for what each backend counts as written and what it cannot see.
"""

from __future__ import annotations

import os

from injector.process import Process
from injector.tracking.base import (
    DirtyTracker,
    PageArray,
    Pending,
    Range,
    TrackerLost,
    TrackerState,
    TrackerUnavailable,
    TrackingError,
)
from injector.tracking.content import ContentTracker
from injector.tracking.softdirty import SoftDirtyTracker, probe_soft_dirty
from injector.tracking.uffd import UffdWpTracker, probe_uffd_wp

__all__ = [
    "BACKENDS",
    "ContentTracker",
    "DirtyTracker",
    "PageArray",
    "Pending",
    "Range",
    "SoftDirtyTracker",
    "TrackerLost",
    "TrackerState",
    "TrackerUnavailable",
    "TrackingError",
    "UffdWpTracker",
    "open_tracker",
    "probe_backends",
    "resume_tracker",
]

BACKENDS = ("uffd-wp", "soft-dirty", "content")


def probe_backends() -> dict[str, str | None]:
    """Backend name -> ``None`` if it works on this kernel, else the measured reason why not.

    The probes run on memory of this process (each once per process) and touch no target.
    """
    return {
        "uffd-wp": probe_uffd_wp(),
        "soft-dirty": probe_soft_dirty(),
        "content": None,
    }


def open_tracker(
    session: Process, backend: str = "auto", *, in_target: bool = True
) -> DirtyTracker:
    """Start tracking the session's process; no page counts as written right after.

    ``in_target=False`` (uffd-wp): the userfaultfd is closed in the target and lives only in
    this process (see :class:`UffdWpTracker`); the other backends leave no descriptor anyway.

    ``backend="auto"`` takes the first backend in :data:`BACKENDS` that is available and
    opens for this target (a target whose own userfaultfd is refused, say, falls through).
    """
    if backend == "auto":
        reasons: list[str] = []
        for name in BACKENDS:
            try:
                return open_tracker(session, name, in_target=in_target)
            except TrackerUnavailable as exc:
                reasons.append(exc.message)
        raise TrackerUnavailable(session.pid, "; ".join(reasons))
    if backend == "uffd-wp":
        return UffdWpTracker.open(session, in_target=in_target)
    if backend == "soft-dirty":
        reason = probe_soft_dirty()
        if reason is not None:
            raise TrackerUnavailable(session.pid, f"soft-dirty: {reason}")
        return SoftDirtyTracker.open(session)
    if backend == "content":
        return ContentTracker.open(session)
    raise ValueError(f"unknown tracking backend {backend!r} (one of auto, {', '.join(BACKENDS)})")


def resume_tracker(session: Process, state: TrackerState, *, fd: int | None = None) -> DirtyTracker:
    """Continue tracking from a :meth:`DirtyTracker.release` state in a new session.

    ``fd``: a uffd-wp tracker's userfaultfd held outside the target (the tracker owns it).
    """
    if state.backend == "uffd-wp":
        return UffdWpTracker.resume(session, state, fd=fd)
    if fd is not None:
        os.close(fd)
    if state.backend == "soft-dirty":
        return SoftDirtyTracker.resume(session, state)
    raise TrackerLost(session.pid, f"backend {state.backend!r} cannot be resumed")

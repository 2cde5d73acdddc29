"""The tracker state a tracked dump leaves beside its image (``names.TRACKING``, not a CRIU
image: CRIU ignores it), so that a later ``apply --only-dirty`` knows which pages changed."""

from __future__ import annotations

import contextlib
from pathlib import Path

from formats import names
from injector.tracking import TrackerState

__all__ = ["drop_tracking", "load_tracking", "save_tracking"]


def load_tracking(image_dir: Path, pid: int | None = None) -> TrackerState | None:
    """The state saved in ``image_dir`` (for ``pid``, when given), or None."""
    try:
        state = TrackerState.from_json((image_dir / names.TRACKING).read_text())
    except (OSError, ValueError):
        return None
    return state if pid is None or state.pid == pid else None


def save_tracking(image_dir: Path, state: TrackerState, *, must: bool = True) -> None:
    """Record ``state`` in ``image_dir``. ``must=False``: a read-only image directory keeps
    the older state (the tracker's descriptor is the same, so the next apply still resumes
    it and counts as written what changed since then)."""
    try:
        (image_dir / names.TRACKING).write_text(state.to_json() + "\n")
    except OSError:
        if must:
            raise


def drop_tracking(image_dir: Path) -> None:
    """Forget the state saved in ``image_dir`` (its baseline has moved elsewhere)."""
    with contextlib.suppress(FileNotFoundError):
        (image_dir / names.TRACKING).unlink()

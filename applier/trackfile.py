"""The tracker state a tracked dump leaves beside its image (``names.TRACKING``, not a CRIU
image: CRIU ignores it), so that a later ``apply --only-dirty`` knows which pages changed.

Beside the :class:`TrackerState` the file keeps ``baseline``: the token of the moment this
image's tracking started from. A tracker held outside the target (``applier.holder``) knows
the token of the image that owns its baseline now; when another dump moves the baseline on,
the tokens differ and this file's state is no longer used (the pages it would call clean are
only clean since the newer image).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from formats import names
from injector.tracking import TrackerState

__all__ = ["drop_tracking", "load_baseline", "load_tracking", "save_tracking"]

BASELINE = "baseline"


def _load(image_dir: Path) -> dict[str, object] | None:
    try:
        data = json.loads((image_dir / names.TRACKING).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def load_tracking(image_dir: Path, pid: int | None = None) -> TrackerState | None:
    """The state saved in ``image_dir`` (for ``pid``, when given), or None."""
    data = _load(image_dir)
    if data is None:
        return None
    data.pop(BASELINE, None)
    try:
        state = TrackerState.from_json(json.dumps(data))
    except ValueError:
        return None
    return state if pid is None or state.pid == pid else None


def load_baseline(image_dir: Path) -> str | None:
    """The baseline token saved in ``image_dir``, or None."""
    data = _load(image_dir)
    token = None if data is None else data.get(BASELINE)
    return token if isinstance(token, str) else None


def save_tracking(
    image_dir: Path, state: TrackerState, *, baseline: str | None = None, must: bool = True
) -> None:
    """Record ``state`` in ``image_dir`` (with the ``baseline`` token; None keeps the one the
    file has). ``must=False``: a read-only image directory keeps the older state (the
    tracker's descriptor is the same, so the next apply still resumes it and counts as written
    what changed since then)."""
    if baseline is None:
        baseline = load_baseline(image_dir)
    data = json.loads(state.to_json())
    if baseline is not None:
        data[BASELINE] = baseline
    try:
        (image_dir / names.TRACKING).write_text(json.dumps(data, sort_keys=True) + "\n")
    except OSError:
        if must:
            raise


def drop_tracking(image_dir: Path) -> None:
    """Forget the state saved in ``image_dir`` (its baseline has moved elsewhere)."""
    with contextlib.suppress(FileNotFoundError):
        (image_dir / names.TRACKING).unlink()

"""Where applier keeps its lock files, journals and holder sockets: ``/run/applier`` when it
can be created (root), else ``$XDG_RUNTIME_DIR/applier`` or ``/tmp/applier-<uid>``.

Standard library only, ``os`` alone on the common path: the ``applier`` command looks here
for a tracker holder before it loads anything else (``applier.remote``).
"""

from __future__ import annotations

import os

__all__ = ["find_lock_dir"]

_found: dict[tuple[int, str | None], str] = {}


def find_lock_dir() -> str:
    """The lock directory (created on first use, mode 0700 outside /run); found once per
    process (and user and XDG_RUNTIME_DIR), checked to exist on every call."""
    key = (os.getuid(), os.environ.get("XDG_RUNTIME_DIR"))
    path = _found.get(key)
    if path is not None and os.path.isdir(path):
        return path
    _found[key] = path = _find()
    return path


def _usable(path: str) -> bool:
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return False
    try:
        st = os.stat(path)
    except OSError:
        return False
    return os.path.isdir(path) and os.access(path, os.W_OK) and st.st_uid == os.getuid()


def _find() -> str:
    if _usable("/run/applier"):
        return "/run/applier"
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and _usable(os.path.join(runtime, "applier")):
        return os.path.join(runtime, "applier")
    import tempfile  # noqa: PLC0415 - only where /run is not ours (4 ms)

    fallback = os.path.join(tempfile.gettempdir(), f"applier-{os.getuid()}")
    if _usable(fallback):
        return fallback
    raise OSError("no directory for applier's lock files")

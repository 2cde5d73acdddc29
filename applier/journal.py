"""The apply journal: what an apply in progress is doing, on disk, so that if applier dies
(``kill -9``, an OOM kill, a lost machine session) the held target can be finished.

An apply holds its target in a group stop under ptrace before its first write
(:meth:`injector.tracer.Tracer.hold`): if applier dies, the kernel leaves the target stopped
and untraced, never running half-applied. The journal, written before the hold, says which
image was being applied, how, by whom, and whether the target had been stopped before.
``applier recover PID`` (or the next apply of that process) reads it and applies the image
again: the image is on disk already, and an apply makes the process equal to it from any
state, so finishing needs no record of what was written. It then continues the target
(unless it had been stopped before) and removes the journal.

Journals live beside the lock files (``applier.lock.lock_dir``), one per target process,
named after its pid and start time.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
from pathlib import Path

import attrs

from applier.lock import lock_dir
from injector.procfs import read_start_time, thread_state

__all__ = ["Journal"]

FORMAT = "applier-journal/1"


def _path(pid: int, start_time: int) -> Path:
    return lock_dir() / f"journal-{pid}-{start_time}.json"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_pruned: set[Path] = set()  # the journal directories pruned by this process


def _prune() -> None:
    """Remove the journals, hold marks and lock files left by appliers that died (``kill
    -9``) for processes that are gone (nothing is left to finish there, and nobody can
    want a lock on them); once per process and directory (a Checkpoint applies many times)."""
    if lock_dir() in _pruned:
        return
    _pruned.add(lock_dir())
    d = lock_dir()
    for path in [*d.glob("journal-*-*.json"), *d.glob("journal-*-*.held"), *d.glob("*-*-*.lock")]:
        try:
            _, pid, start = path.stem.split("-")
            alive = read_start_time(int(pid)) == int(start)
        except (ValueError, OSError):
            alive = False
        if not alive:
            with contextlib.suppress(OSError):
                path.unlink()


@attrs.frozen
class Journal:
    """One apply in progress on process ``pid``."""

    pid: int
    start_time: int
    image: str  # absolute path of the image directory
    task: int | None
    parts: tuple[str, ...]
    only_dirty: bool
    leave_shared: bool
    was_stopped: bool  # the target was stopped (SIGSTOP, Ctrl-Z) before the apply held it
    applier_pid: int
    started: float  # time.time() when the apply began

    @functools.cached_property
    def path(self) -> Path:
        return _path(self.pid, self.start_time)

    def write(self, *, replace: bool = True) -> None:
        """Write (or replace) the journal atomically. Without ``replace`` (there is no
        journal to replace) it is created in place, which a reader never mistakes: one that
        applier died writing does not parse, so it counts as none, and applier had not
        held the target yet."""
        doc = {"format": FORMAT, **attrs.asdict(self)}
        data = (json.dumps(doc, indent=1) + "\n").encode()
        if not replace:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                pass  # one left half-written: replaced
            else:
                try:
                    os.write(fd, data)
                finally:
                    os.close(fd)
                return
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, self.path)

    @functools.cached_property
    def held_mark(self) -> Path:
        return self.path.with_suffix(".held")

    def mark_held(self) -> None:
        """Record that the target is held: from here on the apply may write, so a journal
        whose applier died is kept for ``recover`` even if someone continues the target."""
        os.close(os.open(self.held_mark, os.O_WRONLY | os.O_CREAT, 0o600))

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        with contextlib.suppress(FileNotFoundError):
            self.held_mark.unlink()

    @classmethod
    def begin(
        cls,
        pid: int,
        image: Path,
        *,
        task: int | None,
        parts: tuple[str, ...],
        only_dirty: bool,
        leave_shared: bool,
        was_stopped: bool,
        start_time: int | None = None,
        replace: bool = True,
    ) -> Journal:
        """Write the journal of an apply that starts now. ``start_time``: the target's, if
        the caller has read it already; ``replace=False``: the caller found no journal for
        it (``find``), so there is none to replace atomically."""
        journal = cls(
            pid=pid,
            start_time=read_start_time(pid) if start_time is None else start_time,
            image=os.path.abspath(image),
            task=task,
            parts=parts,
            only_dirty=only_dirty,
            leave_shared=leave_shared,
            was_stopped=was_stopped,
            applier_pid=os.getpid(),
            started=time.time(),
        )
        _prune()
        journal.write(replace=replace)
        return journal

    @classmethod
    def find(cls, pid: int, start_time: int | None = None) -> Journal | None:
        """The journal of the process ``pid`` is now (None if there is none, if it belongs to
        an earlier process with that pid, or if its applier died before holding the target:
        such a journal is removed). ``start_time``: the process's, if the caller has read it."""
        try:
            path = _path(pid, read_start_time(pid) if start_time is None else start_time)
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or data.pop("format", None) != FORMAT:
            return None
        try:
            data["parts"] = tuple(data["parts"])
            journal = cls(**data)
        except TypeError:
            return None
        if (
            not journal.held_mark.exists()
            and not _alive(journal.applier_pid)
            and thread_state(pid) not in ("T", "t")
        ):
            # Its applier died before it held the target (a held one would be stopped, and
            # one killed between the hold and the mark is): nothing was written.
            journal.remove()
            return None
        return journal

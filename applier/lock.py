"""Claims on a target process that other applier processes can see: an exclusive ``flock`` on
a small file named after the target's pid and start time (a reused pid gets another file).

Two kinds of claim exist, each its own file:

* ``work``: held while an apply or a dump has the target stopped; a second one is refused
  with a message that names the applier holding it (not "detach gdb first");
* ``checkpoint``: held by an open :class:`applier.fixture.Checkpoint` for as long as it lives,
  so two test workers that were handed the same server by accident are told so, instead of
  resetting each other's state.

The lock files live in ``/run/applier`` when it can be created (root), else in
``$XDG_RUNTIME_DIR/applier`` or ``/tmp/applier-<uid>``. A lock is released when its holder
releases it (the file is removed) or dies (the kernel drops ``flock`` locks with the last
descriptor; the file stays until the next claim of that process takes and removes it).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from applier.errors import TargetBusy
from applier.lockdir import find_lock_dir
from injector.procfs import read_start_time

__all__ = ["KeptClaim", "TargetBusy", "TargetLock", "lock_dir"]


def lock_dir() -> Path:
    """Where lock files are kept (``applier.lockdir``)."""
    return Path(find_lock_dir())


def _start_time(pid: int) -> str:
    try:
        return str(read_start_time(pid))
    except OSError:
        return "gone"


class TargetLock:
    """An exclusive claim of ``kind`` on process ``pid``; ``acquire`` or raise TargetBusy."""

    def __init__(self, fd: int, path: Path, pid: int = 0) -> None:
        self._fd = fd
        self.path = path
        self.pid = pid

    @classmethod
    def acquire(cls, pid: int, kind: str, purpose: str) -> TargetLock:
        """Claim ``pid`` for ``purpose`` (shown to whoever is refused next)."""
        path = lock_dir() / f"{kind}-{pid}-{_start_time(pid)}.lock"
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 512, 0).decode(errors="replace").strip()
                os.close(fd)
                raise TargetBusy(f"pid {pid} is busy: {holder or 'another applier'}") from None
            except BaseException:
                os.close(fd)
                raise
            # The holder before us may have unlinked the file after we opened it: then our
            # lock is on a file nobody else will find. Start over on the one at the path.
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        argv = " ".join(sys.argv[:3]) if sys.argv and sys.argv[0] else "python"
        note = f"{purpose} by applier pid {os.getpid()} ({argv})".encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, note, 0)
        return cls(fd, path, pid)

    def unlock(self) -> None:
        """Let the claim go but keep the file open, to claim it again with ``relock``."""
        if self._fd >= 0:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def relock(self) -> bool:
        """Claim again after ``unlock`` (raises TargetBusy); False if the file is not the one
        at the path any more (another applier took it meanwhile and removed it on release):
        this lock is then closed, and only a new ``acquire`` claims the process."""
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 512, 0).decode(errors="replace").strip()
            raise TargetBusy(f"pid {self.pid} is busy: {holder or 'another applier'}") from None
        try:
            same = os.stat(self.path).st_ino == os.fstat(self._fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(self._fd)
            self._fd = -1
        return same

    def release(self) -> None:
        """Let the claim go and remove the file (idempotent); removed while still locked, so
        that a process that opened it meanwhile notices (``acquire`` checks) and retries."""
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                self.path.unlink()
            os.close(self._fd)
            self._fd = -1

    def close_unlocked(self) -> None:
        """End an ``unlock``-ed claim: removed if it can be locked again at once, else (another
        applier holds it now, and removes it itself) only closed."""
        if self._fd < 0:
            return
        try:
            held = self.relock()
        except TargetBusy:
            os.close(self._fd)
            self._fd = -1
            return
        if held:
            self.release()

    def __enter__(self) -> TargetLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class KeptClaim:
    """A claim of ``kind`` on ``pid`` taken for each of many operations of one process (a
    Checkpoint's restores): the lock file stays open between them, locked only during each
    (which saves creating and removing it every time)."""

    def __init__(self, pid: int, kind: str) -> None:
        self.pid = pid
        self.kind = kind
        self._lock: TargetLock | None = None

    @contextlib.contextmanager
    def held(self, purpose: str) -> Iterator[None]:
        lock = self._lock
        if lock is None or not lock.relock():
            lock = self._lock = TargetLock.acquire(self.pid, self.kind, purpose)
        try:
            yield
        finally:
            lock.unlock()

    def close(self) -> None:
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.close_unlocked()

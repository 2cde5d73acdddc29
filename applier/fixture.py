"""Checkpoints for resetting a live process many times: test fixtures, warmed-up servers.

>>> with Checkpoint.take(server.pid) as cp:   # dump + dirty tracking, once
...     for case in cases:
...         run(case, server)                 # the server changes its memory
...         cp.restore()                      # back to the checkpoint, in place, fast

``take`` writes a CRIU image of the process and starts a dirty-page tracker on it, so each
``restore`` writes only the pages written since the previous one (``apply --only-dirty``).
The tracker's userfaultfd is kept in *this* process, never in the target (a holder's,
borrowed, if ``applier dump --track`` left one running). ``close`` stops the tracker and
deletes the image if ``take`` made a temporary one. The process keeps its pid, sockets and
open files throughout.

One process has at most one open Checkpoint at a time, across all processes (a
``checkpoint`` claim of ``applier.lock``): a second ``take`` of the same process, say by
another pytest-xdist worker that was handed the same server, raises ``TargetBusy`` instead of
letting the two reset each other's state.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

import attrs

from applier.api import Prepared
from applier.dump import DumpStats, dump_tracked
from applier.errors import RollbackFailed
from applier.executor import ApplyStats
from applier.lock import TargetLock
from applier.parts import Part
from applier.trackfile import load_tracking
from injector.errors import InjectorError
from injector.session import attach
from injector.tracking import resume_tracker

__all__ = ["Checkpoint"]

logger = logging.getLogger(__name__)


@attrs.define
class Checkpoint:
    """A checkpoint of process ``pid`` kept in ``path``, restorable in place."""

    pid: int
    path: Path
    dump_stats: DumpStats
    owns_path: bool = False
    restores: int = 0
    closed: bool = False
    claim: TargetLock | None = None
    prepared: Prepared | None = None

    @classmethod
    def take(
        cls, pid: int, directory: str | os.PathLike[str] | None = None, *, label: str = ""
    ) -> Checkpoint:
        """Checkpoint ``pid`` now (into ``directory``, or a temporary one) and start tracking.
        ``label`` names the owner in the refusal another ``take`` of the same pid gets (the
        pytest plugin passes its xdist worker id)."""
        claim = TargetLock.acquire(
            pid, "checkpoint", f"checkpointed ({label})" if label else "checkpointed"
        )
        owns = directory is None
        try:
            if directory is None:
                path = Path(tempfile.mkdtemp(prefix=f"applier-{pid}-"))
            else:
                path = Path(directory)
            try:
                stats, tracker, borrowed = dump_tracked(pid, path)
            except BaseException:
                if owns:
                    shutil.rmtree(path, ignore_errors=True)
                raise
        except BaseException:
            claim.release()
            raise
        checkpoint = cls(pid, path, stats, owns_path=owns, claim=claim)
        try:
            checkpoint.prepared = Prepared(path, pid, tracker=tracker, borrowed=borrowed)
        except BaseException:
            if tracker is not None:
                tracker.release()  # the last copy of an own tracker: tracking ends
            checkpoint.close()
            raise
        return checkpoint

    @property
    def tracked(self) -> bool:
        """Whether restores can use the dirty tracker (else they compare contents)."""
        return load_tracking(self.path, self.pid) is not None

    def restore(
        self,
        *,
        parts: Part | Iterable[str] = Part.ALL,
        verify: bool = False,
        undo: bool = False,
        keep_fds: Iterable[int] = (),
    ) -> ApplyStats:
        """Put the process back to the checkpoint (only the pages changed since last time).

        By default a restore neither keeps an undo log nor reads its writes back: the state
        it goes to is the checkpoint itself, on disk, so a restore that fails part-way is
        finished by applying the checkpoint once more (roll forward) rather than undone; the
        kernel's count of bytes written is checked on every write. If that second attempt
        fails too, the process stays held (stopped, untraced) with a journal, and
        ``applier recover PID`` finishes it. ``verify=True`` reads every written page back;
        ``undo=True`` rolls a failed restore back to the state before it instead.
        ``keep_fds``: descriptor numbers left exactly as they are (``--keep-fd``)."""
        if self.closed:
            raise ValueError(f"checkpoint of pid {self.pid} is closed")
        assert self.prepared is not None
        try:
            result = self.prepared.apply(parts=parts, verify=verify, undo=undo, keep_fds=keep_fds)
        except RollbackFailed as exc:
            if undo:
                raise
            logger.warning(
                "restore of pid %d failed (%s): applying the checkpoint again", self.pid, exc
            )
            result = self.prepared.apply(parts=parts, verify=True, undo=False, keep_fds=keep_fds)
        self.restores += 1
        return result.stats

    def close(self) -> None:
        """Stop the tracker inside the process (if it still runs) and drop a temporary image."""
        if self.closed:
            return
        self.closed = True
        try:
            # The process may have exited (a fixture torn down first), or the tracker may be
            # gone: nothing left to stop then.
            if self.prepared is not None:
                self.prepared.close()
            else:
                state = load_tracking(self.path, self.pid)
                if state is not None:
                    with contextlib.suppress(InjectorError), attach(self.pid) as session:
                        resume_tracker(session, state).close()
        finally:
            self._drop()

    def _drop(self) -> None:
        if self.owns_path:
            shutil.rmtree(self.path, ignore_errors=True)
        if self.claim is not None:
            self.claim.release()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

"""The executor: carries out a plan inside one stopped process, as one transaction.

It owns the whole sequence (``apply``): validate everything that needs the live process
before the first write; run the steps, each recording its inverse in the undo log before it
changes anything; read back and compare (``verify``); keep the undo image when asked for one.
If a step fails, verification finds a difference or the undo image cannot be written, the log
is replayed newest first (``rollback``) and the error says whether the target is back as it
was (ApplyFailed, exit 6), could not be put back (RollbackFailed, 7), or differed (VerifyFailed,
8). ``applier.api`` only opens the image and the process and closes them again.

Each step's work has one home, a handler per step class in the tables below: ``layout``
(brk, mm fields, mappings, protections, discards), ``pages`` (saved pages), ``shmem``
(shared memory), ``registers``, ``threads`` (ending and creating threads), ``fds``
(descriptors; the copies it parks are closed once the apply is done, ``fds.commit``),
``signals`` (dispositions, blocked masks); ``rollback`` has one inverse per undo record.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

from applier.errors import ApplyFailed, RollbackFailed, TargetGone, VerifyFailed
from applier.executor import fds, layout, pages, registers, shmem, signals, threads
from applier.executor.context import ApplyStats, Context
from applier.executor.rollback import rollback
from applier.plan import (
    CloseFd,
    Discard,
    DupFd,
    EndThread,
    MapAnon,
    MapFile,
    NewThread,
    Plan,
    Protect,
    ReopenFd,
    ResetFd,
    SetBrk,
    SetMm,
    SetRegs,
    SetSigactions,
    SetSigmask,
    Step,
    Unmap,
    WritePages,
    WriteShared,
)
from applier.undo.log import UndoLog
from formats.core import CoreEntry
from injector.errors import TargetExited
from injector.process import Process
from injector.tracer import signals_deferred

__all__ = ["ApplyStats", "Executor", "UndoKeeper"]

Handler = Callable[[Context, Any], None]

_RUN: dict[type[Step], Handler] = {
    SetBrk: layout.set_brk,
    SetMm: layout.set_mm,
    Unmap: layout.unmap,
    MapAnon: layout.map_new,
    MapFile: layout.map_new,
    Protect: layout.protect,
    Discard: layout.discard,
    WriteShared: shmem.write_shared,
    WritePages: pages.write_pages,
    SetRegs: registers.set_regs,
    CloseFd: fds.close_fd,
    ResetFd: fds.reset_fd,
    ReopenFd: fds.reopen_fd,
    DupFd: fds.dup_fd,
    SetSigactions: signals.set_sigactions,
    SetSigmask: signals.set_sigmask,
    EndThread: threads.end_thread,
    NewThread: threads.new_thread,
}
_VALIDATE: dict[type[Step], Handler] = {
    MapFile: layout.validate_map_file,
    ReopenFd: fds.validate_reopen,
    CloseFd: fds.validate_park,
    DupFd: fds.validate_park,
    WritePages: pages.validate_code,
    SetRegs: registers.validate_regs,
    EndThread: threads.validate_end,
    NewThread: threads.validate_new,
}
_VERIFY: dict[type[Step], Handler] = {
    WritePages: pages.verify_pages,
    Discard: layout.verify_discard,
    WriteShared: shmem.verify_shared,
    SetRegs: registers.verify_regs,
    CloseFd: fds.verify_close,
    ResetFd: fds.verify_reset,
    ReopenFd: fds.verify_reopen,
    DupFd: fds.verify_dup,
    SetSigactions: signals.verify_sigactions,
    SetSigmask: signals.verify_sigmask,
    EndThread: threads.verify_end,
    NewThread: threads.verify_new,
}


# Steps a signal may stop half-way: long page writes, which record their undo batch by batch.
_INTERRUPTIBLE = (WritePages, WriteShared)


class UndoKeeper(Protocol):
    """Writes the undo image of an apply (``applier.undo.image.UndoImageWriter``)."""

    def write(self, outcome: str) -> object:
        """Write it; ``outcome`` is "applied" or "rollback-failed". Raises on failure (and
        leaves nothing half-written)."""
        ...

    @property
    def where(self) -> str: ...


class Executor:
    """Carries out ``plan`` in ``process`` (see the module docstring)."""

    def __init__(
        self,
        process: Process,
        plan: Plan,
        cores: dict[int, CoreEntry],
        undo: UndoLog,
        *,
        only_dirty: bool = False,
        progress: bool = True,
        allow_code_writes: bool = False,
        keep_mapped: bool = False,
    ) -> None:
        self.ctx = Context(
            process,
            plan,
            cores,
            undo,
            only_dirty=only_dirty,
            progress=progress,
            allow_code_writes=allow_code_writes,
            keep_mapped=keep_mapped,
        )

    @property
    def stats(self) -> ApplyStats:
        return self.ctx.stats

    @property
    def cores(self) -> dict[int, CoreEntry]:
        return self.ctx.cores

    @property
    def pid(self) -> int:
        return self.ctx.process.pid

    def validate(self) -> None:
        """Checks that need the live process but change nothing; run before the first write."""
        for step in self.ctx.plan.steps:
            check = _VALIDATE.get(type(step))
            if check is not None:
                check(self.ctx, step)

    def _do(self, step: Step) -> None:
        if isinstance(step, _INTERRUPTIBLE):
            _RUN[type(step)](self.ctx, step)
            return
        # A few injected calls whose results the undo needs (an address, a descriptor, a
        # thread): a signal waits for the step's end, the rollback then undoes all of it.
        with signals_deferred():
            _RUN[type(step)](self.ctx, step)

    def run(self) -> ApplyStats:
        """Validate, then every step; on any failure roll back and raise (see the module)."""
        started = time.perf_counter()
        self.validate()
        try:
            for step in self.ctx.plan.steps:
                self._do(step)
        except BaseException as exc:
            self._rollback_after(exc)
            raise AssertionError("unreachable") from exc
        self.stats.seconds = time.perf_counter() - started
        return self.stats

    def verify(self) -> None:
        """Read back what was written and compare it with the image; raise VerifyFailed."""
        for step in self.ctx.plan.steps:
            check = _VERIFY.get(type(step))
            if check is not None:
                check(self.ctx, step)
        self.stats.verified = True

    def apply(self, *, verify: bool = True, keep: UndoKeeper | None = None) -> object | None:
        """The whole transaction: run, verify, keep the undo image; returns what ``keep``
        wrote (None without it). Whatever fails is rolled back where the log allows."""
        try:
            return self._transaction(verify=verify, keep=keep)
        finally:
            self.ctx.close()

    def _transaction(self, *, verify: bool, keep: UndoKeeper | None) -> object | None:
        undo = self.ctx.undo
        try:
            self.run()
        except RollbackFailed as exc:
            if keep is None or not undo.records:
                raise
            try:
                keep.write("rollback-failed")
            except Exception as undo_exc:
                raise RollbackFailed(
                    f"{exc}; writing the undo image to {keep.where} failed too ({undo_exc})"
                ) from exc
            raise RollbackFailed(
                f"{exc}; what the apply overwrote is in {keep.where}: "
                f"'applier apply {keep.where} --into {self.pid}' puts it back",
            ) from exc
        if verify:
            try:
                self.verify()
            except VerifyFailed as exc:
                if not undo.enabled:
                    raise
                with signals_deferred():
                    rollback(self.ctx.process, undo)
                raise VerifyFailed(
                    f"{exc}; pid {self.pid} was rolled back to its state before the apply"
                ) from exc
        if keep is None:
            fds.commit(self.ctx)
            return None
        try:
            kept = keep.write("applied")
        except Exception as exc:
            try:
                with signals_deferred():
                    rollback(self.ctx.process, undo)
            except Exception as rb_exc:
                raise RollbackFailed(
                    f"could not write the undo image to {keep.where} ({exc}) and rolling back "
                    f"failed ({rb_exc}); pid {self.pid} may be inconsistent",
                ) from rb_exc
            raise ApplyFailed(
                f"could not write the undo image to {keep.where} ({exc}); pid {self.pid} was "
                "rolled back to its state before the apply",
            ) from exc
        fds.commit(self.ctx)
        return kept

    def _rollback_after(self, exc: BaseException) -> None:
        pid = self.pid
        # A target killed a moment ago may not be a zombie yet; the injector's TargetExited
        # says so for certain.
        if isinstance(exc, TargetExited) or not self.ctx.process.alive():
            raise TargetGone(f"pid {pid} exited during the apply ({exc})") from exc
        if not self.ctx.undo.enabled:
            raise RollbackFailed(
                f"apply failed ({exc}) and was not rolled back (--no-undo); "
                f"pid {pid} may be inconsistent",
            ) from exc
        try:
            with signals_deferred():  # a second Ctrl-C does not stop the rollback
                rollback(self.ctx.process, self.ctx.undo)
        except TargetExited as rb_exc:
            raise TargetGone(f"pid {pid} exited during the apply ({exc})") from rb_exc
        except Exception as rb_exc:
            raise RollbackFailed(
                f"apply failed ({exc}) and rolling back failed too ({rb_exc}); "
                f"pid {pid} may be inconsistent",
            ) from rb_exc
        if isinstance(exc, KeyboardInterrupt):
            raise exc
        raise ApplyFailed(
            f"apply failed ({exc}); pid {pid} was rolled back to its state before the apply",
        ) from exc

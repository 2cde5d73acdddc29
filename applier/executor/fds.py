"""The descriptor steps, run as system calls inside the target: close, reset (lseek, F_SETFL,
F_SETFD), reopen (openat, lseek, dup3, close).

A descriptor the apply closes or replaces is first duplicated to a spare number above every
descriptor of the plan (``F_DUPFD_CLOEXEC``), so that a rollback can put the very same open
file back (a socket or pipe cannot be opened again); those parked copies are closed once the
apply is done (``commit``), which is when the peer of a closed socket sees EOF. Without an
undo log (``--no-undo``) nothing is parked: closes take effect at once.
"""

from __future__ import annotations

import errno
import logging
import os
import stat as stat_
from pathlib import Path

from applier.errors import MismatchError, VerifyFailed
from applier.executor.context import Context
from applier.plan import CloseFd, DupFd, ReopenFd, ResetFd
from applier.plan.steps import SETFL_MASK
from applier.undo.log import UndoFdClosed, UndoFdOpened, UndoFdState
from injector.errors import InjectorError
from injector.fdinfo import Descriptor, RegularFile
from injector.process import Process

__all__ = [
    "close_fd",
    "commit",
    "dup_fd",
    "reopen_fd",
    "reset_fd",
    "undo_closed",
    "undo_opened",
    "undo_state",
    "validate_park",
    "validate_reopen",
    "verify_close",
    "verify_dup",
    "verify_reopen",
    "verify_reset",
]

logger = logging.getLogger(__name__)

F_SETFD, F_SETFL, F_DUPFD_CLOEXEC = 2, 4, 1030
FD_CLOEXEC = 1
O_CLOEXEC = 0o2000000
SEEK_SET = 0
# Flags that mean something only when a file is created or first opened: never reused.
_OPEN_ONLY = 0o100 | 0o200 | 0o400 | 0o1000  # O_CREAT, O_EXCL, O_NOCTTY, O_TRUNC


def _park(ctx: Context, fd: int, spare: int, cloexec: bool) -> None:
    """Keep the open file at ``fd`` alive at a spare number until the apply is done."""
    if not ctx.undo.enabled:
        return
    parked = ctx.process.fcntl(fd, F_DUPFD_CLOEXEC, spare)
    ctx.undo.add(UndoFdClosed(fd, parked, cloexec))
    ctx.parked.append(parked)


def close_fd(ctx: Context, step: CloseFd) -> None:
    _park(ctx, step.fd.fd, step.spare, step.fd.cloexec)
    ctx.process.close(step.fd.fd)
    ctx.stats.fd_changes += 1


def reset_fd(ctx: Context, step: ResetFd) -> None:
    p, fd = ctx.process, step.fd
    ctx.undo.add(
        UndoFdState(
            fd,
            None if step.pos is None else step.pos[0],
            None if step.flags is None else step.flags[0],
            None if step.cloexec is None else step.cloexec[0],
        )
    )
    if step.pos is not None:
        p.lseek(fd, step.pos[1], SEEK_SET)
    if step.flags is not None:
        p.fcntl(fd, F_SETFL, step.flags[1] & SETFL_MASK)
    if step.cloexec is not None:
        p.fcntl(fd, F_SETFD, FD_CLOEXEC if step.cloexec[1] else 0)
    ctx.stats.fd_changes += 1


def reopen_fd(ctx: Context, step: ReopenFd) -> None:
    p, fd = ctx.process, step.fd
    if step.replaces is not None:
        _park(ctx, fd, step.spare, step.replaces.cloexec)  # dup3 below closes it
    else:
        ctx.undo.add(UndoFdOpened(fd))
    tmp = p.openat(step.path, (step.flags & ~_OPEN_ONLY) | O_CLOEXEC, 0)
    try:
        if step.pos:
            p.lseek(tmp, step.pos, SEEK_SET)
        if tmp != fd:
            p.call("dup3", tmp, fd, O_CLOEXEC if step.cloexec else 0)
        elif not step.cloexec:
            p.fcntl(fd, F_SETFD, 0)
    finally:
        if tmp != fd:
            p.close(tmp)
    ctx.stats.fd_changes += 1


def dup_fd(ctx: Context, step: DupFd) -> None:
    if step.replaces is not None:
        _park(ctx, step.fd, step.spare, step.replaces.cloexec)  # dup3 below closes it
    else:
        ctx.undo.add(UndoFdOpened(step.fd))
    ctx.process.call("dup3", step.source.fd, step.fd, O_CLOEXEC if step.cloexec else 0)
    ctx.stats.fd_changes += 1


def commit(ctx: Context) -> None:
    """Close the parked copies: the apply is done and will not be rolled back."""
    parked, ctx.parked = ctx.parked, []
    for fd in parked:
        try:
            ctx.process.close(fd)
        except InjectorError as exc:
            logger.warning("pid %d: closing parked descriptor %d: %s", ctx.process.pid, fd, exc)


# ---- before the first write -------------------------------------------------------------------


def _nofile(pid: int) -> int | None:
    """The target's soft RLIMIT_NOFILE (None: unlimited or unreadable)."""
    try:
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                soft = line.split()[3]
                return None if soft == "unlimited" else int(soft)
    except (OSError, ValueError, IndexError):
        return None
    return None


def validate_park(ctx: Context, step: CloseFd | ReopenFd | DupFd) -> None:
    """Room above every descriptor of the plan for the copies kept for a rollback."""
    if not ctx.undo.enabled or (isinstance(step, ReopenFd | DupFd) and step.replaces is None):
        return
    parks = sum(
        isinstance(s, CloseFd) or (isinstance(s, ReopenFd | DupFd) and s.replaces is not None)
        for s in ctx.plan.steps
    )
    limit = _nofile(ctx.process.pid)
    if limit is not None and step.spare + parks > limit:
        raise MismatchError(
            f"pid {ctx.process.pid}: its descriptor limit (RLIMIT_NOFILE {limit}) leaves no "
            f"room above fd {step.spare - 1} for the {parks} descriptors a rollback would "
            "need; --no-undo closes them at once"
        )


def validate_reopen(ctx: Context, step: ReopenFd) -> None:
    """The file to reopen is still there, and of a kind that opens without blocking."""
    validate_park(ctx, step)
    hint = f"--keep-fd {step.fd} leaves it as it is"
    try:
        st = os.stat(step.path)
    except OSError as exc:
        raise MismatchError(
            f"fd {step.fd}: cannot reopen {step.path}: {exc.strerror}; {hint}"
        ) from exc
    if stat_.S_ISFIFO(st.st_mode) or stat_.S_ISSOCK(st.st_mode):
        raise MismatchError(f"fd {step.fd}: {step.path} is now a FIFO or socket; {hint}")


# ---- rollback ---------------------------------------------------------------------------------


def undo_closed(process: Process, rec: UndoFdClosed) -> None:
    process.call("dup3", rec.parked, rec.fd, O_CLOEXEC if rec.cloexec else 0)
    process.close(rec.parked)


def undo_opened(process: Process, rec: UndoFdOpened) -> None:
    try:
        process.close(rec.fd)
    except InjectorError as exc:
        if exc.errno != errno.EBADF:  # not opened yet when the step failed
            raise


def undo_state(process: Process, rec: UndoFdState) -> None:
    if rec.pos is not None:
        process.lseek(rec.fd, rec.pos, SEEK_SET)
    if rec.flags is not None:
        process.fcntl(rec.fd, F_SETFL, rec.flags & SETFL_MASK)
    if rec.cloexec is not None:
        process.fcntl(rec.fd, F_SETFD, FD_CLOEXEC if rec.cloexec else 0)


# ---- read back --------------------------------------------------------------------------------


def _table(ctx: Context) -> dict[int, Descriptor]:
    if ctx.fd_table is None:
        ctx.fd_table = {d.fd: d for d in ctx.process.descriptors(sock_diag=False)}
    return ctx.fd_table


def _fail(ctx: Context, fd: int, what: str) -> VerifyFailed:
    return VerifyFailed(f"pid {ctx.process.pid}: fd {fd} {what} after the apply")


def verify_close(ctx: Context, step: CloseFd) -> None:
    if step.fd.fd in _table(ctx):
        raise _fail(ctx, step.fd.fd, "is still open")


def _check(ctx: Context, fd: int, pos: int | None, flags: int | None, cloexec: bool) -> Descriptor:
    d = _table(ctx).get(fd)
    if d is None:
        raise _fail(ctx, fd, "is not open")
    if pos is not None and d.pos != pos:
        raise _fail(ctx, fd, f"is at position {d.pos}, not {pos},")
    if flags is not None and (d.file_flags & SETFL_MASK) != (flags & SETFL_MASK):
        raise _fail(ctx, fd, f"has flags {d.file_flags:#o}, not {flags:#o},")
    if d.cloexec != cloexec:
        raise _fail(ctx, fd, f"has close-on-exec {'on' if d.cloexec else 'off'}")
    return d


def verify_dup(ctx: Context, step: DupFd) -> None:
    d = _check(ctx, step.fd, None, None, step.cloexec)
    if step.source.what is not None and d.link.decode(errors="replace") != step.source.what:
        raise _fail(ctx, step.fd, f"is {d.link.decode(errors='replace')}, not {step.source.what},")


def verify_reset(ctx: Context, step: ResetFd) -> None:
    d = _table(ctx).get(step.fd)
    cloexec = step.cloexec[1] if step.cloexec is not None else (d is not None and d.cloexec)
    _check(
        ctx,
        step.fd,
        None if step.pos is None else step.pos[1],
        None if step.flags is None else step.flags[1],
        cloexec,
    )


def verify_reopen(ctx: Context, step: ReopenFd) -> None:
    d = _check(ctx, step.fd, step.pos, step.flags, step.cloexec)
    if not isinstance(d.kind, RegularFile) or d.kind.path != step.path:
        raise _fail(ctx, step.fd, f"is {d.link.decode(errors='replace')}, not {step.path},")
    if d.access_mode != step.flags & 3:
        raise _fail(ctx, step.fd, "has another access mode")

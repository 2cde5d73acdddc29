"""The descriptor table: image side + live side -> the steps that give the target its
checkpoint's descriptors back, or a refusal naming the one that cannot be. Pure.

For every descriptor number:

* open now, not at the checkpoint: closed (``CloseFd``). Kinds applier cannot tell the
  owner of (``UND``: userfaultfd, io_uring, fanotify ...; pidfds), which a dump does not
  record either, are left open with a note.
* a regular file (or directory, or device) open then and now on the same path with the same
  access mode (unlinked since or not): position, F_SETFL flags and close-on-exec set back
  where they differ (``ResetFd``).
* a regular file closed since, or replaced at its number by another file or object: opened
  again at that number (``ReopenFd``); whether the path still exists is checked before the
  first write (``executor.fds.validate_reopen``).
* a pipe or socket closed or replaced since but still open at another number (the program
  moved it, or an apply killed part-way parked it there): duplicated back (``DupFd``).
* anything else closed or replaced since (a pipe, socket, eventfd, epoll, timerfd ...): it
  cannot be re-created, and the apply is refused (``MismatchError``, exit 4), unless
  ``keep`` names it. Open then and now as the same object (same kind; pipes and sockets the
  same inode): its F_SETFL flags and close-on-exec are set back.

``keep`` (``--keep-fd``) are numbers left exactly as they are, either way.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from applier.errors import MismatchError
from applier.model import FdValue
from applier.plan.steps import SETFL_MASK, CloseFd, DupFd, FdStep, ReopenFd, ResetFd

__all__ = ["plan_fds"]

# Kinds a dump does not record and whose owner applier cannot know: never closed.
_UNKNOWN_KINDS = frozenset({"UND", "PIDFD", "NETLINKSK", "PACKETSK"})
_REOPENABLE = frozenset({"REG"})
# Image kinds this planner knows; others (a CRIU image's TTY, packet socket, pidfd, ...) are
# left as they are, with a note.
_MODELLED = frozenset({"REG", "PIPE", "FIFO", "INETSK", "UNIXSK", "EVENTFD", "EVENTPOLL",
                       "INOTIFY", "SIGNALFD", "TIMERFD", "MEMFD"})  # fmt: skip


def _what(v: FdValue) -> str:
    if v.path is not None:
        return f"{v.kind.lower()} file {v.path}" if v.kind != "REG" else v.path
    kind = {"PIPE": "pipe", "UNIXSK": "unix socket", "INETSK": "inet socket",
            "EVENTFD": "eventfd", "EVENTPOLL": "epoll", "SIGNALFD": "signalfd",
            "TIMERFD": "timerfd", "INOTIFY": "inotify", "MEMFD": "memfd",
            "FIFO": "fifo"}.get(v.kind, v.kind)  # fmt: skip
    return f"{kind} {v.ident}" if v.ident is not None else kind


_SOCKETS = frozenset({"UNIXSK", "INETSK", "NETLINKSK", "PACKETSK"})


def _same_object(then: FdValue, now: FdValue) -> bool:
    if now.kind == "SOCKET" and then.kind in _SOCKETS:  # a live socket of unknown family
        return then.ident == now.ident
    if then.kind != now.kind:
        return False
    if then.kind == "REG":
        # An unlinked file is still the one opened at that path (pytest's captured stderr).
        return then.path == now.path and (then.flags & 3) == (now.flags & 3)
    return then.ident is None or now.ident is None or then.ident == now.ident


def _reset(then: FdValue, now: FdValue) -> ResetFd | None:
    pos = (now.pos, then.pos) if then.kind == "REG" and now.pos != then.pos else None
    flags = None
    if (now.flags & SETFL_MASK) != (then.flags & SETFL_MASK):
        flags = (now.flags, then.flags)
    cloexec = (now.cloexec, then.cloexec) if now.cloexec != then.cloexec else None
    if pos is None and flags is None and cloexec is None:
        return None
    return ResetFd(then.fd, then.kind, then.path, pos=pos, flags=flags, cloexec=cloexec)


def plan_fds(
    image: Sequence[FdValue],
    live: Sequence[FdValue],
    keep: Collection[int] = (),
    notes: list[str] | None = None,
) -> list[FdStep]:
    """The descriptor steps, in execution order: closes, resets, reopens (by number)."""
    notes = [] if notes is None else notes
    then = {v.fd: v for v in image}
    now = {v.fd: v for v in live}
    spare = max([*then, *now, 2]) + 1
    dups: list[DupFd] = []
    closes: list[FdStep] = []
    resets: list[FdStep] = []
    reopens: list[FdStep] = []
    # numbers other steps write to: never the source of a dup (it would have moved)
    targets = {
        fd
        for fd, old in then.items()
        if fd not in keep and not (fd in now and _same_object(old, now[fd]))
    }
    for fd in sorted(set(then) | set(now)):
        old, cur = then.get(fd), now.get(fd)
        if fd in keep:
            notes.append(f"fd {fd} left as it is (--keep-fd)")
            continue
        if old is None:
            assert cur is not None
            if cur.kind in _UNKNOWN_KINDS:
                notes.append(
                    f"{cur.describe()}: opened since the checkpoint, of a kind the image "
                    "cannot record: left open"
                )
            else:
                closes.append(CloseFd(cur, spare))
            continue
        if old.kind not in _MODELLED:
            notes.append(f"fd {fd}: {old.kind} in the image, a kind not restored: left as it is")
            continue
        if cur is not None and _same_object(old, cur):
            step = _reset(old, cur)
            if step is not None:
                resets.append(step)
            continue
        if old.kind in _REOPENABLE and old.path is not None:
            reopens.append(
                ReopenFd(fd, old.path, old.flags, old.pos, old.cloexec, spare, replaces=cur)
            )
            continue
        source = _elsewhere(old, live, targets)
        if source is not None:
            dups.append(DupFd(fd, source, old.cloexec, spare, replaces=cur))
            continue
        if cur is None:
            raise MismatchError(
                f"fd {fd}: the {_what(old)} it held at the checkpoint was closed since and "
                f"cannot be re-created; --keep-fd {fd} leaves it as it is"
            )
        raise MismatchError(
            f"fd {fd}: the {_what(old)} it held at the checkpoint was replaced since by "
            f"{_what(cur)} and cannot be re-created; --keep-fd {fd} leaves it as it is"
        )
    return [*dups, *closes, *resets, *reopens]


def _elsewhere(old: FdValue, live: Sequence[FdValue], targets: set[int]) -> FdValue | None:
    """A live descriptor of the same pipe or socket as ``old`` (same inode and access mode),
    at a number no other step writes to."""
    if old.ident is None or old.kind not in _SOCKETS | {"PIPE", "FIFO"}:
        return None
    for v in live:
        if (
            v.fd not in targets
            and v.ident == old.ident
            and (v.kind == old.kind or (v.kind == "SOCKET" and old.kind in _SOCKETS))
            and (v.flags & 3) == (old.flags & 3)
        ):
            return v
    return None

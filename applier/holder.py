"""The dirty tracker kept out of the target: its userfaultfd lives in a holder process (the
command line) or in the calling process (the Python API), never in the target.

``applier dump --track`` creates the userfaultfd inside the target by an injected
``userfaultfd()`` (its context must be the target's mm), takes it out with ``pidfd_getfd``
and closes it in the target while the target is still stopped: the target never runs with a
descriptor it did not open, and stays dumpable by CRIU. Once the target is detached, a holder
(``applier/_holder_main.py``) is started with the descriptor. Later commands get a copy from
it over a unix socket in applier's lock directory (``holder-PID-START.sock``; SCM_RIGHTS,
peers of the same uid or root only): ``apply --only-dirty``, ``dump --parent``, and a second
``dump --track``, which reuses it (no second userfaultfd, no second holder). The holder ends
with the target, on ``applier untrack PID`` (:func:`stop`), or when killed; tracking ends
with it (the kernel drops the registrations with the last descriptor).

Each tracked dump that sets a new baseline gives it a token, saved beside the image
(``applier.trackfile``) and told to the holder: the state of an older image, whose baseline
has moved on, is then refused (``TrackerLost``: apply falls back to comparing contents, an
incremental dump refuses), never used to call pages clean that were written before the newer
image. An apply --only-dirty keeps the token (the baseline becomes that image's state again).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import struct
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from applier.lock import TargetBusy, TargetLock, lock_dir
from applier.trackfile import load_baseline
from injector.process import Process
from injector.procfs import read_start_time
from injector.tracking import (
    DirtyTracker,
    TrackerLost,
    TrackerState,
    TrackingError,
    UffdWpTracker,
    resume_tracker,
)

if TYPE_CHECKING:
    import subprocess

__all__ = [
    "CallerKeeper",
    "HolderError",
    "HolderInfo",
    "HolderKeeper",
    "Keeper",
    "checkpointed",
    "new_token",
    "resume",
    "set_baseline",
    "socket_path",
    "spawn",
    "status",
    "stop",
    "take",
]

TIMEOUT = 5.0  # seconds a holder may take to answer or to start
MAIN = Path(__file__).with_name("_holder_main.py")


class HolderError(TrackingError):
    """A holder that does not answer as it should (or cannot be started)."""


@attrs.frozen
class HolderInfo:
    """What a running holder says about itself and the tracker it keeps."""

    holder: int  # the holder's pid
    pid: int  # the target's
    start_time: int
    inode: int  # of the userfaultfd
    token: str  # the baseline it serves
    image: str  # the image directory that owns the baseline


def new_token() -> str:
    import secrets  # noqa: PLC0415 - only tracked dumps need it (and random, 2 ms)

    return secrets.token_hex(8)


def socket_path(pid: int, start_time: int) -> Path:
    return lock_dir() / f"holder-{pid}-{start_time}.sock"


def _start_time(pid: int, start_time: int | None) -> int | None:
    if start_time is not None:
        return start_time
    try:
        return read_start_time(pid)
    except OSError:
        return None


# Set in the holder itself when it runs applies (``serve_here``): (its info, the userfaultfd).
_HERE: tuple[dict[str, Any], int] | None = None


def serve_here(info: dict[str, Any], uffd: int) -> None:
    """In the holder process: requests for its own target are answered from ``info`` (shared
    with its serving loop) and ``uffd``, not over its socket, which it cannot answer while
    it runs an apply."""
    global _HERE  # noqa: PLW0603 - one holder per process
    _HERE = (info, uffd)


def _answer_here(
    pid: int, start: int, request: dict[str, Any], want_fd: bool
) -> tuple[HolderInfo, int | None] | None:
    assert _HERE is not None
    info, uffd = _HERE
    if request.get("op") == "set":
        info["token"], info["image"] = str(request["token"]), str(request["image"])
    if request.get("op") == "stop":
        raise HolderError(pid, "the tracker holder cannot stop itself while it applies")
    held = HolderInfo(
        holder=int(info["holder"]), pid=pid, start_time=start, inode=int(info["inode"]),
        token=str(info["token"]), image=str(info["image"]),
    )  # fmt: skip
    return held, os.dup(uffd) if want_fd else None


def _request(
    pid: int, start_time: int | None, request: dict[str, Any], *, want_fd: bool = False
) -> tuple[HolderInfo, int | None] | None:
    """Ask the holder of (pid, start time); None if none runs (a stale socket is removed)."""
    import socket  # noqa: PLC0415 - 2 ms, and only commands that track need it

    start = _start_time(pid, start_time)
    if start is None:
        return None
    if _HERE is not None and (_HERE[0]["pid"], _HERE[0]["start_time"]) == (pid, start):
        return _answer_here(pid, start, request, want_fd)
    try:
        path = socket_path(pid, start)
    except OSError:
        return None  # no lock directory: no holder either
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    fd: int | None = None
    try:
        sock.settimeout(TIMEOUT)
        try:
            sock.connect(str(path))
        except FileNotFoundError:
            return None
        except ConnectionRefusedError:
            with contextlib.suppress(OSError):  # its holder died without cleaning up
                path.unlink()
            return None
        except OSError as exc:
            raise HolderError(
                pid, f"cannot reach the tracker holder at {path}", exc.errno or 0
            ) from exc
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        # (the credentials of whoever called listen(): the dump that started the holder)
        _, uid, _ = struct.unpack("3i", creds)
        if uid not in (0, os.getuid()):
            raise HolderError(pid, f"{path} is served by uid {uid}, not by applier's user")
        try:
            sock.send(json.dumps(request).encode())
            if want_fd:
                data, fds, _, _ = socket.recv_fds(sock, 65536, 1, socket.MSG_CMSG_CLOEXEC)
                fd = fds[0] if fds else None
            else:
                data = sock.recv(65536)
            reply = json.loads(data)
            info = HolderInfo(
                holder=int(reply["holder"]),
                pid=int(reply["pid"]),
                start_time=int(reply["start_time"]),
                inode=int(reply["inode"]),
                token=str(reply["token"]),
                image=str(reply["image"]),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            reason = "no answer" if isinstance(exc, TimeoutError) else f"bad answer ({exc})"
            raise HolderError(pid, f"tracker holder at {path}: {reason}") from exc
        if info.pid != pid or info.start_time != start or not reply.get("ok"):
            raise HolderError(pid, f"tracker holder at {path} answers for another process")
        if want_fd and fd is None:
            raise HolderError(pid, f"tracker holder at {path} sent no descriptor")
        answer = (info, fd)
        fd = None  # the caller's now
        return answer
    finally:
        if fd is not None:
            os.close(fd)
        sock.close()


def status(pid: int, start_time: int | None = None) -> HolderInfo | None:
    """The holder of ``pid``'s tracker, if one runs."""
    got = _request(pid, start_time, {"op": "info"})
    return None if got is None else got[0]


@attrs.define
class _Kept:
    """A tracker this process keeps (``CallerKeeper``), and the baseline it serves."""

    tracker: UffdWpTracker
    token: str
    image: str


# (pid, start time) -> the tracker kept here: an apply in this process finds it as it
# would find a holder (a Checkpoint's image applied with ``apply(..., only_dirty=True)``).
_KEPT: dict[tuple[int, int], _Kept] = {}


def _kept(pid: int, start_time: int | None) -> _Kept | None:
    start = _start_time(pid, start_time)
    if start is None:
        return None
    kept = _KEPT.get((pid, start))
    if kept is not None and kept.tracker.closed:
        del _KEPT[(pid, start)]
        return None
    return kept


def take(pid: int, start_time: int | None = None) -> tuple[HolderInfo, int] | None:
    """A copy of the held userfaultfd (the caller closes it), or None if no holder runs.
    A tracker this process keeps itself counts as a holder (pid: this process)."""
    kept = _kept(pid, start_time)
    if kept is not None:
        t = kept.tracker
        info = HolderInfo(os.getpid(), pid, t.start_time, t.inode, kept.token, kept.image)
        return info, os.dup(t.local_fd)
    got = _request(pid, start_time, {"op": "get"}, want_fd=True)
    if got is None:
        return None
    info, fd = got
    assert fd is not None
    return info, fd


def set_baseline(pid: int, start_time: int, token: str, image: Path) -> HolderInfo:
    """Tell the holder that ``image`` (with ``token``) owns the baseline now."""
    kept = _kept(pid, start_time)
    if kept is not None:
        kept.token, kept.image = token, str(image)
        t = kept.tracker
        return HolderInfo(os.getpid(), pid, t.start_time, t.inode, token, str(image))
    got = _request(pid, start_time, {"op": "set", "token": token, "image": str(image)})
    if got is None:
        raise TrackerLost(pid, "its tracker holder is gone")
    return got[0]


def _wait_exit(pidfd: int, timeout: float) -> bool:
    ready, _, _ = select.select([pidfd], [], [], timeout)
    return bool(ready)


def stop(pid: int, start_time: int | None = None) -> HolderInfo | None:
    """End the holder of ``pid``'s tracker (and with it the tracking); wait until it has
    exited. None if none runs."""
    info = status(pid, start_time)
    if info is None:
        return None
    try:
        pidfd = os.pidfd_open(info.holder)
    except ProcessLookupError:
        return info
    try:
        if _request(pid, info.start_time, {"op": "stop"}) is not None and not _wait_exit(
            pidfd, TIMEOUT
        ):
            raise HolderError(pid, f"tracker holder {info.holder} did not exit")
    finally:
        os.close(pidfd)
    return info


def spawn(pid: int, start_time: int, uffd: int, token: str, image: Path) -> int:
    """Start a holder for ``uffd`` (not taken: the caller still closes its copy); returns the
    holder's pid once it serves."""
    import socket  # noqa: PLC0415 - only a first tracked dump starts one
    import subprocess  # noqa: PLC0415

    path = socket_path(pid, start_time)
    if len(os.fsencode(path)) >= 108:
        raise HolderError(pid, f"socket path {path} is too long")
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # a stale one: the caller found no holder answering there
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    pidfd = -1
    first: subprocess.Popen[bytes] | None = None
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    try:
        old = os.umask(0o177)
        try:
            listener.bind(str(path))
        finally:
            os.umask(old)
        listener.listen(16)
        pidfd = os.pidfd_open(pid)
        if read_start_time(pid) != start_time:
            raise TrackerLost(pid, "exited before its tracker holder started")
        config = {
            "pid": pid,
            "start_time": start_time,
            "uffd": uffd,
            "pidfd": pidfd,
            "socket": listener.fileno(),
            "ready": write_end,
            "path": str(path),
            "token": token,
            "image": str(image),
            # applies are run in the holder (applier.remote), with applier loaded from here
            "sys_path": [p for p in sys.path if p],
            "warm": True,
        }
        first = subprocess.Popen(
            [sys.executable, "-I", "-S", str(MAIN), json.dumps(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(uffd, pidfd, listener.fileno(), write_end),
            start_new_session=True,
            cwd="/",
        )
        os.close(write_end)
        write_end = -1
        first.wait(timeout=TIMEOUT)  # it forks the holder and exits: reaped here
        ready, _, _ = select.select([read_end], [], [], TIMEOUT)
        line = os.read(read_end, 64).decode() if ready else ""
        words = line.split()
        if len(words) != 2 or words[0] != "ready":
            raise HolderError(pid, f"tracker holder did not start (status {first.returncode})")
        return int(words[1])
    except BaseException:
        with contextlib.suppress(OSError):
            path.unlink()
        if first is not None:
            _end_started(first, read_end)
        raise
    finally:
        for fd in (read_end, write_end, pidfd):
            if fd >= 0:
                os.close(fd)
        listener.close()


def _end_started(first: subprocess.Popen[bytes], read_end: int) -> None:
    """A spawn interrupted (a signal, a timeout) after the holder was started: end it, so no
    holder is left serving a socket that is gone."""
    import subprocess  # noqa: PLC0415

    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        first.wait(timeout=TIMEOUT)
        ready, _, _ = select.select([read_end], [], [], TIMEOUT)
        words = os.read(read_end, 64).decode().split() if ready else []
        if len(words) == 2 and words[0] == "ready":
            os.kill(int(words[1]), 15)  # SIGTERM: it removes what it has and exits


def checkpointed(pid: int) -> str | None:
    """Who keeps an open :class:`applier.fixture.Checkpoint` of ``pid`` (its ``checkpoint``
    claim), or None. Its tracker's baseline must not move: a reset by someone else would
    make its next restore miss the pages written before that reset."""
    try:
        TargetLock.acquire(pid, "checkpoint", "probed by a tracked dump").release()
    except TargetBusy as exc:
        return str(exc)
    return None


def resume(process: Process, state: TrackerState, image_dir: Path) -> DirtyTracker:
    """The tracker of a saved state, wherever its descriptor is: in the target (older
    dumps, or soft-dirty: no descriptor at all) or in the holder. Raises ``TrackerLost`` when
    the holder is gone or serves a newer baseline than ``image_dir``'s."""
    if state.backend != UffdWpTracker.backend_name or state.remote_fd >= 0:
        return resume_tracker(process, state)
    pid = process.pid
    got = take(pid, state.start_time)
    if got is None:
        raise TrackerLost(
            pid, "no tracker holder runs for it (ended by 'applier untrack', or killed)"
        )
    info, fd = got
    if info.token != load_baseline(image_dir):
        os.close(fd)
        raise TrackerLost(pid, f"its tracking has moved on to the newer image {info.image}")
    return resume_tracker(process, state, fd=fd)


def reuse(process: Process) -> tuple[DirtyTracker, HolderInfo] | None:
    """The running tracker of the target, taken from its holder (for a new baseline: the
    caller resets it), or None if no holder runs."""
    pid = process.pid
    got = take(pid)
    if got is None:
        return None
    info, fd = got
    state = TrackerState(
        backend=UffdWpTracker.backend_name,
        pid=pid,
        start_time=info.start_time,
        remote_fd=-1,
        inode=info.inode,
    )
    return UffdWpTracker.resume(process, state, fd=fd), info


def wait_gone(holder: int, timeout: float = TIMEOUT) -> bool:
    """Whether the process ``holder`` has exited within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    try:
        pidfd = os.pidfd_open(holder)
    except ProcessLookupError:
        return True
    try:
        return _wait_exit(pidfd, max(0.0, deadline - time.monotonic()))
    finally:
        os.close(pidfd)


class Keeper:
    """Where a tracked dump's tracker goes: :class:`HolderKeeper` (the command line) or
    :class:`CallerKeeper` (the Python API)."""

    def keep(
        self, process: Process, tracker: DirtyTracker, out: Path, token: str, reused: bool
    ) -> None:
        """Take the tracker of ``out`` (reset, its state saved), in the dump's session."""
        raise NotImplementedError

    def finish(self) -> int | None:
        """After the target is detached: the holder's pid, if there is one."""
        return None


@attrs.define
class HolderKeeper(Keeper):
    """A holder process keeps the descriptor: the running one (told the new baseline), or a
    new one, started once the target runs again."""

    holder: int | None = None
    pending: tuple[int, int, int, str, Path] | None = None  # pid, start, fd, token, image

    def keep(
        self, process: Process, tracker: DirtyTracker, out: Path, token: str, reused: bool
    ) -> None:
        if not isinstance(tracker, UffdWpTracker):
            tracker.release()  # soft-dirty: its bits live in the page tables
            return
        if reused:
            set_baseline(tracker.pid, tracker.start_time, token, out.resolve())
            tracker.release()  # the holder keeps its copy
            return
        _, fd = tracker.hand_over()
        self.pending = (tracker.pid, tracker.start_time, fd, token, out.resolve())

    def finish(self) -> int | None:
        if self.pending is None:
            return self.holder
        pid, start, fd, token, image = self.pending
        self.pending = None
        try:
            self.holder = spawn(pid, start, fd, token, image)
        finally:
            os.close(fd)
        return self.holder

    def abandon(self) -> None:
        """The dump failed: drop a descriptor not yet given to a holder (tracking ends)."""
        if self.pending is not None:
            os.close(self.pending[2])
            self.pending = None


@attrs.define
class CallerKeeper(Keeper):
    """This process keeps the tracker (``applier.fixture.Checkpoint``): its own userfaultfd,
    or a copy borrowed from a running holder (``borrowed``: closing it then leaves the
    holder's tracking running)."""

    tracker: DirtyTracker | None = None
    borrowed: bool = False

    def keep(
        self, process: Process, tracker: DirtyTracker, out: Path, token: str, reused: bool
    ) -> None:
        if isinstance(tracker, UffdWpTracker):
            if reused:
                set_baseline(tracker.pid, tracker.start_time, token, out.resolve())
            else:
                key = (tracker.pid, tracker.start_time)
                _KEPT[key] = _Kept(tracker, token, str(out.resolve()))
        self.tracker, self.borrowed = tracker, reused

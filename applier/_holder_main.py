"""The tracker holder daemon: keeps one target's userfaultfd so that the target does not.

Started by :func:`applier.holder.spawn` as ``python -I -S _holder_main.py CONFIG`` (no site,
no environment: the standard library only, so it imports nothing of applier and starts in a
few ms), in a new session, with stdin/stdout/stderr on /dev/null and only these descriptors:
the userfaultfd, a pidfd of the target, the listening unix socket (bound by applier in its
lock directory, mode 0600) and the write end of a pipe that says "ready PID".

It forks once more and the first child exits (applier reaps it): the daemon is no session
leader (it can never get a controlling terminal) and nobody's child but init's (or a
subreaper's), so no zombie is left with applier. It never traces anything.

It ends when the target exits (its pidfd turns readable), on ``stop``, or on SIGTERM; it
removes its socket first. Requests (one JSON message per SOCK_SEQPACKET connection, from a
peer of the same uid or root only): ``info``, ``get`` (the reply carries the userfaultfd with
SCM_RIGHTS), ``set`` (a new baseline token and image), ``stop``.

With ``UFFD_FEATURE_WP_ASYNC`` the kernel resolves every write-protect fault itself, so no one
ever needs to read the userfaultfd: the target never waits on this process.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import signal
import socket
import struct
import sys
from types import FrameType
from typing import Any


def _stop(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def _peer_allowed(conn: socket.socket) -> bool:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, _ = struct.unpack("3i", creds)
    return uid in (0, os.getuid())


def _serve(config: dict[str, Any], uffd: int, pidfd: int, listener: socket.socket) -> None:
    info = {
        "holder": os.getpid(),
        "pid": config["pid"],
        "start_time": config["start_time"],
        "inode": os.fstat(uffd).st_ino,
        "token": config["token"],
        "image": config["image"],
    }
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    poller.register(listener.fileno(), select.POLLIN)
    while True:
        for fd, _ in poller.poll():
            if fd == pidfd:
                return  # the target exited
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(5)
                try:
                    if not _peer_allowed(conn):
                        continue
                    request = json.loads(conn.recv(65536) or b"{}")
                    op = request.get("op")
                    if op == "set":
                        info["token"] = str(request["token"])
                        info["image"] = str(request["image"])
                    reply = json.dumps({"ok": op in ("info", "get", "set", "stop"), **info})
                    if op == "get":
                        socket.send_fds(conn, [reply.encode()], [uffd])
                    else:
                        conn.send(reply.encode())
                except (OSError, ValueError, KeyError, AttributeError):
                    continue
                if op == "stop":
                    return


def main(argv: list[str]) -> int:
    config = json.loads(argv[1])
    if os.fork() > 0:
        os._exit(0)
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    os.chdir("/")
    with contextlib.suppress(OSError, AttributeError):  # a name ps shows: applier-holder
        ctypes.CDLL(None, use_errno=True).prctl(15, b"applier-holder", 0, 0, 0)  # PR_SET_NAME
    uffd, pidfd = int(config["uffd"]), int(config["pidfd"])
    listener = socket.socket(fileno=int(config["socket"]))
    path = str(config["path"])
    try:
        os.write(int(config["ready"]), f"ready {os.getpid()}\n".encode())
        os.close(int(config["ready"]))
        _serve(config, uffd, pidfd, listener)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        listener.close()
        os.close(uffd)
        os.close(pidfd)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

"""The tracker holder daemon: keeps one target's userfaultfd so that the target does not.

Started by :func:`applier.holder.spawn` as ``python -I -S _holder_main.py CONFIG`` (no site,
no environment: the standard library only, so it starts serving in a few ms; it loads
applier afterwards, for ``apply``), in a new session, with stdin/stdout/stderr on /dev/null
and only these descriptors:
the userfaultfd, a pidfd of the target, the listening unix socket (bound by applier in its
lock directory, mode 0600) and the write end of a pipe that says "ready PID".

It forks once more and the first child exits (applier reaps it): the daemon is no session
leader (it can never get a controlling terminal) and nobody's child but init's (or a
subreaper's), so no zombie is left with applier. It traces its target only while it runs an
``apply`` for a command.

It ends when the target exits (its pidfd turns readable), on ``stop``, or on SIGTERM; it
removes its socket first. Requests (one JSON message per SOCK_SEQPACKET connection, from a
peer of the same uid or root only): ``info``, ``get`` (the reply carries the userfaultfd with
SCM_RIGHTS), ``set`` (a new baseline token and image), ``stop``, and ``apply``.

``apply`` runs an ``applier apply`` command line for the target here, in a process that has
applier imported already and keeps the tracker itself (``applier.remote``): a reset from the
command line then costs what the apply costs, not the 300-400 ms of starting applier. The
request and the replies are ``applier.remote``'s frames (its output, then its exit status);
a peer of another uid than the holder's own is not served (the apply would run with the
holder's rights). Once the holder serves, it loads applier on a thread
(``config["sys_path"]``; until then it has the standard library only) so that the first
``apply`` is as fast as the next ones.

With ``UFFD_FEATURE_WP_ASYNC`` the kernel resolves every write-protect fault itself, so no one
ever needs to read the userfaultfd: the target never waits on this process.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
import os
import select
import signal
import socket
import struct
import sys
import threading
from types import FrameType
from typing import Any


def _stop(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, _ = struct.unpack("3i", creds)
    return int(uid)


_CHUNK = 32768  # bytes of output per message


def _drop_log_handlers() -> None:
    import logging  # noqa: PLC0415 - loaded with applier

    from applier.cli import LOGGERS  # noqa: PLC0415

    for name in LOGGERS:
        logger = logging.getLogger(name)
        for handler in logger.handlers:
            handler.close()
        logger.handlers.clear()


class _Applier:
    """applier's command line, loaded into the holder once (``warm``) and run for ``apply``
    requests with this holder's tracker (``applier.holder.serve_here``). It loads on a
    thread of its own while the holder already serves the tracker (``info``, ``get``): an
    ``apply`` waits for it, nothing else does."""

    def __init__(self, config: dict[str, Any], info: dict[str, Any], uffd: int) -> None:
        self.main: Any = None
        self.error = ""
        self._loader = threading.Thread(
            target=self._load, args=(config, info, uffd), name="applier-load", daemon=True
        )
        self._loader.start()

    def _load(self, config: dict[str, Any], info: dict[str, Any], uffd: int) -> None:
        paths = [str(p) for p in config.get("sys_path") or []]
        if not paths:
            self.error = "this holder was started without applier's import path"
            return
        sys.path[:0] = [p for p in paths if p not in sys.path]
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # numpy: no thread pool here
        try:
            from applier import api, holder, remote  # noqa: PLC0415
            from applier.cli import main  # noqa: PLC0415

            holder.serve_here(info, uffd)
            api.OPEN_IMAGES.enabled = True  # parsed once, while the files stay the same
            remote.SERVING = True
        except Exception as exc:  # an import that fails leaves applies to the command line
            self.error = f"applier could not be loaded here ({exc!r})"
            return
        self.main = main

    def ready(self) -> bool:
        """Wait until applier is loaded; whether it could be."""
        self._loader.join()
        return self.main is not None

    def run(self, conn: socket.socket, data: bytes) -> None:
        """One ``apply`` request (``applier.remote.request``): its output, then its status."""
        from applier import remote  # noqa: PLC0415 - loaded with applier (__init__)

        cwd, argv = remote.parse_request(data)
        out, err = io.StringIO(), io.StringIO()
        saved = sys.stdout, sys.stderr
        try:
            os.chdir(cwd)
            sys.stdout, sys.stderr = out, err
            try:
                rc = int(self.main(argv))
            except SystemExit as exc:  # argparse: usage errors, --help
                rc = exc.code if isinstance(exc.code, int) else 2
        finally:
            sys.stdout, sys.stderr = saved
            os.chdir("/")
            _drop_log_handlers()  # the command's (its -o FILE, its stderr): not kept open here
        for tag, text in ((remote.OUT, out.getvalue()), (remote.ERR, err.getvalue())):
            data = text.encode()
            for i in range(0, len(data), _CHUNK):
                conn.send(tag + data[i : i + _CHUNK])
        conn.send(remote.STATUS + str(rc).encode())


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
    runner = _Applier(config, info, uffd) if config.get("warm") else None
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
                    peer = _peer_uid(conn)
                    if peer not in (0, os.getuid()):
                        continue
                    data = conn.recv(65536)
                    if data.startswith(b"apply\0"):
                        if runner is None or not runner.ready() or peer != os.getuid():
                            why = "not served here" if runner is None else runner.error
                            conn.send(json.dumps({"ok": False, "why": why or "other uid"}).encode())
                            continue
                        conn.settimeout(None)  # as long as the apply takes
                        runner.run(conn, data)
                        continue
                    request = json.loads(data or b"{}")
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

"""``applier apply`` run by the target's tracker holder: the command line's fast path.

A tracked target (``applier dump --track``) has a holder process (``applier/_holder_main.py``)
that keeps its userfaultfd and has applier loaded. An ``apply`` into that target is sent to it
over its socket and run there, so a reset from the command line costs the apply, not the
200-300 ms it takes to start Python with applier, numpy and construct. This module is what
the ``applier`` command runs before it loads anything else: the standard library and the
lock directory only.

The holder runs the very same command line (``applier.cli.main``) with the same arguments,
in the caller's working directory; its output and exit status come back unchanged. What
differs: no progress bar (the holder has no terminal), and a Ctrl-C or SIGTERM of the
command ends only the command: the apply itself goes on in the holder to its end (as image,
or rolled back), never half-done. ``--local`` (or ``APPLIER_LOCAL=1``) applies in the
command's own process.
"""

from __future__ import annotations

import _socket  # the C module: ``socket`` costs 3 ms more (enum, selectors)
import os
import struct
import sys

from applier.lockdir import find_lock_dir

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["ERR", "OUT", "STATUS", "apply_in_holder", "parse_request", "request", "target_of"]

SERVING = False  # set in a tracker holder that runs applies (applier/_holder_main.py)
# The holder ended during the apply: the target is held for ``applier recover`` (as after a
# rollback that failed, applier.errors: 7; the value is repeated here to import nothing).
EXIT_HOLDER_LOST = 7
_WITH_VALUE = frozenset({"-o", "--log-file", "--verbosity"})


def target_of(argv: Sequence[str]) -> int | None:
    """The ``--into`` pid of an ``apply`` command line that may run in a holder, else None
    (another command, ``--help``, ``--local``, no valid pid)."""
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        i += 2 if argv[i] in _WITH_VALUE else 1
    if i >= len(argv) or argv[i] != "apply":
        return None
    rest = argv[i + 1 :]
    if {"-h", "--help", "--local"} & set(rest) or os.environ.get("APPLIER_LOCAL"):
        return None
    for j, arg in enumerate(rest):
        value = None
        if arg == "--into" and j + 1 < len(rest):
            value = rest[j + 1]
        elif arg.startswith("--into="):
            value = arg.removeprefix("--into=")
        if value is not None:
            return int(value) if value.isdigit() else None
    return None


def _start_time(pid: int) -> int:
    """Field 22 of /proc/PID/stat (as ``injector.procfs.read_start_time``, without pathlib)."""
    with open(f"/proc/{pid}/stat", "rb") as fh:
        stat = fh.read()
    return int(stat[stat.rindex(b")") + 2 :].split()[19])


def _connect(pid: int) -> _socket.socket | None:
    try:
        path = os.path.join(find_lock_dir(), f"holder-{pid}-{_start_time(pid)}.sock")
    except (OSError, ValueError, IndexError):
        return None
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(5.0)
        sock.connect(path)
        creds = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, struct.calcsize("3i"))
        if struct.unpack("3i", creds)[1] != os.getuid():
            raise OSError("the holder runs as another user: apply here")
    except OSError:
        sock.close()
        return None
    return sock


def request(argv: Sequence[str], cwd: str) -> bytes:
    """The ``apply`` request: ``apply``, the working directory and each argument, NUL-ended
    (no JSON: its decoder costs the command 7 ms of imports)."""
    return b"".join(os.fsencode(part) + b"\0" for part in ("apply", cwd, *argv))


def parse_request(data: bytes) -> tuple[str, list[str]]:
    """(working directory, arguments) of an ``apply`` request."""
    parts = [os.fsdecode(p) for p in data.split(b"\0")[:-1]]
    if len(parts) < 2 or parts[0] != "apply":
        raise ValueError("not an apply request")
    return parts[1], parts[2:]


# Reply frames: a tag byte, then output bytes (stdout, stderr) or the exit status in ASCII.
OUT, ERR, STATUS = b"o", b"e", b"r"


def apply_in_holder(argv: Sequence[str]) -> int | None:
    """Run ``applier ARGV`` (an apply) in the target's tracker holder and pass its output
    and exit status on; None when there is no holder that runs applies (then the caller
    applies itself)."""
    pid = target_of(argv)
    if pid is None:
        return None
    sock = _connect(pid)
    if sock is None:
        return None
    try:
        try:
            sock.send(request(argv, os.getcwd()))
            sock.settimeout(None)  # it answers once the apply is done: as long as that takes
            frame = sock.recv(1 << 16)
        except OSError:
            return None  # a holder that is gone: nothing ran
        if frame[:1] not in (OUT, ERR, STATUS):
            return None  # an older holder, or one that does not apply: nothing ran
        while frame[:1] != STATUS:
            stream = sys.stdout if frame[:1] == OUT else sys.stderr
            try:
                stream.flush()
                os.write(stream.fileno(), frame[1:])
            except OSError:
                pass  # a reader that went away (``| head``): the apply goes on all the same
            try:
                frame = sock.recv(1 << 16)
            except OSError:
                frame = b""
            if frame[:1] not in (OUT, ERR, STATUS):
                print(
                    f"applier: error: the tracker holder of pid {pid} ended during the apply; "
                    f"'applier recover {pid}' finishes it",
                    file=sys.stderr,
                )
                return EXIT_HOLDER_LOST
        return int(frame[1:])
    finally:
        sock.close()

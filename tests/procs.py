"""Helpers for tests that need real processes: compile small C targets, start them, stop them.

Every process a test starts is killed by PID and reaped when the test ends; nothing else is
ever signalled.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import attrs

TARGETS = Path(__file__).parent / "targets"
BUILD = Path(os.environ.get("APPLIER_TEST_BUILD", "/tmp/applier-test-build"))


def build_c(source: str | Path, *extra_flags: str) -> Path:
    """Compile ``tests/targets/<source>`` (or a path) with gcc, cached by content hash."""
    src = Path(source) if os.path.isabs(source) else TARGETS / source
    text = src.read_bytes()
    key = hashlib.sha256(text + " ".join(extra_flags).encode()).hexdigest()[:16]
    BUILD.mkdir(parents=True, exist_ok=True)
    out = BUILD / f"{src.stem}-{key}"
    if not out.exists():
        tmp = out.with_suffix(f".tmp{os.getpid()}")
        subprocess.run(
            ["gcc", "-O1", "-g", "-pthread", "-o", str(tmp), str(src), *extra_flags],
            check=True,
        )
        tmp.rename(out)
    return out


@attrs.define
class Target:
    """A started test process whose stdout is a line protocol (``key value...`` lines)."""

    proc: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def readline(self, timeout: float = 10.0) -> str:
        """One line of the target's stdout (fails the test if none comes in time)."""
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"pid {self.pid}: no output within {timeout}s")
        line = self.proc.stdout.readline()
        if not line:
            raise EOFError(f"pid {self.pid}: exited (status {self.proc.poll()})")
        return line.decode().rstrip("\n")

    def expect(self, key: str, timeout: float = 10.0) -> list[str]:
        """Read lines until one starts with ``key``; return its remaining words."""
        deadline = time.monotonic() + timeout
        while True:
            words = self.readline(max(0.01, deadline - time.monotonic())).split()
            if words and words[0] == key:
                return words[1:]

    def send(self, line: str) -> None:
        """Write one command line to the target's stdin."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def state(self) -> str:
        """The one-letter state from /proc/PID/stat (R, S, T, t, Z, ...)."""
        stat = Path(f"/proc/{self.pid}/stat").read_bytes()
        return stat[stat.rindex(b")") + 2 :].split()[0].decode()

    def tracer(self) -> int:
        """TracerPid of the leader (0 = untraced)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("TracerPid:"):
                return int(line.split()[1])
        return 0

    def wait_in_syscall(self, nr: int, timeout: float = 5.0) -> None:
        """Wait until the leader is blocked in syscall ``nr`` (e.g. 0: read), i.e. idle."""
        deadline = time.monotonic() + timeout
        path = Path(f"/proc/{self.pid}/syscall")
        while time.monotonic() < deadline:
            words = path.read_text().split()
            if words and words[0] == str(nr) and self.state() == "S":
                return
            time.sleep(0.002)
        raise TimeoutError(f"pid {self.pid} did not block in syscall {nr}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            # A holder a tracked dump left for it (applier.holder): stopped and waited for, so
            # that none outlives the test (it would exit with the target a moment later).
            from applier import holder  # noqa: PLC0415 - only for tests that track

            with contextlib.suppress(OSError):
                holder.stop(self.pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


@contextlib.contextmanager
def spawn(binary: Path, *args: str) -> Iterator[Target]:
    """Start ``binary`` in its own session with piped stdin/stdout; kill it (by PID) at the end."""
    proc = subprocess.Popen(
        [str(binary), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        start_new_session=True,
        # Unbuffered: with a buffered reader, two lines arriving together leave the second in
        # the buffer where select() in readline() cannot see it.
        bufsize=0,
    )
    target = Target(proc)
    try:
        yield target
    finally:
        target.kill()


def assert_untouched(target: Target) -> None:
    """The target is running (not stopped, not traced, not a zombie)."""
    assert target.alive(), "target died"
    assert target.tracer() == 0, "target is still traced"
    for task in Path(f"/proc/{target.pid}/task").iterdir():
        try:
            stat = (task / "stat").read_bytes()
        except (FileNotFoundError, ProcessLookupError):
            continue  # a short-lived thread exited meanwhile
        state = stat[stat.rindex(b")") + 2 :].split()[0]
        assert state not in (b"T", b"t", b"Z"), f"thread {task.name} left in state {state!r}"


REPO = Path(__file__).resolve().parents[1]
# setpriv arguments that drop to uid/gid 65534 with no capabilities
NOBODY = ["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"]


def run_applier(*args: str, unprivileged: bool = False) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a separate process (as uid/gid 65534 without capabilities when
    ``unprivileged``); never raises for a non-zero exit."""
    prefix = ["setpriv", *NOBODY] if unprivileged else []
    return subprocess.run(
        [*prefix, sys.executable, "-m", "applier", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"},
    )

"""Reset a warmed-up server between tests with applier's pytest plugin.

Run with ``pytest docs/examples`` or, spread over two worker processes, ``pytest -n 2
docs/examples`` (pytest-xdist): each worker starts its own server and takes its own
checkpoint. Needs root or CAP_SYS_PTRACE, as applier does.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from applier.fixture import Checkpoint

SERVER = Path(__file__).with_name("kvserver.py")
WARM_KEYS = 500


def ask(path: Path, line: str) -> str:
    """One request; the server answers one line and closes the connection."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(path))
        s.sendall(line.encode() + b"\n")
        reply = s.makefile().readline().strip()
        assert s.recv(1) == b""  # closed by the server: it holds nothing of this request
    return reply


@pytest.fixture(scope="session")
def kv_server(
    applier_checkpoint: Callable[[int], Checkpoint], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, Checkpoint]]:
    """The server, started and warmed up once per session (per xdist worker), checkpointed."""
    path = tmp_path_factory.mktemp("kv") / "kv.sock"  # a socket of this worker's own
    proc = subprocess.Popen([sys.executable, str(SERVER), str(path)], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        for i in range(WARM_KEYS):  # the slow part, done once
            ask(path, f"set warm{i} {i}")
        yield path, applier_checkpoint(proc.pid)
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def kv(
    kv_server: tuple[Path, Checkpoint], record_property: Callable[[str, object], None]
) -> Iterator[Path]:
    """The server as it was at the checkpoint; reset after the test."""
    path, checkpoint = kv_server
    # which server served this test, for a --junitxml report (tests/test_pytest_plugin.py)
    record_property("server_pid", checkpoint.pid)
    record_property("worker", os.environ.get("PYTEST_XDIST_WORKER", "-"))
    yield path
    checkpoint.restore()


@pytest.mark.parametrize("n", range(8))
def test_writes_are_gone_after_the_reset(kv: Path, n: int) -> None:
    """Each test finds only the warm-up keys, whatever the tests before it wrote."""
    assert ask(kv, "count") == str(WARM_KEYS)
    assert ask(kv, f"get mine{n - 1}") == "none"
    assert ask(kv, f"set mine{n} {os.getpid()}") == "ok"
    assert ask(kv, "count") == str(WARM_KEYS + 1)

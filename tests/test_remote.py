"""The command line's fast path to a tracker holder (applier.remote): which command lines go
there, and the request format. The holder running applies is tested on real processes in
tests/test_holder.py."""

from __future__ import annotations

import socket
import threading

import pytest

from applier import remote
from applier.errors import EXIT_ROLLBACK_FAILED
from applier.lock import lock_dir
from injector.procfs import read_start_time
from tests.procs import build_c, spawn


@pytest.mark.parametrize(
    ("argv", "pid"),
    [
        (["apply", "img", "--into", "42"], 42),
        (["-q", "apply", "img", "--into=42", "--only-dirty"], 42),
        (["-o", "log", "--verbosity", "3", "apply", "img", "--into", "7"], 7),
        (["apply", "img", "--into", "42", "--local"], None),
        (["apply", "--help"], None),
        (["apply", "img", "--into", "x"], None),
        (["apply", "img"], None),
        (["dump", "img", "--from", "42"], None),
        (["diff", "img", "--against", "42"], None),
        ([], None),
    ],
)
def test_only_applies_into_a_pid_go_to_a_holder(argv: list[str], pid: int | None) -> None:
    assert remote.target_of(argv) == pid


def test_applier_local_keeps_every_apply_here(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APPLIER_LOCAL", "1")
    assert remote.target_of(["apply", "img", "--into", "42"]) is None


def test_request_round_trip() -> None:
    argv = ["-q", "apply", "dir with space/img", "--into", "42", "--keep-fd", "3,4"]
    data = remote.request(argv, "/tmp/x y")
    assert data.startswith(b"apply\0")
    assert remote.parse_request(data) == ("/tmp/x y", argv)
    with pytest.raises(ValueError, match="not an apply"):
        remote.parse_request(b'{"op": "info"}')


def test_lost_holder_exit_code_is_the_documented_one() -> None:
    """remote repeats the value so as to import nothing; it must stay applier.errors'."""
    assert remote.EXIT_HOLDER_LOST == EXIT_ROLLBACK_FAILED


def test_a_holder_that_dies_during_the_apply_is_reported(
    capfd: pytest.CaptureFixture[str],
) -> None:
    """A holder that sends part of the output and then goes away: the command passes on what
    came, says the holder ended and how to finish (exit 7); one that refuses applies (an
    older holder) lets the command apply itself (None)."""
    with spawn(build_c("apply_target.c")) as t:
        path = lock_dir() / f"holder-{t.pid}-{read_start_time(t.pid)}.sock"
        argv = ["apply", "img", "--into", str(t.pid)]
        for replies, expected in (([remote.OUT + b"half"], 7), ([b'{"ok": false}'], None)):
            server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            server.bind(str(path))
            server.listen(1)

            def serve(server: socket.socket = server, replies: list[bytes] = replies) -> None:
                conn, _ = server.accept()
                with conn:
                    assert remote.parse_request(conn.recv(65536))[1] == argv
                    for r in replies:
                        conn.send(r)

            thread = threading.Thread(target=serve)
            thread.start()
            try:
                assert remote.apply_in_holder(argv) == expected
            finally:
                thread.join(5)
                server.close()
                path.unlink()
        out, err = capfd.readouterr()
        assert out == "half"
        assert f"holder of pid {t.pid} ended during the apply" in err
        assert f"'applier recover {t.pid}'" in err

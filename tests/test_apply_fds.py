"""Descriptors: ``applier dump`` records them as CRIU 4.2 does, and the ``fds`` part of an apply
gives the target its checkpoint's descriptor table back (docs/cli.md, "The parts").

Every test runs real processes: ``tests/data/state-target.c`` (the program of the golden CRIU
4.2 dump) and ``tests/targets/fd_server.c`` (a TCP server in one epoll loop that also obeys
file commands on stdin)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import attrs
import pytest

from applier import executor as executor_mod
from applier.api import apply, diff
from applier.dump import dump
from applier.errors import ApplyFailed, MismatchError
from applier.fixture import Checkpoint
from applier.plan import CloseFd, ReopenFd, ResetFd, SetRegs
from formats import names
from formats.files import FileEntry
from formats.imagedir import ImageDir
from formats.imagefile import load_image
from injector.fds import read_fds
from injector.session import attach
from tests.conftest import DATA
from tests.procs import Target, assert_untouched, build_c, run_applier, spawn

pytestmark = pytest.mark.live

GOLDEN = DATA / "state-criu-4.2"
EPOLL_WAIT = 232  # x86_64


# ---- dump ----------------------------------------------------------------------------------

# Fields that differ from run to run (inodes, ports, ids, the time left of a timer, the
# directory the program ran in), as in tests/test_injector_fds_golden.py.
RUN_DEPENDENT = {"id", "ino", "pipe_id", "peer", "src_port", "vsec", "vnsec", "inode"}


def _view(entry: FileEntry) -> dict[str, Any]:
    """A files.img entry as a dict of every field (None: not written), run-dependent fields
    left out and paths cut to their last part."""
    kind = entry.kind_entry()
    assert kind is not None, entry
    body = attrs.asdict(kind, filter=lambda a, _v: a.name != "unknown_fields")
    body = {k: v for k, v in body.items() if k not in RUN_DEPENDENT}
    if isinstance(body.get("name"), str) and body["name"].startswith("/"):
        body["name"] = os.path.basename(body["name"])
    if isinstance(body.get("tfd"), list):
        body["tfd"] = sorted(
            ({k: v for k, v in t.items() if k not in RUN_DEPENDENT} for t in body["tfd"]),
            key=lambda t: t["tfd"],
        )
    return {"type": entry.type, "body": body}


def _files(path: Path) -> dict[int, FileEntry]:
    _, entries = load_image(path / names.FILES)
    return {e.id: e for e in entries}


@pytest.fixture(scope="module")
def state_dump(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Target, Path]]:
    base = tmp_path_factory.mktemp("state")
    with spawn(build_c(DATA / "state-target.c"), str(base / "work")) as t:
        t.expect("ITIMER_REAL")
        out = base / "ck"
        stats = dump(t.pid, out)
        assert stats.fds_skipped == []
        yield t, out


def test_dump_matches_criu_42_field_for_field(state_dump: tuple[Target, Path]) -> None:
    """The same program dumped by applier and by CRIU 4.2 (tests/data/state-criu-4.2): the
    fdinfo entries of fds 3 and up and the file entries behind them carry the same fields
    with the same values, run-dependent ones aside; ids and fs name the same things."""
    target, out = state_dump
    golden_files, ours_files = _files(GOLDEN), _files(out)
    _, golden_fdinfo = load_image(GOLDEN / "fdinfo-2.img")
    ids = ImageDir.open(out).ids(target.pid)
    _, ours_fdinfo = load_image(out / names.fdinfo(ids.files_id))
    golden_by_fd = {e.fd: e for e in golden_fdinfo if e.fd > 2}
    ours_by_fd = {e.fd: e for e in ours_fdinfo if e.fd > 2}
    assert sorted(ours_by_fd) == sorted(golden_by_fd) == [3, 4, 5, 7, 8, 9, 10, 11, 12, 13, 14, 15]
    for fd, g in golden_by_fd.items():
        o = ours_by_fd[fd]
        assert (o.type, o.flags) == (g.type, g.flags), fd
        want = _view(golden_files[g.id])
        if fd == 5:  # /etc/hostname: as it is on this machine
            st = os.stat("/etc/hostname")
            want["body"] |= {"size": st.st_size, "mode": st.st_mode}
        assert _view(ours_files[o.id]) == want, fd
    # the mapped libraries: as CRIU wrote them, build-id included (the same libc here)
    libs = {e.reg.name: e.reg for e in ours_files.values() if e.reg is not None}
    for g_entry in golden_files.values():
        g = g_entry.reg
        if g is not None and g.name.startswith("/usr/lib/") and os.path.exists(g.name):
            st = os.stat(g.name)
            mine = libs[g.name]
            assert (mine.mode, mine.size) == (st.st_mode, st.st_size)
            if st.st_size == g.size:  # the same build as the golden machine's
                assert mine.build_id == g.build_id, g.name
            assert len(mine.build_id) == 5
    # the unix pair names each other, the epoll set its targets' real inodes
    usk = {fd: ours_files[ours_by_fd[fd].id].usk for fd in (9, 10)}
    assert usk[9] is not None and usk[10] is not None
    assert (usk[9].peer, usk[10].peer) == (usk[10].ino, usk[9].ino)
    table = {d.fd: d for d in read_fds(target.pid)}
    epfd = ours_files[ours_by_fd[13].id].epfd
    assert epfd is not None
    for t in epfd.tfd:
        watched = table[t.tfd].stat
        assert watched is not None and t.inode == watched.ino
    # pipes-data: the 9 queued bytes, left in the pipe
    _, pipe_data = load_image(out / names.PIPES_DATA)
    assert [(p.bytes, p.extra, p.size) for p in pipe_data] == [(9, b"pipe-data", 65536)]
    # ids and fs: the same fields as CRIU's; cwd and root are directory entries
    _, (golden_ids,) = load_image(GOLDEN / "ids-4524.img")
    assert [a.name for a in attrs.fields(type(ids)) if getattr(ids, a.name) is not None] == [
        a.name for a in attrs.fields(type(golden_ids)) if getattr(golden_ids, a.name) is not None
    ]
    fs = ImageDir.open(out).fs(target.pid)
    cwd, root = ours_files[fs.cwd_id].reg, ours_files[fs.root_id].reg
    assert cwd is not None and root is not None
    assert (cwd.name, root.name, fs.umask) == (os.readlink(f"/proc/{target.pid}/cwd"), "/", 0o22)
    assert cwd.mode == os.stat(cwd.name).st_mode and cwd.size is None


def test_dump_decodes_with_crit(state_dump: tuple[Target, Path]) -> None:
    """Debian's crit decodes every descriptor image and ``crit x DIR fds`` lists the table."""
    if shutil.which("crit") is None:
        pytest.skip("crit is not installed (apt-get install criu)")
    target, out = state_dump
    for name in os.listdir(out):
        if name.endswith(".img") and not name.startswith("pages-"):
            got = subprocess.run(
                ["crit", "decode", "-i", str(out / name)], capture_output=True, check=False
            )
            assert got.returncode == 0, (name, got.stderr)
    x = subprocess.run(["crit", "x", str(out), "fds"], capture_output=True, text=True, check=False)
    assert x.returncode == 0, x.stderr
    lines = [line.split(":", 1) for line in x.stdout.splitlines()[1:]]
    listed = {k.strip(): v.strip() for k, v in lines}
    assert listed["3"] == os.readlink(f"/proc/{target.pid}/fd/3")
    assert listed["7"] == listed["8"] == os.readlink(f"/proc/{target.pid}/fd/7").replace(":", "")
    assert listed["cwd"] == os.readlink(f"/proc/{target.pid}/cwd")
    assert listed["root"] == "/"
    assert {k for k in listed if k.isdigit()} == set(os.listdir(f"/proc/{target.pid}/fd"))


def _setup(t: Target) -> dict[str, list[str]]:
    """fds_target's "fd <label> <fd> <values...>" lines, by label (up to "ready")."""
    info: dict[str, list[str]] = {}
    while True:
        words = t.readline().split()
        if words[:1] == ["fd"]:
            info[words[1]] = words[2:]
        elif words[:1] == ["ready"]:
            return info


def test_dump_of_every_kind(tmp_path: Path) -> None:
    """tests/targets/fds_target.c (one descriptor of every kind, values it prints): the dump
    records each as the target set it up, leaves out only the pidfd (no message for it
    here), and crit decodes every image."""
    work = tmp_path / "work dir"
    work.mkdir()
    with spawn(build_c("fds_target.c"), str(work)) as t:
        info = _setup(t)
        t.wait_in_syscall(0)
        out = tmp_path / "ck"
        stats = dump(t.pid, out)
        pidfd = int(info["pidfd"][0])
        assert stats.fds_skipped == [f"fd {pidfd} (anon_inode:[pidfd])"]
        img = ImageDir.open(out)
        fdinfo = {e.fd: e for e in img.fdinfo(t.pid)}
        assert set(fdinfo) == {int(n) for n in os.listdir(f"/proc/{t.pid}/fd")} - {pidfd}
        files = _files(out)

        def entry(label: str) -> FileEntry:
            return files[fdinfo[int(info[label][0])].id]

        assert fdinfo[int(info["cloexec"][0])].flags == 1
        efd = entry("eventfd").efd
        assert efd is not None and efd.counter == 7
        ify = entry("inotify").ify
        assert ify is not None
        _, _, wd1, ino1, wd2, ino2 = info["inotify"]
        assert sorted((w.wd, w.i_ino) for w in ify.wd) == [(int(wd1), int(ino1)),
                                                           (int(wd2), int(ino2))]  # fmt: skip
        assert all(len(w.f_handle.handle) >= 16 and w.f_handle.bytes > 0 for w in ify.wd)
        memfd = entry("memfd").memfd
        assert memfd is not None
        inode = img.memfd_inode(memfd.inode_id)
        want = ("memfd:applier memfd", int(info["memfd"][1]), 0x2 | 0x4)  # SHRINK | GROW
        assert (inode.name, inode.shmid, inode.seals) == want
        listen, abstract = entry("ulisten").usk, entry("uabstract").usk
        assert listen is not None and abstract is not None
        assert (listen.name, listen.state) == (b"my sock", 10)
        assert abstract.name == b"\0" + info["uabstract"][2].encode()
        client, server = entry("tcpclient").isk, entry("tcpserver").isk
        assert client is not None and server is not None
        _, _, cport, sport = info["tcpclient"]
        assert (client.src_port, client.dst_port, client.state) == (int(cport), int(sport), 1)
        assert (server.src_port, server.dst_port) == (int(sport), int(cport))
        assert str(client.src_ip()) == str(client.dst_ip()) == "127.0.0.1"
        udp = entry("udp6").isk
        assert udp is not None and (udp.family, udp.proto, udp.src_port) == (
            10, 17, int(info["udp6"][2]))  # fmt: skip
        assert udp.v6only is not None
        tfd = entry("timerfd_abs").tfd
        assert tfd is not None and tfd.settime_flags & 1
        fifo = entry("fifo").fifo
        assert fifo is not None and fifo.regf_id is not None
        regf = files[fifo.regf_id].reg
        assert regf is not None and regf.name == str(work / "fifo")
        if shutil.which("crit") is not None:
            for name in os.listdir(out):
                if name.endswith(".img") and not name.startswith("pages-"):
                    got = subprocess.run(
                        ["crit", "decode", "-i", str(out / name)], capture_output=True,
                        check=False,
                    )  # fmt: skip
                    assert got.returncode == 0, (name, got.stderr)
        assert_untouched(t)


# ---- the fd_server target -----------------------------------------------------------------


@attrs.define
class Server:
    t: Target
    port: int
    work: Path

    def ask(self, line: str, key: str) -> list[str]:
        self.t.send(line)
        return self.t.expect(key)

    def idle(self) -> None:
        self.t.wait_in_syscall(EPOLL_WAIT)

    def client(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=5)

    def request(self, line: str) -> bytes:
        """One request on a connection of its own; returns once the server has closed its
        end too (so that no test sees, or checkpoints, a connection about to go)."""
        before = self.sockets()
        with self.client() as c:
            c.sendall(line.encode() + b"\n")
            reply = c.recv(200)
        deadline = time.monotonic() + 5
        while self.sockets() > before:
            assert time.monotonic() < deadline, "the server did not close the connection"
            time.sleep(0.002)
        return reply

    def sockets(self) -> int:
        return _sockets(self.t.pid)

    def fdinfo(self, fd: int) -> tuple[int, int]:
        """(pos, flags) of the target's fd from /proc."""
        text = Path(f"/proc/{self.t.pid}/fdinfo/{fd}").read_text().split()
        return int(text[1]), int(text[3], 8)

    def fds(self) -> set[int]:
        return {int(n) for n in os.listdir(f"/proc/{self.t.pid}/fd")}

    def epoll_targets(self) -> list[int]:
        """The descriptors the server's epoll set (fd 4) watches, from its fdinfo."""
        text = Path(f"/proc/{self.t.pid}/fdinfo/4").read_text()
        return sorted(int(line.split()[1]) for line in text.splitlines() if line.startswith("tfd:"))


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    with spawn(build_c("fd_server.c")) as t:
        port = int(t.expect("PORT")[0])
        s = Server(t, port, tmp_path)
        (tmp_path / "data.txt").write_bytes(bytes(range(256)) * 16)
        (tmp_path / "other.txt").write_bytes(b"other file\n")
        yield s


def _settle(server: Server, count: int) -> None:
    """Wait until the server has closed the clients that hung up (it has ``count`` fds)."""
    deadline = time.monotonic() + 5
    while len(server.fds()) != count:
        assert time.monotonic() < deadline, server.fds()
        time.sleep(0.005)


def _recv_eof(c: socket.socket, within: float = 1.0) -> float:
    """Seconds until ``c`` reads EOF (fails after ``within``)."""
    c.settimeout(within)
    started = time.monotonic()
    assert c.recv(100) == b""
    return time.monotonic() - started


def test_held_connection_across_20_checkpoint_resets(server: Server) -> None:
    """A client connected after the checkpoint and held open sees EOF within a second of each
    reset, the server's descriptor table comes back to the checkpoint's every time, and new
    clients get the checkpoint's data."""
    assert server.request("set checkpoint") == b"ok\n"
    server.idle()
    with Checkpoint.take(server.t.pid) as cp:
        table = server.fds()  # the checkpoint's
        watched = server.epoll_targets()
        assert watched == [0, 3]  # stdin and the listening socket
        for i in range(20):
            held = server.client()
            held.sendall(f"set dirty{i}\n".encode())
            assert held.recv(100) == b"ok\n"
            assert server.request("get") == f"dirty{i}\n".encode()
            _settle(server, len(table) + 1)  # the "get" client closed by the server
            (conn,) = server.fds() - table
            assert server.epoll_targets() == sorted([*watched, conn])
            server.idle()
            stats = cp.restore()
            assert stats.fd_changes == 1
            assert _recv_eof(held) < 1.0
            held.close()
            assert server.fds() == table
            assert server.epoll_targets() == watched  # the kernel dropped the connection
            assert server.request("get") == b"checkpoint\n"
            _settle(server, len(table))
        assert server.ask("value", "VALUE") == ["checkpoint"]
        busy = _cpu_seconds(server.t.pid)
        time.sleep(0.5)
        assert _cpu_seconds(server.t.pid) - busy < 0.05, "the server is not idle"
    assert_untouched(server.t)


def test_held_connection_via_the_cli(server: Server, tmp_path: Path) -> None:
    """The same with ``applier dump`` and ``applier apply`` on the command line; the summary
    counts the descriptor closed."""
    assert server.request("set cli-checkpoint") == b"ok\n"
    server.idle()
    ck = tmp_path / "ck"
    got = run_applier("dump", str(ck), "--from", str(server.t.pid))
    assert got.returncode == 0, got.stderr
    table = server.fds()
    for i in range(3):
        held = server.client()
        held.sendall(f"set cli{i}\n".encode())
        assert held.recv(100) == b"ok\n"
        server.idle()
        d = run_applier("diff", str(ck), "--against", str(server.t.pid))
        assert d.returncode == 1, d.stderr
        (conn,) = server.fds() - table
        assert f"close   fd {conn} (socket:[" in d.stdout, d.stdout
        assert "descriptor changes" in d.stdout.splitlines()[0]
        a = run_applier("apply", str(ck), "--into", str(server.t.pid))
        assert a.returncode == 0, a.stderr
        assert "1 descriptor changes" in a.stdout
        assert _recv_eof(held) < 1.0
        held.close()
        assert server.fds() == table
        assert server.request("get") == b"cli-checkpoint\n"
    assert_untouched(server.t)


@pytest.mark.skipif(shutil.which("memcached") is None, reason="memcached is not installed")
def test_memcached_held_connection(tmp_path: Path) -> None:
    """memcached (threads, libevent): a client held across resets sees EOF each time, the
    descriptor count stays flat, a new client reads the checkpoint's value, and the server
    is idle afterwards (held connections once left two workers spinning at 100%)."""
    port = _free_port()
    proc = subprocess.Popen(
        ["memcached", "-l", "127.0.0.1", "-p", str(port), "-U", "0", "-t", "1"]
        + (["-u", "root"] if os.geteuid() == 0 else []),  # memcached refuses root without -u
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        _wait_port(port)
        time.sleep(0.1)
        sockets = _sockets(proc.pid)
        _mc(port, b"set k 0 0 10\r\ncheckpoint\r\n", b"STORED\r\n")
        deadline = time.monotonic() + 5
        while _sockets(proc.pid) > sockets:  # that connection closed on memcached's side too
            assert time.monotonic() < deadline
            time.sleep(0.005)
        time.sleep(0.2)  # every thread back to its wait
        with Checkpoint.take(proc.pid) as cp:
            count = len(os.listdir(f"/proc/{proc.pid}/fd"))
            for i in range(20):
                held = socket.create_connection(("127.0.0.1", port), timeout=5)
                held.sendall(b"set k 0 0 10\r\ndirty-%04d\r\n" % i)
                assert _recv_all(held, b"STORED\r\n")
                time.sleep(0.05)
                cp.restore()
                assert _recv_eof(held) < 1.0
                held.close()
                assert len(os.listdir(f"/proc/{proc.pid}/fd")) == count
                _mc(port, b"get k\r\n", b"VALUE k 0 10\r\ncheckpoint\r\nEND\r\n")
        busy = _cpu_seconds(proc.pid)
        time.sleep(1.0)
        assert _cpu_seconds(proc.pid) - busy < 0.1, "memcached is not idle after the resets"
    finally:
        proc.kill()
        proc.wait(timeout=10)


def _cpu_seconds(pid: int) -> float:
    """User + system time of every thread of ``pid`` (/proc/PID/stat fields 14 and 15)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _sockets(pid: int) -> int:
    count = 0
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            count += os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:")
    return count


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


def _recv_all(c: socket.socket, want: bytes) -> bool:
    got = b""
    while len(got) < len(want):
        chunk = c.recv(4096)
        if not chunk:
            break
        got += chunk
    return got == want


def _mc(port: int, request: bytes, want: bytes) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
        c.sendall(request)
        assert _recv_all(c, want)


# ---- regular files -------------------------------------------------------------------------


def _open(server: Server, name: str, mode: str) -> int:
    return int(server.ask(f"open {server.work / name} {mode}", "FD")[0])


def test_files_moved_closed_and_replaced(server: Server, tmp_path: Path) -> None:
    """A file whose position and flags moved since, one closed since and one replaced at its
    number by another file: each comes back at its number, on its file, at its position,
    with its flags and close-on-exec; the target reads on from there."""
    moved = _open(server, "data.txt", "r")
    closed = _open(server, "data.txt", "rwc")
    replaced = _open(server, "data.txt", "a")
    assert server.ask(f"seek {moved} 100", "POS") == ["100"]
    assert server.ask(f"seek {closed} 200", "POS") == ["200"]
    before = {fd: server.fdinfo(fd) for fd in (moved, closed, replaced)}
    server.idle()
    ck = tmp_path / "ck"
    dump(server.t.pid, ck)
    table = server.fds()
    links = {fd: os.readlink(f"/proc/{server.t.pid}/fd/{fd}") for fd in table}

    extra = _open(server, "other.txt", "r")  # before the close, or it would take its number
    assert server.ask(f"read {moved} 10", "DATA")[-1] == "110"
    assert server.ask(f"nonblock {moved}", "OK") == []
    assert server.ask(f"close {closed}", "OK") == []
    assert server.ask(f"replace {replaced} {server.work / 'other.txt'}", "OK") == []
    server.idle()

    plan = diff(ck, server.t.pid)
    kinds = {type(s) for s in plan.steps}
    assert {CloseFd, ResetFd, ReopenFd} <= kinds
    (close,) = plan.of(CloseFd)
    assert close.fd.fd == extra
    (reset,) = plan.of(ResetFd)
    assert (reset.fd, reset.pos, reset.flags is not None) == (moved, (110, 100), True)
    assert sorted(s.fd for s in plan.of(ReopenFd)) == sorted([closed, replaced])

    result = apply(ck, server.t.pid)
    assert result.stats.verified and result.stats.fd_changes == 4
    assert server.fds() == table
    assert {fd: os.readlink(f"/proc/{server.t.pid}/fd/{fd}") for fd in table} == links
    after = {fd: server.fdinfo(fd) for fd in (moved, closed, replaced)}
    assert after == before  # positions and flags (O_CLOEXEC, O_APPEND...) byte for byte
    # and the target goes on reading from the checkpoint's positions
    data = (server.work / "data.txt").read_bytes()
    got = server.ask(f"read {moved} 4", "DATA")
    assert got == [data[100:104].decode("latin-1"), "POS", "104"] or got[-1] == "104"
    assert server.ask(f"pos {closed}", "POS") == ["200"]
    assert server.ask("ping", "PONG") == []
    assert diff(ck, server.t.pid).of(CloseFd) == []
    assert_untouched(server.t)


def test_pipe_closed_since_is_refused_before_any_write(server: Server, tmp_path: Path) -> None:
    """A pipe closed since the checkpoint cannot be re-created: exit 4, one line naming the
    descriptor, nothing changed in the target; --keep-fd lets the rest apply."""
    read_end, write_end = (int(w) for w in server.ask("pipe", "PIPE"))
    assert server.request("set checkpoint") == b"ok\n"
    server.idle()
    ck = tmp_path / "ck"
    dump(server.t.pid, ck)
    extra = _open(server, "other.txt", "r")
    assert server.ask(f"close {read_end}", "OK") == []
    assert server.request("set later") == b"ok\n"
    server.idle()
    table = server.fds()

    got = run_applier("apply", str(ck), "--into", str(server.t.pid))
    assert got.returncode == 4
    pipe_ino = os.stat(f"/proc/{server.t.pid}/fd/{write_end}").st_ino
    assert got.stderr.strip().splitlines() == [
        f"applier: error: fd {read_end}: the pipe {pipe_ino} "
        f"it held at the checkpoint was closed since and cannot be re-created; "
        f"--keep-fd {read_end} leaves it as it is"
    ]
    assert server.fds() == table  # nothing closed, nothing written
    assert server.request("get") == b"later\n"
    with pytest.raises(MismatchError, match=f"fd {read_end}: the pipe"):
        apply(ck, server.t.pid, dry_run=True)

    server.idle()
    dry = run_applier("apply", str(ck), "--into", str(server.t.pid), "--dry-run",
                      "--keep-fd", str(read_end))  # fmt: skip
    assert dry.returncode == 0, dry.stderr
    assert f"close   fd {extra} ({server.work / 'other.txt'})" in dry.stdout
    assert f"note: fd {read_end} left as it is (--keep-fd)" in dry.stdout
    undo = tmp_path / "undo"
    ok = run_applier("apply", str(ck), "--into", str(server.t.pid), "--keep-fd", str(read_end),
                     "--undo", str(undo))  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert server.fds() == table - {extra}  # nothing parked is left behind
    assert "fds" not in json.loads((undo / "applier-undo.json").read_text())["parts"]
    assert server.request("get") == b"checkpoint\n"
    assert_untouched(server.t)


def test_checkpoint_restore_refuses_and_keeps(server: Server) -> None:
    """Checkpoint.restore: a pipe closed since makes the restore fail before any write
    (MismatchError); ``keep_fds`` leaves it and restores the rest."""
    read_end, _ = (int(w) for w in server.ask("pipe", "PIPE"))
    assert server.request("set checkpoint") == b"ok\n"
    server.idle()
    with Checkpoint.take(server.t.pid) as cp:
        assert server.ask(f"close {read_end}", "OK") == []
        table = server.fds()
        assert server.request("set later") == b"ok\n"
        _settle(server, len(table))
        server.idle()
        with pytest.raises(MismatchError, match=f"fd {read_end}: the pipe"):
            cp.restore()
        assert server.request("get") == b"later\n"
        server.idle()
        assert cp.restore(keep_fds=[read_end]).fd_changes == 0
        assert server.request("get") == b"checkpoint\n"
        _settle(server, len(table))
        assert server.fds() == table and read_end not in table
    assert_untouched(server.t)


def test_a_pipe_moved_to_another_number_comes_back(server: Server, tmp_path: Path) -> None:
    """A pipe end the program dup'ed to another number and closed at its own is put back at
    its number (the same pipe, its queued bytes still there) and the copy is closed."""
    read_end, write_end = (int(w) for w in server.ask("pipe", "PIPE"))
    server.idle()
    ck = tmp_path / "ck"
    dump(server.t.pid, ck)
    table = server.fds()
    link = os.readlink(f"/proc/{server.t.pid}/fd/{read_end}")
    copy = int(server.ask(f"dup {read_end}", "FD")[0])
    assert copy not in table
    assert server.ask(f"close {read_end}", "OK") == []
    server.idle()
    plan = diff(ck, server.t.pid)
    assert [s.op for s in plan.steps if s.op.endswith("-fd")] == ["dup-fd", "close-fd"]
    result = apply(ck, server.t.pid)
    assert result.stats.fd_changes == 2 and result.stats.verified
    assert server.fds() == table
    assert os.readlink(f"/proc/{server.t.pid}/fd/{read_end}") == link
    assert server.fdinfo(read_end)[1] & 0o2000000  # close-on-exec, as at the checkpoint
    assert server.ask(f"read {read_end} 6", "DATA")[0] == "queued"
    assert write_end in server.fds()


def test_no_room_for_rollback_copies_is_refused(server: Server, tmp_path: Path) -> None:
    """A descriptor limit that leaves no spare number for the copies a rollback needs is
    refused before anything is written; --no-undo closes at once and needs none."""
    import resource  # noqa: PLC0415

    server.idle()
    ck = tmp_path / "ck"
    dump(server.t.pid, ck)
    extra = _open(server, "other.txt", "r")
    server.idle()
    resource.prlimit(server.t.pid, resource.RLIMIT_NOFILE, (extra + 1, 4096))
    got = run_applier("apply", str(ck), "--into", str(server.t.pid))
    assert got.returncode == 4
    assert f"RLIMIT_NOFILE {extra + 1}" in got.stderr and "--no-undo" in got.stderr
    assert extra in server.fds()
    ok = run_applier("apply", str(ck), "--into", str(server.t.pid), "--no-undo")
    assert ok.returncode == 0, ok.stderr
    assert extra not in server.fds()
    assert server.ask("ping", "PONG") == []


def test_file_gone_is_refused(server: Server, tmp_path: Path) -> None:
    """A file closed since whose path is gone cannot be reopened: exit 4 naming fd and path,
    before anything is written."""
    fd = _open(server, "other.txt", "r")
    server.idle()
    ck = tmp_path / "ck"
    dump(server.t.pid, ck)
    assert server.ask(f"close {fd}", "OK") == []
    (server.work / "other.txt").unlink()
    server.idle()
    table = server.fds()
    got = run_applier("apply", str(ck), "--into", str(server.t.pid), "--json")
    assert got.returncode == 4
    err = json.loads(got.stdout)["error"]
    assert err["message"] == (
        f"fd {fd}: cannot reopen {server.work / 'other.txt'}: No such file or directory; "
        f"--keep-fd {fd} leaves it as it is"
    )
    assert server.fds() == table


def test_image_without_descriptor_state_still_applies(server: Server, tmp_path: Path) -> None:
    """An image without ids/fdinfo/fs images (older applier dumps; CRIU images copied
    without them): memory and registers apply, descriptors are left as they are, with a note."""
    assert server.request("set checkpoint") == b"ok\n"
    server.idle()
    ck = tmp_path / "ck"
    dump(server.t.pid, ck)
    for name in os.listdir(ck):
        if name.startswith(("ids-", "fdinfo-", "fs-")):
            (ck / name).unlink()
    assert server.request("set later") == b"ok\n"
    extra = _open(server, "other.txt", "r")
    server.idle()
    result = apply(ck, server.t.pid)
    assert any("holds no descriptor state" in n for n in result.plan.notes)
    assert result.stats.fd_changes == 0
    assert extra in server.fds()
    assert server.request("get") == b"checkpoint\n"


def test_failed_apply_puts_descriptors_back(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step failing after the descriptor steps: the rollback reopens nothing it should not,
    gives the held connection back (its peer never sees EOF), and puts positions back."""
    fd = _open(server, "data.txt", "r")
    closed = _open(server, "data.txt", "rw")
    replaced = _open(server, "data.txt", "r")
    server.idle()
    ck = tmp_path / "ck"
    dump(server.t.pid, ck)
    assert server.ask(f"seek {fd} 300", "POS") == ["300"]
    assert server.ask(f"replace {replaced} {server.work / 'other.txt'}", "OK") == []
    held = server.client()
    held.sendall(b"set held\n")
    assert held.recv(100) == b"ok\n"  # accepted: at a new number, ``closed`` is still open
    assert server.ask(f"close {closed}", "OK") == []
    server.idle()
    table = server.fds()
    before = {n: server.fdinfo(n) for n in table}
    links = {n: os.readlink(f"/proc/{server.t.pid}/fd/{n}") for n in table}
    assert {type(s) for s in diff(ck, server.t.pid).steps} >= {CloseFd, ResetFd, ReopenFd}

    def boom(ctx: object, step: SetRegs) -> None:
        raise OSError(5, "injected failure for the test")

    monkeypatch.setitem(executor_mod._RUN, SetRegs, boom)
    with pytest.raises(ApplyFailed, match="rolled back"):
        apply(ck, server.t.pid)
    assert server.fds() == table
    assert {n: server.fdinfo(n) for n in table} == before
    assert {n: os.readlink(f"/proc/{server.t.pid}/fd/{n}") for n in table} == links
    held.sendall(b"get\n")
    assert held.recv(100) == b"held\n"  # the same connection, still served
    held.close()
    assert_untouched(server.t)


def test_duplicated_descriptors_share_one_file_entry(server: Server, tmp_path: Path) -> None:
    """Two descriptors of one open file description (dup) name one files.img entry, as
    CRIU's kcmp-based dedup writes them; two opens of one path are two entries."""
    a = _open(server, "data.txt", "r")
    b = int(server.ask(f"dup {a}", "FD")[0])
    c = _open(server, "data.txt", "r")
    server.idle()
    ck = tmp_path / "ck"
    dump(server.t.pid, ck)
    img = ImageDir.open(ck)
    by_fd = {e.fd: e.id for e in img.fdinfo(server.t.pid)}
    assert by_fd[a] == by_fd[b] != by_fd[c]
    assert sorted(by_fd) == sorted(server.fds())


@contextlib.contextmanager
def _logging_to(log: Path) -> Iterator[tuple[subprocess.Popen[bytes], BinaryIO]]:
    """apply_target with its stdout on ``log``, an open file this test shares with it: the
    process (ready) and this test's copy of the file."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(build_c("apply_target.c"))], stdin=subprocess.PIPE, stdout=out,
            start_new_session=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 10
            while b"ready" not in log.read_bytes() and time.monotonic() < deadline:
                time.sleep(0.01)
            yield proc, out
            assert proc.poll() is None
        finally:
            proc.kill()
            proc.wait()


def test_a_log_file_shared_with_the_parent_keeps_its_position(tmp_path: Path) -> None:
    """The target's stdout is this test's own file (an inherited log, as under pytest's
    capture): its position belongs to the shared open file, so the apply leaves it and says
    so, instead of rewinding this process's writes."""
    log = tmp_path / "log"
    with _logging_to(log) as (proc, out):
        dump(proc.pid, tmp_path / "img")
        out.write(b"written by the parent after the checkpoint\n")
        out.flush()
        ours = os.lseek(out.fileno(), 0, os.SEEK_CUR)
        result = apply(tmp_path / "img", proc.pid)
        assert os.lseek(out.fileno(), 0, os.SEEK_CUR) == ours  # not rewound
        assert not [s for s in result.plan.of(ResetFd) if s.fd == 1 and s.pos is not None]
        assert any(
            f"fd 1 ({log}): its open file is shared with pid {os.getpid()}" in note
            for note in result.plan.notes
        ), result.plan.notes
    assert log.read_bytes().endswith(b"written by the parent after the checkpoint\n")


def test_the_process_sharing_a_file_is_found_again_and_forgotten_when_it_stops(
    tmp_path: Path,
) -> None:
    """``file_shared_with`` names this process for the target's stdout, again at the next
    session (from what it found before, confirmed by kcmp), and no longer once this
    process's descriptor names another file."""
    with _logging_to(tmp_path / "log") as (proc, out):
        for _ in range(2):
            with attach(proc.pid) as s:
                assert s.file_shared_with(1) == os.getpid()
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, out.fileno())  # this process's only copy now names /dev/null
        os.close(null)
        with attach(proc.pid) as s:
            assert s.file_shared_with(1) is None

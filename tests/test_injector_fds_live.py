"""Reading the descriptor table, fs and signal state of a real process (tests/targets/
fds_target.c), every value against what the target set up or what the kernel tells us
independently about the same objects."""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from injector import InjectorError, NoSuchProcess, ZombieProcess
from injector.fdinfo import (
    Descriptor,
    EpollTarget,
    EventFd,
    EventPoll,
    Fifo,
    FileOwner,
    Inotify,
    Memfd,
    PidFd,
    Pipe,
    RegularFile,
    SignalFd,
    Socket,
    TimerFd,
)
from injector.fds import peek_pipe, read_fds, read_fs
from injector.signals import PosixTimer, read_posix_timers, read_signals, sigmask
from injector.sockdiag import (
    SHUT_RD,
    SHUT_WR,
    TCP_CLOSE,
    TCP_ESTABLISHED,
    TCP_LISTEN,
    InetSocket,
    UnixSocket,
    netns_inode,
)
from tests.procs import NOBODY, REPO, Target, assert_untouched, build_c, spawn

pytestmark = pytest.mark.live

O_LARGEFILE = 0o100000  # what the kernel forces into f_flags on 64-bit (0 in Python here)
O_CLOEXEC = 0o2000000
F_SEAL_SHRINK, F_SEAL_GROW = 2, 4
F_OWNER_PID = 1
IN_MODIFY, IN_CREATE, IN_DELETE = 0x2, 0x100, 0x200
EPOLLIN, EPOLLERR, EPOLLHUP, EPOLLET = 0x1, 0x8, 0x10, 1 << 31


@attrs.frozen
class Live:
    """A running fds_target and what was read from it."""

    target: Target
    work: Path
    info: dict[str, list[str]]
    timers: list[int]
    worker: int
    table: dict[int, Descriptor]

    def fd(self, label: str) -> int:
        return int(self.info[label][0])

    def ino(self, label: str) -> int:
        return int(self.info[label][1])

    def entry(self, label: str) -> Descriptor:
        return self.table[self.fd(label)]


def read_setup(t: Target) -> tuple[dict[str, list[str]], list[int], int]:
    """The target's "fd", "timer" and "tid" lines up to "ready"."""
    info: dict[str, list[str]] = {}
    timers: list[int] = []
    worker = 0
    while True:
        words = t.readline().split()
        if words[:1] == ["fail"]:
            raise AssertionError(" ".join(words))
        if words[:1] == ["fd"]:
            info[words[1]] = words[2:]
        elif words[:1] == ["timer"]:
            timers = [int(w) for w in words[1:]]
        elif words[:1] == ["tid"]:
            worker = int(words[1])
        elif words[:1] == ["ready"]:
            return info, timers, worker


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    work = tmp_path_factory.mktemp("fds") / "work dir"
    work.mkdir()
    with spawn(build_c("fds_target.c"), str(work)) as t:
        info, timers, worker = read_setup(t)
        t.wait_in_syscall(0)
        table = {d.fd: d for d in read_fds(t.pid)}
        yield Live(t, work, info, timers, worker, table)


def own_mnt_id(path: Path) -> int:
    """The mount id of ``path`` from our own fdinfo of it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
            if line.startswith("mnt_id:"):
                return int(line.split()[1])
    finally:
        os.close(fd)
    raise AssertionError("no mnt_id")


def default_pipe_size() -> int:
    r, w = os.pipe()
    try:
        return fcntl.fcntl(r, 1032)  # F_GETPIPE_SZ
    finally:
        os.close(r)
        os.close(w)


def test_table_holds_exactly_the_targets_descriptors(live: Live) -> None:
    """Every descriptor the target has is listed once, in order, and nothing else."""
    expected = {0, 1, 2} | {int(words[0]) for words in live.info.values()}
    assert sorted(live.table) == sorted(expected)
    assert set(os.listdir(f"/proc/{live.target.pid}/fd")) == {str(fd) for fd in expected}


def test_regular_file_with_moved_position(live: Live) -> None:
    """A file opened O_RDWR with its offset moved: path with a space, pos, flags, stat."""
    d = live.entry("data")
    path = live.work / "data file.txt"
    st = path.stat()
    assert d.link == os.fsencode(path)
    assert (d.pos, d.flags, d.file_flags, d.fd_flags, d.cloexec) == (
        1234,
        os.O_RDWR | O_LARGEFILE,
        os.O_RDWR | O_LARGEFILE,
        0,
        False,
    )
    assert d.mnt_id == own_mnt_id(path)
    assert d.ino == live.ino("data") == st.st_ino
    assert d.kind == RegularFile(
        path=str(path),
        deleted=False,
        mode=stat.S_IFREG | 0o640,  # 0644 under umask 027
        size=5000,
        dev=st.st_dev,
        ino=st.st_ino,
        nlink=1,
        rdev=0,
    )
    assert d.fd_type == "REG" and d.owner is None


def test_append_only_log_file(live: Live) -> None:
    """O_WRONLY|O_APPEND shows in the flags, the position is after the write."""
    d = live.entry("log")
    assert d.pos == 6
    assert d.flags == os.O_WRONLY | os.O_APPEND | O_LARGEFILE
    assert isinstance(d.kind, RegularFile)
    assert (d.kind.size, d.kind.mode) == (6, stat.S_IFREG | 0o600)


def test_close_on_exec_split_as_criu_does(live: Live) -> None:
    """O_CLOEXEC is in fdinfo's flags; fd_flags gets FD_CLOEXEC, file_flags the rest."""
    d = live.entry("cloexec")
    assert d.flags == os.O_RDWR | O_LARGEFILE | O_CLOEXEC
    assert (d.cloexec, d.fd_flags, d.file_flags) == (True, 1, os.O_RDWR | O_LARGEFILE)
    assert d.pos == 3
    assert isinstance(d.kind, RegularFile) and d.kind.size == 10


def test_unlinked_file_is_marked_deleted(live: Live) -> None:
    """An open file whose name was removed: suffix stripped, deleted, no links left."""
    d = live.entry("deleted")
    assert d.link == os.fsencode(live.work / "gone.txt") + b" (deleted)"
    assert isinstance(d.kind, RegularFile)
    assert (d.kind.path, d.kind.deleted, d.kind.nlink) == (str(live.work / "gone.txt"), True, 0)
    assert (d.kind.size, d.pos, d.kind.ino) == (100, 100, live.ino("deleted"))


def test_name_ending_in_deleted_is_not_taken_for_unlinked(live: Live) -> None:
    """A file really called "odd (deleted)" keeps its whole name and is not deleted."""
    d = live.entry("oddname")
    assert d.link == os.fsencode(live.work / "odd (deleted)")
    assert isinstance(d.kind, RegularFile)
    assert (d.kind.path, d.kind.deleted, d.kind.nlink) == (
        str(live.work / "odd (deleted)"),
        False,
        1,
    )


def test_unlinked_name_of_a_file_linked_elsewhere(live: Live) -> None:
    """Opened as linked.txt, then linked as "other name.txt" and unlinked: deleted, one link."""
    d = live.entry("elsewhere")
    assert d.link == os.fsencode(live.work / "linked.txt") + b" (deleted)"
    assert isinstance(d.kind, RegularFile)
    assert (d.kind.path, d.kind.deleted, d.kind.nlink) == (str(live.work / "linked.txt"), True, 1)
    assert d.kind.ino == (live.work / "other name.txt").stat().st_ino == live.ino("elsewhere")


def test_directory_descriptor(live: Live) -> None:
    """A directory opened O_DIRECTORY is a REG entry with a directory mode."""
    d = live.entry("dir")
    assert d.flags == os.O_DIRECTORY | O_LARGEFILE
    assert isinstance(d.kind, RegularFile) and d.kind.is_dir
    assert (d.kind.path, d.kind.ino) == (str(live.work), live.ino("dir"))


def test_fifo_with_bytes_queued(live: Live) -> None:
    """A FIFO opened by path: its inode as pipe_id, the 4 bytes written, the pipe size."""
    d = live.entry("fifo")
    st = (live.work / "fifo").stat()
    assert d.flags == os.O_RDWR | os.O_NONBLOCK | O_LARGEFILE
    assert d.kind == Fifo(
        path=str(live.work / "fifo"),
        deleted=False,
        pipe_id=st.st_ino,
        mode=stat.S_IFIFO | 0o600,
        dev=st.st_dev,
        queued=4,
        capacity=default_pipe_size(),
    )
    assert d.fd_type == "FIFO"


def test_pipe_ends_share_a_pipe_id_and_see_the_queued_bytes(live: Live) -> None:
    """Both ends of a nonblocking pipe: one pipe_id, 9 bytes queued, the right flags."""
    r, w = live.entry("pipe_r"), live.entry("pipe_w")
    expected = Pipe(pipe_id=live.ino("pipe_r"), queued=9, capacity=default_pipe_size())
    assert r.kind == w.kind == expected
    assert live.ino("pipe_r") == live.ino("pipe_w")
    assert r.link == f"pipe:[{live.ino('pipe_r')}]".encode()
    assert (r.flags, w.flags) == (os.O_NONBLOCK, os.O_WRONLY | os.O_NONBLOCK)


def test_peek_pipe_leaves_the_bytes_queued(live: Live) -> None:
    """The queued bytes of the pipe and the FIFO, read without taking them away."""
    pid = live.target.pid
    assert peek_pipe(pid, live.fd("pipe_r")) == b"pipe-data"
    assert peek_pipe(pid, live.fd("fifo")) == b"fifo"
    assert peek_pipe(pid, live.fd("pipe_r")) == b"pipe-data"
    after = {d.fd: d for d in read_fds(pid)}
    assert after[live.fd("pipe_r")].kind == live.entry("pipe_r").kind  # still 9 queued
    with pytest.raises(InjectorError) as info:
        peek_pipe(pid, live.fd("pipe_w"))
    assert info.value.errno == errno.EBADF and "write end" in str(info.value)
    with pytest.raises(InjectorError) as info:
        peek_pipe(pid, live.fd("eventfd"))
    assert info.value.errno == errno.EINVAL
    with pytest.raises(InjectorError) as info:
        peek_pipe(pid, 999)
    assert info.value.errno == errno.EBADF


def test_sigio_owner_of_the_read_end(live: Live) -> None:
    """F_SETOWN/F_SETSIG done by the target show as the fown entry; others are all zero."""
    pid = live.target.pid
    assert live.entry("pipe_r").owner == FileOwner(
        uid=0, euid=0, signum=signal.SIGUSR2, pid_type=F_OWNER_PID, pid=pid
    )
    assert live.entry("pipe_w").owner == FileOwner(0, 0, 0, 0, 0)


def unix(live: Live, label: str) -> tuple[Socket, UnixSocket]:
    kind = live.entry(label).kind
    assert isinstance(kind, Socket) and isinstance(kind.diag, UnixSocket), kind
    assert kind.ino == kind.diag.ino == live.ino(label)
    assert kind.KIND == "UNIXSK"
    return kind, kind.diag


def test_unix_socketpair_peers_queue_and_shutdown(live: Live) -> None:
    """The pair points at each other; 5 bytes wait in one end; SHUT_WR on the other."""
    k0, u0 = unix(live, "upair0")
    _, u1 = unix(live, "upair1")
    assert (k0.family, k0.type, k0.protocol) == (socket.AF_UNIX, socket.SOCK_STREAM, 0)
    assert (u0.type, u0.state, u0.name, u0.peer) == (
        socket.SOCK_STREAM,
        TCP_ESTABLISHED,
        None,
        live.ino("upair1"),
    )
    assert (u1.state, u1.peer) == (TCP_ESTABLISHED, live.ino("upair0"))
    assert (u0.rqueue, u1.rqueue) == (5, 0)
    assert (u0.shutdown, u1.shutdown) == (SHUT_RD, SHUT_WR)
    assert live.entry("upair0").flags == os.O_RDWR


def test_unix_listener_bound_to_a_path(live: Live) -> None:
    """A listening socket bound to a relative path with a space: name, file inode, backlog."""
    _, u = unix(live, "ulisten")
    st = (live.work / "my sock").stat()
    assert (u.state, u.type, u.name, u.abstract) == (
        TCP_LISTEN,
        socket.SOCK_STREAM,
        b"my sock",
        False,
    )
    assert (u.vfs_ino, u.vfs_dev) == (st.st_ino, st.st_dev)
    assert u.vfs_ino == int(live.info["ulisten"][2])
    assert (u.backlog, u.rqueue, u.icons, u.peer) == (5, 0, (), 0)


def test_unix_abstract_datagram_socket(live: Live) -> None:
    """An abstract name keeps its leading NUL; an unconnected datagram socket is CLOSE."""
    _, u = unix(live, "uabstract")
    assert u.name == b"\0" + live.info["uabstract"][2].encode()
    assert (u.abstract, u.type, u.state, u.vfs_ino) == (True, socket.SOCK_DGRAM, TCP_CLOSE, None)


def inet(live: Live, label: str) -> tuple[Socket, InetSocket]:
    kind = live.entry(label).kind
    assert isinstance(kind, Socket) and isinstance(kind.diag, InetSocket), kind
    assert kind.ino == kind.diag.ino == live.ino(label)
    assert kind.KIND == "INETSK"
    return kind, kind.diag


LOOPBACK = ipaddress.IPv4Address("127.0.0.1")


def test_tcp_listener_on_loopback(live: Live) -> None:
    """LISTEN on 127.0.0.1:port with backlog 8 and SO_REUSEADDR set."""
    kind, sk = inet(live, "tcplisten")
    port = int(live.info["tcplisten"][2])
    assert (sk.family, sk.protocol, sk.type, sk.state) == (
        socket.AF_INET,
        socket.IPPROTO_TCP,
        socket.SOCK_STREAM,
        TCP_LISTEN,
    )
    assert (sk.src, sk.sport, sk.dst, sk.dport) == (
        LOOPBACK,
        port,
        ipaddress.IPv4Address("0.0.0.0"),
        0,
    )
    assert (sk.backlog, sk.rqueue) == (8, 0)
    assert kind.options is not None and kind.options.reuseaddr is True
    assert kind.options.ip is not None and kind.options.ip.v6only is None


def test_connected_tcp_pair(live: Live) -> None:
    """Both ends of a loopback connection: addresses, ports, the 4 unread bytes, NODELAY."""
    client_kind, client = inet(live, "tcpclient")
    _, server = inet(live, "tcpserver")
    cport, lport = (int(w) for w in live.info["tcpclient"][2:4])
    assert (client.state, server.state) == (TCP_ESTABLISHED, TCP_ESTABLISHED)
    assert (client.src, client.sport) == (server.dst, server.dport) == (LOOPBACK, cport)
    assert (client.dst, client.dport) == (server.src, server.sport) == (LOOPBACK, lport)
    assert server.rqueue == 4
    assert client_kind.options is not None and client_kind.options.tcp is not None
    assert client_kind.options.tcp.nodelay is True


def test_udp_on_ipv6_loopback(live: Live) -> None:
    """A UDP socket bound to [::1]:port (bound to one address, so v6only)."""
    if "udp6" not in live.info:
        pytest.skip("no IPv6 loopback here")
    kind, sk = inet(live, "udp6")
    assert (sk.family, sk.protocol, sk.type, sk.state) == (
        socket.AF_INET6,
        socket.IPPROTO_UDP,
        socket.SOCK_DGRAM,
        TCP_CLOSE,
    )
    assert (sk.src, sk.sport) == (ipaddress.IPv6Address("::1"), int(live.info["udp6"][2]))
    assert sk.v6only is True
    assert kind.options is not None and kind.options.ip is not None
    assert kind.options.ip.v6only is True


def test_only_sockets_takes_duplicates_of_sockets_alone(live: Live) -> None:
    """``only_sockets``: sockets still learn their family and options from a duplicate, a
    pipe keeps what /proc says (its pipe_id) without the queue a duplicate would tell, and
    the table is the same descriptors in the same order."""
    table = {d.fd: d for d in read_fds(live.target.pid, sock_diag=False, only_sockets=True)}
    assert sorted(table) == sorted(live.table)
    pipe = table[live.fd("pipe_r")].kind
    assert isinstance(pipe, Pipe) and pipe.pipe_id == live.ino("pipe_r")
    assert pipe.queued is None and pipe.capacity is None
    full = live.table[live.fd("tcplisten")].kind
    sock = table[live.fd("tcplisten")].kind
    assert isinstance(sock, Socket) and isinstance(full, Socket)
    assert (sock.family, sock.type, sock.options) == (full.family, full.type, full.options)
    assert sock.KIND == "INETSK"


def test_eventfd_count(live: Live) -> None:
    """The eventfd counter set at creation, not a semaphore, nonblocking."""
    d = live.entry("eventfd")
    assert isinstance(d.kind, EventFd)
    assert (d.kind.count, d.kind.semaphore) == (7, False)
    assert d.flags == os.O_RDWR | os.O_NONBLOCK
    assert d.fd_type == "EVENTFD"


def test_epoll_targets_with_events_and_data(live: Live) -> None:
    """Every watched fd: events (EPOLLERR|EPOLLHUP added), data, inode and device."""
    d = live.entry("epoll")
    pid = live.target.pid
    listen_fd, event_fd = live.fd("tcplisten"), live.fd("eventfd")
    assert d.cloexec
    assert isinstance(d.kind, EventPoll)
    targets = sorted(d.kind.targets, key=lambda t: t.tfd)
    socket_dev = os.stat(f"/proc/{pid}/fd/{listen_fd}").st_dev
    anon_dev = os.stat(f"/proc/{pid}/fd/{event_fd}").st_dev
    expected = [
        (listen_fd, EPOLLIN | EPOLLERR | EPOLLHUP, 0x1111, live.ino("tcplisten"), socket_dev),
        (event_fd, EPOLLIN | EPOLLERR | EPOLLHUP | EPOLLET, 0x2222, live.ino("eventfd"), anon_dev),
    ]
    assert [(t.tfd, t.events, t.data, t.ino, t.dev) for t in targets] == sorted(expected)
    assert all(isinstance(t, EpollTarget) and t.pos == 0 for t in targets)


def test_signalfd_mask(live: Live) -> None:
    """The signalfd's mask holds exactly SIGWINCH and SIGUSR2."""
    d = live.entry("signalfd")
    assert d.kind == SignalFd(sigmask(signal.SIGWINCH, signal.SIGUSR2))
    assert d.flags == os.O_RDWR | os.O_NONBLOCK


def test_timerfd_relative_and_absolute(live: Live) -> None:
    """clock, flags, interval exactly; the time left close to what was armed."""
    rel, absolute = live.entry("timerfd").kind, live.entry("timerfd_abs").kind
    assert isinstance(rel, TimerFd) and isinstance(absolute, TimerFd)
    assert (rel.clockid, rel.settime_flags, rel.ticks, rel.isec, rel.insec) == (1, 0, 0, 5, 0)
    assert 90 <= rel.vsec < 100 and 0 <= rel.vnsec < 10**9
    assert (absolute.clockid, absolute.settime_flags, absolute.isec, absolute.insec) == (
        0,
        1,
        0,
        250_000_000,
    )
    assert 990 <= absolute.vsec < 1000


def test_inotify_watches(live: Live) -> None:
    """Both watches: wd, watched inode and device, mask, and an ext4-style file handle."""
    kind = live.entry("inotify").kind
    assert isinstance(kind, Inotify)
    _, wd1, dir_ino, wd2, log_ino = (int(w) for w in live.info["inotify"][1:])
    watches = sorted(kind.watches, key=lambda w: w.wd)
    dev = live.work.stat().st_dev
    assert [(w.wd, w.ino, w.dev, w.mask, w.ignored_mask) for w in watches] == [
        (wd1, dir_ino, dev, IN_CREATE | IN_DELETE, 0),
        (wd2, log_ino, dev, IN_MODIFY, 0),
    ]
    for w in watches:
        assert w.fhandle_bytes == len(w.f_handle)
        if w.fhandle_type == 1:  # FILEID_INO32_GEN: the inode number comes first
            assert int.from_bytes(w.f_handle[:4], "little") == w.ino


def test_memfd_name_size_and_seals(live: Live) -> None:
    """A memfd: name without the prefix, size, seals the target added, its position."""
    d = live.entry("memfd")
    probe = os.memfd_create("probe")
    try:
        shmem_dev = os.fstat(probe).st_dev
    finally:
        os.close(probe)
    assert d.kind == Memfd(
        name="applier memfd",
        size=3000,
        mode=stat.S_IFREG | 0o777,
        ino=live.ino("memfd"),
        dev=shmem_dev,
        uid=0,
        gid=0,
        seals=F_SEAL_SHRINK | F_SEAL_GROW,
    )
    assert d.pos == 3000 and d.fd_type == "MEMFD"


def test_pidfd(live: Live) -> None:
    """A pidfd of the target itself."""
    pid = live.target.pid
    assert live.entry("pidfd").kind == PidFd(pid=pid, nspid=(pid,))


def test_fs_state(live: Live) -> None:
    """cwd (a directory with a space), root and umask 027."""
    fs = read_fs(live.target.pid)
    assert (fs.cwd.path, fs.cwd.deleted, fs.umask) == (str(live.work), False, 0o027)
    assert fs.cwd.stat is not None and fs.cwd.stat.ino == live.work.stat().st_ino
    assert fs.cwd.is_dir and fs.root.path == "/" and fs.root.is_dir


def test_signal_masks_per_thread(live: Live) -> None:
    """Blocked and pending per thread, shared pending, ignored and caught."""
    pid = live.target.pid
    state = read_signals(pid)
    assert [t.tid for t in state.threads] == [pid, live.worker]
    main, worker = state.threads
    assert main.blocked == sigmask(signal.SIGUSR1, signal.SIGWINCH)
    assert worker.blocked == sigmask(signal.SIGUSR1, signal.SIGWINCH, signal.SIGTERM, signal.SIGHUP)
    assert (main.pending, worker.pending) == (sigmask(signal.SIGWINCH), 0)
    assert state.shared_pending == sigmask(signal.SIGUSR1)
    ours = read_signals(os.getpid()).leader.ignored
    reset = sigmask(signal.SIGPIPE, signal.SIGXFSZ)  # subprocess restores these to default
    assert main.ignored == worker.ignored == (ours & ~reset) | sigmask(signal.SIGPIPE)
    assert main.caught == worker.caught
    assert main.caught & ((1 << 31) - 1) == sigmask(signal.SIGUSR2)  # glibc's own are >= 32
    assert state.queued is not None and state.queued >= 2


def test_posix_timers(live: Live) -> None:
    """Both POSIX timers: id, signal, value, process vs thread notification, clock."""
    pid = live.target.pid
    first, second = live.timers
    assert sorted(read_posix_timers(pid), key=lambda t: t.it_id) == [
        PosixTimer(first, signal.SIGUSR2, 0x1234, "signal", False, pid, 1),
        PosixTimer(second, signal.SIGUSR2, 0x5678, "signal", True, live.worker, 0),
    ]


def test_reading_leaves_the_target_untouched(live: Live) -> None:
    """The target runs on untraced with the same table; we hold no extra descriptor."""
    assert_untouched(live.target)
    ours = sorted(os.listdir("/proc/self/fd"))
    again = {d.fd: d for d in read_fds(live.target.pid)}
    assert sorted(os.listdir("/proc/self/fd")) == ours
    assert again.keys() == live.table.keys()
    assert again[live.fd("pipe_r")].kind == live.entry("pipe_r").kind  # the 9 bytes still there
    assert again[live.fd("data")].pos == 1234
    live.target.send("ping")
    assert live.target.expect("pong") == []


# --------------------------------------------------------------------------- errors


READER = """
import sys
from injector.fds import read_fds
try:
    table = read_fds(int(sys.argv[1]))
except Exception as exc:
    print(type(exc).__name__, exc)
else:
    print("ok", len(table))
"""


def run_reader(pid: int, *prefix: str) -> str:
    """read_fds(pid) in a separate Python, started through ``prefix`` (setpriv ...)."""
    out = subprocess.run(
        [*prefix, sys.executable, "-c", READER, str(pid)],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"},
    )
    return out.stdout.strip()


def test_missing_pid_is_no_such_process() -> None:
    """A pid above pid_max, 0 and -1: NoSuchProcess from every reader."""
    beyond = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1
    for pid in (beyond, 0, -1):
        for reader in (read_fds, read_fs, read_signals, read_posix_timers):
            with pytest.raises(NoSuchProcess) as info:
                reader(pid)
            assert info.value.pid == pid and info.value.errno in (errno.ESRCH, errno.ENOENT)


def test_zombie_is_refused() -> None:
    """A child that exited but was not reaped yet: ZombieProcess, not an empty table."""
    child = subprocess.Popen(["true"])
    try:
        deadline = time.monotonic() + 10
        while Path(f"/proc/{child.pid}/stat").read_bytes().split(b") ")[-1][:1] != b"Z":
            assert time.monotonic() < deadline
            time.sleep(0.005)
        with pytest.raises(ZombieProcess):
            read_fds(child.pid)
        with pytest.raises(ZombieProcess):
            read_fs(child.pid)
    finally:
        child.wait()


def test_no_permission_is_permission_denied(live: Live) -> None:
    """Root without capabilities may not read a fully capable root process's table."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv")
    line = run_reader(live.target.pid, "setpriv", "--bounding-set=-all", "--inh-caps=-all")
    assert line.startswith(f"PermissionDenied pid {live.target.pid}: cannot read /proc/PID/fd")
    assert "EACCES" in line or "EPERM" in line
    assert_untouched(live.target)


def test_sockets_of_a_target_in_another_netns(tmp_path: Path) -> None:
    """Sockets in the target's own netns are found there, an older one in ours."""
    if os.geteuid() != 0:
        pytest.skip("needs CAP_SYS_ADMIN")
    work = tmp_path / "w"
    work.mkdir()
    with spawn(build_c("fds_target.c"), str(work), "netns") as t:
        info, _, _ = read_setup(t)
        theirs = netns_inode(t.pid)
        assert theirs != netns_inode("self")
        table = {d.fd: d for d in read_fds(t.pid)}
        listener = table[int(info["tcplisten"][0])].kind
        assert isinstance(listener, Socket) and isinstance(listener.diag, InetSocket)
        assert (listener.diag.state, listener.diag.sport, listener.diag.netns) == (
            TCP_LISTEN,
            int(info["tcplisten"][2]),
            theirs,
        )
        pair = table[int(info["upair0"][0])].kind
        assert isinstance(pair, Socket) and isinstance(pair.diag, UnixSocket)
        assert pair.diag.peer == int(info["upair1"][1]) and pair.diag.netns == theirs
        assert (listener.netns, pair.netns) == (theirs, theirs)
        # the socket made before unshare() lives on in our namespace, and is found there
        early = table[int(info["early"][0])].kind
        assert isinstance(early, Socket) and isinstance(early.diag, InetSocket)
        assert (early.netns, early.diag.netns) == (netns_inode("self"), netns_inode("self"))
        assert (early.diag.state, early.diag.sport) == (TCP_LISTEN, int(info["early"][2]))
        assert netns_inode("self") != theirs  # the reading thread's netns stayed ours
        assert_untouched(t)


def test_foreign_netns_without_privilege_is_a_clear_error() -> None:
    """A netns we may not enter is a PermissionDenied naming it, not missing sockets."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root (to become uid 65534) and setpriv")
    work = Path(tempfile.mkdtemp(prefix="applier-fds-"))  # reachable by uid 65534
    try:
        work.chmod(0o777)
        setpriv = shutil.which("setpriv") or "setpriv"
        binary = build_c("fds_target.c")
        with spawn(Path(setpriv), *NOBODY, str(binary), str(work), "userns") as t:
            info, _, _ = read_setup(t)
            line = run_reader(t.pid, "setpriv", *NOBODY)
            assert line.startswith(
                f"PermissionDenied pid {t.pid}: its sockets live in network namespace"
            )
            assert f"net:[{netns_inode(t.pid)}]" in line and "CAP_SYS_ADMIN" in line
            assert "upair0" in info
            assert_untouched(t)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_descriptors_closed_while_reading_are_skipped() -> None:
    """Descriptors opened and closed while reading are skipped, never mixed up."""
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            r, w = os.pipe()
            f = os.open("/etc/hostname", os.O_RDONLY)
            os.close(r)
            os.close(w)
            os.close(f)

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        seen = 0
        for _ in range(100):
            for d in read_fds(os.getpid()):
                if isinstance(d.kind, Pipe):
                    seen += 1
                    assert d.link == f"pipe:[{d.kind.pipe_id}]".encode()
                    assert d.stat is not None and d.stat.ino == d.kind.pipe_id == d.ino
                elif isinstance(d.kind, RegularFile):
                    assert d.ino == d.kind.ino
                    assert d.kind.path == os.fsdecode(d.link.removesuffix(b" (deleted)"))
        assert seen > 0
    finally:
        stop.set()
        thread.join()

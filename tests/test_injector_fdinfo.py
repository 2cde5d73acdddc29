"""Parsing saved /proc/PID/fdinfo text, link text and status files, and reading saved procfs
trees: every kind, odd paths, " (deleted)", descriptors closed while being read, malformed
input. The samples were captured from Linux 6.18 (tests/targets/fds_target.c)."""

from __future__ import annotations

import ast
import os
import stat
from pathlib import Path

import pytest

from injector import InjectorError, NoSuchProcess, ZombieProcess
from injector.fdinfo import (
    EpollTarget,
    EventFd,
    EventPoll,
    Fifo,
    FileStat,
    Inotify,
    InotifyWatch,
    Memfd,
    Other,
    PidFd,
    Pipe,
    RegularFile,
    SignalFd,
    Socket,
    TimerFd,
    parse_fdinfo,
    split_deleted,
)
from injector.fds import read_fds, read_fs
from injector.signals import (
    PosixTimer,
    parse_posix_timers,
    parse_status_signals,
    read_posix_timers,
    read_signals,
    sigmask,
    signals_in,
)


def fdinfo(flags: str, *extra: str, pos: int = 0, mnt_id: int = 17, ino: int = 1039) -> bytes:
    """fdinfo text as fs/proc/fd.c prints it, plus the kind's own lines."""
    head = f"pos:\t{pos}\nflags:\t{flags}\nmnt_id:\t{mnt_id}\nino:\t{ino}\n"
    return (head + "".join(line + "\n" for line in extra)).encode()


REG_STAT = FileStat(
    mode=stat.S_IFREG | 0o640, ino=2154512, dev=65024, rdev=0, nlink=1, uid=0, gid=0, size=5000
)


def test_regular_file_fields_and_flags() -> None:
    """pos (decimal), flags (octal, O_CLOEXEC split off), mnt_id, ino, and the path kind."""
    d = parse_fdinfo(
        5,
        b"/tmp/work dir/data file.txt",
        fdinfo("02100002", pos=1234, mnt_id=27, ino=2154512),
        REG_STAT,
    )
    assert (d.fd, d.pos, d.flags, d.mnt_id, d.ino) == (5, 1234, 0o2100002, 27, 2154512)
    assert (d.cloexec, d.fd_flags, d.file_flags, d.access_mode) == (True, 1, 0o100002, os.O_RDWR)
    assert d.kind == RegularFile(
        path="/tmp/work dir/data file.txt",
        deleted=False,
        mode=REG_STAT.mode,
        size=5000,
        dev=65024,
        ino=2154512,
        nlink=1,
        rdev=0,
    )
    assert d.fd_type == "REG" and d.stat == REG_STAT and d.owner is None


def test_deleted_suffix_is_stripped_unless_it_is_the_real_name() -> None:
    """ " (deleted)" is the kernel's mark of an unlinked file, but may also be a real name."""
    gone = FileStat(stat.S_IFREG | 0o600, 9, 65024, 0, 0, 0, 0, 100)
    d = parse_fdinfo(6, b"/tmp/w/gone.txt (deleted)", fdinfo("0100002", pos=100), gone)
    assert isinstance(d.kind, RegularFile)
    assert (d.kind.path, d.kind.deleted, d.kind.nlink) == ("/tmp/w/gone.txt", True, 0)
    real = parse_fdinfo(7, b"/tmp/w/odd (deleted)", fdinfo("0100002"), REG_STAT, real_name=True)
    assert isinstance(real.kind, RegularFile)
    assert (real.kind.path, real.kind.deleted) == ("/tmp/w/odd (deleted)", False)
    # an unlinked file whose name itself ended in " (deleted)": only one suffix is the mark
    assert split_deleted(b"/a (deleted) (deleted)") == (b"/a (deleted)", True)
    assert split_deleted(b"/a (deleted)x") == (b"/a (deleted)x", False)


def test_odd_bytes_in_paths_survive() -> None:
    """Newlines are not escaped by readlink and undecodable bytes round-trip through fsdecode."""
    raw = b"/tmp/a\nb/\xff name"
    d = parse_fdinfo(3, raw, fdinfo("0100000"), REG_STAT)
    assert isinstance(d.kind, RegularFile)
    assert os.fsencode(d.kind.path) == raw and d.link == raw


def test_directory_and_device_are_reg_with_their_mode() -> None:
    """A directory and /dev/null are REG entries; the mode tells them apart."""
    directory = FileStat(stat.S_IFDIR | 0o755, 2, 65024, 0, 2, 0, 0, 4096)
    d = parse_fdinfo(7, b"/tmp/w", fdinfo("0300000"), directory)
    assert isinstance(d.kind, RegularFile) and d.kind.is_dir and not d.kind.is_device
    null = FileStat(stat.S_IFCHR | 0o666, 5, 5, os.makedev(1, 3), 1, 0, 0, 0)
    n = parse_fdinfo(0, b"/dev/null", fdinfo("0100000"), null)
    assert isinstance(n.kind, RegularFile) and n.kind.is_device and n.kind.rdev == os.makedev(1, 3)


def test_path_named_file_needs_its_stat() -> None:
    """Without a stat a path-named descriptor cannot be classified: ValueError."""
    with pytest.raises(ValueError, match="needs its stat"):
        parse_fdinfo(3, b"/etc/hostname", fdinfo("0100000"))


def test_fifo_by_mode() -> None:
    """A path-named FIFO: its inode is the pipe_id."""
    fifo = FileStat(stat.S_IFIFO | 0o600, 2154562, 65024, 0, 1, 0, 0, 0)
    d = parse_fdinfo(8, b"/tmp/w/fifo", fdinfo("0104002", ino=2154562), fifo)
    assert d.kind == Fifo("/tmp/w/fifo", False, 2154562, fifo.mode, 65024)
    assert d.fd_type == "FIFO"


def test_pipe_and_socket_links() -> None:
    """pipe:[N] and socket:[N] give the inode; nothing else is known from /proc."""
    p = parse_fdinfo(9, b"pipe:[16186]", fdinfo("04000", mnt_id=16, ino=16186))
    assert p.kind == Pipe(16186) and p.fd_type == "PIPE" and p.flags == os.O_NONBLOCK
    s = parse_fdinfo(11, b"socket:[16187]", fdinfo("02", mnt_id=10, ino=16187), None)
    assert s.kind == Socket(16187) and s.fd_type == "UND"  # family unknown without diag
    assert Socket(1, family=1).KIND == "UNIXSK" and Socket(1, family=10).KIND == "INETSK"


def test_eventfd_count_is_hex() -> None:
    """eventfd-count is printed with %llx (right-aligned), id and semaphore in decimal."""
    d = parse_fdinfo(
        19,
        b"anon_inode:[eventfd]",
        fdinfo("04002", "eventfd-count:               1f", "eventfd-id: 3", "eventfd-semaphore: 1"),
    )
    assert d.kind == EventFd(count=31, id=3, semaphore=True)
    old = parse_fdinfo(19, b"anon_inode:[eventfd]", fdinfo("02", "eventfd-count: 7"))
    assert old.kind == EventFd(count=7, id=None, semaphore=None)


def test_epoll_tfd_lines() -> None:
    """Every tfd line with events, data (hex), pos, ino (hex) and sdev (kernel-encoded hex)."""
    d = parse_fdinfo(
        20,
        b"anon_inode:[eventpoll]",
        fdinfo(
            "02000002",
            "tfd:       19 events: 80000019 data:             2222  pos:0 ino:40f sdev:10",
            "tfd:       15 events:       19 data:             1111  pos:0 ino:3f3f sdev:9",
        ),
    )
    assert d.kind == EventPoll(
        (
            EpollTarget(tfd=19, events=0x80000019, data=0x2222, pos=0, ino=0x40F, sdev=0x10),
            EpollTarget(tfd=15, events=0x19, data=0x1111, pos=0, ino=0x3F3F, sdev=9),
        )
    )
    assert isinstance(d.kind, EventPoll) and d.kind.targets[0].dev == os.makedev(0, 16)
    # before Linux 3.18 only tfd, events and data were printed; an empty epoll has no lines
    short = parse_fdinfo(4, b"anon_inode:[eventpoll]", fdinfo("02", "tfd: 3 events: 1 data: ff"))
    assert short.kind == EventPoll((EpollTarget(3, 1, 0xFF),))
    assert parse_fdinfo(4, b"anon_inode:[eventpoll]", fdinfo("02")).kind == EventPoll(())


def test_signalfd_mask() -> None:
    """sigmask is a 16-digit hex mask."""
    d = parse_fdinfo(21, b"anon_inode:[signalfd]", fdinfo("04002", "sigmask:\t0000000008000800"))
    assert d.kind == SignalFd(0x8000800)
    assert signals_in(0x8000800) == {12, 28} and sigmask(12, 28) == 0x8000800


def test_timerfd_lines() -> None:
    """clockid, ticks, settime flags (octal), it_value and it_interval as (sec, nsec)."""
    d = parse_fdinfo(
        23,
        b"anon_inode:[timerfd]",
        fdinfo(
            "04002",
            "clockid: 0",
            "ticks: 2",
            "settime flags: 03",
            "it_value: (998, 916549313)",
            "it_interval: (0, 250000000)",
        ),
    )
    assert d.kind == TimerFd(0, 2, 3, 998, 916549313, 0, 250000000)
    assert d.fd_type == "TIMERFD"


def test_inotify_watch_lines() -> None:
    """Every inotify wd line: hex fields, and the file handle as bytes; without a handle too."""
    d = parse_fdinfo(
        24,
        b"anon_inode:inotify",
        fdinfo(
            "04000",
            "inotify wd:2 ino:20e011 sdev:fe00000 mask:2 ignored_mask:0 fhandle-bytes:8 "
            "fhandle-type:1 f_handle:11e020000cb35fbd",
            "inotify wd:1 ino:20e007 sdev:fe00000 mask:300 ignored_mask:0",
        ),
    )
    assert d.kind == Inotify(
        (
            InotifyWatch(2, 0x20E011, 0xFE00000, 2, 0, 8, 1, bytes.fromhex("11e020000cb35fbd")),
            InotifyWatch(1, 0x20E007, 0xFE00000, 0x300, 0, 0, 0, b""),
        )
    )
    assert isinstance(d.kind, Inotify) and d.kind.watches[0].dev == os.makedev(254, 0)


def test_memfd_from_link_and_stat() -> None:
    """/memfd:NAME (deleted) with no links is a memfd; the name keeps its spaces."""
    st = FileStat(stat.S_IFREG | 0o777, 1610, 1, 0, 0, 0, 0, 3000)
    d = parse_fdinfo(25, b"/memfd:applier memfd (deleted)", fdinfo("0100002", pos=3000), st)
    assert d.kind == Memfd("applier memfd", 3000, st.mode, 1610, 1, 0, 0)
    # a linked file that happens to be called /memfd:x is not one
    other = parse_fdinfo(3, b"/memfd:x", fdinfo("0100002"), REG_STAT)
    assert isinstance(other.kind, RegularFile)
    # the reader's verdict (by device) wins over the guess
    hint = parse_fdinfo(3, b"/memfd:x (deleted)", fdinfo("0100002"), st, memfd=False)
    assert isinstance(hint.kind, RegularFile) and hint.kind.deleted


def test_pidfd_lines() -> None:
    """Pid and NSpid of a pidfd (NSpid lists one pid per nested namespace)."""
    d = parse_fdinfo(
        26, b"anon_inode:[pidfd]", fdinfo("02000002", "Pid:\t11186", "NSpid:\t11186\t7")
    )
    assert d.kind == PidFd(11186, (11186, 7))


def test_anything_else_is_other_by_name() -> None:
    """Unknown anonymous inodes and namespace files are Other, named by their link."""
    assert parse_fdinfo(3, b"anon_inode:[io_uring]", fdinfo("02")).kind == Other(
        "anon_inode:[io_uring]"
    )
    assert parse_fdinfo(4, b"net:[4026531833]", fdinfo("0100000")).kind == Other("net:[4026531833]")
    assert parse_fdinfo(4, b"anon_inode:[fanotify]", fdinfo("0")).fd_type == "UND"


def test_malformed_fdinfo_is_a_value_error() -> None:
    """Missing common lines or broken kind lines raise ValueError naming the line."""
    with pytest.raises(ValueError, match="'flags'"):
        parse_fdinfo(3, b"pipe:[1]", b"pos:\t0\nmnt_id:\t1\n")
    with pytest.raises(ValueError, match="'flags'"):
        parse_fdinfo(3, b"pipe:[1]", b"pos:\t0\nflags:\t9x\nmnt_id:\t1\n")
    with pytest.raises(ValueError, match="epoll line"):
        parse_fdinfo(3, b"anon_inode:[eventpoll]", fdinfo("02", "tfd: x events: 1 data: 2"))
    with pytest.raises(ValueError, match="it_value"):
        parse_fdinfo(3, b"anon_inode:[timerfd]", fdinfo("02", "clockid: 1", "ticks: 0"))
    with pytest.raises(ValueError, match="inotify line"):
        parse_fdinfo(3, b"anon_inode:inotify", fdinfo("0", "inotify wd:1 ino:zz"))
    with pytest.raises(ValueError, match="eventfd-count"):
        parse_fdinfo(3, b"anon_inode:[eventfd]", fdinfo("02"))


# --------------------------------------------------------------------------- status, timers

STATUS = b"""Name:\tfds (x) y
Umask:\t0027
State:\tS (sleeping)
Tgid:\t4242
SigQ:\t2/96363
SigPnd:\t0000000008000000
ShdPnd:\t0000000000000200
SigBlk:\t0000000008000200
SigIgn:\t0000000000001000
SigCgt:\t0000000100000800
CapInh:\t0000000000000000
"""


def test_status_signal_lines() -> None:
    """The five masks in hex and SigQ split in two."""
    assert parse_status_signals(STATUS) == {
        "SigQ": 2,
        "SigQLimit": 96363,
        "SigPnd": 0x8000000,
        "ShdPnd": 0x200,
        "SigBlk": 0x8000200,
        "SigIgn": 0x1000,
        "SigCgt": 0x100000800,
    }
    with pytest.raises(ValueError, match="SigCgt"):
        parse_status_signals(STATUS.replace(b"SigCgt", b"Other"))
    with pytest.raises(ValueError, match="malformed SigBlk"):
        parse_status_signals(STATUS.replace(b"0000000008000200", b"zz"))


TIMERS = b"""ID: 1
signal: 12/0000000000005678
notify: signal/tid.15291
ClockID: 0
ID: 0
signal: 12/0000000000001234
notify: signal/pid.15288
ClockID: 1
"""


def test_posix_timer_records() -> None:
    """Records of /proc/PID/timers, thread and process notification."""
    assert parse_posix_timers(TIMERS) == [
        PosixTimer(1, 12, 0x5678, "signal", True, 15291, 0),
        PosixTimer(0, 12, 0x1234, "signal", False, 15288, 1),
    ]
    assert parse_posix_timers(b"") == []
    with pytest.raises(ValueError, match="malformed record"):
        parse_posix_timers(b"ID: 1\nsignal: 12/xyz\n")


# --------------------------------------------------------------------------- saved trees


def saved_tree(tmp_path: Path, state: str = "S") -> tuple[Path, Path]:
    """A procfs root with process 4242, and a directory of real files its links lead to."""
    procfs, files = tmp_path / "proc", tmp_path / "files"
    base = procfs / "4242"
    for sub in ("fd", "fdinfo", "task/4242", "task/4243"):
        (base / sub).mkdir(parents=True)
    files.mkdir()
    (base / "stat").write_bytes(f"4242 (odd ) (name) {state} 1 4242 4242 0 -1".encode())
    (base / "status").write_bytes(STATUS)
    (base / "task/4242/status").write_bytes(STATUS)
    (base / "task/4243/status").write_bytes(
        STATUS.replace(b"SigPnd:\t0000000008000000", b"SigPnd:\t0000000000000000")
    )
    (base / "timers").write_bytes(TIMERS)
    (base / "root").symlink_to("/")
    (base / "cwd").symlink_to(files)
    return procfs, files


def add_fd(procfs: Path, fd: int, link: str | Path, text: bytes | None) -> None:
    (procfs / "4242/fd" / str(fd)).symlink_to(link)
    if text is not None:
        (procfs / "4242/fdinfo" / str(fd)).write_bytes(text)


def test_saved_tree_with_closed_descriptors(tmp_path: Path) -> None:
    """Descriptors whose fdinfo or file vanished while reading are left out; the rest parse."""
    procfs, files = saved_tree(tmp_path)
    real = files / "with space.txt"
    real.write_bytes(b"x" * 77)
    odd = files / "odd (deleted)"
    odd.write_bytes(b"")
    add_fd(procfs, 0, "pipe:[123]", fdinfo("04000", ino=123))
    add_fd(procfs, 1, real, fdinfo("0102001", pos=77, ino=real.stat().st_ino))
    add_fd(procfs, 2, "socket:[77]", fdinfo("02", ino=77))
    add_fd(procfs, 3, "anon_inode:[eventfd]", fdinfo("04002", "eventfd-count: ff"))
    add_fd(procfs, 4, "pipe:[124]", None)  # closed: fdinfo gone
    add_fd(procfs, 5, files / "vanished", fdinfo("0100000"))  # closed: the file is gone
    add_fd(procfs, 6, "anon_inode:[io_uring]", fdinfo("02"))
    add_fd(procfs, 10, odd, fdinfo("0100000", ino=odd.stat().st_ino))
    table = read_fds(4242, procfs, duplicates=False, sock_diag=False)
    assert [d.fd for d in table] == [0, 1, 2, 3, 6, 10]
    by_fd = {d.fd: d for d in table}
    assert by_fd[0].kind == Pipe(123) and by_fd[0].stat is None
    assert by_fd[1].kind == RegularFile(
        path=str(real),
        deleted=False,
        mode=real.stat().st_mode,
        size=77,
        dev=real.stat().st_dev,
        ino=real.stat().st_ino,
        nlink=1,
        rdev=0,
    )
    assert by_fd[2].kind == Socket(77)
    assert by_fd[3].kind == EventFd(255)
    assert by_fd[6].kind == Other("anon_inode:[io_uring]")
    # the whole link names the file (checked through /proc/PID/root): not deleted
    assert isinstance(by_fd[10].kind, RegularFile)
    assert (by_fd[10].kind.path, by_fd[10].kind.deleted) == (str(odd), False)


def test_saved_tree_fdinfo_of_another_file_is_skipped(tmp_path: Path) -> None:
    """fdinfo whose ino never matches the file's stat leaves the descriptor out."""
    procfs, files = saved_tree(tmp_path)
    real = files / "a"
    real.write_bytes(b"")
    add_fd(procfs, 3, real, fdinfo("0100000", ino=real.stat().st_ino + 1))
    assert read_fds(4242, procfs, duplicates=False, sock_diag=False) == []


def test_saved_tree_unparsable_fdinfo(tmp_path: Path) -> None:
    """Broken fdinfo is an InjectorError naming pid and descriptor."""
    procfs, _ = saved_tree(tmp_path)
    add_fd(procfs, 7, "pipe:[1]", b"pos:\t0\n")
    with pytest.raises(InjectorError, match=r"pid 4242: unparsable /proc/PID/fdinfo/7"):
        read_fds(4242, procfs, duplicates=False, sock_diag=False)


def test_saved_tree_zombie_and_missing(tmp_path: Path) -> None:
    """A zombie's table is refused; a pid without a directory does not exist."""
    procfs, _ = saved_tree(tmp_path, state="Z")
    with pytest.raises(ZombieProcess):
        read_fds(4242, procfs, duplicates=False, sock_diag=False)
    with pytest.raises(NoSuchProcess):
        read_fds(4243, procfs)
    with pytest.raises(NoSuchProcess):
        read_signals(4243, procfs)


def test_saved_tree_fs_signals_and_timers(tmp_path: Path) -> None:
    """cwd, root, umask; per-thread masks leader first; the timers."""
    procfs, files = saved_tree(tmp_path)
    fs = read_fs(4242, procfs)
    assert (fs.cwd.path, fs.cwd.deleted, fs.root.path, fs.umask) == (str(files), False, "/", 0o27)
    assert fs.cwd.stat is not None and fs.cwd.stat.ino == files.stat().st_ino
    state = read_signals(4242, procfs)
    assert [(t.tid, t.pending, t.blocked) for t in state.threads] == [
        (4242, 0x8000000, 0x8000200),
        (4243, 0, 0x8000200),
    ]
    assert (state.shared_pending, state.queued, state.queue_limit) == (0x200, 2, 96363)
    assert state.leader.ignored == sigmask(13) and state.thread(4243).caught == 0x100000800
    assert [t.it_id for t in read_posix_timers(4242, procfs)] == [1, 0]


def test_injector_imports_neither_applier_nor_formats() -> None:
    """No injector module imports applier or formats: dependencies point one way."""
    package = Path(__file__).resolve().parents[1] / "injector"
    for module in package.glob("*.py"):
        for node in ast.walk(ast.parse(module.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in ("applier", "formats"), (module.name, name)

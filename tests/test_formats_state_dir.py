"""ImageDir's descriptor side (ids, fdinfo, fs, files, pipes-data, memfd; formats.fdstate): lookups,
the checks that reject corrupted directories, and ImageWriter directories of such state read back
by ImageDir and by Debian's crit 3.17 (decode, encode, ``x fds``, ``x ps``)."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from formats.core import CoreEntry, SaEntry, ThreadCoreEntry
from formats.errors import ImageError
from formats.fdkinds import (
    EPOLLET,
    EPOLLIN,
    EventfdFileEntry,
    EventpollFileEntry,
    EventpollTfdEntry,
    FhEntry,
    FifoEntry,
    FownEntry,
    InotifyFileEntry,
    InotifyWdEntry,
    MemfdFileEntry,
    MemfdInodeEntry,
    PipeDataEntry,
    PipeEntry,
    SignalfdEntry,
    TimerfdEntry,
)
from formats.files import O_APPEND, O_NONBLOCK, O_RDWR, O_WRONLY, FdType, FileEntry, FsEntry
from formats.imagedir import ImageDir
from formats.imagefile import dump_image, load_image
from formats.imagewriter import ImageWriter, fd_entry, regular_file, x86_core
from formats.inventory import PstreeEntry, TaskKobjIdsEntry
from formats.signals import (
    SA_RESTART,
    SA_RESTORER,
    SA_SIGINFO,
    SIGACTION_SIGNALS,
    ItimerEntry,
    PosixTimerEntry,
    SiginfoEntry,
    SignalQueueEntry,
    TaskTimersEntry,
    signals_to_sigset,
)
from formats.sockets import InetSkEntry, IpOptsEntry, SkOptsEntry, UnixSkEntry, ip_to_words
from tests.conftest import GOLDEN_STATE
from tests.test_formats_crit import _RENAMED_317, CRIT, compare, needs_crit

FOWN = FownEntry()
PID = 4524

# --------------------------------------------------------------------------------------------
# the golden dump through ImageDir


def test_golden_lookups(golden_state_dir: Path) -> None:
    """ids, fdinfo, fs, files and pipe data of the state dump, through ImageDir."""
    img = ImageDir.open(golden_state_dir)
    ids = img.ids(PID)
    assert (ids.files_id, ids.fs_id, ids.vm_id, ids.sighand_id) == (2, 2, 2, 2)
    fds = img.fdinfo(PID)
    assert [f.fd for f in fds] == [0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 12, 13, 14, 15]
    assert all(img.files[f.id].type == f.type for f in fds)
    assert [img.files[f.id].type_name for f in fds[6:]] == [
        "PIPE", "PIPE", "UNIXSK", "UNIXSK", "INETSK", "EVENTFD", "EVENTPOLL", "SIGNALFD", "TIMERFD",
    ]  # fmt: skip
    assert img.fs(PID) == FsEntry(cwd_id=18, root_id=19, umask=0o022)
    assert len(img.files) == 19
    assert img.pipe_data(110413) == b"pipe-data"
    core = img.core(PID)
    assert core.tc is not None and core.tc.timers is not None
    assert core.tc.timers.real.isec == 3
    assert len(core.tc.sigactions) == len(SIGACTION_SIGNALS)


def test_missing_state_lookups(tmp_path: Path) -> None:
    """Lookups of images a directory does not have raise ImageError naming the image."""
    with ImageWriter(tmp_path) as w:
        w.add_file(FileEntry.of(PipeEntry(id=1, pipe_id=5, flags=0, fown=FOWN)))
        w.add_process(PstreeEntry(pid=1, ppid=0, pgid=1, sid=1, threads=[1]),
                      cores={1: x86_core(0, 0, comm="a")})  # fmt: skip
    img = ImageDir.open(tmp_path)
    lookups: list[tuple[Callable[[], object], str]] = [
        (lambda: img.ids(1), "ids-1.img: no ids image"),
        (lambda: img.fs(1), "fs-1.img: no fs image"),
        (lambda: img.memfd_inode(3), "memfd.img: no memfd inode 3"),
        (lambda: img.pipe_data(6), "files.img: no pipe with pipe_id 6"),
    ]
    for call, message in lookups:
        with pytest.raises(ImageError, match=message):
            call()
    assert img.pipe_data(5) == b""  # a pipe without queued bytes
    assert img.pipe_data_entry(5) is None
    dump_image(tmp_path / "ids-1.img", "IDS", [TaskKobjIdsEntry(files_id=7)])
    with pytest.raises(ImageError, match=r"fdinfo-7\.img: no fdinfo image"):
        ImageDir.open(tmp_path).fdinfo(1)


def test_legacy_ids_in_core(tmp_path: Path) -> None:
    """Without ids-<pid>.img the ids come from core_entry.ids, and name the fdinfo image."""
    core = x86_core(0, 0, comm="old")
    core.ids = TaskKobjIdsEntry(vm_id=1, files_id=9, fs_id=1, sighand_id=1)
    reg = regular_file(1, "/dev/null")
    with ImageWriter(tmp_path) as w:
        w.add_file(reg)
        w.add_process(PstreeEntry(pid=1, ppid=0, pgid=1, sid=1, threads=[1]), cores={1: core})
        w.write_fdinfo(9, [fd_entry(0, reg)])
    img = ImageDir.open(tmp_path)
    assert img.ids(1).files_id == 9
    assert [(f.fd, f.id) for f in img.fdinfo(1)] == [(0, 1)]


# --------------------------------------------------------------------------------------------
# corrupted copies of the golden dump


def _entry_offset(path: Path, index: int) -> int:
    """Offset of entry ``index``'s length field, found by walking the length fields."""
    data = path.read_bytes()
    pos = 8  # common + type magic
    for _ in range(index):
        pos += 4 + struct.unpack_from("<I", data, pos)[0]
    return pos


def _rewrite(path: Path, change: Callable[[list[Any]], None]) -> None:
    magic, entries = load_image(path)
    change(entries)
    dump_image(path, magic, entries)


def _set(index: int, **fields: Any) -> Callable[[list[Any]], None]:
    def change(entries: list[Any]) -> None:
        for name, value in fields.items():
            target = entries[index]
            *parents, last = name.split(".")
            for part in parents:
                target = getattr(target, part)
            setattr(target, last, value)

    return change


def _cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-2])


def _twice(entries: list[Any]) -> None:
    entries.append(entries[0])


def _add_memfd(entries: list[Any]) -> None:
    entries.append(FileEntry.of(MemfdFileEntry(id=40, flags=2, pos=0, fown=FOWN, inode_id=77)))


# (what, image, change, entry, offset (None: walk the length fields), message)
Corruption = tuple[str, str, Callable[[Path], None], int, int | None, str]
CORRUPTIONS: list[Corruption] = [
    ("pipes-data extra cut short", "pipes-data.img", _cut, 0, 22,
     "extra payload of 9 bytes .* runs past the end of the file \\(7 bytes left\\)"),
    ("fdinfo names a missing file id", "fdinfo-2.img",
     lambda p: _rewrite(p, _set(6, id=99)), 6, None,
     "fd 7 names file id 99, which files.img lacks"),
    ("fdinfo type is not the file's", "fdinfo-2.img",
     lambda p: _rewrite(p, _set(3, type=FdType.PIPE)), 3, None,
     "fd 3 is of type PIPE but file id 6 is REG"),
    ("an fd number twice", "fdinfo-2.img",
     lambda p: _rewrite(p, _set(2, fd=1)), 2, None, "fd 1 given twice"),
    ("a file id twice", "files.img",
     lambda p: _rewrite(p, _set(1, id=1, **{"reg.id": 1})), 1, None, "file id 1: given twice"),
    ("kind message with another id", "files.img",
     lambda p: _rewrite(p, _set(8, **{"pipe.id": 10})), 8, None,
     "file id 9: its PIPE message says id 10 \\(ID mismatch\\)"),
    ("kind message missing", "files.img",
     lambda p: _rewrite(p, _set(13, efd=None)), 13, None,
     "file id 14: type EVENTFD but no EVENTFD message"),
    ("memfd inode not in memfd.img", "files.img",
     lambda p: _rewrite(p, _add_memfd), 19, None, "memfd inode_id 77 is not in memfd.img"),
    ("fs cwd not in files.img", "fs-4524.img",
     lambda p: _rewrite(p, _set(0, cwd_id=99)), 0, 8, "cwd_id 99 is not in files.img"),
    ("pipes-data for an unknown pipe", "pipes-data.img",
     lambda p: _rewrite(p, _set(0, pipe_id=1)), 0, 8,
     "data for pipe_id 1, which no PIPE file in files.img has"),
    ("pipes-data twice for one pipe", "pipes-data.img",
     lambda p: _rewrite(p, _twice), 1, 8 + 4 + 10 + 9, "pipe_id 110413 given twice"),
]  # fmt: skip


@pytest.mark.parametrize("case", CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_corrupted_state_rejected(tmp_path: Path, case: Corruption) -> None:
    """A corrupted descriptor image fails ImageDir.open with its path, entry and offset."""
    _, image, corrupt, entry, offset, message = case
    root = tmp_path / "dump"
    shutil.copytree(GOLDEN_STATE, root)
    ImageDir.open(root)  # the copy itself is fine
    corrupt(root / image)
    with pytest.raises(ImageError, match=message) as info:
        ImageDir.open(root)
    err = info.value
    assert err.path == str(root / image)
    assert err.entry == entry
    assert err.offset == (offset if offset is not None else _entry_offset(root / image, entry))


# --------------------------------------------------------------------------------------------
# writing such a directory


def _siginfo(signo: int, code: int) -> SiginfoEntry:
    """A 128-byte siginfo_t with si_signo, si_errno 0, si_code."""
    raw = struct.pack("<iii", signo, 0, code) + bytes(116)
    return SiginfoEntry(siginfo=raw)


def _files() -> list[FileEntry]:
    sk = SkOptsEntry(so_sndbuf=212992, so_rcvbuf=212992, reuseaddr=False)
    kinds = [
        regular_file(1, "/dev/null").reg,
        regular_file(2, "/tmp/out.log", flags=O_WRONLY | O_APPEND, size=6).reg,
        PipeEntry(id=3, pipe_id=500, flags=O_NONBLOCK, fown=FOWN),
        PipeEntry(id=4, pipe_id=500, flags=O_NONBLOCK | O_WRONLY, fown=FOWN),
        UnixSkEntry(id=5, ino=700, type=1, state=1, flags=O_RDWR, uflags=0, backlog=0, peer=701,
                    fown=FOWN, opts=sk, name=b"/tmp/sock", ns_id=2),
        UnixSkEntry(id=6, ino=701, type=1, state=1, flags=O_RDWR, uflags=0, backlog=0, peer=700,
                    fown=FOWN, opts=sk, name=b""),
        InetSkEntry(id=7, ino=702, family=2, type=1, proto=6, state=10, src_port=8080,
                    dst_port=0, flags=O_RDWR, backlog=16, src_addr=ip_to_words("127.0.0.1"),
                    dst_addr=ip_to_words("0.0.0.0"), fown=FOWN, opts=sk,
                    ip_opts=IpOptsEntry(freebind=True)),  # crit 3.17 lacks ttl and tcp_opts
        EventfdFileEntry(id=8, flags=O_RDWR, fown=FOWN, counter=3),
        EventpollFileEntry(id=9, flags=O_RDWR, fown=FOWN, tfd=[
            EventpollTfdEntry(id=0, tfd=7, events=EPOLLIN, data=0x1),
            EventpollTfdEntry(id=0, tfd=8, events=EPOLLIN | EPOLLET, data=0x2),
        ]),
        SignalfdEntry(id=10, flags=O_RDWR | O_NONBLOCK, fown=FOWN,
                      sigmask=signals_to_sigset([10, 17])),
        TimerfdEntry(id=11, flags=O_RDWR, fown=FOWN, clockid=1, ticks=2, settime_flags=0,
                     vsec=40, vnsec=5, isec=1, insec=500),
        MemfdFileEntry(id=12, flags=O_RDWR, pos=10, fown=FOWN, inode_id=20),
        InotifyFileEntry(id=13, flags=0, fown=FOWN, wd=[
            InotifyWdEntry(id=13, i_ino=4242, mask=0x2, ignored_mask=0, s_dev=(8 << 20) | 1,
                           wd=1, f_handle=FhEntry(bytes=8, type=1, handle=[7, 0])),
        ]),
        regular_file(14, "/tmp/work").reg,
        regular_file(15, "/").reg,
        regular_file(16, "/tmp/fifo").reg,
        FifoEntry(id=17, pipe_id=900, regf_id=16),
    ]  # fmt: skip
    out = []
    for kind in kinds:
        assert kind is not None
        out.append(FileEntry.of(kind))
    return out


# fd -> file id; 14..19 are a gap, fd 20 is close-on-exec
FDS = {0: 1, 1: 2, 2: 2, 3: 3, 4: 4, 5: 5, 6: 6, 7: 7, 8: 8, 9: 9, 10: 10, 11: 11, 12: 12, 13: 13,
       20: 17}  # fmt: skip
MEMFD = MemfdInodeEntry(name="memfd:buf", uid=0, gid=0, size=8192, shmid=20, seals=0, inode_id=20)
QUEUED = b"queued\x00bytes"


def _leader_core() -> CoreEntry:
    core = x86_core(0x401000, 0x7FFC0000, comm="app")
    assert core.tc is not None and core.thread_core is not None
    core.tc.sigactions = [SaEntry() for _ in SIGACTION_SIGNALS]
    core.tc.sigactions[SIGACTION_SIGNALS.index(10)] = SaEntry(
        sigaction=0x401234, flags=SA_RESTART | SA_RESTORER, restorer=0x401500
    )
    core.tc.sigactions[SIGACTION_SIGNALS.index(12)] = SaEntry(
        sigaction=0x401238, flags=SA_SIGINFO | SA_RESTORER, restorer=0x401500, mask=0x2
    )
    core.tc.blk_sigset = signals_to_sigset([14, 28])
    core.tc.timers = TaskTimersEntry(
        real=ItimerEntry(isec=2, iusec=0, vsec=9, vusec=999), virt=ItimerEntry(),
        prof=ItimerEntry(),
        posix=[PosixTimerEntry(it_id=0, clock_id=1, si_signo=14, it_sigev_notify=0,
                               sival_ptr=0, overrun=0, isec=0, insec=0, vsec=5, vnsec=0)],
    )  # fmt: skip
    core.tc.signals_s = SignalQueueEntry(signals=[_siginfo(12, -1)])  # SI_QUEUE
    core.thread_core.signals_p = SignalQueueEntry()
    return core


def _worker_core() -> CoreEntry:
    core = x86_core(0x401010, 0x7FFB0000)
    core.thread_core = ThreadCoreEntry(
        blk_sigset=signals_to_sigset([1, 14, 15, 28]),
        signals_p=SignalQueueEntry(signals=[_siginfo(10, -6)]),  # SI_TKILL
    )
    return core


def _write_state(path: Path) -> None:
    """Process 1 (threads 1 and 3) with every kind of descriptor; process 2, its child, shares
    the descriptor table (CLONE_FILES) but has its own fs."""
    files = _files()
    by_id = {f.id: f for f in files}
    ids = TaskKobjIdsEntry(vm_id=1, files_id=1, fs_id=1, sighand_id=1)
    with ImageWriter(path) as w:
        for entry in files:
            w.add_file(entry)
        w.add_pipe_data(500, QUEUED, size=65536)
        w.add_memfd_inode(MEMFD)
        w.add_process(
            PstreeEntry(pid=1, ppid=0, pgid=1, sid=1, threads=[1, 3]),
            cores={1: _leader_core(), 3: _worker_core()},
            ids=ids,
            fs=FsEntry(cwd_id=14, root_id=15, umask=0o022),
            fds=[fd_entry(fd, by_id[fid], cloexec=fd == 20) for fd, fid in FDS.items()],
        )
        w.add_process(
            PstreeEntry(pid=2, ppid=1, pgid=1, sid=1, threads=[2]),
            cores={2: x86_core(0x401020, 0x7FFA0000, comm="child")},
            ids=TaskKobjIdsEntry(vm_id=2, files_id=1, fs_id=2, sighand_id=2),
            fs=FsEntry(cwd_id=15, root_id=15),
        )


def test_written_state_reads_back(tmp_path: Path) -> None:
    """ImageDir reads back every value ImageWriter wrote: ids, tables, fs, files, pipe data,
    memfd inode, and the signal state in the cores."""
    _write_state(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {
        "inventory.img", "pstree.img", "files.img", "pipes-data.img", "memfd.img",
        "core-1.img", "core-2.img", "core-3.img", "ids-1.img", "ids-2.img", "fs-1.img",
        "fs-2.img", "fdinfo-1.img",
    }  # fmt: skip
    img = ImageDir.open(tmp_path)
    assert img.files == {f.id: f for f in _files()}
    table = [(f.fd, f.id, f.flags, f.type) for f in img.fdinfo(1)]
    assert table == [(fd, fid, int(fd == 20), img.files[fid].type) for fd, fid in FDS.items()]
    assert img.fdinfo(2) == img.fdinfo(1)  # the shared table
    assert (img.ids(2).files_id, img.ids(2).fs_id) == (1, 2)
    assert img.fs(1) == FsEntry(cwd_id=14, root_id=15, umask=0o022)
    assert img.fs(2) == FsEntry(cwd_id=15, root_id=15)
    assert img.pipe_data(500) == QUEUED
    assert img.pipe_data_entry(500) == PipeDataEntry(pipe_id=500, bytes=len(QUEUED),
                                                     size=65536, extra=QUEUED)  # fmt: skip
    assert img.memfd_inode(20) == MEMFD
    assert img.core(1) == _leader_core()
    assert img.core(3) == _worker_core()
    tc = img.core(1).tc
    assert tc is not None and tc.signals_s is not None
    assert [(s.si_signo, s.si_code) for s in tc.signals_s.signals] == [(12, -1)]
    assert tc.sigaction_for(10).flags & SA_RESTART


def test_writer_refuses_inconsistent_requests(tmp_path: Path) -> None:
    """Descriptors without ids, and a second table for one files_id, are refused."""
    w = ImageWriter(tmp_path)
    proc = PstreeEntry(pid=1, ppid=0, pgid=1, sid=1, threads=[1])
    with pytest.raises(ValueError, match="descriptors need ids"):
        w.add_process(proc, fds=[])
    w.write_fdinfo(1, [])
    with pytest.raises(ValueError, match=r"fdinfo-1\.img is already written"):
        w.write_fdinfo(1, [])


def _crit(*args: str, stdin: bytes | None = None) -> bytes:
    done = subprocess.run([CRIT, *args], input=stdin, capture_output=True, check=True, timeout=60)
    return done.stdout


@needs_crit
def test_written_state_decodes_with_crit_317(tmp_path: Path) -> None:
    """crit 3.17 decodes every written image with our values, and re-encodes its decoding to
    our bytes (pipes-data's extra bytes included)."""
    _write_state(tmp_path)
    for img in sorted(tmp_path.iterdir()):
        doc = json.loads(_crit("decode", "--pretty", "-i", str(img)))
        magic, entries = load_image(img)
        assert doc["magic"] == magic, img.name
        assert len(doc["entries"]) == len(entries)
        for ours, theirs in zip(entries, doc["entries"], strict=True):
            compare(ours, theirs, _RENAMED_317, strict=True)
        assert _crit("encode", stdin=json.dumps(doc).encode()) == img.read_bytes(), img.name


TABLE = """\
\t      0: /dev/null
\t      1: /tmp/out.log
\t      2: /tmp/out.log
\t      3: pipe[500]
\t      4: pipe[500]
\t      5: unix[700 (701) /tmp/sock]
\t      6: unix[701 (700)]
\t      7: INETSK.7
\t      8: EVENTFD.8
\t      9: EVENTPOLL.9
\t     10: SIGNALFD.10
\t     11: TIMERFD.11
\t     12: MEMFD.12
\t     13: INOTIFY.13
\t     20: FIFO.17
"""


@needs_crit
def test_crit_x_fds_and_ps(tmp_path: Path) -> None:
    """crit 3.17's ``x fds`` lists the descriptors, cwd and root of both processes, and
    ``x ps`` the process tree."""
    _write_state(tmp_path)
    fds = _crit("x", str(tmp_path), "fds").decode()
    assert fds == (
        "1\n" + TABLE + "\t    cwd: /tmp/work\n\t   root: /\n"
        "2\n" + TABLE + "\t    cwd: /\n\t   root: /\n"
    )
    ps = _crit("x", str(tmp_path), "ps").decode()
    assert ps.splitlines() == [
        "    PID   PGID    SID   COMM",
        "      1      1      1   app",
        "      2      1      1       child",
    ]

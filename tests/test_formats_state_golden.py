"""The CRIU 4.2 dump of descriptors, signals and timers (tests/data/state-criu-4.2): every image
rebuilds byte for byte with nothing left unknown, agrees with CRIU 4.2's crit JSON field for field,
and holds what state-criu-4.2.info.txt says the target set up."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs
import pytest

from formats import opaque
from formats.fdkinds import EPOLLERR, EPOLLET, EPOLLHUP, EPOLLIN, PipeDataEntry
from formats.files import FD_CLOEXEC, O_FLAGS, O_NONBLOCK, FdType, FileEntry, FsEntry
from formats.imagedir import ImageDir
from formats.imagefile import IMG_COMMON_MAGIC, build_image, parse_image
from formats.pb import Message, RawField
from formats.signals import SIG_IGN, SIGNALS, signal_number, sigset_to_signals
from formats.sockets import InetSkEntry, SkOptsEntry, UnixSkEntry
from tests.conftest import GOLDEN_STATE
from tests.test_formats_crit import _special, compare

_OPAQUE = (opaque.StatsEntry, opaque.SeccompEntry, opaque.TimensEntry)  # kept opaque on purpose
O_ACCMODE = 0o3


def _images(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if not p.name.startswith("pages-"))


def _unknown(msg: Message, where: str) -> Iterator[str]:
    """Paths of every message below ``msg`` (itself included) that kept unknown fields."""
    if msg.unknown_fields:
        yield f"{where}: fields {[f.number for f in msg.unknown_fields]}"
    for field in attrs.fields(type(msg)):
        value = getattr(msg, field.name)
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            if isinstance(item, Message):
                yield from _unknown(item, f"{where}.{field.name}[{i}]")


def test_state_images_rebuild_byte_for_byte(golden_state_dir: Path) -> None:
    """Every image of the state dump (pipes-data with its extra bytes too) rebuilds exactly."""
    names = [p.name for p in _images(golden_state_dir)]
    assert len(names) == 14
    assert {"files.img", "fdinfo-2.img", "fs-4524.img", "ids-4524.img", "pipes-data.img"} <= set(
        names
    )
    for name in names:
        data = (golden_state_dir / name).read_bytes()
        magic, entries = parse_image(data, name)
        head = data[:4] == IMG_COMMON_MAGIC.to_bytes(4, "little") or magic == "STATS"
        assert build_image(magic, entries, head=head) == data, name


def test_state_images_leave_nothing_unknown(golden_state_dir: Path) -> None:
    """No modelled message of the state dump keeps an unknown field: the model is complete for
    what CRIU 4.2 writes there (stats, seccomp and timens are opaque by design)."""
    left: list[str] = []
    checked = 0
    for path in _images(golden_state_dir):
        _, entries = parse_image(path.read_bytes(), path.name)
        for index, entry in enumerate(entries):
            if not isinstance(entry, _OPAQUE):
                left.extend(_unknown(entry, f"{path.name}[{index}]"))
                checked += 1
    assert checked == 55  # 15 fdinfo + 19 files + 13 pagemap entries + 8 single-entry images
    assert left == []


def test_unknown_detector_finds_unknown_fields() -> None:
    """The walker above reports an unknown field deep inside a message."""
    _, [entry] = parse_image((GOLDEN_STATE / "fs-4524.img").read_bytes(), "fs-4524.img")
    assert list(_unknown(entry, "fs")) == []
    _, files = parse_image((GOLDEN_STATE / "files.img").read_bytes(), "files.img")
    epoll = next(f for f in files if f.type == FdType.EVENTPOLL)
    assert epoll.epfd is not None
    epoll.epfd.tfd[1].unknown_fields.append(RawField(9, b"\x48\x01"))
    assert list(_unknown(epoll, "f")) == ["f.epfd[0].tfd[1]: fields [9]"]


def test_state_agrees_with_crit_42_json(golden_state_dir: Path) -> None:
    """Every decoded image agrees with CRIU 4.2's crit --pretty output, and every field crit
    shows is modelled (strict), opaque images aside."""
    json_dir = golden_state_dir.parent / "state-criu-4.2-crit-json"
    checked = 0
    jsons = sorted(json_dir.glob("*.json"))
    assert len(jsons) == 13  # every image but pages-1.img and stats-dump
    for jpath in jsons:
        doc = json.loads(jpath.read_text())
        name = jpath.name.removesuffix(".json")
        magic, entries = parse_image((golden_state_dir / name).read_bytes(), name)
        assert magic == doc["magic"]
        assert len(entries) == len(doc["entries"])
        for ours, theirs in zip(entries, doc["entries"], strict=True):
            checked += compare(ours, theirs, {}, strict=not isinstance(ours, _OPAQUE))
    assert checked > 1500


# --------------------------------------------------------------------------------------------
# state-criu-4.2.info.txt: one check per kind of line; the expected values come from the line.

Check = Callable[[ImageDir, re.Match[str]], None]
_CHECKS: list[tuple[re.Pattern[str], Check]] = []


def _check(pattern: str) -> Callable[[Check], Check]:
    def register(func: Check) -> Check:
        _CHECKS.append((re.compile(pattern), func))
        return func

    return register


def _fds(img: ImageDir) -> dict[int, FileEntry]:
    """fd number -> file entry of the root task."""
    return {fdi.fd: img.files[fdi.id] for fdi in img.fdinfo(img.root_pid)}


def _o_flags(names: str) -> int:
    by_name = {v: k for k, v in O_FLAGS.items()}
    return sum(by_name[n] for n in names.split("|") if n not in ("O_RDONLY", "O_CLOEXEC"))


def _signals(names: str) -> set[int]:
    return {signal_number(n) for n in names.split(",")}


@_check(r"fd (\d+) closed \(a gap\)")
def _gap(img: ImageDir, m: re.Match[str]) -> None:
    fd = int(m[1])
    fds = _fds(img)
    assert fd not in fds
    assert {fd - 1, fd + 1} <= fds.keys()


@_check(r"pid (\d+) cwd (\S+)")
def _cwd(img: ImageDir, m: re.Match[str]) -> None:
    pid = int(m[1])
    assert img.root_pid == pid
    fs = img.fs(pid)
    cwd, root = img.files[fs.cwd_id].reg, img.files[fs.root_id].reg
    assert cwd is not None and root is not None
    assert (cwd.name, root.name) == (m[2], "/")


@_check(r"fd (\d+) (\S+) (O_[A-Z_|]+) pos (\d+)(?: size (\d+))?")
def _regular(img: ImageDir, m: re.Match[str]) -> None:
    fd = int(m[1])
    reg = _fds(img)[fd].reg
    assert reg is not None
    assert reg.name == m[2] or reg.name.endswith("/work/" + m[2])
    want = _o_flags(m[3])
    assert reg.flags & O_ACCMODE == want & O_ACCMODE
    assert reg.flags & want == want
    assert reg.pos == int(m[4])
    if m[5] is not None:
        assert reg.size == int(m[5])
    fdi = next(f for f in img.fdinfo(img.root_pid) if f.fd == fd)
    assert bool(fdi.flags & FD_CLOEXEC) == ("O_CLOEXEC" in m[3])


@_check(r"fd (\d+),(\d+) pipe \(nonblock\), (\d+) bytes queued")
def _pipe(img: ImageDir, m: re.Match[str]) -> None:
    fds = _fds(img)
    read, write = fds[int(m[1])].pipe, fds[int(m[2])].pipe
    assert read is not None and write is not None
    assert read.pipe_id == write.pipe_id
    assert (read.flags & O_ACCMODE, write.flags & O_ACCMODE) == (0, 1)
    assert read.flags & write.flags & O_NONBLOCK
    queued = img.pipe_data(read.pipe_id)
    assert len(queued) == int(m[3])
    assert queued == b"pipe-data"  # what state-target.c wrote into it
    entry = img.pipe_data_entry(read.pipe_id)
    assert entry is not None and entry.size == 65536  # the default pipe buffer


@_check(r"fd (\d+),(\d+) unix stream socketpair")
def _socketpair(img: ImageDir, m: re.Match[str]) -> None:
    fds = _fds(img)
    a, b = fds[int(m[1])].usk, fds[int(m[2])].usk
    assert a is not None and b is not None
    assert (a.type, a.state, b.type, b.state) == (1, 1, 1, 1)  # STREAM, ESTABLISHED
    assert (a.peer, b.peer) == (b.ino, a.ino)


@_check(r"fd (\d+) tcp listen ([\d.]+):(\d+)")
def _listen(img: ImageDir, m: re.Match[str]) -> None:
    isk = _fds(img)[int(m[1])].isk
    assert isk is not None
    assert (isk.family, isk.type, isk.proto, isk.state) == (2, 1, 6, 10)  # INET STREAM TCP LISTEN
    assert (str(isk.src_ip()), isk.src_port) == (m[2], int(m[3]))
    assert isk.backlog == 8


@_check(r"fd (\d+) eventfd count (\d+) nonblock")
def _eventfd(img: ImageDir, m: re.Match[str]) -> None:
    efd = _fds(img)[int(m[1])].efd
    assert efd is not None
    assert efd.counter == int(m[2])
    assert efd.flags & O_NONBLOCK


@_check(r"fd (\d+) epoll: fd (\d+) (\S+) data (0x\w+), fd (\d+) (\S+) data (0x\w+)")
def _epoll(img: ImageDir, m: re.Match[str]) -> None:
    epfd = _fds(img)[int(m[1])].epfd
    assert epfd is not None
    by_fd = {t.tfd: t for t in epfd.tfd}
    bits = {"EPOLLIN": EPOLLIN, "EPOLLET": EPOLLET}
    for fd, events, data in ((m[2], m[3], m[4]), (m[5], m[6], m[7])):
        target = by_fd.pop(int(fd))
        assert target.events & ~(EPOLLERR | EPOLLHUP) == sum(bits[e] for e in events.split("|"))
        assert target.data == int(data, 16)
    assert by_fd == {}


@_check(r"fd (\d+) signalfd (\w+) nonblock")
def _signalfd(img: ImageDir, m: re.Match[str]) -> None:
    sgfd = _fds(img)[int(m[1])].sgfd
    assert sgfd is not None
    assert sgfd.signals() == {signal_number(m[2])}
    assert sgfd.flags & O_NONBLOCK


@_check(r"fd (\d+) timerfd monotonic value (\d+)s interval (\d+)s")
def _timerfd(img: ImageDir, m: re.Match[str]) -> None:
    tfd = _fds(img)[int(m[1])].tfd
    assert tfd is not None
    assert tfd.clockid == 1  # CLOCK_MONOTONIC
    left = tfd.vsec + tfd.vnsec / 1e9  # time left when CRIU froze the task
    assert int(m[2]) - 10 < left <= int(m[2])
    assert (tfd.isec, tfd.insec) == (int(m[3]), 0)


@_check(
    r"(SIGUSR1) handler (0x\w+) SA_RESTART; (SIGUSR2) sigaction (0x\w+) SA_SIGINFO "
    r"mask \{(\w+)\}; (SIGPIPE) ignored"
)
def _sigactions(img: ImageDir, m: re.Match[str]) -> None:
    tc = img.core(img.root_pid).tc
    assert tc is not None
    usr1, usr2 = tc.sigaction_for(signal_number(m[1])), tc.sigaction_for(signal_number(m[3]))
    assert usr1.sigaction == int(m[2], 16)
    assert usr1.flags & 0x10000000 and not usr1.flags & 0x4  # SA_RESTART, not SA_SIGINFO
    assert usr2.sigaction == int(m[4], 16)
    assert usr2.flags & 0x4  # SA_SIGINFO
    assert sigset_to_signals(usr2.mask) == {signal_number(m[5])}
    assert tc.sigaction_for(signal_number(m[6])).sigaction == SIG_IGN
    handled = {s for s, name in SIGNALS.items() if s not in (9, 19)
               and tc.sigaction_for(s).sigaction not in (0, SIG_IGN)}  # fmt: skip
    assert handled == {10, 12}  # only those two standard signals have a handler


@_check(r"main blocked \{([\w,]+)\}; worker blocked \{([\w,]+)\}")
def _blocked(img: ImageDir, m: re.Match[str]) -> None:
    leader = img.core(img.root_pid)
    assert leader.tc is not None and leader.thread_core is not None
    assert sigset_to_signals(leader.tc.blk_sigset) == _signals(m[1])
    assert leader.thread_core.blk_sigset is None  # the leader's mask is tc.blk_sigset
    [worker_tid] = [t for t in img.pstree[0].threads if t != img.root_pid]
    worker = img.core(worker_tid).thread_core
    assert worker is not None and worker.blk_sigset is not None
    assert sigset_to_signals(worker.blk_sigset) == _signals(m[2])
    for core in (leader, img.core(worker_tid)):  # nothing pending anywhere
        assert core.thread_core is not None and core.thread_core.signals_p is not None
        assert core.thread_core.signals_p.signals == []
    assert leader.tc.signals_s is not None and leader.tc.signals_s.signals == []


@_check(r"ITIMER_REAL value (\d+)s interval (\d+)s")
def _itimer(img: ImageDir, m: re.Match[str]) -> None:
    tc = img.core(img.root_pid).tc
    assert tc is not None and tc.timers is not None
    real = tc.timers.real
    left = real.vsec + real.vusec / 1e6
    assert int(m[1]) - 10 < left <= int(m[1])
    assert (real.isec, real.iusec) == (int(m[2]), 0)
    assert tc.timers.virt == tc.timers.prof  # both unset (zero)
    assert (tc.timers.virt.vsec, tc.timers.virt.isec, tc.timers.posix) == (0, 0, [])


_INFO_LINES = (GOLDEN_STATE.parent / "state-criu-4.2.info.txt").read_text().splitlines()


def _run_line(img: ImageDir, line: str) -> None:
    matched = [(pat, func) for pat, func in _CHECKS if pat.fullmatch(line)]
    assert len(matched) == 1, f"no single check for {line!r}"
    pat, func = matched[0]
    found = pat.fullmatch(line)
    assert found is not None
    func(img, found)


@pytest.mark.parametrize("line", _INFO_LINES)
def test_info_line_holds(golden_state_dir: Path, line: str) -> None:
    """Each line of state-criu-4.2.info.txt holds for the decoded images."""
    _run_line(ImageDir.open(golden_state_dir), line)


@pytest.mark.parametrize(
    ("line", "wrong"),
    [
        ("fd 3 data.txt O_RDWR pos 1234 size 5000", "fd 3 data.txt O_RDWR pos 1235 size 5000"),
        ("fd 5 /etc/hostname O_RDONLY|O_CLOEXEC pos 3", "fd 5 /etc/hostname O_RDONLY pos 3"),
        ("fd 7,8 pipe (nonblock), 9 bytes queued", "fd 7,8 pipe (nonblock), 8 bytes queued"),
        ("fd 13 epoll: fd 11 EPOLLIN data 0x1111, fd 12 EPOLLIN|EPOLLET data 0x2222",
         "fd 13 epoll: fd 11 EPOLLIN|EPOLLET data 0x1111, fd 12 EPOLLIN|EPOLLET data 0x2222"),
        ("fd 14 signalfd SIGWINCH nonblock", "fd 14 signalfd SIGALRM nonblock"),
        ("ITIMER_REAL value 300s interval 3s", "ITIMER_REAL value 300s interval 4s"),
        ("main blocked {SIGWINCH,SIGALRM}; worker blocked {SIGWINCH,SIGALRM,SIGTERM,SIGHUP}",
         "main blocked {SIGWINCH}; worker blocked {SIGWINCH,SIGALRM,SIGTERM,SIGHUP}"),
    ],
)  # fmt: skip
def test_info_checks_can_fail(golden_state_dir: Path, line: str, wrong: str) -> None:
    """The info-line checks reject a line that says something else than the dump."""
    assert line in _INFO_LINES
    img = ImageDir.open(golden_state_dir)
    _run_line(img, line)
    with pytest.raises(AssertionError):
        _run_line(img, wrong)


def test_compare_strict_and_converted_fields() -> None:
    """compare() rejects unmodelled keys when strict, and checks crit's converted fields
    (IP strings, base64 and quoted-printable bytes) against ours."""
    fs = FsEntry(cwd_id=1, root_id=2)
    assert compare(fs, {"cwd_id": 1, "root_id": 2, "bogus": 3}, {}) == 2
    with pytest.raises(AssertionError, match="not modelled"):
        compare(fs, {"cwd_id": 1, "root_id": 2, "bogus": 3}, {}, strict=True)
    isk = InetSkEntry(src_addr=[0x0100007F], opts=SkOptsEntry())
    assert _special(isk, "src_addr", isk.src_addr, ["127.0.0.1"])
    with pytest.raises(AssertionError):
        _special(isk, "src_addr", isk.src_addr, ["127.0.0.2"])
    data = PipeDataEntry(pipe_id=1, bytes=2, extra=b"hi")
    compare(data, {"pipe_id": 1, "bytes": 2, "extra": "aGk=\n"}, {}, strict=True)
    with pytest.raises(AssertionError):
        compare(data, {"pipe_id": 1, "bytes": 2, "extra": "aGo=\n"}, {}, strict=True)
    usk = UnixSkEntry(name=b"\x00abstract", opts=SkOptsEntry())
    assert _special(usk, "name", usk.name, "=00abstract")
    with pytest.raises(AssertionError):
        _special(usk, "name", usk.name, "abstract")
    assert _special(usk, "s_dev", 0x300001, "3:1")
    assert not _special(usk, "ino", 0, 0)  # an ordinary field: compare() handles it

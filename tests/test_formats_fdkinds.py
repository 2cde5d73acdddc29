"""Descriptor, socket, timer and signal messages: hand-annotated bytes (most cut from the CRIU 4.2
state dump), the helpers on them, and the extra payload of pipes-data images."""

from __future__ import annotations

import ipaddress

import pytest

from formats.core import SaEntry, TaskCoreEntry
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
from formats.files import FdType, FileEntry, FsEntry, RegFileEntry
from formats.imagefile import build_image, parse_image, parse_image_located
from formats.pb import Message, build, parse
from formats.signals import (
    SA_RESTART,
    SA_SIGINFO,
    SIGACTION_SIGNALS,
    ItimerEntry,
    PosixTimerEntry,
    SiginfoEntry,
    SignalQueueEntry,
    TaskTimersEntry,
    signal_number,
    signals_to_sigset,
    sigset_to_signals,
)
from formats.sockets import (
    FilePermsEntry,
    InetSkEntry,
    IpOptsEntry,
    SkOptsEntry,
    TcpOptsEntry,
    UnixSkEntry,
    ip_from_words,
    ip_to_words,
)
from tests.test_formats_pb import common

# "FOWN" in the hex below: a fown_entry of 10 bytes, uid, euid, signum, pid_type, pid all 0.
FOWN_HEX = "0a 08 00 10 00 18 00 20 00 28 00"
FOWN = FownEntry()


def _hex(text: str) -> bytes:
    return bytes.fromhex(text.replace("FOWN", FOWN_HEX))


# (name, class, bytes, message): each parses to the message and the message builds the bytes.
# fmt: off
CASES: list[tuple[str, type[Message], bytes, Message]] = [
    (
        "pipe read end (files.img entry 9 of the state dump)",
        FileEntry,
        _hex(
            "08 02"  # 1 type = PIPE
            "10 09"  # 2 id = 9
            "9201 15"  # 18 pipe, 21 bytes:
            "08 09"  # . 1 id = 9
            "10 cdde06"  # . 2 pipe_id = 110413
            "18 8010"  # . 3 flags = 0x800 (O_NONBLOCK)
            "22 FOWN"  # . 4 fown
        ),
        FileEntry(type=2, id=9, pipe=PipeEntry(id=9, pipe_id=110413, flags=0x800, fown=FOWN)),
    ),
    (
        "eventfd with counter 7 (entry 14)",
        FileEntry,
        _hex(
            "08 06 10 0e"  # 1 type = EVENTFD, 2 id = 14
            "42 13"  # 8 efd, 19 bytes:
            "08 0e"  # . 1 id = 14
            "10 8210"  # . 2 flags = 0x802 (O_RDWR|O_NONBLOCK)
            "1a FOWN"  # . 3 fown
            "20 07"  # . 4 counter = 7
        ),
        FileEntry(type=6, id=14, efd=EventfdFileEntry(id=14, flags=0x802, fown=FOWN, counter=7)),
    ),
    (
        "epoll with two targets (entry 15)",
        FileEntry,
        _hex(
            "08 07 10 0f"  # 1 type = EVENTPOLL, 2 id = 15
            "4a 39"  # 9 epfd, 57 bytes:
            "08 0f 10 02"  # . 1 id = 15, 2 flags = O_RDWR
            "1a FOWN"  # . 3 fown
            "22 14"  # . 4 tfd[0], 20 bytes:
            "08 00 10 0c"  # . . 1 id = 0, 2 tfd = 12
            "18 9980808008"  # . . 3 events = 0x80000019 (EPOLLET|EPOLLHUP|EPOLLERR|EPOLLIN)
            "20 a244"  # . . 4 data = 0x2222
            "28 10 30 8e08 38 00"  # . . 5 dev = 16, 6 inode = 1038, 7 pos = 0
            "22 11"  # . 4 tfd[1], 17 bytes:
            "08 00 10 0b 18 19"  # . . id 0, tfd 11, events 0x19 (EPOLLHUP|EPOLLERR|EPOLLIN)
            "20 9122"  # . . 4 data = 0x1111
            "28 09 30 d0de06 38 00"  # . . 5 dev = 9, 6 inode = 110416, 7 pos = 0
        ),
        FileEntry(type=7, id=15, epfd=EventpollFileEntry(id=15, flags=2, fown=FOWN, tfd=[
            EventpollTfdEntry(id=0, tfd=12, events=0x80000019, data=0x2222, dev=16, inode=1038,
                              pos=0),
            EventpollTfdEntry(id=0, tfd=11, events=0x19, data=0x1111, dev=9, inode=110416,
                              pos=0),
        ])),
    ),
    (
        "signalfd for SIGWINCH (entry 16)",
        FileEntry,
        _hex(
            "08 09 10 10"  # 1 type = SIGNALFD, 2 id = 16
            "52 16"  # 10 sgfd, 22 bytes:
            "08 10 10 8210"  # . 1 id = 16, 2 flags = 0x802
            "1a FOWN"  # . 3 fown
            "20 80808040"  # . 4 sigmask = 0x8000000 (bit 27: SIGWINCH)
        ),
        FileEntry(type=9, id=16, sgfd=SignalfdEntry(id=16, flags=0x802, fown=FOWN,
                                                   sigmask=0x8000000)),
    ),
    (
        "timerfd, 99.46 s left, 5 s interval (entry 17)",
        FileEntry,
        _hex(
            "08 11 10 11"  # 1 type = TIMERFD, 2 id = 17
            "62 22"  # 12 tfd, 34 bytes:
            "08 11 10 02"  # . 1 id = 17, 2 flags = O_RDWR
            "1a FOWN"  # . 3 fown
            "20 01 28 00 30 00"  # . 4 clockid = CLOCK_MONOTONIC, 5 ticks 0, 6 settime_flags 0
            "38 63 40 d3a5efdb01"  # . 7 vsec = 99, 8 vnsec = 461099731
            "48 05 50 00"  # . 9 isec = 5, 10 insec = 0
        ),
        FileEntry(type=17, id=17, tfd=TimerfdEntry(
            id=17, flags=2, fown=FOWN, clockid=1, ticks=0, settime_flags=0, vsec=99,
            vnsec=461099731, isec=5, insec=0)),
    ),
    (
        "unix stream socket, one end of a socketpair (entry 12)",
        UnixSkEntry,
        _hex(
            "08 0c 10 cfde06"  # 1 id = 12, 2 ino = 110415
            "18 01 20 01"  # 3 type = STREAM, 4 state = ESTABLISHED
            "28 02 30 00 38 00"  # 5 flags = O_RDWR, 6 uflags = 0, 7 backlog = 0
            "40 cede06"  # 8 peer = 110414 (the other end's ino)
            "4a FOWN"  # 9 fown
            "52 2d"  # 10 opts, 45 bytes:
            "08 80800d 10 80800d"  # . 1 so_sndbuf = 2 so_rcvbuf = 212992
            "18 00 20 00 28 00 30 00"  # . 3-6 send/receive timeouts 0
            "38 00 40 00 48 01"  # . 7 reuseaddr false, 8 so_priority 0, 9 so_rcvlowat 1
            "58 00 60 00 68 00 70 00"  # . 11 passcred, 12 passsec, 13 dontroute, 14 no_check
            "8801 00 9001 00 9801 00"  # . 17 so_reuseport, 18 so_broadcast, 19 so_keepalive
            "b801 00 c801 00"  # . 23 so_oobinline 0, 25 so_buf_lock 0
            "5a 00"  # 11 name = b"" (unnamed)
            "8001 02"  # 16 ns_id = 2
        ),
        UnixSkEntry(
            id=12, ino=110415, type=1, state=1, flags=2, uflags=0, backlog=0, peer=110414,
            fown=FOWN, name=b"", ns_id=2,
            opts=SkOptsEntry(so_sndbuf=212992, so_rcvbuf=212992, reuseaddr=False, so_priority=0,
                             so_rcvlowat=1, so_passcred=False, so_passsec=False,
                             so_dontroute=False, so_no_check=False, so_reuseport=False,
                             so_broadcast=False, so_keepalive=False, so_oobinline=0,
                             so_buf_lock=0),
        ),
    ),
    (
        "tcp socket listening on 127.0.0.1:36537 (entry 13)",
        InetSkEntry,
        _hex(
            "08 0d 10 d0de06"  # 1 id = 13, 2 ino = 110416
            "18 02 20 01 28 06 30 0a"  # 3 family INET, 4 type STREAM, 5 proto TCP, 6 LISTEN
            "38 b99d02 40 00"  # 7 src_port = 36537, 8 dst_port = 0
            "48 02 50 08"  # 9 flags = O_RDWR, 10 backlog = 8
            "58 ff808008"  # 11 src_addr[0] = 0x0100007f (127.0.0.1, bytes in network order)
            "60 00"  # 12 dst_addr[0] = 0 (0.0.0.0)
            "6a FOWN"  # 13 fown
            "72 29"  # 14 opts, 41 bytes:
            "08 808001 10 808008"  # . 1 so_sndbuf = 16384, 2 so_rcvbuf = 131072
            "18 00 20 00 28 00 30 00"  # . 3-6 timeouts 0
            "38 01 40 00 48 01"  # . 7 reuseaddr true, 8 so_priority 0, 9 so_rcvlowat 1
            "68 00 70 00"  # . 13 so_dontroute, 14 so_no_check
            "8801 00 9001 00 9801 00 b801 00 c801 00"  # . 17, 18, 19, 23, 25 all 0
            "8201 02 38 40"  # 16 ip_opts, 2 bytes: 7 ttl = 64
            "9001 02"  # 18 ns_id = 2
            "a201 07 18 09 20 a038 28 4b"  # 20 tcp_opts: keepcnt 9, keepidle 7200, keepintvl 75
        ),
        InetSkEntry(
            id=13, ino=110416, family=2, type=1, proto=6, state=10, src_port=36537, dst_port=0,
            flags=2, backlog=8, src_addr=[0x0100007F], dst_addr=[0], fown=FOWN, ns_id=2,
            opts=SkOptsEntry(so_sndbuf=16384, so_rcvbuf=131072, reuseaddr=True, so_priority=0,
                             so_rcvlowat=1, so_dontroute=False, so_no_check=False,
                             so_reuseport=False, so_broadcast=False, so_keepalive=False,
                             so_oobinline=0, so_buf_lock=0),
            ip_opts=IpOptsEntry(ttl=64),
            tcp_opts=TcpOptsEntry(keepcnt=9, keepidle=7200, keepintvl=75),
        ),
    ),
    (
        "bound unix socket with file perms and a shutdown (hand-made)",
        UnixSkEntry,
        _hex(
            "08 03 10 e807 18 02 20 07"  # 1 id 3, 2 ino 1000, 3 type DGRAM, 4 state CLOSE
            "28 00 30 00 38 00 40 00"  # 5 flags, 6 uflags, 7 backlog, 8 peer: 0
            "4a FOWN"  # 9 fown
            "52 0e 08 8001 10 8001 18 00 20 00 28 00 30 00"  # 10 opts: bufs 128, timeouts 0
            "5a 06 2f746d702f73"  # 11 name = b"/tmp/s"
            "60 03"  # 12 shutdown = BOTH
            "6a 08 08 ed03 10 e807 18 64"  # 13 file_perms: mode 0o755, uid 1000, gid 100
            "88 01 03"  # 17 mnt_id = -2 (zigzag 3)
        ),
        UnixSkEntry(id=3, ino=1000, type=2, state=7, flags=0, uflags=0, backlog=0, peer=0,
                    fown=FOWN, opts=SkOptsEntry(so_sndbuf=128, so_rcvbuf=128), name=b"/tmp/s",
                    shutdown=3, file_perms=FilePermsEntry(mode=0o755, uid=1000, gid=100),
                    mnt_id=-2),
    ),
    (
        "named pipe (hand-made)",
        FileEntry,
        _hex(
            "08 03 10 05"  # 1 type = FIFO, 2 id = 5
            "8a01 07 08 05 10 e807 18 04"  # 17 fifo: id 5, pipe_id 1000, regf_id 4
        ),
        FileEntry(type=3, id=5, fifo=FifoEntry(id=5, pipe_id=1000, regf_id=4)),
    ),
    (
        "memfd file (hand-made)",
        FileEntry,
        _hex(
            "08 12 10 07"  # 1 type = MEMFD, 2 id = 7
            "a201 14"  # 20 memfd, 20 bytes:
            "08 07 10 02 18 2a"  # . 1 id 7, 2 flags O_RDWR, 3 pos 42
            "22 FOWN"  # . 4 fown
            "28 09"  # . 5 inode_id = 9
        ),
        FileEntry(type=18, id=7, memfd=MemfdFileEntry(id=7, flags=2, pos=42, fown=FOWN,
                                                     inode_id=9)),
    ),
    (
        "memfd inode of memfd.img (hand-made)",
        MemfdInodeEntry,
        _hex(
            "0a 0a 6d656d66643a74657374"  # 1 name = "memfd:test"
            "10 00 18 00"  # 2 uid 0, 3 gid 0
            "20 808001"  # 4 size = 16384
            "28 e807"  # 5 shmid = 1000
            "30 05"  # 6 seals = F_SEAL_SEAL|F_SEAL_GROW
            "38 09"  # 7 inode_id = 9
            "48 ff03"  # 9 mode = 0o777
        ),
        MemfdInodeEntry(name="memfd:test", uid=0, gid=0, size=16384, shmid=1000, seals=5,
                        inode_id=9, mode=0o777),
    ),
    (
        "inotify with one watch (hand-made)",
        FileEntry,
        _hex(
            "08 08 10 06"  # 1 type = INOTIFY, 2 id = 6
            "6a 2b"  # 13 ify, 43 bytes:
            "08 06 10 00"  # . 1 id 6, 2 flags 0
            "22 FOWN"  # . 4 fown
            "2a 19"  # . 5 wd[0], 25 bytes:
            "08 00 10 e807"  # . . 1 id 0, 2 i_ino 1000
            "18 8201 20 00"  # . . 3 mask = 0x82 (IN_MODIFY|IN_CLOSE_WRITE), 4 ignored_mask 0
            "28 8180c001"  # . . 5 s_dev = 0x300001 (3:1 as major << 20 | minor)
            "30 01"  # . . 6 wd = 1
            "3a 06 08 08 10 01 18 2a"  # . . 7 f_handle: bytes 8, type 1, handle [42]
        ),
        FileEntry(type=8, id=6, ify=InotifyFileEntry(id=6, flags=0, fown=FOWN, wd=[
            InotifyWdEntry(id=0, i_ino=1000, mask=0x82, ignored_mask=0, s_dev=0x300001, wd=1,
                           f_handle=FhEntry(bytes=8, type=1, handle=[42])),
        ])),
    ),
    (
        "pipes-data entry (payload; the 9 bytes follow it in the image)",
        PipeDataEntry,
        _hex("08 cdde06 10 09 18 808004"),  # 1 pipe_id 110413, 2 bytes 9, 3 size 65536
        PipeDataEntry(pipe_id=110413, bytes=9, size=65536),
    ),
    (
        "fs of the state dump",
        FsEntry,
        _hex("08 12 10 13 18 12"),  # 1 cwd_id 18, 2 root_id 19, 3 umask 0o022
        FsEntry(cwd_id=18, root_id=19, umask=0o022),
    ),
    (
        "task timers: ITIMER_REAL 299.46 s left, 3 s interval (core-4524)",
        TaskTimersEntry,
        _hex(
            "0a 0b 08 03 10 00 18 ab02 20 e2901c"  # 1 real: isec 3, iusec 0, vsec 299, vusec
            "12 08 08 00 10 00 18 00 20 00"  # 2 virt: all 0
            "1a 08 08 00 10 00 18 00 20 00"  # 3 prof: all 0
        ),
        TaskTimersEntry(real=ItimerEntry(isec=3, iusec=0, vsec=299, vusec=460898),
                        virt=ItimerEntry(), prof=ItimerEntry()),
    ),
    (
        "posix timer (hand-made)",
        PosixTimerEntry,
        _hex(
            "08 00 10 01 18 0e 20 00"  # 1 it_id 0, 2 CLOCK_MONOTONIC, 3 SIGALRM, 4 SIGEV_SIGNAL
            "28 d202 30 00"  # 5 sival_ptr = 338, 6 overrun 0
            "38 01 40 00 48 0a 50 00"  # 7-10 interval 1 s, value 10 s
            "58 ffffffffffffffffff01"  # 11 notify_thread_id = -1 (int32, 10 bytes)
        ),
        PosixTimerEntry(it_id=0, clock_id=1, si_signo=14, it_sigev_notify=0, sival_ptr=338,
                        overrun=0, isec=1, insec=0, vsec=10, vnsec=0, notify_thread_id=-1),
    ),
    (
        "pending signal queue with one siginfo (hand-made)",
        SignalQueueEntry,
        _hex(
            "0a 12 0a 10"  # 1 signals[0] (18 bytes): 1 siginfo, 16 bytes:
            "0a000000 00000000 faffffff 00000000"  # si_signo 10, si_errno 0, si_code -6 (TKILL)
        ),
        SignalQueueEntry(signals=[SiginfoEntry(siginfo=bytes.fromhex(
            "0a000000 00000000 faffffff 00000000"))]),
    ),
]
# fmt: on


@pytest.mark.parametrize(("name", "cls", "data", "obj"), CASES, ids=[c[0] for c in CASES])
def test_message_bytes(name: str, cls: type[Message], data: bytes, obj: Message) -> None:
    """Each hand-annotated message parses to its value and builds back to the same bytes."""
    del name
    common(cls, data, obj)
    assert parse(cls, data).unknown_fields == []


def test_kind_entry_and_of() -> None:
    """file_entry's kind sub-message is found by type, and FileEntry.of wraps one back."""
    for _, cls, _data, obj in CASES:
        if cls is FileEntry:
            assert isinstance(obj, FileEntry)
            kind = obj.kind_entry()
            assert kind is not None
            assert kind.id == obj.id
            assert FileEntry.of(kind) == obj
    reg = RegFileEntry(id=3, flags=0, pos=0, fown=FOWN, name="/x")
    assert FileEntry.of(reg) == FileEntry(type=FdType.REG, id=3, reg=reg)
    assert FileEntry(type=FdType.PIPE, id=1).kind_entry() is None  # modelled kind, message absent
    assert FileEntry(type=11, id=1).kind_modelled is False  # TTY: kept as unknown fields
    assert FileEntry(type=11, id=1).type_name == "TTY"
    with pytest.raises(TypeError):
        FileEntry.of(FOWN)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("words", "address"),
    [
        ([0x0100007F], "127.0.0.1"),  # bytes 7f 00 00 01 in network order
        ([0], "0.0.0.0"),
        ([0x000080FE, 0, 0, 0x01000000], "fe80::1"),  # four words, each in network order
    ],
)
def test_ip_words(words: list[int], address: str) -> None:
    """src_addr/dst_addr words convert to the address crit prints, and back."""
    assert ip_from_words(words) == ipaddress.ip_address(address)
    assert ip_to_words(address) == words


def test_ip_words_wrong_count() -> None:
    """An address of 2 words is neither IPv4 nor IPv6."""
    with pytest.raises(ValueError, match="1 or 4 words"):
        ip_from_words([1, 2])


def test_sigsets() -> None:
    """Signal N is bit N-1; names map to numbers; the state dump's masks decode as expected."""
    winch, alrm = signal_number("SIGWINCH"), signal_number("SIGALRM")
    assert (winch, alrm) == (28, 14)
    assert sigset_to_signals(0x8002000) == {winch, alrm}
    assert signals_to_sigset([1, 14, 15, 28]) == 0x8006001
    assert sigset_to_signals(1 << 63) == {64}
    for bad in (-1, 1 << 64):
        with pytest.raises(ValueError):
            sigset_to_signals(bad)
    with pytest.raises(ValueError):
        signals_to_sigset([0])
    with pytest.raises(ValueError):
        signal_number("SIGNOPE")
    sgfd = SignalfdEntry(id=1, flags=0, fown=FOWN, sigmask=1 << 27)
    assert sgfd.signals() == {winch}


def test_sigaction_order() -> None:
    """sigactions are indexed by SIGACTION_SIGNALS: 1..64 without SIGKILL and SIGSTOP."""
    assert len(SIGACTION_SIGNALS) == 62
    assert 9 not in SIGACTION_SIGNALS
    assert 19 not in SIGACTION_SIGNALS
    sas = [SaEntry(sigaction=signo) for signo in SIGACTION_SIGNALS]
    tc = TaskCoreEntry(sigactions=sas)
    assert tc.sigaction_for(10).sigaction == 10
    assert tc.sigaction_for(20).sigaction == 20  # index 18, after two skipped signals
    with pytest.raises(ValueError, match="no sigaction"):
        tc.sigaction_for(9)
    with pytest.raises(ValueError, match="only 1 sigactions"):
        TaskCoreEntry(sigactions=sas[:1]).sigaction_for(2)
    assert SA_RESTART == 0x10000000
    assert SA_SIGINFO == 4


def test_siginfo_fields() -> None:
    """si_signo and si_code are read from the raw siginfo_t."""
    info = SiginfoEntry(siginfo=bytes.fromhex("0a000000 00000000 faffffff") + bytes(116))
    assert (info.si_signo, info.si_code) == (10, -6)


def test_epoll_constants() -> None:
    """EPOLLIN and EPOLLET are the bits of the state dump's edge-triggered target."""
    assert EPOLLIN | EPOLLET == 0x80000019 & ~0x18  # without EPOLLERR|EPOLLHUP (kernel adds)


PIPES_DATA_IMG = bytes.fromhex(
    "19435654 09374556"  # IMG_COMMON_MAGIC, PIPES_DATA
    "0a000000 08cdde06 1009 18808004"  # entry 0: 10 bytes: pipe_id 110413, bytes 9, size 65536
    "706970652d64617461"  # extra: the 9 queued bytes "pipe-data"
)


def test_pipes_data_extra_payload() -> None:
    """pipes-data entries are followed by their queued bytes, which parse into ``extra``."""
    magic, entries, offsets = parse_image_located(PIPES_DATA_IMG, "pipes-data.img")
    assert (magic, offsets) == ("PIPES_DATA", [8])
    assert entries == [PipeDataEntry(pipe_id=110413, bytes=9, size=65536, extra=b"pipe-data")]
    assert build_image("PIPES_DATA", entries) == PIPES_DATA_IMG
    two = [PipeDataEntry(pipe_id=1, bytes=3, extra=b"abc"), PipeDataEntry(pipe_id=2, bytes=0)]
    data = build_image("FIFO_DATA", two)
    magic, entries, offsets = parse_image_located(data, "fifo-data.img")
    assert (magic, entries) == ("FIFO_DATA", two)
    assert offsets == [8, 8 + 4 + 4 + 3]  # the second entry starts after the first's extra


def test_pipes_data_truncated_extra() -> None:
    """Extra bytes cut short by EOF are reported at their offset, with the entry index."""
    with pytest.raises(ImageError) as info:
        parse_image(PIPES_DATA_IMG[:-2], "pipes-data.img")
    err = info.value
    assert (err.path, err.offset, err.entry) == ("pipes-data.img", 22, 0)
    assert "extra payload of 9 bytes (PipeDataEntry.bytes)" in str(err)
    assert "(7 bytes left)" in str(err)


@pytest.mark.parametrize(
    ("tail", "offset", "message"),
    [
        (b"\x05\x00", 31, "2 trailing bytes"),  # a cut length field after entry 0
        (b"\x05\x00\x00\x00\x08", 31, "entry length 5 runs past the end"),  # a cut payload
    ],
)
def test_pipes_data_framing_errors(tail: bytes, offset: int, message: str) -> None:
    """The framing errors of other images apply to entries that carry extra bytes too."""
    with pytest.raises(ImageError, match=message) as info:
        parse_image(PIPES_DATA_IMG + tail, "pipes-data.img")
    assert (info.value.offset, info.value.entry) == (offset, 1)


def test_build_checks_extra_length() -> None:
    """build_image refuses an entry whose extra bytes disagree with its length field."""
    with pytest.raises(ValueError, match="3 extra bytes but bytes = 2"):
        build_image("PIPES_DATA", [PipeDataEntry(pipe_id=1, bytes=2, extra=b"abc")])
    assert build(PipeDataEntry(pipe_id=1, bytes=3, extra=b"abc")) == bytes.fromhex("0801 1003")

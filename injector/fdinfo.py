"""Typed values for one open descriptor, parsed from /proc/PID/fd/N and /proc/PID/fdinfo/N.

The formats follow the kernel's ``seq_show`` in ``fs/proc/fd.c`` (``pos``, ``flags`` in octal,
``mnt_id``, ``ino``) and each file type's ``show_fdinfo``: ``fs/eventfd.c``,
``fs/eventpoll.c`` (``tfd:`` lines), ``fs/signalfd.c``, ``fs/timerfd.c``,
``fs/notify/fdinfo.c`` (``inotify wd:`` lines), ``kernel/pid.c`` (``Pid:``/``NSpid:``), and
CRIU's ``criu/proc_parse.c`` ``parse_fdinfo_pid_s``, which reads them for its images. The link
text (``readlink`` of /proc/PID/fd/N) names the kind, as in ``criu/files.c``
``dump_one_file``: ``pipe:[INO]``, ``socket:[INO]``, ``anon_inode:[eventfd]`` ..., or a path.

Everything here is pure: bytes (and a stat taken by the reader) in, values out, so the parsers
are tested on saved text. :mod:`injector.fds` does the reading. Names follow CRIU's ``.proto``
fields where one exists (``pipe_id``, ``vsec``, ``settime_flags``, ``sigmask``...), and every
kind has ``KIND``, CRIU's ``fd_types`` name.

Link text is kept as bytes (``Descriptor.link``); paths are also given decoded with
``os.fsdecode`` (undecodable bytes round-trip). readlink shows a path exactly as ``d_path``
builds it, relative to the reader's root, with no escaping; an unlinked file gets
`` (deleted)`` appended, which is stripped into ``deleted``.
"""

from __future__ import annotations

import os
import re
import stat as stat_
from typing import ClassVar, TypeAlias

import attrs

from injector.sockdiag import InetSocket, UnixSocket, kernel_dev
from injector.sockopts import SocketOptions

__all__ = [
    "FD_CLOEXEC",
    "O_CLOEXEC",
    "Descriptor",
    "EpollTarget",
    "EventFd",
    "EventPoll",
    "Fifo",
    "FileKind",
    "FileOwner",
    "FileStat",
    "Inotify",
    "InotifyWatch",
    "Memfd",
    "Other",
    "PidFd",
    "Pipe",
    "RegularFile",
    "SignalFd",
    "Socket",
    "TimerFd",
    "parse_fdinfo",
    "split_deleted",
]

O_CLOEXEC = 0o2000000
FD_CLOEXEC = 1
DELETED = b" (deleted)"
MEMFD_PREFIX = b"/memfd:"

_AF_UNIX, _AF_INET, _AF_INET6, _AF_NETLINK, _AF_PACKET = 1, 2, 10, 16, 17


@attrs.frozen
class FileStat:
    """What ``stat`` of /proc/PID/fd/N tells about the open file itself (``dev`` and ``rdev``
    as ``os.makedev`` values)."""

    mode: int
    ino: int
    dev: int
    rdev: int
    nlink: int
    uid: int
    gid: int
    size: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileStat:
        return cls(
            mode=st.st_mode,
            ino=st.st_ino,
            dev=st.st_dev,
            rdev=st.st_rdev,
            nlink=st.st_nlink,
            uid=st.st_uid,
            gid=st.st_gid,
            size=st.st_size,
        )


@attrs.frozen
class FileOwner:
    """``fown_entry``: who gets SIGIO for the file (F_GETOWN_EX, F_GETOWNER_UIDS, F_GETSIG).
    ``pid`` is in the reader's pid namespace; ``pid_type`` is F_OWNER_TID/PID/PGRP (0/1/2)."""

    uid: int
    euid: int
    signum: int
    pid_type: int
    pid: int


@attrs.frozen
class RegularFile:
    """A file reached by a path: regular files, directories, devices, O_PATH descriptors of
    symlinks (``mode`` tells which; CRIU's REG covers all of them). ``path`` has
    `` (deleted)`` stripped; ``deleted`` means the name no longer leads to this file
    (``nlink`` 0: no name at all, CRIU's ghost file; otherwise linked elsewhere)."""

    KIND: ClassVar[str] = "REG"
    path: str
    deleted: bool
    mode: int
    size: int
    dev: int
    ino: int
    nlink: int
    rdev: int

    @property
    def is_dir(self) -> bool:
        return stat_.S_ISDIR(self.mode)

    @property
    def is_device(self) -> bool:
        return stat_.S_ISCHR(self.mode) or stat_.S_ISBLK(self.mode)


@attrs.frozen
class Pipe:
    """An anonymous pipe end. ``pipe_id`` is the pipe's inode (both ends share it);
    ``queued`` (FIONREAD) and ``capacity`` (F_GETPIPE_SZ) are ``None`` unless a local
    duplicate of the descriptor could be taken."""

    KIND: ClassVar[str] = "PIPE"
    pipe_id: int
    queued: int | None = None
    capacity: int | None = None


@attrs.frozen
class Fifo:
    """A named pipe opened by its path (``pipe_id`` is the FIFO's inode)."""

    KIND: ClassVar[str] = "FIFO"
    path: str
    deleted: bool
    pipe_id: int
    mode: int
    dev: int
    queued: int | None = None
    capacity: int | None = None


@attrs.frozen
class Socket:
    """A socket: its inode, and what sock_diag (``diag``: ``unix`` / ``inet``) and a local
    duplicate (``family``/``type``/``protocol`` from SO_DOMAIN/SO_TYPE/SO_PROTOCOL,
    ``options``, ``netns`` from SIOCGSKNS) told. ``family`` is known from either; ``None``
    only when neither was available. ``netns`` is the inode of the network namespace the
    socket lives in (CRIU's ``ns_id`` refers to it)."""

    ino: int
    family: int | None = None
    type: int | None = None
    protocol: int | None = None
    diag: UnixSocket | InetSocket | None = None
    options: SocketOptions | None = None
    netns: int | None = None

    @property
    def KIND(self) -> str:
        return {
            _AF_UNIX: "UNIXSK",
            _AF_INET: "INETSK",
            _AF_INET6: "INETSK",
            _AF_NETLINK: "NETLINKSK",
            _AF_PACKET: "PACKETSK",
        }.get(self.family or -1, "UND")

    @property
    def unix(self) -> UnixSocket | None:
        return self.diag if isinstance(self.diag, UnixSocket) else None

    @property
    def inet(self) -> InetSocket | None:
        return self.diag if isinstance(self.diag, InetSocket) else None


@attrs.frozen
class EventFd:
    """``eventfd-count`` (printed in hex), and since Linux 6.2 ``eventfd-id`` and
    ``eventfd-semaphore`` (EFD_SEMAPHORE, which the file flags do not show)."""

    KIND: ClassVar[str] = "EVENTFD"
    count: int
    id: int | None = None
    semaphore: bool | None = None


@attrs.frozen
class EpollTarget:
    """One ``tfd:`` line: ``eventpoll_tfd_entry`` (``events`` as the kernel keeps them, with
    EPOLLERR|EPOLLHUP added; ``sdev`` kernel-encoded as printed; ``dev`` as ``st_dev``)."""

    tfd: int
    events: int
    data: int
    pos: int | None = None
    ino: int | None = None
    sdev: int | None = None

    @property
    def dev(self) -> int | None:
        return None if self.sdev is None else kernel_dev(self.sdev)


@attrs.frozen
class EventPoll:
    """An epoll instance and what it watches (in the kernel's red-black tree order)."""

    KIND: ClassVar[str] = "EVENTPOLL"
    targets: tuple[EpollTarget, ...] = ()


@attrs.frozen
class SignalFd:
    """``sigmask``: bit N-1 for signal N (CRIU's ``signalfd_entry.sigmask``)."""

    KIND: ClassVar[str] = "SIGNALFD"
    sigmask: int


@attrs.frozen
class TimerFd:
    """``timerfd_entry``: ``vsec``/``vnsec`` is the time left until expiry when /proc was
    read (relative even for TFD_TIMER_ABSTIME), ``isec``/``insec`` the interval,
    ``settime_flags`` TFD_TIMER_ABSTIME (1) | TFD_TIMER_CANCEL_ON_SET (2)."""

    KIND: ClassVar[str] = "TIMERFD"
    clockid: int
    ticks: int
    settime_flags: int
    vsec: int
    vnsec: int
    isec: int
    insec: int


@attrs.frozen
class InotifyWatch:
    """One ``inotify wd:`` line (``inotify_wd_entry``): the watched inode ``ino`` on ``sdev``
    (kernel-encoded as printed; ``dev`` as ``st_dev``), and its file handle when the kernel
    can make one (``f_handle`` empty otherwise)."""

    wd: int
    ino: int
    sdev: int
    mask: int
    ignored_mask: int
    fhandle_bytes: int
    fhandle_type: int
    f_handle: bytes

    @property
    def dev(self) -> int:
        return kernel_dev(self.sdev)


@attrs.frozen
class Inotify:
    KIND: ClassVar[str] = "INOTIFY"
    watches: tuple[InotifyWatch, ...] = ()


@attrs.frozen
class Memfd:
    """A memfd (``memfd_inode_entry``): ``name`` without the ``memfd:`` prefix, and ``seals``
    (F_GET_SEALS) when a local duplicate could be taken."""

    KIND: ClassVar[str] = "MEMFD"
    name: str
    size: int
    mode: int
    ino: int
    dev: int
    uid: int
    gid: int
    seals: int | None = None


@attrs.frozen
class PidFd:
    """A pidfd: ``pid`` as seen from the reader's pid namespace (-1: the process is gone),
    ``nspid`` the pid in each nested namespace (``NSpid:``)."""

    KIND: ClassVar[str] = "PIDFD"
    pid: int | None
    nspid: tuple[int, ...] = ()


@attrs.frozen
class Other:
    """Anything else (fanotify, io_uring, userfaultfd, perf events, bpf maps, a path-less
    file...): ``what`` is the link text, for a caller to refuse by name."""

    KIND: ClassVar[str] = "UND"
    what: str


FileKind: TypeAlias = (
    RegularFile
    | Pipe
    | Fifo
    | Socket
    | EventFd
    | EventPoll
    | SignalFd
    | TimerFd
    | Inotify
    | Memfd
    | PidFd
    | Other
)


@attrs.frozen
class Descriptor:
    """One entry of a process's descriptor table.

    ``link`` is the raw /proc/PID/fd/N text. ``flags`` is the fdinfo ``flags`` value: the file
    status flags (``f_flags``) with O_CLOEXEC added by the kernel when the descriptor is
    close-on-exec; ``fd_flags`` and ``file_flags`` split it the way CRIU does
    (``fdinfo_entry.flags`` holds FD_CLOEXEC, the file entry the rest). ``ino`` is fdinfo's
    ``ino:`` line (Linux 5.14+), ``stat`` what stat of the descriptor showed, ``owner`` the
    SIGIO owner when a local duplicate was taken.
    """

    fd: int
    link: bytes
    pos: int
    flags: int
    mnt_id: int
    ino: int | None
    stat: FileStat | None
    kind: FileKind
    owner: FileOwner | None = None

    @property
    def cloexec(self) -> bool:
        return bool(self.flags & O_CLOEXEC)

    @property
    def fd_flags(self) -> int:
        """``fdinfo_entry.flags``: FD_CLOEXEC or 0."""
        return FD_CLOEXEC if self.cloexec else 0

    @property
    def file_flags(self) -> int:
        """The file status flags (CRIU's ``reg_file_entry.flags``, ``pipe_entry.flags`` ...)."""
        return self.flags & ~O_CLOEXEC

    @property
    def access_mode(self) -> int:
        return self.flags & os.O_ACCMODE

    @property
    def fd_type(self) -> str:
        """CRIU's ``fd_types`` name of this descriptor's kind (REG, PIPE, UNIXSK ...)."""
        return self.kind.KIND


def split_deleted(link: bytes, *, real_name: bool = False) -> tuple[bytes, bool]:
    """The path in ``link`` without the `` (deleted)`` the kernel appends to unlinked files,
    and whether it was there. ``real_name``: the caller checked that the text, suffix and all,
    is the file's actual name (a file may be called ``x (deleted)``)."""
    if link.endswith(DELETED) and not real_name:
        return link[: -len(DELETED)], True
    return link, False


_EPOLL_LINE = re.compile(
    rb"^tfd:\s*(\d+)\s+events:\s*([0-9a-fA-F]+)\s+data:\s*([0-9a-fA-F]+)"
    rb"(?:\s+pos:\s*(\d+)\s+ino:\s*([0-9a-fA-F]+)\s+sdev:\s*([0-9a-fA-F]+))?"
)
_TIMESPEC = re.compile(rb"^\(\s*(\d+),\s*(\d+)\)$")


def _fields(data: bytes) -> tuple[dict[bytes, bytes], list[bytes]]:
    """``key: value`` lines as a dict (first occurrence), and every line in order."""
    lines = [line for line in data.split(b"\n") if line]
    fields: dict[bytes, bytes] = {}
    for line in lines:
        key, sep, value = line.partition(b":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields, lines


def _int(fields: dict[bytes, bytes], key: bytes, base: int = 10) -> int:
    try:
        return int(fields[key], base)
    except (KeyError, ValueError) as exc:
        raise ValueError(f"fdinfo: no valid {key.decode()!r} line") from exc


def _opt_int(fields: dict[bytes, bytes], key: bytes, base: int = 10) -> int | None:
    return _int(fields, key, base) if key in fields else None


def _epoll(lines: list[bytes]) -> EventPoll:
    targets = []
    for line in lines:
        if not line.startswith(b"tfd:"):
            continue
        m = _EPOLL_LINE.match(line)
        if m is None:
            raise ValueError(f"fdinfo: unparsable epoll line {line!r}")
        tfd, events, data, pos, ino, sdev = m.groups()
        targets.append(
            EpollTarget(
                tfd=int(tfd),
                events=int(events, 16),
                data=int(data, 16),
                pos=None if pos is None else int(pos),
                ino=None if ino is None else int(ino, 16),
                sdev=None if sdev is None else int(sdev, 16),
            )
        )
    return EventPoll(tuple(targets))


def _inotify(lines: list[bytes]) -> Inotify:
    watches = []
    for line in lines:
        if not line.startswith(b"inotify wd:"):
            continue
        pairs = dict(
            word.split(b":", 1) for word in line[len(b"inotify ") :].split() if b":" in word
        )
        try:
            watches.append(
                InotifyWatch(
                    wd=int(pairs[b"wd"], 16),
                    ino=int(pairs[b"ino"], 16),
                    sdev=int(pairs[b"sdev"], 16),
                    mask=int(pairs[b"mask"], 16),
                    ignored_mask=int(pairs[b"ignored_mask"], 16),
                    fhandle_bytes=int(pairs.get(b"fhandle-bytes", b"0"), 16),
                    fhandle_type=int(pairs.get(b"fhandle-type", b"0"), 16),
                    f_handle=bytes.fromhex(pairs.get(b"f_handle", b"").decode()),
                )
            )
        except (KeyError, ValueError) as exc:
            raise ValueError(f"fdinfo: unparsable inotify line {line!r}") from exc
    return Inotify(tuple(watches))


def _timespec(fields: dict[bytes, bytes], key: bytes) -> tuple[int, int]:
    m = _TIMESPEC.match(fields.get(key, b""))
    if m is None:
        raise ValueError(f"fdinfo: no valid {key.decode()!r} line")
    return int(m.group(1)), int(m.group(2))


def _timerfd(fields: dict[bytes, bytes]) -> TimerFd:
    vsec, vnsec = _timespec(fields, b"it_value")
    isec, insec = _timespec(fields, b"it_interval")
    return TimerFd(
        clockid=_int(fields, b"clockid"),
        ticks=_int(fields, b"ticks"),
        settime_flags=_int(fields, b"settime flags", 8),
        vsec=vsec,
        vnsec=vnsec,
        isec=isec,
        insec=insec,
    )


def _anon(name: bytes, fields: dict[bytes, bytes], lines: list[bytes]) -> FileKind:
    if name == b"[eventfd]":
        sem = _opt_int(fields, b"eventfd-semaphore")
        return EventFd(
            count=_int(fields, b"eventfd-count", 16),
            id=_opt_int(fields, b"eventfd-id"),
            semaphore=None if sem is None else bool(sem),
        )
    if name == b"[eventpoll]":
        return _epoll(lines)
    if name == b"inotify":
        return _inotify(lines)
    if name == b"[signalfd]":
        return SignalFd(_int(fields, b"sigmask", 16))
    if name == b"[timerfd]":
        return _timerfd(fields)
    if name == b"[pidfd]":
        nspid = tuple(int(w) for w in fields.get(b"NSpid", b"").split())
        return PidFd(pid=_opt_int(fields, b"Pid"), nspid=nspid)
    return Other(os.fsdecode(b"anon_inode:" + name))


def _bracketed(link: bytes, prefix: bytes) -> int | None:
    if link.startswith(prefix) and link.endswith(b"]"):
        try:
            return int(link[len(prefix) : -1])
        except ValueError:
            return None
    return None


def parse_fdinfo(
    fd: int,
    link: bytes,
    fdinfo: bytes,
    stat: FileStat | None = None,
    *,
    real_name: bool = False,
    memfd: bool | None = None,
) -> Descriptor:
    """One descriptor from its link text, its fdinfo bytes and (for path-named files, where
    it is required) the stat of the open file.

    ``real_name`` is passed on to :func:`split_deleted`. ``memfd`` says whether the file is a
    memfd (the reader compares its device with the shmem one); ``None`` decides from the link
    alone (``/memfd:NAME (deleted)`` with no links left). Raises ``ValueError`` for fdinfo
    text that lacks what its kind must show; lines the parser does not know are ignored."""
    fields, lines = _fields(fdinfo)
    pos = _int(fields, b"pos")
    flags = _int(fields, b"flags", 8)
    mnt_id = _int(fields, b"mnt_id")
    ino = _opt_int(fields, b"ino")
    kind: FileKind
    if (pipe_id := _bracketed(link, b"pipe:[")) is not None:
        kind = Pipe(pipe_id)
    elif (sock_ino := _bracketed(link, b"socket:[")) is not None:
        kind = Socket(sock_ino)
    elif link.startswith(b"anon_inode:"):
        kind = _anon(link[len(b"anon_inode:") :], fields, lines)
    elif link.startswith(b"/"):
        if stat is None:
            raise ValueError(f"fd {fd}: a path-named file ({link!r}) needs its stat")
        raw, deleted = split_deleted(link, real_name=real_name)
        if memfd is None:
            memfd = link.startswith(MEMFD_PREFIX) and deleted and stat.nlink == 0
        if memfd:
            kind = Memfd(
                name=os.fsdecode(raw.removeprefix(MEMFD_PREFIX)),
                size=stat.size,
                mode=stat.mode,
                ino=stat.ino,
                dev=stat.dev,
                uid=stat.uid,
                gid=stat.gid,
            )
        elif stat_.S_ISFIFO(stat.mode):
            kind = Fifo(os.fsdecode(raw), deleted, stat.ino, stat.mode, stat.dev)
        else:
            kind = RegularFile(
                path=os.fsdecode(raw),
                deleted=deleted,
                mode=stat.mode,
                size=stat.size,
                dev=stat.dev,
                ino=stat.ino,
                nlink=stat.nlink,
                rdev=stat.rdev,
            )
    else:
        kind = Other(os.fsdecode(link))
    return Descriptor(
        fd=fd, link=link, pos=pos, flags=flags, mnt_id=mnt_id, ino=ino, stat=stat, kind=kind
    )

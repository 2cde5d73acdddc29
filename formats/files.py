"""``files.img``, ``fdinfo-<files_id>.img`` and ``fs-<pid>.img`` messages (CRIU images/fdinfo.proto,
regfile.proto, fs.proto; criu/files.c).

``files.img`` holds one ``file_entry`` per open file description of the whole dump: ``type`` says
which kind, ``id`` is the number descriptors refer to, and exactly one kind sub-message (``reg``,
``pipe``, ``usk``...) holds its state; :meth:`FileEntry.kind_entry` picks it.  The kinds are in
:mod:`formats.fdkinds` and :mod:`formats.sockets`; kinds not modelled here (packet and netlink
sockets, tty, tun, ns, fanotify, ext, bpf map, pidfd) stay unknown fields and round-trip exactly.
``fdinfo-<files_id>.img`` is a task's descriptor table (fd number -> file id, FD_CLOEXEC), named by
``task_kobj_ids_entry.files_id``; ``fs-<pid>.img`` names cwd and root as files.img ids.
"""

# Message fields are attrs field specifiers made by formats.pb, not mutable defaults:
# ruff: noqa: RUF009

from __future__ import annotations

import attrs

from formats.fdkinds import (
    EventfdFileEntry,
    EventpollFileEntry,
    FifoEntry,
    FownEntry,
    InotifyFileEntry,
    MemfdFileEntry,
    PipeEntry,
    SignalfdEntry,
    TimerfdEntry,
)
from formats.pb import Kind, Message, optional, repeated, required
from formats.sockets import InetSkEntry, UnixSkEntry

__all__ = [
    "FD_CLOEXEC",
    "FD_TYPES",
    "O_APPEND",
    "O_FLAGS",
    "O_LARGEFILE",
    "O_NONBLOCK",
    "O_RDWR",
    "O_WRONLY",
    "FdType",
    "FdinfoEntry",
    "FileEntry",
    "FownEntry",
    "FsEntry",
    "KindEntry",
    "RegFileEntry",
]

U32, U64, BOOL, ENUM, STR, MSG = (
    Kind.UINT32, Kind.UINT64, Kind.BOOL, Kind.ENUM, Kind.STRING, Kind.MESSAGE
)  # fmt: skip

FD_TYPES = {0: "UND", 1: "REG", 2: "PIPE", 3: "FIFO", 4: "INETSK", 5: "UNIXSK", 6: "EVENTFD",
            7: "EVENTPOLL", 8: "INOTIFY", 9: "SIGNALFD", 10: "PACKETSK", 11: "TTY",
            12: "FANOTIFY", 13: "NETLINKSK", 14: "NS", 15: "TUNF", 16: "EXT", 17: "TIMERFD",
            18: "MEMFD", 19: "BPFMAP", 20: "PIDFD", 65534: "CTL_TTY",
            65535: "AUTOFS_PIPE"}  # fmt: skip


class FdType:
    """``enum fd_types`` values of the kinds modelled here."""

    REG = 1
    PIPE = 2
    FIFO = 3
    INETSK = 4
    UNIXSK = 5
    EVENTFD = 6
    EVENTPOLL = 7
    INOTIFY = 8
    SIGNALFD = 9
    TIMERFD = 17
    MEMFD = 18


# Open-file flags (x86-64 / generic asm-generic/fcntl.h), and the only fdinfo flag.
O_WRONLY, O_RDWR = 0o1, 0o2
O_APPEND, O_NONBLOCK, O_LARGEFILE = 0o2000, 0o4000, 0o100000
O_FLAGS = {0o1: "O_WRONLY", 0o2: "O_RDWR", 0o100: "O_CREAT", 0o200: "O_EXCL",
           0o400: "O_NOCTTY", 0o1000: "O_TRUNC", 0o2000: "O_APPEND", 0o4000: "O_NONBLOCK",
           0o10000: "O_DSYNC", 0o20000: "FASYNC", 0o40000: "O_DIRECT", 0o100000: "O_LARGEFILE",
           0o200000: "O_DIRECTORY", 0o400000: "O_NOFOLLOW", 0o1000000: "O_NOATIME",
           0o2000000: "O_CLOEXEC"}  # fmt: skip
FD_CLOEXEC = 1  # fdinfo_entry.flags


@attrs.define(kw_only=True)
class RegFileEntry(Message):
    """reg_file_entry: a regular file (also executables and files behind mappings)."""

    id: int = required(1, U32)
    flags: int = required(2, U32)  # O_* of the open file (O_CLOEXEC is in fdinfo instead)
    pos: int = required(3, U64)
    fown: FownEntry = required(5, MSG, message=FownEntry)
    name: str = required(6, STR)
    mnt_id: int | None = optional(7, Kind.SINT32, default=-1)
    size: int | None = optional(8, U64)
    ext: bool | None = optional(9, BOOL)
    mode: int | None = optional(10, U32)
    build_id: list[int] = repeated(11, U32)
    checksum: int | None = optional(12, U32)
    checksum_config: int | None = optional(13, U32)
    checksum_parameter: int | None = optional(14, U32)


KindEntry = (
    RegFileEntry
    | PipeEntry
    | FifoEntry
    | InetSkEntry
    | UnixSkEntry
    | EventfdFileEntry
    | EventpollFileEntry
    | SignalfdEntry
    | TimerfdEntry
    | InotifyFileEntry
    | MemfdFileEntry
)

# fd type -> (file_entry field holding that kind, its class)
_KIND_FIELDS: dict[int, tuple[str, type[Message]]] = {
    FdType.REG: ("reg", RegFileEntry),
    FdType.PIPE: ("pipe", PipeEntry),
    FdType.FIFO: ("fifo", FifoEntry),
    FdType.INETSK: ("isk", InetSkEntry),
    FdType.UNIXSK: ("usk", UnixSkEntry),
    FdType.EVENTFD: ("efd", EventfdFileEntry),
    FdType.EVENTPOLL: ("epfd", EventpollFileEntry),
    FdType.INOTIFY: ("ify", InotifyFileEntry),
    FdType.SIGNALFD: ("sgfd", SignalfdEntry),
    FdType.TIMERFD: ("tfd", TimerfdEntry),
    FdType.MEMFD: ("memfd", MemfdFileEntry),
}


@attrs.define(kw_only=True)
class FileEntry(Message):
    """file_entry (files.img): one open file description; the field of its ``type`` is set."""

    type: int = required(1, ENUM)  # FD_TYPES
    id: int = required(2, U32)
    reg: RegFileEntry | None = optional(3, MSG, message=RegFileEntry)
    isk: InetSkEntry | None = optional(4, MSG, message=InetSkEntry)
    efd: EventfdFileEntry | None = optional(8, MSG, message=EventfdFileEntry)
    epfd: EventpollFileEntry | None = optional(9, MSG, message=EventpollFileEntry)
    sgfd: SignalfdEntry | None = optional(10, MSG, message=SignalfdEntry)
    tfd: TimerfdEntry | None = optional(12, MSG, message=TimerfdEntry)
    ify: InotifyFileEntry | None = optional(13, MSG, message=InotifyFileEntry)
    usk: UnixSkEntry | None = optional(16, MSG, message=UnixSkEntry)
    fifo: FifoEntry | None = optional(17, MSG, message=FifoEntry)
    pipe: PipeEntry | None = optional(18, MSG, message=PipeEntry)
    memfd: MemfdFileEntry | None = optional(20, MSG, message=MemfdFileEntry)

    @property
    def type_name(self) -> str:
        """The ``fd_types`` name of ``type`` (``"PIPE"``), or the number for unknown ones."""
        return FD_TYPES.get(self.type, str(self.type))

    @property
    def kind_modelled(self) -> bool:
        """Whether ``type`` is one of the kinds modelled here (its field must then be set)."""
        return self.type in _KIND_FIELDS

    def kind_entry(self) -> KindEntry | None:
        """The sub-message of this entry's kind, or None (absent, or a kind not modelled)."""
        found = _KIND_FIELDS.get(self.type)
        if found is None:
            return None
        value: KindEntry | None = getattr(self, found[0])
        return value

    @classmethod
    def of(cls, entry: KindEntry) -> FileEntry:
        """The file_entry wrapping a kind sub-message (``type`` and ``id`` taken from it)."""
        for number, (name, kind_cls) in _KIND_FIELDS.items():
            if type(entry) is kind_cls:
                wrapped = cls(type=number, id=entry.id)
                setattr(wrapped, name, entry)
                return wrapped
        raise TypeError(f"{type(entry).__name__} is not a files.img kind")


@attrs.define(kw_only=True)
class FdinfoEntry(Message):
    """fdinfo_entry: one file descriptor of a task and the file object it refers to."""

    id: int = required(1, U32)  # file_entry.id
    flags: int = required(2, U32)  # FD_CLOEXEC
    type: int = required(3, ENUM)  # FD_TYPES, the same as the file_entry's
    fd: int = required(4, U32)
    xattr_security_selinux: str | None = optional(5, STR)


@attrs.define(kw_only=True)
class FsEntry(Message):
    """fs_entry: cwd and root (file ids) and umask of a task."""

    cwd_id: int = required(1, U32)
    root_id: int = required(2, U32)
    umask: int | None = optional(3, U32)

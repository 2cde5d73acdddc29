"""The non-socket kinds of ``files.img`` entries and the images that go with them (CRIU
images/fown.proto, pipe.proto, fifo.proto, pipe-data.proto, eventfd.proto, eventpoll.proto,
signalfd.proto, timerfd.proto, memfd.proto, fsnotify.proto ``inotify_*``, fh.proto).

Every kind names its file object with ``id`` (the ``file_entry.id`` that ``fdinfo_entry.id``
refers to) and keeps the open flags (``O_*``) and F_SETOWN state (``fown``) of the open file
description.  ``pipes-data.img`` and ``fifo-data.img`` hold one :class:`PipeDataEntry` per pipe
with queued bytes, each followed by those bytes (its ``extra``); ``memfd.img`` holds one
:class:`MemfdInodeEntry` per memfd inode, which :class:`MemfdFileEntry` names by ``inode_id``.
Sockets are in :mod:`formats.sockets`, regular files and ``file_entry`` in :mod:`formats.files`.
"""

# Message fields are attrs field specifiers made by formats.pb, not mutable defaults:
# ruff: noqa: RUF009

from __future__ import annotations

import attrs

from formats.pb import ExtraMessage, Kind, Message, optional, repeated, required
from formats.signals import sigset_to_signals

__all__ = [
    "EPOLLERR",
    "EPOLLET",
    "EPOLLEXCLUSIVE",
    "EPOLLHUP",
    "EPOLLIN",
    "EPOLLONESHOT",
    "EPOLLOUT",
    "EPOLLPRI",
    "EPOLLRDHUP",
    "EPOLLWAKEUP",
    "F_SEAL_FUTURE_WRITE",
    "F_SEAL_GROW",
    "F_SEAL_SEAL",
    "F_SEAL_SHRINK",
    "F_SEAL_WRITE",
    "TFD_TIMER_ABSTIME",
    "EventfdFileEntry",
    "EventpollFileEntry",
    "EventpollTfdEntry",
    "FhEntry",
    "FifoEntry",
    "FownEntry",
    "InotifyFileEntry",
    "InotifyWdEntry",
    "MemfdFileEntry",
    "MemfdInodeEntry",
    "PipeDataEntry",
    "PipeEntry",
    "SignalfdEntry",
    "TimerfdEntry",
]

U32, U64, STR, MSG = Kind.UINT32, Kind.UINT64, Kind.STRING, Kind.MESSAGE

# epoll_event.events bits (uapi/linux/eventpoll.h); the kernel always adds ERR and HUP.
EPOLLIN, EPOLLPRI, EPOLLOUT, EPOLLERR, EPOLLHUP = 0x1, 0x2, 0x4, 0x8, 0x10
EPOLLRDHUP = 0x2000
EPOLLEXCLUSIVE, EPOLLWAKEUP, EPOLLONESHOT, EPOLLET = 1 << 28, 1 << 29, 1 << 30, 1 << 31
# timerfd_settime flags (timerfd_entry.settime_flags) and memfd seals (memfd_inode_entry.seals).
TFD_TIMER_ABSTIME = 0x1
F_SEAL_SEAL, F_SEAL_SHRINK, F_SEAL_GROW, F_SEAL_WRITE = 0x1, 0x2, 0x4, 0x8
F_SEAL_FUTURE_WRITE = 0x10


@attrs.define(kw_only=True)
class FownEntry(Message):
    """fown_entry: F_SETOWN state of an open file."""

    uid: int = required(1, U32)
    euid: int = required(2, U32)
    signum: int = required(3, U32)  # F_SETSIG
    pid_type: int = required(4, U32)  # PIDTYPE_*
    pid: int = required(5, U32)


@attrs.define(kw_only=True)
class PipeEntry(Message):
    """pipe_entry (file_entry.pipe): one end of a pipe; both ends share ``pipe_id`` (the inode)."""

    id: int = required(1, U32)
    pipe_id: int = required(2, U32)
    flags: int = required(3, U32)  # O_WRONLY for the write end, O_NONBLOCK...
    fown: FownEntry = required(4, MSG, message=FownEntry)


@attrs.define(kw_only=True)
class FifoEntry(Message):
    """fifo_entry (file_entry.fifo): a named pipe; ``regf_id`` is the REG entry of its path."""

    id: int = required(1, U32)
    pipe_id: int = required(2, U32)
    regf_id: int | None = optional(3, U32)


@attrs.define(kw_only=True)
class PipeDataEntry(ExtraMessage):
    """pipe_data_entry (pipes-data.img, fifo-data.img): a pipe's queued bytes, which follow the
    entry in the image (``extra``, ``bytes`` long), and the pipe's buffer size (F_GETPIPE_SZ)."""

    EXTRA_LENGTH = "bytes"

    pipe_id: int = required(1, U32)
    bytes: int = required(2, U32)
    size: int | None = optional(3, U32)


@attrs.define(kw_only=True)
class EventfdFileEntry(Message):
    """eventfd_file_entry (file_entry.efd): an eventfd and its counter."""

    id: int = required(1, U32)
    flags: int = required(2, U32)
    fown: FownEntry = required(3, MSG, message=FownEntry)
    counter: int = required(4, U64)


@attrs.define(kw_only=True)
class EventpollTfdEntry(Message):
    """eventpoll_tfd_entry: one watched descriptor of an epoll set, as EPOLL_CTL_ADD took it."""

    id: int = required(1, U32)  # 0 in file_entry.epfd.tfd; the epoll file id in legacy images
    tfd: int = required(2, U32)  # the target's fd number in the owning task
    events: int = required(3, U32)  # EPOLL* bits
    data: int = required(4, U64)  # epoll_event.data
    dev: int | None = optional(5, U32)  # the target file's device, inode and position,
    inode: int | None = optional(6, U64)  # to find it when the fd was dup'ed or closed
    pos: int | None = optional(7, U64)


@attrs.define(kw_only=True)
class EventpollFileEntry(Message):
    """eventpoll_file_entry (file_entry.epfd): an epoll instance and its watched descriptors."""

    id: int = required(1, U32)
    flags: int = required(2, U32)
    fown: FownEntry = required(3, MSG, message=FownEntry)
    tfd: list[EventpollTfdEntry] = repeated(4, MSG, message=EventpollTfdEntry)


@attrs.define(kw_only=True)
class SignalfdEntry(Message):
    """signalfd_entry (file_entry.sgfd): a signalfd and the signals it accepts."""

    id: int = required(1, U32)
    flags: int = required(2, U32)
    fown: FownEntry = required(3, MSG, message=FownEntry)
    sigmask: int = required(4, U64)  # sigset: signal N in bit N-1

    def signals(self) -> frozenset[int]:
        """The signal numbers in ``sigmask``."""
        return sigset_to_signals(self.sigmask)


@attrs.define(kw_only=True)
class TimerfdEntry(Message):
    """timerfd_entry (file_entry.tfd): a timerfd, its clock, time left and interval."""

    id: int = required(1, U32)
    flags: int = required(2, U32)
    fown: FownEntry = required(3, MSG, message=FownEntry)
    clockid: int = required(4, U32)  # CLOCK_REALTIME 0, CLOCK_MONOTONIC 1, ...
    ticks: int = required(5, U64)  # expirations not yet read
    settime_flags: int = required(6, U32)  # TFD_TIMER_ABSTIME
    vsec: int = required(7, U64)  # it_value: time left at dump time
    vnsec: int = required(8, U64)
    isec: int = required(9, U64)  # it_interval
    insec: int = required(10, U64)


@attrs.define(kw_only=True)
class MemfdFileEntry(Message):
    """memfd_file_entry (file_entry.memfd): an open memfd; its inode is in memfd.img."""

    id: int = required(1, U32)
    flags: int = required(2, U32)
    pos: int = required(3, U64)
    fown: FownEntry = required(4, MSG, message=FownEntry)
    inode_id: int = required(5, U32)  # memfd_inode_entry.inode_id


@attrs.define(kw_only=True)
class MemfdInodeEntry(Message):
    """memfd_inode_entry (memfd.img): a memfd inode; its pages are in pagemap-shmem-<shmid>."""

    name: str = required(1, STR)  # "memfd:NAME" as /proc shows it
    uid: int = required(2, U32)
    gid: int = required(3, U32)
    size: int = required(4, U64)
    shmid: int = required(5, U32)
    seals: int = required(6, U32)  # F_SEAL_* bits
    inode_id: int = required(7, U64)
    hugetlb_flag: int | None = optional(8, U32)
    mode: int | None = optional(9, U32)


@attrs.define(kw_only=True)
class FhEntry(Message):
    """fh_entry: a file handle (name_to_handle_at) of a watched inode."""

    bytes: int = required(1, U32)  # handle_bytes
    type: int = required(2, U32)  # handle_type
    handle: list[int] = repeated(3, U64)  # f_handle as u64 words (at least 16 written)
    path: str | None = optional(4, STR)
    mnt_id: int | None = optional(5, U32)


@attrs.define(kw_only=True)
class InotifyWdEntry(Message):
    """inotify_wd_entry: one watch of an inotify instance."""

    id: int = required(1, U32)
    i_ino: int = required(2, U64)
    mask: int = required(3, U32)  # IN_* bits
    ignored_mask: int = required(4, U32)
    s_dev: int = required(5, U32)  # kernel dev_t: major << 20 | minor
    wd: int = required(6, U32)
    f_handle: FhEntry = required(7, MSG, message=FhEntry)


@attrs.define(kw_only=True)
class InotifyFileEntry(Message):
    """inotify_file_entry (file_entry.ify): an inotify instance and its watches."""

    id: int = required(1, U32)
    flags: int = required(2, U32)
    fown: FownEntry = required(4, MSG, message=FownEntry)
    wd: list[InotifyWdEntry] = repeated(5, MSG, message=InotifyWdEntry)

"""``files.img``, ``fdinfo-<id>.img`` and ``fs-<pid>.img`` messages (CRIU images/fdinfo.proto,
regfile.proto, fown.proto, fs.proto).  Only regular files are modelled; every other file kind
(pipes, sockets, ...) stays an unknown field and round-trips byte for byte."""

# Message fields are attrs field specifiers made by formats.pb, not mutable defaults:
# ruff: noqa: RUF009

from __future__ import annotations

import attrs

from formats.pb import Kind, Message, optional, repeated, required

__all__ = ["FD_TYPES", "FdinfoEntry", "FileEntry", "FownEntry", "FsEntry", "RegFileEntry"]

U32, U64, BOOL, ENUM, STR = Kind.UINT32, Kind.UINT64, Kind.BOOL, Kind.ENUM, Kind.STRING

FD_TYPES = {0: "UND", 1: "REG", 2: "PIPE", 3: "FIFO", 4: "INETSK", 5: "UNIXSK", 6: "EVENTFD",
            7: "EVENTPOLL", 8: "INOTIFY", 9: "SIGNALFD", 10: "PACKETSK", 11: "TTY",
            12: "FANOTIFY", 13: "NETLINKSK", 14: "NS", 15: "TUNF", 16: "EXT", 17: "TIMERFD",
            18: "MEMFD", 19: "BPFMAP", 65534: "CTL_TTY", 65535: "AUTOFS_PIPE"}  # fmt: skip


@attrs.define(kw_only=True)
class FownEntry(Message):
    """fown_entry: F_SETOWN state of an open file."""

    uid: int = required(1, U32)
    euid: int = required(2, U32)
    signum: int = required(3, U32)
    pid_type: int = required(4, U32)
    pid: int = required(5, U32)


@attrs.define(kw_only=True)
class RegFileEntry(Message):
    """reg_file_entry: a regular file (also executables and files behind mappings)."""

    id: int = required(1, U32)
    flags: int = required(2, U32)
    pos: int = required(3, U64)
    fown: FownEntry = required(5, Kind.MESSAGE, message=FownEntry)
    name: str = required(6, STR)
    mnt_id: int | None = optional(7, Kind.SINT32, default=-1)
    size: int | None = optional(8, U64)
    ext: bool | None = optional(9, BOOL)
    mode: int | None = optional(10, U32)
    build_id: list[int] = repeated(11, U32)
    checksum: int | None = optional(12, U32)
    checksum_config: int | None = optional(13, U32)
    checksum_parameter: int | None = optional(14, U32)


@attrs.define(kw_only=True)
class FileEntry(Message):
    """file_entry (files.img): one open-file object; ``reg`` for regular files."""

    type: int = required(1, ENUM)
    id: int = required(2, U32)
    reg: RegFileEntry | None = optional(3, Kind.MESSAGE, message=RegFileEntry)


@attrs.define(kw_only=True)
class FdinfoEntry(Message):
    """fdinfo_entry: one file descriptor of a task and the file object it refers to."""

    id: int = required(1, U32)
    flags: int = required(2, U32)
    type: int = required(3, ENUM)
    fd: int = required(4, U32)
    xattr_security_selinux: str | None = optional(5, STR)


@attrs.define(kw_only=True)
class FsEntry(Message):
    """fs_entry: cwd and root (file ids) and umask of a task."""

    cwd_id: int = required(1, U32)
    root_id: int = required(2, U32)
    umask: int | None = optional(3, U32)

"""Framing of one CRIU image file: magics, length-prefixed entries (criu/image.c, pycriu images.py).

Layout: ``[HEAD_MAGIC] TYPE_MAGIC (LEN:u32le PAYLOAD[LEN] [EXTRA])*``.  The head magic (common or
service) is absent from ``inventory.img`` and from every file of img_version 1 dumps; the *peek
rule* (read one u32; if it is a head magic, the type magic follows) handles all layouts.  Pagemap
files hold a ``pagemap_head`` then ``pagemap_entry`` messages; every other image holds one message
type.  Images whose messages are :class:`~formats.pb.ExtraMessage` (pipes-data, fifo-data) carry
after each entry the raw bytes its length field announces (magic values: criu/include/magic.h).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
from construct import Const, GreedyBytes, Int32ul, Prefixed

from formats import core, fdkinds, files, inventory, mm, opaque, pagemap_msgs, signals, sockets
from formats.errors import ImageError
from formats.pb import ExtraMessage, Message, build, parse

__all__ = [
    "IMG_COMMON_MAGIC",
    "IMG_SERVICE_MAGIC",
    "MAGICS",
    "ImageKind",
    "dump_image",
    "frame_entries",
    "frame_offsets",
    "load_image",
    "load_image_located",
    "parse_header",
    "parse_image",
    "parse_image_located",
]

IMG_COMMON_MAGIC = 0x54564319
IMG_SERVICE_MAGIC = 0x55105940
_U32 = struct.Struct("<I")
_HEAD = {IMG_COMMON_MAGIC: "common", IMG_SERVICE_MAGIC: "service"}


@attrs.frozen
class ImageKind:
    """One image type: its magic, the head magic it is written with, its message classes."""

    name: str
    magic: int
    head: int | None  # IMG_COMMON_MAGIC, IMG_SERVICE_MAGIC, or None (inventory)
    entry: type[Message]
    first: type[Message] | None = None  # class of entry 0 when it differs (pagemap head)

    def entry_class(self, index: int) -> type[Message]:
        """Message class of entry ``index``."""
        return self.first if index == 0 and self.first is not None else self.entry


_KINDS = [
    ImageKind("INVENTORY", 0x58313116, None, inventory.InventoryEntry),
    ImageKind("PSTREE", 0x50273030, IMG_COMMON_MAGIC, inventory.PstreeEntry),
    ImageKind("IDS", 0x54432030, IMG_COMMON_MAGIC, inventory.TaskKobjIdsEntry),
    ImageKind("CORE", 0x55053847, IMG_COMMON_MAGIC, core.CoreEntry),
    ImageKind("MM", 0x57492820, IMG_COMMON_MAGIC, mm.MmEntry),
    ImageKind("VMAS", 0x54123737, IMG_COMMON_MAGIC, mm.VmaEntry),
    ImageKind(
        "PAGEMAP",
        0x56084025,
        IMG_COMMON_MAGIC,
        pagemap_msgs.PagemapEntry,
        pagemap_msgs.PagemapHead,
    ),
    ImageKind("FS", 0x51403912, IMG_COMMON_MAGIC, files.FsEntry),
    ImageKind("FDINFO", 0x56213732, IMG_COMMON_MAGIC, files.FdinfoEntry),
    ImageKind("FILES", 0x56303138, IMG_COMMON_MAGIC, files.FileEntry),
    ImageKind("PIPES_DATA", 0x56453709, IMG_COMMON_MAGIC, fdkinds.PipeDataEntry),
    ImageKind("FIFO_DATA", 0x59333054, IMG_COMMON_MAGIC, fdkinds.PipeDataEntry),
    ImageKind("MEMFD_INODE", 0x48453499, IMG_COMMON_MAGIC, fdkinds.MemfdInodeEntry),
    # Per-kind images that dumps before files.img (CRIU 3.4) held: read, not written by 4.2.
    ImageKind("REG_FILES", 0x50363636, IMG_COMMON_MAGIC, files.RegFileEntry),
    ImageKind("PIPES", 0x56513555, IMG_COMMON_MAGIC, fdkinds.PipeEntry),
    ImageKind("FIFO", 0x58364939, IMG_COMMON_MAGIC, fdkinds.FifoEntry),
    ImageKind("UNIXSK", 0x54373943, IMG_COMMON_MAGIC, sockets.UnixSkEntry),
    ImageKind("INETSK", 0x56443851, IMG_COMMON_MAGIC, sockets.InetSkEntry),
    ImageKind("EVENTFD_FILE", 0x44523722, IMG_COMMON_MAGIC, fdkinds.EventfdFileEntry),
    ImageKind("EVENTPOLL_FILE", 0x45023858, IMG_COMMON_MAGIC, fdkinds.EventpollFileEntry),
    ImageKind("EVENTPOLL_TFD", 0x44433746, IMG_COMMON_MAGIC, fdkinds.EventpollTfdEntry),
    ImageKind("SIGNALFD", 0x57323820, IMG_COMMON_MAGIC, fdkinds.SignalfdEntry),
    ImageKind("TIMERFD", 0x50493712, IMG_COMMON_MAGIC, fdkinds.TimerfdEntry),
    ImageKind("INOTIFY_FILE", 0x48424431, IMG_COMMON_MAGIC, fdkinds.InotifyFileEntry),
    ImageKind("INOTIFY_WD", 0x54562009, IMG_COMMON_MAGIC, fdkinds.InotifyWdEntry),
    # Legacy per-task signal and timer images, before they moved into core-<tid>.img.
    ImageKind("SIGACT", 0x55344201, IMG_COMMON_MAGIC, core.SaEntry),
    ImageKind("ITIMERS", 0x57464056, IMG_COMMON_MAGIC, signals.ItimerEntry),
    ImageKind("POSIX_TIMERS", 0x52603957, IMG_COMMON_MAGIC, signals.PosixTimerEntry),
    ImageKind("STATS", 0x57093306, IMG_SERVICE_MAGIC, opaque.StatsEntry),
    ImageKind("SECCOMP", 0x64413049, IMG_COMMON_MAGIC, opaque.SeccompEntry),
    ImageKind("TIMENS", 0x43114433, IMG_COMMON_MAGIC, opaque.TimensEntry),
]
MAGICS: dict[str, ImageKind] = {k.name: k for k in _KINDS}
_BY_VALUE: dict[int, ImageKind] = {k.magic: k for k in _KINDS}


def _swapped(value: int) -> int:
    return int.from_bytes(value.to_bytes(4, "little"), "big")


def _magic_error(path: str, value: int, offset: int) -> ImageError:
    known = {**_HEAD, **{k.magic: k.name for k in _KINDS}}
    swapped = known.get(_swapped(value))
    if swapped is not None:
        why = f"byte-swapped magic 0x{value:08x} ({swapped} in big-endian order; not supported)"
    else:
        why = f"unknown magic 0x{value:08x}"
    return ImageError(path, why, offset=offset)


def parse_header(data: bytes, path: str | os.PathLike[str]) -> tuple[ImageKind, int]:
    """Apply the peek rule: (image kind, offset of the first entry)."""
    where = os.fspath(path)
    if len(data) < 4:
        raise ImageError(where, f"file of {len(data)} bytes has no magic", offset=0)
    (first,) = _U32.unpack_from(data, 0)
    pos = 4
    if first in _HEAD:
        if len(data) < 8:
            raise ImageError(where, "truncated: type magic missing after head magic", offset=4)
        (value,) = _U32.unpack_from(data, 4)
        pos = 8
    else:
        value = first
    kind = _BY_VALUE.get(value)
    if kind is None:
        raise _magic_error(where, value, pos - 4)
    if first in _HEAD and kind.head is not None and first != kind.head:
        raise ImageError(
            where, f"{kind.name} image carries the {_HEAD[first]} head magic", offset=0
        )
    return kind, pos


def _cut_length(path: str | os.PathLike[str], size: int, pos: int, index: int) -> ImageError:
    return ImageError(
        path, f"{size - pos} trailing bytes: truncated entry length or garbage", offset=pos,
        entry=index,
    )  # fmt: skip


def _overrun(
    path: str | os.PathLike[str], size: int, pos: int, length: int, index: int
) -> ImageError:
    return ImageError(
        path,
        f"entry length {length} runs past the end of the file ({size - pos - 4} bytes left)",
        offset=pos,
        entry=index,
    )


def frame_offsets(data: bytes, pos: int, path: str | os.PathLike[str]) -> list[int]:
    """Offsets of every entry's length field from ``pos`` to EOF; rejects a cut length field
    and a length that runs past the end of the file.  (Hot loop of big pagemaps: the checks
    are made once, after it.)"""
    out: list[int] = []
    append = out.append
    unpack = _U32.unpack_from
    size = len(data)
    try:
        while pos < size:
            append(pos)
            pos += 4 + unpack(data, pos)[0]
    except struct.error:
        raise _cut_length(path, size, out[-1], len(out) - 1) from None
    if pos > size:
        last = out[-1]
        raise _overrun(path, size, last, pos - last - 4, len(out) - 1)
    return out


def frame_entries(data: bytes, pos: int, path: str | os.PathLike[str]) -> list[tuple[int, int]]:
    """(payload offset, payload length) of each entry from ``pos`` to EOF."""
    offsets = frame_offsets(data, pos, path)
    ends = [*offsets[1:], len(data)] if offsets else []
    return [(off + 4, end - off - 4) for off, end in zip(offsets, ends, strict=True)]


def _frame_with_extra(
    data: bytes, pos: int, path: str | os.PathLike[str], cls: type[ExtraMessage]
) -> tuple[list[Any], list[int]]:
    """Entries of an image whose entries are followed by extra bytes: each entry is decoded to
    learn where the next one starts."""
    entries: list[Any] = []
    offsets: list[int] = []
    size = len(data)
    while pos < size:
        index = len(entries)
        if pos + 4 > size:
            raise _cut_length(path, size, pos, index)
        (length,) = _U32.unpack_from(data, pos)
        start = pos + 4
        if start + length > size:
            raise _overrun(path, size, pos, length, index)
        entry = parse(cls, data[start : start + length], path=path, offset=start, entry=index)
        at = start + length
        want = entry.extra_length()
        if at + want > size:
            raise ImageError(
                path,
                f"extra payload of {want} bytes ({type(entry).__name__}.{entry.EXTRA_LENGTH}) "
                f"runs past the end of the file ({size - at} bytes left)",
                offset=at,
                entry=index,
            )
        entry.extra = data[at : at + want]
        entries.append(entry)
        offsets.append(pos)
        pos = at + want
    return entries, offsets


def parse_image_located(
    data: bytes, path: str | os.PathLike[str]
) -> tuple[str, list[Any], list[int]]:
    """Decode a whole image held in memory: (magic name, entries, byte offset of each entry's
    length field), so that later checks can say where an entry is."""
    kind, pos = parse_header(data, path)
    if issubclass(kind.entry, ExtraMessage):  # (such kinds have no different first entry)
        entries, offsets = _frame_with_extra(data, pos, path, kind.entry)
        return kind.name, entries, offsets
    entries = []
    offsets = []
    for index, (start, length) in enumerate(frame_entries(data, pos, path)):
        cls = kind.entry_class(index)
        payload = data[start : start + length]
        entries.append(parse(cls, payload, path=path, offset=start, entry=index))
        offsets.append(start - 4)
    return kind.name, entries, offsets


def parse_image(data: bytes, path: str | os.PathLike[str]) -> tuple[str, list[Any]]:
    """Decode a whole image held in memory: (magic name, entries)."""
    name, entries, _ = parse_image_located(data, path)
    return name, entries


def read_bytes(path: str | os.PathLike[str]) -> bytes:
    """Read a file, turning OS errors into ImageError."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ImageError(path, f"cannot read: {exc.strerror or exc}") from exc


def load_image(path: str | os.PathLike[str]) -> tuple[str, list[Any]]:
    """Read and decode one image file: (magic name, list of messages)."""
    return parse_image(read_bytes(path), path)


def load_image_located(path: str | os.PathLike[str]) -> tuple[str, list[Any], list[int]]:
    """Read and decode one image file: (magic name, messages, offset of each entry)."""
    return parse_image_located(read_bytes(path), path)


_Entry = Prefixed(Int32ul, GreedyBytes)


def build_image(magic_name: str, entries: Sequence[Message], *, head: bool = True) -> bytes:
    """Encode an image: head magic (unless ``head`` is False, i.e. img_version 1), type magic,
    length-prefixed entries, each followed by its ``extra`` bytes for ExtraMessage kinds."""
    kind = MAGICS.get(magic_name)
    if kind is None:
        raise ValueError(f"unknown image kind {magic_name!r}")
    parts: list[bytes] = []
    if kind.head is not None and head:
        parts.append(Const(kind.head, Int32ul).build(None))
    parts.append(Int32ul.build(kind.magic))
    for index, entry in enumerate(entries):
        cls = kind.entry_class(index)
        if not isinstance(entry, cls):
            raise TypeError(f"{magic_name} entry {index} must be {cls.__name__}")
        payload = build(entry)
        parts.append(len(payload).to_bytes(4, "little"))  # what _Entry (construct) builds
        parts.append(payload)
        if isinstance(entry, ExtraMessage):
            if len(entry.extra) != entry.extra_length():
                raise ValueError(
                    f"{magic_name} entry {index}: {len(entry.extra)} extra bytes but "
                    f"{entry.EXTRA_LENGTH} = {entry.extra_length()}"
                )
            parts.append(entry.extra)
    return b"".join(parts)


def dump_image(path: str | os.PathLike[str], magic_name: str, entries: Sequence[Message]) -> None:
    """Write one image file (common/service head magic as CRIU 1.6+ does)."""
    Path(path).write_bytes(build_image(magic_name, entries))

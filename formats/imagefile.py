"""Framing of one CRIU image file: magics, length-prefixed entries (criu/image.c, pycriu images.py).

Layout: ``[HEAD_MAGIC] TYPE_MAGIC (LEN:u32le PAYLOAD[LEN])*``.  The head magic (common or service)
is absent from ``inventory.img`` and from every file of img_version 1 dumps; the *peek rule*
(read one u32; if it is a head magic, the type magic follows) handles all layouts.  Pagemap files
hold a ``pagemap_head`` then ``pagemap_entry`` messages; every other image holds one message type.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
from construct import Const, GreedyBytes, Int32ul, Prefixed

from formats import core, files, inventory, mm, opaque, pagemap_msgs
from formats.errors import ImageError
from formats.pb import Message, build, parse

__all__ = [
    "IMG_COMMON_MAGIC",
    "IMG_SERVICE_MAGIC",
    "MAGICS",
    "ImageKind",
    "dump_image",
    "frame_entries",
    "frame_offsets",
    "load_image",
    "parse_header",
    "parse_image",
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
        raise ImageError(
            path,
            f"{size - out[-1]} trailing bytes: truncated entry length or garbage",
            offset=out[-1],
            entry=len(out) - 1,
        ) from None
    if pos > size:
        last = out[-1]
        raise ImageError(
            path,
            f"entry length {pos - last - 4} runs past the end of the file "
            f"({size - last - 4} bytes left)",
            offset=last,
            entry=len(out) - 1,
        )
    return out


def frame_entries(data: bytes, pos: int, path: str | os.PathLike[str]) -> list[tuple[int, int]]:
    """(payload offset, payload length) of each entry from ``pos`` to EOF."""
    offsets = frame_offsets(data, pos, path)
    ends = [*offsets[1:], len(data)] if offsets else []
    return [(off + 4, end - off - 4) for off, end in zip(offsets, ends, strict=True)]


def parse_image(data: bytes, path: str | os.PathLike[str]) -> tuple[str, list[Any]]:
    """Decode a whole image held in memory: (magic name, entries)."""
    kind, pos = parse_header(data, path)
    entries: list[Any] = []
    for index, (start, length) in enumerate(frame_entries(data, pos, path)):
        cls = kind.entry_class(index)
        payload = data[start : start + length]
        entries.append(parse(cls, payload, path=path, offset=start, entry=index))
    return kind.name, entries


def read_bytes(path: str | os.PathLike[str]) -> bytes:
    """Read a file, turning OS errors into ImageError."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ImageError(path, f"cannot read: {exc.strerror or exc}") from exc


def load_image(path: str | os.PathLike[str]) -> tuple[str, list[Any]]:
    """Read and decode one image file: (magic name, list of messages)."""
    return parse_image(read_bytes(path), path)


_Entry = Prefixed(Int32ul, GreedyBytes)


def build_image(magic_name: str, entries: Sequence[Message], *, head: bool = True) -> bytes:
    """Encode an image: head magic (unless ``head`` is False, i.e. img_version 1), type magic,
    length-prefixed entries."""
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
        parts.append(_Entry.build(build(entry)))
    return b"".join(parts)


def dump_image(path: str | os.PathLike[str], magic_name: str, entries: Sequence[Message]) -> None:
    """Write one image file (common/service head magic as CRIU 1.6+ does)."""
    Path(path).write_bytes(build_image(magic_name, entries))

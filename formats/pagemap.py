"""Pagemap semantics, in one place (format doc section 5; criu/pagemap.c, criu/mem.c).

* decoding ``pagemap-*.img`` into column arrays, with a vectorised numpy fast path for the
  all-varint ``pagemap_entry`` and the generic :mod:`formats.pb` reader as fallback (unknown
  fields, odd encodings, and every error message come from the generic reader);
* normalisation: legacy ``in_parent`` and missing ``flags`` (section 5.2), the CRIU 4.2 page
  count in field 5 with field 2 as the pre-4.2 count (section 5.3);
* validation: counts, flag bits, alignment, overflow, ordering, pages-file size, VMAs;
* the byte offset of every ``PE_PRESENT`` run in the pages file (section 5.1);
* resolving ``PE_PARENT`` holes through a chain of parent pagemaps (section 5.4).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import attrs
import numpy as np
from numpy.typing import NDArray

from formats import names
from formats.errors import ImageError
from formats.imagefile import frame_offsets, parse_header, read_bytes
from formats.mm import VmaEntry
from formats.pagemap_msgs import PE_LAZY, PE_PARENT, PE_PRESENT, PagemapEntry, PagemapHead
from formats.pages import PagesFile
from formats.pb import parse, varint_bytes

__all__ = [
    "PE_LAZY",
    "PE_PARENT",
    "PE_PRESENT",
    "PageRun",
    "Pagemap",
    "check_pages_size",
    "check_within_vmas",
    "load_pagemap",
    "make_entries",
    "parse_pagemap",
    "resolve_runs",
]

U64 = NDArray[np.uint64]
_KNOWN_FLAGS = PE_PARENT | PE_LAZY | PE_PRESENT
_MAX_COUNT = (1 << 32) - 1  # field 2 is uint32: longer runs are split when writing
_FIELDS = (1, 2, 3, 4, 5)  # vaddr, compat_nr_pages, in_parent, flags, nr_pages


@attrs.frozen
class PageRun:
    """``nr_pages`` pages at ``vaddr`` whose bytes are ``pages.view(offset, nr_pages * PAGE)``."""

    vaddr: int
    nr_pages: int
    lazy: bool
    pages: PagesFile
    offset: int

    def view(self, page_size: int) -> memoryview:
        """The run's bytes (a zero-copy view of the pages file)."""
        return self.pages.view(self.offset, self.nr_pages * page_size)


@attrs.define(eq=False)
class Pagemap:
    """One decoded, normalised and validated pagemap; arrays are indexed by entry - 1."""

    path: Path
    pages_id: int
    page_size: int
    vaddr: U64
    nr_pages: U64
    flags: NDArray[np.uint32]
    offset: U64  # byte offset of the run in the pages file (advances only on PE_PRESENT)
    entry_pos: NDArray[np.int64]  # file offset of each entry's length field, for errors
    pages: PagesFile | None = None

    def __len__(self) -> int:
        return len(self.vaddr)

    @property
    def end(self) -> U64:
        """Exclusive end address of every run."""
        return self.vaddr + self.nr_pages * np.uint64(self.page_size)

    @property
    def pages_path(self) -> Path:
        """``pages-<pages_id>.img`` next to the pagemap."""
        return self.path.parent / names.pages(self.pages_id)

    def present_bytes(self) -> int:
        """Bytes of page data the PE_PRESENT runs need in the pages file."""
        mask = (self.flags & PE_PRESENT) != 0
        return int(self.nr_pages[mask].sum()) * self.page_size

    def error(self, index: int, message: str) -> ImageError:
        """ImageError for run ``index`` (file entry ``index + 1``; entry 0 is the head)."""
        return ImageError(self.path, message, offset=int(self.entry_pos[index]), entry=index + 1)


# --------------------------------------------------------------------------------------------
# decoding


_Columns = dict[int, tuple[U64, NDArray[np.bool_]]]


def _fast_columns(
    data: bytes, starts: NDArray[np.int64], lens: NDArray[np.int64]
) -> _Columns | None:
    """Decode all entries at once when every field is a known varint field 1..5 appearing at
    most once per entry; None means "use the generic reader" (it also produces the errors)."""
    n = len(starts)
    if n == 0:
        empty = np.zeros(0, np.uint64), np.zeros(0, np.bool_)
        return dict.fromkeys(_FIELDS, empty)
    if (lens == 0).any():
        return None
    total = int(lens.sum())
    ends = np.cumsum(lens)
    ent_of_byte = np.repeat(np.arange(n), lens)
    pos = np.arange(total, dtype=np.int64) + np.repeat(starts - (ends - lens), lens)
    b = np.frombuffer(data, dtype=np.uint8)[pos]
    cont = (b & 0x80) != 0
    if cont[ends - 1].any():
        return None  # a varint runs past the end of its entry
    is_start = np.empty(total, np.bool_)
    is_start[0] = True
    is_start[1:] = ~cont[:-1]
    vstarts = np.flatnonzero(is_start)
    vid = np.cumsum(is_start) - 1
    k = np.arange(total) - vstarts[vid]
    if k.max() > 9 or ((k == 9) & ((b & 0x7F) > 1)).any():
        return None  # over-long varint
    contrib = (b & 0x7F).astype(np.uint64) << (k.astype(np.uint64) * np.uint64(7))
    values = np.bitwise_or.reduceat(contrib, vstarts)
    vent = ent_of_byte[vstarts]
    counts = np.bincount(vent, minlength=n)
    if (counts % 2).any():
        return None
    first = np.cumsum(counts) - counts
    is_key = ((np.arange(len(vstarts)) - first[vent]) % 2) == 0
    keys, vals, kent = values[is_key], values[~is_key], vent[is_key]
    if ((keys & np.uint64(7)) != 0).any():
        return None
    fnum = keys >> np.uint64(3)
    cols: _Columns = {}
    seen = 0
    for f in _FIELDS:
        m = fnum == f
        e = kent[m]
        seen += len(e)
        if len(e) and np.bincount(e, minlength=n).max() > 1:
            return None  # repeated scalar: last-wins handled by the generic reader
        present = np.zeros(n, np.bool_)
        present[e] = True
        col = np.zeros(n, np.uint64)
        col[e] = vals[m]
        if f in (2, 4):
            col &= np.uint64(0xFFFFFFFF)  # uint32 fields: protobuf keeps the low 32 bits
        cols[f] = (col, present)
    if seen != len(keys):
        return None  # unknown fields: keep them, generically
    return cols


def _slow_columns(data: bytes, frames: Sequence[tuple[int, int]], path: Path) -> _Columns:
    n = len(frames)
    cols = {f: (np.zeros(n, np.uint64), np.zeros(n, np.bool_)) for f in _FIELDS}
    for i, (start, length) in enumerate(frames):
        e = parse(PagemapEntry, data[start : start + length], path=path, offset=start, entry=i + 1)
        for f, value in ((1, e.vaddr), (2, e.compat_nr_pages), (3, e.in_parent),
                         (4, e.flags), (5, e.nr_pages)):  # fmt: skip
            if value is not None:
                cols[f][0][i] = int(value)
                cols[f][1][i] = True
    return cols


def _first(mask: NDArray[np.bool_]) -> int | None:
    hits = np.flatnonzero(mask)
    return int(hits[0]) if len(hits) else None


def _normalise(pm_path: Path, cols: _Columns, entry_pos: NDArray[np.int64], page_size: int,
               pages_id: int) -> Pagemap:  # fmt: skip
    """Apply sections 5.2/5.3 and validate; the one place that gives entries their meaning."""
    vaddr, _ = cols[1]
    f2, _ = cols[2]
    f3, has3 = cols[3]
    f4, has4 = cols[4]
    f5, has5 = cols[5]
    flags = np.where(has4, f4, np.uint64(PE_PRESENT))
    parent = has3 & (f3 != 0)
    flags = np.where(parent, np.where(has4, f4, np.uint64(0)) | np.uint64(PE_PARENT), flags)
    nr = np.where(has5, f5, f2)
    pm = Pagemap(pm_path, pages_id, page_size, vaddr, nr, flags.astype(np.uint32),
                 np.zeros(len(vaddr), np.uint64), entry_pos)  # fmt: skip
    ps = np.uint64(page_size)
    checks: list[tuple[NDArray[np.bool_], Callable[[int], str]]] = [
        (~has5 & (f2 == 0), lambda i: "compat_nr_pages (field 2) is 0 and nr_pages (field 5) "
         "is absent: corrupt entry (or a CRIU 4.2 entry stripped of field 5)"),
        (nr == 0, lambda i: "zero-length run (nr_pages = 0)"),
        ((flags & ~np.uint64(_KNOWN_FLAGS)) != 0,
         lambda i: f"unknown flag bits 0x{int(flags[i]):x}"),
        ((flags & (PE_LAZY | PE_PRESENT)) == PE_LAZY,
         lambda i: "PE_LAZY without PE_PRESENT: pages were left for a lazy-pages server, "
         "not stored in the image"),
        ((flags & (PE_PARENT | PE_PRESENT)) == (PE_PARENT | PE_PRESENT),
         lambda i: "both PE_PARENT and PE_PRESENT set"),
        (flags == 0, lambda i: "flags 0: neither PE_PRESENT nor PE_PARENT"),
        ((vaddr % ps) != 0, lambda i: f"vaddr 0x{int(vaddr[i]):x} is not page aligned"),
        (nr > (np.uint64(2**64 - 1) - vaddr) // ps,
         lambda i: f"run at 0x{int(vaddr[i]):x} of {int(nr[i])} pages overflows the address space"),
    ]  # fmt: skip
    for mask, message in checks:
        bad = _first(mask)
        if bad is not None:
            raise pm.error(bad, message(bad))
    end = pm.end
    if len(vaddr) > 1:
        bad = _first(vaddr[1:] < end[:-1])
        if bad is not None:
            i = bad + 1
            what = "unsorted" if vaddr[i] < vaddr[i - 1] else "overlapping"
            raise pm.error(
                i,
                f"{what} entries: 0x{int(vaddr[i]):x} starts before the previous run ends "
                f"at 0x{int(end[i - 1]):x}",
            )
    sizes = np.where((flags & PE_PRESENT) != 0, nr * ps, np.uint64(0))
    cum = np.cumsum(sizes, dtype=np.uint64)
    if len(cum) > 1 and (cum[1:] < cum[:-1]).any():
        raise pm.error(_first(cum[1:] < cum[:-1]) or 0, "total page data overflows 64 bits")
    pm.offset = cum - sizes
    return pm


def parse_pagemap(data: bytes, path: str | os.PathLike[str], page_size: int) -> Pagemap:
    """Decode, normalise and validate a pagemap image held in memory."""
    pm_path = Path(path)
    kind, pos = parse_header(data, pm_path)
    if kind.name != "PAGEMAP":
        raise ImageError(pm_path, f"expected a PAGEMAP image, found {kind.name}", offset=0)
    offsets = frame_offsets(data, pos, pm_path)
    if not offsets:
        raise ImageError(pm_path, "pagemap without pagemap_head", offset=pos, entry=0)
    head_end = offsets[1] if len(offsets) > 1 else len(data)
    head = parse(PagemapHead, data[offsets[0] + 4 : head_end], path=pm_path,
                 offset=offsets[0] + 4, entry=0)  # fmt: skip
    at = np.array(offsets[1:], dtype=np.int64)
    starts = at + 4
    lens = np.diff(np.append(at, len(data))) - 4
    cols = _fast_columns(data, starts, lens)
    if cols is None:
        frames = list(zip(starts.tolist(), lens.tolist(), strict=True))
        cols = _slow_columns(data, frames, pm_path)
    return _normalise(pm_path, cols, starts - 4, page_size, head.pages_id)


def load_pagemap(path: str | os.PathLike[str], page_size: int) -> Pagemap:
    """Read a pagemap, attach its pages file and check the file is long enough."""
    pm = parse_pagemap(read_bytes(path), path, page_size)
    need = bool(((pm.flags & PE_PRESENT) != 0).any())
    if pm.pages_path.exists() or need:
        if not pm.pages_path.exists():
            raise ImageError(pm.path, f"PE_PRESENT entries but {pm.pages_path.name} is missing")
        pm.pages = PagesFile(pm.pages_path)
        check_pages_size(pm, pm.pages.size)
    return pm


def check_pages_size(pm: Pagemap, size: int) -> None:
    """Every PE_PRESENT run must lie inside the pages file (trailing extra bytes are fine)."""
    present = (pm.flags & PE_PRESENT) != 0
    run_end = pm.offset + pm.nr_pages * np.uint64(pm.page_size)
    bad = _first(present & (run_end > np.uint64(size)))
    if bad is not None:
        raise pm.error(
            bad,
            f"PE_PRESENT run needs bytes {int(pm.offset[bad])}..{int(run_end[bad])} of "
            f"{pm.pages_path.name}, which has {size} bytes",
        )


def check_within_vmas(pm: Pagemap, vmas: Iterable[VmaEntry], mm_name: str) -> None:
    """Every run must lie inside the private VMAs of the mm image (adjacent VMAs may share a
    run); CRIU aborts a restore otherwise (format doc section 6.2)."""
    spans = sorted((v.start, v.end) for v in vmas if not v.is_guard and v.has_pagemap)
    merged: list[list[int]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    starts = np.array([m[0] for m in merged], dtype=np.uint64)
    ends = np.array([m[1] for m in merged], dtype=np.uint64)
    j = np.searchsorted(starts, pm.vaddr, side="right").astype(np.int64) - 1
    ok = (j >= 0) & (pm.end <= ends[np.maximum(j, 0)]) if merged else np.zeros(len(pm), bool)
    bad = _first(~ok)
    if bad is not None:
        raise pm.error(
            bad,
            f"run 0x{int(pm.vaddr[bad]):x}-0x{int(pm.end[bad]):x} is outside every private VMA "
            f"of {mm_name}",
        )


# --------------------------------------------------------------------------------------------
# resolving PE_PARENT


def resolve_runs(top: Pagemap, parent_of: Callable[[Pagemap], Pagemap]) -> list[PageRun]:
    """Sorted runs of ``top`` with every PE_PARENT hole replaced by the runs that hold its bytes
    further up the chain; ``parent_of(pm)`` loads the same pagemap in the parent directory."""
    page = np.uint64(top.page_size)
    levels = [top]
    pieces: list[tuple[U64, U64, NDArray[np.bool_], NDArray[np.int64], U64]] = []

    def take(pm: Pagemap, level: int, idx: NDArray[np.int64], start: U64, end: U64) -> None:
        flags = pm.flags[idx]
        keep = (flags & PE_PRESENT) != 0
        i, s = idx[keep], start[keep]
        offset = pm.offset[i] + (s - pm.vaddr[i])
        lazy = (flags[keep] & PE_LAZY) != 0
        pieces.append((s, (end[keep] - s) // page, lazy, np.full(len(i), level), offset))

    everything = np.arange(len(top), dtype=np.int64)
    take(top, 0, everything, top.vaddr, top.end)
    holes = (top.flags & PE_PARENT) != 0
    h_start, h_end = top.vaddr[holes], top.end[holes]
    origin_level = np.zeros(len(h_start), np.int64)
    origin_entry = everything[holes]
    while len(h_start):
        parent = parent_of(levels[-1])
        levels.append(parent)
        lo = np.searchsorted(parent.end, h_start, side="right").astype(np.int64)
        hi = np.searchsorted(parent.vaddr, h_end, side="left").astype(np.int64)
        cnt = np.maximum(hi - lo, 0)
        rep = np.repeat(np.arange(len(h_start)), cnt)
        first = np.cumsum(cnt) - cnt
        idx = np.arange(int(cnt.sum()), dtype=np.int64) - first[rep] + lo[rep]
        p_start = np.maximum(h_start[rep], parent.vaddr[idx])
        p_end = np.minimum(h_end[rep], parent.end[idx])
        bad = cnt == 0
        has = ~bad
        bad[has] |= p_start[first[has]] != h_start[has]
        bad[has] |= p_end[first[has] + cnt[has] - 1] != h_end[has]
        gap = (rep[1:] == rep[:-1]) & (p_start[1:] != p_end[:-1])
        bad[rep[1:][gap]] = True
        worst = _first(bad)
        if worst is not None:
            child = levels[int(origin_level[worst])]
            raise child.error(
                int(origin_entry[worst]),
                f"PE_PARENT pages 0x{int(h_start[worst]):x}-0x{int(h_end[worst]):x} are not "
                f"all in the parent {parent.path}",
            )
        take(parent, len(levels) - 1, idx, p_start, p_end)
        deeper = (parent.flags[idx] & PE_PARENT) != 0
        h_start, h_end = p_start[deeper], p_end[deeper]
        origin_level = np.full(len(h_start), len(levels) - 1)
        origin_entry = idx[deeper]
    v = np.concatenate([p[0] for p in pieces])
    order = np.argsort(v, kind="stable")
    columns = [np.concatenate([p[c] for p in pieces])[order].tolist() for c in range(5)]
    files = [lv.pages for lv in levels]
    runs: list[PageRun] = []
    append = runs.append
    for vaddr, nr, lazy, level, offset in zip(*columns, strict=True):
        pages = files[level]
        assert pages is not None  # a level with PE_PRESENT runs always has its pages file
        append(PageRun(vaddr, nr, lazy, pages, offset))
    return runs


# --------------------------------------------------------------------------------------------
# writing


def make_entries(runs: Iterable[tuple[int, int, int]], page_size: int) -> list[PagemapEntry]:
    """``pagemap_entry`` messages for (vaddr, nr_pages, flags) runs, written the way CRIU 3.x,
    4.2 and both crits accept: fields 1, 2 (= count), 4 and 5 (= count), runs split so the count
    fits in the 32-bit field 2."""
    out: list[PagemapEntry] = []
    for vaddr, nr_pages, flags in runs:
        while nr_pages > 0:
            count = min(nr_pages, _MAX_COUNT)
            out.append(
                PagemapEntry(vaddr=vaddr, compat_nr_pages=count, flags=flags, nr_pages=count)
            )
            vaddr += count * page_size
            nr_pages -= count
    return out


def entries_bytes(runs: Iterable[tuple[int, int, int]], page_size: int) -> bytes:
    """The framed ``pagemap_entry`` records of :func:`make_entries` (length, payload each),
    encoded directly: an incremental dump writes thousands of them. Byte for byte what
    ``build_image`` makes of ``make_entries(runs)`` (tests/test_formats_pagemap.py)."""
    out = bytearray()
    for vaddr, nr_pages, flags in runs:
        while nr_pages > 0:
            count = min(nr_pages, _MAX_COUNT)
            n = varint_bytes(count)
            body = b"\x08" + varint_bytes(vaddr) + b"\x10" + n + b"\x20" + varint_bytes(flags)
            body += b"\x28" + n
            out += len(body).to_bytes(4, "little")
            out += body
            vaddr += count * page_size
            nr_pages -= count
    return bytes(out)

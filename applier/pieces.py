"""The write set of a WritePages step as numpy columns: one row per piece of page data,
with the target address, the pages file and offset, and the local address of the bytes in this
process's mapping of the file; iovec tables for batches are built from it without a Python
object per page."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from applier.plan import SavedRuns
from injector.memory import buffer_address

__all__ = [
    "CHUNK",
    "IOV_BATCH",
    "U64",
    "Pieces",
    "coalesce",
    "expand_ranges",
    "inside_any",
    "iov_rows",
]

IOV_BATCH = 1024  # pieces per batch: IOV_MAX, what one process_vm_readv/writev call takes
PREFETCH_MIN = 256 << 10  # pieces this large are mapped in one madvise, not page by page
CHUNK = 8 << 20  # bytes of page data handled per batch: bounds the applier's memory use
RELEASE_BYTES = 32 << 20  # page data used before its pages-file spans are dropped from memory
RELEASE_SPAN = 2 << 30  # ... or pages-file bytes spanned, for sparse page data

U64 = npt.NDArray[np.uint64]


def iov_rows(addr: U64, length: U64) -> U64:
    """(n, 2) iovec rows from address and length columns."""
    out = np.empty((len(addr), 2), dtype=np.uint64)
    out[:, 0] = addr
    out[:, 1] = length
    return out


def expand_ranges(start: U64, length: U64, step: int) -> U64:
    """``start[i], start[i] + step, ...`` for ``length[i] // step`` values of every i."""
    counts = (length // np.uint64(step)).astype(np.intp)
    index = np.arange(int(counts.sum()), dtype=np.intp)
    index -= np.repeat(np.cumsum(counts) - counts, counts)  # position inside each range
    return np.repeat(start, counts) + index.astype(np.uint64) * np.uint64(step)


class Pieces:
    """The write set of a WritePages step as columns, one row per piece of at most CHUNK
    bytes: target address, length, pages file (index into ``files``) and offset in it, and
    the local address of the bytes in this process's mapping of that file. No Python object
    per page: batches are slices, iovecs are built by numpy.

    The pages files stay mapped while the object is open; the spans used are dropped from
    this process's memory (``release``, see ``used``), so the RSS stays bounded whatever the
    image size. The write pass leaves its last spans mapped for the verification pass that
    follows (which releases them).
    """

    def __init__(self, runs: SavedRuns, page: int) -> None:
        self.page = page
        self.files: list[Any] = []  # formats PagesFile
        self._views: list[memoryview] = []
        used = np.unique(runs.source)
        src_file = np.zeros(len(runs.sources), dtype=np.intp)
        src_delta = np.zeros(len(runs.sources), dtype=np.uint64)  # file offset - vaddr, mod 2**64
        index: dict[int, int] = {}
        for i in used.tolist():
            src: Any = runs.sources[i]
            f = index.setdefault(id(src.pages), len(self.files))
            if f == len(self.files):
                self.files.append(src.pages)
            src_file[i] = f
            src_delta[i] = (src.offset - src.vaddr) % (1 << 64)
        length = runs.npages * np.uint64(page)
        vaddr, source = runs.vaddr, runs.source
        if len(length) and int(length.max()) > CHUNK:  # cut long runs into CHUNK pieces
            counts = ((length + np.uint64(CHUNK - 1)) // np.uint64(CHUNK)).astype(np.intp)
            piece_of = np.repeat(np.arange(len(length)), counts)
            vaddr = expand_ranges(vaddr, counts.astype(np.uint64) * np.uint64(CHUNK), CHUNK)
            end = runs.vaddr[piece_of] + length[piece_of]
            length = np.minimum(np.uint64(CHUNK), end - vaddr)
            source = source[piece_of]
        self.vaddr: U64 = vaddr
        self.length: U64 = length
        self.file = src_file[source]
        self.offset: U64 = vaddr + src_delta[source]
        bases = np.zeros(len(self.files), dtype=np.uint64)
        try:
            for f, pages in enumerate(self.files):
                on = self.file == f
                if on.any():
                    ends = self.offset[on] + self.length[on]
                    worst = int(np.argmax(ends))
                    if int(ends[worst]) > pages.size:  # raises the formats error
                        pages.view(int(self.offset[on][worst]), int(self.length[on][worst]))
                view = pages.view(0, pages.size)
                self._views.append(view)
                bases[f] = buffer_address(view)
        except BaseException:
            self.close()
            raise
        self.local: U64 = bases[self.file] + self.offset
        self._span: dict[int, tuple[int, int]] = {}
        self._unreleased = 0

    def bounds(self) -> list[tuple[int, int]]:
        """(first, end) row slices of at most IOV_BATCH pieces and CHUNK bytes each (or one
        larger piece)."""
        cum = np.cumsum(self.length)
        out: list[tuple[int, int]] = []
        i, n = 0, len(self.length)
        while i < n:
            before = int(cum[i - 1]) if i else 0
            j = int(np.searchsorted(cum, before + CHUNK, side="right"))
            j = min(max(j, i + 1), i + IOV_BATCH)
            out.append((i, j))
            i = j
        return out

    def prefetch(self, i: int, j: int) -> None:
        """Map pieces of PREFETCH_MIN bytes and more of batch ``i:j`` in one call each."""
        big = np.nonzero(self.length[i:j] >= PREFETCH_MIN)[0]
        for k in (i + big).tolist():
            self.files[int(self.file[k])].prefetch(int(self.offset[k]), int(self.length[k]))

    def used(self, i: int, j: int) -> None:
        """Batch ``i:j`` is done with: drop the spans of the pages files used so far once
        RELEASE_BYTES of dense page data went through, or the spans reach RELEASE_SPAN.

        A sparse batch maps more than its pages (fault-around, large folios: touching 1%
        of a 1 GiB file maps all of it here), so dropping sparse spans early bounds nothing
        but makes the next pass over the same pages (the verification) fault them in
        again."""
        for f in np.unique(self.file[i:j]).tolist():
            on = self.file[i:j] == f
            lo = int(self.offset[i:j][on].min())
            hi = int((self.offset[i:j][on] + self.length[i:j][on]).max())
            old = self._span.get(f, (lo, hi))
            self._span[f] = (min(old[0], lo), max(old[1], hi))
        self._unreleased += int(self.length[i:j].sum())
        span = sum(hi - lo for lo, hi in self._span.values())
        dense = span < 4 * self._unreleased
        if (dense and self._unreleased >= RELEASE_BYTES) or span >= RELEASE_SPAN:
            self.release()

    def release(self) -> None:
        for f, (lo, hi) in self._span.items():
            self.files[f].release(lo, hi - lo)
        self._span.clear()
        self._unreleased = 0

    def image_words(self, k: int) -> U64:
        """The image's bytes of piece ``k`` as uint64 words: a view of the mapping, no copy."""
        view = self._views[int(self.file[k])]
        return np.frombuffer(
            view, dtype=np.uint64, count=int(self.length[k]) // 8, offset=int(self.offset[k])
        )

    def image_rows(
        self, i: int, j: int, into: U64, mask: npt.NDArray[np.bool_] | None = None
    ) -> U64:
        """The image's bytes of pieces ``i:j`` (``mask`` selects some), one row per page:
        an (n, page // 8) uint64 array, gathered into the start of ``into``."""
        offset, length, file = self.offset[i:j], self.length[i:j], self.file[i:j]
        if mask is not None:
            offset, length, file = offset[mask], length[mask], file[mask]
        page, words = self.page, self.page // 8
        page_off = expand_ranges(offset, length, page)
        out = into[: len(page_off) * words].reshape(-1, words)
        files = np.unique(file).tolist()
        page_file = (
            None
            if len(files) == 1
            else np.repeat(file, (length // np.uint64(page)).astype(np.intp))
        )
        for f in files:
            flat = np.frombuffer(self._views[f], dtype=np.uint8)
            offs = page_off if page_file is None else page_off[page_file == f]
            if not (offs % np.uint64(page)).any():
                rows = flat[: len(flat) // page * page].view(np.uint64).reshape(-1, words)
                idx = (offs // np.uint64(page)).astype(np.intp)
                if page_file is None:
                    np.take(rows, idx, axis=0, out=out)
                else:
                    out[page_file == f] = rows[idx]
            else:  # pages not at page offsets in the file: gather byte by byte
                idx = offs.astype(np.intp)[:, None] + np.arange(page, dtype=np.intp)
                got = flat[idx].view(np.uint64).reshape(-1, words)
                if page_file is None:
                    out[:] = got
                else:
                    out[page_file == f] = got
            del flat
        return out

    def close(self, *, release: bool = True) -> None:
        if release:
            self.release()
        for view in self._views:
            view.release()
        self._views.clear()


def inside_any(ranges: list[tuple[int, int]], start: U64, length: U64) -> npt.NDArray[np.bool_]:
    """For each [start, start + length), whether it lies inside one of ``ranges`` (few)."""
    out = np.zeros(len(start), dtype=bool)
    for a, b in ranges:
        out |= (start >= np.uint64(a)) & (start + length <= np.uint64(b))
    return out


def coalesce(remote: U64, local: U64, length: U64) -> tuple[U64, U64]:
    """Rows that continue each other in both address spaces merged: (local, remote) iovecs."""
    if len(remote) == 0:
        empty = np.empty((0, 2), dtype=np.uint64)
        return empty, empty
    ends_r, ends_l = remote + length, local + length
    starts = np.ones(len(remote), dtype=bool)
    starts[1:] = (remote[1:] != ends_r[:-1]) | (local[1:] != ends_l[:-1])
    firsts = np.nonzero(starts)[0]
    lasts = np.append(firsts[1:] - 1, len(remote) - 1)
    size = ends_r[lasts] - remote[firsts]
    return iov_rows(local[firsts], size), iov_rows(remote[firsts], size)

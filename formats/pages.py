"""Raw page data: ``pages-<n>.img`` (no header, no framing; format doc section 5.1).

The file is memory-mapped on first use, so opening a multi-GiB pages file reads nothing.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from pathlib import Path

from formats.errors import ImageError

__all__ = ["PagesFile"]

_MADV_POPULATE_READ = 22  # include/uapi/asm-generic/mman-common.h


class PagesFile:
    """One pages file; ``view(offset, length)`` returns a zero-copy memoryview of it."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            self.size = self.path.stat().st_size
        except OSError as exc:
            raise ImageError(self.path, f"cannot open pages file: {exc.strerror}") from exc
        self._map: mmap.mmap | None = None
        self._view: memoryview | None = None  # one view of the whole mapping, sliced per call

    def __repr__(self) -> str:
        return f"PagesFile({str(self.path)!r}, size={self.size})"

    def _mapping(self) -> mmap.mmap:
        if self._map is None:
            try:
                with self.path.open("rb") as fh:
                    self._map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as exc:
                raise ImageError(self.path, f"cannot map pages file: {exc}") from exc
        return self._map

    def view(self, offset: int, length: int) -> memoryview:
        """Bytes ``[offset, offset + length)``; ImageError if that is outside the file."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ImageError(
                self.path,
                f"read of {length} bytes at {offset} is outside the file of {self.size} bytes",
                offset=offset,
            )
        if length == 0:
            return memoryview(b"")
        if self._view is None:
            self._view = memoryview(self._mapping())
        return self._view[offset : offset + length]

    def prefetch(self, offset: int, length: int) -> None:
        """Map ``[offset, offset + length)`` in one call (MADV_POPULATE_READ, Linux 5.14+)
        instead of one page fault per page when the bytes are first used."""
        self._advise(_MADV_POPULATE_READ, offset, length)

    def release(self, offset: int, length: int) -> None:
        """Drop ``[offset, offset + length)`` from this process's memory (MADV_DONTNEED): the
        file stays in the page cache, but streaming a multi-GiB file keeps a small RSS."""
        self._advise(mmap.MADV_DONTNEED, offset, length)

    def _advise(self, advice: int, offset: int, length: int) -> None:
        if self._map is None or length <= 0:
            return
        start = offset - offset % mmap.PAGESIZE
        end = min(self.size, offset + length)
        # advice only: an older kernel without MADV_POPULATE_READ reads on demand
        with contextlib.suppress(OSError):
            self._map.madvise(advice, start, end - start)

    def close(self) -> None:
        """Unmap (views still held keep the mapping alive until released)."""
        if self._view is not None:
            self._view.release()
            self._view = None
        if self._map is not None:
            # BufferError: a caller still holds a view; the mapping goes when it is released
            with contextlib.suppress(BufferError):
                self._map.close()
            self._map = None

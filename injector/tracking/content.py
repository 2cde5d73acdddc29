"""Dirty tracking by comparing memory with a saved copy: the fallback that works everywhere.

``reset()`` copies every private writable mapping into this process; ``dirty_pages()`` reads
the memory back in chunks of a few MiB and compares it with the copy page by page in numpy
(at memory bandwidth, kernel-notes.md: 256 MiB in about 37 ms). It finds pages whose
*content* changed; a write of the same bytes is invisible to it, which is all a restore needs.
It costs a full copy of the tracked memory in the tracer and cannot outlive this process.
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs
import numpy as np
import numpy.typing as npt

from injector.arrays import sorted_unique
from injector.errors import InjectorError
from injector.memory import aligned_buffer
from injector.process import Process
from injector.tracking.base import (
    PAGE_SIZE,
    DirtyTracker,
    PageArray,
    Range,
    TrackerState,
    TrackingError,
    intersect,
    normalise,
    pages_in,
    subtract,
    tracked_ranges,
)

__all__ = ["ContentTracker"]

CHUNK = 4 << 20
_WORDS = PAGE_SIZE // 8


@attrs.define
class _Copy:
    start: int
    end: int
    data: npt.NDArray[np.uint8]


class ContentTracker(DirtyTracker):
    """Content-compare tracker; its snapshot lives in this process."""

    backend_name = "content"

    def __init__(self, session: Process, chunk: int = CHUNK) -> None:
        super().__init__(session)
        self._chunk = max(PAGE_SIZE, chunk - chunk % PAGE_SIZE)
        self._buffer = aligned_buffer(self._chunk, np.uint8)
        self._copies: list[_Copy] = []

    @classmethod
    def open(cls, session: Process) -> ContentTracker:
        """Snapshot the target's private writable memory now."""
        tracker = cls(session)
        tracker.reset()
        return tracker

    def state(self) -> TrackerState:
        raise TrackingError(self.pid, "the content tracker's copy lives in this process only")

    def release(self) -> TrackerState:
        raise TrackingError(self.pid, "the content tracker cannot be resumed; close() it")

    def reset(self) -> None:
        self._check_open()
        writable, _ = tracked_ranges(self.session.maps())
        copies: list[_Copy] = []
        for start, end in writable:
            data = aligned_buffer(end - start, np.uint8)
            if self._read(start, data):
                copies.append(_Copy(start, end, data))
        # Unreadable ranges have no copy and count as written at every scan.
        self._copies = copies

    def dirty_pages(self, ranges: Iterable[Range] | None = None) -> PageArray:
        self._check_open()
        writable, _ = tracked_ranges(self.session.maps())
        wanted = normalise(ranges)
        if wanted is not None:
            writable = intersect(writable, wanted)
        covered = [(c.start, c.end) for c in self._copies]
        parts = [pages_in(subtract(writable, covered))]
        buffer = self._buffer
        for copy in self._copies:
            for start, end in intersect([(copy.start, copy.end)], writable):
                for pos in range(start, end, self._chunk):
                    size = min(self._chunk, end - pos)
                    saved = copy.data[pos - copy.start : pos - copy.start + size]
                    if not self._read(pos, buffer[:size]):
                        parts.append(np.arange(pos, pos + size, PAGE_SIZE, dtype=np.uint64))
                        continue
                    now = buffer[:size].view(np.uint64).reshape(-1, _WORDS)
                    was = saved.view(np.uint64).reshape(-1, _WORDS)
                    changed = np.flatnonzero((now != was).any(axis=1))
                    if len(changed):
                        parts.append(
                            changed.astype(np.uint64) * np.uint64(PAGE_SIZE) + np.uint64(pos)
                        )
        return sorted_unique(np.concatenate(parts))

    def _read(self, address: int, out: npt.NDArray[np.uint8]) -> bool:
        """Fill ``out`` from the target in chunks; ``False`` if the memory cannot be read."""
        view = out.data
        try:
            for offset in range(0, len(out), self._chunk):
                self.session.read_into(address + offset, view[offset : offset + self._chunk])
        except InjectorError:
            return False
        return True

    def _release_local(self) -> None:
        self._copies = []

    def _stop(self) -> None:
        """The target was never changed."""

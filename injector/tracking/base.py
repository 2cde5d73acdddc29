"""What every dirty-page tracker shares: the session protocol, the state record, page ranges.

A tracker answers one question exactly: which pages of the target were written since the last
``reset()``. The backends (``softdirty``, ``uffd``, ``content``)
differ in how they ask the kernel; ``tracking`` chooses one by probing.

Ranges are ``(start, end)`` pairs of page-aligned addresses, kept sorted and merged; page lists
are numpy ``uint64`` arrays of page start addresses, sorted.
"""

from __future__ import annotations

import abc
import concurrent.futures
import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Generic, TypeVar

import attrs
import numpy as np
import numpy.typing as npt

from injector.errors import InjectorError
from injector.maps import Mapping
from injector.process import Process

__all__ = [
    "PAGE_SIZE",
    "DirtyTracker",
    "PageArray",
    "Pending",
    "Range",
    "TrackerLost",
    "TrackerState",
    "TrackerUnavailable",
    "TrackingError",
    "intersect",
    "merge",
    "pages_in",
    "select_pages",
    "subtract",
    "tracked_ranges",
]

PAGE_SIZE = 4096
PROT_WRITE = 0x2

Range = tuple[int, int]
PageArray = npt.NDArray[np.uint64]

# Kernel pseudo mappings that are never tracked: nothing in them is the process's own data.
UNTRACKED_PATHS = frozenset({"[vdso]", "[vvar]", "[vvar_vclock]", "[vsyscall]", "[uprobes]"})


class TrackingError(InjectorError):
    """Dirty tracking failed in a way the caller must handle (the answer would be wrong)."""


class TrackerUnavailable(TrackingError):
    """The requested backend does not work on this kernel or for this target."""


class TrackerLost(TrackingError):
    """A saved tracker cannot be resumed: the process or its userfaultfd is gone or replaced."""


def merge(ranges: Iterable[Range]) -> list[Range]:
    """Sorted, non-overlapping ranges; touching and overlapping ones joined, empty ones dropped."""
    out: list[Range] = []
    for start, end in sorted(r for r in ranges if r[1] > r[0]):
        if out and start <= out[-1][1]:
            if end > out[-1][1]:
                out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out


def intersect(a: Sequence[Range], b: Sequence[Range]) -> list[Range]:
    """Intersection of two merged range lists."""
    out: list[Range] = []
    i = j = 0
    while i < len(a) and j < len(b):
        start = max(a[i][0], b[j][0])
        end = min(a[i][1], b[j][1])
        if start < end:
            out.append((start, end))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def subtract(a: Sequence[Range], b: Sequence[Range]) -> list[Range]:
    """The parts of merged ranges ``a`` outside merged ranges ``b``."""
    out: list[Range] = []
    j = 0
    for start, end in a:
        pos = start
        while j < len(b) and b[j][1] <= pos:
            j += 1
        k = j
        while k < len(b) and b[k][0] < end:
            if b[k][0] > pos:
                out.append((pos, b[k][0]))
            pos = max(pos, b[k][1])
            k += 1
        if pos < end:
            out.append((pos, end))
    return out


def pages_in(ranges: Sequence[Range]) -> PageArray:
    """Every page start address inside the merged ranges, sorted."""
    if not ranges:
        return np.zeros(0, dtype=np.uint64)
    return np.concatenate(
        [np.arange(start, end, PAGE_SIZE, dtype=np.uint64) for start, end in ranges]
    )


def select_pages(pages: PageArray, ranges: Sequence[Range]) -> PageArray:
    """The pages (sorted array) that lie inside the merged ranges."""
    if len(pages) == 0 or not ranges:
        return pages[:0]
    starts = np.array([r[0] for r in ranges], dtype=np.uint64)
    ends = np.array([r[1] for r in ranges], dtype=np.uint64)
    index = np.searchsorted(starts, pages, side="right") - 1
    inside = index >= 0
    inside[inside] = pages[inside] < ends[index[inside]]
    return pages[inside]


def normalise(ranges: Iterable[Range] | None) -> list[Range] | None:
    """Caller-given ranges widened to whole pages and merged (``None`` stays ``None``)."""
    if ranges is None:
        return None
    mask = PAGE_SIZE - 1
    return merge(((start & ~mask), (end + mask) & ~mask) for start, end in ranges)


def tracked_ranges(maps: Iterable[Mapping]) -> tuple[list[Range], list[Range]]:
    """(ranges to track, all private ranges) of a maps listing; today both are every private
    mapping.

    Read-only and PROT_NONE private memory is tracked too: a program can mprotect a page
    writable, write it and make it read-only again between two scans, and that write must
    be seen. Shared mappings are the page cache's or another process's memory as much as
    this one's; the kernel pseudo mappings hold no process data. Neither is tracked.
    """
    private: list[Range] = []
    for m in maps:
        if m.shared or (m.inode == 0 and m.path in UNTRACKED_PATHS):
            continue
        private.append((m.start, m.end))
    merged = merge(private)
    return merged, list(merged)


def _ranges_field(value: Iterable[Iterable[int]]) -> tuple[Range, ...]:
    out: list[Range] = []
    for item in value:
        start, end = item
        out.append((int(start), int(end)))
    return tuple(out)


@attrs.frozen
class TrackerState:
    """Everything needed to continue tracking in a later session (dump now, apply later).

    ``remote_fd`` and ``inode`` identify the userfaultfd that stays open inside the target;
    ``start_time`` tells a reused pid apart; ``registered`` and ``fresh`` are the ranges the
    tracker registered and the ones that appeared since the last reset (reported dirty).
    """

    backend: str
    pid: int
    start_time: int
    remote_fd: int = -1
    inode: int = 0
    registered: tuple[Range, ...] = attrs.field(default=(), converter=_ranges_field)
    fresh: tuple[Range, ...] = attrs.field(default=(), converter=_ranges_field)

    def to_json(self) -> str:
        """A compact JSON text (stable key order)."""
        return json.dumps(attrs.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrackerState:
        """Parse :meth:`to_json` output; raises ``ValueError`` on anything else."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("tracker state must be a JSON object")
        try:
            return cls(**data)
        except TypeError as exc:
            raise ValueError(f"bad tracker state: {exc}") from exc


T = TypeVar("T")


class Pending(Generic[T]):
    """Work started on a worker thread (``DirtyTracker.dirty_pages_later``): ``result()``
    waits for it, finishes it on the caller's thread once and keeps what that gave (raising
    what it raised); ``wait()`` only waits for ``future``, the part on the worker."""

    def __init__(
        self, finish: Callable[[], T], future: concurrent.futures.Future[Any] | None = None
    ) -> None:
        self._finish = finish
        self.future = future
        self._done = False
        self._value: T | None = None

    @classmethod
    def ready(cls, value: T) -> Pending[T]:
        return cls(lambda: value)

    def result(self) -> T:
        if not self._done:
            self._value, self._done = self._finish(), True
        return self._value  # type: ignore[return-value]  # T itself may be Optional

    def wait(self) -> None:
        if self.future is not None:
            concurrent.futures.wait((self.future,))


class DirtyTracker(abc.ABC):
    """Which pages were written since the last :meth:`reset` (one interface, several backends).

    A tracker works through the session it was opened or resumed with; once that session has
    ended, call :meth:`release` (keep tracking, get a :class:`TrackerState`) or :meth:`close`
    (stop tracking) before it ends.
    """

    backend_name: str = ""

    def __init__(self, session: Process) -> None:
        self.session = session
        self.pid = session.pid
        self._done = False

    @abc.abstractmethod
    def dirty_pages(self, ranges: Iterable[Range] | None = None) -> PageArray:
        """Sorted page start addresses written since the last reset (inside ``ranges``)."""

    def dirty_pages_later(self) -> Pending[PageArray]:
        """``dirty_pages()``, with what can run on another thread started there (the page
        tables' walk, for a backend that has one) while the caller's thread goes on reading
        the stopped target; nothing may change its layout until ``result()`` returned."""
        return Pending.ready(self.dirty_pages())

    @abc.abstractmethod
    def reset(self) -> None:
        """Start a new interval: afterwards, no page counts as written."""

    @abc.abstractmethod
    def state(self) -> TrackerState:
        """What :func:`injector.tracking.resume_tracker` needs to continue later."""

    def rebind(self, session: Process) -> None:
        """Continue in this process with a new session on the same process.

        Between two sessions the target runs; what it writes then is reported as usual. This is
        the only way to carry a ``content`` tracker across sessions.
        """
        self._check_open()
        if session.pid != self.pid:
            raise TrackingError(self.pid, f"cannot move the tracker to pid {session.pid}")
        self.session = session

    def release(self) -> TrackerState:
        """Let go of the tracker's local resources but keep tracking in the target."""
        state = self.state()
        self._release_local()
        self._done = True
        return state

    def close(self) -> None:
        """Stop tracking and undo every change made to the target for it."""
        if not self._done:
            self._stop()
            self._release_local()
            self._done = True

    @property
    def closed(self) -> bool:
        """Released or closed: this object no longer tracks anything."""
        return self._done

    def _check_open(self) -> None:
        if self._done:
            raise TrackingError(self.pid, f"{self.backend_name} tracker already closed")

    @abc.abstractmethod
    def _release_local(self) -> None:
        """Close descriptors and free copies held in this process."""

    @abc.abstractmethod
    def _stop(self) -> None:
        """Undo the changes made in the target for tracking."""

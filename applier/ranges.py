"""Page-address set operations on sorted numpy arrays, shared by the planner and the undo
image writer: intervals, membership, coalescing pages into ranges."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import numpy.typing as npt

__all__ = ["align_up", "covered", "intervals", "member", "page_ranges"]


def intervals(regions: Iterable[tuple[int, int]]) -> tuple[npt.NDArray[np.uint64], ...]:
    """(starts, ends) arrays of [start, end) intervals, sorted by start."""
    pairs = sorted(regions)
    starts = np.array([s for s, _ in pairs], dtype=np.uint64)
    ends = np.array([e for _, e in pairs], dtype=np.uint64)
    return starts, ends


def joined(
    starts: npt.NDArray[np.uint64], ends: npt.NDArray[np.uint64]
) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64]]:
    """Sorted, disjoint intervals with the touching ones joined (``[a, b) + [b, c) = [a, c)``)."""
    if len(starts) < 2:
        return starts, ends
    gaps = np.nonzero(starts[1:] != ends[:-1])[0]
    first = np.concatenate(([0], gaps + 1))
    last = np.concatenate((gaps, [len(ends) - 1]))
    return starts[first], ends[last]


def covered(
    pages: npt.NDArray[np.uint64], starts: npt.NDArray[np.uint64], ends: npt.NDArray[np.uint64]
) -> npt.NDArray[np.bool_]:
    """For each page address, whether a [start, end) interval contains it."""
    if len(starts) == 0:
        return np.zeros(len(pages), dtype=bool)
    idx = np.searchsorted(starts, pages, side="right").astype(np.int64) - 1
    ok = idx >= 0
    result = np.zeros(len(pages), dtype=bool)
    result[ok] = pages[ok] < ends[idx[ok]]
    return result


def member(
    values: npt.NDArray[np.uint64], sorted_set: npt.NDArray[np.uint64]
) -> npt.NDArray[np.bool_]:
    """``np.isin`` for a sorted ``sorted_set``, by binary search (no sorting of ``values``)."""
    if len(sorted_set) == 0:
        return np.zeros(len(values), dtype=bool)
    idx = np.searchsorted(sorted_set, values)
    idx[idx == len(sorted_set)] = 0
    return np.asarray(sorted_set[idx] == values, dtype=bool)


def page_ranges(pages: npt.NDArray[np.uint64], page: int) -> tuple[tuple[int, int], ...]:
    """Sorted page addresses -> coalesced [start, end) ranges."""
    if len(pages) == 0:
        return ()
    breaks = np.nonzero(np.diff(pages) != page)[0]
    firsts = np.concatenate(([0], breaks + 1))
    lasts = np.concatenate((breaks, [len(pages) - 1]))
    return tuple(
        (int(pages[f]), int(pages[last]) + page) for f, last in zip(firsts, lasts, strict=True)
    )


def align_up(x: int, page: int) -> int:
    """``x`` rounded up to a multiple of ``page``."""
    return -(-x // page) * page

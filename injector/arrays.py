"""Small numpy helpers used on hot paths.

``np.unique`` and ``np.union1d`` import ``numpy.ma`` on their first call (about 6 ms, every
command that calls them pays it again); sorting and one compare do the same job here.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import numpy.typing as npt

T = TypeVar("T", bound=np.generic)

__all__ = ["sorted_unique", "union"]


def sorted_unique(values: npt.NDArray[T]) -> npt.NDArray[T]:
    """The distinct values, sorted (``np.unique`` without options)."""
    a = np.sort(values.ravel())
    if a.size < 2:
        return a
    keep = np.empty(a.size, dtype=bool)
    keep[0] = True
    np.not_equal(a[1:], a[:-1], out=keep[1:])
    return a[keep]


def union(a: npt.NDArray[T], b: npt.NDArray[T]) -> npt.NDArray[T]:
    """``np.union1d``: the sorted distinct values of both."""
    return sorted_unique(np.concatenate((a.ravel(), b.ravel())))

"""injector.arrays: np.unique / np.union1d without importing numpy.ma."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from injector.arrays import sorted_unique, union

values = st.lists(st.integers(0, 2**64 - 1), max_size=50)


@given(values, values)
def test_same_as_numpy(a: list[int], b: list[int]) -> None:
    x, y = np.array(a, dtype=np.uint64), np.array(b, dtype=np.uint64)
    assert np.array_equal(sorted_unique(x), np.unique(x))
    assert sorted_unique(x).dtype == np.uint64
    assert np.array_equal(union(x, y), np.union1d(x, y))

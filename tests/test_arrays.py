"""injector.arrays (np.unique / np.union1d without importing numpy.ma) and interval joins."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from applier.ranges import joined
from injector.arrays import sorted_unique, union

values = st.lists(st.integers(0, 2**64 - 1), max_size=50)


@given(values, values)
def test_same_as_numpy(a: list[int], b: list[int]) -> None:
    x, y = np.array(a, dtype=np.uint64), np.array(b, dtype=np.uint64)
    assert np.array_equal(sorted_unique(x), np.unique(x))
    assert sorted_unique(x).dtype == np.uint64
    assert np.array_equal(union(x, y), np.union1d(x, y))


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(1, 3)), max_size=30))
def test_joined_intervals(gaps_lengths: list[tuple[int, int]]) -> None:
    """Touching intervals are joined; the pages they cover stay the same."""
    pos, pairs = 0, []
    for gap, length in gaps_lengths:
        pos += gap
        pairs.append((pos, pos + length))
        pos += length
    starts = np.array([a for a, _ in pairs], dtype=np.uint64)
    ends = np.array([b for _, b in pairs], dtype=np.uint64)
    js, je = joined(starts, ends)
    assert set().union(*(range(a, b) for a, b in pairs)) == set().union(
        *(range(int(a), int(b)) for a, b in zip(js, je, strict=True))
    )
    assert all(int(je[i]) < int(js[i + 1]) for i in range(len(js) - 1))

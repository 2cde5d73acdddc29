"""Tracker logic without a kernel: page ranges, soft-dirty on a fake procfs, content compare."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import attrs
import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import given

from injector.maps import PROT_READ, PROT_WRITE, Mapping
from injector.testing import FakeProcess
from injector.tracking import (
    ContentTracker,
    SoftDirtyTracker,
    TrackerLost,
    TrackerState,
    TrackingError,
    resume_tracker,
)
from injector.tracking.base import (
    intersect,
    merge,
    pages_in,
    select_pages,
    subtract,
    tracked_ranges,
)
from injector.workers import worker

PAGE = 4096
RW = PROT_READ | PROT_WRITE

# -- ranges ---------------------------------------------------------------------------------

spans = st.lists(st.tuples(st.integers(0, 60), st.integers(0, 60)), max_size=8).map(
    lambda raw: [(min(a, b), max(a, b)) for a, b in raw]
)


def _cells(ranges: Sequence[tuple[int, int]]) -> set[int]:
    return {i for start, end in ranges for i in range(start, end)}


@given(spans)
def test_merge_keeps_the_covered_set(a: list[tuple[int, int]]) -> None:
    """merge() covers the same cells with sorted, separated ranges."""
    merged = merge(a)
    assert _cells(merged) == _cells(a)
    assert all(x[1] < y[0] for x, y in itertools.pairwise(merged))
    assert all(s < e for s, e in merged)


@given(spans, spans)
def test_intersect_and_subtract_match_set_algebra(
    a: list[tuple[int, int]], b: list[tuple[int, int]]
) -> None:
    """intersect() and subtract() of merged lists are set intersection and difference."""
    ma, mb = merge(a), merge(b)
    assert _cells(intersect(ma, mb)) == _cells(a) & _cells(b)
    assert _cells(subtract(ma, mb)) == _cells(a) - _cells(b)
    assert merge(subtract(ma, mb)) == subtract(ma, mb)


@given(spans, st.lists(st.integers(0, 70), max_size=40))
def test_select_pages_filters_by_ranges(a: list[tuple[int, int]], pages: list[int]) -> None:
    """select_pages() keeps exactly the pages inside the ranges, in their order."""
    ranges = [(s * PAGE, e * PAGE) for s, e in merge(a)]
    array = np.array(sorted(p * PAGE for p in pages), dtype=np.uint64)
    expected = [p for p in array.tolist() if p // PAGE in _cells(merge(a))]
    assert select_pages(array, ranges).tolist() == expected
    assert pages_in(ranges).tolist() == sorted(c * PAGE for c in _cells(merge(a)))


def test_tracked_ranges_skips_shared_and_pseudo_mappings() -> None:
    """Private mappings are tracked (writable ones for writes); shared and [vdso] are not."""
    maps = [
        Mapping(0x1000, 0x3000, RW, False, 0, 0, 0, None),
        Mapping(0x3000, 0x4000, PROT_READ, False, 0, 0, 7, "/bin/x"),
        Mapping(0x5000, 0x6000, RW, True, 0, 0, 8, "/dev/shm/y"),
        Mapping(0x7000, 0x9000, RW, False, 0, 0, 0, "[heap]"),
        Mapping(0xA000, 0xB000, PROT_READ, False, 0, 0, 0, "[vdso]"),
    ]
    writable, private = tracked_ranges(maps)
    assert writable == [(0x1000, 0x4000), (0x7000, 0x9000)]
    assert private == [(0x1000, 0x4000), (0x7000, 0x9000)]


def test_state_json_round_trip() -> None:
    """TrackerState survives to_json/from_json unchanged; junk is refused."""
    state = TrackerState("uffd-wp", 12, 345, 7, 99, ((0x1000, 0x2000),), ((0x1000, 0x2000),))
    assert TrackerState.from_json(state.to_json()) == state
    with pytest.raises(ValueError):
        TrackerState.from_json('{"backend": "uffd-wp", "bogus": 1}')
    with pytest.raises(ValueError):
        TrackerState.from_json("[1, 2]")


# -- a fake session -------------------------------------------------------------------------


def fake(pid: int, areas: dict[int, int], *, shared: Iterable[int] = ()) -> FakeProcess:
    """A fake process with a private (or, for starts in ``shared``, shared) anonymous
    read-write mapping of ``areas[start]`` pages at each start."""
    proc = FakeProcess(pid)
    for start, npages in areas.items():
        if start in set(shared):
            proc.map_shared_anon(start, npages, inode=start)
        else:
            proc.map_anon(start, npages)
    return proc


def _pages(*addresses: int) -> list[int]:
    return sorted(addresses)


def test_content_reports_changed_pages_only() -> None:
    """Pages whose bytes changed are reported; rewriting equal bytes is not a change."""
    s = fake(1, {0x10000: 64, 0x200000: 3})
    tracker = ContentTracker(s, chunk=8 * PAGE)  # several chunks per mapping
    tracker.reset()
    assert tracker.dirty_pages().tolist() == []
    s.poke(0x10000 + 5 * PAGE + 9, b"\x01")
    s.poke(0x10000 + 63 * PAGE + 4095, b"\x01")
    s.poke(0x200000, b"\x00")  # same value
    s.poke(0x200000 + PAGE, b"\x03")
    assert tracker.dirty_pages().tolist() == _pages(0x15000, 0x4F000, 0x201000)
    assert tracker.dirty_pages([(0x200000, 0x200001)]).tolist() == []
    assert tracker.dirty_pages([(0x200000, 0x202000)]).tolist() == [0x201000]
    tracker.reset()
    assert tracker.dirty_pages().tolist() == []


def test_content_counts_new_and_unreadable_memory_as_written() -> None:
    """A mapping without a saved copy (new, or unreadable at reset) is written in full."""
    s = fake(1, {0x10000: 2, 0x40000: 1})
    s.unreadable.add(0x40000)
    tracker = ContentTracker.open(s)
    s.map_anon(0x80000, 2)
    s.map_shared_anon(0x90000, 1, inode=0x90000)
    assert tracker.dirty_pages().tolist() == [0x40000, 0x80000, 0x81000]
    with pytest.raises(TrackingError):
        tracker.release()
    tracker.close()
    with pytest.raises(TrackingError):
        tracker.dirty_pages()


# -- soft-dirty on a fake procfs --------------------------------------------------------------

SOFT_DIRTY = 1 << 55
PRESENT = 1 << 63


def _fake_proc(root: Path, pid: int, start_time: int) -> Path:
    d = root / str(pid)
    d.mkdir()
    fields = ["S"] + ["0"] * 18 + [str(start_time)] + ["0"] * 10
    (d / "stat").write_text(f"{pid} (a b) c) {' '.join(fields)}\n")
    (d / "clear_refs").write_bytes(b"")
    (d / "pagemap").write_bytes(b"")
    return d


def _set_entries(d: Path, entries: dict[int, int]) -> None:
    with (d / "pagemap").open("r+b") as f:
        for address, value in entries.items():
            f.seek(address // PAGE * 8)
            f.write(value.to_bytes(8, "little"))


def test_soft_dirty_reads_bit_55_of_tracked_pages(tmp_path: Path) -> None:
    """Pages with bit 55 set inside private writable mappings are the dirty ones."""
    s = fake(42, {0x100000: 8, 0x300000: 2}, shared=[0x300000])
    d = _fake_proc(tmp_path, 42, 777)
    tracker = SoftDirtyTracker.open(s, procfs=tmp_path)
    assert (d / "clear_refs").read_bytes() == b"4"
    _set_entries(
        d,
        {
            0x100000: PRESENT,
            0x102000: PRESENT | SOFT_DIRTY,
            0x107000: SOFT_DIRTY,  # swapped-out or VM_SOFTDIRTY: still written
            0x300000: PRESENT | SOFT_DIRTY,  # shared: not tracked
            0x400000: PRESENT | SOFT_DIRTY,  # unmapped
        },
    )
    assert tracker.dirty_pages().tolist() == [0x102000, 0x107000]
    assert tracker.dirty_pages([(0x103000, 0x108000)]).tolist() == [0x107000]


def test_soft_dirty_state_resumes_only_the_same_process(tmp_path: Path) -> None:
    """A soft-dirty state resumes for the same pid and start time, and refuses another."""
    s = fake(42, {0x100000: 1})
    _fake_proc(tmp_path, 42, 777)
    state = SoftDirtyTracker.open(s, procfs=tmp_path).release()
    assert state == TrackerState("soft-dirty", 42, 777)
    again = SoftDirtyTracker.resume(s, state, procfs=tmp_path)
    assert again.state() == state
    with pytest.raises(TrackerLost):
        SoftDirtyTracker.resume(s, attrs.evolve(state, start_time=778), procfs=tmp_path)
    with pytest.raises(TrackerLost):
        resume_tracker(s, attrs.evolve(state, backend="content"))


def test_rebind_accepts_only_the_same_process() -> None:
    """A tracker moves to a new session of its process, never to another process."""
    s = fake(1, {0x10000: 1})
    tracker = ContentTracker.open(s)
    again = s  # the same process seen through a new session
    tracker.rebind(again)
    again.poke(0x10000 + 1, b"\x01")
    assert tracker.dirty_pages().tolist() == [0x10000]
    with pytest.raises(TrackingError):
        tracker.rebind(fake(2, {0x10000: 1}))


def test_the_process_wide_workers_work_in_a_forked_child() -> None:
    """A child forked after a worker thread started has none of its threads: it makes its
    own pool instead of waiting forever on its parent's (``injector.workers``)."""
    assert worker("scan").submit(lambda: 1).result(timeout=5) == 1
    assert worker("scan") is worker("scan") is not worker("copy")
    child = os.fork()
    if child == 0:  # pragma: no cover - the child's outcome is its exit status
        try:
            ok = worker("scan").submit(lambda: 2).result(timeout=5) == 2
        except BaseException:
            ok = False
        os._exit(0 if ok else 1)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0

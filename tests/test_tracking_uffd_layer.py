"""The userfaultfd / PAGEMAP_SCAN ctypes layer, on memory of the test process itself."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from collections.abc import Iterator

import attrs
import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import given

from injector import _uffd
from injector.tracking.uffd import FEATURES, probe_uffd_wp

PAGE = _uffd.PAGE_SIZE
W = _uffd.PAGE_IS_WRITTEN
A = _uffd.PAGE_IS_WPALLOWED


@attrs.define
class Area:
    """An anonymous mapping of this process registered with a fresh async-wp userfaultfd."""

    mem: mmap.mmap
    addr: int
    pages: int
    uffd: int
    scanner: _uffd.PageScanner

    def written(self) -> list[int]:
        regions = self.scanner.scan(
            self.addr, self.addr + self.pages * PAGE, category_mask=W | A, return_mask=W
        )
        return [(int(p) - self.addr) // PAGE for p in _uffd.regions_to_pages(regions)]

    def reset(self) -> None:
        self.scanner.scan(
            self.addr,
            self.addr + self.pages * PAGE,
            flags=_uffd.PM_SCAN_WP_MATCHING | _uffd.PM_SCAN_CHECK_WPASYNC,
            category_mask=W,
            return_mask=W,
        )


def _make_area(pages: int, capacity: int = 8192) -> Iterator[Area]:
    mem = mmap.mmap(-1, pages * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mem[: pages * PAGE : PAGE] = b"\1" * pages  # populated before protection
    addr = ctypes.addressof(ctypes.c_char.from_buffer(mem))
    uffd = _uffd.userfaultfd(os.O_CLOEXEC | _uffd.UFFD_USER_MODE_ONLY)
    pagemap = os.open("/proc/self/pagemap", os.O_RDONLY)
    try:
        _uffd.uffd_api(uffd, FEATURES)
        _uffd.uffd_register(uffd, addr, pages * PAGE)
        _uffd.uffd_writeprotect(uffd, addr, pages * PAGE)
        yield Area(mem, addr, pages, uffd, _uffd.PageScanner(pagemap, capacity))
    finally:
        os.close(uffd)
        os.close(pagemap)


@pytest.fixture
def area() -> Iterator[Area]:
    """64 registered, write-protected pages."""
    if probe_uffd_wp() is not None:
        pytest.skip(f"uffd-wp unavailable: {probe_uffd_wp()}")
    yield from _make_area(64)


def test_nothing_written_right_after_protection(area: Area) -> None:
    """Freshly protected memory reports no written page."""
    assert area.written() == []


def test_reports_exactly_the_written_pages(area: Area) -> None:
    """CPU writes to pages 0, 3, 10, 40, 63 are reported, and only those."""
    for page in (0, 3, 10, 40, 63):
        area.mem[page * PAGE + 17] = 9
    assert area.written() == [0, 3, 10, 40, 63]


def test_kernel_write_counts(area: Area) -> None:
    """A read() from a pipe into pages 5..6 (a kernel copy_to_user) marks them written."""
    r, w = os.pipe()
    try:
        os.write(w, b"k" * (PAGE + 10))
        assert os.readv(r, [memoryview(area.mem)[5 * PAGE + 100 : 6 * PAGE + 110]]) == PAGE + 10
    finally:
        os.close(r)
        os.close(w)
    assert area.written() == [5, 6]


def test_madv_dontneed_counts_as_written(area: Area) -> None:
    """MADV_DONTNEED of a populated page reports it written (its content changed to zeros)."""
    area.mem.madvise(mmap.MADV_DONTNEED, 7 * PAGE, PAGE)
    assert area.written() == [7]


def test_reset_clears_and_rearms(area: Area) -> None:
    """After a reset nothing is written; a new write is seen again."""
    area.mem[2 * PAGE] = 5
    area.reset()
    assert area.written() == []
    area.mem[2 * PAGE] = 6
    assert area.written() == [2]


def test_check_wpasync_refuses_unregistered_memory(area: Area) -> None:
    """A reset scan over memory with no async-wp registration fails with EPERM."""
    other = mmap.mmap(-1, 4 * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(other))
    with pytest.raises(OSError) as info:
        area.scanner.scan(
            addr,
            addr + 4 * PAGE,
            flags=_uffd.PM_SCAN_WP_MATCHING | _uffd.PM_SCAN_CHECK_WPASYNC,
            category_mask=W,
        )
    assert info.value.errno == errno.EPERM


def test_inverted_wpallowed_finds_unregistered_ranges(area: Area) -> None:
    """The tracker's one-scan query returns unregistered memory and written registered pages."""
    area.mem[9 * PAGE] = 1
    end = area.addr + area.pages * PAGE
    regions = area.scanner.scan(
        area.addr - 4 * PAGE,
        end,
        category_inverted=A,
        category_anyof_mask=W | A,
        return_mask=W | A,
    )
    unregistered = [(int(s), int(e)) for s, e, c in regions.tolist() if not c & A]
    written = [(int(s) - area.addr) // PAGE for s, _, c in regions.tolist() if c & A]
    assert written == [9]
    # whatever lies just below the area is either unmapped or not registered
    assert all(e <= area.addr for _, e in unregistered)


def test_small_output_buffer_reports_each_page_once() -> None:
    """More regions than the buffer holds (and than the kernel's 512): every page exactly once."""
    if probe_uffd_wp() is not None:
        pytest.skip(f"uffd-wp unavailable: {probe_uffd_wp()}")
    for capacity in (7, 512, 8192):
        for a in _make_area(3000, capacity):
            expected = list(range(0, 3000, 2))
            for page in expected:
                a.mem[page * PAGE] = 2
            assert a.written() == expected


@given(st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(1, 40)), max_size=30))
def test_regions_to_pages_matches_a_model(runs: list[tuple[int, int]]) -> None:
    """Expanding (start, end) regions gives every page of each region, in order."""
    regions = np.array([(s * PAGE, (s + n) * PAGE, 0) for s, n in runs], dtype=np.uint64).reshape(
        -1, 3
    )
    expected = [(s + i) * PAGE for s, n in runs for i in range(n)]
    assert _uffd.regions_to_pages(regions).tolist() == expected


def test_probe_matches_the_kernel() -> None:
    """probe_uffd_wp() says available exactly when a handshake offers WP_ASYNC|WP_UNPOPULATED."""
    try:
        fd = _uffd.userfaultfd(os.O_CLOEXEC | _uffd.UFFD_USER_MODE_ONLY)
    except OSError:
        offered = 0
    else:
        try:
            offered, _ = _uffd.uffd_api(fd, 0)
        finally:
            os.close(fd)
    assert (probe_uffd_wp() is None) == (offered & FEATURES == FEATURES)

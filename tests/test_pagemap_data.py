"""Which pagemap entries hold data: PTE markers (left by the uffd-wp tracker on never-touched
pages) must not count as swapped-out pages, or dumps and plans would take zeros for data."""

from __future__ import annotations

import os

import numpy as np
import pytest

from injector import attach
from injector.maps import holds_data, pagemap_shows_frames, read_page_flags
from injector.tracking import open_tracker
from tests.procs import assert_untouched, build_c, spawn

KERNEL_MAPPINGS = ("[vdso]", "[vvar]", "[vvar_vclock]", "[vsyscall]")


def test_entry_kinds() -> None:
    """Present and real swap entries hold data; a uffd-wp PTE marker does not (when visible)."""
    present, swapped, marker = 0x8300000000116B21, 0x4000000000012340, 0x420000000000003F
    got = holds_data(np.array([present, swapped, marker, 0], dtype=np.uint64)).tolist()
    assert got == [True, True, not pagemap_shows_frames(), False]


@pytest.mark.live
def test_tracking_adds_no_data_pages() -> None:
    """Registering a live process for uffd-wp tracking leaves its data pages as they were."""
    with spawn(build_c("apply_target.c")) as t:
        t.expect("ready")
        t.wait_in_syscall(0)

        def data_pages() -> dict[int, int]:
            with attach(t.pid) as s:
                fd = os.open(f"/proc/{t.pid}/pagemap", os.O_RDONLY)
                try:
                    return {
                        m.start: int(holds_data(read_page_flags(fd, m.start, m.end)).sum())
                        for m in s.maps()
                        # not the vDSO: the injector reads it to find a syscall instruction
                        if not m.shared and m.path not in KERNEL_MAPPINGS
                    }
                finally:
                    os.close(fd)

        before = data_pages()
        with attach(t.pid) as s:
            tracker = open_tracker(s, "uffd-wp")
            markers = 0
            fd = os.open(f"/proc/{t.pid}/pagemap", os.O_RDONLY)
            for m in s.maps():
                flags = read_page_flags(fd, m.start, m.end)
                markers += int((((flags >> np.uint64(62)) & np.uint64(1)) == 1).sum())
            os.close(fd)
            tracker.close()
        assert markers > 0, "the tracker left no PTE markers: this test tests nothing here"
        if pagemap_shows_frames():
            assert data_pages() == before
        assert_untouched(t)

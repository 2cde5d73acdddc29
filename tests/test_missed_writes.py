"""Written pages that are not present any more when the reset comes (paged out to swap with
MADV_PAGEOUT): PAGEMAP_SCAN reports them written but not present, and a reset must still
revert them (wasmtime's pooling allocator missed exactly these). Runs with a swap file of its
own for the length of the test (root only), so the kernel has somewhere to page out to."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from applier.fixture import Checkpoint
from injector.maps import PAGEMAP_PRESENT, PAGEMAP_SWAPPED, holds_data, own_copies, read_page_flags
from injector.session import attach
from tests.procs import Target, assert_untouched, build_c, spawn

pytestmark = pytest.mark.live

PAGE = 4096
PAGES = 256


@pytest.fixture
def swap() -> Iterator[None]:
    """A 64 MiB swap file, on for this test only."""
    path = Path("/var/tmp") / f"applier-test-swap-{os.getpid()}"
    made = subprocess.run(
        f"dd if=/dev/zero of={path} bs=1M count=64 status=none && chmod 600 {path} && "
        f"mkswap {path} >/dev/null && swapon {path}",
        shell=True, check=False, capture_output=True, text=True,
    )  # fmt: skip
    if made.returncode:
        path.unlink(missing_ok=True)
        pytest.skip(f"no swap file possible here: {made.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["swapoff", str(path)], check=False)
        path.unlink(missing_ok=True)


def _command(t: Target, line: str) -> list[str]:
    t.send(line)
    return t.readline(30).split()


def _flags(pid: int, start: int, n: int) -> list[int]:
    fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
    try:
        return [int(f) for f in read_page_flags(fd, start, start + n * PAGE)]
    finally:
        os.close(fd)


def assert_data_pages_as_pagemap_says(pid: int) -> None:
    """Session.data_pages (PAGEMAP_SCAN, entries read only where swapped) says of every
    mapping what holds_data / own_copies say of all its pagemap entries."""
    with attach(pid) as session:
        for m in session.maps():
            if m.path in ("[vvar]", "[vvar_vclock]", "[vsyscall]"):
                continue  # no pagemap of their own (dumps skip them)
            flags = session.page_flags(m.start, m.end)
            for own, want in ((False, holds_data(flags)), (True, own_copies(flags))):
                got = session.data_pages(m.start, m.end, own=own)
                assert np.array_equal(got, want), (m, own, int(got.sum()), int(want.sum()))


def test_data_pages_of_a_tracked_and_an_untracked_process(target: Target) -> None:
    """The same answer as the pagemap's entries, before and while a tracker's PTE markers
    are in place (untouched pages of write-protected memory)."""
    assert _command(target, "scribble") == ["done"]
    assert_data_pages_as_pagemap_says(target.pid)
    with Checkpoint.take(target.pid):
        assert_data_pages_as_pagemap_says(target.pid)


def test_paged_out_written_pages_are_reverted(swap: None) -> None:
    """Pages written after the checkpoint and paged out before the reset come back as they
    were at the checkpoint."""
    with spawn(build_c("track_writer.c")) as t:
        t.expect("ready")
        base = int(_command(t, f"map {PAGES}")[1], 16)
        _command(t, f"fill {base:#x} {PAGES}")  # every page 1
        with Checkpoint.take(t.pid) as cp:
            assert cp.tracked
            with Path(f"/proc/{t.pid}/mem").open("rb") as mem:
                mem.seek(base)
                at_checkpoint = mem.read(PAGES * PAGE)
            _command(t, f"stride {base:#x} {PAGES // 4} 4")  # a quarter of the pages: 2
            _command(t, f"pageout {base:#x} {PAGES}")
            flags = _flags(t.pid, base, PAGES)
            swapped = [f & PAGEMAP_SWAPPED and not f & PAGEMAP_PRESENT for f in flags]
            assert sum(map(bool, swapped)) >= PAGES // 2, "the kernel paged out too little"
            assert_data_pages_as_pagemap_says(t.pid)  # swapped pages, PTE markers
            stats = cp.restore()
            assert stats.pages_written >= PAGES // 4
            with Path(f"/proc/{t.pid}/mem").open("rb") as mem:
                mem.seek(base)
                assert mem.read(PAGES * PAGE) == at_checkpoint
        assert_untouched(t)

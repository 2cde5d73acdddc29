"""Benchmark: parse a 100,000-entry pagemap and locate every page through a 3-level parent chain.

Builds three image directories in a temporary folder (``1`` <- ``2`` <- ``3``, each with a
100,000-entry pagemap of one-page runs; in ``3`` two runs in three are PE_PARENT holes, in
``2`` every other run is), then times ``ImageDir.open`` of the top directory, which decodes and
validates all three pagemaps and resolves every hole to the directory holding its bytes.
Pages files are sparse, so nothing big is written.  Run: ``python bench/bench_pagemap.py``.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from formats.imagedir import ImageDir
from formats.imagefile import dump_image
from formats.imagewriter import ImageWriter, anon_vma, x86_core
from formats.inventory import InventoryEntry, PstreeEntry
from formats.mm import MmEntry
from formats.pagemap import PE_LAZY, PE_PARENT, PE_PRESENT, make_entries
from formats.pagemap_msgs import PagemapHead

ENTRIES = 100_000
TARGET = 200_000  # entries per second
PAGE = 4096
BASE = 0x7F0000000000
PID = 1


def _flags(level: int, index: int) -> int:
    if level == 3 and index % 3:
        return PE_PARENT
    if level == 2 and index % 2 == 0:
        return PE_PARENT
    return PE_PRESENT | PE_LAZY


def build_chain(root: Path, entries: int = ENTRIES) -> Path:
    """Write the three directories; returns the top one."""
    for level in (1, 2, 3):
        path = root / str(level)
        writer = ImageWriter(path, parent=f"../{level - 1}" if level > 1 else None)
        mm = MmEntry(vmas=[anon_vma(BASE, BASE + 2 * entries * PAGE)])
        writer.add_process(
            PstreeEntry(pid=PID, ppid=0, pgid=PID, sid=PID, threads=[PID]),
            mm=mm,
            cores={PID: x86_core(BASE, BASE)},
        )
        inv = InventoryEntry(img_version=2 if level == 3 else 0, fdinfo_per_id=True)
        writer.finish(inv)
        runs = [(BASE + 2 * i * PAGE, 1, _flags(level, i)) for i in range(entries)]
        dump_image(
            path / f"pagemap-{PID}.img",
            "PAGEMAP",
            [PagemapHead(pages_id=1), *make_entries(runs, PAGE)],
        )
        present = sum(1 for _, _, f in runs if f & PE_PRESENT)
        with (path / "pages-1.img").open("wb") as fh:
            fh.truncate(present * PAGE)  # sparse: the benchmark never reads page bytes
    return root / "3"


def measure(top: Path, repeat: int = 3) -> tuple[float, int]:
    """Best wall time of open + page_runs, and the number of resolved runs."""
    best = float("inf")
    count = 0
    for _ in range(repeat):
        start = time.perf_counter()
        img = ImageDir.open(top)
        count = len(img.page_runs(PID))
        best = min(best, time.perf_counter() - start)
        img.close()
    return best, count


def main() -> int:
    """Build, time, print entries/second and the ratio to the aim."""
    with tempfile.TemporaryDirectory(prefix="bench-pagemap-") as tmp:
        t0 = time.perf_counter()
        top = build_chain(Path(tmp))
        built = time.perf_counter() - t0
        seconds, runs = measure(top)
    rate = ENTRIES / seconds
    print(f"built 3 x {ENTRIES} entries in {built:.1f} s (not timed)")
    print(f"open + resolve: {seconds * 1000:.1f} ms, {runs} runs located")
    print(f"top-level entries/s: {rate:,.0f}  (aim {TARGET:,}; ratio {rate / TARGET:.2f})")
    print(f"all-levels entries/s: {3 * ENTRIES / seconds:,.0f}")
    return 0  # a figure, not a test: ./run bench goes on to the next benchmark


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: the uffd-wp tracker's scan and reset against the raw ``PAGEMAP_SCAN`` ioctl.

Starts ``tests/targets/track_writer.c`` with 1 GiB of populated anonymous memory, opens a
uffd-wp tracker on it (registers and write-protects everything), has the target write 1% of
the pages (every 100th), then times, side by side in one run:

* the raw ioctl: one ``PAGEMAP_SCAN`` over the 1 GiB for ``PAGE_IS_WRITTEN`` pages, nothing else;
* ``tracker.dirty_pages()``: maps read, registration check, scan of everything tracked,
  expansion to a sorted page array;
* ``tracker.reset()`` against the raw reset ioctl (``PM_SCAN_WP_MATCHING``), each after the
  tracer rewrote the same 1% of the pages.

Figures are medians; the ratio is what counts (kernel-notes.md: quote ratios from one run).
``--content`` adds the content backend's scan of the same GiB, for comparison.
Run: ``python bench/bench_tracking.py [--json] [--content]``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from injector import _uffd
from injector.session import Session, attach
from injector.tracking import TrackerState, open_tracker, probe_backends, resume_tracker
from tests.procs import Target, build_c, spawn

PAGE = 4096
PAGES = (1 << 30) // PAGE
STRIDE = 100  # 1% of the pages
WRITTEN = PAGES // STRIDE
RUNS = 21
GOAL = 2.0  # tracker scan within 2x of the raw ioctl

libc = ctypes.CDLL(None, use_errno=True)
libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
libc.ioctl.restype = ctypes.c_int


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def _time(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _command(target: Target, line: str, reply: str) -> list[str]:
    target.send(line)
    return target.expect(reply, timeout=60)


def _rewrite(s: Session, base: int, value: bytes = b"\x01") -> None:
    """The tracer writes 1% of the pages again (tracer writes count as written)."""
    s.write_runs([(base + i * STRIDE * PAGE, value) for i in range(WRITTEN)])


def _content(s: Session, base: int, end: int) -> float:
    """Median time of the content backend's scan of the same memory (for comparison)."""
    tracker = open_tracker(s, "content")
    _rewrite(s, base, b"\x55")  # a value not there yet: the content backend sees changes only
    if len(tracker.dirty_pages([(base, end)])) != WRITTEN:
        raise SystemExit("bench_tracking: the content backend disagrees")
    samples = [_time(lambda: tracker.dirty_pages([(base, end)])) for _ in range(3)]
    tracker.close()
    return _median_ms(samples)


def run(with_content: bool = False) -> dict[str, float | int | str]:
    reason = probe_backends()["uffd-wp"]
    if reason is not None:
        raise SystemExit(f"bench_tracking: uffd-wp unavailable here: {reason}")
    with spawn(build_c("track_writer.c")) as target:
        target.expect("ready")
        base = int(_command(target, f"map {PAGES}", "map")[0], 16)
        _command(target, f"fill {base:#x} {PAGES}", "ok")
        end = base + PAGES * PAGE
        with attach(target.pid) as s:
            start = time.perf_counter()
            tracker = open_tracker(s, "uffd-wp")
            open_s = time.perf_counter() - start
            state: TrackerState = tracker.release()
        _command(target, f"stride {base:#x} {WRITTEN} {STRIDE}", "ok")

        pagemap = os.open(f"/proc/{target.pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        # The bare question "which pages were written", the query the kernel has a fast path
        # for (what the tracker asks too, after a per-mapping check for unwatched memory).
        written = _uffd.PAGE_IS_WRITTEN
        vec = np.zeros((8192, 3), dtype=np.uint64)
        arg = _uffd.PmScanArg()
        arg.size = ctypes.sizeof(arg)
        arg.vec = vec.ctypes.data
        arg.vec_len = len(vec)
        arg_address = ctypes.addressof(arg)

        def raw_ioctl(flags: int, mask: int) -> int:
            """One bare ioctl over the 1 GiB (the buffer holds every region, no loop needed)."""
            arg.start, arg.end, arg.flags = base, end, flags
            arg.category_mask = arg.return_mask = mask
            n: int = libc.ioctl(pagemap, _uffd.PAGEMAP_SCAN, arg_address)
            if n < 0:
                raise OSError(ctypes.get_errno(), "PAGEMAP_SCAN")
            return n

        try:
            with attach(target.pid) as s:
                tracker = resume_tracker(s, state)
                expected = WRITTEN
                found = tracker.dirty_pages([(base, end)])
                if len(found) != expected:
                    raise SystemExit(
                        f"bench_tracking: {len(found)} pages found, {expected} written"
                    )

                def raw_scan() -> int:
                    return raw_ioctl(0, written)

                def raw_reset() -> int:
                    flags = _uffd.PM_SCAN_WP_MATCHING | _uffd.PM_SCAN_CHECK_WPASYNC
                    return raw_ioctl(flags, _uffd.PAGE_IS_WRITTEN)

                if raw_scan() != expected:  # each written page is its own region here
                    raise SystemExit("bench_tracking: the raw ioctl disagrees")
                scan_raw: list[float] = []
                scan_tracker: list[float] = []
                scan_region: list[float] = []
                for _ in range(RUNS):  # interleaved, so drift hits both alike
                    scan_raw.append(_time(raw_scan))
                    scan_tracker.append(_time(tracker.dirty_pages))
                    scan_region.append(_time(lambda: tracker.dirty_pages([(base, end)])))
                reset_raw: list[float] = []
                reset_tracker: list[float] = []
                for _ in range(RUNS // 2):
                    _rewrite(s, base)
                    reset_raw.append(_time(raw_reset))
                    _rewrite(s, base)
                    reset_tracker.append(_time(tracker.reset))
                if len(tracker.dirty_pages()) != 0:
                    raise SystemExit("bench_tracking: pages still written after reset")
                tracker.close()
                content_ms = _content(s, base, end) if with_content else 0.0
        finally:
            os.close(pagemap)
    result: dict[str, float | int | str] = {
        "registered_bytes": PAGES * PAGE,
        "written_pages": expected,
        "open_ms": open_s * 1e3,
        "raw_scan_ms": _median_ms(scan_raw),
        "tracker_scan_ms": _median_ms(scan_tracker),
        "tracker_scan_region_ms": _median_ms(scan_region),
        "raw_reset_ms": _median_ms(reset_raw),
        "tracker_reset_ms": _median_ms(reset_tracker),
    }
    if with_content:
        result["content_scan_region_ms"] = content_ms
    result["scan_ratio"] = float(result["tracker_scan_ms"]) / float(result["raw_scan_ms"])
    result["reset_ratio"] = float(result["tracker_reset_ms"]) / float(result["raw_reset_ms"])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--content", action="store_true", help="also time the content backend (1 GiB copy)"
    )
    args, _ = parser.parse_known_args(argv)
    r = run(args.content)
    if args.json:
        print(json.dumps(r, sort_keys=True))
    else:
        print(
            f"tracking: 1 GiB registered, {r['written_pages']} pages written (1%), "
            f"medians of {RUNS} runs"
        )
        print(f"  open (register + first write-protect) {float(r['open_ms']):8.3f} ms")
        print(f"  raw PAGEMAP_SCAN ioctl                {float(r['raw_scan_ms']):8.3f} ms")
        print(f"  tracker.dirty_pages()                 {float(r['tracker_scan_ms']):8.3f} ms")
        print(
            f"  tracker.dirty_pages(1 GiB region)     {float(r['tracker_scan_region_ms']):8.3f} ms"
        )
        print(f"  scan ratio tracker/raw                {float(r['scan_ratio']):8.2f}x")
        print(f"  raw reset ioctl (WP_MATCHING)         {float(r['raw_reset_ms']):8.3f} ms")
        print(f"  tracker.reset()                       {float(r['tracker_reset_ms']):8.3f} ms")
        print(f"  reset ratio tracker/raw               {float(r['reset_ratio']):8.2f}x")
        if "content_scan_region_ms" in r:
            content = float(r["content_scan_region_ms"])
            print(f"  content backend, same 1 GiB           {content:8.3f} ms")
        verdict = "within" if float(r["scan_ratio"]) <= GOAL else "NOT within"
        print(f"  scan {verdict} the {GOAL:.0f}x goal")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: applier dump against the raw floor of the same run, and incremental dumps of a
small and a large process with the same number of written pages.

Floor of a full dump: process_vm_readv of every page the dump stores, from the stopped target
into an 8 MiB buffer, each chunk written to a file in the same directory (tmpfs: /dev/shm),
through ctypes and os.write; no image format, no selection. applier's figure is the whole
``applier.dump.dump`` call (stop, read the layout and the pagemap, select, copy, write the
images, detach).

Incremental: ``dump --parent`` of a tracked 1 GiB and a 4 GiB target after the same number of
pages (2,621: 1% of 1 GiB) were written: the cost should not grow with the process.

    python bench/bench_dump.py [--mib 1024] [--big 4096] [--repeat 3] [--dir /dev/shm]
"""

# ruff: noqa: E402 (the repository is put on sys.path first)

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from applier.dump import dump
from bench.bench_apply import (
    PTRACE_DETACH,
    PTRACE_INTERRUPT,
    PTRACE_SEIZE,
    WALL,
    Target,
    build_target,
    libc,
)
from bench.report import record

PAGE = 4096
CHUNK = 8 << 20
DIRTY = 2621

libc.process_vm_readv.argtypes = libc.process_vm_writev.argtypes
libc.process_vm_readv.restype = ctypes.c_ssize_t


class Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def floor(pid: int, base: int, length: int, out: Path) -> float:
    """Stop, read every page in 8 MiB chunks and write them to ``out``, detach."""
    buf = ctypes.create_string_buffer(CHUNK)
    status = ctypes.c_int()
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    t0 = time.perf_counter()
    libc.ptrace(PTRACE_SEIZE, pid, None, None)
    libc.ptrace(PTRACE_INTERRUPT, pid, None, None)
    libc.waitpid(pid, ctypes.byref(status), WALL)
    for off in range(0, length, CHUNK):
        n = min(CHUNK, length - off)
        local = Iovec(ctypes.addressof(buf), n)
        remote = Iovec(base + off, n)
        got = libc.process_vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
        if got != n:
            raise OSError(ctypes.get_errno(), "process_vm_readv")
        os.write(fd, memoryview(buf)[:n])
    libc.ptrace(PTRACE_DETACH, pid, None, None)
    os.close(fd)
    return time.perf_counter() - t0


def full_dump(target: Target, work: Path, repeat: int) -> tuple[float, float]:
    floors, ours = [], []
    for i in range(repeat):
        raw = work / f"raw-{i}"
        floors.append(floor(target.proc.pid, target.base, target.length, raw))
        raw.unlink()
        out = work / f"full-{i}"
        t0 = time.perf_counter()
        dump(target.proc.pid, out)
        ours.append(time.perf_counter() - t0)
        shutil.rmtree(out)
    return statistics.median(floors), statistics.median(ours)


def incremental(binary: Path, mib: int, work: Path, repeat: int) -> float:
    """Median seconds of dump --parent after DIRTY written pages, for a ``mib`` MiB target."""
    target = Target(binary, mib)
    try:
        base = work / f"base-{mib}"
        dump(target.proc.pid, base, track=True)
        times = []
        parent = base
        for i in range(repeat):
            assert target.proc.stdin is not None
            target.proc.stdin.write(f"dirtyn {DIRTY} {i + 1}\n".encode())
            target.proc.stdin.flush()
            target.line()
            layer = work / f"layer-{mib}-{i}"
            t0 = time.perf_counter()
            st = dump(target.proc.pid, layer, parent=parent)
            times.append(time.perf_counter() - t0)
            assert st.pages <= DIRTY + 64, st.pages  # only what was written (plus the stack)
            parent = layer
        return statistics.median(times)
    finally:
        target.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--big", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default="/dev/shm")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="applier-bench-dump-", dir=args.dir))
    binary = build_target()
    try:
        target = Target(binary, args.mib)
        try:
            f, o = full_dump(target, work, args.repeat)
        finally:
            target.stop()
        print(f"{'case':<40}{'floor ms':>10}{'applier ms':>12}{'ratio':>8}")
        print(f"{f'full dump, {args.mib} MiB':<40}{f * 1e3:>10.1f}{o * 1e3:>12.1f}{o / f:>8.2f}x"
              "  (aim 2x)")  # fmt: skip
        record("dump", f"full dump of {args.mib} MiB to {args.dir}", f * 1e3, o * 1e3, "2x")
        small = incremental(binary, args.mib, work, args.repeat)
        big = incremental(binary, args.big, work, args.repeat)
        print(f"{f'incremental, {DIRTY} pages, {args.mib} MiB':<40}{'':>10}{small * 1e3:>12.1f}")
        print(f"{f'incremental, {DIRTY} pages, {args.big} MiB':<40}{'':>10}{big * 1e3:>12.1f}"
              f"{big / small:>8.2f}x  (aim 1.5x of {args.mib} MiB)")  # fmt: skip
        record("dump", f"incremental dump, {DIRTY} pages, {args.big} MiB (floor: {args.mib} MiB)",
               small * 1e3, big * 1e3, "1.5x")  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

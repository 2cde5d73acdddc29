"""Injector speed against the raw kernel floor, measured side by side in one run.

Each figure is the median of several rounds, printed next to the same operation done with
bare ctypes calls (no Python work besides the calls) and their ratio. Machines are noisy:
compare the ratios, not the absolute times.

    .venv/bin/python bench/bench_injector.py [--mib 256] [--rounds 7]
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from injector import _libc, attach
from tests.procs import Target, build_c, spawn

PAGE = 4096
SYS_GETPID = 39


def median_time(fn: Callable[[], object], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def repeat(fn: Callable[[], None], n: int) -> None:
    for _ in range(n):
        fn()


def row(name: str, ours: float, raw: float, unit: str = "ms", extra: str = "") -> None:
    scale = {"ms": 1e3, "us": 1e6}[unit]
    ratio = raw / ours if ours else float("nan")
    print(
        f"{name:<44} {ours * scale:10.1f} {unit}   raw {raw * scale:10.1f} {unit}   "
        f"ours/raw speed {ratio:6.1%}{extra}"
    )


def ready(target: Target) -> None:
    target.expect("ready")


def tids_of(pid: int) -> list[int]:
    tids = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    tids.remove(pid)
    return [pid, *tids]


def raw_stop_detach(tids: list[int]) -> None:
    """SEIZE + INTERRUPT every thread, wait for all, DETACH all: the bare floor."""
    for tid in tids:
        _libc.ptrace(_libc.PTRACE_SEIZE, tid, 0, 0)
        _libc.ptrace(_libc.PTRACE_INTERRUPT, tid)
    for tid in tids:
        _libc.waitpid(tid, _libc.WALL)
    for tid in tids:
        _libc.ptrace(_libc.PTRACE_DETACH, tid, 0, 0)


def bench_stop(binary: Path, rounds: int) -> None:
    for label, args in (
        ("stop+detach, 1 thread", ()),
        ("stop+detach, 8 sleeping threads (+leader)", ("read", "4", "sleep", "4")),
        ("stop+detach, 8 busy threads (+leader)", ("busy", "8")),
    ):
        with spawn(binary, *args) as t:
            ready(t)
            tids = tids_of(t.pid)

            def ours(pid: int = t.pid) -> None:
                with attach(pid):
                    pass

            raw = median_time(functools.partial(raw_stop_detach, tids), rounds * 3)
            mine = median_time(ours, rounds * 3)
            row(label, mine, raw, "us")


def bench_syscall(binary: Path, rounds: int) -> None:
    with spawn(binary) as t:
        ready(t)
        with attach(t.pid) as s:
            s.syscall(SYS_GETPID)  # finds and caches the vDSO instruction
            insn = s.syscall_site()
            tid = t.pid

            def raw() -> None:
                # The same protocol with bare calls: regs, to entry, to exit, interrupt stop,
                # regs back.
                buf = (ctypes.c_uint64 * 27)()
                _libc.ptrace_regset(
                    _libc.PTRACE_GETREGSET, tid, 1, ctypes.addressof(buf), ctypes.sizeof(buf)
                )
                keep = bytes(buf)
                buf[16], buf[10], buf[15] = insn, SYS_GETPID, (1 << 64) - 1
                _libc.ptrace_regset(
                    _libc.PTRACE_SETREGSET, tid, 1, ctypes.addressof(buf), ctypes.sizeof(buf)
                )
                _libc.ptrace(_libc.PTRACE_SYSCALL, tid)
                _libc.waitpid(tid, _libc.WALL)
                _libc.ptrace(_libc.PTRACE_SYSCALL, tid)
                _libc.waitpid(tid, _libc.WALL)
                _libc.ptrace_regset(
                    _libc.PTRACE_GETREGSET, tid, 1, ctypes.addressof(buf), ctypes.sizeof(buf)
                )
                _libc.ptrace(_libc.PTRACE_INTERRUPT, tid)
                _libc.ptrace(_libc.PTRACE_CONT, tid)
                _libc.waitpid(tid, _libc.WALL)
                ctypes.memmove(buf, keep, len(keep))
                _libc.ptrace_regset(
                    _libc.PTRACE_SETREGSET, tid, 1, ctypes.addressof(buf), ctypes.sizeof(buf)
                )

            def ours() -> None:
                s.syscall(SYS_GETPID)

            n = 200
            raw_t = median_time(lambda: repeat(raw, n), rounds) / n
            ours_t = median_time(lambda: repeat(ours, n), rounds) / n
            row("one injected syscall (getpid)", ours_t, raw_t, "us")


def bench_pages(binary: Path, mib: int, rounds: int) -> None:
    npages = mib * 1024 * 1024 // PAGE
    with spawn(binary) as t:
        ready(t)
        with attach(t.pid) as s:
            region = s.mmap(0, 2 * npages * PAGE, 3, 0x22)  # every other page gets written
            source = np.random.default_rng(1).integers(0, 256, npages * PAGE, dtype=np.uint8)
            view = source.data.cast("B")
            addrs = region + 2 * PAGE * np.arange(npages, dtype=np.uint64)
            runs = [(int(a), view[i * PAGE : (i + 1) * PAGE]) for i, a in enumerate(addrs)]

            local = np.empty((npages, 2), dtype=np.uint64)
            local[:, 0] = source.ctypes.data + PAGE * np.arange(npages, dtype=np.uint64)
            local[:, 1] = PAGE
            remote = np.empty((npages, 2), dtype=np.uint64)
            remote[:, 0] = addrs
            remote[:, 1] = PAGE

            def raw() -> None:
                for first in range(0, npages, _libc.IOV_MAX):
                    count = min(_libc.IOV_MAX, npages - first)
                    done = _libc.process_vm_writev(
                        t.pid,
                        local.ctypes.data + 16 * first,
                        count,
                        remote.ctypes.data + 16 * first,
                        count,
                    )
                    assert done == count * PAGE

            raw()  # fault the target's pages in before timing anything
            raw_times, our_times = [], []
            for _ in range(rounds):  # interleaved, so drift hits both alike
                raw_times.append(median_time(raw, 1))
                our_times.append(median_time(lambda: s.write_runs(runs), 1))
            raw_t, ours_t = statistics.median(raw_times), statistics.median(our_times)
            check = s.read(int(addrs[-1]), PAGE) == bytes(view[-PAGE:])
            gbps = npages * PAGE / ours_t / 1e9
            row(
                f"write_runs {mib} MiB as {npages} scattered 4 KiB pages",
                ours_t,
                raw_t,
                "ms",
                f"   ({gbps:.2f} GB/s, {ours_t / npages * 1e6:.2f} us/page, verified {check})",
            )
            s.munmap(region, 2 * npages * PAGE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="page data written (MiB)")
    parser.add_argument("--rounds", type=int, default=7, help="rounds per figure (median)")
    args = parser.parse_args()
    binary = build_c("inj_target.c")
    print(f"injector bench: pid {os.getpid()}, {os.cpu_count()} CPUs, median of {args.rounds}")
    bench_pages(binary, args.mib, args.rounds)
    bench_stop(binary, args.rounds)
    bench_syscall(binary, args.rounds)


if __name__ == "__main__":
    main()

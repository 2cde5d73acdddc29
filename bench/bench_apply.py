"""Benchmark: revert 1%, 10% and 100% of a 1 GiB process, beside the raw floor of the same run.

The floor is what no tool can beat: PTRACE_SEIZE + INTERRUPT + wait, process_vm_writev of
exactly the pages to restore (from the same mmap'd pages file, contiguous pages in one iovec,
1,024 iovecs a call), PTRACE_DETACH, all through ctypes. applier's figure is the whole
``applier.api.apply`` call: open and validate the image, stop, resume the dirty tracker, read
the live layout, plan, keep the undo copy, write, verify, reset tracking, detach.

Also measured: peak RSS of a separate process applying the full 1 GiB image.

Every case first runs ``--warmup`` untimed rounds (floor and applier alike): the first writes
after the dump split the target's transparent huge pages, and the first apply in a process
allocates its undo spool and buffers, so without them a median of few repeats mixes a cold
round with warm ones (``--warmup 0`` shows the cold figures).

    python bench/bench_apply.py [--mib 1024] [--repeat 5] [--warmup 1]
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from applier.api import apply  # noqa: E402
from applier.dump import dump  # noqa: E402
from bench.report import record  # noqa: E402

PAGE = 4096
libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
libc.ptrace.restype = ctypes.c_long
libc.process_vm_writev.argtypes = [
    ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong
]  # fmt: skip
libc.process_vm_writev.restype = ctypes.c_ssize_t
PTRACE_SEIZE, PTRACE_INTERRUPT, PTRACE_DETACH = 0x4206, 0x4207, 17
WALL = 0x40000000


class Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def build_target() -> Path:
    out = Path(tempfile.gettempdir()) / "applier-bench-target"
    subprocess.run(
        ["gcc", "-O2", "-o", str(out), str(ROOT / "bench" / "bench_target.c")], check=True
    )
    return out


class Target:
    def __init__(self, binary: Path, mib: int) -> None:
        self.proc = subprocess.Popen(
            [str(binary), str(mib)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        words = self.line(120).split()
        self.base, self.length = int(words[1], 16), int(words[2])

    def line(self, timeout: float = 60) -> str:
        assert self.proc.stdout is not None
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            raise TimeoutError("bench target did not answer")
        return self.proc.stdout.readline().decode()

    def dirty(self, permille: int, seed: int) -> list[int]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"dirty {permille} {seed}\n".encode())
        self.proc.stdin.flush()
        self.line()
        pages = self.length // PAGE
        return [self.base + p * PAGE for p in range(pages) if (p * 7919 + seed) % 1000 < permille]

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def raw_floor(pid: int, pages: list[int], src: mmap.mmap, src_base: int) -> float:
    """Seconds for stop + process_vm_writev of ``pages`` + detach, all raw."""
    local_base = ctypes.addressof(ctypes.c_char.from_buffer(src))
    runs: list[tuple[int, int]] = []
    for a in pages:
        if runs and runs[-1][0] + runs[-1][1] == a:
            runs[-1] = (runs[-1][0], runs[-1][1] + PAGE)
        else:
            runs.append((a, PAGE))
    local = (Iovec * len(runs))(*[Iovec(local_base + (a - src_base), n) for a, n in runs])
    remote = (Iovec * len(runs))(*[Iovec(a, n) for a, n in runs])
    status = ctypes.c_int()
    t0 = time.perf_counter()
    if libc.ptrace(PTRACE_SEIZE, pid, None, None) != 0:
        raise OSError(ctypes.get_errno(), "PTRACE_SEIZE")
    libc.ptrace(PTRACE_INTERRUPT, pid, None, None)
    libc.waitpid(pid, ctypes.byref(status), WALL)
    size = ctypes.sizeof(Iovec)
    for i in range(0, len(runs), 1024):
        n = min(1024, len(runs) - i)
        want = sum(r[1] for r in runs[i : i + n])
        got = libc.process_vm_writev(
            pid, ctypes.addressof(local) + i * size, n, ctypes.addressof(remote) + i * size, n, 0
        )
        if got != want:
            raise OSError(ctypes.get_errno(), f"process_vm_writev wrote {got} of {want}")
    libc.ptrace(PTRACE_DETACH, pid, None, None)
    return time.perf_counter() - t0


def median(fn: Callable[[], float], repeat: int) -> float:
    return statistics.median(fn() for _ in range(repeat))


def peak_rss_of_apply(image: Path, pid: int) -> int:
    """Peak RSS (KiB) of a fresh Python process that applies the whole image into ``pid``.

    Read as VmHWM inside that process: ``ru_maxrss`` from wait4 would report this benchmark's
    own RSS (the 1 GiB it maps), which a child inherits as its high-water mark through exec.
    """
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from applier.api import apply; "
        "apply(sys.argv[2], int(sys.argv[3])); "
        "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(ROOT), str(image), str(pid)],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(out.stdout.split()[-1])


def cli_case(target: Target, image: Path, src: mmap.mmap, args: argparse.Namespace) -> None:
    """The command line: ``applier --version``, and ``apply --only-dirty`` at 1% in a new
    interpreter each time (start, imports, image open included) against the same floor."""
    applier = [sys.executable, "-m", "applier"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    times = []
    for _ in range(3 * args.repeat):  # 30 ms each: more rounds for a steadier median
        t0 = time.perf_counter()
        subprocess.run([*applier, "--version"], check=True, env=env, capture_output=True)
        times.append(time.perf_counter() - t0)
    version = statistics.median(times)
    print(f"{'applier --version':<31}{'':>10}{version * 1e3:>12.2f}")
    record("apply", "CLI applier --version", None, version * 1e3, "30 ms")
    floors, ours = [], []
    for round_ in range(args.warmup + args.repeat):
        pages = target.dirty(10, 1000 + round_)
        f = raw_floor(target.proc.pid, pages, src, target.base)
        target.dirty(10, 1000 + round_)
        t0 = time.perf_counter()
        subprocess.run(
            [*applier, "-q", "apply", str(image), "--into", str(target.proc.pid),
             "--only-dirty"], check=True, env=env, capture_output=True,
        )  # fmt: skip
        if round_ >= args.warmup:
            floors.append(f)
            ours.append(time.perf_counter() - t0)
    f, o = statistics.median(floors), statistics.median(ours)
    print(f"{'CLI apply --only-dirty, 1%':<31}{f * 1e3:>10.2f}{o * 1e3:>12.2f}{o / f:>8.2f}x")
    record("apply", f"CLI apply --only-dirty, 1% of {args.mib} MiB", f * 1e3, o * 1e3, "8x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds before each case")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="applier-bench-"))
    target = Target(build_target(), args.mib)
    try:
        image = work / "ckpt"
        st = dump(target.proc.pid, image, track=True)
        print(f"target: {args.mib} MiB, dumped {st.pages} pages in {st.seconds:.2f} s, "
              f"tracking: {st.tracking or st.tracking_note}")  # fmt: skip
        pages_file = next(image.glob("pages-*.img"))
        with pages_file.open("rb") as fh:
            src = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
        # the dump holds the region in one run starting at the region's base
        print(f"{'case':<31}{'floor ms':>10}{'applier ms':>12}{'ratio':>8}")
        seed = 1
        labels = {
            (10, True): "1% (only-dirty, tracker)",
            (10, False): "1% (... --no-undo --no-verify)",
            (100, True): "10% (only-dirty, tracker)",
            (100, False): "10% (... --no-undo --no-verify)",
        }
        for permille in (10, 100):
            # The defaults and the bare apply take turns, round by round, so that the two
            # medians see the same machine (its speed drifts by 2x over minutes here); these
            # cases are cheap, so three times the rounds.
            turn_floors: dict[bool, list[float]] = {True: [], False: []}
            turn_ours: dict[bool, list[float]] = {True: [], False: []}
            for round_ in range(args.warmup + 3 * args.repeat):
                for safe in (True, False):
                    seed += 1
                    pages = target.dirty(permille, seed)
                    f = raw_floor(target.proc.pid, pages, src, target.base)
                    target.dirty(permille, seed)  # the floor wrote them back: dirty them again
                    t0 = time.perf_counter()
                    res = apply(image, target.proc.pid, only_dirty=True, undo=safe, verify=safe)
                    o = time.perf_counter() - t0
                    assert res.stats.pages_written >= len(pages), res.stats
                    if round_ >= args.warmup:  # the rounds before are the warm-up
                        turn_floors[safe].append(f)
                        turn_ours[safe].append(o)
            for safe in (True, False):
                label = labels[permille, safe]
                f, o = statistics.median(turn_floors[safe]), statistics.median(turn_ours[safe])
                print(f"{label:<31}{f * 1e3:>10.2f}{o * 1e3:>12.2f}{o / f:>8.2f}x")
                record("apply", f"API apply {label}, {args.mib} MiB", f * 1e3, o * 1e3)
            safe_ms, bare_ms = (
                statistics.median(turn_ours[True]),
                statistics.median(turn_ours[False]),
            )
            print(f"  undo + verify add {100 * (safe_ms / bare_ms - 1):.0f}% to the bare apply"
                  f" at {permille / 10:g}% (aim at 1%: 25%)")  # fmt: skip
            if permille == 10:
                record("apply", "undo + verify over the bare apply at 1% (percent, not ms)",
                       None, 100 * (safe_ms / bare_ms - 1), "25%")  # fmt: skip
        cli_case(target, image, src, args)
        all_pages = [target.base + i * PAGE for i in range(target.length // PAGE)]
        for verify, undo, label in (
            (True, True, "100% (default: undo+verify)"),
            (True, False, "100% (--no-undo)"),
            (False, False, "100% (--no-undo --no-verify)"),
        ):
            floors: list[float] = []
            ours: list[float] = []
            for round_ in range(args.warmup + max(2, args.repeat // 2)):
                if round_ == args.warmup:
                    floors, ours = [], []
                target.dirty(1000, 0)
                floors.append(raw_floor(target.proc.pid, all_pages, src, target.base))
                target.dirty(1000, 0)
                t0 = time.perf_counter()
                apply(image, target.proc.pid, verify=verify, undo=undo)
                ours.append(time.perf_counter() - t0)
            f, o = statistics.median(floors), statistics.median(ours)
            print(f"{label:<31}{f * 1e3:>10.2f}{o * 1e3:>12.2f}{o / f:>8.2f}x")
            record("apply", f"API apply {label}, {args.mib} MiB", f * 1e3, o * 1e3,
                   "2x with the defaults" if undo else "")  # fmt: skip
        target.dirty(1000, 0)
        rss = peak_rss_of_apply(image, target.proc.pid)
        print(f"peak RSS of a process applying the {args.mib} MiB image: {rss / 1024:.1f} MiB "
              f"(aim: < 150 MiB)")  # fmt: skip
        record("apply", f"peak RSS applying {args.mib} MiB (MiB, not ms)", None, rss / 1024,
               "< 150 MiB")  # fmt: skip
        print("aims: CLI 1% within 8x (interpreter start included), 100% (defaults) within 2x")
    finally:
        target.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Benchmark: what surviving applier's own death costs, and what recovering from it costs.

An apply writes a journal and holds its target in a group stop under ptrace before its first
write (docs/cli.md, "What happens to the target"), so that applier killed at any moment leaves
the target stopped with a journal instead of running half-applied. Measured here, on a
target of ``--threads`` threads:

- **hold**: attach + hold (SIGSTOP taken under ptrace by every thread) + detach + SIGCONT,
  against attach + detach alone (the floor of any apply);
- **journal**: writing the journal, its hold mark, and removing both;
- **recover**: an ``applier apply`` of a ``--mib`` MiB image killed with SIGKILL right after
  its hold, then ``applier recover PID`` (a new interpreter), which applies the image again;
  checked: the memory is the image's afterwards.

    python bench/bench_hold.py [--mib 256] [--threads 8] [--repeat 21]
"""

# ruff: noqa: E402 (the repository is put on sys.path first)

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from applier.dump import dump
from applier.journal import Journal
from bench.bench_apply import Target, build_target
from bench.report import record
from injector.session import attach

THREADS_C = r"""
#include <pthread.h>
#include <stdlib.h>
#include <unistd.h>
static void *idle(void *arg) { (void)arg; for (;;) pause(); return 0; }
int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 8;
    for (int i = 0; i < n; i++) { pthread_t t; pthread_create(&t, 0, idle, 0); }
    for (;;) pause();
}
"""


def median_ms(fn: object, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def held(pid: int) -> bool:
    """Whether an apply of ``pid`` holds it (its journal and hold mark are written)."""
    journal = Journal.find(pid)
    return journal is not None and journal.held_mark.exists()


def region_hash(pid: int, start: int, length: int) -> str:
    with open(f"/proc/{pid}/mem", "rb") as mem:
        mem.seek(start)
        return hashlib.sha256(mem.read(length)).hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=21)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="applier-bench-hold-"))
    src = work / "threads.c"
    src.write_text(
        THREADS_C.replace("#include <unistd.h>", "#include <unistd.h>\n#include <stdlib.h>")
    )
    binary = work / "threads"
    subprocess.run(["gcc", "-O2", "-pthread", "-o", str(binary), str(src)], check=True)
    proc = subprocess.Popen([str(binary), str(args.threads)])
    try:
        deadline = time.monotonic() + 10
        while len(os.listdir(f"/proc/{proc.pid}/task")) < args.threads + 1:
            if time.monotonic() > deadline:
                raise RuntimeError("threads did not start")
            time.sleep(0.001)

        def plain() -> None:
            with attach(proc.pid):
                pass

        def holding() -> None:
            with attach(proc.pid) as s:
                s.hold()

        def journal() -> None:
            j = Journal.begin(proc.pid, work, task=None, parts=("memory",), only_dirty=False,
                              leave_shared=False, was_stopped=False)  # fmt: skip
            j.mark_held()
            j.remove()

        base = median_ms(plain, args.repeat)
        hold = median_ms(holding, args.repeat)
        jrn = median_ms(journal, args.repeat)
    finally:
        proc.kill()
        proc.wait()
    print(f"{args.threads + 1} threads, medians of {args.repeat}")
    print(f"  attach + detach               {base:8.3f} ms")
    print(f"  attach + hold + detach        {hold:8.3f} ms   (+{hold - base:.3f} ms)")
    print(f"  journal + hold mark + remove  {jrn:8.3f} ms")
    record("hold", f"attach + hold + detach, {args.threads + 1} threads (floor: no hold)", base,
           hold)  # fmt: skip
    record("hold", "journal + hold mark + remove, per apply", None, jrn)

    # recovery: an apply killed right after its hold, then recover
    target = Target(build_target(), args.mib)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    applier = [sys.executable, "-m", "applier"]
    try:
        image = work / "ckpt"
        dump(target.proc.pid, image)
        want = region_hash(target.proc.pid, target.base, target.length)
        times = []
        for seed in range(3):
            target.dirty(1000, seed + 1)  # every page differs from the image
            cmd = [*applier, "apply", str(image), "--into", str(target.proc.pid)]
            quiet = subprocess.DEVNULL
            p = subprocess.Popen(cmd, env=env, stdout=quiet, stderr=quiet)
            while not held(target.proc.pid):
                if p.poll() is not None:
                    raise RuntimeError("the apply ended before it could be killed")
                time.sleep(0.0002)
            p.send_signal(signal.SIGKILL)
            p.wait()
            t0 = time.perf_counter()
            subprocess.run([*applier, "recover", str(target.proc.pid)], env=env, check=True,
                           capture_output=True)  # fmt: skip
            times.append(time.perf_counter() - t0)
            assert region_hash(target.proc.pid, target.base, target.length) == want
        rec = statistics.median(times) * 1e3
    finally:
        target.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"  recover after SIGKILL at the hold, {args.mib} MiB every page: {rec:.1f} ms "
        "(CLI, interpreter start included; memory checked equal to the image)"
    )
    record("hold", f"applier recover after kill -9, {args.mib} MiB", None, rec)


if __name__ == "__main__":
    main()

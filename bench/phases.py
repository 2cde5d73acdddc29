"""Where a warm ``Checkpoint.restore()`` spends its time, phase by phase.

Not a benchmark with a floor (``./run bench`` does not run it): a tool for finding what to
make faster. It wraps the functions an apply goes through with timers (each wrapper adds a
microsecond or two), restores a target ``--rounds`` times after it wrote to itself, and
prints the median time per restore spent inside each, largest first. The phases overlap
(``_apply_held`` holds ``_Image.plan``, which holds ``live_task``, ...).

    python bench/phases.py [--target bench|memcached] [--mib 1024] [--rounds 25]

``bench``: the 1 GiB bench target with 1% of its pages written before each restore (as in
bench_reset.py); ``memcached``: a memcached of ``--keys`` keys with 200 of them overwritten
in place (as bench_server.py's in-place case).
"""

# ruff: noqa: E402 (the repository is put on sys.path first)

from __future__ import annotations

import argparse
import collections
import functools
import importlib
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from applier.fixture import Checkpoint

# (module, qualified name) of what is timed; a name bound into another module (``from x
# import f``) is wrapped where the apply looks it up.
PHASES = (
    ("applier.fixture", "Checkpoint.restore"),
    ("applier.api", "_apply_held"),
    ("applier.api", "_Image.plan"),
    ("applier.api", "live_task"),
    ("applier.api", "make_plan"),
    ("applier.api", "_unshared"),
    ("applier.api", "_KeptTracker.resume_later"),
    ("applier.api", "_KeptTracker.done"),
    ("injector.tracking.base", "Pending.result"),
    ("applier.api", "attach"),
    ("applier.capture", "live_signals"),
    ("applier.capture", "mm_fields"),
    ("applier.executor", "Executor.apply"),
    ("applier.executor", "Executor.validate"),
    ("applier.executor.pages", "Pieces.__init__"),
    ("applier.journal", "Journal.find"),
    ("applier.journal", "Journal.begin"),
    ("applier.journal", "Journal.mark_held"),
    ("applier.journal", "Journal.remove"),
    ("injector.calls", "NamedCalls.sigactions"),
    ("injector.calls", "NamedCalls.brk"),
    ("injector.memory", "MemoryIO.write_iov"),
    ("injector.session", "Session.maps"),
    ("injector.session", "Session.get_regs"),
    ("injector.session", "Session.descriptors"),
    ("injector.session", "Session.children"),
    ("injector.session", "Session.sig_dispositions"),
    ("injector.tracer", "Tracer.hold"),
    ("injector.tracer", "Tracer.detach"),
)


def wrap_all(spent: dict[str, float]) -> None:
    """Replace each of PHASES by a wrapper that adds its time to ``spent[name]``."""
    for module_name, qualified in PHASES:
        owner: Any = importlib.import_module(module_name)
        *path, name = qualified.split(".")
        for part in path:
            owner = getattr(owner, part)
        raw = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
        kind = type(raw) if isinstance(raw, staticmethod | classmethod) else None
        func: Callable[..., Any] = raw.__func__ if kind is not None else raw

        def timed(
            *args: Any, _f: Callable[..., Any] = func, _n: str = qualified, **kwargs: Any
        ) -> Any:
            t0 = time.perf_counter()
            try:
                return _f(*args, **kwargs)
            finally:
                spent[_n] += time.perf_counter() - t0

        functools.update_wrapper(timed, func)
        setattr(owner, name, kind(timed) if kind is not None else timed)


def report(per_restore: dict[str, list[float]], rounds: int) -> None:
    print(f"medians over {rounds} restores (ms; phases overlap)")
    for name, times in sorted(per_restore.items(), key=lambda kv: -statistics.median(kv[1])):
        print(f"  {name:<36}{statistics.median(times) * 1e3:>9.3f}")


def measure(cp: Checkpoint, change: Callable[[int], object], rounds: int) -> dict[str, list[float]]:
    spent: dict[str, float] = collections.defaultdict(float)
    for i in range(3):  # warm up (and the first restore resumes the tracker)
        change(i)
        cp.restore()
    wrap_all(spent)
    per_restore: dict[str, list[float]] = collections.defaultdict(list)
    for i in range(rounds):
        change(100 + i)
        spent.clear()
        cp.restore()
        for name, seconds in spent.items():
            per_restore[name].append(seconds)
    return per_restore


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", choices=("bench", "memcached"), default="bench")
    ap.add_argument("--mib", type=int, default=1024, help="bench target size")
    ap.add_argument("--keys", type=int, default=200_000, help="memcached keys")
    ap.add_argument("--rounds", type=int, default=25)
    args = ap.parse_args()
    if args.target == "bench":
        from bench.bench_apply import Target, build_target  # noqa: PLC0415

        target = Target(build_target(), args.mib)
        try:
            with Checkpoint.take(target.proc.pid) as cp:
                report(measure(cp, lambda seed: target.dirty(10, seed), args.rounds), args.rounds)
        finally:
            target.stop()
        return
    from bench.bench_server import Memcached, overwrite  # noqa: PLC0415

    work = Path(tempfile.mkdtemp(prefix="applier-phases-"))
    mc = Memcached(work)
    try:
        mc.load(args.keys)
        with Checkpoint.take(mc.pid) as cp:
            mc.fds = mc.fd_count()
            per_restore = measure(cp, lambda seed: overwrite(mc, args.keys, 200, seed), args.rounds)
        report(per_restore, args.rounds)
    finally:
        mc.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

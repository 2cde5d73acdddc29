"""Benchmark: ``applier.symbols.resolve`` on libc functions of a running ``sleep``, the first
call (empty cache: every mapped file's header parsed, libc's symbol tables parsed) against
the cached ones (maps read, each file opened, fstat'ed and its build id re-read).

    python bench/bench_symbols.py [--repeat 200] [--target /bin/sleep]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from applier import symbols  # noqa: E402


def timed(pid: int, spec: str) -> tuple[float, symbols.Symbol]:
    start = time.perf_counter()
    sym = symbols.resolve(pid, spec)
    return (time.perf_counter() - start) * 1e3, sym


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=200, help="cached lookups to time")
    parser.add_argument("--target", default="/bin/sleep", help="program to run as the target")
    args = parser.parse_args()
    proc = subprocess.Popen([args.target, "1000"])
    try:
        time.sleep(0.2)  # let ld.so map libc
        for spec in ("libc:getpid", "getpid", "strlen"):
            symbols.clear_cache()
            first, sym = timed(proc.pid, spec)
            info = symbols.cache_info()
            cached = [timed(proc.pid, spec)[0] for _ in range(args.repeat)]
            print(
                f"{spec:12} first {first:7.2f} ms ({info.misses} files parsed)   "
                f"cached median {statistics.median(cached):.3f} ms "
                f"min {min(cached):.3f} ms ({args.repeat} calls)   -> {sym.describe()}"
            )
    finally:
        proc.kill()
        proc.wait()


if __name__ == "__main__":
    main()

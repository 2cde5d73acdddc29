"""Print the rows the benchmarks recorded (``bench/report.py``) as one table.

APPLIER_BENCH_ROWS=rows.jsonl python bench/summary.py
"""

from __future__ import annotations

import json
import os
import sys


def main() -> int:
    path = os.environ.get("APPLIER_BENCH_ROWS") or (sys.argv[1] if len(sys.argv) > 1 else "")
    if not path or not os.path.exists(path):
        print("summary: no recorded rows (set APPLIER_BENCH_ROWS)", file=sys.stderr)
        return 2
    with open(path) as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    print()
    print("summary (milliseconds; ratio = applier / floor, both measured in this run)")
    print(f"{'case':<58}{'floor':>10}{'applier':>10}{'ratio':>9}  aim")
    for r in rows:
        floor = "" if r["floor_ms"] is None else f"{r['floor_ms']:.2f}"
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        print(f"{r['case']:<58}{floor:>10}{r['applier_ms']:>10.2f}{ratio:>9}  {r['aim']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The benchmarks' common summary: each case a bench measures is also recorded here, and
``bench/summary.py`` (the last step of ``./run bench``) prints them as one table.

Rows go, one JSON object per line, to the file named by ``APPLIER_BENCH_ROWS`` (nothing is
recorded without it, when a bench runs alone).
"""

from __future__ import annotations

import json
import os


def record(bench: str, case: str, floor_ms: float | None, applier_ms: float, aim: str = "") -> None:
    """One case: the floor (or the alternative: restart + reload) and applier's figure, in
    milliseconds, measured in the same run; ``aim`` is the goal the ratio is judged by."""
    path = os.environ.get("APPLIER_BENCH_ROWS")
    if not path:
        return
    row = {"bench": bench, "case": case, "floor_ms": floor_ms, "applier_ms": applier_ms,
           "ratio": applier_ms / floor_ms if floor_ms else None, "aim": aim}  # fmt: skip
    with open(path, "a") as fh:
        fh.write(json.dumps(row) + "\n")

"""A one-line progress bar on stderr for long page transfers (apply, dump), shown only when
stderr is a terminal and the work is large enough to be worth watching."""

from __future__ import annotations

import sys
import time

__all__ = ["Progress"]

MIN_BYTES = 64 << 20  # smaller transfers finish before a bar would be readable


class Progress:
    """``advance(n)`` after every ``n`` bytes; prints ``applying [###   ] 40% 410 MiB``."""

    def __init__(self, total: int, enabled: bool, verb: str = "applying") -> None:
        self.total, self.done = max(total, 1), 0
        self.enabled = enabled and sys.stderr.isatty() and total >= MIN_BYTES
        self.verb = verb
        self.last = 0.0

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and (now - self.last > 0.1 or self.done >= self.total):
            self.last = now
            frac = min(1.0, self.done / self.total)
            bar = "#" * int(frac * 30)
            sys.stderr.write(f"\r{self.verb} [{bar:<30}] {frac:4.0%} {self.done >> 20} MiB")
            if self.done >= self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()

    def finish(self) -> None:
        """End the line if the bar was shown but never reached 100%."""
        if self.enabled and 0 < self.done < self.total:
            sys.stderr.write("\n")
            sys.stderr.flush()

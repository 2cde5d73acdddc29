"""Worker threads kept for the life of the process, one per purpose.

The PAGEMAP_SCAN of a tracker, the second half of a large copy and the read-ahead of a
verification each run on a thread of their own while the tracing thread goes on (the calls
release the GIL). Making a pool, its first task and joining it cost 242 us here against 37 us
for a task on a kept one (timeit, medians of 200), and an apply needs them at every reset, so
each purpose has one pool, made on first use. A forked child has none of its parent's threads
(a task given to the parent's pool would wait forever there): it makes its own.

A task on one of these threads must never wait for a task of the same purpose: each pool has
a single thread.
"""

from __future__ import annotations

import concurrent.futures
import os

__all__ = ["worker"]

_POOLS: dict[str, concurrent.futures.ThreadPoolExecutor] = {}
os.register_at_fork(after_in_child=_POOLS.clear)


def worker(purpose: str) -> concurrent.futures.ThreadPoolExecutor:
    """The one-thread pool for ``purpose`` (its thread is named after it)."""
    pool = _POOLS.get(purpose)
    if pool is None:
        pool = _POOLS[purpose] = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix=f"applier-{purpose}"
        )
    return pool

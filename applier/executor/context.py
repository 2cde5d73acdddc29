"""What every step handler of the executor works with: the target, the plan, the image's
registers, the undo log, the statistics, and scratch buffers reused across batches."""

from __future__ import annotations

import threading
from typing import Any

import attrs
import numpy as np
import numpy.typing as npt

from applier.limits import CHUNK
from applier.plan import Plan
from applier.undo.log import SavedRange, UndoLog
from formats.core import CoreEntry
from injector.fdinfo import Descriptor
from injector.memory import aligned_buffer
from injector.process import Process

__all__ = ["U64", "ApplyStats", "Context"]

U64 = npt.NDArray[np.uint64]


@attrs.define
class ApplyStats:
    pages_written: int = 0
    pages_skipped: int = 0  # identical already (--only-dirty)
    bytes_discarded: int = 0
    layout_changes: int = 0
    threads: int = 0
    threads_ended: int = 0  # started since the checkpoint
    threads_created: int = 0  # gone since the checkpoint, created again
    signals: int = 0  # dispositions set
    sigmasks: int = 0  # threads whose blocked mask was set
    syscalls_restarted: int = 0
    fd_changes: int = 0  # descriptors closed, reopened or set back
    verified: bool = False
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.define
class Context:
    """One apply's working state, shared by the step handlers."""

    process: Process
    plan: Plan
    cores: dict[int, CoreEntry]  # image tid -> core-<tid>.img
    undo: UndoLog
    only_dirty: bool = False  # write only pages whose contents differ (no tracker)
    allow_code_writes: bool = False  # --write-code: code pages that differ from the file
    # Leave the image's pages mapped in this process after use (repeated applies of one
    # image: Checkpoint.restore), instead of dropping them to bound the RSS.
    keep_mapped: bool = False
    progress: bool = True
    stats: ApplyStats = attrs.field(factory=ApplyStats)
    # Descriptors closed or replaced by the apply, kept open at spare numbers until it is
    # done (executor.fds.commit closes them; a rollback puts them back).
    parked: list[int] = attrs.field(factory=list)
    fd_table: dict[int, Descriptor] | None = None  # read once for verification
    # What a step read back while it ran, for verification after the page writes (when
    # nothing may be injected any more): the dispositions of a sigaction step.
    read_back: dict[object, dict[int, tuple[int, int, int, int]]] = attrs.field(factory=dict)
    # Pages a WritePages step left alone because they equal the image already (--only-dirty):
    # per step, per batch (first piece), which of the batch's pages it wrote. Verification
    # reads back only those; a batch not listed was written whole.
    written: dict[int, dict[int, npt.NDArray[np.bool_]]] = attrs.field(factory=dict)  # id(step)
    _buffers: list[U64] = attrs.field(factory=list, init=False, repr=False)
    # per thread: (live XSAVE buffer, it with the image's FP state), as validation found them
    # (the thread is stopped: the set step that follows reuses them)
    xstates: dict[int, tuple[bytes, bytes]] = attrs.field(factory=dict, init=False, repr=False)
    # image thread -> its registers, restart-adjusted, and whether rewound (``image_regs``)
    image_regs: dict[int, tuple[dict[str, int], bool]] = attrs.field(
        factory=dict, init=False, repr=False
    )

    @property
    def page(self) -> int:
        return self.plan.page_size

    def save(self, ranges: list[tuple[int, int]]) -> tuple[SavedRange, ...]:
        """Copy target memory of ``ranges`` into the undo spool (nothing with --no-undo)."""
        return self.undo.save_ranges(ranges, self.process.read_runs)

    def scratch(self, which: int) -> U64:
        """CHUNK-byte buffers: 0 and 1 for target memory read (old contents, read-back; two
        so that one batch is read while the one before is handled), 2 for image pages
        gathered for a compare; page-aligned (``aligned_buffer``). Taken from a per-process
        pool on first use and given back by ``close``: an apply every test would otherwise
        fault 24 MiB of fresh pages in."""
        while len(self._buffers) <= which:
            with _POOL_LOCK:
                self._buffers.append(_POOL.pop() if _POOL else aligned_buffer(CHUNK))
        return self._buffers[which]

    def close(self) -> None:
        """Give the scratch buffers back to the pool."""
        with _POOL_LOCK:
            while self._buffers and len(_POOL) < _POOL_MAX:
                _POOL.append(self._buffers.pop())
        self._buffers.clear()


_POOL: list[U64] = []
_POOL_MAX = 3
_POOL_LOCK = threading.Lock()

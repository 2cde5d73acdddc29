"""What really differs between a live process and an image: a plan narrowed to the steps and
pages whose effect would change something (``applier diff``, ``apply --dry-run --only-dirty``).

A plan says what an apply *does*; for a process equal to its image it still writes every saved
page. Narrowing reads the target (nothing is written) and keeps:

* of a page write, the pages whose live bytes differ from the image's;
* of a discard, the anonymous pages that hold non-zero bytes and the copied file pages whose
  bytes differ from the file at their offset;
* of shared memory, the objects whose saved pages differ or whose holes hold pages;
* of the sigaction step, the signals whose disposition is known to differ (a read-only plan
  knows a live disposition only by kind, from /proc: default, ignored or handled);
* of the register steps, the threads whose general-purpose registers differ (an interrupted
  syscall compares as the call it restarts, so a thread resumed into ``restart_syscall`` since
  the checkpoint is the same thread at the same place);
* every layout, break and mm-field step as it is (the planner emits those only for differences).

The kernel rewrites the rseq fields ``cpu_id_start``, ``cpu_id``, ``node_id`` and ``mm_cid`` of
every thread whenever it returns to user mode; those bytes are left out of the page compare.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

import attrs
import numpy as np

from applier import regs as regmod
from applier.capture import region_from_mapping
from applier.executor.pages import differing_pages, page_source
from applier.limits import CHUNK
from applier.plan import (
    Discard,
    Plan,
    SetRegs,
    SetSigactions,
    Step,
    ThreadCall,
    WritePages,
    WriteShared,
    restrict_to_pages,
)
from applier.ranges import page_ranges
from formats.core import CoreEntry
from injector.maps import PAGEMAP_PRESENT
from injector.process import Process
from injector.regs import Arch
from injector.syscalls import ARG_REGS, format_call

__all__ = ["Narrowed", "narrow", "rseq_masks"]

RSEQ_KERNEL_FIELDS = ((0, 8), (20, 28))  # cpu_id_start, cpu_id; node_id, mm_cid
_SEGMENTS = frozenset({"fs", "gs", "ds", "es", "cs", "ss"})


@attrs.frozen
class Narrowed:
    """The plan narrowed to differences, and how many saved pages compared equal."""

    plan: Plan
    pages_unchanged: int


@attrs.define
class _Narrowing:
    """One narrowing's inputs; each ``_keep_*`` returns what of a step differs, or None."""

    process: Process
    plan: Plan
    cores: dict[int, CoreEntry]
    masks: dict[int, list[tuple[int, int]]]
    unchanged: int = 0
    uncompared: int = 0  # handled signals whose handlers a read-only plan did not read

    def pages(self, step: WritePages) -> Step | None:
        page, recreated = self.plan.page_size, self.plan.recreated()
        differ = differing_pages(self.process, step, page, self.masks, skip=recreated)
        kept = restrict_to_pages(step.runs, differ, recreated, page)
        self.unchanged += step.nr_pages - kept.nr_pages
        return WritePages(kept) if len(kept) else None

    def discard(self, step: Discard) -> Step | None:
        ranges = _discard_differs(self.process, step, self.plan.page_size)
        return Discard(ranges, step.reason) if ranges else None

    def shared(self, step: WriteShared) -> Step | None:
        return step if _shared_differs(self.process, step, self.plan.page_size) else None

    def regs(self, step: SetRegs) -> Step | None:
        return step if regs_differ(self.process, step, self.cores) else None

    def sigactions(self, step: SetSigactions) -> Step | None:
        """Of a read-only plan's dispositions, those known to differ: a signal handled both
        now and in the image is not compared (its handler can only be read by an injected
        call), and a note says so."""
        self.uncompared += len(step.unread)
        kept = tuple(a for a in step.actions if a[0] not in step.unread)
        return SetSigactions(kept) if kept else None


# Steps whose effect depends on what the target holds; every other step is a difference.
_NARROW: dict[type[Step], Callable[[_Narrowing, Any], Step | None]] = {
    WritePages: _Narrowing.pages,
    Discard: _Narrowing.discard,
    WriteShared: _Narrowing.shared,
    SetRegs: _Narrowing.regs,
    SetSigactions: _Narrowing.sigactions,
}


def narrow(process: Process, plan: Plan, cores: dict[int, CoreEntry]) -> Narrowed:
    """``plan`` with only the steps and pages that would change the target."""
    work = _Narrowing(process, plan, cores, rseq_masks(process, plan.page_size))
    steps: list[Step] = []
    for step in plan.steps:
        keep = _NARROW.get(type(step))
        kept = step if keep is None else keep(work, step)
        if kept is not None:
            steps.append(kept)
    calls = tuple(thread_calls(process, plan, cores))
    notes = plan.notes
    if work.uncompared:
        notes += (
            f"{work.uncompared} signals have a handler now and in the image: their handlers "
            "are not compared (that needs a call injected into the target; apply reads and "
            "restores them)",
        )
    narrowed = attrs.evolve(plan, steps=tuple(steps), threads=calls, notes=notes)
    return Narrowed(narrowed, work.unchanged)


def _call(values: dict[str, int]) -> str | None:
    """The system call a thread's registers say it is in (``orig_ax``), with its arguments."""
    if values["orig_ax"] >= 1 << 63:  # -1: not in a system call
        return None
    args = [values[r] for r in ARG_REGS[Arch.X86_64]]
    return format_call(Arch.X86_64, values["orig_ax"], args)


def thread_calls(process: Process, plan: Plan, cores: dict[int, CoreEntry]) -> Iterable[ThreadCall]:
    """For each thread the plan pairs with the image, the call it is in now and then."""
    for step in plan.of(SetRegs):
        ti = getattr(cores.get(step.image_tid), "thread_info", None)
        then = _call(regmod.gpregs_values(ti.gpregs)) if ti is not None else None
        now = _call(process.get_regs(step.tid).as_dict())
        yield ThreadCall(step.tid, step.image_tid, now, then)


def rseq_masks(process: Process, page: int) -> dict[int, list[tuple[int, int]]]:
    """Page address -> byte ranges inside that page the kernel owns (rseq fields)."""
    out: dict[int, list[tuple[int, int]]] = {}
    for tid in process.tids:
        conf = process.rseq_config(tid)
        if conf is None:
            continue
        for lo, hi in RSEQ_KERNEL_FIELDS:
            a, b = conf[0] + lo, conf[0] + hi
            while a < b:
                base = a - a % page
                end = min(b, base + page)
                out.setdefault(base, []).append((a - base, end - base))
                a = end
    return out


def _read_pages(process: Process, addrs: Iterable[int], page: int) -> Iterable[tuple[int, bytes]]:
    for addr in addrs:
        yield addr, process.read(addr, page)


def _discard_differs(process: Process, step: Discard, page: int) -> tuple[tuple[int, int], ...]:
    """The ranges of ``step`` whose discarding would change bytes: non-zero anonymous pages,
    or copied file pages that differ from the file."""
    pages = np.concatenate(
        [np.arange(a, b, page, dtype=np.uint64) for a, b in step.ranges]
        or [np.zeros(0, dtype=np.uint64)]
    )
    zero = bytes(page)
    backing: Callable[[int], bytes] = (
        (lambda _addr: zero) if step.reason == "zero" else _file_pages(process, page)
    )
    changed = [a for a, data in _read_pages(process, pages.tolist(), page) if data != backing(a)]
    return page_ranges(np.array(changed, dtype=np.uint64), page)


def _file_pages(process: Process, page: int) -> Callable[[int], bytes]:
    """addr -> the bytes the mapped file holds for that page (what a discard brings back)."""
    regions = [region_from_mapping(m) for m in process.maps()]

    def read(addr: int) -> bytes:
        for r in regions:
            if r.start <= addr < r.end and r.path:
                try:
                    fd = os.open(r.path, os.O_RDONLY | os.O_CLOEXEC)
                except OSError:
                    return b""  # cannot tell: count it as differing
                try:
                    data = os.pread(fd, page, r.offset + addr - r.start)
                finally:
                    os.close(fd)
                return data.ljust(page, b"\0")
        return b""

    return read


def _shared_differs(process: Process, step: WriteShared, page: int) -> bool:
    for run in step.runs:
        src = page_source(run.source)
        for off in range(0, run.nr_pages * page, CHUNK):
            n = min(CHUNK, run.nr_pages * page - off)
            if process.read(run.vaddr + off, n) != bytes(src.pages.view(src.offset + off, n)):
                return True
    return any(((process.page_flags(a, b) & PAGEMAP_PRESENT) != 0).any() for a, b in step.holes)


def regs_differ(process: Process, step: SetRegs, cores: dict[int, CoreEntry]) -> bool:
    """Whether the live thread's general-purpose registers differ from the image's (both
    taken as the values that restart an interrupted call; segment selectors ignored)."""
    ti = getattr(cores.get(step.image_tid), "thread_info", None)
    if ti is None:
        return True
    want, _ = regmod.restart_adjusted(regmod.gpregs_values(ti.gpregs))
    have, _ = regmod.restart_adjusted(process.get_regs(step.tid).as_dict())
    ignore = set(_SEGMENTS)
    if have.get("ax") == regmod.NR_RESTART_SYSCALL and have["ip"] == want["ip"]:
        ignore |= {"ax"}  # resumed once since: the same call, restarted by the kernel
    return any(
        (have[name] & ((1 << 64) - 1)) != value
        for name, value in want.items()
        if name not in ignore
    )

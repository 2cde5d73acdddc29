"""Planning memory: which saved pages to write, which present pages to discard (zero, or the
file's page again), shared memory from pagemap-shmem, and narrowing all of it to dirty pages
or to an undo image's scope."""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence

import attrs
import numpy as np
import numpy.typing as npt

from applier.model import (
    PROT_EXEC,
    ImageTask,
    Kind,
    LiveTask,
    Region,
    SavedPages,
)
from applier.plan.steps import CodeWrite, Discard, SavedRuns, WriteShared
from applier.ranges import covered, intervals, member, page_ranges
from injector.arrays import sorted_unique


def clip_saved(saved: Iterable[SavedPages], regions: Sequence[Region], page: int) -> SavedRuns:
    """Keep the saved pages that fall in private regions of the image (never vDSO, shared)."""
    runs = SavedRuns.of(saved)
    r_starts, r_ends = intervals((r.start, r.end) for r in regions if r.kind.private)
    starts, ends = runs.vaddr, runs.ends(page)
    # Every (run, region) pair that overlaps: regions from the first that ends after the
    # run starts to the last that starts before the run ends (both lists sorted, disjoint).
    first = np.searchsorted(r_ends, starts, side="right")
    count = np.maximum(np.searchsorted(r_starts, ends, side="left") - first, 0)
    run_of = np.repeat(np.arange(len(runs)), count)
    reg_of = first[run_of] + (np.arange(len(run_of)) - np.repeat(np.cumsum(count) - count, count))
    a = np.maximum(starts[run_of], r_starts[reg_of]) if len(run_of) else starts[:0]
    b = np.minimum(ends[run_of], r_ends[reg_of]) if len(run_of) else ends[:0]
    ok = a < b
    run_of, a, b = run_of[ok], a[ok], b[ok]
    return SavedRuns(a, (b - a) // np.uint64(page), runs.source[run_of], runs.sources)


def _saved_intervals(
    saved: Sequence[SavedPages], page: int
) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64]]:
    if isinstance(saved, SavedRuns):
        return saved.vaddr, saved.ends(page)
    starts, ends = intervals((r.vaddr, r.vaddr + r.nr_pages * page) for r in saved)
    return starts, ends


def plan_discards(
    image: Sequence[Region],
    saved: Sequence[SavedPages],
    live: LiveTask,
    recreated: Sequence[tuple[int, int]],
    page: int,
) -> list[Discard]:
    """Present pages the image does not hold: anon -> zero, copied file pages -> the file."""
    present = np.asarray(live.present, dtype=np.uint64)
    if len(present) == 0:
        return []
    s_starts, s_ends = _saved_intervals(saved, page)
    keep = ~covered(present, s_starts, s_ends)
    r_starts, r_ends = intervals(recreated)
    keep &= ~covered(present, r_starts, r_ends)
    anon_starts, anon_ends = intervals((r.start, r.end) for r in image if r.kind is Kind.ANON)
    file_starts, file_ends = intervals((r.start, r.end) for r in image if r.kind is Kind.FILE)
    candidates = present[keep]
    zero = candidates[covered(candidates, anon_starts, anon_ends)]
    in_file = candidates[covered(candidates, file_starts, file_ends)]
    copied = in_file[member(in_file, np.asarray(live.anon, dtype=np.uint64))]
    out = []
    if len(zero):
        out.append(Discard(page_ranges(zero, page), "zero"))
    if len(copied):
        out.append(Discard(page_ranges(copied, page), "file"))
    return out


def plan_shared(region: Region, image: ImageTask, page: int) -> WriteShared | None:
    """The shared object's saved pages that fall into this mapping's window, as addresses,
    and the rest of the window as holes; None if the image has no pagemap-shmem for it."""
    obj = image.shared.get(region.inode)
    if obj is None:
        return None
    lo, hi = region.offset, region.offset + region.size
    runs: list[SavedPages] = []
    for run in obj.saved:
        a, b = max(lo, run.vaddr), min(hi, run.vaddr + run.nr_pages * page)
        if a < b:
            delta = region.start - region.offset
            source = attrs.evolve(run.source, vaddr=run.vaddr + delta)  # type: ignore[misc]
            runs.append(SavedPages(a + delta, (b - a) // page, source))
    holes: list[tuple[int, int]] = []
    cursor = region.start
    for r in runs:
        if r.vaddr > cursor:
            holes.append((cursor, r.vaddr))
        cursor = r.vaddr + r.nr_pages * page
    if cursor < region.end:
        holes.append((cursor, region.end))
    return WriteShared(region, tuple(runs), tuple(holes))


def code_writes(runs: SavedRuns, regions: Sequence[Region], page: int) -> tuple[CodeWrite, ...]:
    """The parts of ``runs`` that fall into executable private mappings of the image, by
    region (in the order given), then by address: one clip for all of them (a clip per
    region cost 0.1 ms each, on every apply)."""
    code = [r for r in regions if r.prot & PROT_EXEC and r.kind.private]
    if not code:
        return ()
    inside = clip_saved(runs, code, page)
    by_start = sorted(range(len(code)), key=lambda k: code[k].start)
    starts = [code[k].start for k in by_start]
    pieces = []
    for a, e in zip(inside.vaddr.tolist(), inside.ends(page).tolist(), strict=True):
        k = by_start[bisect.bisect_right(starts, a) - 1]  # the region the piece was clipped to
        pieces.append((k, a, e))
    out: list[CodeWrite] = []
    for k, a, e in sorted(pieces):
        r = code[k]
        path = r.path if r.kind is Kind.FILE else None
        out.append(CodeWrite(a, e, path, r.offset + (a - r.start)))
    return tuple(out)


def restrict_to_pages(
    saved: Iterable[SavedPages],
    dirty: npt.NDArray[np.uint64],
    keep: Sequence[tuple[int, int]],
    page: int,
) -> SavedRuns:
    """The parts of ``saved`` on ``dirty`` pages, plus whatever lies in the ``keep`` ranges
    (re-created regions: every saved page). Contiguous pages of one run stay one run."""
    runs = SavedRuns.of(saved)
    starts, ends = runs.vaddr, runs.ends(page)
    dirty = np.asarray(dirty, dtype=np.uint64)
    if len(dirty) > 1 and not (dirty[1:] > dirty[:-1]).all():
        dirty = sorted_unique(dirty)
    k_starts, k_ends = intervals(keep)
    dirty = dirty[~covered(dirty, k_starts, k_ends)]  # those come in whole below
    run_of = np.searchsorted(starts, dirty, side="right").astype(np.intp) - 1
    inside = run_of >= 0
    inside[inside] = dirty[inside] < ends[run_of[inside]]
    lo, source = dirty[inside], runs.source[run_of[inside]]
    hi = lo + np.uint64(page)
    if len(k_starts):
        kept = clip_saved(runs, [Region(int(a), int(b), 0, Kind.ANON) for a, b in keep], page)
        lo = np.concatenate((lo, kept.vaddr))
        hi = np.concatenate((hi, kept.ends(page)))
        source = np.concatenate((source, kept.source))
        order = np.argsort(lo, kind="stable")
        lo, hi, source = lo[order], hi[order], source[order]
    if len(lo) == 0:
        return SavedRuns(lo, lo.copy(), source, runs.sources)
    # Coalesce pieces that touch and come from the same source run.
    starts_group = np.ones(len(lo), dtype=bool)
    starts_group[1:] = (lo[1:] != hi[:-1]) | (source[1:] != source[:-1])
    firsts = np.nonzero(starts_group)[0]
    lasts = np.append(firsts[1:] - 1, len(lo) - 1)
    a, b = lo[firsts], hi[lasts]
    return SavedRuns(a, (b - a) // np.uint64(page), source[firsts], runs.sources)


def restrict_to_scope(
    saved: Sequence[SavedPages], live: LiveTask, scope: Sequence[tuple[int, int]], page: int
) -> tuple[list[SavedPages], LiveTask]:
    """The saved pages inside ``scope``, and ``live`` with only its present pages inside it
    (so only those can be discarded)."""
    merged: list[tuple[int, int]] = []
    for a, b in sorted(scope):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    starts, ends = [a for a, _ in merged], [b for _, b in merged]
    out: list[SavedPages] = []
    for run in saved:
        end = run.vaddr + run.nr_pages * page
        # only the scope ranges that overlap the run (an undo image has thousands of both)
        for i in range(bisect.bisect_right(ends, run.vaddr), bisect.bisect_left(starts, end)):
            lo, hi = max(starts[i], run.vaddr), min(ends[i], end)
            if lo < hi:
                out.append(attrs.evolve(run, vaddr=lo, nr_pages=(hi - lo) // page))
    present = np.asarray(live.present, dtype=np.uint64)
    inside = covered(present, *intervals(merged))
    return out, attrs.evolve(live, present=present[inside])

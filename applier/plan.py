"""The planner: image side + live side of one task -> the steps that make the live task equal
to the checkpoint. Pure: no I/O, no ptrace; ``applier diff`` prints its result.

What "equal" means follows CRIU's restore (criu/mem.c, criu/cr-restore.c): a restore builds a
fresh address space in which anonymous private memory starts zero-filled and private file
mappings start as the file, then copies the pagemap's pages on top. Applying into a running
process reaches the same state by (1) fixing the layout, (2) writing the saved pages, (3)
discarding what the image does not have: present anonymous pages the image omits become zero
again, copied-on-write pages of private file mappings go back to the file's page.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable, Sequence
from typing import TypeVar

import attrs
import numpy as np
import numpy.typing as npt

from applier.errors import MismatchError
from applier.model import (
    PROT_EXEC,
    ImageTask,
    Kind,
    LiveTask,
    Region,
    SavedPages,
    format_prot,
    merge_regions,
)

__all__ = [
    "PARTS",
    "Discard",
    "MapAnon",
    "MapFile",
    "Plan",
    "Protect",
    "SetBrk",
    "SetMm",
    "SetRegs",
    "Step",
    "Unmap",
    "WritePages",
    "make_plan",
]

PARTS = ("memory", "layout", "brk", "regs")


@attrs.frozen
class Unmap:
    region: Region  # the live region (clipped) that goes away

    @property
    def start(self) -> int:
        return self.region.start

    @property
    def end(self) -> int:
        return self.region.end

    def describe(self) -> str:
        return f"unmap   {self.region.describe()}"


@attrs.frozen
class MapAnon:
    region: Region

    def describe(self) -> str:
        return f"map     {self.region.describe()}"


@attrs.frozen
class MapFile:
    region: Region

    def describe(self) -> str:
        return f"map     {self.region.describe()} @{self.region.offset:#x}"


@attrs.frozen
class Protect:
    start: int
    end: int
    old: int
    new: int

    def describe(self) -> str:
        return (
            f"protect {self.start:#x}-{self.end:#x} {format_prot(self.old)} -> "
            f"{format_prot(self.new)}"
        )


@attrs.frozen
class SetBrk:
    old: int | None
    new: int

    def describe(self) -> str:
        old = "?" if self.old is None else f"{self.old:#x}"
        return f"brk     {old} -> {self.new:#x}"


@attrs.frozen
class SetMm:
    field: str  # mm_entry name, e.g. mm_start_brk
    old: int
    new: int

    def describe(self) -> str:
        return f"prctl   PR_SET_MM {self.field} {self.old:#x} -> {self.new:#x}"


@attrs.frozen
class WritePages:
    runs: tuple[SavedPages, ...]

    @property
    def nr_pages(self) -> int:
        return sum(r.nr_pages for r in self.runs)

    def describe(self) -> str:
        return f"write   {self.nr_pages} saved pages in {len(self.runs)} runs"


@attrs.frozen
class Discard:
    """MADV_DONTNEED: anonymous pages read as zero again, private file pages as the file."""

    ranges: tuple[tuple[int, int], ...]
    reason: str  # "zero" or "file"

    @property
    def nr_bytes(self) -> int:
        return sum(e - s for s, e in self.ranges)

    def describe(self) -> str:
        what = "zero" if self.reason == "zero" else "re-read from file"
        return f"discard {len(self.ranges)} ranges, {self.nr_bytes} bytes ({what})"


@attrs.frozen
class SetRegs:
    tid: int  # live thread
    image_tid: int  # core-<image_tid>.img

    def describe(self) -> str:
        return f"regs    thread {self.tid} <- core-{self.image_tid}.img"


Step = Unmap | MapAnon | MapFile | Protect | SetBrk | SetMm | WritePages | Discard | SetRegs
S = TypeVar("S", Unmap, MapAnon, MapFile, Protect, SetBrk, SetMm, WritePages, Discard, SetRegs)


@attrs.frozen
class Plan:
    """What ``apply`` will do, in order, plus notes on what it leaves alone and why."""

    pid: int
    image_pid: int
    page_size: int
    steps: tuple[Step, ...]
    notes: tuple[str, ...]

    def of(self, kind: type[S]) -> list[S]:
        """The steps of one kind, in order."""
        return [s for s in self.steps if isinstance(s, kind)]

    @property
    def pages_to_write(self) -> int:
        return sum(s.nr_pages for s in self.steps if isinstance(s, WritePages))

    @property
    def bytes_to_discard(self) -> int:
        return sum(s.nr_bytes for s in self.steps if isinstance(s, Discard))

    def summary(self) -> dict[str, int]:
        layout = (Unmap, MapAnon, MapFile, Protect)
        return {
            "pages_to_write": self.pages_to_write,
            "pages_to_discard": self.bytes_to_discard // self.page_size,
            "layout_changes": sum(isinstance(s, layout) for s in self.steps),
            "threads": sum(isinstance(s, SetRegs) for s in self.steps),
        }


# --------------------------------------------------------------------------- matching


def check_same_process(image: ImageTask, live: LiveTask) -> None:
    """Refuse an image that belongs to another program: same executable, code at same places."""
    if image.exe and live.exe and _strip_deleted(image.exe) != _strip_deleted(live.exe):
        raise MismatchError(
            f"image is of {image.exe} but pid {live.pid} runs {live.exe}",
        )
    live_regions = sorted(live.regions, key=lambda r: r.start)
    starts = [r.start for r in live_regions]
    for want in image.regions:
        if want.kind is not Kind.FILE or not want.prot & PROT_EXEC:
            continue
        i = bisect.bisect_right(starts, want.start) - 1
        have = live_regions[i] if i >= 0 else None
        if (
            have is None
            or have.end < want.end
            or have.kind is not Kind.FILE
            or _strip_deleted(have.path or "") != _strip_deleted(want.path or "")
            or have.backing_at(want.start) != want.backing_at(want.start)
        ):
            found = have.describe() if have and have.end > want.start else "nothing"
            raise MismatchError(
                f"code mapping {want.describe()} of the image is not in pid {live.pid} "
                f"(found {found} there)",
            )


def _strip_deleted(path: str) -> str:
    return path.removesuffix(" (deleted)")


def match_threads(image: ImageTask, live: LiveTask) -> list[tuple[int, int]]:
    """Pairs (live tid, image tid). Same ids if the sets agree, else by position."""
    if len(image.threads) != len(live.threads):
        raise MismatchError(
            f"image has {len(image.threads)} threads but pid {live.pid} has "
            f"{len(live.threads)}; leave registers out with --restore memory,layout,brk",
        )
    if sorted(image.threads) == sorted(live.threads):
        return [(t, t) for t in live.threads]
    return list(zip(live.threads, image.threads, strict=True))


# --------------------------------------------------------------------------- layout


def _boundaries(*lists: Sequence[Region]) -> list[int]:
    points = {p for regions in lists for r in regions for p in (r.start, r.end)}
    return sorted(points)


def _at(regions: Sequence[Region], starts: list[int], addr: int) -> Region | None:
    i = bisect.bisect_right(starts, addr) - 1
    if i >= 0 and regions[i].start <= addr < regions[i].end:
        return regions[i]
    return None


def _simulate_brk(live: Sequence[Region], old: int, new: int, page: int) -> list[Region]:
    """Live regions as they will be after ``brk(new)``: the heap shrinks or grows at its end."""
    old_end, new_end = _align_up(old, page), _align_up(new, page)
    out: list[Region] = []
    for r in live:
        if r.name == "[heap]" and r.end == old_end:
            if new_end > r.start:
                out.append(attrs.evolve(r, end=new_end))
        else:
            out.append(r)
    if new_end > old_end and not any(r.name == "[heap]" for r in out):
        out.append(Region(old_end, new_end, 3, Kind.ANON, name="[heap]"))
    return sorted(out, key=lambda r: r.start)


def _align_up(x: int, page: int) -> int:
    return (x + page - 1) // page * page


def plan_layout(image: Sequence[Region], live: Sequence[Region]) -> tuple[list[Step], list[str]]:
    """Unmap, map and protect steps that turn ``live`` into ``image`` (both merged lists)."""
    steps: list[Step] = []
    notes: list[str] = []
    im = [r for r in image if r.kind is not Kind.SPECIAL]
    lv = [r for r in live if r.kind is not Kind.SPECIAL]
    im_starts, lv_starts = [r.start for r in im], [r.start for r in lv]
    points = _boundaries(im, lv)
    # Walk elementary intervals; merge consecutive ones that need the same action.
    pending: list[tuple[str, int, int, Region | None, Region | None]] = []
    for a, b in itertools.pairwise(points):
        want, have = _at(im, im_starts, a), _at(lv, lv_starts, a)
        if want is None and have is None:
            continue
        if want is None:
            assert have is not None
            pending.append(("unmap", a, b, None, have))
        elif have is None:
            pending.append(("map", a, b, want, None))
        elif want.backing_at(a) != have.backing_at(a):
            pending.append(("replace", a, b, want, have))
        elif want.prot != have.prot:
            pending.append(("protect", a, b, want, have))
    for action, a, b, want, have in _coalesce(pending):
        if action in ("unmap", "replace"):
            assert have is not None
            steps.append(Unmap(have.clip(a, b)))
        if action in ("map", "replace"):
            assert want is not None
            region = want.clip(a, b)
            if want.kind is Kind.ANON:
                steps.append(MapAnon(region))
            elif want.kind is Kind.FILE:
                steps.append(MapFile(region))
            else:
                raise MismatchError(
                    f"cannot re-create {region.describe()}: only private anonymous and "
                    "private file mappings can be mapped again",
                )
        if action == "protect":
            assert want is not None and have is not None
            steps.append(Protect(a, b, have.prot, want.prot))
    for r in image:
        if r.kind is Kind.SPECIAL and not any(
            x.start == r.start and x.name == r.name for x in live
        ):
            notes.append(f"{r.describe()} is elsewhere in the target: left as it is")
    return steps, notes


def _coalesce(
    pending: list[tuple[str, int, int, Region | None, Region | None]],
) -> Iterable[tuple[str, int, int, Region | None, Region | None]]:
    out: list[tuple[str, int, int, Region | None, Region | None]] = []
    for item in pending:
        action, a, b, want, have = item
        if out:
            p_action, p_a, p_b, p_want, p_have = out[-1]
            if p_action == action and p_b == a and p_want is want and p_have is have:
                out[-1] = (action, p_a, b, want, have)
                continue
        out.append(item)
    return out


# --------------------------------------------------------------------------- memory


def _intervals(regions: Iterable[tuple[int, int]]) -> tuple[npt.NDArray[np.uint64], ...]:
    pairs = sorted(regions)
    starts = np.array([s for s, _ in pairs], dtype=np.uint64)
    ends = np.array([e for _, e in pairs], dtype=np.uint64)
    return starts, ends


def _covered(
    pages: npt.NDArray[np.uint64], starts: npt.NDArray[np.uint64], ends: npt.NDArray[np.uint64]
) -> npt.NDArray[np.bool_]:
    """For each page address, whether a [start, end) interval contains it."""
    if len(starts) == 0:
        return np.zeros(len(pages), dtype=bool)
    idx = np.searchsorted(starts, pages, side="right").astype(np.int64) - 1
    ok = idx >= 0
    result = np.zeros(len(pages), dtype=bool)
    result[ok] = pages[ok] < ends[idx[ok]]
    return result


def _member(
    values: npt.NDArray[np.uint64], sorted_set: npt.NDArray[np.uint64]
) -> npt.NDArray[np.bool_]:
    """``np.isin`` for a sorted ``sorted_set``, by binary search (no sorting of ``values``)."""
    if len(sorted_set) == 0:
        return np.zeros(len(values), dtype=bool)
    idx = np.searchsorted(sorted_set, values)
    idx[idx == len(sorted_set)] = 0
    return np.asarray(sorted_set[idx] == values, dtype=bool)


def _ranges(pages: npt.NDArray[np.uint64], page: int) -> tuple[tuple[int, int], ...]:
    """Sorted page addresses -> coalesced [start, end) ranges."""
    if len(pages) == 0:
        return ()
    breaks = np.nonzero(np.diff(pages) != page)[0]
    firsts = np.concatenate(([0], breaks + 1))
    lasts = np.concatenate((breaks, [len(pages) - 1]))
    return tuple(
        (int(pages[f]), int(pages[last]) + page) for f, last in zip(firsts, lasts, strict=True)
    )


def clip_saved(
    saved: Sequence[SavedPages], regions: Sequence[Region], page: int
) -> list[SavedPages]:
    """Keep the saved pages that fall in private regions of the image (never vDSO, shared)."""
    private = [r for r in regions if r.kind.private]
    out: list[SavedPages] = []
    j = 0
    for run in sorted(saved, key=lambda r: r.vaddr):
        end = run.vaddr + run.nr_pages * page
        while j < len(private) and private[j].end <= run.vaddr:
            j += 1
        k = j
        while k < len(private) and private[k].start < end:
            a, b = max(run.vaddr, private[k].start), min(end, private[k].end)
            if a < b:
                out.append(attrs.evolve(run, vaddr=a, nr_pages=(b - a) // page))
            k += 1
    return out


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
    s_starts, s_ends = _intervals((r.vaddr, r.vaddr + r.nr_pages * page) for r in saved)
    keep = ~_covered(present, s_starts, s_ends)
    r_starts, r_ends = _intervals(recreated)
    keep &= ~_covered(present, r_starts, r_ends)
    anon_starts, anon_ends = _intervals((r.start, r.end) for r in image if r.kind is Kind.ANON)
    file_starts, file_ends = _intervals((r.start, r.end) for r in image if r.kind is Kind.FILE)
    candidates = present[keep]
    zero = candidates[_covered(candidates, anon_starts, anon_ends)]
    in_file = candidates[_covered(candidates, file_starts, file_ends)]
    copied = in_file[_member(in_file, np.asarray(live.anon, dtype=np.uint64))]
    out = []
    if len(zero):
        out.append(Discard(_ranges(zero, page), "zero"))
    if len(copied):
        out.append(Discard(_ranges(copied, page), "file"))
    return out


# --------------------------------------------------------------------------- the plan


def restrict_to_pages(
    saved: Sequence[SavedPages],
    dirty: npt.NDArray[np.uint64],
    keep: Sequence[tuple[int, int]],
    page: int,
) -> list[SavedPages]:
    """The parts of ``saved`` on ``dirty`` pages, plus whatever lies in the ``keep`` ranges."""
    out: list[SavedPages] = []
    for run in saved:
        end = run.vaddr + run.nr_pages * page
        lo, hi = np.searchsorted(dirty, [run.vaddr, end])
        parts = [dirty[lo:hi]]
        for k_start, k_end in keep:  # re-created regions: every saved page
            a, b = max(k_start, run.vaddr), min(k_end, end)
            if a < b:
                parts.append(np.arange(a, b, page, dtype=np.uint64))
        addrs = parts[0] if len(parts) == 1 else np.unique(np.concatenate(parts))
        out.extend(SavedPages(a, (b - a) // page, run.source) for a, b in _ranges(addrs, page))
    return out


def make_plan(
    image: ImageTask,
    live: LiveTask,
    parts: Iterable[str] = PARTS,
    *,
    dirty: npt.NDArray[np.uint64] | None = None,
) -> Plan:
    """All steps, in execution order: brk, mm fields, layout, discards, pages, registers.

    ``dirty``, when given, is every page written since the target was last equal to the image
    (from a dirty tracker): pages outside it are equal already and are neither written nor
    discarded. Regions the plan re-creates are written in full regardless.
    """
    parts = set(parts)
    unknown = parts - set(PARTS)
    if unknown:
        raise ValueError(f"unknown part(s) {', '.join(sorted(unknown))}; choose from {PARTS}")
    check_same_process(image, live)
    page = image.page_size
    steps: list[Step] = []
    notes: list[str] = []
    live_regions = list(live.regions)

    if "brk" in parts and live.brk != image.brk:
        steps.append(SetBrk(live.brk, image.brk))
        if live.brk is not None:
            live_regions = _simulate_brk(live_regions, live.brk, image.brk, page)
    if "layout" in parts:
        for name, value in sorted(image.mm_fields.items()):
            have = live.mm_fields.get(name)
            if have is not None and have != value:
                steps.append(SetMm(name, have, value))

    image_regions = _merge(image.regions)
    recreated: list[tuple[int, int]] = []
    if "layout" in parts:
        layout, layout_notes = plan_layout(image_regions, _merge(live_regions))
        steps.extend(layout)
        notes.extend(layout_notes)
        recreated = [
            (s.region.start, s.region.end) for s in layout if isinstance(s, MapAnon | MapFile)
        ]
    else:
        image_regions = _restrict_to_live(image_regions, _merge(live_regions))

    if "memory" in parts:
        saved = clip_saved(image.saved, image_regions, page)
        if dirty is not None:
            saved = restrict_to_pages(saved, dirty, recreated, page)
            live = attrs.evolve(live, present=live.present[_member(live.present, dirty)])
        # Discards first: they are injected syscalls, and every injected call lets the leader
        # return to user mode, where the kernel may rewrite its rseq area (cpu_id). Nothing
        # may run in the target between the page writes and their verification.
        steps.extend(plan_discards(image_regions, saved, live, recreated, page))
        if saved:
            steps.append(WritePages(tuple(saved)))
        for r in image_regions:
            if r.kind is Kind.SHARED_FILE:
                notes.append(f"{r.describe()}: shared file mapping, never written")
            elif r.kind is Kind.SHARED_ANON:
                notes.append(f"{r.describe()}: shared anonymous memory left as it is")

    if "regs" in parts:
        steps.extend(SetRegs(t, i) for t, i in match_threads(image, live))
    return Plan(
        pid=live.pid,
        image_pid=image.pid,
        page_size=page,
        steps=tuple(steps),
        notes=tuple(notes),
    )


def _merge(regions: Sequence[Region]) -> list[Region]:
    return merge_regions(regions)


def _restrict_to_live(image: Sequence[Region], live: Sequence[Region]) -> list[Region]:
    """Without the layout part, memory is written only where the live layout agrees."""
    out: list[Region] = []
    for want in image:
        for have in live:
            a, b = max(want.start, have.start), min(want.end, have.end)
            if a < b and want.backing_at(a) == have.backing_at(a):
                out.append(want.clip(a, b))
    return out

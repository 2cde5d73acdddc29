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
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TypeVar, overload

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
from applier.parts import Part
from applier.ranges import align_up, covered, intervals, member, page_ranges

__all__ = [
    "Discard",
    "MapAnon",
    "MapFile",
    "Plan",
    "Protect",
    "SavedRuns",
    "SetBrk",
    "SetMm",
    "SetRegs",
    "Step",
    "ThreadCall",
    "Unmap",
    "WritePages",
    "WriteShared",
    "make_plan",
]


def _hex(value: int) -> str:
    return f"{value:#x}"


def _ranges_json(ranges: Iterable[tuple[int, int]]) -> list[list[str]]:
    return [[_hex(a), _hex(b)] for a, b in ranges]


def _region_json(op: str, region: Region) -> dict[str, Any]:
    """The fields of a step about one region (docs/json.md)."""
    return {
        "op": op,
        "start": _hex(region.start),
        "end": _hex(region.end),
        "prot": format_prot(region.prot),
        "kind": region.kind.value,
        "path": region.path,
        "name": region.name,
        "offset": _hex(region.offset) if region.kind is not Kind.ANON else None,
    }


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

    def as_dict(self) -> dict[str, Any]:
        return _region_json("unmap", self.region)


@attrs.frozen
class MapAnon:
    region: Region

    def describe(self) -> str:
        return f"map     {self.region.describe()}"

    def as_dict(self) -> dict[str, Any]:
        return _region_json("map", self.region)


@attrs.frozen
class MapFile:
    region: Region

    def describe(self) -> str:
        return f"map     {self.region.describe()} @{self.region.offset:#x}"

    def as_dict(self) -> dict[str, Any]:
        return _region_json("map", self.region)


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

    def as_dict(self) -> dict[str, Any]:
        return {
            "op": "protect",
            "start": _hex(self.start),
            "end": _hex(self.end),
            "prot": format_prot(self.new),
            "old_prot": format_prot(self.old),
        }


@attrs.frozen
class SetBrk:
    old: int | None
    new: int

    def describe(self) -> str:
        old = "?" if self.old is None else f"{self.old:#x}"
        return f"brk     {old} -> {self.new:#x}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "op": "brk",
            "old": None if self.old is None else _hex(self.old),
            "new": _hex(self.new),
        }


@attrs.frozen
class SetMm:
    """All mm fields (code/data/stack/arg/env bounds, heap start) in one
    prctl(PR_SET_MM, PR_SET_MM_MAP): one call keeps the kernel's ordering checks satisfied
    (arg_start <= arg_end, ...) and needs no CAP_SYS_RESOURCE, unlike the one-field calls."""

    fields: tuple[tuple[str, int, int], ...]  # (mm_entry name, live value, image value)

    @property
    def old(self) -> dict[str, int]:
        return {name: old for name, old, _ in self.fields}

    @property
    def new(self) -> dict[str, int]:
        return {name: new for name, _, new in self.fields}

    def describe(self) -> str:
        changed = ", ".join(
            f"{name} {old:#x} -> {new:#x}" for name, old, new in self.fields if old != new
        )
        return f"prctl   PR_SET_MM_MAP {changed}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "op": "mm",
            "fields": {
                name: {"old": _hex(old), "new": _hex(new)}
                for name, old, new in self.fields
                if old != new
            },
        }


class SavedRuns(Sequence[SavedPages]):
    """Runs of saved pages held as arrays, sorted by address: run i is ``npages[i]`` pages at
    ``vaddr[i]`` whose bytes come from ``sources[source[i]]`` (a ``SavedPages.source``: the
    formats PageRun the run was cut from, so the bytes of ``a`` are at ``a - run.vaddr`` in
    that run). A sequence of SavedPages to read, but a dirty set of 100,000 scattered pages
    costs no Python object per run to plan and to write."""

    __slots__ = ("npages", "source", "sources", "vaddr")

    def __init__(
        self,
        vaddr: npt.NDArray[np.uint64],
        npages: npt.NDArray[np.uint64],
        source: npt.NDArray[np.intp],
        sources: tuple[object, ...],
    ) -> None:
        self.vaddr, self.npages, self.source, self.sources = vaddr, npages, source, sources

    @classmethod
    def of(cls, runs: Iterable[SavedPages]) -> SavedRuns:
        """``runs`` as a SavedRuns (itself if it is one), in address order."""
        if isinstance(runs, SavedRuns):
            return runs
        items = sorted(runs, key=lambda r: r.vaddr)
        return cls(
            np.array([r.vaddr for r in items], dtype=np.uint64),
            np.array([r.nr_pages for r in items], dtype=np.uint64),
            np.arange(len(items), dtype=np.intp),
            tuple(r.source for r in items),
        )

    @property
    def nr_pages(self) -> int:
        return int(self.npages.sum())

    def ends(self, page: int) -> npt.NDArray[np.uint64]:
        return self.vaddr + self.npages * np.uint64(page)

    def __len__(self) -> int:
        return len(self.vaddr)

    @overload
    def __getitem__(self, index: int) -> SavedPages: ...
    @overload
    def __getitem__(self, index: slice) -> SavedRuns: ...
    def __getitem__(self, index: int | slice) -> SavedPages | SavedRuns:
        if isinstance(index, slice):
            return SavedRuns(
                self.vaddr[index], self.npages[index], self.source[index], self.sources
            )
        return SavedPages(
            int(self.vaddr[index]), int(self.npages[index]), self.sources[self.source[index]]
        )

    def __iter__(self) -> Iterator[SavedPages]:
        for a, n, i in zip(
            self.vaddr.tolist(), self.npages.tolist(), self.source.tolist(), strict=True
        ):
            yield SavedPages(a, n, self.sources[i])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SavedRuns):
            return NotImplemented
        return (
            np.array_equal(self.vaddr, other.vaddr)
            and np.array_equal(self.npages, other.npages)
            and [self.sources[i] for i in self.source.tolist()]
            == [other.sources[i] for i in other.source.tolist()]
        )

    def __hash__(self) -> int:
        return hash((self.vaddr.tobytes(), self.npages.tobytes()))

    def __repr__(self) -> str:
        return f"SavedRuns({len(self)} runs, {self.nr_pages} pages)"


def _saved_runs(runs: Iterable[SavedPages]) -> SavedRuns:
    return SavedRuns.of(runs)


@attrs.frozen
class WritePages:
    runs: SavedRuns = attrs.field(converter=_saved_runs)

    @property
    def nr_pages(self) -> int:
        return self.runs.nr_pages

    def describe(self) -> str:
        return f"write   {self.nr_pages} saved pages in {len(self.runs)} runs"

    def as_dict(self) -> dict[str, Any]:
        return {
            "op": "write",
            "pages": self.nr_pages,
            "runs": [
                [_hex(a), n]
                for a, n in zip(self.runs.vaddr.tolist(), self.runs.npages.tolist(), strict=True)
            ],
        }


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

    def as_dict(self) -> dict[str, Any]:
        return {
            "op": "discard",
            "reason": self.reason,
            "bytes": self.nr_bytes,
            "ranges": _ranges_json(self.ranges),
        }


@attrs.frozen
class SetRegs:
    tid: int  # live thread
    image_tid: int  # core-<image_tid>.img

    def describe(self) -> str:
        return f"regs    thread {self.tid} <- core-{self.image_tid}.img"

    def as_dict(self) -> dict[str, Any]:
        return {"op": "regs", "thread": self.tid, "image_thread": self.image_tid}


@attrs.frozen
class WriteShared:
    """Shared anonymous memory (a shmem object) back to its pagemap-shmem contents, through
    the live mapping: saved pages written, the rest of the window punched to zero
    (MADV_REMOVE). Every process that maps the object sees the change."""

    region: Region
    runs: tuple[SavedPages, ...]  # address-based (translated from object offsets)
    holes: tuple[tuple[int, int], ...]

    @property
    def nr_pages(self) -> int:
        return sum(r.nr_pages for r in self.runs)

    def describe(self) -> str:
        return (
            f"shared  {self.region.describe()}: {self.nr_pages} saved pages, "
            f"{len(self.holes)} zero ranges"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            **_region_json("shared", self.region),
            "pages": self.nr_pages,
            "holes": _ranges_json(self.holes),
        }


@attrs.frozen
class ThreadCall:
    """The system call a thread is in, live and in the image (None: running user code);
    reported by ``diff``, never executed."""

    tid: int
    image_tid: int
    now: str | None
    image: str | None

    def describe(self) -> str:
        def text(call: str | None) -> str:
            return f"in {call}" if call else "in user code"

        return f"thread {self.tid}: {text(self.now)} now, {text(self.image)} in the image"

    def as_dict(self) -> dict[str, Any]:
        return {"thread": self.tid, "image_thread": self.image_tid, "now": self.now,
                "image": self.image}  # fmt: skip


Step = (
    Unmap | MapAnon | MapFile | Protect | SetBrk | SetMm | WritePages | Discard | WriteShared
    | SetRegs
)  # fmt: skip
S = TypeVar(
    "S", Unmap, MapAnon, MapFile, Protect, SetBrk, SetMm, WritePages, Discard, WriteShared, SetRegs
)


@attrs.frozen
class Plan:
    """What ``apply`` will do, in order, plus notes on what it leaves alone and why."""

    pid: int
    image_pid: int
    page_size: int
    steps: tuple[Step, ...]
    notes: tuple[str, ...]
    # Set once the plan was narrowed to what really differs (``applier.compare``): the saved
    # pages that compared equal to the live ones and were left out.
    compared: bool = False
    pages_unchanged: int = 0
    threads: tuple[ThreadCall, ...] = ()

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
            "pages_unchanged": self.pages_unchanged,
            "pages_to_discard": self.bytes_to_discard // self.page_size,
            "layout_changes": sum(isinstance(s, layout) for s in self.steps),
            "threads": sum(isinstance(s, SetRegs) for s in self.steps),
        }

    def as_dict(self) -> dict[str, Any]:
        """The plan as JSON-ready values (the schema is in docs/json.md)."""
        return {
            "pid": self.pid,
            "image_pid": self.image_pid,
            "page_size": self.page_size,
            "compared": self.compared,
            "summary": self.summary(),
            "steps": [step.as_dict() for step in self.steps],
            "notes": list(self.notes),
            "threads": [t.as_dict() for t in self.threads],
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
            or not _same_backing(want, have, want.start)
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
            f"{len(live.threads)} (threads started or ended since the checkpoint); "
            "--restore memory,layout,brk leaves registers out, where no thread's stack or "
            "code would be unmapped",
        )
    if sorted(image.threads) == sorted(live.threads):
        return [(t, t) for t in live.threads]
    return list(zip(live.threads, image.threads, strict=True))


def check_running_threads(steps: Sequence[Step], live: LiveTask) -> None:
    """Refuse a plan that takes away the stack or the code of a thread it does not give new
    registers: that thread would crash as soon as it runs (a thread started after the
    checkpoint, with registers left out)."""
    kept = set(live.thread_ip_sp) - {s.tid for s in steps if isinstance(s, SetRegs)}
    removed = [(s.start, s.end) for s in steps if isinstance(s, Unmap)]
    for tid in sorted(kept):
        ip, sp = live.thread_ip_sp[tid]
        for start, end in removed:
            for what, addr in (("stack", sp), ("code", ip)):
                if start <= addr < end:
                    raise MismatchError(
                        f"thread {tid} keeps its registers but its {what} at {addr:#x} is "
                        f"in {start:#x}-{end:#x}, which the image does not have: it would "
                        "crash; restore without layout (--restore memory,brk) or with "
                        "registers",
                    )


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
    old_end, new_end = align_up(old, page), align_up(new, page)
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
        elif not _same_backing(want, have, a):
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
        # By address only: since Linux 6.13 the vvar area is two mappings, [vvar] and
        # [vvar_vclock], and images name both [vvar].
        if r.kind is Kind.SPECIAL and not any(
            x.kind is Kind.SPECIAL and x.start == r.start for x in live
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


def _same_backing(want: Region, have: Region, addr: int) -> bool:
    """Whether ``addr`` is backed by the same thing in the image and now. A shared object the
    image names only indirectly (CRIU's memfd-style entries, inode -1) matches any shmem
    mapping at the same offset: it cannot be told apart."""
    if want.backing_at(addr) == have.backing_at(addr):
        return True
    return (
        want.kind is have.kind is Kind.SHARED_ANON
        and -1 in (want.inode, have.inode)
        and want.offset - want.start == have.offset - have.start
    )


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


# --------------------------------------------------------------------------- the plan


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
        dirty = np.unique(dirty)
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


def make_plan(
    image: ImageTask,
    live: LiveTask,
    parts: Part | Iterable[str] = Part.ALL,
    *,
    dirty: npt.NDArray[np.uint64] | None = None,
    leave_shared: bool = False,
    scope: Sequence[tuple[int, int]] | None = None,
) -> Plan:
    """All steps, in execution order: brk, mm fields, layout, discards, pages, registers.

    ``dirty``, when given, is every page written since the target was last equal to the image
    (from a dirty tracker): pages outside it are equal already and are neither written nor
    discarded. Regions the plan re-creates are written in full regardless.

    ``scope``, when given, is the only address ranges whose memory the image speaks for (an
    undo image, ``applier/undo_image.py``, holds just the pages an apply touched): pages are
    written and discarded inside it only, memory outside it is left as it is.
    """
    parts = Part.of(parts)
    check_same_process(image, live)
    page = image.page_size
    steps: list[Step] = []
    notes: list[str] = []
    live_regions = list(live.regions)

    if Part.BRK in parts and live.brk != image.brk:
        steps.append(SetBrk(live.brk, image.brk))
        if live.brk is not None:
            live_regions = _simulate_brk(live_regions, live.brk, image.brk, page)
    if Part.LAYOUT in parts and image.mm_fields:
        fields = tuple(
            (name, live.mm_fields[name], value)
            for name, value in sorted(image.mm_fields.items())
            if name in live.mm_fields
        )
        if len(fields) < len(image.mm_fields):
            notes.append("mm fields not all readable in /proc/PID/stat: left as they are")
        elif any(old != new for _, old, new in fields):
            steps.append(SetMm(fields))

    image_regions = _merge(image.regions)
    recreated: list[tuple[int, int]] = []
    if Part.LAYOUT in parts:
        layout, layout_notes = plan_layout(image_regions, _merge(live_regions))
        steps.extend(layout)
        notes.extend(layout_notes)
        recreated = [
            (s.region.start, s.region.end) for s in layout if isinstance(s, MapAnon | MapFile)
        ]
    else:
        image_regions = _restrict_to_live(image_regions, _merge(live_regions))

    if Part.MEMORY in parts:
        saved: Sequence[SavedPages] = clip_saved(image.saved, image_regions, page)
        if dirty is not None:
            saved = restrict_to_pages(saved, dirty, recreated, page)
            live = attrs.evolve(live, present=live.present[member(live.present, dirty)])
        if scope is not None:
            saved, live = restrict_to_scope(saved, live, scope, page)
        # Discards and shared memory first: they inject syscalls (madvise), and every
        # injected call lets the leader return to user mode, where the kernel may rewrite its
        # rseq area (cpu_id). Nothing may run in the target between the private page writes
        # and their verification.
        steps.extend(plan_discards(image_regions, saved, live, recreated, page))
        for r in image_regions:
            if r.kind is Kind.SHARED_FILE:
                notes.append(f"{r.describe()}: shared file mapping, never written")
            elif r.kind is Kind.SHARED_ANON:
                shared_step = plan_shared(r, image, page)
                if shared_step is not None:
                    steps.append(shared_step)
                elif leave_shared or scope is not None:
                    notes.append(f"{r.describe()}: shared memory left as it is (--leave-shared)")
                else:
                    raise MismatchError(
                        f"{r.describe()}: shared memory, and the image has no "
                        "pagemap-shmem for it; --leave-shared applies everything else",
                    )
        if saved:
            steps.append(WritePages(SavedRuns.of(saved)))

    if Part.REGS in parts:
        steps.extend(SetRegs(t, i) for t, i in match_threads(image, live))
    check_running_threads(steps, live)
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
            if a < b and _same_backing(want, have, a):
                out.append(want.clip(a, b))
    return out

"""Planning the layout: is the image this process's (executable, code at the same places,
threads), and which unmap, map and protect steps turn the live mappings into the image's."""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable, Sequence

import attrs

from applier.errors import MismatchError
from applier.model import (
    PROT_EXEC,
    ImageTask,
    Kind,
    LiveTask,
    Region,
)
from applier.plan.steps import EndThread, MapAnon, MapFile, Protect, SetRegs, Step, Unmap
from applier.ranges import align_up


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
            or not same_backing(want, have, want.start)
        ):
            found = have.describe() if have and have.end > want.start else "nothing"
            raise MismatchError(
                f"code mapping {want.describe()} of the image is not in pid {live.pid} "
                f"(found {found} there)",
            )


def _strip_deleted(path: str) -> str:
    return path.removesuffix(" (deleted)")


@attrs.frozen
class ThreadMatch:
    """How the image's threads meet the live ones: pairs (live tid, image tid) whose state is
    set, live threads started since the checkpoint (``ended``), image threads gone since
    (``created``)."""

    pairs: tuple[tuple[int, int], ...]
    ended: tuple[int, ...] = ()
    created: tuple[int, ...] = ()


def match_threads(image: ImageTask, live: LiveTask, *, strict: bool = True) -> ThreadMatch:
    """Threads of the same process meet by id: those only alive now are ended, those only in
    the image are created again. An image of another process (the same executable, a
    replica) meets the live threads by position, and only if there are as many (without
    ``strict``: else the leaders alone meet)."""
    if sorted(image.threads) == sorted(live.threads):
        return ThreadMatch(tuple((t, t) for t in live.threads))
    if image.pid == live.pid and image.pid in image.threads and live.pid in live.threads:
        common = set(image.threads) & set(live.threads)
        return ThreadMatch(
            tuple((t, t) for t in live.threads if t in common),
            ended=tuple(t for t in live.threads if t not in common),
            created=tuple(t for t in image.threads if t not in common),
        )
    if len(image.threads) != len(live.threads) and not strict:
        return ThreadMatch(((live.pid, image.pid),))
    if len(image.threads) != len(live.threads):
        raise MismatchError(
            f"image has {len(image.threads)} threads but pid {live.pid} has "
            f"{len(live.threads)}, and the image is of pid {image.pid}: another process's "
            "threads are matched by position only; --restore memory,layout,brk leaves "
            "registers out, where no thread's stack or code would be unmapped",
        )
    return ThreadMatch(tuple(zip(live.threads, image.threads, strict=True)))


def check_running_threads(steps: Sequence[Step], live: LiveTask) -> None:
    """Refuse a plan that takes away the stack or the code of a thread it does not give new
    registers: that thread would crash as soon as it runs (a thread started after the
    checkpoint, with registers left out)."""
    kept = set(live.thread_ip_sp) - {s.tid for s in steps if isinstance(s, SetRegs | EndThread)}
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


def _boundaries(*lists: Sequence[Region]) -> list[int]:
    points = {p for regions in lists for r in regions for p in (r.start, r.end)}
    return sorted(points)


def _at(regions: Sequence[Region], starts: list[int], addr: int) -> Region | None:
    i = bisect.bisect_right(starts, addr) - 1
    if i >= 0 and regions[i].start <= addr < regions[i].end:
        return regions[i]
    return None


def simulate_brk(live: Sequence[Region], old: int, new: int, page: int) -> list[Region]:
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
        elif not same_backing(want, have, a):
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


def same_backing(want: Region, have: Region, addr: int) -> bool:
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

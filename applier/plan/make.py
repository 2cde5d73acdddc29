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

import weakref
from collections.abc import Collection, Iterable, Sequence

import attrs
import numpy as np
import numpy.typing as npt

from applier.errors import MismatchError
from applier.model import (
    ImageTask,
    Kind,
    LiveTask,
    Region,
    SavedPages,
    merge_regions,
)
from applier.parts import Part
from applier.plan.fds import plan_fds
from applier.plan.layout import (
    check_running_threads,
    check_same_process,
    match_threads,
    plan_layout,
    same_backing,
    simulate_brk,
)
from applier.plan.memory import (
    clip_saved,
    code_writes,
    plan_discards,
    plan_shared,
    restrict_to_pages,
    restrict_to_scope,
)
from applier.plan.signals import plan_signals
from applier.plan.steps import (
    EndThread,
    NewThread,
    Plan,
    SavedRuns,
    SetBrk,
    SetMm,
    SetRegs,
    SetSigmask,
    Step,
    WritePages,
)
from applier.plan.steps import recreated as recreated_by
from applier.ranges import align_up, member


def make_plan(
    image: ImageTask,
    live: LiveTask,
    parts: Part | Iterable[str] = Part.ALL,
    *,
    dirty: npt.NDArray[np.uint64] | None = None,
    leave_shared: bool = False,
    scope: Sequence[tuple[int, int]] | None = None,
    keep_fds: Collection[int] = (),
) -> Plan:
    """All steps, in execution order: threads started since the checkpoint ended, brk, mm
    fields, layout, descriptors, signal dispositions, threads gone since created again,
    discards, pages, registers, blocked masks.

    ``dirty``, when given, is every page written since the target was last equal to the image
    (from a dirty tracker): pages outside it are equal already and are neither written nor
    discarded. Regions the plan re-creates are written in full regardless.

    ``scope``, when given, is the only address ranges whose memory the image speaks for (an
    undo image, ``applier/undo_image.py``, holds just the pages an apply touched): pages are
    written and discarded inside it only, memory outside it is left as it is.

    ``keep_fds``: descriptor numbers the fds part leaves as they are (``--keep-fd``).
    """
    parts = Part.of(parts)
    check_same_process(image, live)
    page = image.page_size
    steps: list[Step] = []
    notes: list[str] = []
    live_regions = list(live.regions)
    threads = match_threads(image, live, strict=Part.REGS in parts)
    if Part.REGS in parts:
        # Threads started since the checkpoint end first of all: their stacks and code may
        # be in memory the layout takes away.
        steps.extend(EndThread(t) for t in threads.ended)

    if Part.BRK in parts and live.brk is not None and live.brk != image.brk:
        steps.append(SetBrk(live.brk, image.brk))
        live_regions = simulate_brk(live_regions, live.brk, image.brk, page)
    elif Part.BRK in parts and live.brk is None:
        # Read-only (diff, dry runs): the break is known to the page, from [heap]'s end.
        heap_end = max((r.end for r in live_regions if r.name == "[heap]"), default=None)
        if heap_end != align_up(image.brk, page) and not (
            heap_end is None and image.brk == image.start_brk
        ):
            steps.append(SetBrk(None, image.brk))
            if heap_end is not None:
                live_regions = simulate_brk(live_regions, heap_end, image.brk, page)
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

    image_regions, image_saved = _of_image(image)
    recreated: list[tuple[int, int]] = []
    if Part.LAYOUT in parts:
        layout, layout_notes = plan_layout(image_regions, _merge(live_regions))
        steps.extend(layout)
        notes.extend(layout_notes)
        recreated = recreated_by(layout)
    else:
        image_regions = _restrict_to_live(image_regions, _merge(live_regions))

    if Part.FDS in parts:
        if image.fds is None:
            notes.append(
                "the image holds no descriptor state (no ids/fdinfo images): descriptors "
                "left as they are"
            )
        elif live.fds is None:
            notes.append("the descriptor table was not read: descriptors left as they are")
        elif image.pid != live.pid:
            # another process's pipes and sockets are not this one's (--other-process)
            notes.append(
                f"the image is of pid {image.pid}, not {live.pid}: descriptors left as they are"
            )
        else:
            # Injected calls, so before the page writes (see the discards below).
            steps.extend(plan_fds(image.fds, live.fds, keep_fds, notes))
    signal_steps = plan_signals(image, live, threads.pairs, notes) if Part.SIGNALS in parts else []
    # Dispositions inject rt_sigaction: before the page writes (see below); masks are set
    # with ptrace alone, after the registers.
    steps.extend(s for s in signal_steps if not isinstance(s, SetSigmask))
    if Part.REGS in parts:
        # Threads gone since the checkpoint come back once their stacks are mapped again,
        # with injected calls, so before the page writes.
        steps.extend(NewThread(t) for t in threads.created)

    if Part.MEMORY in parts:
        saved: Sequence[SavedPages] = (
            image_saved if Part.LAYOUT in parts else clip_saved(image.saved, image_regions, page)
        )
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
            runs = SavedRuns.of(saved)
            write = WritePages(runs, code_writes(runs, image_regions, page))
            steps.append(write)
            notes.extend(
                f"writes {c.end - c.start} bytes into executable memory at "
                f"{c.start:#x}-{c.end:#x} ({c.path or 'anonymous code'})"
                for c in write.code
            )

    if Part.REGS in parts:
        steps.extend(SetRegs(t, i) for t, i in threads.pairs)
    steps.extend(s for s in signal_steps if isinstance(s, SetSigmask))
    check_running_threads(steps, live)
    children = _children_left(image, live, notes)
    return Plan(
        pid=live.pid,
        image_pid=image.pid,
        page_size=page,
        steps=tuple(steps),
        notes=tuple(notes),
        children=children,
    )


def _children_left(image: ImageTask, live: LiveTask, notes: list[str]) -> tuple[int, ...]:
    """Child processes of the target that the image does not hold (they keep running as they
    are: process trees are not applied), each with a note."""
    out = []
    for pid, comm, started in live.children:
        if pid in image.children:
            continue
        when = (
            "started since the checkpoint"
            if image.dump_uptime is not None and started > image.dump_uptime
            else "not in the image"
        )
        notes.append(f"child process {pid} ({comm}) is {when}: it keeps running as it is")
        out.append(pid)
    return tuple(out)


def _merge(regions: Sequence[Region]) -> list[Region]:
    return merge_regions(regions)


# The last image planned for, with its merged regions and its saved pages clipped to them:
# what depends on the image alone, the same for every restore of one checkpoint (0.2 ms a
# plan). Known by identity (an ImageTask is immutable) through a weak reference: the entry
# goes with the image.
_IMAGE_MEMO: list[tuple[weakref.ref[ImageTask], list[Region], SavedRuns]] = []


def _of_image(image: ImageTask) -> tuple[list[Region], SavedRuns]:
    """(the image's regions merged, its saved pages inside their private ones)."""
    for kept, regions, saved in _IMAGE_MEMO:
        if kept() is image:
            return list(regions), saved
    regions = _merge(image.regions)
    saved = clip_saved(image.saved, regions, image.page_size)
    _IMAGE_MEMO[:] = [(weakref.ref(image, lambda _: _IMAGE_MEMO.clear()), regions, saved)]
    return list(regions), saved


def _restrict_to_live(image: Sequence[Region], live: Sequence[Region]) -> list[Region]:
    """Without the layout part, memory is written only where the live layout agrees."""
    out: list[Region] = []
    for want in image:
        for have in live:
            a, b = max(want.start, have.start), min(want.end, have.end)
            if a < b and same_backing(want, have, a):
                out.append(want.clip(a, b))
    return out

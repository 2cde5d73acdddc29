"""The real CRIU 4.2 dump plans correctly (its process is gone: the live side is made up)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from applier.image import image_task
from applier.model import Kind, LiveTask, Region
from applier.plan import Discard, MapAnon, SetRegs, Unmap, WritePages, make_plan
from applier.regs import gpregs_values, restart_adjusted
from formats.imagedir import ImageDir

INFO = {"anon": 0x7F05742EF000, "sparse": 0x7F0574526000, "ro": 0x7F0574525000}


@pytest.fixture
def golden(golden_dir: Path) -> ImageDir:
    return ImageDir.open(golden_dir)


def as_live(
    img: ImageDir, regions: list[Region] | None = None, extra: tuple[int, ...] = ()
) -> LiveTask:
    """A live task that looks exactly like the image (plus ``extra`` present pages)."""
    task = image_task(img)
    present = sorted(
        {r.vaddr + i * task.page_size for r in task.saved for i in range(r.nr_pages)} | set(extra)
    )
    arr = np.array(present, dtype=np.uint64)
    return LiveTask(
        pid=task.pid,
        regions=regions if regions is not None else list(task.regions),
        threads=list(task.threads),
        exe=task.exe,
        present=arr,
        anon=arr,
        brk=task.brk,
        mm_fields=dict(task.mm_fields),
    )


def test_golden_image_plans_page_writes_and_both_threads(golden: ImageDir) -> None:
    """Against an identical layout: write every private saved page, set two threads."""
    task = image_task(golden)
    plan = make_plan(task, as_live(golden))
    (write,) = plan.of(WritePages)
    assert isinstance(write, WritePages)
    vdso = next(r for r in task.regions if r.name == "[vdso]")
    assert all(not vdso.start <= r.vaddr < vdso.end for r in write.runs)
    saved_private = sum(r.nr_pages for r in task.saved if not vdso.start <= r.vaddr < vdso.end)
    assert write.nr_pages == saved_private
    assert {s.image_tid for s in plan.of(SetRegs) if isinstance(s, SetRegs)} == set(task.threads)
    assert plan.of(Unmap) == [] and plan.of(Discard) == []


def test_golden_sparse_pages_touched_later_are_zeroed(golden: ImageDir) -> None:
    """The sparse buffer's never-touched pages, present now, are planned to become zero."""
    page = 4096
    touched = tuple(INFO["sparse"] + i * page for i in (1, 3))
    plan = make_plan(image_task(golden), as_live(golden, extra=touched), ["memory"])
    (discard,) = plan.of(Discard)
    assert isinstance(discard, Discard) and discard.reason == "zero"
    assert discard.ranges == tuple((a, a + page) for a in touched)


def test_golden_lost_and_new_mappings(golden: ImageDir) -> None:
    """The anon buffer unmapped and a new mapping made since: re-create one, unmap the other."""
    task = image_task(golden)
    anon = next(r for r in task.regions if r.start <= INFO["anon"] < r.end)
    new = Region(0x100000000, 0x100004000, 3, Kind.ANON)
    regions = [r for r in task.regions if r is not anon] + [new]
    plan = make_plan(task, as_live(golden, regions=sorted(regions, key=lambda r: r.start)))
    assert plan.of(Unmap) == [Unmap(new)]
    assert [(s.region.start, s.region.end) for s in plan.of(MapAnon) if isinstance(s, MapAnon)] == [
        (anon.start, anon.end)
    ]


def test_golden_main_thread_was_interrupted_in_clock_nanosleep(golden: ImageDir) -> None:
    """CRIU stored -EINTR for the sleeping thread: no rewind, the call returns EINTR."""
    core = golden.core(golden.root_pid)
    assert core.thread_info is not None
    values = gpregs_values(core.thread_info.gpregs)
    adjusted, rewound = restart_adjusted(values)
    assert values["orig_ax"] == 230 and not rewound and adjusted["ax"] == values["ax"]

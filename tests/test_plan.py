"""The planner on hand-made image and live values (no kernel involved)."""

from __future__ import annotations

import attrs
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from applier.errors import MismatchError
from applier.model import ImageTask, Kind, LiveTask, Region, SavedPages
from applier.plan import (
    Discard,
    EndThread,
    MapAnon,
    MapFile,
    NewThread,
    Protect,
    SetBrk,
    SetRegs,
    Unmap,
    WritePages,
    make_plan,
)

P = 4096
EXE = "/usr/bin/target"
TEXT = Region(0x400000, 0x402000, 5, Kind.FILE, path=EXE, offset=0)
DATA = Region(0x402000, 0x403000, 3, Kind.FILE, path=EXE, offset=0x2000)
HEAP = Region(0x600000, 0x604000, 3, Kind.ANON, name="[heap]")
ANON = Region(0x7F0000000000, 0x7F0000010000, 3, Kind.ANON)
VDSO = Region(0x7FFF00000000, 0x7FFF00002000, 5, Kind.SPECIAL, name="[vdso]")


def pages(*addrs: int) -> np.ndarray:
    return np.array(sorted(addrs), dtype=np.uint64)


def image(
    regions: list[Region] | None = None,
    saved: list[SavedPages] | None = None,
    threads: tuple[int, ...] = (100,),
    brk: int = 0x604000,
) -> ImageTask:
    return ImageTask(
        pid=100,
        page_size=P,
        regions=regions if regions is not None else [TEXT, DATA, HEAP, ANON, VDSO],
        saved=saved or [],
        brk=brk,
        start_brk=0x600000,
        exe=EXE,
        threads=threads,
    )


def live(
    regions: list[Region] | None = None,
    *,
    present: np.ndarray | None = None,
    anon: np.ndarray | None = None,
    threads: tuple[int, ...] = (100,),
    brk: int | None = 0x604000,
    exe: str = EXE,
) -> LiveTask:
    return LiveTask(
        pid=100,
        regions=regions if regions is not None else [TEXT, DATA, HEAP, ANON, VDSO],
        threads=threads,
        exe=exe,
        present=present if present is not None else pages(),
        anon=anon if anon is not None else pages(),
        brk=brk,
    )


def test_identical_layout_needs_only_page_writes_and_registers() -> None:
    """Same layout: the plan writes the saved pages and sets registers, nothing else."""
    saved = [SavedPages(0x600000, 2, None), SavedPages(0x7F0000000000, 1, None)]
    plan = make_plan(image(saved=saved), live())
    assert [type(s) for s in plan.steps] == [WritePages, SetRegs]
    assert plan.pages_to_write == 3


def test_plans_of_images_one_after_the_other_each_write_their_own_pages() -> None:
    """What the planner keeps of the last image (its regions merged, its saved pages
    clipped) is never used for another image, one made from the last included."""
    a = image(saved=[SavedPages(0x600000, 2, None)])
    b = image(saved=[SavedPages(0x7F0000000000, 3, None)])

    def written(img: ImageTask) -> list[tuple[int, int]]:
        (step,) = make_plan(img, live()).of(WritePages)
        return list(zip(step.runs.vaddr.tolist(), step.runs.npages.tolist(), strict=True))

    assert written(a) == [(0x600000, 2)]
    assert written(b) == [(0x7F0000000000, 3)]
    assert written(a) == [(0x600000, 2)]
    assert written(attrs.evolve(a, saved=[SavedPages(0x600000, 1, None)])) == [(0x600000, 1)]


def test_present_pages_the_image_omits_are_zeroed_in_anon_and_reread_in_file() -> None:
    """Anonymous pages not in the image -> zero; copied file pages not in the image -> file."""
    saved = [SavedPages(0x600000, 1, None)]
    present = pages(0x600000, 0x601000, 0x603000, 0x402000, 0x400000)
    cow = pages(0x600000, 0x601000, 0x603000, 0x402000)  # text page 0x400000 is the file's
    plan = make_plan(image(saved=saved), live(present=present, anon=cow), ["memory"])
    discards = {d.reason: d.ranges for d in plan.steps if isinstance(d, Discard)}
    assert discards["zero"] == ((0x601000, 0x602000), (0x603000, 0x604000))
    assert discards["file"] == ((0x402000, 0x403000),)


def test_vdso_pages_in_the_pagemap_are_never_written() -> None:
    """CRIU dumps the vDSO in full; those pages must not be copied over the live vDSO."""
    saved = [SavedPages(VDSO.start, 2, None), SavedPages(0x600000, 1, None)]
    plan = make_plan(image(saved=saved), live(), ["memory"])
    (write,) = [s for s in plan.steps if isinstance(s, WritePages)]
    assert [(r.vaddr, r.nr_pages) for r in write.runs] == [(0x600000, 1)]


def test_layout_changes_unmap_map_and_protect() -> None:
    """New live mapping unmapped, lost image mapping re-created, protection put back."""
    extra = Region(0x7E0000000000, 0x7E0000004000, 3, Kind.ANON)
    changed = Region(ANON.start, ANON.end, 1, Kind.ANON)
    lost = Region(0x7D0000000000, 0x7D0000002000, 3, Kind.ANON)
    lib = Region(0x7C0000000000, 0x7C0000003000, 1, Kind.FILE, path="/lib/x.so", offset=0x1000)
    img = image(regions=[TEXT, DATA, HEAP, lost, lib, ANON, VDSO])
    plan = make_plan(img, live(regions=[TEXT, DATA, HEAP, extra, changed, VDSO]), ["layout"])
    assert plan.of(Unmap) == [Unmap(extra)]
    assert plan.of(MapAnon) == [MapAnon(lost)]
    assert plan.of(MapFile) == [MapFile(lib)]
    assert plan.of(Protect) == [Protect(ANON.start, ANON.end, 1, 3)]


def test_partial_protection_change_is_planned_for_that_part_only() -> None:
    """mprotect of two pages in the middle of a region: only those pages are protected back."""
    a, b = ANON.start + 4 * P, ANON.start + 6 * P
    split = [
        Region(ANON.start, a, 3, Kind.ANON),
        Region(a, b, 1, Kind.ANON),
        Region(b, ANON.end, 3, Kind.ANON),
    ]
    plan = make_plan(image(), live(regions=[TEXT, DATA, HEAP, *split, VDSO]), ["layout"])
    assert plan.of(Protect) == [Protect(a, b, 1, 3)]


def test_heap_growth_is_undone_by_brk_without_extra_unmaps() -> None:
    """A grown heap comes back with brk alone; the layout diff accounts for the new break."""
    grown = Region(0x600000, 0x640000, 3, Kind.ANON, name="[heap]")
    plan = make_plan(image(), live(regions=[TEXT, DATA, grown, ANON, VDSO], brk=0x640000))
    assert plan.of(SetBrk) == [SetBrk(0x640000, 0x604000)]
    assert plan.of(Unmap) == []


def test_replaced_mapping_is_unmapped_then_mapped_again() -> None:
    """Anonymous memory where the image had a file mapping: unmap, then map the file."""
    lib = Region(0x7C0000000000, 0x7C0000003000, 3, Kind.FILE, path="/lib/x.so", offset=0)
    anon_there = Region(lib.start, lib.end, 3, Kind.ANON)
    plan = make_plan(
        image(regions=[TEXT, lib, VDSO]), live(regions=[TEXT, anon_there, VDSO]), ["layout"]
    )
    assert [type(s) for s in plan.steps] == [Unmap, MapFile]


def test_other_executable_is_refused() -> None:
    """An image of another program is refused, naming both executables."""
    with pytest.raises(MismatchError, match="/usr/bin/other"):
        make_plan(image(), live(exe="/usr/bin/other"))


def test_code_mapping_at_another_address_is_refused() -> None:
    """Same program, but its code mapped elsewhere (another run, ASLR): refused."""
    moved = Region(0x500000, 0x502000, 5, Kind.FILE, path=EXE, offset=0)
    with pytest.raises(MismatchError, match="code mapping"):
        make_plan(image(), live(regions=[moved, DATA, HEAP, ANON, VDSO]))


def test_threads_of_another_process_must_match_in_number() -> None:
    """An image of another process (a replica): threads meet by position, so different
    counts are refused for regs, and fine for memory only."""
    other = attrs.evolve(image(threads=(200, 201)), pid=200)
    with pytest.raises(MismatchError, match="threads"):
        make_plan(other, live())
    plan = make_plan(other, live(), ["memory", "layout"])
    assert plan.of(SetRegs) == []


def test_threads_matched_by_id_when_ids_agree_else_by_position() -> None:
    """Thread ids equal: matched by id; an image of another process: in order, leader
    first."""
    plan = make_plan(image(threads=(100, 102, 101)), live(threads=(100, 101, 102)), ["regs"])
    assert {(s.tid, s.image_tid) for s in plan.of(SetRegs)} == {(100, 100), (101, 101), (102, 102)}
    other = attrs.evolve(image(threads=(200, 7)), pid=200)
    plan = make_plan(other, live(threads=(100, 9)), ["regs"])
    assert [(s.tid, s.image_tid) for s in plan.of(SetRegs)] == [(100, 200), (9, 7)]


def test_threads_started_since_end_first_and_gone_ones_come_back_before_the_pages() -> None:
    """The same process: a thread only alive now is ended before anything else, one only in
    the image is created after the layout and before the page writes; the rest keep their
    ids."""
    saved = [SavedPages(0x601000, 1, None)]
    moved = Region(0x7D0000000000, 0x7D0000001000, 3, Kind.ANON)
    plan = make_plan(
        image(threads=(100, 101, 102), saved=saved),
        live(threads=(100, 102, 103, 104), regions=[TEXT, DATA, HEAP, ANON, moved, VDSO]),
    )
    kinds = [type(s) for s in plan.steps]
    assert plan.of(EndThread) == [EndThread(103), EndThread(104)]
    assert plan.of(NewThread) == [NewThread(101)]
    assert kinds[:2] == [EndThread, EndThread]
    assert kinds.index(Unmap) < kinds.index(NewThread) < kinds.index(WritePages)
    assert [(s.tid, s.image_tid) for s in plan.of(SetRegs)] == [(100, 100), (102, 102)]
    summary = plan.summary()
    assert (summary["threads_ended"], summary["threads_created"], summary["threads"]) == (2, 1, 3)
    # without registers, threads are left as they are
    plan = make_plan(image(threads=(100, 101)), live(threads=(100, 103)), ["memory", "layout"])
    assert plan.of(EndThread) == [] and plan.of(NewThread) == []


def test_recreating_shared_memory_is_refused() -> None:
    """A shared mapping the process lost cannot be re-created from the image: refused."""
    shm = Region(0x7B0000000000, 0x7B0000001000, 3, Kind.SHARED_FILE, path="/tmp/f")
    with pytest.raises(MismatchError, match="re-create"):
        make_plan(image(regions=[TEXT, shm, VDSO]), live(regions=[TEXT, VDSO]), ["layout"])


def test_without_layout_part_memory_is_written_only_where_layouts_agree() -> None:
    """--restore memory: pages of regions missing in the target are skipped, not written."""
    saved = [SavedPages(0x7D0000000000, 1, None), SavedPages(0x600000, 1, None)]
    lost = Region(0x7D0000000000, 0x7D0000002000, 3, Kind.ANON)
    plan = make_plan(image(regions=[TEXT, DATA, HEAP, lost, VDSO], saved=saved), live(), ["memory"])
    (write,) = plan.of(WritePages)
    assert isinstance(write, WritePages)
    assert [r.vaddr for r in write.runs] == [0x600000]


@settings(max_examples=200, deadline=None)
@given(
    saved_pages=st.sets(st.integers(0, 15)),
    present_pages=st.sets(st.integers(0, 15)),
)
def test_every_present_anon_page_is_either_written_or_zeroed(
    saved_pages: set[int], present_pages: set[int]
) -> None:
    """Invariant: after the plan, each page of an anon region is the image's or zero."""
    saved = [SavedPages(ANON.start + i * P, 1, None) for i in sorted(saved_pages)]
    present = pages(*(ANON.start + i * P for i in present_pages))
    plan = make_plan(image(saved=saved), live(present=present, anon=present), ["memory"])
    written = {
        r.vaddr + k * P
        for s in plan.of(WritePages)
        if isinstance(s, WritePages)
        for r in s.runs
        for k in range(r.nr_pages)
    }
    zeroed = {
        a
        for s in plan.of(Discard)
        if isinstance(s, Discard)
        for lo, hi in s.ranges
        for a in range(lo, hi, P)
    }
    assert written == {ANON.start + i * P for i in saved_pages}
    assert zeroed == {ANON.start + i * P for i in present_pages - saved_pages}
    assert not written & zeroed


def test_dirty_pages_restrict_writes_and_discards() -> None:
    """With a dirty set, only dirty pages are written or zeroed; re-created regions in full."""
    lost = Region(0x7D0000000000, 0x7D0000002000, 3, Kind.ANON)
    saved = [SavedPages(ANON.start, 16, None), SavedPages(lost.start, 2, None)]
    present = pages(*(ANON.start + i * P for i in range(16)), HEAP.start)
    dirty = pages(ANON.start + 3 * P, ANON.start + 4 * P, HEAP.start)
    img = image(regions=[TEXT, DATA, HEAP, lost, ANON, VDSO], saved=saved)
    plan = make_plan(img, live(present=present, anon=present), dirty=dirty)
    (write,) = plan.of(WritePages)
    assert isinstance(write, WritePages)
    assert [(r.vaddr, r.nr_pages) for r in write.runs] == [(lost.start, 2), (ANON.start + 3 * P, 2)]
    (zero,) = plan.of(Discard)
    assert isinstance(zero, Discard) and zero.ranges == ((HEAP.start, HEAP.start + P),)

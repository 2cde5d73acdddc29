"""The page write path: iovec-array memory I/O, write sets as arrays, read-back verification,
--only-dirty content compare without a tracker, and the pooled undo spool."""

from __future__ import annotations

import contextlib
import ctypes
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from applier import executor as execute
from applier.api import apply
from applier.dump import dump
from applier.errors import ApplyFailed, VerifyFailed
from applier.executor import pages
from applier.executor.context import Context
from applier.model import Kind, Region, SavedPages
from applier.plan import SavedRuns, WritePages, restrict_to_pages
from applier.plan.memory import clip_saved, code_writes
from applier.plan.steps import CodeWrite, SetRegs
from applier.undo import log as undo
from injector import attach
from injector.memory import MemoryIO
from tests.live_state import assert_same, checkpoint, command, snapshot
from tests.procs import Target, assert_untouched, build_c, spawn

PAGE = 4096
BASE = 0x10000000


def _pages(runs: Any) -> list[tuple[int, object]]:
    return sorted((r.vaddr + k * PAGE, r.source) for r in runs for k in range(r.nr_pages))


def _random_runs(rng: np.random.Generator, most: int) -> tuple[list[SavedPages], int]:
    """Up to ``most - 1`` saved runs from BASE, sorted, with gaps of 0-2 pages, each of
    1 to ``most - 1`` pages; and the page index past the last."""
    saved, pos = [], 0
    for i in range(int(rng.integers(0, most))):
        pos += int(rng.integers(0, 3))
        n = int(rng.integers(1, most))
        saved.append(SavedPages(BASE + pos * PAGE, n, f"run{i}"))
        pos += n
    return saved, pos


def test_restrict_and_clip_match_page_by_page_reference() -> None:
    """Array-based restrict_to_pages/clip_saved pick exactly the pages a per-page loop picks,
    each with the source run it came from."""
    rng = np.random.default_rng(5)
    for _ in range(500):
        saved, pos = _random_runs(rng, 6)
        every = dict(_pages(saved))
        dirty = np.unique(rng.integers(0, pos + 2, int(rng.integers(0, 12))))
        dirty_pages = (dirty * PAGE + BASE).astype(np.uint64)
        keep = []
        if rng.random() < 0.5:
            a = int(rng.integers(0, pos + 1))
            keep.append((BASE + a * PAGE, BASE + (a + int(rng.integers(1, 4))) * PAGE))
        got = restrict_to_pages(saved, dirty_pages, keep, PAGE)
        want = {int(a) for a in dirty_pages} | {
            a for a in every for s, e in keep if s <= a < e
        }  # fmt: skip
        assert _pages(got) == sorted((a, every[a]) for a in want if a in every)
        regions = [
            Region(BASE + 2 * PAGE, BASE + 5 * PAGE, 3, Kind.ANON),
            Region(BASE + 5 * PAGE, BASE + 7 * PAGE, 3, Kind.SHARED_ANON),
            Region(BASE + 9 * PAGE, BASE + 30 * PAGE, 3, Kind.FILE),
        ]
        clipped = clip_saved(saved, regions, PAGE)
        private = [r for r in regions if r.kind.private]
        assert _pages(clipped) == [
            (a, s) for a, s in _pages(saved) if any(r.start <= a < r.end for r in private)
        ]


def test_code_writes_match_a_clip_per_region() -> None:
    """code_writes, one clip for every executable private region, gives exactly what a clip
    per region gives: the pieces by region in the order given, then by address, with the
    file offset of each piece."""
    rng = np.random.default_rng(11)
    for _ in range(300):
        saved, _ = _random_runs(rng, 8)
        regions, at = [], 0
        for i in range(int(rng.integers(1, 6))):
            at += int(rng.integers(0, 3))
            n = int(rng.integers(1, 6))
            kind = (
                Kind.FILE
                if rng.random() < 0.5
                else (Kind.ANON if rng.random() < 0.7 else Kind.SHARED_ANON)
            )
            prot = 5 if rng.random() < 0.6 else 3
            path = f"/lib{i}.so" if kind is Kind.FILE else None
            start, end = BASE + at * PAGE, BASE + (at + n) * PAGE
            regions.append(Region(start, end, prot, kind, path=path, offset=i * 7 * PAGE))
            at += n
        order = list(rng.permutation(len(regions)))
        shuffled = [regions[k] for k in order]
        runs = SavedRuns.of(saved)
        want = []
        for r in shuffled:
            if not r.prot & 4 or not r.kind.private:
                continue
            inside = clip_saved(runs, [r], PAGE)
            for a, e in zip(inside.vaddr.tolist(), inside.ends(PAGE).tolist(), strict=True):
                path = r.path if r.kind is Kind.FILE else None
                want.append(CodeWrite(a, e, path, r.offset + (a - r.start)))
        assert code_writes(runs, shuffled, PAGE) == tuple(want)


def test_write_pages_step_keeps_runs_view() -> None:
    """WritePages takes SavedPages or SavedRuns; .runs reads back as SavedPages."""
    runs = [SavedPages(BASE + PAGE, 2, "b"), SavedPages(BASE, 1, "a")]
    step = WritePages(runs)
    assert isinstance(step.runs, SavedRuns)
    assert [(r.vaddr, r.nr_pages, r.source) for r in step.runs] == [
        (BASE, 1, "a"),
        (BASE + PAGE, 2, "b"),
    ]
    assert step.nr_pages == 3 and step == WritePages(SavedRuns.of(runs))
    assert step.describe() == "write   3 saved pages in 2 runs"


@pytest.mark.live
def test_read_iov_and_write_iov_with_read_only_pages_and_many_rows() -> None:
    """Raw iovec arrays: more rows than IOV_MAX, a read-only page in the middle (short
    count, /proc/PID/mem fallback), byte-exact both ways."""
    with spawn(build_c("inj_target.c")) as t:
        t.expect("ready")
        with attach(t.pid) as s:
            npages = 2100
            base = s.mmap(0, npages * PAGE, 3, 0x22)
            s.mprotect(base + 1500 * PAGE, PAGE, 1)
            rng = np.random.default_rng(3)
            src = rng.integers(0, 256, npages * PAGE, dtype=np.uint8)
            pages = np.arange(0, npages, 2, dtype=np.uint64)
            pages = np.append(pages, np.uint64(1501))  # beside the read-only page
            remote = np.stack((base + pages * PAGE, np.full(len(pages), PAGE, np.uint64)), 1)
            local = np.stack((src.ctypes.data + pages * PAGE, remote[:, 1]), 1)
            s.write_iov(local.astype(np.uint64), remote.astype(np.uint64))
            back = np.zeros_like(src)
            local_back = np.stack((back.ctypes.data + pages * PAGE, remote[:, 1]), 1)
            s.read_iov(local_back.astype(np.uint64), remote.astype(np.uint64))
            for p in pages.tolist():
                assert bytes(back[p * PAGE : (p + 1) * PAGE]) == bytes(
                    src[p * PAGE : (p + 1) * PAGE]
                )
            assert s.read(base + 1500 * PAGE, PAGE) == bytes(src[1500 * PAGE : 1501 * PAGE])
            assert s.read(base + PAGE, PAGE) == b"\0" * PAGE  # odd pages untouched
            with pytest.raises(ValueError):
                s.write_iov(local[:2].astype(np.uint64), remote[:3].astype(np.uint64))
            s.munmap(base, npages * PAGE)
        assert_untouched(t)


@pytest.mark.live
def test_verify_catches_a_page_that_differs_after_writing(
    target: Target, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A written page changed behind the executor's back: VerifyFailed names it and the
    apply is rolled back."""
    image, _, _ = checkpoint(target, tmp_path)
    command(target, "scribble", "done")
    changed = snapshot(target.pid)
    real = pages.write_pages
    spoiled: list[int] = []

    def spoil(ctx: Context, step: WritePages) -> None:
        real(ctx, step)
        run = step.runs[len(step.runs) // 2]
        addr = run.vaddr + (run.nr_pages - 1) * PAGE
        ctx.process.write(addr + 8, b"\xff" * 8)
        spoiled.append(addr)

    monkeypatch.setitem(execute._RUN, WritePages, spoil)
    with pytest.raises(VerifyFailed) as info:
        apply(image, target.pid)
    assert spoiled and f"page {spoiled[0]:#x} differs" in str(info.value)
    assert_same(changed, snapshot(target.pid))
    assert_untouched(target)


@contextlib.contextmanager
def _dumped_hold_target(tmp_path: Path) -> Iterator[tuple[Target, int, Path]]:
    """tests/targets/hold_target.c with 16 MiB filled and dumped: (target, its region's
    address, the image)."""
    with spawn(build_c("hold_target.c"), "16") as t:
        (addr,) = t.expect("ready")
        t.send("fill 1")
        t.expect("filled")
        image = tmp_path / "ckpt"
        dump(t.pid, image)
        yield t, int(addr, 16), image


@pytest.mark.live
def test_verify_catches_a_change_inside_a_large_piece(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pieces of a whole CHUNK are compared in place (one memcmp each): a word changed
    inside one after the write is still caught, named and rolled back."""
    with _dumped_hold_target(tmp_path) as (t, base, image):
        t.send("fill 2")
        t.expect("filled")
        t.send("hash")
        before = t.expect("hash")
        real = pages.write_pages
        spoiled = base + (3 << 20) + 5 * PAGE

        def spoil(ctx: Context, step: WritePages) -> None:
            big = [r for r in step.runs if r.vaddr <= spoiled < r.vaddr + r.nr_pages * PAGE]
            assert big and big[0].nr_pages * PAGE >= 8 << 20  # one run: whole-CHUNK pieces
            real(ctx, step)
            ctx.process.write(spoiled + 64, b"\xff" * 8)

        monkeypatch.setitem(execute._RUN, WritePages, spoil)
        with pytest.raises(VerifyFailed) as info:
            apply(image, t.pid, undo=True)
        assert f"page {spoiled:#x} differs" in str(info.value)
        t.send("hash")
        assert t.expect("hash") == before
        assert_untouched(t)


@pytest.mark.live
@pytest.mark.parametrize("spoil_written", [False, True])
def test_only_dirty_verifies_only_the_pages_it_wrote(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spoil_written: bool
) -> None:
    """--only-dirty without a tracker compares every saved page and writes the few that
    differ; verification reads back those pages only (not the 16 MiB compared), and still
    catches one of them changed after the write."""
    with _dumped_hold_target(tmp_path) as (t, base, image):
        t.send("hash")
        at_image = t.expect("hash")
        changed = [base + k * PAGE for k in (3, 4, 5, 700, 2048, 4095)]
        with attach(t.pid) as s:
            for a in changed:
                s.write(a + 128, b"\x5a" * 8)  # (the hash reads every 64th byte)
        read: list[int] = []
        verifying: list[bool] = []
        real_read = MemoryIO.read_iov

        def counting(self: MemoryIO, local: np.ndarray, remote: np.ndarray) -> None:
            if verifying:
                read.append(int(remote[:, 1].sum()))
            real_read(self, local, remote)

        real_write, real_verify = pages.write_pages, pages.verify_pages

        def write(ctx: Context, step: WritePages) -> None:
            real_write(ctx, step)
            if spoil_written:
                ctx.process.write(changed[-2] + 8, b"\xff")

        def verify(ctx: Context, step: WritePages) -> None:
            verifying.append(True)
            try:
                real_verify(ctx, step)
            finally:
                verifying.clear()

        monkeypatch.setattr(MemoryIO, "read_iov", counting)
        monkeypatch.setitem(execute._RUN, WritePages, write)
        monkeypatch.setitem(execute._VERIFY, WritePages, verify)
        if spoil_written:
            with pytest.raises(VerifyFailed, match=f"page {changed[-2]:#x} differs"):
                apply(image, t.pid, only_dirty=True, undo=True)
            assert 0 < sum(read) <= 64 * PAGE  # of the 4,000 pages compared
            t.send("hash")
            assert t.expect("hash") != at_image  # rolled back: the changes are there again
        else:
            result = apply(image, t.pid, only_dirty=True, undo=False)
            st = result.stats
            assert len(changed) <= st.pages_written <= 64 < st.pages_skipped and st.verified
            assert sum(read) == st.pages_written * PAGE
            t.send("hash")
            assert t.expect("hash") == at_image
        assert_untouched(t)


@pytest.mark.live
def test_only_dirty_without_undo_compares_and_skips(target: Target, tmp_path: Path) -> None:
    """--only-dirty --no-undo (content compare in a scratch buffer): identical pages are
    skipped, the result equals the checkpoint."""
    image, before, checksum = checkpoint(target, tmp_path)
    command(target, "scribble", "done")
    result = apply(image, target.pid, only_dirty=True, undo=False)
    st = result.stats
    assert st.pages_skipped > 0 and st.pages_written > 0 and st.verified
    assert st.pages_written + st.pages_skipped == result.plan.pages_to_write
    assert_same(before, snapshot(target.pid))
    assert command(target, "sum", "sum") == [checksum]


def test_undo_spool_is_pooled_and_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A closed in-memory log leaves its memfd to the next one, whole for POOL_IDLE seconds
    and then cut down to POOL_BYTES; the next log starts empty and appends at offset 0."""
    monkeypatch.setattr(undo, "_pool", [])
    monkeypatch.setattr(undo, "_heads", [])
    monkeypatch.setattr(undo, "HEAD_BYTES", 0)  # everything in the memfd
    monkeypatch.setattr(undo, "POOL_BYTES", 2 * PAGE)
    monkeypatch.setattr(undo, "POOL_IDLE", 0.3)
    first = undo.UndoLog.create()
    assert first.spool is not None
    fd = first.spool.fileno()
    assert first.append(memoryview(b"a" * 3 * PAGE)) == 0
    first.close()
    assert not first.enabled
    assert os.fstat(fd).st_size == 3 * PAGE  # kept whole while the next apply may come
    again = undo.UndoLog.create()
    assert again.spool is not None and again.spool.fileno() == fd
    assert again.capacity == 3 * PAGE and again.end == 0
    time.sleep(0.5)  # the trim finds nothing in the pool: the memfd is in use
    assert os.fstat(fd).st_size == 3 * PAGE
    again.close()
    deadline = time.monotonic() + 10
    while os.fstat(fd).st_size != 2 * PAGE and time.monotonic() < deadline:
        time.sleep(0.05)
    assert os.fstat(fd).st_size == 2 * PAGE  # idle: cut to POOL_BYTES
    second = undo.UndoLog.create()
    assert second.spool is not None and second.spool.fileno() == fd
    assert second.capacity == 2 * PAGE and second.end == 0
    assert second.append(memoryview(b"b" * PAGE)) == 0
    (_, data) = next(second.iter_saved((undo.SavedRange(0x1000, PAGE, 0),)))
    assert data == b"b" * PAGE
    third = undo.UndoLog.create()  # the pool is empty now: a new memfd
    assert third.spool is not None and third.spool.fileno() != fd
    second.close()
    third.close()  # the pool holds one memfd at most: this one is closed
    assert len(undo._pool) == 1
    undo._pool.pop().close()


def _restored(log: undo.UndoLog, addrs: list[int], offsets: list[int]) -> dict[int, bytes]:
    """What ``restore_table`` hands write_iov for one page at each address, from each spool
    offset: address -> bytes."""
    table = undo.UndoPageTable(
        np.array(addrs, dtype=np.uint64),
        np.full(len(addrs), PAGE, dtype=np.uint64),
        np.array(offsets, dtype=np.uint64),
    )
    seen: dict[int, bytes] = {}

    def write_iov(local: np.ndarray, remote: np.ndarray) -> None:
        for (lb, ln), (ra, _) in zip(local.tolist(), remote.tolist(), strict=True):
            seen[ra] = ctypes.string_at(lb, ln)

    log.restore_table(table, write_iov)
    return seen


def test_undo_page_table_restores_through_write_iov() -> None:
    """UndoPageTable records hand write_iov the spool bytes of every range."""
    log = undo.UndoLog.create()
    try:
        off = log.append(memoryview(b"x" * PAGE + b"y" * PAGE))
        seen = _restored(log, [0x5000, 0x9000], [off + PAGE, off])
        assert seen == {0x5000: b"y" * PAGE, 0x9000: b"x" * PAGE}
    finally:
        log.close()


def test_undo_spool_moves_to_disk_past_its_memory_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past MEMORY_SPOOL_BYTES the spool continues in a file on disk, at the offsets that
    follow, and the memfd keeps what it held; what was saved before and after reads back,
    also in one read across the two."""
    monkeypatch.setattr(undo, "_pool", [])
    monkeypatch.setattr(undo, "_heads", [])
    monkeypatch.setattr(undo, "HEAD_BYTES", 0)
    monkeypatch.setattr(undo, "MEMORY_SPOOL_BYTES", 3 * PAGE)
    log = undo.UndoLog.create()
    try:
        assert log.spool is not None and log.pooled
        assert os.readlink(f"/proc/self/fd/{log.spool.fileno()}").startswith("/memfd:")
        assert log.append(memoryview(b"a" * 2 * PAGE)) == 0
        assert log.spilled is None
        assert log.append(memoryview(b"b" * 2 * PAGE)) == 2 * PAGE
        assert log.spilled is not None and log.disk is not None and log.split == 2 * PAGE
        assert os.readlink(f"/proc/self/fd/{log.spool.fileno()}").startswith("/memfd:")
        assert not os.readlink(f"/proc/self/fd/{log.disk.fileno()}").startswith("/memfd:")
        assert os.fstat(log.disk.fileno()).st_size == 2 * PAGE  # nothing copied
        saved = (undo.SavedRange(0x1000, 2 * PAGE, 0), undo.SavedRange(0x9000, 2 * PAGE, 2 * PAGE))
        assert dict(log.iter_saved(saved)) == {0x1000: b"a" * 2 * PAGE, 0x9000: b"b" * 2 * PAGE}
        assert log.read(PAGE, 2 * PAGE) == b"a" * PAGE + b"b" * PAGE
        assert log.append(memoryview(b"c" * PAGE)) == 4 * PAGE
        seen = _restored(log, [0x1000, 0x9000, 0x20000], [PAGE, 3 * PAGE, 4 * PAGE])
        assert seen == {0x1000: b"a" * PAGE, 0x9000: b"b" * PAGE, 0x20000: b"c" * PAGE}
    finally:
        log.close()
    assert len(undo._pool) == 1  # the memfd went back to the pool when the spool moved
    undo._pool.pop().close()


def test_undo_spool_head_is_read_into_and_continues_in_the_memfd(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first HEAD_BYTES of an in-memory spool are this process's memory: ``reserve``
    gives the place to read into and ``append`` of that view copies nothing; an append that
    does not fit closes the head and the memfd goes on from its offset 0; reads and
    ``restore_table`` see one range of offsets across head, memfd and disk; the head is
    pooled."""
    monkeypatch.setattr(undo, "_pool", [])
    monkeypatch.setattr(undo, "_heads", [])
    monkeypatch.setattr(undo, "HEAD_BYTES", 3 * PAGE)
    monkeypatch.setattr(undo, "MEMORY_SPOOL_BYTES", 6 * PAGE)
    log = undo.UndoLog.create()
    try:
        assert log.head is not None and log.spool is not None and log.base == 3 * PAGE
        head = log.head
        room = log.reserve(2 * PAGE)
        assert room is not None and room.ctypes.data == head.ctypes.data
        room[:] = ord("a")
        assert log.append(room.data) == 0 and log.end == 2 * PAGE
        assert log.reserve(2 * PAGE) is None  # does not fit in what is left
        assert log.append(memoryview(b"b" * 2 * PAGE)) == 2 * PAGE  # closes the head
        assert log.base == 2 * PAGE and log.capacity == 2 * PAGE
        assert os.pread(log.spool.fileno(), 2 * PAGE, 0) == b"b" * 2 * PAGE
        assert log.reserve(PAGE) is None  # the head stays closed
        assert log.append(memoryview(b"c" * 3 * PAGE)) == 4 * PAGE  # past the bound: disk
        assert log.disk is not None and log.split == 4 * PAGE
        assert log.read(PAGE, 5 * PAGE) == b"a" * PAGE + b"b" * 2 * PAGE + b"c" * 2 * PAGE
        seen = _restored(log, [0x1000, 0x9000, 0x20000], [5 * PAGE, PAGE, 3 * PAGE])
        assert seen == {0x1000: b"c" * PAGE, 0x9000: b"a" * PAGE, 0x20000: b"b" * PAGE}
    finally:
        log.close()
    again = undo.UndoLog.create()
    try:
        assert again.head is head and again.base == 3 * PAGE and again.end == 0
        assert again.append(memoryview(b"d" * PAGE)) == 0  # a copy into the head
        assert bytes(head[:PAGE]) == b"d" * PAGE
    finally:
        again.close()
    undo._pool.pop().close()


@pytest.mark.live
@pytest.mark.parametrize("where", ["head and disk", "head and memfd"])
def test_rollback_from_a_spool_in_two_places(
    target: Target, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """An apply whose undo spool went on past its head (into a file on disk past the memory
    bound, or into the memfd), failing after its page writes, is rolled back exactly from
    both places (the layout steps' saved pages are in both; an apply whose page writes are
    in the head rolls back in the verification tests above)."""
    image, _, _ = checkpoint(target, tmp_path)
    command(target, "scribble", "done")
    changed = snapshot(target.pid)
    # The scribbled target's apply appends 256 KiB, then 1 MiB and more: the first fits in a
    # 512 KiB head, the rest goes past it.
    head = 512 << 10
    monkeypatch.setattr(undo, "_heads", [])
    monkeypatch.setattr(undo, "HEAD_BYTES", head)
    if where == "head and disk":
        monkeypatch.setattr(undo, "MEMORY_SPOOL_BYTES", head)
    real = execute.Executor._do
    seen: list[tuple[Path | None, int, int]] = []

    def failing(self: execute.Executor, step: Any) -> None:
        if isinstance(step, SetRegs):
            log = self.ctx.undo
            seen.append((log.spilled, log.base, log.end))
            raise OSError(5, "injected failure")
        real(self, step)

    monkeypatch.setattr(execute.Executor, "_do", failing)
    with pytest.raises(ApplyFailed, match="rolled back"):
        apply(image, target.pid)
    assert seen
    spilled, base, end = seen[0]
    assert 0 < base <= head < end  # some of it in the head, more past it
    assert (spilled is not None) == (where == "head and disk")
    assert_same(changed, snapshot(target.pid))
    assert_untouched(target)

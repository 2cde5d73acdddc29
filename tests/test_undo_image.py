"""apply --undo DIR on real processes: the undo image is a CRIU image (crit, ImageDir) that puts
the target back, byte for byte, to its state before the apply, touching nothing else."""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from applier import executor as execute
from applier.api import apply
from applier.dump import dump
from applier.errors import ApplyFailed, MismatchError, RollbackFailed
from applier.journal import Journal
from applier.model import ImageTask, Kind, LiveTask, Region, SavedPages
from applier.plan import Discard, SetRegs, Step, WritePages, make_plan
from applier.undo import image as undo_image
from applier.undo.image import UNDO_FILE, UndoDirNotEmpty, load_scope
from formats.imagedir import ImageDir
from injector import attach
from tests.live_state import assert_same, checkpoint, command, snapshot
from tests.procs import Target, assert_untouched, build_c, run_applier, spawn

pytestmark = pytest.mark.live
CRIT = shutil.which("crit") or "/usr/bin/crit"


def crit_decode(directory: Path) -> dict[str, Any]:
    """Every image of ``directory`` through Debian's crit (pages-*.img are raw data)."""
    out = {}
    for img in sorted(directory.glob("*.img")):
        if img.name.startswith("pages-"):
            continue
        done = subprocess.run(
            [CRIT, "decode", "-i", str(img)], capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, f"crit decode {img.name}: {done.stderr}"
        out[img.name] = json.loads(done.stdout)
    return out


def scribbled(t: Target, tmp_path: Path) -> tuple[Path, str]:
    """Checkpoint, then scribble; returns the image and the checksum of the scribbled state."""
    image, _, _ = checkpoint(t, tmp_path)
    command(t, "scribble", "done")
    (checksum,) = command(t, "sum", "sum")
    return image, checksum


def test_undo_image_puts_the_target_back_byte_for_byte(target: Target, tmp_path: Path) -> None:
    """apply --undo D, then apply D: layout, memory, break and registers as before the apply."""
    image, checksum = scribbled(target, tmp_path)
    changed = snapshot(target.pid)
    undo = tmp_path / "undo"
    result = apply(image, target.pid, undo_dir=undo)
    assert result.undo is not None and result.undo.path == undo
    assert result.undo.pages > 0 and result.undo.scope_pages >= result.undo.pages
    assert_untouched(target)
    assert command(target, "sum", "sum") != [checksum]

    # A CRIU image directory: crit decodes every image, ImageDir validates the whole of it.
    decoded = crit_decode(undo)
    assert {"inventory.img", "pstree.img", "files.img", f"mm-{target.pid}.img"} <= set(decoded)
    assert f"core-{target.pid}.img" in decoded and f"pagemap-{target.pid}.img" in decoded
    img = ImageDir.open(undo)
    assert img.root_pid == target.pid
    assert sum(r.nr_pages for r in img.page_runs(target.pid)) == result.undo.pages
    assert int(img.mm(target.pid).mm_brk) == changed.brk
    # every region before the apply (merged, as snapshots are) is made of the image's VMAs
    vmas = sorted((int(v.start), int(v.end)) for v in img.mm(target.pid).vmas)
    for a, b, *_ in changed.layout:
        inside = [(s, e) for s, e in vmas if a <= s and e <= b]
        assert inside and inside[0][0] == a and inside[-1][1] == b, hex(a)
        assert all(x[1] == y[0] for x, y in itertools.pairwise(inside)), hex(a)
    scope = load_scope(undo)
    assert scope is not None and scope.pid == target.pid and scope.outcome == "applied"
    assert set(scope.parts) == {"memory", "layout", "brk", "regs", "signals"}
    img.close()

    back = apply(undo, target.pid)
    assert back.stats.verified and back.undo is None
    assert_untouched(target)
    assert_same(changed, snapshot(target.pid))
    assert command(target, "sum", "sum") == [checksum]  # keeps running, on the scribbled state
    assert command(target, "sum", "sum") == [checksum]


def test_undo_image_leaves_memory_outside_its_scope_alone(target: Target, tmp_path: Path) -> None:
    """A page the apply did not touch, changed afterwards, keeps its new contents: the undo
    image speaks only for its scope (a normal image would discard it: zero)."""
    # A mapping with no page present, made before the checkpoint and never read (a read
    # would make its pages present); far from the others, so that the layout "scribble"
    # makes (its new mapping over the one it unmaps) stays the same.
    with attach(target.pid) as s:
        want = 0x100000000000
        spare = s.syscall(9, want, 4 * 4096, 3, 0x22 | 0x100000, -1 & 0xFFFFFFFF, 0)
        assert spare == want
    image = tmp_path / "checkpoint"
    dump(target.pid, image)
    command(target, "scribble", "done")
    changed = snapshot(target.pid, unread=[spare])
    undo = tmp_path / "undo"
    apply(image, target.pid, undo_dir=undo)
    scope = load_scope(undo)
    assert scope is not None
    marker = spare + 4096
    assert not any(a <= marker < b for a, b in scope.ranges)
    with attach(target.pid) as s:
        s.write(marker, b"\x5a" * 4096)
    normal = apply(image, target.pid, dry_run=True).plan  # a normal image zeroes it
    assert any(a <= marker < b for st in normal.of(Discard) for a, b in st.ranges)
    plan = apply(undo, target.pid, dry_run=True).plan
    for step in plan.steps:
        if isinstance(step, Discard):
            assert all(not (a <= marker < b) for a, b in step.ranges)
        if isinstance(step, WritePages):
            assert all(not (r.vaddr <= marker < r.vaddr + r.nr_pages * 4096) for r in step.runs)
    apply(undo, target.pid)
    got = snapshot(target.pid)
    with attach(target.pid) as s:
        assert s.read(marker, 4096) == b"\x5a" * 4096
    assert_same(changed, got)
    assert_untouched(target)


def test_undo_of_an_undo_is_the_checkpoint_again(target: Target, tmp_path: Path) -> None:
    """Applying an undo image with --undo gives an undo image of the undo (within its scope)."""
    image, _ = scribbled(target, tmp_path)
    apply(image, target.pid)
    (image_sum,) = command(target, "sum", "sum")
    applied = snapshot(target.pid)
    command(target, "scribble", "done")
    undo, redo = tmp_path / "undo", tmp_path / "redo"
    apply(image, target.pid, undo_dir=undo)
    (again,) = command(target, "sum", "sum")
    assert again == image_sum
    second = snapshot(target.pid)
    result = apply(undo, target.pid, undo_dir=redo)
    assert result.undo is not None and load_scope(redo) is not None
    crit_decode(redo)
    # the redo image speaks for no more than the undo image did
    undo_scope, redo_scope = load_scope(undo), load_scope(redo)
    assert undo_scope is not None and redo_scope is not None
    assert sum(b - a for a, b in redo_scope.ranges) <= sum(b - a for a, b in undo_scope.ranges)
    apply(redo, target.pid)
    assert_same(second, snapshot(target.pid))
    assert command(target, "sum", "sum") == [image_sum]
    assert applied.layout == second.layout
    assert_untouched(target)


def test_failed_apply_that_cannot_be_rolled_back_leaves_an_undo_image(
    target: Target, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step fails and so does the rollback: the target is left held (stopped, untraced,
    never running half-applied), the error names the undo image, and applying it puts the
    target back as it was and lets it run."""
    image, checksum = scribbled(target, tmp_path)
    changed = snapshot(target.pid)
    real = execute.Executor._do

    def failing(self: execute.Executor, step: Step) -> None:
        if isinstance(step, SetRegs):
            raise OSError(5, "injected failure")
        real(self, step)

    def no_rollback(*args: object) -> None:
        raise OSError(5, "injected rollback failure")

    monkeypatch.setattr(execute.Executor, "_do", failing)
    monkeypatch.setattr(execute, "rollback", no_rollback)
    undo = tmp_path / "undo"
    with pytest.raises(RollbackFailed, match=f"'applier apply {undo} --into {target.pid}'"):
        apply(image, target.pid, undo_dir=undo)
    monkeypatch.undo()
    scope = load_scope(undo)
    assert scope is not None and scope.outcome == "rollback-failed"
    assert target.state() == "T" and target.tracer() == 0  # held, half applied
    assert Journal.find(target.pid) is not None
    apply(undo, target.pid)
    assert Journal.find(target.pid) is None
    assert_same(changed, snapshot(target.pid))
    assert command(target, "sum", "sum") == [checksum]
    assert_untouched(target)


def test_undo_image_that_cannot_be_written_rolls_the_apply_back(
    target: Target, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Transactional: no undo image, no apply (the target stays as it was, the error says so)."""
    image, checksum = scribbled(target, tmp_path)
    changed = snapshot(target.pid)

    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(undo_image, "write_undo_image", full_disk)
    undo = tmp_path / "undo"
    with pytest.raises(ApplyFailed, match="could not write the undo image"):
        apply(image, target.pid, undo_dir=undo)
    assert list(undo.iterdir()) == []
    assert_same(changed, snapshot(target.pid))
    assert command(target, "sum", "sum") == [checksum]
    assert_untouched(target)


def test_memory_only_apply_is_undone_in_memory_only(target: Target, tmp_path: Path) -> None:
    """--restore memory: the undo image restores memory only (not registers or layout)."""
    image, checksum = scribbled(target, tmp_path)
    undo = tmp_path / "undo"
    apply(image, target.pid, parts=("memory",), undo_dir=undo)
    scope = load_scope(undo)
    assert scope is not None and scope.parts == ("memory",)
    plan = apply(undo, target.pid, dry_run=True).plan
    assert not any(isinstance(s, SetRegs) for s in plan.steps)
    assert plan.summary()["layout_changes"] == 0
    apply(undo, target.pid)
    assert command(target, "sum", "sum") == [checksum]
    assert_untouched(target)


def test_undo_image_of_another_pid_and_non_empty_dir_are_refused(
    target: Target, tmp_path: Path
) -> None:
    image, _ = scribbled(target, tmp_path)
    undo = tmp_path / "undo"
    apply(image, target.pid, undo_dir=undo)
    with pytest.raises(UndoDirNotEmpty):
        apply(image, target.pid, undo_dir=undo)
    with spawn(build_c("apply_target.c")) as other:
        other.expect("ready")
        with pytest.raises(MismatchError, match=UNDO_FILE):
            apply(undo, other.pid)


def test_cli_undo_prints_where_the_undo_image_is(target: Target, tmp_path: Path) -> None:
    image, checksum = scribbled(target, tmp_path)
    undo = tmp_path / "undo"
    out = run_applier("apply", str(image), "--into", str(target.pid), "--undo", str(undo))
    assert out.returncode == 0, out.stderr
    assert f"undo image in {undo}" in out.stdout
    assert f"'applier apply {undo} --into {target.pid}'" in out.stdout
    again = run_applier("apply", str(image), "--into", str(target.pid), "--undo", str(undo))
    assert again.returncode == 2 and "not empty" in again.stderr
    back = run_applier("apply", str(undo), "--into", str(target.pid), "--json")
    assert back.returncode == 0, back.stderr
    assert json.loads(back.stdout)["stats"]["verified"] is True
    assert command(target, "sum", "sum") == [checksum]
    assert_untouched(target)


def test_undo_image_keeps_shared_memory_in_pagemap_shmem(tmp_path: Path) -> None:
    """Shared anonymous and memfd memory the apply wrote: pagemap-shmem-<inode>.img in the
    undo image, written back through the live mappings."""
    with spawn(build_c("shared_target.c")) as t:
        shm, mfd = (int(x, 16) for x in t.expect("ready"))
        # No holes left in the objects: punching holes again is the apply's business (see
        # test_apply_shared.py), here only what the undo image keeps matters.
        with attach(t.pid) as s:
            s.write(shm, bytes(range(256)) * 16 * 8)
            s.write(mfd, bytes(range(255, -1, -1)) * 16 * 4)
        dump(t.pid, tmp_path / "ckpt")
        t.send("scribble")
        t.expect("done")
        t.send("sum")
        (checksum,) = t.expect("sum")
        with attach(t.pid) as s:
            before = s.read(shm, 8 * 4096), s.read(mfd, 4 * 4096)
        undo = tmp_path / "undo"
        result = apply(tmp_path / "ckpt", t.pid, undo_dir=undo)
        assert result.undo is not None and result.undo.shared_pages == 12
        decoded = crit_decode(undo)
        assert len([n for n in decoded if n.startswith("pagemap-shmem-")]) == 2
        t.send("sum")
        assert t.expect("sum") != [checksum]
        apply(undo, t.pid)
        with attach(t.pid) as s:
            assert (s.read(shm, 8 * 4096), s.read(mfd, 4 * 4096)) == before
        t.send("sum")
        assert t.expect("sum") == [checksum]
        assert_untouched(t)


def test_scope_limits_page_writes_and_discards() -> None:
    """The planner with a scope (no kernel involved): saved pages are written inside it only;
    a present page inside it that the image does not hold is discarded, outside it kept."""
    heap = Region(0x600000, 0x604000, 3, Kind.ANON, name="[heap]")
    every = np.arange(0x600000, 0x604000, 4096, dtype=np.uint64)
    live = LiveTask(pid=1, regions=[heap], threads=[1], exe=None, present=every, anon=every)

    def plan(saved: list[SavedPages]) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        task = ImageTask(1, 4096, [heap], saved, 0x604000, 0x600000, None, [1])
        p = make_plan(task, live, ("memory",), scope=[(0x601000, 0x603000)])
        writes = [(r.vaddr, r.nr_pages) for st in p.of(WritePages) for r in st.runs]
        discards = [rng for st in p.of(Discard) for rng in st.ranges]
        return writes, discards

    assert plan([SavedPages(0x600000, 4, None)]) == ([(0x601000, 2)], [])
    assert plan([SavedPages(0x601000, 1, None)]) == ([(0x601000, 1)], [(0x602000, 0x603000)])
    unscoped = make_plan(
        ImageTask(1, 4096, [heap], [SavedPages(0x601000, 1, None)], 0x604000, 0x600000, None, [1]),
        live,
        ("memory",),
    )
    assert sum(st.nr_bytes for st in unscoped.of(Discard)) == 3 * 4096  # a normal image

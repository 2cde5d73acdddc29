"""The executor's transaction on an in-memory process (injector.testing.FakeProcess): every
kind of step runs and the result equals the image; a failure at any step, a verification
mismatch, an undo image that cannot be written and --no-undo each end as documented, with
the fake byte for byte as it was. (Real processes: tests/test_apply_*.py.)"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from applier import executor as execute
from applier.capture import live_task
from applier.dump import dump_process
from applier.errors import ApplyFailed, MismatchError, RollbackFailed, VerifyFailed
from applier.executor import Executor
from applier.executor import pages as pages_mod
from applier.executor.context import Context
from applier.image import image_task
from applier.plan import (
    Discard,
    EndThread,
    MapAnon,
    NewThread,
    Plan,
    Protect,
    SetBrk,
    SetMm,
    SetRegs,
    Step,
    Unmap,
    WritePages,
    make_plan,
)
from applier.undo.log import UndoLog
from formats.core import CoreEntry
from formats.imagedir import ImageDir
from injector.testing import PAGE, FakeProcess

EXE = "/usr/bin/fake"
CODE = bytes(range(256)) * 16 + b"\x0f\x05" + bytes(PAGE - 2)  # two pages: text, then data
ANON, NEW, STACK = 0x7F0000000000, 0x7F1000000000, 0x7FFFF0000000
MM = {
    "start_code": 0x400000, "end_code": 0x401000, "start_data": 0x401000,
    "end_data": 0x402000, "start_stack": STACK + PAGE, "arg_start": STACK + 0x100,
    "arg_end": STACK + 0x200, "env_start": STACK + 0x200, "env_end": STACK + 0x300,
}  # fmt: skip


def make_fake() -> FakeProcess:
    """A small process: text and data of its executable, a heap, anonymous memory, a
    stack, two threads."""
    f = FakeProcess(4242, tids=[4242, 4243], files={EXE: CODE})
    f.map_file(0x400000, EXE, 0, 1, 5)
    f.map_file(0x401000, EXE, PAGE, 1, 3)
    f.set_heap(0x600000, 0x602000)
    f.map_anon(ANON, 4)
    f.map_anon(STACK, 2, name="[stack]")
    f.mm.update(MM)
    for i, tid in enumerate(f.tids):
        f.regs[tid] = attrs.evolve(
            f.regs[tid], ip=0x400010 + i, sp=STACK + PAGE - 64 * (i + 1), orig_ax=2**64 - 1,
            ax=7 + i, cs=0x33, ss=0x2B,
        )  # fmt: skip
    f.poke(0x401000 + 8, b"data page, copied on write")
    f.poke(0x600000, b"heap" * 100)
    f.poke(ANON + PAGE, b"anon" * 1000)
    f.poke(STACK + PAGE - 512, b"stack frames")
    return f


@attrs.frozen
class State:
    maps: tuple[tuple[int, int, int, str | None, int], ...]
    memory: dict[int, bytes]
    regs: dict[int, dict[str, int]]
    brk: int
    mm: dict[str, int]


def state(f: FakeProcess) -> State:
    maps = tuple((m.start, m.end, m.prot, m.path, m.offset) for m in f.maps())
    memory = {a: f.read(a, PAGE) for m in f.maps() for a in range(m.start, m.end, PAGE)}
    regs = {t: f.regs[t].as_dict() for t in f.tids}
    return State(maps, memory, regs, f.brk_value, dict(f.mm))


def scribble(f: FakeProcess) -> None:
    """Change everything a plan can put back."""
    f.brk(0x604000)
    f.poke(0x603000, b"grown heap")
    f.mmap(NEW, 2 * PAGE, 3, 0x22 | 0x100000)
    f.poke(NEW, b"new mapping")
    f.munmap(ANON + 3 * PAGE, PAGE)
    f.mprotect(ANON, PAGE, 1)
    f.poke(ANON, b"first anon page, now read-only")  # present now, absent in the image
    f.poke(ANON + PAGE + 9, b"changed")
    f.poke(0x401000 + 8, b"DATA PAGE")
    f.poke(0x400000 + 100, b"text copied on write")
    f.mm["arg_start"] += 0x10
    f.regs[4243] = attrs.evolve(f.regs[4243], ip=0x400777, r12=5)


@pytest.fixture
def checkpointed(tmp_path: Path) -> Iterator[tuple[FakeProcess, ImageDir, State]]:
    """A fake, its image (written by dump_process, as applier dump writes it) and its state
    at the checkpoint; then scribbled on."""
    f = make_fake()
    dump_process(f, tmp_path / "ckpt")
    at_checkpoint = state(f)
    scribble(f)
    with ImageDir.open(tmp_path / "ckpt") as img:
        yield f, img, at_checkpoint


def plan_for(f: FakeProcess, img: ImageDir) -> tuple[Plan, dict[int, CoreEntry]]:
    image = image_task(img)
    plan = make_plan(image, live_task(f, image.page_size))
    return plan, {s.image_tid: img.core(s.image_tid) for s in plan.of(SetRegs)}


def test_every_step_kind_puts_the_fake_back(
    checkpointed: tuple[FakeProcess, ImageDir, State],
) -> None:
    """brk, mm fields, unmap, map, protect, discard, pages, registers: the result equals the
    checkpoint in layout, every byte, registers, break and mm fields."""
    f, img, want = checkpointed
    plan, cores = plan_for(f, img)
    kinds = {type(s) for s in plan.steps}
    assert {SetBrk, SetMm, Unmap, MapAnon, Protect, Discard, WritePages, SetRegs} <= kinds
    undo = UndoLog.create()
    try:
        ex = Executor(f, plan, cores, undo)
        assert ex.apply(verify=True) is None
    finally:
        undo.close()
    assert ex.stats.verified and ex.stats.threads == 2 and ex.stats.layout_changes >= 3
    assert state(f) == want


@pytest.mark.parametrize(
    "failing", [SetBrk, SetMm, Unmap, MapAnon, Protect, Discard, WritePages, SetRegs]
)
def test_a_failing_step_rolls_everything_back(
    checkpointed: tuple[FakeProcess, ImageDir, State],
    monkeypatch: pytest.MonkeyPatch,
    failing: type[Step],
) -> None:
    """Whichever step fails (after it changed the target), ApplyFailed and the fake is
    exactly as it was before the apply."""
    f, img, _ = checkpointed
    before = state(f)
    plan, cores = plan_for(f, img)
    fails_after(monkeypatch, failing, f, plan, cores)
    assert state(f) == before


def fails_after(
    monkeypatch: pytest.MonkeyPatch,
    failing: type[Step],
    f: FakeProcess,
    plan: Plan,
    cores: dict[int, CoreEntry],
) -> None:
    """Apply ``plan`` with steps of kind ``failing`` raising right after their work: the
    apply must say it rolled back."""
    real = execute._RUN[failing]

    def fail_after(ctx: Context, step: Step) -> None:
        real(ctx, step)
        raise OSError(errno.EIO, "injected failure")

    with monkeypatch.context() as patched:
        patched.setitem(execute._RUN, failing, fail_after)
        undo = UndoLog.create()
        try:
            with pytest.raises(ApplyFailed, match="was rolled back"):
                Executor(f, plan, cores, undo).apply()
        finally:
            undo.close()


def test_a_refused_syscall_rolls_back(checkpointed: tuple[FakeProcess, ImageDir, State]) -> None:
    """The kernel refuses an mprotect half-way: ApplyFailed naming it, the fake as before."""
    f, img, _ = checkpointed
    before = state(f)
    plan, cores = plan_for(f, img)
    f.fail["mprotect"] = (0, errno.EACCES)
    undo = UndoLog.create()
    try:
        with pytest.raises(ApplyFailed, match=r"mprotect\(\) failed"):
            Executor(f, plan, cores, undo).apply()
    finally:
        undo.close()
    assert state(f) == before


def test_verification_mismatch_rolls_back(
    checkpointed: tuple[FakeProcess, ImageDir, State], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A page changed behind the writer's back: VerifyFailed, then rolled back."""
    f, img, _ = checkpointed
    before = state(f)
    plan, cores = plan_for(f, img)

    def spoil(ctx: Context, step: WritePages) -> None:
        pages_mod.write_pages(ctx, step)
        ctx.process.write(step.runs[0].vaddr, b"\xff")

    monkeypatch.setitem(execute._RUN, WritePages, spoil)
    undo = UndoLog.create()
    try:
        with pytest.raises(VerifyFailed, match="rolled back"):
            Executor(f, plan, cores, undo).apply(verify=True)
    finally:
        undo.close()
    assert state(f) == before


@attrs.define
class Keeper:
    """An UndoKeeper that records what it was asked, and fails if told to."""

    fail: bool
    asked: list[str] = attrs.field(factory=list)

    @property
    def where(self) -> str:
        return "/undo/dir"

    def write(self, outcome: str) -> object:
        self.asked.append(outcome)
        if self.fail:
            raise OSError(errno.ENOSPC, "No space left on device")
        return outcome


def test_undo_keeper_is_asked_once_and_its_failure_rolls_back(
    checkpointed: tuple[FakeProcess, ImageDir, State],
) -> None:
    """The undo image is written after verification; if it cannot be, the apply is undone."""
    f, img, want = checkpointed
    before = state(f)
    plan, cores = plan_for(f, img)
    failing = Keeper(fail=True)
    undo = UndoLog.create()
    try:
        with pytest.raises(ApplyFailed, match="could not write the undo image to /undo/dir"):
            Executor(f, plan, cores, undo).apply(keep=failing)
    finally:
        undo.close()
    assert failing.asked == ["applied"] and state(f) == before
    fine = Keeper(fail=False)
    undo = UndoLog.create()
    try:
        assert Executor(f, plan, cores, undo).apply(keep=fine) == "applied"
    finally:
        undo.close()
    assert fine.asked == ["applied"] and state(f) == want


def test_without_undo_a_failure_cannot_be_rolled_back(
    checkpointed: tuple[FakeProcess, ImageDir, State], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--no-undo: a failing step gives RollbackFailed; the keeper still records the log."""
    f, img, _ = checkpointed
    plan, cores = plan_for(f, img)

    def broken(ctx: Context, step: Step) -> None:
        raise OSError(errno.EIO, "injected failure")

    monkeypatch.setitem(execute._RUN, SetRegs, broken)
    with pytest.raises(RollbackFailed, match="--no-undo"):
        Executor(f, plan, cores, UndoLog.disabled()).apply()


@pytest.fixture
def pool_changed(tmp_path: Path) -> Iterator[tuple[FakeProcess, ImageDir, State]]:
    """The fake checkpointed with threads 4242 and 4243; then 4243 ended and 4250 started."""
    f = make_fake()
    f.tid_addr[4243] = STACK + 0x10
    f.robust[4243] = (STACK + 0x20, 24)
    dump_process(f, tmp_path / "ckpt")
    at_checkpoint = state(f)
    scribble(f)
    f.end_thread(4243)
    new = f.new_thread(tls=0x1234, tid=4250)
    f.regs[new] = attrs.evolve(f.regs[new], ip=0x400020, sp=STACK + 100)
    f.sigmasks[new] = 0
    with ImageDir.open(tmp_path / "ckpt") as img:
        yield f, img, at_checkpoint


def _thread_plan(f: FakeProcess, img: ImageDir) -> tuple[Plan, dict[int, CoreEntry]]:
    plan, _ = plan_for(f, img)
    tids = [s.image_tid for s in plan.of(SetRegs)] + [s.tid for s in plan.of(NewThread)]
    return plan, {t: img.core(t) for t in tids}


def test_threads_are_ended_and_created_and_rolled_back(
    pool_changed: tuple[FakeProcess, ImageDir, State], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure after the thread steps: the created thread is ended again and the ended one
    created again with its registers, mask, robust list and tid address; then the apply
    itself makes the fake equal to the checkpoint, threads included."""
    f, img, want = pool_changed
    before = state(f)
    plan, cores = _thread_plan(f, img)
    assert plan.of(EndThread) == [EndThread(4250)] and plan.of(NewThread) == [NewThread(4243)]
    fails_after(monkeypatch, WritePages, f, plan, cores)
    assert state(f) == before and sorted(f.tids) == [4242, 4250]
    assert f.regs[4250].fs_base == 0x1234 and f.sigmasks[4250] == 0
    undo = UndoLog.create()
    try:
        ex = Executor(f, plan, cores, undo)
        ex.apply()
    finally:
        undo.close()
    assert (ex.stats.threads_ended, ex.stats.threads_created) == (1, 1)
    assert state(f) == want and sorted(f.tids) == [4242, 4243]
    assert f.tid_addr[4243] == STACK + 0x10 and f.robust[4243] == (STACK + 0x20, 24)


def test_a_thread_id_taken_since_is_refused_before_anything_changes(
    pool_changed: tuple[FakeProcess, ImageDir, State],
) -> None:
    """The id of the thread to create again belongs to someone else now: refused with the
    reason, and nothing ran in the fake (not even the ending of the new thread)."""
    f, img, _ = pool_changed
    f.taken_tids[4243] = "id 4243 belongs to pid 999 now"
    plan, cores = _thread_plan(f, img)
    before, calls = state(f), len(f.calls)
    with pytest.raises(MismatchError, match="4243 belongs to pid 999"):
        Executor(f, plan, cores, UndoLog.disabled()).apply()
    assert state(f) == before and sorted(f.tids) == [4242, 4250] and len(f.calls) == calls

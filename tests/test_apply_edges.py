"""Edge cases of apply on real processes: permissions, a second tracer, a task not in the image,
partial restores (--restore), mm fields set with PR_SET_MM, and the demo."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from applier.api import apply
from applier.dump import dump
from tests.live_state import Snapshot, assert_same, command, dumped_state, snapshot
from tests.procs import Target, assert_untouched, build_c, run_applier, spawn

pytestmark = pytest.mark.live

PAGE = os.sysconf("SC_PAGESIZE")


def half_command(t: Target) -> None:
    """Send a command without its newline: the target reads it and waits for the rest in
    another read(), with other buffer and count registers than at a checkpoint."""
    assert t.proc.stdin is not None
    t.proc.stdin.write(b"inf")
    t.proc.stdin.flush()
    deadline = time.monotonic() + 5
    while True:  # blocked in read(0, line + 3, 124): the first read asked for 127 bytes
        words = Path(f"/proc/{t.pid}/syscall").read_text().split()
        if words[:1] == ["0"] and words[3] == hex(124) and t.state() == "S":
            return
        assert time.monotonic() < deadline, f"the target did not read the partial line: {words}"
        time.sleep(0.002)


@pytest.fixture
def target() -> Iterator[Target]:
    with spawn(build_c("edge_target.c")) as t:
        t.expect("ready")
        t.wait_in_syscall(0)
        yield t


def info(t: Target) -> dict[str, int]:
    data, gone, ro, brk = command(t, "info", "info")
    return {"data": int(data, 16), "gone": int(gone, 16), "ro": int(ro, 16), "brk": int(brk, 16)}


def mem_at(snap: Snapshot, addr: int, size: int) -> bytes | None:
    """``size`` bytes at ``addr`` in a snapshot, None if no private mapping holds them."""
    for start, data in snap.memory.items():
        if start <= addr and addr + size <= start + len(data):
            return data[addr - start : addr - start + size]
    return None


def mapped(snap: Snapshot, addr: int) -> bool:
    return any(start <= addr < end for start, end, *_ in snap.layout)


def prot_at(snap: Snapshot, addr: int) -> int:
    return next(prot for start, end, prot, *_ in snap.layout if start <= addr < end)


def mm_args(pid: int) -> tuple[int, ...]:
    """arg_start, arg_end, env_start, env_end: fields 48-51 of /proc/PID/stat."""
    stat = Path(f"/proc/{pid}/stat").read_bytes()
    rest = stat[stat.rindex(b")") + 2 :].split()
    return tuple(int(rest[n - 3]) for n in (48, 49, 50, 51))


def one_line_error(out: subprocess.CompletedProcess[str]) -> str:
    assert out.stderr.startswith("applier: error: "), out.stderr
    assert out.stderr.count("\n") == 1, out.stderr
    return out.stderr


# --------------------------------------------------------------------------- who may apply


def _nobody_can_run_applier() -> str | None:
    """Why the CLI cannot run as an unprivileged user here, or None if it can."""
    if os.geteuid() != 0:
        return "needs root to switch to an unprivileged user"
    if shutil.which("setpriv") is None:
        return "setpriv (util-linux) is missing"
    out = run_applier("--help", unprivileged=True)
    return None if out.returncode == 0 else f"applier does not start as uid 65534: {out.stderr}"


def test_unprivileged_user_is_refused_with_exit_5(target: Target) -> None:
    """apply, diff and dump as uid 65534 on a root process: exit 5, one line naming the cause."""
    why = _nobody_can_run_applier()
    if why:
        pytest.skip(why)
    shared = Path(tempfile.mkdtemp(prefix="applier-edges-"))
    try:
        shared.chmod(0o1777)
        image = shared / "ckpt"
        dump(target.pid, image)
        for path in (image, *image.iterdir()):
            path.chmod(0o755 if path.is_dir() else 0o644)
        command(target, "poke", "poked")
        before = snapshot(target.pid)
        pid = str(target.pid)
        for args in (
            ("apply", str(image), "--into", pid),
            ("diff", str(image), "--against", pid),
            ("dump", str(shared / "other"), "--from", pid),
        ):
            out = run_applier(*args, unprivileged=True)
            assert out.returncode == 5, out.stderr
            line = one_line_error(out)
            assert f"pid {pid}: cannot trace: target belongs to another user" in line
            assert "CAP_SYS_PTRACE is missing" in line and "EPERM" in line
            assert_untouched(target)
        assert not (shared / "other").exists()
        assert_same(before, snapshot(target.pid))
        assert command(target, "poke", "poked") == []  # still answers
    finally:
        shutil.rmtree(shared, ignore_errors=True)


# --------------------------------------------------------------------------- another tracer


def test_target_traced_by_another_tracer_is_refused(target: Target, tmp_path: Path) -> None:
    """A process held by another tracer: exit 5 naming the tracer; it runs on, untouched."""
    image = tmp_path / "ckpt"
    dump(target.pid, image)
    command(target, "poke", "poked")
    before = snapshot(target.pid)
    with spawn(build_c("edge_tracer.c"), str(target.pid)) as tracer:
        tracer.expect("seized")
        assert target.tracer() == tracer.pid
        out = run_applier("apply", str(image), "--into", str(target.pid))
        assert out.returncode == 5, out.stderr
        line = one_line_error(out)
        assert f"already traced by pid {tracer.pid} (edge_tracer" in line
        assert "detach gdb/strace first" in line
        assert target.state() == "S"  # not left stopped by the failed attach
    deadline = time.monotonic() + 5
    while target.tracer() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert_untouched(target)
    assert_same(before, snapshot(target.pid))


def test_traced_thread_is_refused_at_once(target: Target, tmp_path: Path) -> None:
    """One thread held by another tracer: exit 5 at once, naming the tracer; nothing stopped."""
    command(target, "threads 1", "threads")
    image = tmp_path / "ckpt"
    dump(target.pid, image)
    thread = max(int(t) for t in os.listdir(f"/proc/{target.pid}/task"))
    with spawn(build_c("edge_tracer.c"), str(thread)) as tracer:
        tracer.expect("seized")
        started = time.monotonic()
        out = run_applier("apply", str(image), "--into", str(target.pid))
        took = time.monotonic() - started
        for task in Path(f"/proc/{target.pid}/task").iterdir():
            state = (task / "stat").read_bytes().rsplit(b") ", 1)[1][:1]
            assert state not in (b"T", b"t"), f"thread {task.name} left stopped"
        assert out.returncode == 5, out.stderr
        line = one_line_error(out)
        assert f"already traced by pid {tracer.pid}" in line
        assert took < 5, f"took {took:.1f} s"


# --------------------------------------------------------------------------- --task


def test_task_not_in_the_image_is_a_mismatch(target: Target, tmp_path: Path) -> None:
    """--task naming a task the image lacks: exit 4, one line listing the image's tasks."""
    image = tmp_path / "ckpt"
    dump(target.pid, image)
    command(target, "poke", "poked")
    before = snapshot(target.pid)
    for verb, flag in (("apply", "--into"), ("diff", "--against")):
        out = run_applier(verb, str(image), flag, str(target.pid), "--task", "1")
        assert out.returncode == 4, out.stderr
        line = one_line_error(out)
        assert f"{image}: no task 1 in pstree.img (tasks: {target.pid})" in line
    assert_untouched(target)
    assert_same(before, snapshot(target.pid))


# --------------------------------------------------------------------------- --restore


def change_everything(t: Target) -> dict[str, int]:
    """After a checkpoint: write the data page, map, unmap, protect, grow the heap, and leave
    a half-read command (other registers). Returns the addresses involved."""
    where = info(t)
    command(t, "poke", "poked")
    (fresh,) = command(t, "map", "mapped")
    command(t, "unmap", "unmapped")
    command(t, "prot", "protected")
    old, new = command(t, "grow", "grew")
    half_command(t)
    return {**where, "fresh": int(fresh, 16), "old_brk": int(old, 16), "new_brk": int(new, 16)}


def assert_answers(t: Target) -> None:
    """The target still runs its command loop (the half-read line is completed first)."""
    assert command(t, "\ninfo", "info")


def test_restore_memory_only(target: Target, tmp_path: Path) -> None:
    """--restore memory: page contents revert; layout, break and registers stay as changed."""
    image = tmp_path / "ckpt"
    at_ckpt = dumped_state(target.pid, image)
    where = change_everything(target)
    changed = snapshot(target.pid)
    assert changed.regs != at_ckpt.regs and changed.layout != at_ckpt.layout
    result = apply(image, target.pid, parts=("memory",))
    assert result.stats.verified and result.stats.layout_changes == 0
    after = snapshot(target.pid)
    data = where["data"]
    assert (
        mem_at(after, data, 2 * PAGE)
        == mem_at(at_ckpt, data, 2 * PAGE)
        != mem_at(changed, data, 2 * PAGE)
    )
    assert after.layout == changed.layout and after.brk == changed.brk
    assert mem_at(after, where["fresh"], 4 * PAGE) == b"\xf5" * 4 * PAGE  # mapped after: kept
    assert mem_at(after, where["old_brk"], 64 << 10) == b"\x77" * (64 << 10)  # heap growth too
    assert not mapped(after, where["gone"]) and prot_at(after, where["ro"]) == 1
    assert after.regs == changed.regs
    assert_untouched(target)
    assert_answers(target)


def test_restore_regs_only(target: Target, tmp_path: Path) -> None:
    """--restore regs: every register back to the image; memory, layout, break untouched."""
    image = tmp_path / "ckpt"
    at_ckpt = dumped_state(target.pid, image)
    change_everything(target)
    changed = snapshot(target.pid)
    assert changed.regs != at_ckpt.regs
    result = apply(image, target.pid, parts=("regs",))
    assert result.stats.threads == 1 and result.stats.pages_written == 0
    after = snapshot(target.pid)
    assert after.regs == at_ckpt.regs
    assert_same(attrs.evolve(changed, regs=at_ckpt.regs), after)
    assert after.memory.keys() == changed.memory.keys()
    assert_untouched(target)
    assert_answers(target)


def test_restore_layout_and_brk_only(target: Target, tmp_path: Path) -> None:
    """--restore layout,brk: mappings, protections and break back; re-created memory is
    empty (zero), memory that stayed mapped and the registers keep their changes."""
    image = tmp_path / "ckpt"
    at_ckpt = dumped_state(target.pid, image)
    where = change_everything(target)
    changed = snapshot(target.pid)
    result = apply(image, target.pid, parts=("layout", "brk"))
    assert result.stats.layout_changes > 0 and result.stats.pages_written == 0
    after = snapshot(target.pid)
    assert after.layout == at_ckpt.layout and after.brk == at_ckpt.brk
    assert not mapped(after, where["fresh"]) and prot_at(after, where["ro"]) == 3
    assert mem_at(at_ckpt, where["gone"], 4 * PAGE) == b"\xd4" * 4 * PAGE
    assert mem_at(after, where["gone"], 4 * PAGE) == bytes(4 * PAGE)  # re-created, not refilled
    data = where["data"]
    assert mem_at(after, data, 2 * PAGE) == mem_at(changed, data, 2 * PAGE) == b"\x5a" * 2 * PAGE
    assert after.regs == changed.regs
    assert_untouched(target)
    assert_answers(target)


def test_new_threads_survive_restore_without_regs(target: Target, tmp_path: Path) -> None:
    """Threads started after the checkpoint: unmapping their stacks is refused (exit 4), and
    --restore memory,brk (no layout) keeps them alive."""
    image = tmp_path / "ckpt"
    dump(target.pid, image)
    command(target, "threads 2", "threads")
    out = run_applier(
        "apply", str(image), "--into", str(target.pid), "--restore", "memory,layout,brk"
    )
    assert out.returncode == 4, out.stderr
    assert "would crash" in out.stderr and out.stderr.count("\n") == 1
    assert_untouched(target)
    out = run_applier("apply", str(image), "--into", str(target.pid), "--restore", "memory,brk")
    assert out.returncode == 0, out.stderr
    for _ in range(2):
        time.sleep(0.2)
        assert target.alive(), f"the target died (status {target.proc.poll()})"
        command(target, "wake", "woke")  # the threads return from read() onto their stacks
    assert_untouched(target)


# --------------------------------------------------------------------------- mm fields


@pytest.mark.parametrize("move", ["argdown", "argup"])
def test_mm_arg_area_is_restored(target: Target, tmp_path: Path, move: str) -> None:
    """The target moves its argument area with PR_SET_MM_MAP; apply puts fields 48-51 back."""
    image = tmp_path / "ckpt"
    dump(target.pid, image)
    original = mm_args(target.pid)
    words = command(target, move, "moved")
    assert (int(words[0], 16), int(words[1], 16)) == mm_args(target.pid)[:2] != original[:2]
    out = run_applier("apply", str(image), "--into", str(target.pid))
    assert_untouched(target)
    assert out.returncode == 0, out.stderr
    assert mm_args(target.pid) == original


# --------------------------------------------------------------------------- demo


def test_demo_reverts_its_target() -> None:
    """applier demo builds the counter, checkpoints, lets it change, applies: exit 0, reverted."""
    out = run_applier("demo")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "reverted: pid" in out.stdout and "NOT reverted" not in out.stdout

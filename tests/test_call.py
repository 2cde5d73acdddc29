"""applier call: one function run inside a live process (tests/targets/call_target.c), its
return value, the pages it wrote, rolling it back (asked for, after a crash, after a
timeout), other threads held still, --record layers, and the Python API."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import applier
from applier.errors import (
    EXIT_CALL_CRASHED,
    EXIT_CALL_TIMEOUT,
    EXIT_USAGE,
    CallCrashed,
    CallTimedOut,
    UsageError,
    exit_code,
)
from applier.invoke import RETURN_TRAP, call, parse_arg
from applier.journal import Journal
from applier.symbols import UnknownSymbol, resolve
from formats.pagemap import PE_PARENT
from injector import attach
from tests.live_state import Snapshot, assert_same, command, snapshot
from tests.procs import REPO, Target, assert_untouched, build_c, run_applier, spawn

pytestmark = pytest.mark.live

PG = 4096


@pytest.fixture
def target() -> Iterator[Target]:
    with spawn(build_c("call_target.c")) as t:
        t.expect("ready")
        t.wait_in_syscall(0)
        yield t


def info(t: Target) -> tuple[int, int, int]:
    area, heap, ticks = command(t, "info", "info")
    return int(area, 16), int(heap, 16), int(ticks, 16)


def shared_byte(pid: int, address: int) -> int:
    with attach(pid) as s:
        return s.read(address, 1)[0]


def fds(pid: int) -> dict[str, str]:
    """Descriptor number -> what it is (a userfaultfd shows as anon_inode:[userfaultfd])."""
    out = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        out[name] = os.readlink(f"/proc/{pid}/fd/{name}")
    return out


def without(snap: Snapshot, ranges: list[tuple[int, int]]) -> Snapshot:
    """The snapshot with the bytes in ``ranges`` zeroed (what a call was meant to change)."""
    memory = {}
    for start, data in snap.memory.items():
        buf = bytearray(data)
        for a, b in ranges:
            lo, hi = max(a, start), min(b, start + len(data))
            if lo < hi:
                buf[lo - start : hi - start] = bytes(hi - lo)
        memory[start] = bytes(buf)
    return Snapshot(snap.layout, memory, snap.regs, snap.brk)


def at(snap: Snapshot, address: int, size: int) -> bytes:
    """``size`` bytes at ``address`` in a snapshot's memory."""
    for start, data in snap.memory.items():
        if start <= address < start + len(data):
            return data[address - start : address - start + size]
    raise KeyError(hex(address))


def stack_below_sp(pid: int, size: int) -> tuple[int, bytes]:
    with attach(pid) as s:
        sp = s.get_regs(pid).sp
        return sp, s.read(sp - size, size)


def test_call_returns_and_changes_only_what_the_function_wrote(target: Target) -> None:
    """bump(7) twice: the value, the global page it wrote listed, every register and every
    other byte of the process as before (the red zone too), no descriptor left, and the
    program itself sees the new value."""
    area, _, _ = info(target)
    (counter, _, _) = command(target, "get", "get")
    fds_before = fds(target.pid)
    sp, red_zone = stack_below_sp(target.pid, 128)
    before = snapshot(target.pid)
    first = call(target.pid, "bump", 7)
    second = call(target.pid, "bump", 0x10)
    assert first.value == int(counter) + 7 and second.value == int(counter) + 7 + 16
    assert area in first.pages and area in second.pages
    assert not first.rolled_back and first.signal is None and not first.timed_out
    assert stack_below_sp(target.pid, 128) == (sp, red_zone)
    after = snapshot(target.pid)
    assert at(after, area, 8) == (int(counter) + 23).to_bytes(8, "little", signed=True)
    # Everything else is as it was: registers, layout, break, and every byte but the counter
    # and the stack below the red zone (where the function's frames went).
    stack = next(r[0] for r in before.layout if r[0] <= sp < r[1])
    changed = [(area, area + 8), (stack, sp - 128)]
    assert_same(without(before, changed), without(after, changed))
    assert fds(target.pid) == fds_before
    assert command(target, "get", "get")[0] == str(int(counter) + 23)
    assert_untouched(target)


def test_arguments_alignment_and_strings(target: Target) -> None:
    """Six integer arguments in order; rsp % 16 == 8 at entry; a string copied into the
    target (and its scratch mapping gone afterwards)."""
    assert call(target.pid, "add6", 1, 2, 3, 4, 5, 6).value == 1 + 4 + 9 + 16 + 25 + 36
    assert call(target.pid, "add6", -1, 0x10, 0, 0, 0, 0).value == -1 + 32
    assert call(target.pid, "sp_mod16").value == 8
    layout = snapshot(target.pid).layout
    result = call(target.pid, "greet", "hi!", 3)
    assert result.value == 9
    assert command(target, "get", "get")[1] == "hi!hi!hi!"
    assert snapshot(target.pid).layout == layout  # the scratch mapping is gone
    assert call(target.pid, "greet", b"xy", 2).value == 4
    assert command(target, "get", "get")[1] == "xyxy"
    # by address, and a signal raised during the call reaching the program's handler
    assert call(target.pid, resolve(target.pid, "add6").address, 1, 0, 0, 0, 0, 1).value == 7
    assert call(target.pid, "with_signal").value == 1
    # library functions: LIB:NAME, and an IFUNC (strlen) followed to libc's chosen version
    assert call(target.pid, "libc:getpid").value == target.pid
    assert call(target.pid, "libc.so.6:strlen", "seventeen letters").value == 17
    assert_untouched(target)


def test_rollback_puts_back_globals_heap_mappings_and_break(target: Target) -> None:
    """--rollback after heap_write, map_more and grow_brk: byte for byte as before (layout
    and program break too), the pages written reported, only those written back."""
    area, heap, _ = info(target)
    (checksum,) = command(target, "sum", "sum")
    before = snapshot(target.pid)
    fds_before = fds(target.pid)
    wrote = call(target.pid, "heap_write", 0x41, rollback=True)
    assert wrote.value == 0x82 and wrote.rolled_back
    assert {area + PG, (heap + 2 * PG + 5) & ~(PG - 1)} <= set(wrote.pages)
    assert 2 <= wrote.pages_restored <= len(wrote.pages)
    assert_same(before, snapshot(target.pid))
    mapped = call(target.pid, "map_more", 4, rollback=True)
    assert mapped.value is not None and mapped.value > 0
    assert {mapped.value + i * PG for i in range(4)} <= set(mapped.pages)
    assert_same(before, snapshot(target.pid))
    grown = call(target.pid, "grow_brk", 5 * PG, rollback=True)
    assert grown.value is not None and grown.value > before.brk
    assert_same(before, snapshot(target.pid))
    assert command(target, "sum", "sum") == [checksum]
    assert fds(target.pid) == fds_before
    # and a call that keeps its effect still works afterwards
    assert call(target.pid, "bump", 1).value is not None
    assert command(target, "sum", "sum") != [checksum]
    assert_untouched(target)


def test_rollback_closes_a_descriptor_the_call_opened(target: Target) -> None:
    """The rollback covers the kernel state the fds part restores: a file the function
    opened is closed again; without --rollback it stays open."""
    before = fds(target.pid)
    opened = call(target.pid, "open_file", "/etc/hostname", rollback=True)
    assert opened.value is not None and opened.value >= 0 and opened.rolled_back
    assert fds(target.pid) == before
    kept = call(target.pid, "open_file", "/etc/hostname")
    assert kept.value is not None and kept.value >= 0
    assert fds(target.pid)[str(kept.value)] == "/etc/hostname"
    assert_untouched(target)


@pytest.mark.parametrize(
    ("function", "args", "sig"),
    [("crash", (0x10,), "SIGSEGV"), ("do_abort", (), "SIGABRT")],
)
def test_crash_is_rolled_back(
    target: Target, function: str, args: tuple[int, ...], sig: str, tmp_path: Path
) -> None:
    """A function that segfaults or aborts: the signal (and the address) reported, the
    process put back exactly, alive and working; the record's layer holds what it wrote
    before it crashed."""
    area, _, _ = info(target)
    (checksum,) = command(target, "sum", "sum")
    before = snapshot(target.pid)
    result = call(target.pid, function, *args, record=tmp_path / "rec")
    own, _ = pagemap_pages(tmp_path / "rec" / "after", target.pid)
    assert area + 4 * PG in own and own <= set(result.pages)
    assert result.signal == sig and result.value is None and result.rolled_back
    if sig == "SIGSEGV":
        assert result.fault_address == 0x10
    assert result.pages  # it wrote area page 4 before it crashed
    error = result.failure()
    assert isinstance(error, CallCrashed) and exit_code(error) == EXIT_CALL_CRASHED
    assert sig in str(error) and function in str(error)
    with pytest.raises(CallCrashed):
        result.check()
    assert_same(before, snapshot(target.pid))
    assert command(target, "sum", "sum") == [checksum]
    assert_untouched(target)


def test_timeout_is_rolled_back(target: Target) -> None:
    """spin() never returns: after --timeout the process is put back and keeps working."""
    (checksum,) = command(target, "sum", "sum")
    before = snapshot(target.pid)
    fds_before = fds(target.pid)
    started = time.monotonic()
    result = call(target.pid, "spin", timeout=0.5)
    assert 0.5 <= time.monotonic() - started < 5
    assert result.timed_out and result.value is None and result.rolled_back
    assert isinstance(result.failure(), CallTimedOut)
    assert exit_code(CallTimedOut("x")) == EXIT_CALL_TIMEOUT
    assert_same(before, snapshot(target.pid))
    assert fds(target.pid) == fds_before
    assert command(target, "sum", "sum") == [checksum]
    assert_untouched(target)


def ticks(t: Target) -> int:
    return int(command(t, "ticks", "ticks")[0])


def test_other_threads_stay_stopped_during_the_call(target: Target, tmp_path: Path) -> None:
    """Worker threads that keep counting: they advance until the call starts, not during it
    (still() sleeps 200 ms and sees no tick), and again afterwards. --thread runs the call on
    a worker, which then goes on counting."""
    command(target, "threads 3", "threads")
    a = ticks(target)
    time.sleep(0.05)
    b = ticks(target)
    assert b > a
    result = call(target.pid, "still", 200)
    assert result.value == 0
    time.sleep(0.05)
    assert ticks(target) > b
    workers = sorted(int(t) for t in os.listdir(f"/proc/{target.pid}/task") if int(t) != target.pid)
    assert len(workers) == 3
    on_worker = call(target.pid, "add6", 1, 1, 1, 1, 1, 1, thread=workers[0])
    assert on_worker.value == 21 and on_worker.tid == workers[0]
    assert call(target.pid, "still", 100, thread=workers[1]).value == 0
    c = ticks(target)
    time.sleep(0.05)
    assert ticks(target) > c
    with pytest.raises(UsageError, match="no thread"):
        call(target.pid, "bump", 1, thread=1, record=tmp_path / "rec")
    assert not (tmp_path / "rec").exists()  # a failed call leaves no half-written record
    assert_untouched(target)


def pagemap_pages(image: Path, pid: int) -> tuple[set[int], set[int]]:
    """(pages held in the directory itself, pages left to the parent), from crit's JSON."""
    out = subprocess.run(
        ["crit", "decode", "-i", str(image / f"pagemap-{pid}.img")],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    own: set[int] = set()
    parent: set[int] = set()
    for e in json.loads(out.stdout)["entries"][1:]:
        vaddr = int(e["vaddr"], 16) if isinstance(e["vaddr"], str) else e["vaddr"]
        n = e.get("nr_pages", e.get("compat_nr_pages"))
        flags = e.get("flags", 0)  # a number, or names ("PE_LAZY | PE_PRESENT")
        is_parent = flags & PE_PARENT if isinstance(flags, int) else "PE_PARENT" in flags
        pages = {vaddr + i * PG for i in range(n)}
        (parent if is_parent else own).update(pages)
    return own, parent


def test_record_layer_holds_the_written_pages_and_undoes_and_redoes(
    target: Target, tmp_path: Path
) -> None:
    """--record: before is a full checkpoint, after a layer (parent ../before) that holds
    exactly the pages the call wrote (crit decodes it, applier show lists them); applying
    before undoes the call, applying after redoes it, both byte for byte."""
    area, heap, _ = info(target)
    at_before = snapshot(target.pid)
    rec = tmp_path / "rec"
    result = call(target.pid, "heap_write", 0x33, record=rec)
    at_after = snapshot(target.pid)
    assert result.record == str(rec)
    assert os.readlink(rec / "after" / "parent") == "../before"
    own, parent = pagemap_pages(rec / "after", target.pid)
    assert own == set(result.pages)
    assert {area + PG, (heap + 2 * PG + 5) & ~(PG - 1)} <= own
    assert parent and not own & parent
    shown = run_applier("show", str(rec / "after"), "--json")
    assert shown.returncode == 0, shown.stderr
    doc = json.loads(shown.stdout)
    assert doc["totals"]["pages_present"] == len(own)
    assert doc["totals"]["pages_in_parent"] == len(parent)
    held = {
        int(r["start"], 16) + i * PG
        for r in doc["processes"][0]["held_here"]
        for i in range(r["pages"])
    }
    assert held == own
    text = run_applier("show", str(rec / "after")).stdout
    assert f"held in this layer (the rest is in the parent): {len(own)} pages" in text
    for r in doc["processes"][0]["held_here"]:
        assert f"{int(r['start'], 16):#018x}-{int(r['end'], 16):#018x} {r['pages']} pages" in text
    # undo, redo, undo
    applier.api.apply(rec / "before", target.pid)
    assert_same(at_before, snapshot(target.pid))
    redo = applier.api.apply(rec / "after", target.pid, layer=True)
    assert redo.stats.pages_written == len(own) and redo.stats.bytes_discarded == 0
    assert redo.dirty_source == "layer"
    assert_same(at_after, snapshot(target.pid))
    out = run_applier("apply", str(rec / "before"), "--into", str(target.pid))
    assert out.returncode == 0, out.stderr
    assert_same(at_before, snapshot(target.pid))
    with pytest.raises(UsageError, match="not an incremental layer"):
        applier.api.apply(rec / "before", target.pid, layer=True)
    assert command(target, "get", "get")
    assert_untouched(target)


@pytest.fixture
def twins() -> Iterator[tuple[Target, Target]]:
    """Two processes of the same executable without address randomisation (same layout)."""
    binary = build_c("call_target.c")
    setarch = Path("/usr/bin/setarch")
    with spawn(setarch, "-R", str(binary)) as a, spawn(setarch, "-R", str(binary)) as b:
        for t in (a, b):
            t.expect("ready")
            t.wait_in_syscall(0)
        yield a, b


def test_layer_onto_a_replica_at_the_parent_state(
    twins: tuple[Target, Target], tmp_path: Path
) -> None:
    """The layer of a call in A, applied with --layer to B (same executable): refused while
    B is not at the layer's parent state; once B is at before, it writes only the layer's
    pages and B reaches A's state after the call; applying before reverts B."""
    a, b = twins
    rec = tmp_path / "rec"
    result = call(a.pid, "bump", 5, record=rec)
    at_after = snapshot(a.pid)
    (a_counter, _, _) = command(a, "get", "get")
    other = applier.api.Overrides(other_process=True)
    refused = run_applier(
        "apply", str(rec / "after"), "--into", str(b.pid), "--other-process", "--layer"
    )
    assert refused.returncode == 4, refused.stderr
    assert "not at the parent state" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    b_before = snapshot(b.pid)
    applier.api.apply(rec / "before", b.pid, overrides=other)
    at_before_b = snapshot(b.pid)
    assert at_before_b.memory != b_before.memory  # B took A's pages (AT_RANDOM, canary, ...)
    done = applier.api.apply(rec / "after", b.pid, overrides=other, layer=True)
    assert done.stats.pages_written == len(result.pages)
    got = snapshot(b.pid)
    assert got.layout == at_after.layout and got.brk == at_after.brk
    assert got.memory == at_after.memory
    assert command(b, "get", "get")[0] == a_counter
    applier.api.apply(rec / "before", b.pid, overrides=other)
    assert_same(at_before_b, snapshot(b.pid))
    assert int(command(b, "get", "get")[0]) == int(a_counter) - 5
    for t in (a, b):
        assert_untouched(t)


def test_cli_text_json_and_exit_codes(target: Target, tmp_path: Path) -> None:
    """The CLI: text and JSON results; a crash exits 9 and a timeout 10, one line each, the
    process back; a bad argument is a usage error."""
    (counter, _, _) = command(target, "get", "get")
    out = run_applier("call", str(target.pid), "bump", "0x2")
    assert out.returncode == 0, out.stderr
    value = int(counter) + 2
    assert f"returned {value} ({value:#x})" in out.stdout
    assert "pages written during the call" in out.stdout
    out = run_applier("call", str(target.pid), "greet", '"ab"', "2", "--json", "--rollback")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["value"] == 4 and doc["hex"] == "0x4" and doc["rolled_back"] is True
    assert doc["pages_written"] == len(doc["pages"]) > 0
    assert command(target, "get", "get")[1] == "-"
    (checksum,) = command(target, "sum", "sum")
    out = run_applier("call", str(target.pid), "crash", "0x20")
    assert out.returncode == EXIT_CALL_CRASHED
    assert out.stderr.count("\n") == 1 and "SIGSEGV at address 0x20" in out.stderr
    out = run_applier("call", str(target.pid), "spin", "--timeout", "0.3", "--json")
    assert out.returncode == EXIT_CALL_TIMEOUT
    assert json.loads(out.stdout)["error"]["type"] == "CallTimedOut"
    assert command(target, "sum", "sum") == [checksum]
    assert "0.3s" in json.loads(out.stdout)["error"]["message"]
    out = run_applier("--help")
    assert out.returncode == 0 and "call" in out.stdout
    out = run_applier("call", str(target.pid), "bump", "seven")
    assert out.returncode == EXIT_USAGE and "quoted string" in out.stderr
    out = run_applier("call", str(target.pid), "no_such_function")
    assert out.returncode == EXIT_USAGE and "no_such_function" in out.stderr
    assert_untouched(target)


def test_python_api(target: Target) -> None:
    """applier.call and applier.rollback, exported from the package."""
    (checksum,) = command(target, "sum", "sum")
    before = snapshot(target.pid)
    fds_before = fds(target.pid)
    result = applier.call(target.pid, "bump", 7, rollback=True)
    assert result.value is not None and result.rolled_back and result.signal is None
    assert_same(before, snapshot(target.pid))
    with applier.rollback(target.pid):
        applier.call(target.pid, "bump", 3)
        applier.call(target.pid, "map_more", 2)
        assert command(target, "sum", "sum") != [checksum]
    assert_same(before, snapshot(target.pid))
    assert fds(target.pid) == fds_before
    with pytest.raises(ZeroDivisionError), applier.rollback(target.pid):
        applier.call(target.pid, "heap_write", 1)
        raise ZeroDivisionError
    assert command(target, "sum", "sum") == [checksum]
    assert_untouched(target)


def test_argument_parsing_and_refusals(target: Target) -> None:
    assert parse_arg("12") == 12 and parse_arg("-0x10") == -16 and parse_arg("0x1f") == 31
    assert parse_arg('"a b"') == "a b" and parse_arg("'x'") == "x"
    with pytest.raises(UsageError):
        parse_arg("abc")
    with pytest.raises(UsageError, match="at most 6"):
        call(target.pid, "add6", 1, 2, 3, 4, 5, 6, 7)
    with pytest.raises(UnknownSymbol):
        call(target.pid, "no_such_function")
    assert RETURN_TRAP < 65536  # below mmap_min_addr: nothing is ever mapped there
    assert_untouched(target)


def test_applier_killed_during_the_call_leaves_the_target_held(target: Target) -> None:
    """SIGKILL to applier while the function runs: the target is left stopped and untraced,
    with no userfaultfd of applier's in it, and a journal naming the checkpoint; `applier
    recover` puts it back to its state before the call, running."""
    (checksum,) = command(target, "sum", "sum")
    before = snapshot(target.pid)
    fds_before = fds(target.pid)
    proc = subprocess.Popen(
        [sys.executable, "-m", "applier", "call", str(target.pid), "spin", "--timeout", "60"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while Journal.find(target.pid) is None or target.state() != "R":
            assert time.monotonic() < deadline, "the call did not start"
            assert proc.poll() is None
            time.sleep(0.01)
        time.sleep(0.2)  # spin() is running now
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 10
    while target.state() != "T" or target.tracer() != 0:
        assert time.monotonic() < deadline, f"state {target.state()}"
        time.sleep(0.01)
    journal = Journal.find(target.pid)
    assert journal is not None
    assert fds(target.pid) == fds_before  # the tracker's userfaultfd died with applier
    try:
        out = run_applier("recover", str(target.pid))
        assert out.returncode == 0, out.stderr
    finally:
        shutil.rmtree(Path(journal.image).parent, ignore_errors=True)
    assert Journal.find(target.pid) is None
    assert_same(before, snapshot(target.pid))
    assert command(target, "sum", "sum") == [checksum]
    assert_untouched(target)


def test_call_leaves_another_trackers_baseline_alone(target: Target, tmp_path: Path) -> None:
    """A `dump --track` holder follows the target: the call compares contents instead of
    re-protecting pages, so `apply --only-dirty` of the checkpoint afterwards still writes
    back what the call wrote."""
    ck = tmp_path / "ck"
    out = run_applier("dump", str(ck), "--from", str(target.pid), "--track")
    assert out.returncode == 0, out.stderr
    at_ck = snapshot(target.pid)
    (counter, _, _) = command(target, "get", "get")
    assert call(target.pid, "bump", 9).value == int(counter) + 9
    out = run_applier("apply", str(ck), "--into", str(target.pid), "--only-dirty", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["dirty_source"].startswith("tracker:")
    got = snapshot(target.pid)
    assert got.memory == at_ck.memory and got.layout == at_ck.layout
    assert command(target, "get", "get")[0] == counter
    assert_untouched(target)


def _start_spin(target: Target) -> subprocess.Popen[bytes]:
    """`applier call PID spin` in a new interpreter, returned once spin() runs."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "applier", "call", str(target.pid), "spin", "--timeout", "60"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while Journal.find(target.pid) is None or target.state() != "R":
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            proc.wait()
            pytest.fail("the call did not start")
        time.sleep(0.01)
    time.sleep(0.2)
    return proc


def test_interrupted_call_is_rolled_back(target: Target) -> None:
    """SIGINT or SIGTERM to applier while the function runs: the process is put back, let go
    and running; applier exits 128 + the signal with one line."""
    (checksum,) = command(target, "sum", "sum")
    before = snapshot(target.pid)
    for sig in (signal.SIGINT, signal.SIGTERM):
        proc = _start_spin(target)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 128 + sig, err
        assert err.decode().count("\n") == 1 and "interrupted" in err.decode()
        assert Journal.find(target.pid) is None
        assert_untouched(target)
        assert_same(before, snapshot(target.pid))
    assert command(target, "sum", "sum") == [checksum]


def test_call_into_a_stopped_process_leaves_it_stopped(target: Target) -> None:
    """A process stopped by SIGSTOP: the call runs, and the process is still stopped after."""
    (counter, _, _) = command(target, "get", "get")
    os.kill(target.pid, signal.SIGSTOP)
    deadline = time.monotonic() + 10
    while target.state() != "T":
        assert time.monotonic() < deadline
        time.sleep(0.005)
    try:
        assert call(target.pid, "bump", 2).value == int(counter) + 2
        time.sleep(0.05)
        assert target.state() == "T" and target.tracer() == 0
    finally:
        os.kill(target.pid, signal.SIGCONT)
    assert command(target, "get", "get")[0] == str(int(counter) + 2)
    assert_untouched(target)


def test_vector_registers_are_restored(target: Target) -> None:
    """greet() runs libc's SSE/AVX string code: the XSAVE area (x87, SSE, AVX state) of the
    thread is the same afterwards, as are its general-purpose registers."""
    with attach(target.pid) as s:
        xstate, regs = s.get_xstate(target.pid), s.get_regs(target.pid)
    assert call(target.pid, "greet", "vector registers", 40).value == 16 * 40
    with attach(target.pid) as s:
        assert s.get_xstate(target.pid) == xstate
        assert s.get_regs(target.pid) == regs
    assert_untouched(target)


def test_call_on_a_thread_sleeping_in_nanosleep(target: Target) -> None:
    """--thread on a thread blocked in clock_nanosleep: after the call it sleeps on (the
    kernel restarts its sleep), it never sees EINTR."""
    command(target, "nap", "nap")
    (napper,) = (int(t) for t in os.listdir(f"/proc/{target.pid}/task") if int(t) != target.pid)
    deadline = time.monotonic() + 5
    while Path(f"/proc/{target.pid}/task/{napper}/syscall").read_text().split()[0] != "230":
        assert time.monotonic() < deadline
        time.sleep(0.005)
    assert call(target.pid, "add6", 1, 2, 0, 0, 0, 0, thread=napper).value == 5
    assert call(target.pid, "bump", 1, thread=napper, rollback=True).rolled_back
    time.sleep(0.1)
    nr = Path(f"/proc/{target.pid}/task/{napper}/syscall").read_text().split()[0]
    assert nr in ("230", "219")  # clock_nanosleep, or restart_syscall resuming it
    assert command(target, "naps", "naps") == ["0"]
    assert_untouched(target)


def test_rollback_of_shared_memory(target: Target) -> None:
    """A write into shared anonymous memory (which the tracker does not watch) is put back
    by --rollback too, from the checkpoint's pagemap-shmem."""
    shared = int(command(target, "share", "share")[0], 16)
    assert shared_byte(target.pid, shared + PG + 7) == 0x5E
    result = call(target.pid, "shared_write", 0x11, rollback=True)
    assert result.value == 0x11 and result.rolled_back
    assert shared_byte(target.pid, shared + PG + 7) == 0x5E
    call(target.pid, "shared_write", 0x22)
    assert shared_byte(target.pid, shared + PG + 7) == 0x22
    assert_untouched(target)


def test_a_thread_the_call_starts_is_held_then_ended_by_the_rollback(target: Target) -> None:
    """pthread_create inside the call: the new thread is held from its first instruction
    (it has not run when the call returns), --rollback ends it (thread count as before, its
    stack unmapped, the process works); without --rollback it runs once the call is done."""
    tasks = sorted(os.listdir(f"/proc/{target.pid}/task"))
    before = snapshot(target.pid)
    result = call(target.pid, "spawn_thread", rollback=True)
    assert result.value == 0 and result.rolled_back and len(result.threads) == 1
    assert sorted(os.listdir(f"/proc/{target.pid}/task")) == tasks
    assert snapshot(target.pid).layout == before.layout
    assert call(target.pid, "spawned_count").value == 0  # it never ran
    assert_untouched(target)
    kept = call(target.pid, "spawn_thread")
    assert kept.value == 0 and not kept.rolled_back and len(kept.threads) == 1
    (new,) = kept.threads
    assert str(new) in os.listdir(f"/proc/{target.pid}/task")
    deadline = time.monotonic() + 5
    while call(target.pid, "spawned_count").value != 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert call(target.pid, "spawned_count").value == 1  # let run after the call
    assert_untouched(target)
    assert command(target, "sum", "sum")


def _blocked(pid: int) -> int:
    """The leader's blocked signals (SigBlk of /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigBlk:"):
            return int(line.split()[1], 16)
    raise AssertionError("no SigBlk")


def test_rollback_puts_back_the_signal_mask_and_a_handler(target: Target) -> None:
    """A function that blocks SIGUSR2 and installs a handler for SIGURG: --rollback puts the
    thread's mask and the disposition back (the signals part); without it they stay."""
    usr2 = 1 << (signal.SIGUSR2 - 1)
    assert not _blocked(target.pid) & usr2
    caught = _caught(target.pid)
    done = call(target.pid, "block_usr2", rollback=True)
    assert done.value == 0 and done.rolled_back
    assert not _blocked(target.pid) & usr2 and _caught(target.pid) == caught
    kept = call(target.pid, "block_usr2")
    assert kept.value == 0
    assert _blocked(target.pid) & usr2 and _caught(target.pid) & (1 << (signal.SIGURG - 1))
    assert_untouched(target)


def _caught(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return int(line.split()[1], 16)
    raise AssertionError("no SigCgt")

"""The tracker stays out of the target: ``dump --track`` leaves the userfaultfd in a holder
daemon (or, for the Python API, in the calling process), never in the target's descriptor
table; the holder is reused, serves later commands, and ends with ``untrack`` or the target."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from applier import holder
from applier.api import apply
from applier.dump import dump
from applier.errors import EXIT_MISMATCH, EXIT_TARGET, EXIT_USAGE
from applier.fixture import Checkpoint
from formats.names import TRACKING as TRACKING_FILE
from injector.procfs import read_start_time
from injector.session import attach
from injector.tracking import UffdWpTracker, open_tracker, resume_tracker
from tests.live_state import command, snapshot
from tests.procs import REPO, Target, assert_untouched, build_c, run_applier, spawn

pytestmark = pytest.mark.live

PAGE = 4096
UFFD = "anon_inode:[userfaultfd]"


def _links(pid: int | str) -> dict[int, str]:
    """fd -> readlink of /proc/PID/fd (descriptors closed meanwhile left out)."""
    out = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            out[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
    return out


def _uffds(pid: int | str) -> int:
    return sum(link == UFFD for link in _links(pid).values())


def _wp_vmas(pid: int) -> int:
    """Mappings of ``pid`` registered for userfaultfd write-protection (smaps ``uw``)."""
    flags = [
        line.split()[1:] for line in Path(f"/proc/{pid}/smaps").read_text().splitlines()
        if line.startswith("VmFlags:")
    ]  # fmt: skip
    return sum("uw" in f for f in flags)


def _stat(pid: int) -> list[str]:
    raw = Path(f"/proc/{pid}/stat").read_text()
    return raw[raw.rindex(")") + 2 :].split()  # [0] state, [1] ppid, [3] session, [4] tty


def _threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads")


def _tracer(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("TracerPid:"):
            return int(line.split()[1])
    raise AssertionError("no TracerPid")


def _gone(pid: int, timeout: float = 5.0) -> bool:
    """Whether ``pid`` has exited (a zombie waiting for init counts) within ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if _stat(pid)[0] in ("Z", "X"):
                return True
        except FileNotFoundError:
            return True
        time.sleep(0.01)
    return False


def _track(image: Path, pid: int, *extra: str) -> dict[str, object]:
    out = run_applier("dump", str(image), "--from", str(pid), "--track", "--json", *extra)
    assert out.returncode == 0, out.stderr
    doc: dict[str, object] = json.loads(out.stdout)
    assert doc["tracking"] == "uffd-wp", doc
    return doc


@pytest.fixture
def untracked(target: Target) -> Iterator[Target]:
    """The target; any holder of it a test left is stopped (and must then be gone) at the end,
    and the target is running and untraced."""
    yield target
    if target.alive():
        info = holder.stop(target.pid)
        assert info is None or _gone(info.holder)
        assert_untouched(target)
        assert _uffds(target.pid) == 0


def test_tracked_dump_leaves_no_descriptor_in_the_target(untracked: Target, tmp_path: Path) -> None:
    """After dump --track the target's descriptor table is as before; a daemon holds the
    userfaultfd (its own session, no terminal, /dev/null for 0-2, not ours to reap, not
    traced, tracing nothing) and its mappings are write-protect registered."""
    t = untracked
    before = _links(t.pid)
    doc = _track(tmp_path / "ck", t.pid)
    assert _links(t.pid) == before and _uffds(t.pid) == 0
    assert_untouched(t)
    held = doc["holder"]
    assert isinstance(held, int)
    info = holder.status(t.pid)
    assert info is not None and info.holder == held
    state = json.loads((tmp_path / "ck" / TRACKING_FILE).read_text())
    assert state["remote_fd"] == -1 and state["inode"] == info.inode
    deadline = time.monotonic() + 10
    while (_stat(held)[0] != "S" or _threads(held) > 1) and time.monotonic() < deadline:
        time.sleep(0.01)  # finishing the answer to status(), or still loading applier
    assert _threads(held) == 1  # applier loaded (on a thread of its own, now gone)
    cpu = _stat(held)[11:13]  # utime, stime
    time.sleep(0.2)
    state_, ppid, _, session, tty = _stat(held)[:5]
    assert state_ == "S" and _stat(held)[11:13] == cpu  # asleep in poll(), not spinning
    assert int(ppid) not in (os.getpid(), 0)
    assert int(session) != held and int(session) != os.getsid(0) and int(tty) == 0
    assert _tracer(held) == 0 and _tracer(t.pid) == 0
    assert Path(f"/proc/{held}/comm").read_text().strip() == "applier-holder"
    links = _links(held)
    assert [links[0], links[1], links[2]] == ["/dev/null"] * 3
    others = sorted("socket" if v.startswith("socket:[") else v for k, v in links.items() if k > 2)
    assert others == ["anon_inode:[pidfd]", UFFD, "socket"]
    uffd = next(k for k, v in links.items() if v == UFFD)
    assert os.stat(f"/proc/{held}/fd/{uffd}").st_ino == info.inode
    assert _wp_vmas(t.pid) > 0
    # the target keeps working
    (checksum,) = command(t, "sum", "sum")
    assert command(t, "sum", "sum") == [checksum]


def test_five_tracked_dumps_reuse_one_tracker(untracked: Target, tmp_path: Path) -> None:
    """Five dumps --track: one holder, one userfaultfd, the target's descriptor count never
    grows; a plain dump of the tracked target works (CRIU would find no userfaultfd)."""
    t = untracked
    count = len(_links(t.pid))
    holders = set()
    for i in range(5):
        doc = _track(tmp_path / f"ck{i}", t.pid)
        holders.add(doc["holder"])
        assert doc["tracking_reused"] is (i > 0)
        assert len(_links(t.pid)) == count and _uffds(t.pid) == 0
    assert len(holders) == 1
    (held,) = holders
    assert isinstance(held, int) and _uffds(held) == 1
    out = run_applier("dump", str(tmp_path / "plain"), "--from", str(t.pid))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "plain" / f"pagemap-{t.pid}.img").exists()
    assert_untouched(t)
    # the holder knows the image that owns the baseline: the last tracked one
    out = run_applier("untrack", str(t.pid), "--json")
    assert out.returncode == 0 and json.loads(out.stdout) == {
        "pid": t.pid, "holder": held, "image": str((tmp_path / "ck4").resolve())
    }  # fmt: skip
    assert _gone(held, timeout=0.5) and _wp_vmas(t.pid) == 0


def test_only_dirty_reverts_the_written_pages(untracked: Target, tmp_path: Path) -> None:
    """apply --only-dirty through the holder's tracker: every byte as at the dump, only the
    pages written since are written; and again after a second round."""
    t = untracked
    (checksum,) = command(t, "sum", "sum")
    image = tmp_path / "ck"
    _track(image, t.pid)
    at_dump = snapshot(t.pid)
    full = run_applier("apply", str(image), "--into", str(t.pid), "--dry-run", "--json")
    all_pages = json.loads(full.stdout)["summary"]["pages_to_write"]
    for _ in range(2):
        command(t, "touch", "touched")  # one byte of the globals, one of the heap
        assert command(t, "sum", "sum") != [checksum]
        out = run_applier("apply", str(image), "--into", str(t.pid), "--only-dirty", "--json")
        assert out.returncode == 0 and out.stderr == "", out.stderr
        doc = json.loads(out.stdout)
        assert doc["dirty_source"] == "tracker:uffd-wp"
        assert 2 <= doc["stats"]["pages_written"] < all_pages
        got = snapshot(t.pid)
        assert got.memory == at_dump.memory and got.layout == at_dump.layout
        assert command(t, "sum", "sum") == [checksum]
        assert _uffds(t.pid) == 0


def test_untrack_ends_the_holder_and_the_tracking(untracked: Target, tmp_path: Path) -> None:
    """untrack: the holder exits, the kernel drops the registrations, the target runs on
    untraced; later --only-dirty compares contents (a warning, still exact), --parent is
    refused, a second untrack has nothing to do."""
    t = untracked
    (checksum,) = command(t, "sum", "sum")
    image = tmp_path / "ck"
    doc = _track(image, t.pid)
    held = doc["holder"]
    assert isinstance(held, int)
    sock = holder.socket_path(t.pid, json.loads((image / TRACKING_FILE).read_text())["start_time"])
    assert sock.exists()
    out = run_applier("untrack", str(t.pid))
    assert out.returncode == 0 and out.stdout == (
        f"tracking of pid {t.pid} ended: holder pid {held} stopped\n"
    )
    assert _gone(held, timeout=0.5)  # untrack waited for it
    assert not sock.exists() and holder.status(t.pid) is None
    assert _wp_vmas(t.pid) == 0 and _uffds(t.pid) == 0
    assert_untouched(t)
    again = run_applier("untrack", str(t.pid))
    assert again.returncode == EXIT_USAGE and again.stderr.count("\n") == 1
    assert "nothing to untrack" in again.stderr
    command(t, "touch", "touched")
    out = run_applier("apply", str(image), "--into", str(t.pid), "--only-dirty", "--json")
    assert out.returncode == 0 and "no tracker holder runs" in out.stderr
    assert json.loads(out.stdout)["dirty_source"] == "content"
    assert command(t, "sum", "sum") == [checksum]
    refused = run_applier(
        "dump", str(tmp_path / "inc"), "--from", str(t.pid), "--parent", str(image)
    )
    assert refused.returncode == EXIT_MISMATCH and "take a full dump" in refused.stderr
    assert not (tmp_path / "inc").exists()
    assert run_applier("untrack", "999999999").returncode == EXIT_TARGET


def test_holder_exits_with_the_target(tmp_path: Path) -> None:
    """The holder watches the target's pidfd: it exits, and removes its socket, when the
    target does."""
    with spawn(build_c("apply_target.c")) as t:
        t.expect("ready")
        t.wait_in_syscall(0)
        doc = _track(tmp_path / "ck", t.pid)
        held = doc["holder"]
        assert isinstance(held, int) and not _gone(held, timeout=0.2)
        sock = holder.socket_path(
            t.pid, json.loads((tmp_path / "ck" / TRACKING_FILE).read_text())["start_time"]
        )
        os.kill(t.pid, signal.SIGKILL)  # not t.kill(): that stops the holder first
        t.proc.wait(timeout=10)
        assert _gone(held)
        deadline = time.monotonic() + 2
        while sock.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not sock.exists()


def test_killed_holder_falls_back_and_a_new_one_starts(untracked: Target, tmp_path: Path) -> None:
    """SIGKILL of the holder: tracking ends with it (no registrations left in the target);
    apply --only-dirty warns and compares contents, exactly; the next dump --track starts a
    new holder (the stale socket is replaced) that works."""
    t = untracked
    (checksum,) = command(t, "sum", "sum")
    image = tmp_path / "ck"
    held = _track(image, t.pid)["holder"]
    assert isinstance(held, int)
    os.kill(held, signal.SIGKILL)  # ours: the dump above started it
    assert _gone(held)
    deadline = time.monotonic() + 2
    while _wp_vmas(t.pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _wp_vmas(t.pid) == 0
    command(t, "touch", "touched")
    out = run_applier("apply", str(image), "--into", str(t.pid), "--only-dirty", "--json")
    assert out.returncode == 0 and "comparing page contents" in out.stderr
    assert out.stderr.count("\n") == 1
    assert json.loads(out.stdout)["dirty_source"] == "content"
    assert command(t, "sum", "sum") == [checksum]
    second = _track(tmp_path / "ck2", t.pid)
    assert second["holder"] != held and second["tracking_reused"] is False
    command(t, "touch", "touched")
    out = run_applier(
        "apply", str(tmp_path / "ck2"), "--into", str(t.pid), "--only-dirty", "--json"
    )
    assert json.loads(out.stdout)["dirty_source"] == "tracker:uffd-wp"
    assert command(t, "sum", "sum") == [checksum]


def test_an_older_image_is_not_trusted_once_the_baseline_moved(
    untracked: Target, tmp_path: Path
) -> None:
    """dump --track 1, write, dump --track 2 (the same tracker, reset): --only-dirty of 1
    must not take the tracker's word (it only knows what changed since 2): it compares
    contents, and reverts what was written before 2 as well."""
    t = untracked
    (checksum,) = command(t, "sum", "sum")
    one, two = tmp_path / "1", tmp_path / "2"
    _track(one, t.pid)
    at_one = snapshot(t.pid)
    command(t, "touch", "touched")
    _track(two, t.pid)
    out = run_applier("apply", str(one), "--into", str(t.pid), "--only-dirty", "--json")
    assert out.returncode == 0 and f"moved on to the newer image {two.resolve()}" in out.stderr
    assert json.loads(out.stdout)["dirty_source"] == "content"
    got = snapshot(t.pid)
    assert got.memory == at_one.memory
    assert command(t, "sum", "sum") == [checksum]
    # the newer image still has the tracker: it serves "touched" again exactly
    command(t, "touch", "touched")
    out = run_applier("apply", str(two), "--into", str(t.pid), "--only-dirty", "--json")
    assert json.loads(out.stdout)["dirty_source"] == "tracker:uffd-wp"
    assert command(t, "sum", "sum") != [checksum]  # state 2 is "touched" once


def test_checkpoint_borrows_a_running_holder(untracked: Target, tmp_path: Path) -> None:
    """Checkpoint.take of a target dump --track left a holder for: it uses that tracker (no
    second userfaultfd), restores exactly, and its close leaves the holder's tracking on."""
    t = untracked
    held = _track(tmp_path / "cli", t.pid)["holder"]
    (checksum,) = command(t, "sum", "sum")
    own = _uffds("self")
    with Checkpoint.take(t.pid) as cp:
        assert _uffds(t.pid) == 0 and _uffds("self") == own + 1
        command(t, "touch", "touched")
        assert cp.restore().pages_written >= 2
        assert command(t, "sum", "sum") == [checksum]
    assert _uffds("self") == own and _uffds(t.pid) == 0
    info = holder.status(t.pid)
    assert info is not None and info.holder == held and _wp_vmas(t.pid) > 0
    assert_untouched(t)


@pytest.mark.parametrize("with_holder", [False, True])
def test_an_open_checkpoint_keeps_its_baseline(
    untracked: Target, tmp_path: Path, with_holder: bool
) -> None:
    """While a Checkpoint is open (its own tracker, or one borrowed from a holder), a
    dump --track starts no tracking and resets nothing, and --parent is refused: the
    checkpoint's next restore still reverts what was written before those dumps."""
    t = untracked
    if with_holder:
        _track(tmp_path / "cli", t.pid)
    (checksum,) = command(t, "sum", "sum")
    with Checkpoint.take(t.pid) as cp:
        command(t, "touch", "touched")  # written before the dump below
        out = run_applier("dump", str(tmp_path / "ck"), "--from", str(t.pid), "--track")
        assert out.returncode == 0
        assert out.stderr == (
            f"no dirty-page tracking: pid {t.pid} is busy: checkpointed by applier pid "
            f"{os.getpid()} ({_argv()}): its tracker's baseline stays with that checkpoint\n"
        )
        assert not (tmp_path / "ck" / TRACKING_FILE).exists()
        refused = run_applier(
            "dump", str(tmp_path / "inc"), "--from", str(t.pid), "--parent", str(cp.path)
        )
        assert refused.returncode == EXIT_TARGET, refused.stderr
        assert "an incremental dump would move its tracker's baseline" in refused.stderr
        assert not (tmp_path / "inc").exists()
        stats = cp.restore()
        assert stats.pages_written >= 2
        assert command(t, "sum", "sum") == [checksum]
        assert _uffds(t.pid) == 0
    assert (holder.status(t.pid) is not None) is with_holder
    assert_untouched(t)


def _argv() -> str:
    """How applier.lock names this process in a claim."""
    return " ".join(sys.argv[:3]) if sys.argv and sys.argv[0] else "python"


def test_a_holder_that_does_not_answer(
    untracked: Target, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stopped holder: a tracked dump waits at most the timeout and starts no second
    tracker (the note says why); apply --only-dirty compares contents; once continued, the
    holder serves again."""
    t = untracked
    monkeypatch.setattr(holder, "TIMEOUT", 0.3)
    (checksum,) = command(t, "sum", "sum")
    first = dump(t.pid, tmp_path / "1", track=True)
    held = first.holder
    assert first.tracking == "uffd-wp" and isinstance(held, int)
    os.kill(held, signal.SIGSTOP)  # ours: the dump above started it
    try:
        second = dump(t.pid, tmp_path / "2", track=True)
        assert second.tracking is None and second.holder is None
        assert second.tracking_note == (
            f"pid {t.pid}: tracker holder at {holder.socket_path(t.pid, read_start_time(t.pid))}"
            ": no answer"
        )
        assert not (tmp_path / "2" / TRACKING_FILE).exists() and _uffds(t.pid) == 0
        command(t, "touch", "touched")
        result = apply(tmp_path / "1", t.pid, only_dirty=True)
        assert result.dirty_source == "content"
        assert command(t, "sum", "sum") == [checksum]
    finally:
        os.kill(held, signal.SIGCONT)
    info = holder.status(t.pid)
    assert info is not None and info.holder == held
    assert_untouched(t)


@pytest.fixture
def writer() -> Iterator[Target]:
    with spawn(build_c("track_writer.c")) as t:
        t.expect("ready")
        yield t
        assert_untouched(t)
        assert _uffds(t.pid) == 0


def test_a_userfaultfd_outside_the_target_tracks_its_writes(writer: Target) -> None:
    """The userfaultfd created in the target and closed there, held only by this process:
    the target's CPU and kernel writes are seen page-exactly, the target never blocks on a
    write-protect fault though nobody reads the descriptor (async mode), and closing the only
    copy drops the registrations."""
    t = writer
    t.send("map 64")
    addr = int(t.expect("map")[0], 16)
    t.send(f"fill {addr:#x} 64")
    t.expect("ok")
    region = [(addr, addr + 64 * PAGE)]
    with attach(t.pid) as s:
        tracker = open_tracker(s, "uffd-wp", in_target=False)
        assert isinstance(tracker, UffdWpTracker) and tracker.remote_fd == -1
        assert _uffds(t.pid) == 0
        state, fd = tracker.hand_over()
    assert _uffds(t.pid) == 0 and _wp_vmas(t.pid) > 0
    touched = [0, 5, 33, 63]
    started = time.monotonic()
    t.send("touch " + " ".join(f"{addr + p * PAGE + 7:#x}" for p in touched))
    t.expect("ok", timeout=2)  # it would time out if a fault waited for a reader
    t.send(f"pipe {addr + 20 * PAGE + 4000:#x} 200")  # pages 20 and 21, written by the kernel
    t.expect("ok", timeout=2)
    assert time.monotonic() - started < 2
    with attach(t.pid) as s:
        again = resume_tracker(s, state, fd=fd)
        pages = [(int(p) - addr) // PAGE for p in again.dirty_pages(region)]
        assert pages == sorted([*touched, 20, 21])
        again.reset()
        assert again.dirty_pages(region).tolist() == []
        state, fd = again.hand_over() if isinstance(again, UffdWpTracker) else (state, -1)
    os.close(fd)  # the only copy: the kernel unregisters everything
    assert _wp_vmas(t.pid) == 0
    t.send("ping")
    t.expect("pong")


def test_cli_apply_runs_in_the_holder(untracked: Target, tmp_path: Path) -> None:
    """A tracked target's holder runs ``applier apply`` for the command line (applier loaded
    once): the same result, output and exit status as a local apply, from the caller's
    working directory; ``--local`` applies in the command itself; a usage error comes back
    as it would here; the holder then still serves and holds no more descriptors."""
    image = tmp_path / "img"
    doc = _track(image, untracked.pid)
    held = int(str(doc["holder"]))
    (checksum,) = command(untracked, "sum", "sum")
    for _ in range(2):
        command(untracked, "scribble", "done")
        out = run_applier("apply", str(image), "--into", str(untracked.pid), "--only-dirty",
                          "--json")  # fmt: skip
        assert out.returncode == 0, out.stderr
        result = json.loads(out.stdout)
        assert result["holder"] == held and result["dirty_source"] == "tracker:uffd-wp"
        assert result["stats"]["verified"] and result["stats"]["layout_changes"] > 0
        assert command(untracked, "sum", "sum") == [checksum]
    assert_untouched(untracked)
    fds = len(_links(held))
    # relative to the caller's working directory, in text
    command(untracked, "touch", "touched")
    out = subprocess.run(
        [sys.executable, "-m", "applier", "apply", "img", "--into", str(untracked.pid),
         "--only-dirty"], cwd=tmp_path, capture_output=True, text=True, check=False,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"applied to pid {untracked.pid}: ") and "(verified)" in out.stdout
    assert command(untracked, "sum", "sum") == [checksum]
    # --local: the command applies itself
    command(untracked, "touch", "touched")
    out = run_applier("apply", str(image), "--into", str(untracked.pid), "--only-dirty",
                      "--json", "--local")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["holder"] is None
    assert command(untracked, "sum", "sum") == [checksum]
    # its messages go where the command asks (-o FILE), and the holder keeps no file open
    command(untracked, "touch", "touched")
    log = tmp_path / "apply.log"
    out = run_applier("-v4", "-o", str(log), "apply", str(image), "--into", str(untracked.pid),
                      "--only-dirty")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "applying in the tracker holder" in log.read_text()
    assert str(log) not in _links(held).values()
    # errors come back unchanged: usage (2), a mismatch (4, one line)
    out = run_applier("apply", str(image), "--into", str(untracked.pid), "--bogus")
    assert out.returncode == EXIT_USAGE and "unrecognized arguments: --bogus" in out.stderr
    out = run_applier("apply", str(image), "--into", str(untracked.pid), "--restore", "stack")
    assert out.returncode == EXIT_USAGE and "unknown part" in out.stderr
    assert len(_links(held)) <= fds + 1  # (at most the undo spool's memfd, kept for reuse)
    assert holder.status(untracked.pid) is not None
    assert_untouched(untracked)

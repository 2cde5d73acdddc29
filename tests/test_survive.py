"""An apply that is killed: SIGTERM and SIGHUP roll back (exit 128 + signal); SIGKILL leaves
the target held (stopped, untraced, a journal on disk) and ``applier recover`` or the next
apply finishes it. Whatever the moment, the target's memory is then either as before the
apply or as the image, and it runs on. Done for a target whose layout changed too."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from applier.dump import dump
from applier.journal import Journal
from tests.procs import REPO, Target, assert_untouched, build_c, run_applier, spawn

pytestmark = pytest.mark.live

MIB = 128


@pytest.fixture
def big() -> Iterator[Target]:
    """tests/targets/hold_target.c with 128 MiB of memory it can rewrite and hash."""
    with spawn(build_c("hold_target.c"), str(MIB)) as t:
        t.expect("ready")
        yield t


def ask(t: Target, line: str, key: str) -> list[str]:
    t.send(line)
    return t.expect(key, timeout=30)


def digest(t: Target) -> str:
    return ask(t, "hash", "hash")[0]


def prepared(t: Target, tmp_path: Path, *, layout: bool) -> tuple[Path, str, str]:
    """Fill, checkpoint (the image's hash), fill again and maybe change the layout (the
    hash before the apply)."""
    ask(t, "fill 1", "filled")
    image = tmp_path / "ckpt"
    dump(t.pid, image)
    at_image = digest(t)
    ask(t, "fill 2", "filled")
    if layout:
        ask(t, "layout", "layout")
    before = digest(t)
    assert before != at_image
    return image, at_image, before


def start_apply(image: Path, pid: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "applier", "apply", str(image), "--into", str(pid)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def wait_for_hold(pid: int, proc: subprocess.Popen[str], timeout: float = 30.0) -> bool:
    """Until the apply has written its journal (it is about to hold and write); False if it
    finished first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if Journal.find(pid) is not None:
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.0005)
    raise TimeoutError("the apply never started")


def state(pid: int) -> tuple[str, int]:
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return fields["State"].split()[0], int(fields["TracerPid"])


@pytest.mark.parametrize("layout", [False, True], ids=["same-layout", "layout-changed"])
@pytest.mark.parametrize("after", [0.0, 0.03, 0.12], ids=["at-hold", "early", "later"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGKILL], ids=str)
def test_killed_apply_leaves_before_or_image(
    big: Target, tmp_path: Path, sig: signal.Signals, after: float, layout: bool
) -> None:
    """A signal at some moment of a 128 MiB apply: the memory ends as before or as the
    image, never in between; SIGKILL holds the target until recover."""
    image, at_image, before = prepared(big, tmp_path, layout=layout)
    proc = start_apply(image, big.pid)
    started = wait_for_hold(big.pid, proc)
    time.sleep(after)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    if sig == signal.SIGKILL:
        assert proc.returncode in (-signal.SIGKILL, 0)
    else:
        assert proc.returncode in (128 + sig, 0), err
        if proc.returncode:
            assert err.count("\n") == 1 and f"interrupted ({sig.name})" in err
    if proc.returncode == -signal.SIGKILL and started:
        # killed while it worked: held, untraced, with a journal; recover finishes it
        deadline = time.monotonic() + 5
        while state(big.pid)[0] not in "Tt" and time.monotonic() < deadline:
            time.sleep(0.01)
        run_state, tracer = state(big.pid)
        if Journal.find(big.pid) is not None and run_state == "T":
            assert tracer == 0
            out = run_applier("recover", str(big.pid))
            assert out.returncode == 0, out.stderr
            assert f"recovered pid {big.pid}" in out.stdout
            assert Journal.find(big.pid) is None
    got = digest(big)
    assert got in (before, at_image)
    if proc.returncode == 128 + sig:
        assert got in (before, at_image)  # rolled back, or the signal came after the last write
    assert Journal.find(big.pid) is None
    assert_untouched(big)
    ask(big, "fill 3", "filled")  # and it works on
    assert digest(big) not in (before, at_image)


def test_next_apply_finishes_a_killed_one(big: Target, tmp_path: Path) -> None:
    """Without recover: the next apply of a held target applies its own image and lets the
    target run on."""
    image, at_image, _ = prepared(big, tmp_path, layout=True)
    proc = start_apply(image, big.pid)
    assert wait_for_hold(big.pid, proc)
    time.sleep(0.02)
    proc.kill()
    proc.communicate(timeout=60)
    out = run_applier("apply", str(image), "--into", str(big.pid))
    assert out.returncode == 0, out.stderr
    assert digest(big) == at_image
    assert Journal.find(big.pid) is None
    assert_untouched(big)


def test_recover_without_journal_says_so(big: Target) -> None:
    """Nothing to recover: exit 2, one line."""
    out = run_applier("recover", str(big.pid))
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "no apply journal" in out.stderr
    assert_untouched(big)


def test_a_stopped_target_stays_stopped(big: Target, tmp_path: Path) -> None:
    """A target stopped with SIGSTOP before the apply is stopped after it too (the hold does
    not continue it)."""
    image, at_image, _ = prepared(big, tmp_path, layout=False)
    os.kill(big.pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 5
        while state(big.pid)[0] != "T" and time.monotonic() < deadline:
            time.sleep(0.01)
        out = run_applier("apply", str(image), "--into", str(big.pid))
        assert out.returncode == 0, out.stderr
        time.sleep(0.1)
        assert state(big.pid) == ("T", 0)
    finally:
        os.kill(big.pid, signal.SIGCONT)
    assert digest(big) == at_image
    assert_untouched(big)


def caught_sigint(pid: int, timeout: float = 30.0) -> None:
    """Until ``pid`` catches SIGHUP (SigCgt in /proc/PID/status): applier's entry point sets
    its SIGINT, SIGTERM and SIGHUP handlers first thing, in that order, so from there on a
    SIGINT is applier's to answer. (Python catches SIGINT itself from early in its start.)"""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            return  # it ended already
        caught = next(line for line in status.splitlines() if line.startswith("SigCgt:"))
        if int(caught.split()[1], 16) & (1 << (signal.SIGHUP - 1)):
            return
        time.sleep(0.001)
    raise TimeoutError("applier never set its SIGINT handler")


def test_interrupt_while_starting_prints_no_traceback() -> None:
    """SIGINT at several moments while the command loads and runs: one line, exit 130 (or
    the command ran to its end), never a traceback. (Before applier's entry point sets its
    handlers the interpreter is still starting, and a SIGINT there is Python's: docs/cli.md,
    "Signals"; the moments are counted from the handler.)"""
    codes = []
    for delay in (0.0, 0.01, 0.03, 0.06, 0.12, 0.25):
        proc = subprocess.Popen(
            [sys.executable, "-m", "applier", "check"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        caught_sigint(proc.pid)  # the interpreter's own start is over
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert "Traceback" not in err, err
        assert proc.returncode in (0, 130, -signal.SIGINT), (delay, proc.returncode, err)
        if proc.returncode == 130:
            assert err.startswith("applier: interrupted") and err.count("\n") == 1
        codes.append(proc.returncode)
    assert 130 in codes  # the signal did land while applier ran


@pytest.mark.parametrize(
    "held, stopped", [(False, False), (True, False), (False, True)],
    ids=["not-held", "held", "stopped-before-the-mark"],
)  # fmt: skip
def test_journal_of_an_applier_that_died_before_the_hold(
    tmp_path: Path, held: bool, stopped: bool
) -> None:
    """A journal whose applier is gone and never held the target is removed (nothing was
    written); with the hold mark it stays for recover, even if the target runs; and so it
    does for a stopped target (the applier died between the hold and the mark)."""
    target = subprocess.Popen(["sleep", "60"])
    dead = subprocess.Popen(["true"])
    dead.wait()
    try:
        journal = Journal.begin(
            target.pid, tmp_path, task=None, parts=("memory",), only_dirty=False,
            leave_shared=False, was_stopped=False,
        )  # fmt: skip
        journal = attrs.evolve(journal, applier_pid=dead.pid)
        journal.write()
        if held:
            journal.mark_held()
        if stopped:
            os.kill(target.pid, signal.SIGSTOP)
            deadline = time.monotonic() + 5
            while state(target.pid)[0] != "T" and time.monotonic() < deadline:
                time.sleep(0.001)
        found = Journal.find(target.pid)
        if held or stopped:
            assert found == journal and journal.path.exists()
        else:
            assert found is None and not journal.path.exists()
        journal.remove()
        assert not journal.path.exists() and not journal.held_mark.exists()
    finally:
        target.kill()
        target.wait()

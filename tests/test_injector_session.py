"""Attaching to and detaching from real processes: thread-group stop, errors, leaving targets
as found."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from injector import (
    InjectorError,
    NoSuchProcess,
    PermissionDenied,
    Session,
    TargetExited,
    ZombieProcess,
    attach,
)
from tests.procs import Target, assert_untouched, build_c, spawn

pytestmark = pytest.mark.live

MIXED = ("busy", "2", "read", "2", "sleep", "2", "futex", "2")

# A helper tracer: seizes the pid given on its command line (without stopping it), says so,
# and holds it until its stdin closes. Exiting detaches it.
HOLDER = """
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
if libc.ptrace(0x4206, int(sys.argv[1]), None, None) != 0:
    print("failed", ctypes.get_errno(), flush=True)
    sys.exit(1)
print("holding", flush=True)
sys.stdin.read()
"""


@pytest.fixture(scope="module")
def target_bin() -> Path:
    return build_c("inj_target.c")


def ready(target: Target) -> list[int]:
    """Wait for the target's "ready" line; its addresses and thread count as ints."""
    words = target.expect("ready")
    return [int(w, 16) for w in words[:3]] + [int(words[3])]


def tasks(pid: int) -> set[int]:
    return {int(t) for t in os.listdir(f"/proc/{pid}/task")}


def thread_states(pid: int) -> set[bytes]:
    states = set()
    for tid in tasks(pid):
        with contextlib.suppress(FileNotFoundError):
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_bytes()
            states.add(stat[stat.rindex(b")") + 2 :][:1])
    return states


def test_single_thread_attach_stops_and_detach_resumes(target_bin: Path) -> None:
    """A single-threaded target is traced and stopped inside the session, untouched after."""
    with spawn(target_bin) as t:
        ready(t)
        with attach(t.pid) as s:
            assert s.tids == [t.pid]
            assert t.tracer() == os.getpid()
            assert thread_states(t.pid) == {b"t"}
        assert_untouched(t)
        t.send("ping")
        assert t.expect("pong") == []


def test_mixed_threads_all_stopped_leader_first(target_bin: Path) -> None:
    """Busy, read(), nanosleep and futex threads are all stopped; tids list the leader first."""
    with spawn(target_bin, *MIXED) as t:
        ready(t)
        with attach(t.pid) as s:
            assert s.tids[0] == t.pid
            assert set(s.tids) == tasks(t.pid)
            assert len(s.tids) == 9
            assert thread_states(t.pid) == {b"t"}
            t.send("ticks")  # the main thread is stopped: no answer may come
            with pytest.raises(TimeoutError):
                t.readline(timeout=0.2)
        assert_untouched(t)
        assert t.expect("ticks")  # the queued command is served after detach


def test_busy_threads_keep_running_after_detach(target_bin: Path) -> None:
    """Busy threads make no progress while stopped and resume afterwards."""
    with spawn(target_bin, "busy", "3") as t:
        ready(t)
        with attach(t.pid):
            pass
        t.send("ticks")
        first = int(t.expect("ticks")[0])
        time.sleep(0.05)
        t.send("ticks")
        assert int(t.expect("ticks")[0]) > first
        assert_untouched(t)


def test_blocked_threads_resume_without_eintr(target_bin: Path) -> None:
    """Threads stopped in read(), nanosleep and futex wait resume them transparently."""
    with spawn(target_bin, *MIXED) as t:
        ready(t)
        for _ in range(3):
            with attach(t.pid):
                pass
        t.send("feed 2 hello")
        assert t.expect("piperead") == ["2", "5", "hello"]
        t.send("wake")
        woke = {t.expect("futexwoke")[0], t.expect("futexwoke")[0]}
        assert woke == {"6", "7"}
        time.sleep(0.15)
        t.send("ticks")
        assert int(t.expect("ticks")[1]) > 0  # the sleepers still tick
        assert_untouched(t)


def test_threads_created_during_attach_are_stopped_too() -> None:
    """A target that keeps spawning threads ends up with every thread stopped."""
    with spawn(build_c("inj_spawner.c")) as t:
        t.expect("ready")
        for _ in range(10):
            with attach(t.pid) as s:
                live = tasks(t.pid)
                assert live == set(s.tids)
                assert thread_states(t.pid) == {b"t"}
                time.sleep(0.002)
                assert tasks(t.pid) == live  # nothing runs, so nothing new appears
            assert_untouched(t)
        t.send("x")
        assert int(t.expect("spawned")[0]) > 100


def test_group_stopped_target_stays_stopped(target_bin: Path) -> None:
    """A target in a SIGSTOP group stop is still stopped (not resumed) after the session."""
    with spawn(target_bin, "busy", "1") as t:
        ready(t)
        os.kill(t.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 5
        while t.state() != "T" and time.monotonic() < deadline:
            time.sleep(0.01)
        with attach(t.pid) as s:
            assert len(s.tids) == 2
        assert t.tracer() == 0
        # Detach wakes each thread, which re-enters the group stop at once.
        deadline = time.monotonic() + 2
        while thread_states(t.pid) != {b"T"} and time.monotonic() < deadline:
            time.sleep(0.005)
        assert thread_states(t.pid) == {b"T"}
        time.sleep(0.05)
        assert thread_states(t.pid) == {b"T"}  # and stays there
        os.kill(t.pid, signal.SIGCONT)
        t.send("ping")
        assert t.expect("pong") == []
        assert_untouched(t)


def test_pending_signal_is_delivered_not_lost(tmp_path: Path) -> None:
    """A signal that arrives around the attach still reaches the target's handler."""
    src = tmp_path / "sig.c"
    src.write_text(
        "#include <signal.h>\n#include <stdio.h>\n#include <unistd.h>\n"
        "static volatile int got;\nstatic void h(int s){(void)s; got++;}\n"
        'int main(void){signal(SIGUSR1,h);dprintf(1,"ready\\n");char b[64];\n'
        'while(read(0,b,sizeof b)>0) dprintf(1,"got %d\\n",got);return 0;}\n'
    )
    with spawn(build_c(src)) as t:
        t.expect("ready")
        with attach(t.pid):
            os.kill(t.pid, signal.SIGUSR1)
        t.send("x")
        assert t.expect("got") == ["1"]
        assert_untouched(t)


def test_keyboard_interrupt_inside_session_detaches(target_bin: Path) -> None:
    """An exception (Ctrl-C) inside the with block still detaches every thread."""
    with spawn(target_bin, *MIXED) as t:
        ready(t)
        with pytest.raises(KeyboardInterrupt), attach(t.pid):
            raise KeyboardInterrupt
        assert_untouched(t)


def test_no_such_process() -> None:
    """A pid that does not exist gives NoSuchProcess with a one-line message."""
    pid = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1
    with pytest.raises(NoSuchProcess) as info, attach(pid):
        pass
    assert "no such process" in str(info.value)
    assert "\n" not in str(info.value)


def test_zombie() -> None:
    """An exited, unreaped child gives ZombieProcess (a NoSuchProcess)."""
    proc = subprocess.Popen(["/bin/true"])
    try:
        deadline = time.monotonic() + 5
        stat = Path(f"/proc/{proc.pid}/stat")
        while b") Z" not in stat.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.005)
        with pytest.raises(ZombieProcess) as info, attach(proc.pid):
            pass
        assert isinstance(info.value, NoSuchProcess)
        assert "zombie" in str(info.value)
    finally:
        proc.wait()


def test_thread_id_is_not_a_process(target_bin: Path) -> None:
    """Attaching to a thread id (not a thread-group leader) is refused clearly."""
    with spawn(target_bin, "busy", "1") as t:
        ready(t)
        tid = max(tasks(t.pid))
        with pytest.raises(NoSuchProcess, match="is a thread of process"), attach(tid):
            pass
        assert_untouched(t)


@contextlib.contextmanager
def held_by_other_tracer(pid: int) -> Iterator[subprocess.Popen[bytes]]:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(pid)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == b"holding"
        yield holder
    finally:
        holder.kill()
        holder.wait(timeout=10)
        for stream in (holder.stdin, holder.stdout):
            if stream is not None:
                stream.close()


def test_already_traced_names_the_tracer(target_bin: Path) -> None:
    """A target traced by another process gives PermissionDenied naming that tracer."""
    with spawn(target_bin) as t:
        ready(t)
        with held_by_other_tracer(t.pid) as holder:
            with pytest.raises(PermissionDenied) as info, attach(t.pid):
                pass
            message = str(info.value)
            assert f"already traced by pid {holder.pid}" in message
            assert "\n" not in message
        deadline = time.monotonic() + 5
        while t.tracer() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert_untouched(t)


def test_target_killed_mid_session_raises_target_exited(target_bin: Path) -> None:
    """A target killed during the session gives TargetExited and the session ends cleanly."""
    with spawn(target_bin, *MIXED) as t:
        rw = ready(t)[0]
        with attach(t.pid) as s:
            os.kill(t.pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while t.state() != "Z" and time.monotonic() < deadline:
                with contextlib.suppress(TargetExited):
                    s.read(rw, 16)
                time.sleep(0.005)
            with pytest.raises(TargetExited):
                s.read(rw, 16)
            with pytest.raises(TargetExited):
                s.syscall(39)
        assert not s.active
        assert t.proc.wait(timeout=5) in (-signal.SIGKILL, 0)


def test_injected_exit_group_raises_target_exited(target_bin: Path) -> None:
    """A target that exits inside an injected syscall gives TargetExited, without hanging."""
    with spawn(target_bin, "sleep", "2") as t:
        ready(t)
        with attach(t.pid) as s, pytest.raises(TargetExited):
            s.syscall(231, 7)  # exit_group(7)
        t.proc.wait(timeout=5)


def test_session_methods_outside_with_are_refused(target_bin: Path) -> None:
    """A session that is not entered (or already left) refuses work with InjectorError."""
    with spawn(target_bin) as t:
        ready(t)
        s = attach(t.pid)
        assert isinstance(s, Session)
        with pytest.raises(InjectorError, match="not active"):
            s.maps()
        with s:
            pass
        with pytest.raises(InjectorError, match="not active"):
            s.read(0, 1)
        assert_untouched(t)


def test_a_lent_page_stands_in_for_scratch_memory(target_bin: Path) -> None:
    """Inside ``lending(page)`` the calls that take a pointer use that page of the target's
    own memory, with no injected mmap or munmap, and the page's bytes are back afterwards;
    the answers are those a fresh mapping gives. A page that cannot be read is not used."""
    with spawn(target_bin, "read", "1") as t:
        ready(t)
        with attach(t.pid) as s:
            page = s.mmap(0, 4096, 3, 0x22)
            pattern = bytes(range(256)) * 16
            s.write(page, pattern)
            wanted = [signal.SIGUSR1, signal.SIGTERM, signal.SIGCHLD]
            plain = s.sigactions(wanted)
            calls: list[int] = []
            real = s.syscalls

            def counted(
                batch: Sequence[tuple[int, tuple[int, ...]]], *, tid: int | None = None
            ) -> list[int]:
                calls.extend(nr for nr, _ in batch)
                return real(batch, tid=tid)

            s.syscalls = counted  # type: ignore[method-assign,assignment]
            with s.lending(page):
                assert s.sigactions(wanted) == plain
            assert calls == [s.nr("rt_sigaction")] * len(wanted)
            assert s.read(page, 4096) == pattern
            calls.clear()
            with s.lending(0x1000):  # nothing mapped there: a fresh mapping after all
                assert s.sigactions(wanted) == plain
            assert calls[0] == s.nr("mmap") and calls[-1] == s.nr("munmap")
            del s.syscalls
            s.munmap(page, 4096)
        assert_untouched(t)


def test_session_from_another_thread_is_refused(target_bin: Path) -> None:
    """ptrace belongs to the attaching thread: other threads get InjectorError, not chaos."""
    with spawn(target_bin) as t:
        ready(t)
        errors: list[BaseException] = []
        with attach(t.pid) as s:

            def use() -> None:
                try:
                    s.get_regs(t.pid)
                except InjectorError as exc:
                    errors.append(exc)

            worker = threading.Thread(target=use)
            worker.start()
            worker.join()
            assert s.get_regs(t.pid).ip  # still fine from the owner
        assert len(errors) == 1 and "attaching thread" in str(errors[0])
        assert_untouched(t)


def test_scratch_memory_keeps_the_layout_and_its_epoch(target_bin: Path) -> None:
    """Calls that only borrow scratch memory (made and removed again) leave the cached
    layout and the layout epoch as they were, so the tracker's reset needs no rescan; a call
    that maps memory, inside a scratch or not, moves the epoch, and the layout read then is
    the real one."""
    with spawn(target_bin, "read", "1") as t:
        ready(t)
        with attach(t.pid) as s:
            before, epoch = s.maps(), s.layout_epoch
            actions = s.sigactions([signal.SIGUSR1, signal.SIGTERM])
            assert set(actions) == {signal.SIGUSR1, signal.SIGTERM}
            assert s.layout_epoch == epoch and s.maps() == before
            fd = s.openat("/dev/null")
            s.close(fd)
            assert s.layout_epoch == epoch and s.maps() == before
            with s.scratch(b"x") as where:  # a mapping made inside: the epoch moves
                extra = s.mmap(0, 4096, 3, 0x22)
                assert where != extra
            assert s.layout_epoch != epoch
            assert any(m.start == extra for m in s.maps())
            s.munmap(extra, 4096)
            assert s.maps() == before
        assert_untouched(t)

"""Syscall injection and registers: the call runs once, the thread's own syscall restarts."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import attrs
import pytest

from injector import InjectedSyscallError, attach
from injector.maps import PROT_READ, PROT_WRITE
from injector.regs import REG_NAMES, X86Regs
from injector.session import Session
from tests.procs import Target, assert_untouched, build_c, spawn

pytestmark = pytest.mark.live

PAGE = 4096
MAP_PRIVATE_ANON = 0x22
SYS_GETPID, SYS_GETTID = 39, 186
ERESTARTSYS, ERESTART_RESTARTBLOCK = 512, 516


@pytest.fixture(scope="module")
def target_bin() -> Path:
    return build_c("inj_target.c")


def ready(target: Target) -> tuple[int, int, int]:
    words = target.expect("ready")
    return int(words[0], 16), int(words[1], 16), int(words[2], 16)


def signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def wait_in_syscall(pid: int, nr: int) -> list[int]:
    """Wait until every thread but the busy ones sits in syscall ``nr`` or another blocking
    call; return the tids blocked in ``nr`` (from /proc/PID/task/TID/syscall)."""
    deadline = time.monotonic() + 5
    while True:
        found = []
        for tid in sorted(int(x) for x in os.listdir(f"/proc/{pid}/task")):
            words = Path(f"/proc/{pid}/task/{tid}/syscall").read_text().split()
            if words and words[0] == str(nr):
                found.append(tid)
        if pid in found or time.monotonic() > deadline:
            return found
        time.sleep(0.005)


def registers(s: Session) -> dict[int, tuple[X86Regs, bytes]]:
    """Every thread's general-purpose registers and XSAVE area."""
    return {tid: (s.get_regs(tid), s.get_xstate(tid)) for tid in s.tids}


def no_eintr(target: Target) -> None:
    """Nothing in the target saw EINTR (it reports any it sees on stdout)."""
    target.send("ping")
    while True:
        line = target.readline()
        assert not line.startswith("EINTR"), line
        if line == "pong":
            return


def test_reg_names_are_criu_order() -> None:
    """X86Regs fields are CRIU's user_x86_regs_entry names in kernel order."""
    assert [f.name for f in attrs.fields(X86Regs)] == list(REG_NAMES)
    assert REG_NAMES[:4] == ("r15", "r14", "r13", "r12")
    assert REG_NAMES[15:19] == ("orig_ax", "ip", "cs", "flags")
    assert REG_NAMES[-4:] == ("ds", "es", "fs", "gs")


def test_injected_getpid_and_gettid_per_thread(target_bin: Path) -> None:
    """getpid runs in the target; gettid injected into each thread returns that thread."""
    with spawn(target_bin, "busy", "2", "read", "2", "sleep", "2", "futex", "2") as t:
        ready(t)
        with attach(t.pid) as s:
            assert s.syscall(SYS_GETPID) == t.pid
            for tid in s.tids:
                assert s.syscall(SYS_GETTID, tid=tid) == tid
        assert_untouched(t)
        no_eintr(t)


def test_registers_identical_after_injection(target_bin: Path) -> None:
    """Every register of every thread is as before after an injected call."""
    with spawn(target_bin, "busy", "1", "read", "1", "sleep", "1", "futex", "1") as t:
        ready(t)
        with attach(t.pid) as s:
            before = registers(s)
            for tid in s.tids:
                s.syscall(SYS_GETPID, tid=tid)
            assert registers(s) == before
        assert_untouched(t)


def test_chained_calls_run_each_once_and_leave_every_register(target_bin: Path) -> None:
    """``syscalls`` chains calls in a thread (from one call's exit straight to the next):
    each runs once with its own result, a failing one raises once every call ran, and
    every thread's registers are as before, its interrupted syscall restarting (no EINTR)."""
    with spawn(target_bin, "busy", "1", "read", "1", "sleep", "1", "futex", "1") as t:
        ready(t)
        with attach(t.pid) as s:
            before = registers(s)
            for tid in s.tids:
                got = s.syscalls([(SYS_GETTID, ()), (SYS_GETPID, ()), (SYS_GETTID, ())], tid=tid)
                assert got == [tid, t.pid, tid]
            page = s.mmap(0, PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE_ANON)
            with pytest.raises(InjectedSyscallError) as info:
                # munmap of an unaligned address fails; the mprotect after it still runs
                s.syscalls([(11, (123, PAGE)), (10, (page, PAGE, PROT_READ))])
            assert info.value.syscall == "munmap" and info.value.errno == errno.EINVAL
            assert next(m for m in s.maps() if m.start == page).writable is False
            s.munmap(page, PAGE)
            assert registers(s) == before
        assert_untouched(t)
        no_eintr(t)


def test_blocked_read_still_returns_the_data_after_injection(target_bin: Path) -> None:
    """Injected into threads blocked in read(), the reads later return the data, no EINTR."""
    with spawn(target_bin, "read", "2") as t:
        ready(t)
        deadline = time.monotonic() + 5
        while len(wait_in_syscall(t.pid, 0)) < 3 and time.monotonic() < deadline:
            time.sleep(0.005)
        with attach(t.pid) as s:
            leader = s.get_regs(t.pid)
            assert leader.orig_ax == 0  # read(0, ...)
            assert signed(leader.ax) == -ERESTARTSYS
            for tid in s.tids:
                s.mmap(0, PAGE, PROT_READ, MAP_PRIVATE_ANON)
                s.syscall(SYS_GETPID, tid=tid)
        t.send("feed 1 after-injection")  # the leader's read(stdin) gets this line
        assert t.expect("piperead") == ["1", "15", "after-injection"]
        t.send("feed 0 second")
        assert t.expect("piperead") == ["0", "6", "second"]
        assert_untouched(t)
        no_eintr(t)


def test_nanosleep_and_futex_restart_after_injection(target_bin: Path) -> None:
    """Threads in nanosleep (restart_syscall) and futex wait resume them after injection."""
    with spawn(target_bin, "sleep", "2", "futex", "2") as t:
        ready(t)
        with attach(t.pid) as s:
            sleepers, waiters = s.tids[1:3], s.tids[3:5]
            for tid in sleepers + waiters:
                s.syscall(SYS_GETPID, tid=tid)
            codes = {-signed(s.get_regs(tid).ax) for tid in sleepers}
            assert codes <= {ERESTART_RESTARTBLOCK, ERESTARTSYS, 0}
        time.sleep(0.2)
        t.send("ticks")
        assert int(t.expect("ticks")[1]) >= 2
        t.send("wake")
        assert {t.expect("futexwoke")[0] for _ in range(2)} == {"2", "3"}
        assert_untouched(t)
        no_eintr(t)


def test_injected_mmap_mprotect_munmap_visible_in_maps(target_bin: Path) -> None:
    """mmap, mprotect and munmap injected into the target show in /proc/PID/maps."""
    with spawn(target_bin) as t:
        ready(t)
        with attach(t.pid) as s:
            addr = s.mmap(0, 4 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE_ANON)
            prots = {(m.start, m.end): m.prot for m in s.maps()}
            assert any(a <= addr and addr + 4 * PAGE <= b for a, b in prots)
            s.mprotect(addr + PAGE, PAGE, PROT_READ)
            s.write(addr, b"hello")
            assert s.read(addr, 5) == b"hello"
            prots = {(m.start, m.end): m.prot for m in s.maps()}
            assert prots[(addr + PAGE, addr + 2 * PAGE)] == PROT_READ
            s.munmap(addr, 4 * PAGE)
            assert not [m for m in s.maps() if m.start < addr + 4 * PAGE and m.end > addr]
        assert_untouched(t)


def test_injected_brk_moves_the_program_break(target_bin: Path) -> None:
    """An injected brk grows the heap; the target sees the new break."""
    with spawn(target_bin) as t:
        ready(t)
        t.send("brk")
        old = int(t.expect("brk")[0], 16)
        with attach(t.pid) as s:
            assert s.brk(0) == old
            new = s.brk(old + 16 * PAGE)
            assert new == old + 16 * PAGE
            heap = [m for m in s.maps() if m.path == "[heap]"]
            assert heap and heap[0].end == new
        t.send("brk")
        assert int(t.expect("brk")[0], 16) == new
        assert_untouched(t)


def test_injected_error_raises_with_errno_and_name(target_bin: Path) -> None:
    """A failing injected call raises InjectedSyscallError naming the call and its errno."""
    with spawn(target_bin) as t:
        ready(t)
        with attach(t.pid) as s:
            with pytest.raises(InjectedSyscallError) as info:
                s.munmap(123, PAGE)  # unaligned: EINVAL
            assert info.value.errno == errno.EINVAL
            assert info.value.syscall == "munmap"
            assert "munmap" in str(info.value) and "\n" not in str(info.value)
            with pytest.raises(InjectedSyscallError) as closed:
                s.close(987)
            assert closed.value.errno == errno.EBADF
            assert s.syscall(SYS_GETPID) == t.pid  # the session still works
        assert_untouched(t)


def test_set_regs_round_trip(target_bin: Path) -> None:
    """set_regs stores what get_regs then returns (changed r12, restored after)."""
    with spawn(target_bin, "busy", "1") as t:
        ready(t)
        with attach(t.pid) as s:
            tid = s.tids[1]
            regs = s.get_regs(tid)
            s.set_regs(tid, attrs.evolve(regs, r12=0x1234_5678_9ABC))
            assert s.get_regs(tid).r12 == 0x1234_5678_9ABC
            s.set_regs(tid, regs)
            assert s.get_regs(tid) == regs
            fx = s.get_fpregs(tid)
            assert len(fx) == 512
            s.set_fpregs(tid, fx)
            xs = s.get_xstate(tid)
            # The XSAVE area starts with the FXSAVE layout; its bytes 464..511 carry the
            # kernel's software-reserved xstate description instead of zeroes.
            assert xs[:464] == fx[:464]
            s.set_xstate(tid, xs)
            assert s.get_xstate(tid) == xs
        assert_untouched(t)


def test_userfaultfd_and_pidfd_getfd(target_bin: Path) -> None:
    """A descriptor created in the target by injection can be taken out with pidfd_getfd."""
    with spawn(target_bin) as t:
        ready(t)
        with attach(t.pid) as s:
            remote = s.userfaultfd(os.O_CLOEXEC | 1)  # UFFD_USER_MODE_ONLY
            assert Path(f"/proc/{t.pid}/fd/{remote}").readlink().name == "anon_inode:[userfaultfd]"
            local = s.pidfd_getfd(remote)
            try:
                assert os.readlink(f"/proc/self/fd/{local}") == "anon_inode:[userfaultfd]"
            finally:
                os.close(local)
            s.close(remote)
            assert not Path(f"/proc/{t.pid}/fd/{remote}").exists()
        assert_untouched(t)


def test_many_injections_keep_target_healthy(target_bin: Path) -> None:
    """Hundreds of injections into blocked threads leave no EINTR and no stray signal."""
    with spawn(target_bin, "read", "1", "sleep", "1") as t:
        ready(t)
        for _ in range(5):
            with attach(t.pid) as s:
                for _ in range(50):
                    for tid in s.tids:
                        s.syscall(SYS_GETTID, tid=tid)
        t.send("feed 0 ok")
        assert t.expect("piperead") == ["0", "2", "ok"]
        assert_untouched(t)
        no_eintr(t)

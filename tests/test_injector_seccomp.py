"""Injected syscalls in a target under a seccomp filter: the filter is suspended while traced
(PTRACE_O_SUSPEND_SECCOMP, needs CAP_SYS_ADMIN) so an injected call it forbids cannot kill the
target; without that capability the injection is refused before it runs."""

from __future__ import annotations

import os

import pytest

from injector import attach
from injector.errors import InjectorError
from tests.procs import assert_untouched, build_c, spawn

pytestmark = pytest.mark.live
SYS_getppid = 110


def test_forbidden_syscall_is_injected_safely() -> None:
    """getppid kills this target when it calls it itself; injected, it returns the ppid."""
    with spawn(build_c("seccomp_target.c")) as t:
        t.expect("ready")
        with attach(t.pid) as s:
            assert s.syscall(SYS_getppid) == os.getpid()
        assert_untouched(t)
        t.send("still there")
        assert t.expect("echo") == ["still", "there"]


def test_without_cap_sys_admin_injection_is_refused() -> None:
    """Seccomp cannot be suspended: the injected call is refused, the target lives on."""
    with spawn(build_c("seccomp_target.c")) as t:
        t.expect("ready")
        with attach(t.pid) as s:
            s.seccomp_suspended = False  # as without CAP_SYS_ADMIN
            with pytest.raises(InjectorError, match="seccomp"):
                s.syscall(SYS_getppid)
        assert_untouched(t)
        t.send("alive")
        assert t.expect("echo") == ["alive"]

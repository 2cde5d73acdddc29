"""The command line's conventions: --version, diff's exit status, JSON documents (plans and
errors), verbosity, progress on a terminal, applier check, the one exit-code table."""

from __future__ import annotations

import errno
import importlib.metadata
import importlib.resources
import json
import os
import pty
import select
import subprocess
import sys
from pathlib import Path

import pytest

import applier
from applier.api import apply
from applier.cli import check as check_cmd
from applier.dump import dump
from applier.errors import (
    EXIT_BAD_IMAGE,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_MISMATCH,
    EXIT_TARGET,
    EXIT_USAGE,
    MismatchError,
    OutputDirError,
    exit_code,
)
from applier.lock import TargetBusy
from formats.errors import ImageError
from formats.names import TRACKING as TRACKING_FILE
from injector.errors import NoSuchProcess, PermissionDenied, TargetExited
from injector.regs import Arch
from injector.syscalls import format_call, syscall_name
from tests.live_state import command
from tests.procs import REPO, Target, assert_untouched, build_c, run_applier, spawn


def test_version_has_one_source() -> None:
    """applier --version, applier.__version__ and the installed metadata agree."""
    out = run_applier("--version")
    assert out.returncode == 0
    assert out.stdout.strip() == f"applier {applier.__version__}"
    assert importlib.metadata.version("applier") == applier.__version__


def test_package_metadata_and_py_typed() -> None:
    """py.typed ships with each package; classifiers and project URLs are declared."""
    for package in ("applier", "formats", "injector"):
        assert importlib.resources.files(package).joinpath("py.typed").is_file()
    meta = importlib.metadata.metadata("applier")
    assert "Typing :: Typed" in meta.get_all("Classifier", [])
    assert meta.get_all("Project-URL")


def test_every_error_maps_to_its_documented_code() -> None:
    """One table: image errors 3, mismatches 4, target problems 5 (injector errors too),
    usage 2, interrupt 130; anything else is a bug (None, printed as 70)."""
    assert exit_code(ImageError("x.img", "bad")) == EXIT_BAD_IMAGE
    assert exit_code(MismatchError("other process")) == EXIT_MISMATCH
    for exc in (
        NoSuchProcess(1, "no such process", errno.ESRCH),
        PermissionDenied(1, "refused", errno.EPERM),
        TargetExited(1, "exited"),
    ):
        assert exit_code(exc) == EXIT_TARGET
    assert exit_code(OutputDirError("not empty")) == EXIT_USAGE
    assert exit_code(TargetBusy("busy")) == EXIT_TARGET
    assert exit_code(KeyboardInterrupt()) == EXIT_INTERRUPTED
    assert exit_code(ZeroDivisionError()) is None
    assert EXIT_INTERNAL == 70


def test_syscall_names_and_arguments_come_from_python_ptrace() -> None:
    """Calls we never inject are named from python-ptrace's table, with argument names."""
    assert syscall_name(Arch.X86_64, 230) == "clock_nanosleep"
    assert syscall_name(Arch.X86_64, 100000) == "syscall_100000"
    assert (
        format_call(Arch.X86_64, 0, [3, 0x7FFC0000, 4096])
        == "read(fd=3, buf=0x7ffc0000, count=4096)"
    )
    assert format_call(Arch.X86_64, 39) == "getpid()"


@pytest.mark.live
def test_diff_exits_like_diff1(target: Target, tmp_path: Path) -> None:
    """diff: 0 and "the same" right after the dump, 1 and the differing steps after a
    change (threads named with the call they are blocked in), 0 again after apply."""
    ckpt = tmp_path / "ckpt"
    assert run_applier("dump", str(ckpt), "--from", str(target.pid)).returncode == 0
    same = run_applier("diff", str(ckpt), "--against", str(target.pid))
    assert same.returncode == 0, same.stdout + same.stderr
    assert f"pid {target.pid} is the same as image task" in same.stdout
    assert "in read(fd=0" in same.stdout  # the main thread waits for its next command
    command(target, "touch", "touched")
    changed = run_applier("diff", str(ckpt), "--against", str(target.pid))
    assert changed.returncode == 1, changed.stderr
    assert f"pid {target.pid} differs from image task" in changed.stdout
    assert "pages differ" in changed.stdout and "write" in changed.stdout
    assert run_applier("apply", str(ckpt), "--into", str(target.pid)).returncode == 0
    assert run_applier("diff", str(ckpt), "--against", str(target.pid)).returncode == 0
    assert_untouched(target)


@pytest.mark.live
def test_dry_run_only_dirty_counts_unchanged_pages(target: Target, tmp_path: Path) -> None:
    """apply --dry-run --only-dirty compares contents and reports the pages left unchanged."""
    ckpt = tmp_path / "ckpt"
    dump(target.pid, ckpt)
    command(target, "touch", "touched")
    full = apply(ckpt, target.pid, dry_run=True).plan
    result = apply(ckpt, target.pid, dry_run=True, only_dirty=True)
    assert result.plan.compared and result.plan.pages_unchanged > 0
    assert 0 < result.plan.pages_to_write < full.pages_to_write
    assert result.plan.pages_to_write + result.plan.pages_unchanged == full.pages_to_write
    assert result.stats.pages_skipped == result.plan.pages_unchanged
    text = run_applier("apply", str(ckpt), "--into", str(target.pid), "--dry-run", "--only-dirty")
    assert text.returncode == 0 and " unchanged)" in text.stdout.splitlines()[0]
    assert_untouched(target)


@pytest.mark.live
def test_json_plan_steps_have_fields(target: Target, tmp_path: Path) -> None:
    """--json steps carry op, addresses, prot, kind, path, pages, thread (docs/json.md)."""
    ckpt = tmp_path / "ckpt"
    dump(target.pid, ckpt)
    command(target, "scribble", "done")
    out = run_applier("apply", str(ckpt), "--into", str(target.pid), "--dry-run", "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    ops = {step["op"] for step in doc["steps"]}
    assert {"unmap", "write", "regs"} <= ops
    for step in doc["steps"]:
        if step["op"] in ("map", "unmap"):
            assert int(step["end"], 16) > int(step["start"], 16)
            assert set(step) >= {"prot", "kind", "path", "name", "offset"}
            assert len(step["prot"]) == 3 and step["kind"] in ("anon", "file")
        elif step["op"] == "write":
            assert step["pages"] == sum(n for _, n in step["runs"]) > 0
        elif step["op"] == "regs":
            assert isinstance(step["thread"], int) and isinstance(step["image_thread"], int)
        elif step["op"] == "discard":
            assert step["reason"] in ("zero", "file") and step["bytes"] > 0
    assert doc["summary"]["pages_to_write"] == sum(
        s["pages"] for s in doc["steps"] if s["op"] == "write"
    )


def test_json_errors_are_json(tmp_path: Path) -> None:
    """Under --json an error is a JSON document on stdout too, with its exit code."""
    missing = tmp_path / "nothing"
    out = run_applier("apply", str(missing), "--into", "1", "--json")
    assert out.returncode == EXIT_BAD_IMAGE
    doc = json.loads(out.stdout)
    assert doc["error"]["exit_code"] == EXIT_BAD_IMAGE
    assert doc["error"]["type"] == "ImageError" and str(missing) in doc["error"]["message"]
    assert out.stderr.count("\n") == 1  # and still one line on stderr


@pytest.mark.live
def test_verbosity_levels(target: Target, tmp_path: Path) -> None:
    """-v says what was done, the default only warnings, -q not even those (criu's levels)."""
    quiet = run_applier("dump", str(tmp_path / "a"), "--from", str(target.pid))
    assert quiet.returncode == 0 and quiet.stderr == ""
    loud = run_applier("-v", "dump", str(tmp_path / "b"), "--from", str(target.pid))
    assert loud.returncode == 0 and f"applier: dumped pid {target.pid}:" in loud.stderr
    assert "applier: dumped" in run_applier("-v3", "dump", str(tmp_path / "c"), "--from",
                                            str(target.pid)).stderr  # fmt: skip
    # a tracker state that no longer matches the target: a warning, then content compare
    ckpt = tmp_path / "tracked"
    assert run_applier("dump", str(ckpt), "--from", str(target.pid), "--track").returncode == 0
    state = json.loads((ckpt / TRACKING_FILE).read_text())
    broken = {**state, "remote_fd": 9999}
    (ckpt / TRACKING_FILE).write_text(json.dumps(broken))
    warned = run_applier("apply", str(ckpt), "--into", str(target.pid), "--only-dirty")
    assert warned.returncode == 0 and "dirty tracking of pid" in warned.stderr
    hushed = run_applier("-q", "apply", str(ckpt), "--into", str(target.pid), "--only-dirty")
    assert hushed.returncode == 0 and hushed.stderr == ""
    with_log = tmp_path / "log.txt"
    logged = run_applier("-v4", "-o", str(with_log), "diff", str(ckpt), "--against",
                         str(target.pid))  # fmt: skip
    assert logged.stderr == "" and "applier.api" in with_log.read_text()
    assert_untouched(target)


@pytest.mark.live
def test_dump_shows_progress_on_a_terminal(tmp_path: Path) -> None:
    """A dump of 96 MiB shows a progress bar when stderr is a terminal, none in a pipe."""
    with spawn(build_c(REPO / "bench" / "bench_target.c"), "96") as t:
        t.expect("ready")
        piped = run_applier("dump", str(tmp_path / "piped"), "--from", str(t.pid))
        assert piped.returncode == 0 and "dumping [" not in piped.stderr
        leader, follower = pty.openpty()
        proc = subprocess.Popen(
            [sys.executable, "-m", "applier", "dump", str(tmp_path / "tty"), "--from",
             str(t.pid)],
            stdout=subprocess.PIPE, stderr=follower, cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )  # fmt: skip
        os.close(follower)
        seen = b""
        while True:
            ready, _, _ = select.select([leader], [], [], 60)
            if not ready:
                break
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: the writer closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        os.close(leader)
        assert proc.wait(timeout=60) == 0
        assert proc.stdout is not None
        proc.stdout.close()
        assert b"dumping [" in seen and b"100%" in seen and b"96 MiB" in seen


def test_check_reports_features_and_exit_status() -> None:
    """applier check measures the kernel and ptrace here: uffd-wp and PAGEMAP_SCAN work, no
    soft-dirty, ptrace allowed, uffd-wp chosen: exit 0; the status rules on made-up reports."""
    out = run_applier("check", "--json")
    assert out.returncode == 0, out.stdout
    doc = json.loads(out.stdout)
    assert doc["kernel"]["userfaultfd_wp"] is None and doc["kernel"]["pagemap_scan"] is None
    assert doc["ptrace"]["works"] is True and doc["tracking"]["backend"] == "uffd-wp"
    text = run_applier("check")
    assert text.returncode == 0 and "apply and dirty tracking work here" in text.stdout
    assert check_cmd.exit_status({"apply": True, "kernel_tracking": False}) == 1
    assert check_cmd.exit_status({"apply": False, "kernel_tracking": True}) == EXIT_TARGET


@pytest.mark.crit
def test_crit_x_reads_our_dumps(target: Target, tmp_path: Path) -> None:
    """crit x ps, mems and rss run on an applier dump (the root's ppid is 0, as in CRIU)."""
    ckpt = tmp_path / "ckpt"
    dump(target.pid, ckpt)
    for what in ("ps", "mems", "rss"):
        out = subprocess.run(
            ["crit", "x", str(ckpt), what], capture_output=True, text=True, check=False
        )
        assert out.returncode == 0, f"crit x {what}: {out.stderr}"
        assert str(target.pid) in out.stdout
    mems = subprocess.run(["crit", "x", str(ckpt), "mems"], capture_output=True, text=True,
                          check=True).stdout  # fmt: skip
    assert "[stack" in mems and "[vsyscall]" in mems

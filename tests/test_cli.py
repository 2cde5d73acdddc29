"""The command line: dump, diff, apply; one-line errors with documented exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.procs import Target, assert_untouched, build_c, run_applier, spawn

pytestmark = pytest.mark.live


def scribble(t: Target) -> None:
    t.send("scribble")
    t.expect("done")
    t.wait_in_syscall(0)


def test_dump_diff_apply_round_trip(target: Target, tmp_path: Path) -> None:
    """dump, then diff shows changes, apply --json reports them, diff afterwards shows none."""
    ckpt = tmp_path / "ckpt"
    out = run_applier("dump", str(ckpt), "--from", str(target.pid))
    assert out.returncode == 0, out.stderr
    assert f"dumped pid {target.pid}" in out.stdout
    scribble(target)
    d = run_applier("diff", str(ckpt), "--against", str(target.pid), "--json")
    assert d.returncode == 1, d.stderr  # as diff(1): different
    planned = json.loads(d.stdout)
    assert planned["differs"] is True and planned["compared"] is True
    assert planned["summary"]["pages_to_write"] > 0 and planned["summary"]["layout_changes"] > 0
    a = run_applier("apply", str(ckpt), "--into", str(target.pid), "--json")
    assert a.returncode == 0, a.stderr
    result = json.loads(a.stdout)
    assert result["stats"]["verified"] is True
    # apply writes every saved page; diff counted those that differ
    assert result["stats"]["pages_written"] >= planned["summary"]["pages_to_write"]
    after = run_applier("diff", str(ckpt), "--against", str(target.pid), "--json")
    assert after.returncode == 0, after.stdout  # the same now
    again = json.loads(after.stdout)
    assert again["differs"] is False and again["steps"] == []
    assert again["summary"]["layout_changes"] == 0 and again["summary"]["pages_to_discard"] == 0
    assert again["summary"]["pages_unchanged"] > 0
    assert_untouched(target)


def test_apply_text_summary_and_dry_run(target: Target, tmp_path: Path) -> None:
    """Plain output: --dry-run prints the plan's steps; apply prints one summary line."""
    ckpt = tmp_path / "ckpt"
    assert run_applier("dump", str(ckpt), "--from", str(target.pid)).returncode == 0
    scribble(target)
    dry = run_applier("apply", str(ckpt), "--into", str(target.pid), "--dry-run")
    assert dry.returncode == 0 and "unmap" in dry.stdout and "write" in dry.stdout
    done = run_applier("apply", str(ckpt), "--into", str(target.pid))
    assert done.returncode == 0
    assert done.stdout.startswith(f"applied to pid {target.pid}:") and "(verified)" in done.stdout


def test_bad_image_exit_code_3_one_line(target: Target, tmp_path: Path) -> None:
    """A corrupt image: exit 3, one line naming the file, the target untouched."""
    ckpt = tmp_path / "ckpt"
    assert run_applier("dump", str(ckpt), "--from", str(target.pid)).returncode == 0
    mm = ckpt / f"mm-{target.pid}.img"
    mm.write_bytes(b"\x00\x00\x00\x00" + mm.read_bytes()[4:])
    out = run_applier("apply", str(ckpt), "--into", str(target.pid))
    assert out.returncode == 3
    assert out.stderr.count("\n") == 1 and f"mm-{target.pid}.img" in out.stderr
    assert_untouched(target)


def test_mismatch_exit_code_4(target: Target, tmp_path: Path) -> None:
    """An image of another process: exit 4, message names what differs."""
    ckpt = tmp_path / "ckpt"
    assert run_applier("dump", str(ckpt), "--from", str(target.pid)).returncode == 0
    with spawn(build_c("apply_target.c")) as other:
        other.expect("ready")
        other.wait_in_syscall(0)
        out = run_applier("apply", str(ckpt), "--into", str(other.pid))
        assert out.returncode == 4, out.stderr
        assert out.stderr.startswith("applier: error: ") and out.stderr.count("\n") == 1
        assert_untouched(other)


def test_no_such_process_exit_code_5(tmp_path: Path, golden_dir: Path) -> None:
    """A pid that does not exist: exit 5, one line."""
    out = run_applier("apply", str(golden_dir), "--into", str(2**22 + 3))
    assert out.returncode == 5
    assert out.stderr.count("\n") == 1 and "pid" in out.stderr


def test_usage_errors_exit_code_2(golden_dir: Path) -> None:
    """Bad arguments: argparse's exit 2 with a message; unknown --restore part named."""
    out = run_applier("apply", str(golden_dir), "--into", "abc")
    assert out.returncode == 2 and "not a process id" in out.stderr
    out = run_applier("apply", str(golden_dir), "--into", "1", "--restore", "memory,stack")
    assert out.returncode == 2 and "'stack'" in out.stderr


def test_help_lists_every_command() -> None:
    """applier --help names dump, show, diff, apply and demo."""
    out = run_applier("--help")
    assert out.returncode == 0
    for name in ("dump", "show", "diff", "apply", "demo"):
        assert name in out.stdout

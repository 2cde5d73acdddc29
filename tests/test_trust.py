"""What apply refuses before it touches anything (issue "trusts no one's image"), each on real
processes, and that the target is left as it was: an image of another process (a fork with
the same layout, a sibling task), a code page changed in the image, an image directory others
could write, pid 1 and applier's ancestors, a concurrent apply; and what diff and dry runs do
not do (inject) and what a plan reports (children left running, writes into code)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from applier.api import apply, diff
from applier.dump import dump
from applier.errors import MismatchError
from applier.trust import ProtectedTarget, UntrustedImage
from formats import names
from formats.imagefile import dump_image, load_image
from injector.maps import read_maps
from injector.session import Session
from tests.live_state import assert_same, command, snapshot
from tests.procs import Target, assert_untouched, build_c, run_applier, spawn

pytestmark = pytest.mark.live

FORKER = r"""
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <signal.h>
static char data[8192] = "parent data";
int main(void) {
    pid_t kids[2];
    for (int i = 0; i < 2; i++) {
        kids[i] = fork();
        if (kids[i] == 0) {                       /* a child: same layout, its own state */
            prctl(PR_SET_PDEATHSIG, SIGKILL);     /* it ends with the parent, however */
            snprintf(data, sizeof data, "child %d", i);
            for (;;) pause();
        }
    }
    printf("pids %d %d %d\n", getpid(), kids[0], kids[1]);
    fflush(stdout);
    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        if (!strncmp(line, "sum", 3)) { printf("sum %s\n", data); fflush(stdout); }
    }
    for (int i = 0; i < 2; i++) { kill(kids[i], 9); waitpid(kids[i], NULL, 0); }
    return 0;
}
"""


@pytest.fixture
def family(tmp_path: Path) -> Iterator[tuple[Target, int, int]]:
    """A parent and two forked children (same executable, same addresses)."""
    src = tmp_path / "forker.c"
    src.write_text(FORKER)
    with spawn(build_c(src)) as t:
        parent, a, b = (int(w) for w in t.expect("pids"))
        try:
            assert parent == t.pid
            yield t, a, b
        finally:
            for kid in (a, b):  # started by this test's target: killed by pid
                with contextlib.suppress(ProcessLookupError):
                    os.kill(kid, signal.SIGKILL)


def _running(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2] in "RS"


def test_image_of_another_process_is_refused(
    family: tuple[Target, int, int], tmp_path: Path
) -> None:
    """The parent's image into a forked child (the same layout): exit 4 naming both pids;
    --other-process applies it."""
    t, child, other = family
    image = tmp_path / "parent"
    dump(t.pid, image)
    out = run_applier("apply", str(image), "--into", str(child))
    assert out.returncode == 4 and out.stderr.count("\n") == 1
    assert f"the image is of pid {t.pid}, not {child}" in out.stderr
    assert _running(child)
    ok = run_applier("apply", str(image), "--into", str(other), "--other-process")
    assert ok.returncode == 0, ok.stderr
    assert _running(other)


def test_reused_pid_is_caught_by_start_time(target: Target, tmp_path: Path) -> None:
    """An image whose dump_uptime is older than the target's start: another process."""
    image = tmp_path / "ckpt"
    dump(target.pid, image)
    (inv,) = load_image(image / names.INVENTORY)[1]
    assert inv.dump_uptime is not None  # applier dump records it, as CRIU's --track-mem does
    inv.dump_uptime = 1000  # a millisecond after boot: before the target started
    dump_image(image / names.INVENTORY, "INVENTORY", [inv])
    with pytest.raises(MismatchError, match=r"started .* after the image .* reused pid"):
        apply(image, target.pid)
    assert_untouched(target)


def test_code_page_that_differs_from_the_file_is_refused(target: Target, tmp_path: Path) -> None:
    """A pagemap entry moved onto the executable's text page: refused before any write
    (exit 4), the plan flags the write into code; --write-code writes it."""
    image = tmp_path / "ckpt"
    dump(target.pid, image)
    exe = os.readlink(f"/proc/{target.pid}/exe")
    text = next(m for m in read_maps(target.pid) if m.executable and m.path == exe)
    pm_path = image / names.pagemap(target.pid)
    magic, entries = load_image(pm_path)
    # the first saved run beyond the text moves onto the text page (its data: not code)
    moved = next(e for e in entries[1:] if e.vaddr > text.end)
    moved.vaddr, moved.compat_nr_pages, moved.nr_pages = text.start, 1, 1
    entries[1:] = sorted(entries[1:], key=lambda e: e.vaddr)
    dump_image(pm_path, magic, entries)
    changed = snapshot(target.pid)
    out = run_applier("apply", str(image), "--into", str(target.pid), "--dry-run")
    assert out.returncode == 4, out.stderr  # refused in a dry run too, before the plan
    assert f"code pages of {exe}" in out.stderr and "--write-code" in out.stderr
    out = run_applier("apply", str(image), "--into", str(target.pid))
    assert out.returncode == 4 and out.stderr.count("\n") == 1
    assert_same(changed, snapshot(target.pid))
    flagged = run_applier(
        "apply", str(image), "--into", str(target.pid), "--dry-run", "--write-code", "--json"
    )
    assert flagged.returncode == 0, flagged.stderr
    plan = json.loads(flagged.stdout)
    (write,) = (st for st in plan["steps"] if st["op"] == "write")
    assert write["code"][0] == {"start": f"{text.start:#x}", "end": f"{text.start + 4096:#x}",
                                "path": exe}  # fmt: skip
    assert any("into executable memory" in n for n in plan["notes"])
    assert_same(changed, snapshot(target.pid))
    assert_untouched(target)


def test_image_writable_by_others_is_refused(target: Target, tmp_path: Path) -> None:
    """An image directory of mode 777, a file of another owner, a parent snapshot in a
    group-writable directory: each refused naming the path (exit 3); --trust-image uses it."""
    shared = tmp_path / "shared"
    shared.mkdir()
    image = shared / "ckpt"
    dump(target.pid, image)
    image.chmod(0o777)
    out = run_applier("apply", str(image), "--into", str(target.pid))
    assert out.returncode == 3 and "writable by others (mode 777)" in out.stderr
    image.chmod(0o755)
    mm = image / names.mm(target.pid)
    os.chown(mm, 65534, 65534)
    out = run_applier("apply", str(image), "--into", str(target.pid))
    assert out.returncode == 3 and "owned by uid 65534" in out.stderr and mm.name in out.stderr
    os.chown(mm, 0, 0)
    layer = tmp_path / "layer"  # a layer whose parent lies in a group-writable directory
    shutil.copytree(image, layer)
    (layer / names.PARENT).symlink_to(image)
    shared.chmod(0o775)
    out = run_applier("apply", str(layer), "--into", str(target.pid))
    assert out.returncode == 3 and "parent snapshot lies in" in out.stderr, out.stderr
    ok = run_applier("apply", str(layer), "--into", str(target.pid), "--trust-image")
    assert ok.returncode == 0, ok.stderr
    assert_untouched(target)


def test_system_and_own_processes_are_refused_unless_forced(tmp_path: Path) -> None:
    """pid 1, applier's own parent (this test) are refused before they are stopped."""
    with pytest.raises(ProtectedTarget, match="pid 1 is the init process"):
        dump(1, tmp_path / "init")
    with pytest.raises(ProtectedTarget, match=r"ancestor of applier|applier's own"):
        dump(os.getpid(), tmp_path / "self")
    out = run_applier("dump", str(tmp_path / "me"), "--from", str(os.getpid()))
    assert out.returncode == 2 and "an ancestor of applier" in out.stderr


def test_untrusted_undo_directory_is_refused(target: Target, tmp_path: Path) -> None:
    """--undo into a directory others can write: refused (exit 3)."""
    image = tmp_path / "ckpt"
    dump(target.pid, image)
    shared = tmp_path / "open"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(UntrustedImage, match="undo directory"):
        apply(image, target.pid, undo_dir=shared / "undo")
    assert_untouched(target)


def test_concurrent_apply_names_the_other_applier(target: Target, tmp_path: Path) -> None:
    """A second apply while one runs: exit 5, naming the first applier (not gdb)."""
    image = tmp_path / "ckpt"
    dump(target.pid, image)
    from applier.lock import TargetLock  # noqa: PLC0415

    with TargetLock.acquire(target.pid, "work", f"applying {image}"):
        out = run_applier("apply", str(image), "--into", str(target.pid))
    assert out.returncode == 5 and out.stderr.count("\n") == 1
    assert f"pid {target.pid} is busy: applying {image} by applier pid {os.getpid()}" in (
        out.stderr
    )
    assert "gdb" not in out.stderr
    assert_untouched(target)


def test_diff_and_dry_run_inject_nothing(
    target: Target, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """diff and --dry-run run no system call in the target (the break is read to the page,
    from [heap]); the apply that follows does."""
    image = tmp_path / "ckpt"
    dump(target.pid, image)
    command(target, "scribble", "done")  # the heap grew, among others
    calls: list[int] = []
    real = Session.syscalls

    def recording(
        self: Session, batch: Sequence[tuple[int, tuple[int, ...]]], *, tid: int | None = None
    ) -> list[int]:
        calls.extend(nr for nr, _ in batch)
        return real(self, batch, tid=tid)

    monkeypatch.setattr(Session, "syscalls", recording)  # every injection goes through it
    plan = diff(image, target.pid)
    assert any(s.op == "brk" for s in plan.steps)
    dry = apply(image, target.pid, dry_run=True).plan
    assert any(s.op == "brk" for s in dry.steps)
    assert calls == []
    apply(image, target.pid)
    assert calls  # the real apply injects (brk, munmap, ...)
    assert_untouched(target)


def test_children_started_since_are_reported(
    family: tuple[Target, int, int], tmp_path: Path
) -> None:
    """The family's children are not in the parent's image: the plan names each."""
    t, a, b = family
    image = tmp_path / "parent"
    dump(t.pid, image)
    plan = diff(image, t.pid)
    assert set(plan.children) == {a, b}
    assert sum(f"child process {p}" in n for n in plan.notes for p in (a, b)) == 2
    out = run_applier("apply", str(image), "--into", str(t.pid), "--dry-run", "--json")
    assert json.loads(out.stdout)["summary"]["children_left_running"] == 2
    res = apply(image, t.pid)
    assert set(res.plan.children) == {a, b}
    time.sleep(0.05)
    assert _running(a) and _running(b)

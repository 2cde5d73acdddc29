"""``applier show``: text and JSON description of an image directory."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from applier.cli import show
from formats.errors import ImageError
from formats.imagewriter import ImageWriter, anon_vma, regular_file, x86_core
from formats.inventory import InventoryEntry, PstreeEntry
from formats.mm import MmEntry
from formats.pagemap import PE_LAZY, PE_PARENT, PE_PRESENT

P = 4096
BASE = 0x7F0000000000


def _run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="applier")
    show.register(parser.add_subparsers())
    args = parser.parse_args(["show", *argv])
    result: int = args.func(args)
    return result


def test_golden_text(golden_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Text output lists threads with ip/sp, VMA kinds and files, page counts, pages file."""
    assert _run(str(golden_dir)) == 0
    out = capsys.readouterr().out
    assert "process 27235 (ppid 0, pgid 27235, sid 27235) exe /tmp/golden/golden" in out
    assert "thread 27237 X86_64 ip 0x7f0574412545 sp 0x7f05742ede50" in out
    assert "pages-1.img: 487424 bytes" in out
    assert (
        "0x0000555daf5ac000-0x0000555daf5cd000 rw-p heap  runs 1: present 2, parent 0, lazy 2"
        in out
    )
    assert "r-xp file-private /usr/lib/x86_64-linux-gnu/libc.so.6" in out
    for kind in ("vdso", "vvar", "vsyscall", "stack"):
        assert f" {kind}" in out


def test_text_columns_align_totals_and_legend(
    golden_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every VMA row starts its prot column at the same place (vsyscall too), totals and the
    column legend are printed."""
    assert _run(str(golden_dir)) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("  0x")]
    assert len(rows) == 27
    assert {row.index(" ", 3) for row in rows} == {39}  # "  START-END " is 39 chars wide
    assert any("0xffffffffff600000-0xffffffffff601000 --xp vsyscall" in r for r in rows)
    assert "pages: 119 present (0.5 MiB), 0 in a parent, 104 lazy" in out
    assert out.rstrip().endswith("a subset of PRESENT)") and "columns: START-END" in out


def test_threads_name_the_syscall_they_were_stopped_in(
    golden_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Both golden threads slept in clock_nanosleep: show names it, with its arguments."""
    assert _run("--json", str(golden_dir)) == 0
    doc = json.loads(capsys.readouterr().out)
    calls = [t["syscall"] for t in doc["processes"][0]["threads"]]
    assert all(c.startswith("clock_nanosleep(which_clock=0, flags=0, rqtp=0x7f") for c in calls)
    assert doc["totals"] == {
        "pages_present": 119, "pages_in_parent": 0, "pages_lazy": 104, "bytes_present": 487424
    }  # fmt: skip


def test_two_vvar_areas_are_one_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Linux 6.13+ has [vvar] and [vvar_vclock] side by side: one vvar row, 2 areas."""
    from formats.mm import VmaEntry, VmaStatus  # noqa: PLC0415

    vvar = VmaStatus.REGULAR | VmaStatus.ANON_PRIVATE | VmaStatus.VVAR
    areas = [
        VmaEntry(start=BASE + a, end=BASE + b, pgoff=0, shmid=0, prot=1, flags=0x22,
                 status=vvar, fd=-1)
        for a, b in ((0, 4 * P), (4 * P, 6 * P))
    ]  # fmt: skip
    mm = MmEntry(exe_file_id=1, vmas=[anon_vma(BASE - 2 * P, BASE), *areas])
    with ImageWriter(tmp_path) as w:
        w.add_file(regular_file(1, "/bin/app"))
        w.add_process(PstreeEntry(pid=1, ppid=0, pgid=1, sid=1, threads=[1]), mm=mm,
                      cores={1: x86_core(0x400000, BASE)}, runs=[])  # fmt: skip
    assert _run(str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert out.count(" vvar") == 1
    assert f"{BASE:#018x}-{BASE + 6 * P:#018x} r--p vvar (2 areas)" in out


def test_golden_json(golden_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--json prints one document with the same facts."""
    assert _run("--json", str(golden_dir)) == 0
    doc = json.loads(capsys.readouterr().out)
    (proc,) = doc["processes"]
    assert [t["tid"] for t in proc["threads"]] == [27235, 27237]
    assert proc["threads"][0]["sp"] == "0x7ffe5ba2ab50"
    assert doc["pages_files"] == [{"path": str(golden_dir / "pages-1.img"), "size": 487424}]
    assert len(proc["vmas"]) == 27
    total = sum(v["pages"]["present"] for v in proc["vmas"])
    assert total * P == 487424
    stack = next(v for v in proc["vmas"] if v["kind"] == "stack")
    assert stack["pages"] == {"runs": 1, "present": 3, "parent": 0, "lazy": 3}


def test_parent_counts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """In-parent pages are counted per VMA, and the parent's pages file is listed."""
    pstree = PstreeEntry(pid=1, ppid=0, pgid=1, sid=1, threads=[1])
    mm = MmEntry(exe_file_id=1, vmas=[anon_vma(BASE, BASE + 4 * P)])
    for name, runs, parent in (
        ("1", [(BASE, 3, PE_PRESENT, b"x" * 3 * P)], None),
        ("2", [(BASE, 2, PE_PARENT, None), (BASE + 2 * P, 1, PE_PRESENT | PE_LAZY, b"y" * P)],
         "../1"),
    ):  # fmt: skip
        with ImageWriter(tmp_path / name, parent=parent) as w:
            w.add_file(regular_file(1, "/bin/app"))
            w.add_process(pstree, mm=mm, cores={1: x86_core(0x400000, BASE)}, runs=runs)
    assert _run("--json", str(tmp_path / "2")) == 0
    doc = json.loads(capsys.readouterr().out)
    (vma,) = doc["processes"][0]["vmas"]
    assert vma["pages"] == {"runs": 2, "present": 1, "parent": 2, "lazy": 1}
    assert [p["size"] for p in doc["pages_files"]] == [3 * P, P]
    assert doc["processes"][0]["exe"] == "/bin/app"


def test_bad_image_raises_image_error(tmp_path: Path) -> None:
    """A broken directory raises ImageError (cli.py turns it into one line, exit 3)."""
    with ImageWriter(tmp_path) as w:
        w.add_process(PstreeEntry(pid=1, ppid=0, pgid=1, sid=1, threads=[1]),
                      cores={1: x86_core(0, 0)})  # fmt: skip
        w.finish(InventoryEntry(img_version=9, fdinfo_per_id=True))
    with pytest.raises(ImageError, match="img_version 9"):
        _run(str(tmp_path))

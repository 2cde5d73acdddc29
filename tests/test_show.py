"""``applier show``: text and JSON description of an image directory."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from applier import show
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
    assert "0x555daf5ac000-0x555daf5cd000     rw-p heap  runs 1: present 2, parent 0, lazy 2" in out
    assert "r-xp file-private /usr/lib/x86_64-linux-gnu/libc.so.6" in out
    for kind in ("vdso", "vvar", "vsyscall", "stack"):
        assert f" {kind}" in out


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

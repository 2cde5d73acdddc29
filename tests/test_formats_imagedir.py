"""Image directories: the golden dump's buffers, ImageWriter round trips, the parent chain."""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from formats.errors import ImageError
from formats.imagedir import ImageDir, PageRun
from formats.imagefile import dump_image
from formats.imagewriter import ImageWriter, PageData, anon_vma, regular_file, x86_core
from formats.inventory import InventoryEntry, PstreeEntry
from formats.mm import MmEntry, VmaEntry
from formats.pagemap import PE_LAZY, PE_PARENT, PE_PRESENT

P = 4096
BASE = 0x7F0000000000


def read_memory(runs: list[PageRun], addr: int, size: int) -> bytes | None:
    """Bytes at [addr, addr+size) through the resolved runs; None if any page is missing."""
    out = bytearray()
    while size:
        run = next((r for r in runs if r.vaddr <= addr < r.vaddr + r.nr_pages * P), None)
        if run is None:
            return None
        take = min(size, run.vaddr + run.nr_pages * P - addr)
        out += run.pages.view(run.offset + addr - run.vaddr, take)
        addr, size = addr + take, size - take
    return bytes(out)


def _info(golden_dir: Path) -> dict[str, tuple[int, int]]:
    """name -> (address, size) from basic-criu-4.2.info.txt."""
    text = (golden_dir.parent / "basic-criu-4.2.info.txt").read_text()
    out = {}
    for name, addr, count, unit in re.findall(r"^(\w+) (0x[0-9a-f]+) (\d+) (pages?|bytes)", text,
                                              re.M):  # fmt: skip
        out[name] = (int(addr, 16), int(count) * (P if unit.startswith("page") else 1))
    return out


def _anon_page(i: int) -> bytes:
    page = bytearray(b"\xa1" * P)
    page[:8] = (0x1000 + i // P).to_bytes(8, "little")
    return bytes(page)


# Expected contents, as basic-criu-4.2.info.txt describes them.
_EXPECTED: dict[str, Callable[[int], bytes]] = {
    "data_buf": lambda n: bytes(ord("D") + i % 7 for i in range(n)),
    "heap": lambda n: bytes(0x5A ^ (i & 0xFF) for i in range(n)),
    "anon": lambda n: b"".join(_anon_page(i * P) for i in range(n // P)),
    "ro": lambda n: b"\xc3" * n,
}


def test_golden_buffers_through_page_runs(golden_dir: Path) -> None:
    """Every buffer of the info file holds the expected bytes at the expected address."""
    img = ImageDir.open(golden_dir)
    info = _info(golden_dir)
    assert set(info) == {"data_buf", "heap", "anon", "sparse", "ro"}
    pid = img.root_pid
    assert (pid, img.page_size) == (27235, 4096)
    runs = img.page_runs(pid)
    for name, make in _EXPECTED.items():
        addr, size = info[name]
        assert read_memory(runs, addr, size) == make(size), name
    addr, size = info["sparse"]
    for page in range(size // P):
        got = read_memory(runs, addr + page * P, P)
        assert got == (bytes([0xB0 + page]) * P if page % 2 == 0 else None), page


def test_golden_structure(golden_dir: Path) -> None:
    """pstree, threads, registers, exe and VMA files of the golden dump."""
    img = ImageDir.open(golden_dir)
    assert [p.threads for p in img.pstree] == [[27235, 27237]]
    assert img.inventory.img_version == 2
    assert img.exe_path(27235) == "/tmp/golden/golden"
    core = img.core(27237)
    assert core.thread_info is not None
    assert (core.thread_info.gpregs.ip, core.thread_info.gpregs.sp) == (
        0x7F0574412545, 0x7F05742EDE50,
    )  # fmt: skip
    mm = img.mm(27235)
    kinds = {v.kind() for v in mm.vmas}
    assert {"heap", "stack", "vdso", "vvar", "vsyscall", "file-private", "anon"} <= kinds
    libc = [img.vma_path(27235, v) for v in mm.vmas if v.shmid == 2]
    assert libc == ["/usr/lib/x86_64-linux-gnu/libc.so.6"] * 5
    assert img.vma_path(27235, mm.vmas[5]) is None
    runs = img.page_runs(27235)
    assert sum(r.nr_pages for r in runs) * P == 487424
    assert all(a.vaddr + a.nr_pages * P <= b.vaddr for a, b in itertools.pairwise(runs))


def _proc(path: Path, runs: list[PageData], *, parent: str | None = None,
          vmas: list[VmaEntry] | None = None, version: int = 2) -> None:  # fmt: skip
    """A pid-1 dump (or, with version 0, a pre-dump dir with only inventory + pagemap)."""
    w = ImageWriter(path, parent=parent)
    if version == 0:
        w.write_pagemap("pagemap-1.img", runs)
        dump_image(path / "inventory.img", "INVENTORY", [InventoryEntry(img_version=0)])
        return
    w.add_file(regular_file(1, "/bin/app"))
    mm = MmEntry(exe_file_id=1, mm_saved_auxv=[6, P, 0, 0],
                 vmas=vmas or [anon_vma(BASE, BASE + 16 * P)])  # fmt: skip
    w.add_process(PstreeEntry(pid=1, ppid=0, pgid=1, sid=1, threads=[1]), mm=mm,
                  cores={1: x86_core(0x401000, BASE)}, runs=runs)  # fmt: skip
    w.finish()


def test_writer_round_trip(tmp_path: Path) -> None:
    """ImageWriter output opens again with the same runs, bytes, registers and files."""
    _proc(tmp_path, [(BASE, 2, PE_PRESENT | PE_LAZY, b"a" * P + b"b" * P),
                     (BASE + 5 * P, 1, PE_PRESENT, b"c" * P)])  # fmt: skip
    img = ImageDir.open(tmp_path)
    assert img.exe_path(1) == "/bin/app"
    assert img.core(1).ip_sp() == (0x401000, BASE)
    runs = img.page_runs(1)
    assert [(r.vaddr, r.nr_pages, r.lazy, r.offset) for r in runs] == [
        (BASE, 2, True, 0), (BASE + 5 * P, 1, False, 2 * P),
    ]  # fmt: skip
    assert read_memory(runs, BASE + P - 1, 2) == b"ab"
    assert bytes(runs[1].view(P)) == b"c" * P
    assert {p.name for p in tmp_path.iterdir()} == {
        "inventory.img", "pstree.img", "files.img", "mm-1.img", "core-1.img", "pagemap-1.img",
        "pages-1.img",
    }  # fmt: skip


def test_parent_chain_resolution_with_split_holes(tmp_path: Path) -> None:
    """A hole splits over several parent entries, one of which is itself a hole (3 levels)."""
    _proc(tmp_path / "1", [(BASE, 4, PE_PRESENT, b"1" * 4 * P)], version=0)
    _proc(tmp_path / "2", [(BASE, 1, PE_PRESENT, b"2" * P), (BASE + P, 2, PE_PARENT, None),
                           (BASE + 3 * P, 1, PE_PRESENT | PE_LAZY, b"3" * P)],
          parent="../1", version=0)  # fmt: skip
    _proc(tmp_path / "3", [(BASE, 4, PE_PARENT, None), (BASE + 4 * P, 1, PE_PRESENT, b"4" * P)],
          parent="../2")  # fmt: skip
    img = ImageDir.open(tmp_path / "3")
    runs = img.page_runs(1)
    assert [(r.vaddr - BASE) // P for r in runs] == [0, 1, 3, 4]
    assert [r.pages.path.parent.name for r in runs] == ["2", "1", "2", "3"]
    assert [r.offset for r in runs] == [0, P, P, 0]
    assert [r.lazy for r in runs] == [False, False, True, False]
    assert read_memory(runs, BASE, 5 * P) == b"2" * P + b"1" * 2 * P + b"3" * P + b"4" * P
    assert img.pagemap(1).flags.tolist() == [PE_PARENT, PE_PRESENT]


def test_doc_incremental_example(tmp_path: Path) -> None:
    """Section 7's incremental example: H and A from the parent, C local, one page absent."""
    _proc(tmp_path / "dump", [(0x601000, 1, 6, b"H" * P), (BASE, 2, 6, b"A" * P + b"B" * P)],
          vmas=[anon_vma(0x601000, 0x602000, heap=True), anon_vma(BASE, BASE + 3 * P)])  # fmt: skip
    _proc(tmp_path / "dump2", [(0x601000, 1, PE_PARENT, None), (BASE, 1, PE_PARENT, None),
                               (BASE + P, 1, 6, b"C" * P)], parent="../dump",
          vmas=[anon_vma(0x601000, 0x602000, heap=True), anon_vma(BASE, BASE + 3 * P)])  # fmt: skip
    runs = ImageDir.open(tmp_path / "dump2").page_runs(1)
    assert read_memory(runs, 0x601000, 1) == b"H"
    assert read_memory(runs, BASE, 2 * P) == b"A" * P + b"C" * P
    assert read_memory(runs, BASE + 2 * P, 1) is None


def test_missing_parent_link(tmp_path: Path) -> None:
    """PE_PARENT entries without a parent link: ImageError naming the pagemap and entry."""
    _proc(tmp_path, [(BASE, 1, PE_PARENT, None)])
    with pytest.raises(ImageError, match=r"no \(valid\) parent link") as info:
        ImageDir.open(tmp_path)
    assert "pagemap-1.img" in str(info.value)


def test_missing_parent_pagemap(tmp_path: Path) -> None:
    """A parent directory without the pagemap is an error naming the missing file."""
    (tmp_path / "1").mkdir()
    _proc(tmp_path / "2", [(BASE, 1, PE_PARENT, None)], parent="../1")
    with pytest.raises(ImageError, match="PE_PARENT entries of") as info:
        ImageDir.open(tmp_path / "2")
    assert str(tmp_path / "1" / "pagemap-1.img") in str(info.value)


def test_parent_chain_loop(tmp_path: Path) -> None:
    """A parent chain that comes back to a directory already visited is rejected."""
    _proc(tmp_path / "a", [(BASE, 1, PE_PARENT, None)], parent="../b")
    _proc(tmp_path / "b", [(BASE, 1, PE_PARENT, None)], parent="../a", version=0)
    with pytest.raises(ImageError, match="parent chain loops") as info:
        ImageDir.open(tmp_path / "a")
    assert "b/parent" in str(info.value)


def test_unresolvable_hole(tmp_path: Path) -> None:
    """A hole the parent covers only partly names the child's pagemap entry."""
    _proc(tmp_path / "1", [(BASE, 1, PE_PRESENT, b"x" * P), (BASE + 2 * P, 1, 4, b"y" * P)],
          version=0)  # fmt: skip
    _proc(tmp_path / "2", [(BASE, 3, PE_PARENT, None)], parent="../1")
    with pytest.raises(ImageError, match="are not all in the parent") as info:
        ImageDir.open(tmp_path / "2")
    assert info.value.entry == 1
    assert f"{tmp_path / '2' / 'pagemap-1.img'} at byte" in str(info.value)


def test_top_img_version_checked(tmp_path: Path) -> None:
    """Unknown img_version or missing fdinfo_per_id at the top is rejected."""
    _proc(tmp_path, [])
    dump_image(tmp_path / "inventory.img", "INVENTORY",
               [InventoryEntry(img_version=3, fdinfo_per_id=True)])  # fmt: skip
    with pytest.raises(ImageError, match="unsupported img_version 3") as info:
        ImageDir.open(tmp_path)
    assert "inventory.img" in str(info.value)
    dump_image(tmp_path / "inventory.img", "INVENTORY", [InventoryEntry(img_version=0)])
    with pytest.raises(ImageError, match="unsupported img_version 0"):
        ImageDir.open(tmp_path)
    dump_image(tmp_path / "inventory.img", "INVENTORY", [InventoryEntry(img_version=2)])
    with pytest.raises(ImageError, match="fdinfo_per_id"):
        ImageDir.open(tmp_path)


def test_parent_img_version_0_tolerated_but_unknown_rejected(tmp_path: Path) -> None:
    """Pre-dump parents (img_version 0, no fdinfo_per_id) are fine; version 7 is not."""
    _proc(tmp_path / "1", [(BASE, 1, PE_PRESENT, b"p" * P)], version=0)
    _proc(tmp_path / "2", [(BASE, 1, PE_PARENT, None)], parent="../1")
    assert read_memory(ImageDir.open(tmp_path / "2").page_runs(1), BASE, 1) == b"p"
    dump_image(tmp_path / "1" / "inventory.img", "INVENTORY", [InventoryEntry(img_version=7)])
    with pytest.raises(ImageError, match="unsupported img_version 7"):
        ImageDir.open(tmp_path / "2")


def test_shmem_page_runs(tmp_path: Path) -> None:
    """pagemap-shmem-<id>.img resolves like a task pagemap, vaddr = offset in the object."""
    _proc(tmp_path, [])
    ImageWriter(tmp_path).write_shmem_pagemap(77, [(0, 1, PE_PRESENT, b"s" * P),
                                                   (2 * P, 1, PE_PRESENT, b"t" * P)])  # fmt: skip
    img = ImageDir.open(tmp_path)
    runs = img.shmem_page_runs(77)
    assert [(r.vaddr, r.nr_pages, r.offset) for r in runs] == [(0, 1, 0), (2 * P, 1, P)]
    assert bytes(runs[1].view(P)) == b"t" * P
    with pytest.raises(ImageError, match=re.escape("pagemap-shmem-78.img")):
        img.shmem_page_runs(78)


def test_not_a_directory_and_missing_core(tmp_path: Path) -> None:
    """A missing directory or core image is an ImageError naming the path."""
    with pytest.raises(ImageError, match="not an image directory"):
        ImageDir.open(tmp_path / "nope")
    _proc(tmp_path, [])
    os.unlink(tmp_path / "core-1.img")
    with pytest.raises(ImageError, match=re.escape("core-1.img")):
        ImageDir.open(tmp_path)


def test_run_outside_vma_rejected_at_open(tmp_path: Path) -> None:
    """ImageDir.open checks the pagemap against the mm image's private VMAs."""
    _proc(tmp_path, [(BASE + 20 * P, 1, PE_PRESENT, b"z" * P)])
    with pytest.raises(ImageError, match=re.escape("outside every private VMA of mm-1.img")):
        ImageDir.open(tmp_path)


def test_pages_views_do_not_read_the_file(tmp_path: Path) -> None:
    """A huge sparse pages file opens without reading it; views map only what is asked."""
    _proc(tmp_path, [(BASE, 1, PE_PRESENT, b"q" * P)])
    with (tmp_path / "pages-1.img").open("r+b") as fh:
        fh.truncate(8 << 30)  # 8 GiB, sparse
    img = ImageDir.open(tmp_path)
    run = img.page_runs(1)[0]
    assert run.pages.size == 8 << 30
    assert bytes(run.view(P)) == b"q" * P
    with pytest.raises(ImageError, match="outside the file"):
        run.pages.view((8 << 30) - 1, 2)
    img.close()


def test_legacy_vmas_image(tmp_path: Path) -> None:
    """An mm image without VMAs takes them from the legacy vmas-<pid>.img."""
    _proc(tmp_path, [(BASE, 1, PE_PRESENT, b"v" * P)])
    mm_path = tmp_path / "mm-1.img"
    dump_image(mm_path, "MM", [MmEntry(exe_file_id=1)])
    dump_image(tmp_path / "vmas-1.img", "VMAS", [anon_vma(BASE, BASE + 2 * P)])
    img = ImageDir.open(tmp_path)
    assert [(v.start, v.end) for v in img.mm(1).vmas] == [(BASE, BASE + 2 * P)]
    assert img.page_size == P  # no auxv: the default


def test_img_version_1_directory_without_common_magic(tmp_path: Path) -> None:
    """A pre-1.6 directory (img_version 1, no common magic in any file) opens."""
    _proc(tmp_path, [(BASE, 1, PE_PRESENT, b"o" * P)])
    common = (0x54564319).to_bytes(4, "little")
    for image in tmp_path.glob("*.img"):
        data = image.read_bytes()
        if data.startswith(common):
            image.write_bytes(data[4:])
    dump_image(tmp_path / "inventory.img", "INVENTORY",
               [InventoryEntry(img_version=1, fdinfo_per_id=True)])  # fmt: skip
    img = ImageDir.open(tmp_path)
    assert img.inventory.img_version == 1
    assert read_memory(img.page_runs(1), BASE, 2) == b"oo"

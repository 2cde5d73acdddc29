"""Shared anonymous and memfd memory: dumped to pagemap-shmem, written back through the live
mapping, holes punched again; refused without pagemap-shmem unless --leave-shared."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from applier.api import apply
from applier.dump import dump
from applier.errors import MismatchError
from injector import attach
from tests.procs import Target, assert_untouched, build_c, spawn

pytestmark = pytest.mark.live
PAGE = 4096


@pytest.fixture
def target() -> Iterator[tuple[Target, int, int]]:
    with spawn(build_c("shared_target.c")) as t:
        shm, mfd = (int(x, 16) for x in t.expect("ready"))
        yield t, shm, mfd


def ask(t: Target, line: str, key: str) -> list[str]:
    t.send(line)
    return t.expect(key)


def read(pid: int, addr: int, size: int) -> bytes:
    with attach(pid) as s:
        return s.read(addr, size)


def data_pages(pid: int, addr: int, pages: int) -> list[int]:
    """Page indexes of the object behind the mapping at ``addr`` that hold data (not holes)."""
    path = next(
        f"/proc/{pid}/map_files/{n}" for n in os.listdir(f"/proc/{pid}/map_files")
        if int(n.split("-")[0], 16) == addr
    )  # fmt: skip
    fd = os.open(path, os.O_RDONLY)
    try:
        out: list[int] = []
        pos = 0
        while pos < pages * PAGE:
            try:
                pos = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, pos, os.SEEK_HOLE)
            out += range(pos // PAGE, min(end, pages * PAGE) // PAGE)
            pos = end
        return out
    finally:
        os.close(fd)


def test_shared_memory_round_trip(target: tuple[Target, int, int], tmp_path: Path) -> None:
    """Shared and memfd contents come back byte for byte, and former holes are holes again."""
    t, shm, mfd = target
    # Holes first: reading a hole of a shmem object (even just to compare) allocates it.
    assert data_pages(t.pid, shm, 8) == [0, 2]
    dump(t.pid, tmp_path / "ckpt")
    (checksum,) = ask(t, "sum", "sum")
    before = read(t.pid, shm, 8 * PAGE), read(t.pid, mfd, 4 * PAGE)
    shmem_images = sorted(p.name for p in (tmp_path / "ckpt").glob("pagemap-shmem-*.img"))
    assert len(shmem_images) == 2
    for name in shmem_images:  # Debian's crit decodes them too
        subprocess.run(["crit", "decode", "-i", str(tmp_path / "ckpt" / name)], check=True,
                       capture_output=True)  # fmt: skip
    ask(t, "scribble", "done")
    assert data_pages(t.pid, shm, 8) == list(range(8))
    result = apply(tmp_path / "ckpt", t.pid)
    assert result.stats.verified
    assert data_pages(t.pid, shm, 8) == [0, 2]
    assert data_pages(t.pid, mfd, 4) == [1]
    assert (read(t.pid, shm, 8 * PAGE), read(t.pid, mfd, 4 * PAGE)) == before
    assert ask(t, "sum", "sum") == [checksum]
    assert_untouched(t)


def test_shared_memory_without_pagemap_shmem(
    target: tuple[Target, int, int], tmp_path: Path
) -> None:
    """No pagemap-shmem in the image: refused by default; --leave-shared applies the rest."""
    t, shm, _ = target
    dump(t.pid, tmp_path / "ckpt")
    for p in (tmp_path / "ckpt").glob("pagemap-shmem-*.img"):
        p.unlink()
    ask(t, "scribble", "done")
    scribbled = read(t.pid, shm, 8 * PAGE)
    with pytest.raises(MismatchError, match="--leave-shared"):
        apply(tmp_path / "ckpt", t.pid)
    assert read(t.pid, shm, 8 * PAGE) == scribbled
    result = apply(tmp_path / "ckpt", t.pid, leave_shared=True)
    assert any("--leave-shared" in n for n in result.plan.notes)
    assert read(t.pid, shm, 8 * PAGE) == scribbled
    assert_untouched(t)

"""Reading and writing a stopped process's memory, and its maps, smaps and pagemap."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np
import pytest

from injector import MemoryAccessError, attach
from injector import maps as maps_module
from injector._libc import memequal_rows
from injector.maps import (
    PAGEMAP_PRESENT,
    PROT_READ,
    PROT_WRITE,
    Mapping,
    parse_maps,
    parse_smaps_vmflags,
)
from injector.memory import SPLIT_BYTES, _halves, aligned_buffer
from tests.procs import Target, assert_untouched, build_c, spawn

pytestmark = pytest.mark.live

PAGE = 4096

MAPS_SAMPLE = (
    b"55d0c0a00000-55d0c0a02000 r--p 00000000 fd:01 1234                       /usr/bin/cat\n"
    b"7f0000000000-7f0000001000 rw-s 00001000 00:05 77              /dev/zero (deleted)\n"
    b"7f0000001000-7f0000002000 rw-p 00000000 00:00 0 \n"
    b"7f0000002000-7f0000003000 r-xp 00000000 08:02 99                         /tmp/a b\\012c\n"
    b"7f0000003000-7f0000004000 ---p 00000000 00:00 0\n"
    b"7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]\n"
    b"7ffd00100000-7ffd00102000 r-xp 00000000 00:00 0                          [vdso]\n"
)


@pytest.fixture(scope="module")
def target_bin() -> Path:
    return build_c("inj_target.c")


def ready(target: Target) -> tuple[int, int, int]:
    words = target.expect("ready")
    return int(words[0], 16), int(words[1], 16), int(words[2], 16)


def target_hex(target: Target, address: int, size: int) -> bytes:
    """The bytes as the target itself reads them (after the session)."""
    target.send(f"hex {address:x} {size}")
    return bytes.fromhex(target.expect("hex")[0])


def test_parse_maps_fields_spaces_deleted_and_specials() -> None:
    """/proc/PID/maps lines parse into every field, with odd paths handled."""
    cat, zero, anon, spaced, guard, stack, vdso = parse_maps(MAPS_SAMPLE)
    assert cat == Mapping(
        0x55D0C0A00000,
        0x55D0C0A02000,
        PROT_READ,
        False,
        0,
        os.makedev(0xFD, 1),
        1234,
        "/usr/bin/cat",
    )
    assert cat.perms == "r--p" and cat.is_file and not cat.is_anon
    assert zero.shared and zero.deleted and zero.path == "/dev/zero" and zero.offset == 0x1000
    assert anon.path is None and anon.is_anon and anon.prot == PROT_READ | PROT_WRITE
    assert spaced.path == "/tmp/a b\nc" and spaced.executable
    assert guard.prot == 0 and guard.perms == "---p" and guard.is_anon
    assert stack.is_special and not stack.is_anon and stack.size == 0x21000
    assert vdso.is_special and vdso.path == "[vdso]"


def test_parse_maps_reuses_the_mapping_of_a_line_seen_before(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A line parsed once is not parsed again (the same immutable Mapping comes back), a
    changed line is, and the cache starts over past its bound."""
    monkeypatch.setattr(maps_module, "_PARSED", {})
    monkeypatch.setattr(maps_module, "_PARSED_MAX", 7)  # the sample's 7 lines fill it
    first = parse_maps(MAPS_SAMPLE)
    again = parse_maps(MAPS_SAMPLE)
    assert again == first and all(a is b for a, b in zip(again, first, strict=True))
    moved = MAPS_SAMPLE.replace(
        b"7f0000001000-7f0000002000 rw-p", b"7f0000001000-7f0000002000 r--p"
    )
    changed = parse_maps(moved)
    assert changed[2].prot == PROT_READ and first[2].prot == PROT_READ | PROT_WRITE
    assert changed[0] is first[0]  # seen before the changed line filled the cache
    assert changed[3] == first[3] and changed[3] is not first[3]  # parsed again after it
    assert len(maps_module._PARSED) <= 7
    with pytest.raises(ValueError, match="unparsable"):
        parse_maps(b"hello world\n")
    assert b"hello world" not in maps_module._PARSED


def test_parse_maps_rejects_garbage() -> None:
    """A line that is not in the maps format raises ValueError naming it."""
    with pytest.raises(ValueError, match="unparsable"):
        parse_maps(b"hello world\n")


def test_parse_smaps_vmflags() -> None:
    """VmFlags lines are attributed to the mapping above them."""
    data = (
        b"7f0000001000-7f0000002000 rw-p 00000000 00:00 0 \nRss: 4 kB\nVmFlags: rd wr mr mw me ac\n"
        b"7f0000003000-7f0000004000 ---p 00000000 00:00 0\nVmFlags: mr mw me\n"
    )
    assert parse_smaps_vmflags(data) == {
        0x7F0000001000: frozenset({"rd", "wr", "mr", "mw", "me", "ac"}),
        0x7F0000003000: frozenset({"mr", "mw", "me"}),
    }


def test_live_maps_vmflags_and_pagemap(target_bin: Path) -> None:
    """Live maps show the target's test pages with the right protections; pagemap says present."""
    with spawn(target_bin) as t:
        rw, ro, none = ready(t)
        with attach(t.pid) as s:
            by_start = {m.start: m for m in s.maps()}
            assert by_start[ro].prot == PROT_READ
            assert by_start[none].prot == 0
            assert any(m.path == "[vdso]" for m in by_start.values())
            assert "rd" in s.vm_flags()[ro]
            flags = s.page_flags(rw, rw + 4 * PAGE)
            assert flags.dtype == np.uint64 and len(flags) == 4
            assert all(flags & PAGEMAP_PRESENT)
        assert_untouched(t)


def test_read_rw_ro_and_prot_none(target_bin: Path) -> None:
    """Reads return the bytes the target wrote, also from read-only and PROT_NONE pages."""
    with spawn(target_bin) as t:
        rw, ro, none = ready(t)
        with attach(t.pid) as s:
            assert s.read(rw, 4 * PAGE) == bytes((k * 7) & 0xFF for k in range(4 * PAGE))
            assert s.read(ro, PAGE) == b"\xa5" * PAGE
            assert s.read(none, PAGE) == b"\x5a" * PAGE
            buf = bytearray(100)
            s.read_into(rw + PAGE - 50, buf)
            assert bytes(buf) == bytes(((PAGE - 50 + k) * 7) & 0xFF for k in range(100))
        assert_untouched(t)


def test_write_into_read_only_and_prot_none_pages(target_bin: Path) -> None:
    """Writes reach read-only and PROT_NONE pages, and the protections stay as they were."""
    with spawn(target_bin) as t:
        _rw, ro, none = ready(t)
        with attach(t.pid) as s:
            s.write(ro + 10, b"read-only!")
            s.write(none + 20, b"prot-none!")
            assert s.read(ro + 10, 10) == b"read-only!"
            prots = {m.start: m.prot for m in s.maps()}
            assert prots[ro] == PROT_READ and prots[none] == 0
        assert target_hex(t, ro + 8, 14) == b"\xa5\xa5read-only!\xa5\xa5"
        assert target_hex(t, none + 20, 10) == b"prot-none!"
        assert_untouched(t)


def test_mprotect_round_trip_when_proc_mem_is_not_forced(target_bin: Path) -> None:
    """With forced /proc/PID/mem access off, an injected mprotect round trip does the job."""
    with spawn(target_bin) as t:
        rw, ro, none = ready(t)
        with attach(t.pid) as s:
            s.memory.force_via_proc_mem = False
            assert s.read(none, 8) == b"\x5a" * 8
            s.write_runs([(ro, b"A" * 10), (rw, b"B" * 10), (none + PAGE - 4, b"CCCC")])
            assert s.read(none + PAGE - 4, 4) == b"CCCC"
            assert s.read(ro, 10) == b"A" * 10
            prots = {m.start: m.prot for m in s.maps()}
            assert prots[ro] == PROT_READ and prots[none] == 0
        assert target_hex(t, ro, 11) == b"A" * 10 + b"\xa5"
        assert target_hex(t, rw, 10) == b"B" * 10
        assert target_hex(t, none + PAGE - 4, 4) == b"CCCC"
        assert_untouched(t)


def test_write_runs_scattered_byte_exact(target_bin: Path) -> None:
    """Many scattered runs (over several IOV_MAX batches, mixed protections) read back exactly."""
    with spawn(target_bin) as t:
        ready(t)
        with attach(t.pid) as s:
            npages = 3000
            base = s.mmap(0, npages * PAGE, PROT_READ | PROT_WRITE, 0x22)
            s.mprotect(base + 100 * PAGE, 10 * PAGE, PROT_READ)  # a read-only hole
            rng = np.random.default_rng(7)
            source = rng.integers(0, 256, npages * PAGE, dtype=np.uint8).tobytes()
            view = memoryview(source)
            pages = [*range(0, npages, 2), 101, 103]  # every other page, some read-only
            s.write_runs(
                [(base + p * PAGE + 3, view[p * PAGE + 3 : (p + 1) * PAGE - 1]) for p in pages]
            )
            back = s.read(base, npages * PAGE)
            for p in range(npages):
                got = back[p * PAGE : (p + 1) * PAGE]
                if p in pages:
                    want = b"\0" * 3 + source[p * PAGE + 3 : (p + 1) * PAGE - 1] + b"\0"
                else:
                    want = b"\0" * PAGE
                assert got == want, f"page {p}"
            s.munmap(base, npages * PAGE)
        assert_untouched(t)


def test_halves_cut_the_rows_into_two_equal_parts_in_order() -> None:
    """The split of a large write: the two parts hold every byte of every row once, in
    order, the row across the middle cut in two at a page boundary; small writes are not
    split."""
    rng = np.random.default_rng(3)
    sizes = rng.integers(1, 9, 700).astype(np.uint64) * np.uint64(PAGE)
    sizes[350] = np.uint64(4 << 20)  # one large row, across the middle
    remote = np.stack((np.uint64(1 << 40) + np.cumsum(sizes) * np.uint64(2), sizes), axis=1)
    local = np.stack((np.uint64(1 << 30) + np.cumsum(sizes) - sizes, sizes), axis=1)
    split = _halves(local, remote)
    assert split is not None
    (l1, r1), (l2, r2) = split
    assert np.array_equal(l1[:, 1], r1[:, 1]) and np.array_equal(l2[:, 1], r2[:, 1])
    total = int(sizes.sum())
    first = int(l1[:, 1].sum())
    assert first + int(l2[:, 1].sum()) == total and first % PAGE == 0
    assert abs(2 * first - total) <= 2 * PAGE

    def pieces(loc: np.ndarray, rem: np.ndarray) -> list[tuple[int, int, int]]:
        return [(int(a), int(b), int(n)) for (a, n), (b, _) in zip(loc, rem, strict=True)]

    def pages(rows: list[tuple[int, int, int]]) -> list[tuple[int, int]]:
        return [(a + k, b + k) for a, b, n in rows for k in range(0, n, PAGE)]

    assert pages(pieces(l1, r1) + pieces(l2, r2)) == pages(pieces(local, remote))
    small = np.array([[0, PAGE], [PAGE, PAGE]], dtype=np.uint64)
    assert _halves(small, small) is None


def test_a_large_write_in_two_halves_lands_byte_exact(target_bin: Path) -> None:
    """A write_iov large enough to be split (the worker writes the second half) lands every
    byte, a row across the middle and read-only pages in the worker's half included."""
    with spawn(target_bin) as t:
        ready(t)
        with attach(t.pid) as s:
            npages = 2048
            base = s.mmap(0, npages * PAGE, PROT_READ | PROT_WRITE, 0x22)
            s.mprotect(base + 1900 * PAGE, 4 * PAGE, PROT_READ)  # refused by process_vm_writev
            rng = np.random.default_rng(11)
            source = aligned_buffer(npages * PAGE, np.uint8)
            source[:] = rng.integers(0, 256, npages * PAGE, dtype=np.uint8)
            here = np.uint64(source.ctypes.data)
            rows = (
                [(p, 1) for p in range(0, 800, 2)]
                + [(800, 400)]
                + [(p, 1) for p in range(1300, npages, 3)]
            )
            starts = np.array([p for p, _ in rows], dtype=np.uint64) * np.uint64(PAGE)
            sizes = np.array([n for _, n in rows], dtype=np.uint64) * np.uint64(PAGE)
            assert int(sizes.sum()) >= SPLIT_BYTES
            s.write_iov(np.stack((here + starts, sizes), 1), np.stack((base + starts, sizes), 1))
            back = np.frombuffer(s.read(base, npages * PAGE), dtype=np.uint8)
            want = np.zeros(npages * PAGE, dtype=np.uint8)
            for p, n in rows:
                want[p * PAGE : (p + n) * PAGE] = source[p * PAGE : (p + n) * PAGE]
            assert np.array_equal(back, want)
            assert {m.start: m.prot for m in s.maps()}[base + 1900 * PAGE] == PROT_READ
            s.munmap(base, npages * PAGE)
        assert_untouched(t)


def test_a_large_read_in_two_halves_is_byte_exact_also_where_it_needs_ptrace(
    target_bin: Path,
) -> None:
    """A read_iov large enough to be split reads every byte; PROT_NONE pages in the worker's
    half, with forced /proc/PID/mem off, need the mprotect round trip that only the tracing
    thread can inject: that half is read again there, and the protection is as before."""
    with spawn(target_bin) as t:
        ready(t)
        with attach(t.pid) as s:
            npages = 2048
            base = s.mmap(0, npages * PAGE, PROT_READ | PROT_WRITE, 0x22)
            rng = np.random.default_rng(5)
            pattern = rng.integers(0, 256, npages * PAGE, dtype=np.uint8)
            s.write(base, pattern.tobytes())
            s.mprotect(base + 1800 * PAGE, 8 * PAGE, 0)
            s.memory.force_via_proc_mem = False
            into = aligned_buffer(npages * PAGE, np.uint8)
            here = np.uint64(into.ctypes.data)
            starts = np.arange(0, npages, 2, dtype=np.uint64) * np.uint64(PAGE)
            sizes = np.full(len(starts), PAGE, dtype=np.uint64)
            assert int(sizes.sum()) >= SPLIT_BYTES
            s.read_iov(np.stack((here + starts, sizes), 1), np.stack((base + starts, sizes), 1))
            for p in range(0, npages, 2):
                assert np.array_equal(
                    into[p * PAGE : (p + 1) * PAGE], pattern[p * PAGE : (p + 1) * PAGE]
                ), p
            assert not into[PAGE : 2 * PAGE].any()  # the pages between were not read
            assert {m.start: m.prot for m in s.maps()}[base + 1800 * PAGE] == 0
            s.munmap(base, npages * PAGE)
        assert_untouched(t)


def test_write_runs_accepts_bytes_bytearray_numpy_and_mmap(target_bin: Path) -> None:
    """Every buffer type the planner may hand in is written byte-exactly."""
    with spawn(target_bin) as t:
        rw, _ro, _none = ready(t)
        backing = mmap.mmap(-1, PAGE)
        backing[:4] = b"mmap"
        with attach(t.pid) as s:
            s.write_runs(
                [
                    (rw, b"bytes"),
                    (rw + 100, bytearray(b"bytearray")),
                    (rw + 200, np.frombuffer(b"numpy!", dtype=np.uint8).data),
                    (rw + 300, memoryview(backing)[:4]),
                    (rw + 400, b""),
                ]
            )
            assert s.read(rw, 5) == b"bytes"
            assert s.read(rw + 100, 9) == b"bytearray"
            assert s.read(rw + 200, 6) == b"numpy!"
            assert s.read(rw + 300, 4) == b"mmap"
        backing.close()
        assert_untouched(t)


def test_unmapped_memory_raises_memory_access_error(target_bin: Path) -> None:
    """Reads and writes of unmapped memory raise MemoryAccessError with the address."""
    with spawn(target_bin) as t:
        ready(t)
        with attach(t.pid) as s:
            hole = s.mmap(0, PAGE, PROT_READ | PROT_WRITE, 0x22)
            s.munmap(hole, PAGE)
            with pytest.raises(MemoryAccessError) as info:
                s.read(hole, 16)
            assert info.value.address == hole
            assert f"{hole:#x}" in str(info.value)
            with pytest.raises(MemoryAccessError):
                s.write(hole, b"x" * 16)
            s.memory.force_via_proc_mem = False
            with pytest.raises(MemoryAccessError, match="not mapped"):
                s.write(hole, b"x")
        assert_untouched(t)


def test_aligned_buffer_starts_on_a_page_and_reads_target_memory(target_bin: Path) -> None:
    """Transfer buffers start on a page boundary (a malloc'd one sits 16 bytes past one,
    which made every page copied from the target straddle two local pages), are zeroed and
    writable, and process_vm_readv fills them byte for byte."""
    for nbytes, dtype in ((1, np.uint8), (3 * PAGE + 8, np.uint64), (8 << 20, np.uint64)):
        buf = aligned_buffer(nbytes, dtype)
        assert buf.ctypes.data % mmap.PAGESIZE == 0
        assert buf.nbytes == nbytes // np.dtype(dtype).itemsize * np.dtype(dtype).itemsize
        assert buf.flags.writeable and not buf.any()
    with spawn(target_bin) as t:
        ready(t)
        with attach(t.pid) as s:
            base = s.mmap(0, 4 * PAGE, PROT_READ | PROT_WRITE, 0x22)
            source = np.random.default_rng(3).integers(0, 256, 4 * PAGE, dtype=np.uint8)
            s.write(base, source.tobytes())
            buf = aligned_buffer(4 * PAGE, np.uint8)
            rows = np.array([[buf.ctypes.data, 4 * PAGE]], dtype=np.uint64)
            s.read_iov(rows, np.array([[base, 4 * PAGE]], dtype=np.uint64))
            assert buf.tobytes() == source.tobytes()
            assert memequal_rows([buf.ctypes.data], [source.ctypes.data], [4 * PAGE])
            source[PAGE + 5] ^= 1
            assert not memequal_rows([buf.ctypes.data], [source.ctypes.data], [4 * PAGE])
            assert memequal_rows([buf.ctypes.data], [source.ctypes.data], [PAGE + 5])
            s.munmap(base, 4 * PAGE)
        assert_untouched(t)

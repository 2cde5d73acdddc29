"""Pagemap semantics: normalisation, offsets, validation errors, fast path == generic path."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from formats.errors import ImageError
from formats.imagefile import build_image
from formats.imagewriter import anon_vma
from formats.mm import VmaEntry
from formats.pagemap import (
    PE_LAZY,
    PE_PARENT,
    PE_PRESENT,
    _fast_columns,
    _slow_columns,
    check_pages_size,
    check_within_vmas,
    entries_bytes,
    load_pagemap,
    make_entries,
    parse_pagemap,
)
from formats.pagemap_msgs import PagemapEntry, PagemapHead
from formats.pb import RawField

P = 4096
BASE = 0x7F0000000000
NAME = "pagemap-1.img"


def _image(*entries: PagemapEntry, pages_id: int = 1) -> bytes:
    return build_image("PAGEMAP", [PagemapHead(pages_id=pages_id), *entries])


def _e(vaddr: int, count: int | None = None, flags: int | None = None, *, compat: int = 0,
       in_parent: bool | None = None) -> PagemapEntry:  # fmt: skip
    return PagemapEntry(vaddr=vaddr, compat_nr_pages=compat, in_parent=in_parent, flags=flags,
                        nr_pages=count)  # fmt: skip


@pytest.mark.parametrize(
    ("entry", "nr_pages", "flags"),
    [
        (_e(BASE, 2, 6), 2, PE_LAZY | PE_PRESENT),  # CRIU 4.2: count in field 5, field 2 = 0
        (_e(BASE, None, 4, compat=3), 3, PE_PRESENT),  # CRIU 3.5-4.1: count in field 2
        (_e(BASE, 5, 4, compat=7), 5, PE_PRESENT),  # field 5 overrides field 2
        (_e(BASE, compat=1), 1, PE_PRESENT),  # pre-3.5, no flags: present
        (_e(BASE, compat=1, in_parent=True), 1, PE_PARENT),  # pre-3.5 in_parent
        (_e(BASE, compat=1, in_parent=False), 1, PE_PRESENT),  # in_parent false: present
        (_e(BASE, 1, 6, in_parent=False), 1, PE_LAZY | PE_PRESENT),  # explicit flags kept
    ],
)
def test_normalisation(entry: PagemapEntry, nr_pages: int, flags: int) -> None:
    """Sections 5.2/5.3: in_parent, missing flags and the 4.2 count give one meaning."""
    pm = parse_pagemap(_image(entry), NAME, P)
    assert (int(pm.nr_pages[0]), int(pm.flags[0])) == (nr_pages, flags)


def test_offsets_advance_only_on_present() -> None:
    """Run offsets in the pages file skip PE_PARENT runs (section 5.1)."""
    pm = parse_pagemap(
        _image(_e(BASE, 1, PE_PRESENT), _e(BASE + P, 2, PE_PARENT),
               _e(BASE + 3 * P, 3, PE_PRESENT | PE_LAZY), _e(BASE + 6 * P, 1, PE_PRESENT)),
        NAME, P,
    )  # fmt: skip
    assert pm.offset.tolist() == [0, P, P, 4 * P]
    assert pm.present_bytes() == 5 * P
    assert pm.pages_id == 1


def test_doc_example_crit_317_encoding() -> None:
    """The format doc's 43-byte pagemap (field 2 counts, no field 5) decodes as documented."""
    data = bytes.fromhex(
        "19435654 25400856 02000000 0801 09000000 0880a08003 1001 2006"
        "0c000000 088080808080e01f 1002 2006"
    )
    pm = parse_pagemap(data, NAME, P)
    assert pm.vaddr.tolist() == [0x601000, BASE]
    assert pm.nr_pages.tolist() == [1, 2]
    assert pm.offset.tolist() == [0, P]


def _bad(data: bytes, message: str, entry: int) -> ImageError:
    with pytest.raises(ImageError) as info:
        parse_pagemap(data, f"dir/{NAME}", P)
    err = info.value
    assert message in str(err)
    assert f"dir/{NAME}" in str(err)
    assert err.entry == entry
    assert f"(entry {entry})" in str(err)
    assert err.offset is not None and f"at byte {err.offset}" in str(err)
    return err


def test_field2_zero_without_field5_is_corrupt() -> None:
    """compat_nr_pages == 0 and no nr_pages: a 4.2 entry read by a field-2 reader."""
    err = _bad(_image(_e(BASE, 1, 4), _e(BASE + P, None, 4)), "field 2", 2)
    # magics 8 + head 4+2 + entry 1: 4 + (key + 7-byte vaddr + 3 two-byte fields = 14)
    assert err.offset == 8 + 6 + 4 + 14


def test_zero_length_run() -> None:
    """nr_pages == 0 in field 5 is rejected."""
    _bad(_image(_e(BASE, 0, 4)), "zero-length", 1)


def test_unknown_flag_bits() -> None:
    """Flag bits above PE_PRESENT are rejected (they could change offsets)."""
    _bad(_image(_e(BASE, 1, 0x8 | PE_PRESENT)), "unknown flag bits 0xc", 1)


def test_lazy_without_present() -> None:
    """PE_LAZY alone (criu dump --lazy-pages) has no data in the image."""
    _bad(_image(_e(BASE, 1, PE_LAZY)), "PE_LAZY without PE_PRESENT", 1)


def test_parent_and_present_together() -> None:
    """PE_PARENT|PE_PRESENT is ambiguous and rejected."""
    _bad(_image(_e(BASE, 1, PE_PARENT | PE_PRESENT)), "both PE_PARENT and PE_PRESENT", 1)


def test_no_flags() -> None:
    """An explicit flags value of 0 names no source for the pages."""
    _bad(_image(_e(BASE, 1, 0)), "flags 0", 1)


def test_unaligned_vaddr() -> None:
    """vaddr must be page aligned."""
    _bad(_image(_e(BASE, 1, 4), _e(BASE + P + 8, 1, 4)), "not page aligned", 2)


def test_overflow() -> None:
    """vaddr + nr_pages * PAGE beyond 2**64 is rejected."""
    _bad(_image(_e(2**64 - 2 * P, 3, 4)), "overflows the address space", 1)


def test_unsorted() -> None:
    """Entries must ascend by vaddr."""
    _bad(_image(_e(BASE + P, 1, 4), _e(BASE, 1, 4)), "unsorted", 2)


def test_overlapping() -> None:
    """Entries must not overlap."""
    _bad(_image(_e(BASE, 2, 4), _e(BASE + P, 1, 4)), "overlapping", 2)


def test_missing_head() -> None:
    """A pagemap with no entries at all has no head."""
    with pytest.raises(ImageError, match="without pagemap_head") as info:
        parse_pagemap(_image()[:8], NAME, P)
    assert (info.value.offset, info.value.entry) == (8, 0)


def test_not_a_pagemap() -> None:
    """A different image kind is rejected."""
    data = build_image("PSTREE", [])
    with pytest.raises(ImageError, match="expected a PAGEMAP image"):
        parse_pagemap(data, NAME, P)


def test_present_run_past_end_of_pages_file(tmp_path: Path) -> None:
    """A PE_PRESENT run beyond the pages file's end is rejected with its entry."""
    data = _image(_e(BASE, 1, 4), _e(BASE + P, 2, 4))
    (tmp_path / NAME).write_bytes(data)
    (tmp_path / "pages-1.img").write_bytes(bytes(2 * P))
    with pytest.raises(ImageError, match=re.escape("pages-1.img, which has 8192 bytes")) as info:
        load_pagemap(tmp_path / NAME, P)
    assert info.value.entry == 2
    assert NAME in str(info.value)
    (tmp_path / "pages-1.img").write_bytes(bytes(3 * P + 5))  # trailing bytes are fine
    assert load_pagemap(tmp_path / NAME, P).pages is not None
    pm = parse_pagemap(data, NAME, P)
    check_pages_size(pm, 3 * P)
    with pytest.raises(ImageError):
        check_pages_size(pm, 3 * P - 1)


def test_missing_pages_file(tmp_path: Path) -> None:
    """PE_PRESENT entries need the pages file named by pages_id."""
    (tmp_path / NAME).write_bytes(_image(_e(BASE, 1, 4), pages_id=7))
    with pytest.raises(ImageError, match=re.escape("pages-7.img is missing")):
        load_pagemap(tmp_path / NAME, P)


def test_run_outside_private_vmas() -> None:
    """Every run must lie in private VMAs; adjacent VMAs may share one run."""
    pm = parse_pagemap(_image(_e(BASE, 1, 4), _e(BASE + 2 * P, 2, 4)), f"d/{NAME}", P)
    vmas = [anon_vma(BASE, BASE + P), anon_vma(BASE + 2 * P, BASE + 3 * P),
            anon_vma(BASE + 3 * P, BASE + 4 * P)]  # fmt: skip
    check_within_vmas(pm, vmas, "mm-1.img")
    shared = VmaEntry(start=BASE + 3 * P, end=BASE + 4 * P, pgoff=0, shmid=9, prot=3, flags=1,
                      status=0x4081, fd=-1)  # fmt: skip
    with pytest.raises(
        ImageError, match=re.escape("outside every private VMA of mm-1.img")
    ) as info:
        check_within_vmas(pm, [*vmas[:2], shared], "mm-1.img")
    assert info.value.entry == 2
    assert f"d/{NAME}" in str(info.value)
    with pytest.raises(ImageError, match="outside"):
        check_within_vmas(pm, [], "mm-1.img")


def test_make_entries_writes_fields_1_2_4_5_and_splits() -> None:
    """Writer entries carry the count in fields 2 and 5; huge runs split at 2**32 - 1."""
    entries = make_entries([(BASE, 3, 6), (0, 2**32 + 1, 4)], P)
    assert entries[0] == _e(BASE, 3, 6, compat=3)
    assert [(e.vaddr, e.nr_pages) for e in entries[1:]] == [(0, 2**32 - 1), ((2**32 - 1) * P, 2)]
    assert all(e.compat_nr_pages == e.nr_pages for e in entries)


_entry = st.builds(
    _e,
    st.integers(0, 2**50).map(lambda v: v * P),
    st.none() | st.integers(0, 2**40),
    st.none() | st.integers(0, 2**32 - 1),
    compat=st.integers(0, 2**40),  # > 32 bits: both readers keep the low 32
    in_parent=st.none() | st.booleans(),
)


@settings(max_examples=200)
@given(st.lists(_entry, max_size=12), st.booleans())
def test_fast_path_matches_generic_reader(entries: list[PagemapEntry], unknown: bool) -> None:
    """The numpy fast decoder yields the generic reader's columns, or defers to it."""
    if unknown and entries:
        entries[0].unknown_fields.append(RawField(9, b"\x48\x05"))
    data = _image(*entries)
    pos = 8 + 4 + 2  # magics, head length + pages_id
    frames = []
    for _ in entries:
        length = int.from_bytes(data[pos : pos + 4], "little")
        frames.append((pos + 4, length))
        pos += 4 + length
    slow = _slow_columns(data, frames, Path(NAME))
    table = np.array(frames, dtype=np.int64).reshape(-1, 2)
    fast = _fast_columns(data, table[:, 0], table[:, 1])
    if unknown and entries:
        assert fast is None
        return
    assert fast is not None
    for field in slow:
        assert fast[field][1].tolist() == slow[field][1].tolist()
        assert fast[field][0].tolist() == slow[field][0].tolist()


def test_fast_path_defers_on_repeated_field() -> None:
    """A field given twice in one entry (last wins) is left to the generic reader."""
    payload = bytes.fromhex("0801 1001 2004 0802")  # vaddr twice: last (2) wins... unaligned
    data = build_image("PAGEMAP", [PagemapHead(pages_id=1)]) + len(payload).to_bytes(4, "little")
    table = np.array([[len(data), len(payload)]], dtype=np.int64)
    data += payload
    assert _fast_columns(data, table[:, 0], table[:, 1]) is None
    fixed = bytes.fromhex("08 8020 1001 2004 08 8040")  # vaddr 0x1000 then 0x2000
    data2 = build_image("PAGEMAP", [PagemapHead(pages_id=1)]) + len(fixed).to_bytes(4, "little")
    assert parse_pagemap(data2 + fixed, NAME, P).vaddr.tolist() == [0x2000]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.lists(st.binary(min_size=0, max_size=20), max_size=6))
def test_random_pagemaps_raise_only_image_error(head: bytes, payloads: list[bytes]) -> None:
    """Random entry payloads behind a valid header decode or raise ImageError, nothing else."""
    data = build_image("PAGEMAP", [PagemapHead(pages_id=1)])
    for payload in payloads:
        data += len(payload).to_bytes(4, "little") + payload
    for blob in (data, data[:8] + head):
        try:
            parse_pagemap(blob, NAME, P)
        except ImageError as err:
            assert NAME in str(err)


@given(
    st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=(1 << 47) // 4096),
            st.integers(min_value=1, max_value=(1 << 33)),
            st.sampled_from([1, 2, 6, 4]),
        ),
        max_size=20,
    )
)
def test_entries_bytes_equal_the_built_messages(raw: list[tuple[int, int, int]]) -> None:
    """The direct pagemap encoder writes exactly what building make_entries' messages does,
    including runs split at the 32-bit count limit."""
    runs = [(page * 4096, n, flags) for page, n, flags in raw]
    built = build_image("PAGEMAP", [PagemapHead(pages_id=1), *make_entries(runs, 4096)])
    head = build_image("PAGEMAP", [PagemapHead(pages_id=1)])
    assert head + entries_bytes(runs, 4096) == built

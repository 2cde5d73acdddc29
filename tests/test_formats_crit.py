"""Agreement with crit: CRIU 4.2's JSON of the golden dump, and Debian's crit 3.17 both ways."""

from __future__ import annotations

import base64
import ipaddress
import json
import quopri
import shutil
import subprocess
from pathlib import Path
from typing import Any

import attrs
import pytest

from formats.imagefile import load_image
from formats.imagewriter import ImageWriter, anon_vma, regular_file, x86_core
from formats.inventory import PstreeEntry
from formats.mm import MmEntry, VmaStatus
from formats.pagemap import PE_LAZY, PE_PARENT, PE_PRESENT
from formats.pb import Message
from formats.sockets import ip_from_words

CRIT = shutil.which("crit") or "/usr/bin/crit"
needs_crit = pytest.mark.skipif(not Path(CRIT).exists(), reason="crit not installed")

# Names crit prints for flags and enums, to compare with our integers.
_NAMES: dict[str, int] = {
    "PROT_READ": 1, "PROT_WRITE": 2, "PROT_EXEC": 4,
    "MAP_SHARED": 1, "MAP_PRIVATE": 2, "MAP_ANON": 0x20, "MAP_GROWSDOWN": 0x100,
    "PE_PARENT": PE_PARENT, "PE_LAZY": PE_LAZY, "PE_PRESENT": PE_PRESENT,
    "O_WRONLY": 1, "O_RDWR": 2, "O_LARGEFILE": 0x8000,
    "X86_64": 1, "NO_LSM": 0, "REG": 1, "PIPE": 2, "Alive": 1, "NATIVE": 1,
    # pycriu pb2dict.py rfile_flags_map (asm-generic/fcntl.h, octal)
    "O_CREAT": 0o100, "O_EXCL": 0o200, "O_NOCTTY": 0o400, "O_TRUNC": 0o1000, "O_APPEND": 0o2000,
    "O_NONBLOCK": 0o4000, "O_DSYNC": 0o10000, "FASYNC": 0o20000, "O_DIRECT": 0o40000,
    "O_DIRECTORY": 0o200000, "O_NOFOLLOW": 0o400000, "O_NOATIME": 0o1000000,
    "O_CLOEXEC": 0o2000000,
    # enum fd_types (fdinfo.proto)
    "FIFO": 3, "INETSK": 4, "UNIXSK": 5, "EVENTFD": 6, "EVENTPOLL": 7, "INOTIFY": 8,
    "SIGNALFD": 9, "TIMERFD": 17, "MEMFD": 18,
    # pycriu sk_maps (the "sk" dict): family, type, state, proto
    "UNIX": 1, "INET": 2, "INET6": 10, "STREAM": 1, "DGRAM": 2, "SEQPACKET": 5,
    "ESTABLISHED": 1, "CLOSE": 7, "LISTEN": 10, "TCP": 6, "UDP": 17,
    # enum sk_shutdown (sk-opts.proto) and seals_flags_map (linux/fcntl.h)
    "READ": 1, "WRITE": 2, "BOTH": 3,
    "F_SEAL_SEAL": 1, "F_SEAL_SHRINK": 2, "F_SEAL_GROW": 4, "F_SEAL_WRITE": 8,
}  # fmt: skip
_NAMES.update({f"VMA_AREA_{k}": v for k, v in vars(VmaStatus).items() if isinstance(v, int)})
_NAMES.update(VMA_FILE_PRIVATE=0x40, VMA_FILE_SHARED=0x80, VMA_ANON_SHARED=0x100,
              VMA_ANON_PRIVATE=0x200)  # fmt: skip
# crit 3.17 knows pagemap field 2 as nr_pages and drops field 5 as unknown.
_RENAMED_317 = {"PagemapEntry": {"nr_pages": "compat_nr_pages"}}


def _scalar(value: Any) -> Any:
    """A crit JSON scalar as the integer/bool/str we store."""
    if isinstance(value, str):
        if value.startswith("0x"):
            return int(value, 16)
        parts = [p.strip() for p in value.split("|")]
        if value == "" or all(p in _NAMES for p in parts):
            total = 0
            for part in parts if value else []:
                total |= _NAMES[part]
            return total
    return value


_IP_FIELDS = {"src_addr", "dst_addr"}  # (criu).ipadd: crit prints one address string
_DEV_FIELDS = {"s_dev"}  # (criu).dev: crit prints "major:minor" of a kernel dev_t
_QUOPRI_FIELDS = {("UnixSkEntry", "name")}  # (criu).conv = "unix_name"; other bytes are base64


def _special(obj: Message, attr: str, ours: Any, value: Any) -> bool:
    """Compare the fields crit converts on its own; False if ``attr`` is not one of them."""
    if attr in _IP_FIELDS and isinstance(value, list):
        assert [ipaddress.ip_address(v) for v in value] == [ip_from_words(ours)], attr
    elif attr in _DEV_FIELDS and isinstance(value, str):
        major, minor = value.split(":")
        assert ours == int(major) << 20 | int(minor), attr
    elif isinstance(ours, bytes) and isinstance(value, str):
        if (type(obj).__name__, attr) in _QUOPRI_FIELDS:
            assert ours == quopri.decodestring(value.encode()), attr
        else:
            assert ours == base64.b64decode(value), attr
    else:
        return False
    return True


def compare(
    obj: Message, doc: dict[str, Any], renamed: dict[str, dict[str, str]], *, strict: bool = False
) -> int:
    """Assert every field crit shows equals ours and vice versa; returns fields compared.
    ``strict``: every key crit shows must also be a modelled field."""
    names = renamed.get(type(obj).__name__, {})
    compared = 0
    shown = set()
    for key, value in doc.items():
        attr = names.get(key, key)
        if not hasattr(obj, attr) or attr == "unknown_fields":
            # not modelled: kept as an unknown field (checked by the byte round trip)
            assert not strict, f"{type(obj).__name__}.{key} is shown by crit but not modelled"
            continue
        shown.add(attr)
        ours = getattr(obj, attr)
        if _special(obj, attr, ours, value):
            compared += 1
        elif isinstance(value, dict):
            compared += compare(ours, value, renamed, strict=strict)
        elif isinstance(value, list):
            assert len(ours) == len(value), attr
            for mine, theirs in zip(ours, value, strict=True):
                if isinstance(theirs, dict):
                    compared += compare(mine, theirs, renamed, strict=strict)
                else:
                    assert mine == _scalar(theirs), attr
                    compared += 1
        else:
            assert ours == _scalar(value), (type(obj).__name__, attr, ours, value)
            compared += 1
    for field in attrs.fields(type(obj)):
        value = getattr(obj, field.name)
        if "pb" in field.metadata and value is not None and value != []:
            renamed_back = {v: k for k, v in names.items()}
            if field.name not in shown and renamed_back.get(field.name, field.name) in doc:
                continue
            assert field.name in shown, f"{type(obj).__name__}.{field.name} not shown by crit"
    return compared


def test_golden_agrees_with_crit_42_json(golden_dir: Path) -> None:
    """Every decoded golden image agrees with CRIU 4.2's own crit --pretty output."""
    json_dir = golden_dir.parent / "basic-criu-4.2-crit-json"
    checked = 0
    for jpath in sorted(json_dir.glob("*.json")):
        doc = json.loads(jpath.read_text())
        magic, entries = load_image(golden_dir / jpath.name.removesuffix(".json"))
        assert magic == doc["magic"]
        assert len(entries) == len(doc["entries"])
        for ours, theirs in zip(entries, doc["entries"], strict=True):
            checked += compare(ours, theirs, {})
    assert checked > 1000  # registers, VMAs, pagemap entries, files...


def _crit(*args: str, stdin: bytes | None = None) -> bytes:
    done = subprocess.run([CRIT, *args], input=stdin, capture_output=True, check=True, timeout=60)
    return done.stdout


def _write_sample(path: Path) -> None:
    """A one-process dump: heap + anon VMA, 3 pagemap runs, an exe in files.img."""
    page = 4096
    with ImageWriter(path) as w:
        w.add_file(regular_file(1, "/usr/bin/sample", size=16544))
        mm = MmEntry(
            mm_start_brk=0x601000, mm_brk=0x602000, exe_file_id=1, mm_saved_auxv=[6, page, 0, 0],
            vmas=[anon_vma(0x601000, 0x602000, heap=True),
                  anon_vma(0x7F0000000000, 0x7F0000003000)],
        )  # fmt: skip
        w.add_process(
            PstreeEntry(pid=1, ppid=0, pgid=1, sid=1, threads=[1, 2]),
            mm=mm,
            cores={1: x86_core(0x401000, 0x7FFC0000, comm="sample"), 2: x86_core(0x401010, 0)},
            runs=[
                (0x601000, 1, PE_PRESENT | PE_LAZY, b"H" * page),
                (0x7F0000000000, 2, PE_PRESENT, b"A" * page + b"B" * page),
            ],
        )


@needs_crit
def test_our_images_decode_with_crit_317(tmp_path: Path) -> None:
    """crit 3.17 decodes every image ImageWriter writes, with the same values."""
    _write_sample(tmp_path)
    images = sorted(p for p in tmp_path.glob("*.img") if not p.name.startswith("pages-"))
    assert {p.name for p in images} >= {"inventory.img", "pstree.img", "mm-1.img",
                                        "pagemap-1.img", "core-1.img", "files.img"}  # fmt: skip
    for img in images:
        doc = json.loads(_crit("decode", "-i", str(img)))
        magic, entries = load_image(img)
        assert doc["magic"] == magic
        for ours, theirs in zip(entries, doc["entries"], strict=True):
            compare(ours, theirs, _RENAMED_317)
        # crit's re-encoding of its own decoding is our file, byte for byte (field 5 aside)
        if magic != "PAGEMAP":
            assert _crit("encode", stdin=json.dumps(doc).encode()) == img.read_bytes()


_MM_ZERO = ("mm_start_code", "mm_end_code", "mm_start_data", "mm_end_data", "mm_start_stack",
            "mm_arg_start", "mm_arg_end", "mm_env_start", "mm_env_end")  # fmt: skip


@needs_crit
def test_crit_encoded_images_parse(tmp_path: Path) -> None:
    """Images made by crit encode from the format doc's JSON parse here and rebuild exactly."""
    docs: dict[str, dict[str, Any]] = {
        "inventory.img": {"magic": "INVENTORY", "entries": [
            {"img_version": 2, "fdinfo_per_id": True, "ns_per_id": True, "lsmtype": "NO_LSM"}]},
        "pstree.img": {"magic": "PSTREE", "entries": [
            {"pid": 1, "ppid": 0, "pgid": 1, "sid": 1, "threads": [1]}]},
        "pagemap-1.img": {"magic": "PAGEMAP", "entries": [
            {"pages_id": 1}, {"vaddr": "0x601000", "nr_pages": 1, "flags": 6},
            {"vaddr": "0x7f0000000000", "nr_pages": 2, "in_parent": True}]},
        "mm-1.img": {"magic": "MM", "entries": [{
            **dict.fromkeys(_MM_ZERO, 0),
            "mm_start_brk": "0x601000", "mm_brk": "0x602000", "exe_file_id": 1,
            "vmas": [{"start": "0x601000", "end": "0x602000", "pgoff": 0, "shmid": 0,
                      "prot": "PROT_READ | PROT_WRITE", "flags": "MAP_PRIVATE | MAP_ANON",
                      "status": "VMA_AREA_REGULAR | VMA_AREA_HEAP | VMA_ANON_PRIVATE",
                      "fd": -1}]}]},
    }  # fmt: skip
    for name, doc in docs.items():
        data = _crit("encode", stdin=json.dumps(doc).encode())
        (tmp_path / name).write_bytes(data)
        magic, entries = load_image(tmp_path / name)
        assert magic == doc["magic"]
        for ours, theirs in zip(entries, doc["entries"], strict=True):
            compare(ours, theirs, _RENAMED_317)
    _, pm = load_image(tmp_path / "pagemap-1.img")
    assert (pm[1].compat_nr_pages, pm[1].flags, pm[1].nr_pages) == (1, 6, None)
    assert (pm[2].in_parent, pm[2].flags) == (True, None)
    _, mm = load_image(tmp_path / "mm-1.img")
    assert mm[0].vmas[0].kind() == "heap"


def test_compare_detects_differences() -> None:
    """The comparison helper fails on a differing value and on a field crit does not show."""
    vma = anon_vma(0x1000, 0x2000)
    shown = {"start": "0x1000", "end": "0x2000", "pgoff": 0, "shmid": 0,
             "prot": "PROT_READ | PROT_WRITE", "flags": "MAP_PRIVATE | MAP_ANON",
             "status": "VMA_AREA_REGULAR | VMA_ANON_PRIVATE", "fd": -1}  # fmt: skip
    assert compare(vma, shown, {}) == 8
    with pytest.raises(AssertionError):
        compare(vma, {**shown, "prot": "PROT_READ"}, {})
    with pytest.raises(AssertionError):
        compare(vma, {k: v for k, v in shown.items() if k != "fd"}, {})

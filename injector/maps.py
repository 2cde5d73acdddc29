"""The memory layout of a live process: /proc/PID/maps, smaps VmFlags and pagemap entries.

/proc files are read as bytes and parsed defensively (``fs/proc/task_mmu.c`` ``show_map_vma``):
paths may contain spaces, a newline in a path arrives escaped as ``\\012``, a file that was
unlinked ends in `` (deleted)``, and anonymous mappings have no path at all. The procfs root is
a parameter so the parsers can be tested on saved files.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import re
from collections.abc import Iterable
from pathlib import Path

import attrs
import numpy as np
import numpy.typing as npt

from injector.memo import remember

__all__ = [
    "PAGEMAP_EXCLUSIVE",
    "PAGEMAP_FILE",
    "PAGEMAP_PRESENT",
    "PAGEMAP_SOFT_DIRTY",
    "PAGEMAP_SWAPPED",
    "PAGEMAP_UFFD_WP",
    "PROT_EXEC",
    "PROT_READ",
    "PROT_WRITE",
    "SPECIAL_PATHS",
    "Mapping",
    "find",
    "parse_maps",
    "parse_smaps_vmflags",
    "read_maps",
    "read_page_flags",
    "read_vmflags",
]

PROT_READ = 0x1
PROT_WRITE = 0x2
PROT_EXEC = 0x4

# Documentation/admin-guide/mm/pagemap.rst
PAGEMAP_PRESENT = np.uint64(1 << 63)
PAGEMAP_SWAPPED = np.uint64(1 << 62)
PAGEMAP_FILE = np.uint64(1 << 61)
PAGEMAP_UFFD_WP = np.uint64(1 << 57)
PAGEMAP_EXCLUSIVE = np.uint64(1 << 56)
PAGEMAP_SOFT_DIRTY = np.uint64(1 << 55)

SPECIAL_PATHS = frozenset({"[vdso]", "[vvar]", "[vvar_vclock]", "[vsyscall]", "[heap]", "[stack]"})

_LINE = re.compile(
    rb"^([0-9a-f]+)-([0-9a-f]+) ([r-])([w-])([x-])([ps]) ([0-9a-f]+) "
    rb"([0-9a-f]+):([0-9a-f]+) ([0-9]+) *(.*)$"
)
_DELETED = b" (deleted)"


@attrs.frozen
class Mapping:
    """One line of /proc/PID/maps.

    ``prot`` is a ``PROT_*`` bit set, ``dev`` an ``os.makedev`` value (compare with
    ``os.stat().st_dev``), ``path`` the decoded path (``os.fsdecode``, so undecodable bytes
    round-trip), a pseudo name such as ``[heap]``, or ``None`` for anonymous memory; ``deleted``
    tells that the kernel appended `` (deleted)`` (stripped from ``path``).
    """

    start: int
    end: int
    prot: int
    shared: bool
    offset: int
    dev: int
    inode: int
    path: str | None
    deleted: bool = False

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def readable(self) -> bool:
        return bool(self.prot & PROT_READ)

    @property
    def writable(self) -> bool:
        return bool(self.prot & PROT_WRITE)

    @property
    def executable(self) -> bool:
        return bool(self.prot & PROT_EXEC)

    @property
    def perms(self) -> str:
        """The ``rwxp`` column as the kernel prints it."""
        return (
            ("r" if self.readable else "-")
            + ("w" if self.writable else "-")
            + ("x" if self.executable else "-")
            + ("s" if self.shared else "p")
        )

    @property
    def is_anon(self) -> bool:
        """No file behind it (plain anonymous memory; ``[heap]``/``[stack]`` are special)."""
        return self.path is None and self.inode == 0

    @property
    def is_special(self) -> bool:
        """A kernel pseudo mapping: [vdso], [vvar], [vsyscall], [heap], [stack]."""
        return self.path is not None and self.inode == 0 and self.path in SPECIAL_PATHS

    @property
    def is_file(self) -> bool:
        """Backed by a file (including memfd and deleted files)."""
        return self.inode != 0

    def contains(self, address: int) -> bool:
        return self.start <= address < self.end


def _decode_path(raw: bytes) -> tuple[str | None, bool]:
    if not raw:
        return None, False
    deleted = raw.endswith(_DELETED)
    if deleted:
        raw = raw[: -len(_DELETED)]
    # seq_file_path() escapes only "\n" (as \012) in the path.
    raw = raw.replace(b"\\012", b"\n")
    return os.fsdecode(raw), deleted


def _parse_line(line: bytes) -> Mapping:
    m = _LINE.match(line)
    if m is None:
        raise ValueError(f"unparsable /proc/PID/maps line: {line!r}")
    r, w, x, s = m.group(3, 4, 5, 6)
    path, deleted = _decode_path(m.group(11))
    return Mapping(
        start=int(m.group(1), 16),
        end=int(m.group(2), 16),
        prot=(PROT_READ if r == b"r" else 0)
        | (PROT_WRITE if w == b"w" else 0)
        | (PROT_EXEC if x == b"x" else 0),
        shared=s == b"s",
        offset=int(m.group(7), 16),
        dev=os.makedev(int(m.group(8), 16), int(m.group(9), 16)),
        inode=int(m.group(10)),
        path=path,
        deleted=deleted,
    )


# Line -> its Mapping (immutable, so shared): from one read of a process's maps to the next
# nearly every line is the same, and parsing one costs 4 us (memcached's 77 lines: 331 us a
# parse, 14 us from here, medians of 200). Cleared when it grows past _PARSED_MAX lines.
_PARSED: dict[bytes, Mapping] = {}
_PARSED_MAX = 1 << 14


def parse_maps(data: bytes) -> list[Mapping]:
    """Parse the bytes of /proc/PID/maps; lines that do not fit the format are rejected."""
    result = []
    parsed = _PARSED
    for line in data.split(b"\n"):
        if not line:
            continue
        mapping = parsed.get(line)
        if mapping is None:
            mapping = remember(parsed, line, _parse_line(line), _PARSED_MAX)
        result.append(mapping)
    return result


def parse_smaps_vmflags(data: bytes) -> dict[int, frozenset[str]]:
    """Start address -> set of ``VmFlags`` mnemonics (``rd wr mr mw me ac sd uw ...``)."""
    result: dict[int, frozenset[str]] = {}
    start: int | None = None
    for line in data.split(b"\n"):
        m = _LINE.match(line)
        if m is not None:
            start = int(m.group(1), 16)
        elif line.startswith(b"VmFlags:") and start is not None:
            result[start] = frozenset(line[len(b"VmFlags:") :].decode().split())
    return result


def read_maps(pid: int, procfs: Path = Path("/proc")) -> list[Mapping]:
    """/proc/PID/maps of ``pid`` (raises ``OSError`` as ``open`` does)."""
    return parse_maps((procfs / str(pid) / "maps").read_bytes())


def read_vmflags(pid: int, procfs: Path = Path("/proc")) -> dict[int, frozenset[str]]:
    """VmFlags of every mapping of ``pid``, keyed by start address."""
    return parse_smaps_vmflags((procfs / str(pid) / "smaps").read_bytes())


_PFN_MASK = np.uint64((1 << 55) - 1)
# Swap entries in pagemap: the type in the low MAX_SWAPFILES_SHIFT (5) bits, then the offset.
# PTE markers (userfaultfd write-protect of unpopulated pages, guard regions, poison) use the
# last type, (1 << 5) - 1, which no swap area can have (include/linux/swap.h).
_SWAP_TYPE_MASK = np.uint64(0x1F)
_SWP_PTE_MARKER = np.uint64(0x1F)


@functools.cache
def pagemap_shows_frames() -> bool:
    """Whether /proc/PID/pagemap shows frame numbers (and swap offsets) to this process:
    only with CAP_SYS_ADMIN. Probed on a page of this process that is surely present."""
    probe = bytearray(mmap.PAGESIZE)
    probe[0] = 1
    address = ctypes.addressof((ctypes.c_char * len(probe)).from_buffer(probe))
    fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    try:
        entry = read_page_flags(fd, address, address + 1, mmap.PAGESIZE)[0]
    finally:
        os.close(fd)
    return bool(entry & PAGEMAP_PRESENT) and bool(entry & _PFN_MASK)


def holds_data(flags: npt.NDArray[np.uint64]) -> npt.NDArray[np.bool_]:
    """Pages that hold data of their own: present, or swapped out.

    A PTE marker is no data but pagemap reports it with the swap bit: in memory registered
    for userfaultfd write-protection (a dirty tracker with WP_UNPOPULATED) every never-touched
    page carries one (seen here as 0x420000000000003f: swap, uffd-wp, type 31, marker bit 1).
    Where frame numbers are visible, entries of the marker type are left out; where they are
    not, every swap entry counts as data (never wrong, at worst a zero page too many)."""
    data = (flags & (PAGEMAP_PRESENT | PAGEMAP_SWAPPED)) != 0
    if pagemap_shows_frames():
        marker = (
            ((flags & PAGEMAP_PRESENT) == 0)
            & ((flags & PAGEMAP_SWAPPED) != 0)
            & ((flags & _PFN_MASK & _SWAP_TYPE_MASK) == _SWP_PTE_MARKER)
        )
        data &= ~marker
    return np.asarray(data)


def own_copies(flags: npt.NDArray[np.uint64]) -> npt.NDArray[np.bool_]:
    """Pages with data of the process's own: in a private file mapping, the copied-on-write
    pages (not the file's page cache page, which pagemap marks file-backed)."""
    return np.asarray(holds_data(flags) & ((flags & PAGEMAP_FILE) == 0))


def read_page_flags(
    pagemap_fd: int, start: int, end: int, page_size: int = 4096
) -> npt.NDArray[np.uint64]:
    """Pagemap entries (one uint64 per page) for ``[start, end)`` from an open pagemap fd."""
    first = start // page_size
    count = (end - start + page_size - 1) // page_size
    out = np.zeros(count, dtype=np.uint64)
    view = out.data.cast("B")
    done = 0
    while done < len(view):
        n = os.preadv(pagemap_fd, [view[done:]], first * 8 + done)
        if n <= 0:
            break  # past the end of the address space: the rest stays 0 (not present)
        done += n
    return out


def find(mappings: Iterable[Mapping], address: int) -> Mapping | None:
    """The mapping that contains ``address``, if any."""
    for m in mappings:
        if m.contains(address):
            return m
    return None

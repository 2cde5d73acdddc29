"""``mm-<pid>.img`` messages: the address space (CRIU images/mm.proto, vma.proto) and the VMA
status bits of criu/include/image.h (format doc section 6)."""

# Message fields are attrs field specifiers made by formats.pb, not mutable defaults:
# ruff: noqa: RUF009

from __future__ import annotations

import attrs

from formats.pb import Kind, Message, optional, repeated, required

__all__ = [
    "AT_PAGESZ",
    "MAP_ANONYMOUS",
    "MAP_GROWSDOWN",
    "MAP_PRIVATE",
    "MAP_SHARED",
    "AioRingEntry",
    "MmEntry",
    "VmaEntry",
    "VmaStatus",
]

U32, U64 = Kind.UINT32, Kind.UINT64
AT_PAGESZ = 6


class VmaStatus:
    """``vma_entry.status`` bits."""

    REGULAR = 0x1
    STACK = 0x2
    VSYSCALL = 0x4
    VDSO = 0x8
    HEAP = 0x20
    FILE_PRIVATE = 0x40
    FILE_SHARED = 0x80
    ANON_SHARED = 0x100
    ANON_PRIVATE = 0x200
    SYSVIPC = 0x400
    SOCKET = 0x800
    VVAR = 0x1000
    AIORING = 0x2000
    MEMFD = 0x4000
    SHSTK = 0x8000
    GUARD = 0x10000
    UPROBES = 0x20000
    EXT_PLUGIN = 0x08000000  # a device mapping a CRIU plugin handles


MAP_SHARED, MAP_PRIVATE, MAP_ANONYMOUS, MAP_GROWSDOWN = 0x1, 0x2, 0x20, 0x100


@attrs.define(kw_only=True)
class VmaEntry(Message):
    """vma_entry: one mapping; ``end`` exclusive, ``pgoff`` in bytes, ``fd`` always -1."""

    start: int = required(1, U64)
    end: int = required(2, U64)
    pgoff: int = required(3, U64)
    shmid: int = required(4, U64)
    prot: int = required(5, U32)
    flags: int = required(6, U32)
    status: int = required(7, U32)
    fd: int = required(8, Kind.SINT64, default=-1)
    madv: int | None = optional(9, U64)
    fdflags: int | None = optional(10, U32)

    @property
    def is_guard(self) -> bool:
        """A CRIU 4.2 MADV_GUARD_INSTALL pseudo-VMA (lies inside a real VMA; skip it)."""
        return self.status == VmaStatus.GUARD

    @property
    def has_pagemap(self) -> bool:
        """Whether CRIU dumps this VMA's pages into the task's own pagemap (section 5.5)."""
        st = self.status
        private = st & VmaStatus.REGULAR and st & (VmaStatus.ANON_PRIVATE | VmaStatus.FILE_PRIVATE)
        return bool(private or st & (VmaStatus.AIORING | VmaStatus.SHSTK))

    def kind(self) -> str:
        """A short human label: heap, stack, vdso, vvar, vsyscall, file, shared, anon, ..."""
        st = self.status
        for bit, name in (
            (VmaStatus.GUARD, "guard"),
            (VmaStatus.VSYSCALL, "vsyscall"),
            (VmaStatus.VVAR, "vvar"),
            (VmaStatus.VDSO, "vdso"),
            (VmaStatus.HEAP, "heap"),
            (VmaStatus.AIORING, "aio"),
            (VmaStatus.SHSTK, "shadow-stack"),
            (VmaStatus.SYSVIPC, "sysv-shm"),
            (VmaStatus.SOCKET, "socket"),
        ):
            if st & bit:
                return name
        if self.flags & MAP_GROWSDOWN:
            return "stack"
        if st & VmaStatus.MEMFD:
            return "memfd"  # memfd, or shared anonymous memory dumped like one
        if st & VmaStatus.ANON_SHARED:
            return "shared-anon"
        if st & VmaStatus.FILE_PRIVATE:
            return "file-private"
        if st & VmaStatus.FILE_SHARED:
            return "file-shared"
        return "anon"


@attrs.define(kw_only=True)
class AioRingEntry(Message):
    """aio_ring_entry: an AIO ring mapped into the task."""

    id: int = required(1, U64)
    nr_req: int = required(2, U32)
    ring_len: int = required(3, U32)


@attrs.define(kw_only=True)
class MmEntry(Message):
    """mm_entry: /proc/pid/stat memory fields, auxv, VMAs (guard pseudo-VMAs last)."""

    mm_start_code: int = required(1, U64)
    mm_end_code: int = required(2, U64)
    mm_start_data: int = required(3, U64)
    mm_end_data: int = required(4, U64)
    mm_start_stack: int = required(5, U64)
    mm_start_brk: int = required(6, U64)
    mm_brk: int = required(7, U64)
    mm_arg_start: int = required(8, U64)
    mm_arg_end: int = required(9, U64)
    mm_env_start: int = required(10, U64)
    mm_env_end: int = required(11, U64)
    exe_file_id: int = required(12, U32)
    mm_saved_auxv: list[int] = repeated(13, U64)
    vmas: list[VmaEntry] = repeated(14, Kind.MESSAGE, message=VmaEntry)
    dumpable: int | None = optional(15, Kind.INT32)
    aios: list[AioRingEntry] = repeated(16, Kind.MESSAGE, message=AioRingEntry)
    thp_disabled: bool | None = optional(17, Kind.BOOL)

    def auxv(self, key: int) -> int | None:
        """Value of auxv entry ``key`` (AT_*), or None."""
        words = self.mm_saved_auxv
        for i in range(0, len(words) - 1, 2):
            if words[i] == key:
                return words[i + 1]
        return None

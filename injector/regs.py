"""Register sets of a stopped thread: the architecture value and the x86_64 general registers.

Field names and order are CRIU's ``user_x86_regs_entry`` (``images/core-x86.proto``), which is
the kernel's ``struct user_regs_struct`` (``arch/x86/include/asm/user_64.h``) with the leading
``r`` and ``e`` dropped. Values are unsigned 64-bit, as in the image (``orig_ax`` of a thread
that is not in a syscall reads ``2**64 - 1``).
"""

from __future__ import annotations

import ctypes
import enum
import os

import attrs

__all__ = ["REG_NAMES", "Arch", "UserRegsStruct", "X86Regs"]

REG_NAMES: tuple[str, ...] = (
    "r15",
    "r14",
    "r13",
    "r12",
    "bp",
    "bx",
    "r11",
    "r10",
    "r9",
    "r8",
    "ax",
    "cx",
    "dx",
    "si",
    "di",
    "orig_ax",
    "ip",
    "cs",
    "flags",
    "sp",
    "ss",
    "fs_base",
    "gs_base",
    "ds",
    "es",
    "fs",
    "gs",
)


class Arch(enum.Enum):
    """Target architectures. Only ``X86_64`` is implemented; ``AARCH64`` is named so the
    interface (regsets, syscall numbers, the syscall instruction) can grow there."""

    X86_64 = "x86_64"
    AARCH64 = "aarch64"

    @classmethod
    def host(cls) -> Arch:
        """The architecture of this machine (raises ``ValueError`` for any other)."""
        return cls(os.uname().machine)

    @property
    def syscall_insn(self) -> bytes:
        """The bytes of the instruction that enters the kernel."""
        return b"\x0f\x05" if self is Arch.X86_64 else b"\x01\x00\x00\xd4"  # svc #0


class UserRegsStruct(ctypes.Structure):
    """``struct user_regs_struct`` for x86_64 (the NT_PRSTATUS regset)."""

    _fields_ = [(name, ctypes.c_uint64) for name in REG_NAMES]


@attrs.frozen
class X86Regs:
    """General-purpose registers of one x86_64 thread (CRIU ``user_x86_regs_entry``)."""

    r15: int
    r14: int
    r13: int
    r12: int
    bp: int
    bx: int
    r11: int
    r10: int
    r9: int
    r8: int
    ax: int
    cx: int
    dx: int
    si: int
    di: int
    orig_ax: int
    ip: int
    cs: int
    flags: int
    sp: int
    ss: int
    fs_base: int
    gs_base: int
    ds: int
    es: int
    fs: int
    gs: int

    @classmethod
    def from_struct(cls, raw: UserRegsStruct) -> X86Regs:
        """Copy out of the kernel structure."""
        return cls(*(getattr(raw, name) for name in REG_NAMES))

    def to_struct(self) -> UserRegsStruct:
        """The kernel structure with these values (each masked to 64 bits)."""
        mask = (1 << 64) - 1
        return UserRegsStruct(*(getattr(self, name) & mask for name in REG_NAMES))

    def as_dict(self) -> dict[str, int]:
        """Field name -> value, in CRIU order."""
        return {name: getattr(self, name) for name in REG_NAMES}

"""The x86 XSAVE area as PTRACE_GETREGSET(NT_X86_XSTATE) returns it, and CRIU's view of it.

The ptrace buffer is in the *standard* (non-compacted) format: a 512-byte FXSAVE legacy area,
a 64-byte XSAVE header (``xstate_bv`` first), then each user state component at the offset the
CPU reports in CPUID leaf 0xD, sub-leaf = component number (Intel SDM vol. 1, 13.4-13.5).
CRIU stores the same state as ``user_x86_fpregs_entry`` (legacy fields) plus
``user_x86_xsave_entry`` (one repeated field per component; criu/arch/x86/include/asm/fpu.h).

The offsets come from CPUID, run through a 27-byte function mapped executable with ctypes; if
the platform forbids executable anonymous memory, the architectural defaults are used (they
are what every Intel and AMD CPU with these components reports).
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import platform
import struct
from typing import Any

from formats.core import UserX86FpregsEntry

__all__ = ["COMPONENTS", "component_layout", "fpregs_into_xstate", "xstate_to_fpregs"]

# component number -> (CRIU xsave field, element format, element count)
COMPONENTS: dict[int, tuple[str, str, int]] = {
    2: ("ymmh_space", "I", 64),  # upper 128 bits of YMM0-15
    3: ("bndreg_state", "Q", 8),  # MPX BND0-3
    4: ("bndcsr_state", "Q", 8),  # MPX BNDCFGU, BNDSTATUS (CRIU keeps 8 words)
    5: ("opmask_reg", "Q", 8),  # AVX-512 k0-k7
    6: ("zmm_upper", "Q", 64),  # upper 256 bits of ZMM0-15
    7: ("hi16_zmm", "Q", 128),  # ZMM16-31
    9: ("pkru", "I", 2),  # PKRU (+ 4 bytes of padding)
}
_DEFAULT_OFFSETS = {2: 576, 3: 960, 4: 1024, 5: 1088, 6: 1152, 7: 1664, 9: 2688}

# FXSAVE legacy area: CRIU field -> (offset, struct format)
_LEGACY: dict[str, tuple[int, str]] = {
    "cwd": (0, "<H"),
    "swd": (2, "<H"),
    "twd": (4, "<H"),
    "fop": (6, "<H"),
    "rip": (8, "<Q"),
    "rdp": (16, "<Q"),
    "mxcsr": (24, "<I"),
    "mxcsr_mask": (28, "<I"),
}
_ST_SPACE = (32, 32)  # offset, number of u32 words
_XMM_SPACE = (160, 64)
_XSTATE_BV = 512
# Linux puts struct _fpx_sw_bytes in the legacy area's software-reserved bytes 464..511:
# magic1 0x46505853, extended_size, xfeatures (the enabled components), xstate_size.
_SW_BYTES = 464
_FP_XSTATE_MAGIC1 = 0x46505853

# push rbx; mov r8,rdx; mov eax,edi; mov ecx,esi; cpuid; mov [r8],eax; mov [r8+4],ebx;
# mov [r8+8],ecx; mov [r8+12],edx; pop rbx; ret
_CPUID_CODE = bytes.fromhex(
    "534989d089f889f10fa24189004189580441894808418950 0c5bc3".replace(" ", "")
)


@functools.cache
def _cpuid(leaf: int, subleaf: int) -> tuple[int, int, int, int] | None:
    if platform.machine() not in ("x86_64", "AMD64"):
        return None
    try:
        page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except (OSError, PermissionError):
        return None
    try:
        page.write(_CPUID_CODE)
        out = (ctypes.c_uint32 * 4)()
        addr = ctypes.addressof(ctypes.c_char.from_buffer(page))
        func = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_void_p)(addr)
        func(leaf, subleaf, ctypes.addressof(out))
        del func
        return out[0], out[1], out[2], out[3]
    finally:
        page.close()


@functools.cache
def component_layout() -> dict[int, tuple[int, int]]:
    """Component number -> (offset, size) in the standard-format XSAVE area of this CPU."""
    layout: dict[int, tuple[int, int]] = {}
    for comp, (_field, fmt, count) in COMPONENTS.items():
        regs = _cpuid(0xD, comp)
        if regs is not None and regs[0]:
            layout[comp] = (regs[1], regs[0])
        else:
            layout[comp] = (_DEFAULT_OFFSETS[comp], struct.calcsize(fmt) * count)
    return layout


def _enabled_features(xstate: bytes) -> int:
    """Components the kernel's buffer holds: its sw_bytes say so when present (signal frames
    and older kernels); otherwise the CPU's XCR0-supported bits (CPUID 0xD.0 EAX) whose
    component fits inside the buffer the kernel handed out (it is sized for what is enabled)."""
    magic, _ext, xfeatures, _size = struct.unpack_from("<IIQI", xstate, _SW_BYTES)
    if magic == _FP_XSTATE_MAGIC1:
        return int(xfeatures)
    regs = _cpuid(0xD, 0)
    supported = regs[0] if regs is not None else 0x7
    enabled = 0x3
    for comp, (off, size) in component_layout().items():
        if supported & (1 << comp) and off + size <= len(xstate):
            enabled |= 1 << comp
    return enabled


def fpregs_into_xstate(fpregs: UserX86FpregsEntry, live: bytes) -> bytes:
    """The live XSAVE buffer with the image's FPU/SSE/AVX state written into it.

    ``fpregs`` is a ``user_x86_fpregs_entry``. Components the image has but this CPU does not
    enable raise ``ValueError`` (the caller reports it as a mismatch). What to write where
    depends on the image and on the buffer's size and enabled components only, so it is
    worked out once per image thread (``_patches``) and laid over each live buffer."""
    enabled = _enabled_features(live) if len(live) > _XSTATE_BV else 0
    buf = bytearray(live)
    for off, data in _patches(fpregs, enabled, len(live)):
        buf[off : off + len(data)] = data
    return bytes(buf)


# id(fpregs) -> (fpregs, enabled, buffer size, its patches): a restore lays the same image
# thread's state over a new live buffer every time (10 threads of memcached: a conversion
# took 130 us, profiled, and laying the patches over 30).
_PATCHED: dict[int, tuple[object, int, int, tuple[tuple[int, bytes], ...]]] = {}


def _patches(fpregs: UserX86FpregsEntry, enabled: int, size: int) -> tuple[tuple[int, bytes], ...]:
    kept = _PATCHED.get(id(fpregs))
    if kept is not None and kept[0] is fpregs and kept[1:3] == (enabled, size):
        return kept[3]
    out: list[tuple[int, bytes]] = []
    for name, (off, fmt) in _LEGACY.items():
        out.append((off, struct.pack(fmt, int(getattr(fpregs, name)) & _mask(fmt))))
    for field, (off, words) in (("st_space", _ST_SPACE), ("xmm_space", _XMM_SPACE)):
        values = list(getattr(fpregs, field))
        if values:
            if len(values) != words:
                raise ValueError(f"fpregs.{field} has {len(values)} words, expected {words}")
            out.append((off, struct.pack(f"<{words}I", *values)))
    xsave = getattr(fpregs, "xsave", None)
    if xsave is not None and size > _XSTATE_BV:
        bv = int(xsave.xstate_bv)
        missing = bv & ~enabled
        if missing:
            raise ValueError(f"image uses xsave components {missing:#x} this CPU does not enable")
        layout = component_layout()
        for comp, (field, fmt, _count) in COMPONENTS.items():
            values = list(getattr(xsave, field, []) or [])
            if not values or not enabled & (1 << comp):
                continue
            off, csize = layout[comp]
            data = struct.pack(f"<{len(values)}{fmt}", *values)[:csize]
            if off + len(data) > size:
                raise ValueError(f"xsave component {comp} lies outside the {size}-byte buffer")
            out.append((off, data))
        out.append((_XSTATE_BV, struct.pack("<Q", bv)))
    patches = tuple(out)
    if len(_PATCHED) >= 1024:
        _PATCHED.clear()
    _PATCHED[id(fpregs)] = (fpregs, enabled, size, patches)
    return patches


def xstate_to_fpregs(xstate: bytes) -> dict[str, Any]:
    """CRIU ``user_x86_fpregs_entry`` field values (and ``xsave`` dict) of a live XSAVE buffer."""
    out: dict[str, Any] = {
        name: struct.unpack_from(fmt, xstate, off)[0] for name, (off, fmt) in _LEGACY.items()
    }
    out["st_space"] = list(struct.unpack_from(f"<{_ST_SPACE[1]}I", xstate, _ST_SPACE[0]))
    out["xmm_space"] = list(struct.unpack_from(f"<{_XMM_SPACE[1]}I", xstate, _XMM_SPACE[0]))
    if len(xstate) > _XSTATE_BV + 8:
        enabled = _enabled_features(xstate)
        xsave: dict[str, Any] = {"xstate_bv": struct.unpack_from("<Q", xstate, _XSTATE_BV)[0]}
        layout = component_layout()
        for comp, (field, fmt, count) in COMPONENTS.items():
            off, _size = layout[comp]
            if enabled & (1 << comp) and off + struct.calcsize(fmt) * count <= len(xstate):
                xsave[field] = list(struct.unpack_from(f"<{count}{fmt}", xstate, off))
        out["xsave"] = xsave
    return out


def _mask(fmt: str) -> int:
    return (1 << (8 * struct.calcsize(fmt))) - 1

"""Image registers -> live thread registers (x86_64), including interrupted system calls.

A thread checkpointed inside a system call has ``ip`` just past the ``syscall`` instruction,
``orig_ax`` = the call number and ``ax`` = the kernel's restart code. Restoring those values
verbatim would make the kernel's restart logic (arch/x86/kernel/signal.c) act on them with
*this* thread's restart state, which for -ERESTART_RESTARTBLOCK belongs to another call.
Instead the call is restarted by hand, as CRIU's compel does for the restartable codes: ``ip``
goes back to the ``syscall`` instruction, ``ax`` gets the call number again and ``orig_ax``
becomes -1 so the kernel does nothing more. The original arguments are still in their
registers (``syscall`` preserves them), so the call runs again from the start: a relative
sleep sleeps its full time again. -EINTR and other plain results are left as they are: the
thread sees the call return that value, exactly as in the checkpoint.
"""

from __future__ import annotations

from formats.core import UserX86RegsEntry
from injector.regs import REG_NAMES

__all__ = [
    "ERESTART_CODES",
    "GP_FIELDS",
    "NR_RESTART_SYSCALL",
    "SYSCALL_INSN",
    "gpregs_values",
    "restart_adjusted",
    "to_signed",
]

GP_FIELDS = REG_NAMES  # user_regs_struct order = CRIU user_x86_regs_entry fields 1..27

ERESTARTSYS = 512
ERESTARTNOINTR = 513
ERESTARTNOHAND = 514
ERESTART_RESTARTBLOCK = 516
ERESTART_CODES = (ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND, ERESTART_RESTARTBLOCK)
SYSCALL_INSN = b"\x0f\x05"
NR_RESTART_SYSCALL = 219  # what a thread resumed into -ERESTART_RESTARTBLOCK runs
_U64 = (1 << 64) - 1


def to_signed(value: int) -> int:
    value &= _U64
    return value - (1 << 64) if value >= 1 << 63 else value


def gpregs_values(gpregs: UserX86RegsEntry) -> dict[str, int]:
    """The 27 user_regs_struct values of a CRIU ``user_x86_regs_entry``, as unsigned u64."""
    mode = getattr(gpregs, "mode", None)
    if mode not in (None, 1):
        raise ValueError("32-bit (compat) register sets are not supported")
    return {name: int(getattr(gpregs, name)) & _U64 for name in GP_FIELDS}


def restart_adjusted(values: dict[str, int]) -> tuple[dict[str, int], bool]:
    """Registers to set so an interrupted syscall restarts cleanly; whether it was rewound."""
    orig_ax, ax = to_signed(values["orig_ax"]), to_signed(values["ax"])
    if orig_ax < 0 or -ax not in ERESTART_CODES:
        return dict(values), False
    out = dict(values)
    out["ip"] = (values["ip"] - len(SYSCALL_INSN)) & _U64
    out["ax"] = values["orig_ax"]
    out["orig_ax"] = _U64  # -1: not in a syscall, the kernel must not restart anything
    return out, True

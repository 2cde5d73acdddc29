"""The register step: a thread's general-purpose registers and FP/XSAVE state set from its
``core-<tid>.img``, with an interrupted syscall set up to restart (``applier.regs``), and the
checks that must pass before anything is written (registers of this architecture, a
``syscall`` instruction to restart from, the same rseq registration, XSAVE components this
CPU enables)."""

from __future__ import annotations

import attrs

from applier import regs as regmod
from applier import xsave
from applier.errors import MismatchError, VerifyFailed
from applier.executor.context import Context
from applier.plan import SetRegs
from applier.undo.log import UndoRegs
from formats.core import CoreEntry, ThreadInfoX86
from injector.memo import remember

__all__ = ["image_regs", "set_regs", "validate_regs", "verify_regs"]

_SELECTORS = frozenset({"fs", "gs", "ds", "es", "cs", "ss"})  # the kernel may normalise them

# What an image's registers come to, kept from one apply to the next (the images' cores are
# parsed once and kept, so the same objects come back; each entry holds its object, checked
# by identity): the restart-adjusted registers of a ``gpregs`` (12 us a thread), and the
# XSAVE buffer a thread's live one becomes with the image's FP state (23 us a thread; an idle
# thread's live buffer is the same at every reset). A warm reset of memcached (ten threads):
# 7.10 against 7.21 ms and 5.90 against 5.94 without, alternating rounds, medians of 40, two
# runs. Cleared past 1024 and 64 entries (the second holds two XSAVE buffers each).
_ADJUSTED: dict[int, tuple[object, dict[str, int], bool]] = {}
_XSTATES: dict[tuple[int, bytes], tuple[object, bytes]] = {}


def _thread_info(ctx: Context, step: SetRegs) -> ThreadInfoX86:
    core: CoreEntry | None = ctx.cores.get(step.image_tid)
    if core is None or core.thread_info is None:
        raise MismatchError(f"core-{step.image_tid}.img has no x86_64 registers")
    return core.thread_info


def image_regs(ctx: Context, step: SetRegs) -> tuple[dict[str, int], bool]:
    """The registers to set (restart-adjusted) and whether an interrupted call is rewound;
    worked out once per apply and thread (validation, the write and its check ask again)."""
    done = ctx.image_regs.get(step.image_tid)
    if done is not None:
        return dict(done[0]), done[1]
    gpregs = _thread_info(ctx, step).gpregs
    kept = _ADJUSTED.get(id(gpregs))
    if kept is not None and kept[0] is gpregs:
        adjusted, rewound = kept[1], kept[2]
    else:
        try:
            values = regmod.gpregs_values(gpregs)
        except ValueError as exc:
            raise MismatchError(f"core-{step.image_tid}.img: {exc}") from exc
        adjusted, rewound = regmod.restart_adjusted(values)
        remember(_ADJUSTED, id(gpregs), (gpregs, adjusted, rewound), 1024)
    if rewound and ctx.process.read(adjusted["ip"], 2) != regmod.SYSCALL_INSN:
        raise MismatchError(
            f"thread {step.tid}: saved inside a syscall, but no syscall instruction "
            f"at {adjusted['ip']:#x} to restart it from",
        )
    ctx.image_regs[step.image_tid] = (adjusted, rewound)
    return dict(adjusted), rewound


def _rseq_text(rseq: tuple[int, int] | None) -> str:
    return "none" if rseq is None else f"{rseq[0]:#x}"


def _check_rseq(ctx: Context, step: SetRegs) -> None:
    """Refuse to rewind a thread whose rseq registration changed since the checkpoint.

    The registration is kernel state that applying cannot undo: a thread checkpointed before
    glibc registered its rseq area (a thread that was just starting) would run the
    registration again, the kernel would refuse it and glibc would abort the process.
    """
    core = ctx.cores[step.image_tid]
    tc = core.thread_core
    if tc is None:
        return  # no thread state in the image (older dumps): nothing to compare
    saved = tc.rseq_entry
    want = None if saved is None else (saved.rseq_abi_pointer, saved.signature)
    live = ctx.process.rseq_config(step.tid)
    have = None if live is None else (live[0], live[2])
    if want != have:
        raise MismatchError(
            f"thread {step.tid}: rseq area {_rseq_text(have)} now, {_rseq_text(want)} in the "
            "image (registered after the checkpoint: its registers cannot be rewound; leave "
            "registers out with --restore memory,layout,brk)",
        )


def _image_xstate(ctx: Context, step: SetRegs) -> tuple[bytes, bytes] | None:
    """(the thread's XSAVE buffer, it with the image's FP state), or None if the image has
    no FP state; found once per apply (the thread is stopped meanwhile)."""
    fpregs = _thread_info(ctx, step).fpregs
    if fpregs is None:
        return None
    found = ctx.xstates.get(step.tid)
    if found is None:
        live = ctx.process.get_xstate(step.tid)
        key = (id(fpregs), live)
        kept = _XSTATES.get(key)
        if kept is not None and kept[0] is fpregs:
            found = live, kept[1]
        else:
            try:
                found = live, xsave.fpregs_into_xstate(fpregs, live)
            except ValueError as exc:
                raise MismatchError(f"thread {step.tid}: {exc}") from exc
            remember(_XSTATES, key, (fpregs, found[1]), 64)
        ctx.xstates[step.tid] = found
    return found


def validate_regs(ctx: Context, step: SetRegs) -> None:
    image_regs(ctx, step)
    _image_xstate(ctx, step)
    _check_rseq(ctx, step)


def set_regs(ctx: Context, step: SetRegs) -> None:
    """The image's registers and FP state into the thread; what already equals the image
    (an idle thread back where it was) is not written again."""
    values, rewound = image_regs(ctx, step)
    live = ctx.process.get_regs(step.tid)
    xstates = _image_xstate(ctx, step)
    live_xstate = xstates[0] if xstates is not None else ctx.process.get_xstate(step.tid)
    ctx.undo.add(UndoRegs(step.tid, live, live_xstate))
    if xstates is not None and xstates[1] != live_xstate:
        ctx.process.set_xstate(step.tid, xstates[1])
    new = attrs.evolve(live, **values)
    if new != live:
        ctx.process.set_regs(step.tid, new)
    ctx.stats.threads += 1
    ctx.stats.syscalls_restarted += rewound


def verify_regs(ctx: Context, step: SetRegs) -> None:
    values, _ = image_regs(ctx, step)
    got = ctx.process.get_regs(step.tid).as_dict()
    for name, expected in values.items():
        if name not in _SELECTORS and got[name] & ((1 << 64) - 1) != expected:
            raise VerifyFailed(f"thread {step.tid}: register {name} not restored")

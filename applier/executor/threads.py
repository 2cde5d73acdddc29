"""The thread steps: a thread started since the checkpoint is ended (an ``exit`` run in it), a
thread gone since is created again with the state CRIU's restorer gives a thread
(``criu/pie/restorer.c``): its id (clone3 ``set_tid``), TLS base, tid address, robust futex
list, rseq area, name, alternate signal stack, blocked signals, registers and FP state from
``core-<tid>.img``.

Both are undone by the other: the undo log keeps what an ended thread needs to be created
again, and a created thread is ended by a rollback.
"""

from __future__ import annotations

import attrs

from applier import xsave
from applier.errors import MismatchError, VerifyFailed
from applier.executor.context import Context
from applier.executor.registers import image_regs, verify_regs
from applier.executor.signals import check_sigmask
from applier.plan import EndThread, NewThread, SetRegs
from applier.undo.log import UndoThreadCreated, UndoThreadEnded
from formats.core import CoreEntry, ThreadCoreEntry, ThreadSasEntry
from injector.process import Process

__all__ = [
    "end_thread",
    "new_thread",
    "recreate",
    "validate_end",
    "validate_new",
    "verify_end",
    "verify_new",
]


def validate_end(ctx: Context, step: EndThread) -> None:
    if step.tid == ctx.process.pid:
        raise MismatchError(f"thread {step.tid} is the leader: it cannot be ended alone")
    if step.tid not in ctx.process.tids:
        raise MismatchError(f"thread {step.tid} is not a thread of pid {ctx.process.pid}")


def end_thread(ctx: Context, step: EndThread) -> None:
    p, tid = ctx.process, step.tid
    extras = p.thread_extras([tid])[tid]
    ctx.undo.add(
        UndoThreadEnded(
            tid,
            p.get_regs(tid),
            p.get_xstate(tid),
            p.get_sigmask(tid),
            p.rseq_config(tid),
            p.robust_list(tid),
            extras.clear_tid,
            p.comm(tid),
            extras.altstack,
        )
    )
    p.end_thread(tid)
    ctx.stats.threads_ended += 1


def verify_end(ctx: Context, step: EndThread) -> None:
    if step.tid in ctx.process.tids:
        raise VerifyFailed(f"thread {step.tid} was not ended")


def _thread_core(ctx: Context, tid: int) -> tuple[CoreEntry, ThreadCoreEntry | None]:
    core = ctx.cores.get(tid)
    if core is None or core.thread_info is None:
        raise MismatchError(f"core-{tid}.img has no x86_64 registers: thread {tid} cannot be "
                            "created again")  # fmt: skip
    return core, core.thread_core


def _as_regs(step: NewThread) -> SetRegs:
    return SetRegs(step.tid, step.tid)


def validate_new(ctx: Context, step: NewThread) -> None:
    """The image has what the thread needs, and its id can be had (free, and the target or
    applier may choose it)."""
    core, _ = _thread_core(ctx, step.tid)
    image_regs(ctx, _as_regs(step))
    assert core.thread_info is not None
    if not core.thread_info.clear_tid_addr:
        raise MismatchError(
            f"core-{step.tid}.img has no tid address (thread_info.clear_tid_addr; dumped by an "
            f"older applier?): thread {step.tid} cannot be created again "
            "without it (pthread_join would wait for it forever)",
        )
    fpregs = core.thread_info.fpregs
    if fpregs is not None:
        try:
            xsave.fpregs_into_xstate(fpregs, ctx.process.get_xstate(ctx.process.pid))
        except ValueError as exc:
            raise MismatchError(f"thread {step.tid}: {exc}") from exc
    why = ctx.process.tid_unavailable(step.tid)
    if why is not None:
        raise MismatchError(
            f"thread {step.tid} of the image ended since the checkpoint and cannot be created "
            f"again: {why}; --restore memory,layout,brk leaves threads and registers out",
        )


def new_thread(ctx: Context, step: NewThread) -> None:
    core, tc = _thread_core(ctx, step.tid)
    assert core.thread_info is not None
    values, rewound = image_regs(ctx, _as_regs(step))
    p = ctx.process
    tid = p.new_thread(
        tls=values["fs_base"],
        clear_tid=core.thread_info.clear_tid_addr,
        tid=step.tid,
        name=tc.comm if tc is not None and tc.comm else "",
        altstack=None if tc is None or tc.sas is None else _altstack(tc.sas),
    )
    ctx.undo.add(UndoThreadCreated(tid))
    if tc is not None:
        r = tc.rseq_entry
        _register(
            p, tid, (tc.futex_rla, tc.futex_rla_len),
            None if r is None else (r.rseq_abi_pointer, r.rseq_abi_size, r.signature),
        )  # fmt: skip
    fpregs = core.thread_info.fpregs
    if fpregs is not None:
        p.set_xstate(tid, xsave.fpregs_into_xstate(fpregs, p.get_xstate(tid)))
    p.set_regs(tid, attrs.evolve(p.get_regs(tid), **values))
    p.set_sigmask(tid, _blocked(core))
    ctx.stats.threads_created += 1
    ctx.stats.threads += 1
    ctx.stats.syscalls_restarted += rewound


def _register(
    p: Process, tid: int, robust: tuple[int, int], rseq: tuple[int, int, int] | None
) -> None:
    """What a new thread registers with the kernel itself, run in it: its robust futex list
    (head, length) and its rseq area (address, size, signature)."""
    if robust[0]:
        p.call("set_robust_list", *robust, tid=tid)
    if rseq is not None:
        p.call("rseq", rseq[0], rseq[1], 0, rseq[2], tid=tid)


def _altstack(sas: ThreadSasEntry) -> tuple[int, int, int]:
    return int(sas.ss_sp), int(sas.ss_size), int(sas.ss_flags)


def _blocked(core: CoreEntry) -> int:
    """The thread's blocked signals as the image has them (the leader's are in ``tc``)."""
    tc = core.thread_core
    if tc is not None and tc.blk_sigset is not None:
        return int(tc.blk_sigset)
    if core.tc is not None and core.tc.blk_sigset is not None:
        return int(core.tc.blk_sigset)
    return 0


def verify_new(ctx: Context, step: NewThread) -> None:
    if step.tid not in ctx.process.tids:
        raise VerifyFailed(f"thread {step.tid} was not created")
    verify_regs(ctx, _as_regs(step))
    core, _ = _thread_core(ctx, step.tid)
    check_sigmask(ctx, step.tid, _blocked(core))


def recreate(process: Process, rec: UndoThreadEnded) -> None:
    """Rollback of an ended thread: the same thread again, as it was when it was ended."""
    tid = process.new_thread(
        tls=rec.regs.fs_base,
        clear_tid=rec.clear_tid,
        tid=rec.tid,
        name=rec.name,
        altstack=rec.altstack,
    )
    _register(process, tid, rec.robust, rec.rseq)
    process.set_xstate(tid, rec.xstate)
    process.set_regs(tid, rec.regs)
    process.set_sigmask(tid, rec.sigmask)

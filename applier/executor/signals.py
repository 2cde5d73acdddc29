"""The signal steps: dispositions set with injected ``rt_sigaction`` calls (handler, flags,
restorer and mask as the image has them), each thread's blocked mask with PTRACE_SETSIGMASK.

Dispositions are read back right after they are set: the verification pass runs after the
page writes, when no call may run in the target any more (``applier.executor``), so it
compares what was read here. Masks are read back by ptrace during verification.
"""

from __future__ import annotations

from applier.errors import VerifyFailed
from applier.executor.context import Context
from applier.model import Sigaction
from applier.plan import SetSigactions, SetSigmask
from applier.plan.steps import signal_name
from applier.undo.log import UndoSigactions, UndoSigmask

__all__ = ["check_sigmask", "set_sigactions", "set_sigmask", "verify_sigactions", "verify_sigmask"]

_UNBLOCKABLE = (1 << 8) | (1 << 18)  # SIGKILL, SIGSTOP


def _expected(a: Sigaction) -> tuple[int, int, int, int]:
    return a.handler, a.flags, a.restorer, a.mask & ~_UNBLOCKABLE


def set_sigactions(ctx: Context, step: SetSigactions) -> None:
    old = {sig: a for sig, a, _ in step.actions if a is not None}
    unknown = [sig for sig, a, _ in step.actions if a is None]
    old.update({sig: Sigaction(*v) for sig, v in ctx.process.sigactions(unknown).items()})
    ctx.undo.add(UndoSigactions(tuple((sig, old[sig].as_tuple()) for sig, _, _ in step.actions)))
    ctx.process.set_sigactions({sig: new.as_tuple() for sig, _, new in step.actions})
    ctx.read_back[step] = ctx.process.sigactions([sig for sig, _, _ in step.actions])
    ctx.stats.signals += len(step.actions)


def verify_sigactions(ctx: Context, step: SetSigactions) -> None:
    got = ctx.read_back.get(step)
    if got is None:
        return  # not run (nothing to compare)
    for sig, _, new in step.actions:
        if got.get(sig) != _expected(new):
            raise VerifyFailed(f"{signal_name(sig)}: disposition not restored")


def set_sigmask(ctx: Context, step: SetSigmask) -> None:
    ctx.undo.add(UndoSigmask(step.tid, ctx.process.get_sigmask(step.tid)))
    ctx.process.set_sigmask(step.tid, step.new)
    ctx.stats.sigmasks += 1


def verify_sigmask(ctx: Context, step: SetSigmask) -> None:
    check_sigmask(ctx, step.tid, step.new)


def check_sigmask(ctx: Context, tid: int, mask: int) -> None:
    """Raise VerifyFailed unless thread ``tid`` blocks ``mask`` (less what cannot be)."""
    if ctx.process.get_sigmask(tid) != mask & ~_UNBLOCKABLE:
        raise VerifyFailed(f"thread {tid}: blocked signals not restored")

"""Planning the signal part: dispositions and blocked masks back to the image's; what is
pending in the image is reported, never raised again.

CRIU's restore installs every saved ``sa_entry`` with a raw ``rt_sigaction`` (criu/sigact.c:
libc's wrapper would replace ``sa_restorer``) and gives each thread its ``blk_sigset``
(criu/pie/restorer.c); pending signals it queues again with ``rt_sigqueueinfo``. Applying
into a running process puts back the dispositions and the masks the same way. A queued signal
cannot be taken back out of the live process nor put in without running its handler at a
moment the program did not choose, so the image's queue is reported in the plan's notes.
"""

from __future__ import annotations

from collections.abc import Sequence

from applier.errors import MismatchError
from applier.model import PROT_EXEC, ImageTask, LiveTask, Sigaction, SignalState
from applier.parts import Part
from applier.plan.steps import SetSigactions, SetSigmask, Step, signal_name
from formats.signals import SA_RESTORER, SIGACTION_SIGNALS

__all__ = ["plan_signals"]

_UNBLOCKABLE = (1 << 8) | (1 << 18)  # SIGKILL, SIGSTOP: the kernel never blocks them
_ITIMERS = ("ITIMER_REAL", "ITIMER_VIRTUAL", "ITIMER_PROF")


def plan_signals(
    image: ImageTask, live: LiveTask, pairs: Sequence[tuple[int, int]], notes: list[str]
) -> list[Step]:
    """The sigaction step (the signals whose disposition differs) and one sigmask step per
    thread whose blocked mask differs. A read-only live side (``diff``, dry runs: nothing
    injected) knows the dispositions only by kind (/proc: default, ignored, handled): a
    signal handled on both sides is planned with an unknown old value."""
    saved, now = image.signals, live.signals
    if saved is None:
        notes.append("the image holds no signal state: dispositions and masks left as they are")
        return []
    if now is None:
        return []
    steps: list[Step] = []
    actions: list[tuple[int, Sigaction | None, Sigaction]] = []
    unread: list[int] = []
    for sig in SIGACTION_SIGNALS:
        new = saved.actions[sig]
        old = now.actions.get(sig)
        if old is not None:
            if old != new:
                actions.append((sig, old, new))
        elif now.kind(sig) != new.kind:
            actions.append((sig, None, new))
        elif new.kind == "handler":
            actions.append((sig, None, new))
            unread.append(sig)
    _check_handlers(image, actions)
    if actions:
        steps.append(SetSigactions(tuple(actions), tuple(unread)))
    for tid, image_tid in pairs:
        want = saved.blocked.get(image_tid)
        have = now.blocked.get(tid)
        if want is None or have is None:
            continue
        want &= ~_UNBLOCKABLE
        if want != have:
            steps.append(SetSigmask(tid, image_tid, have, want))
    _report(saved, notes)
    return steps


def _check_handlers(
    image: ImageTask, actions: list[tuple[int, Sigaction | None, Sigaction]]
) -> None:
    """Refuse (before anything is written) a handler or ``sa_restorer`` the image's own
    layout has no executable memory for: the first such signal would crash the target."""
    code = [(r.start, r.end) for r in image.regions if r.prot & PROT_EXEC]
    for sig, _, new in actions:
        places = [("handler", new.handler)] if new.kind == "handler" else []
        if new.flags & SA_RESTORER:
            places.append(("sa_restorer", new.restorer))
        for what, addr in places:
            if not any(a <= addr < b for a, b in code):
                raise MismatchError(
                    f"{signal_name(sig)}: the image's {what} {addr:#x} is not in executable "
                    "memory of the image; leave signals out with --restore "
                    + ",".join(p for p in Part.names() if p != "signals")
                )


def _report(saved: SignalState, notes: list[str]) -> None:
    for tid, sig, code in saved.pending:
        where = "the process" if tid == 0 else f"thread {tid}"
        notes.append(
            f"{signal_name(sig)} (si_code {code}) was pending for {where} at the checkpoint: "
            "reported, not raised again"
        )
    for name, (isec, iusec, vsec, vusec) in zip(_ITIMERS, saved.itimers, strict=False):
        if vsec or vusec:
            notes.append(
                f"{name} was armed at the checkpoint ({vsec}.{vusec:06d}s left, interval "
                f"{isec}.{iusec:06d}s): left as it is"
            )

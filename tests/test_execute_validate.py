"""Executor validation rules, on an in-memory fake session (the live proof is in
tests/test_apply_live.py; these check the refusals that are hard to provoke in a real process).
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Sequence

import pytest

from applier.errors import ApplyFailed, MismatchError
from applier.executor import Executor
from applier.model import MM_FIELDS, Kind, Region
from applier.plan import MapFile, Plan, SetMm, SetRegs, Step
from applier.undo.log import UndoLog
from formats.core import CoreEntry, RseqEntry, ThreadCoreEntry, ThreadInfoX86, UserX86RegsEntry
from injector.testing import FakeProcess

IP = 0x401000


def fake(memory: dict[int, bytes], rseq: tuple[int, int, int] | None) -> FakeProcess:
    """A fake stopped process, pid 100 with one thread, holding ``memory`` (in one page
    each) and the rseq registration ``rseq``."""
    proc = FakeProcess(100, tids=[100])
    proc.rseq[100] = rseq
    for addr, data in memory.items():
        proc.map_anon(addr - addr % 4096, 1, 5)
        proc.poke(addr, data)
    return proc


def core(*, ax: int = 0, orig_ax: int = -1, rseq: int | None = 0x7000) -> CoreEntry:
    mask = 2**64 - 1
    regs = UserX86RegsEntry(ip=IP, ax=ax & mask, orig_ax=orig_ax & mask, cs=0x33, ss=0x2B)
    tc = ThreadCoreEntry(futex_rla=0, futex_rla_len=0)
    if rseq is not None:
        tc.rseq_entry = RseqEntry(rseq_abi_pointer=rseq, rseq_abi_size=32, signature=0x53053053)
    return CoreEntry(mtype=1, thread_info=ThreadInfoX86(gpregs=regs), thread_core=tc)


def executor(steps: Sequence[Step], cores: dict[int, CoreEntry], proc: FakeProcess) -> Executor:
    plan = Plan(pid=100, image_pid=100, page_size=4096, steps=tuple(steps), notes=())
    return Executor(proc, plan, cores, UndoLog.disabled())


def test_same_rseq_registration_validates() -> None:
    """Thread registered rseq at the same address then and now: fine."""
    executor([SetRegs(100, 100)], {100: core()}, fake({}, (0x7000, 32, 0x53053053))).validate()


def test_rseq_registered_after_checkpoint_is_refused() -> None:
    """A thread that registered rseq after the checkpoint cannot have its registers rewound."""
    ex = executor([SetRegs(100, 100)], {100: core(rseq=None)}, fake({}, (0x7000, 32, 1)))
    with pytest.raises(MismatchError, match="rseq area 0x7000 now, none in the image"):
        ex.validate()


def test_restart_needs_a_syscall_instruction() -> None:
    """Saved inside a syscall but no 0f 05 before ip: refused before anything is written."""
    ex = executor(
        [SetRegs(100, 100)],
        {100: core(ax=-512, orig_ax=0)},
        fake({IP - 2: b"\x90\x90"}, (0x7000, 32, 0x53053053)),
    )
    with pytest.raises(MismatchError, match="no syscall instruction"):
        ex.validate()
    ok = fake({IP - 2: b"\x0f\x05"}, (0x7000, 32, 0x53053053))
    executor([SetRegs(100, 100)], {100: core(ax=-512, orig_ax=0)}, ok).validate()


def test_file_to_map_again_must_exist() -> None:
    """Re-mapping a private file mapping whose file is gone: refused, naming the file."""
    gone = Region(0x7000000, 0x7001000, 1, Kind.FILE, path="/nonexistent/lib.so")
    ex = executor([MapFile(gone)], {}, fake({}, None))
    with pytest.raises(MismatchError, match=re.escape("/nonexistent/lib.so")):
        ex.validate()


def test_refused_mm_change_rolls_back_without_repeating_it() -> None:
    """PR_SET_MM_MAP refused: ApplyFailed (exit 6, rolled back), the call is not repeated."""
    fields = {name: (0x1000 * i, 0x1000 * i) for i, name in enumerate(MM_FIELDS, 1)}
    fields["mm_arg_start"], fields["mm_arg_end"] = (0x8000, 0x9000), (0x8100, 0x9100)
    step = SetMm(tuple((name, old, new) for name, (old, new) in fields.items()))
    # a target whose kernel refuses prctl(PR_SET_MM) (e.g. an RLIMIT_DATA check); a live
    # pid, as the executor checks the target is still there
    proc = FakeProcess(os.getpid())
    proc.fail["prctl"] = (0, errno.EINVAL)
    plan = Plan(pid=proc.pid, image_pid=100, page_size=4096, steps=(step,), notes=())
    ex = Executor(proc, plan, {}, UndoLog.create())
    with pytest.raises(ApplyFailed, match="rolled back"):
        ex.run()
    assert [name for name, _ in proc.calls].count("prctl") == 1

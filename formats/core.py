"""``core-<tid>.img`` messages: registers and per-task / per-thread state (CRIU images/core.proto,
core-x86.proto, core-aarch64.proto, creds.proto, sa.proto, rlimit.proto, rseq.proto; timers and
pending signals from timer.proto and siginfo.proto, in :mod:`formats.signals`).

Signal state: the leader's ``tc`` holds the process-wide part (``sigactions`` in
:data:`~formats.signals.SIGACTION_SIGNALS` order, the leader's blocked mask ``blk_sigset``, the
shared pending queue ``signals_s``, ``timers``); every thread's ``thread_core`` holds its own
blocked mask (``blk_sigset``; CRIU leaves it out of the leader's, whose mask is ``tc.blk_sigset``)
and private pending queue ``signals_p``.
"""

# Message fields are attrs field specifiers made by formats.pb, not mutable defaults:
# ruff: noqa: RUF009

from __future__ import annotations

import attrs

from formats.inventory import TaskKobjIdsEntry
from formats.pb import Kind, Message, optional, repeated, required
from formats.signals import SIGACTION_SIGNALS, SignalQueueEntry, TaskTimersEntry

__all__ = [
    "MTYPES",
    "CetEntry",
    "CoreEntry",
    "CredsEntry",
    "RlimitEntry",
    "RseqEntry",
    "SaEntry",
    "TaskCoreEntry",
    "TaskRlimitsEntry",
    "ThreadCoreEntry",
    "ThreadInfoAarch64",
    "ThreadInfoX86",
    "ThreadSasEntry",
    "UserAarch64FpsimdContextEntry",
    "UserAarch64RegsEntry",
    "UserDescT",
    "UserX86FpregsEntry",
    "UserX86RegsEntry",
    "UserX86XsaveEntry",
]

U32, U64, BOOL, ENUM, STR, MSG = (
    Kind.UINT32, Kind.UINT64, Kind.BOOL, Kind.ENUM, Kind.STRING, Kind.MESSAGE
)  # fmt: skip

MTYPES = {0: "UNKNOWN", 1: "X86_64", 2: "ARM", 3: "AARCH64", 4: "PPC64", 5: "S390", 6: "MIPS",
          7: "LOONGARCH64", 8: "RISCV64"}  # fmt: skip


@attrs.define(kw_only=True)
class UserX86RegsEntry(Message):
    """user_x86_regs_entry: fields 1..27 in ``struct user_regs_struct`` order."""

    r15: int = required(1, U64)
    r14: int = required(2, U64)
    r13: int = required(3, U64)
    r12: int = required(4, U64)
    bp: int = required(5, U64)
    bx: int = required(6, U64)
    r11: int = required(7, U64)
    r10: int = required(8, U64)
    r9: int = required(9, U64)
    r8: int = required(10, U64)
    ax: int = required(11, U64)
    cx: int = required(12, U64)
    dx: int = required(13, U64)
    si: int = required(14, U64)
    di: int = required(15, U64)
    orig_ax: int = required(16, U64)
    ip: int = required(17, U64)
    cs: int = required(18, U64)
    flags: int = required(19, U64)
    sp: int = required(20, U64)
    ss: int = required(21, U64)
    fs_base: int = required(22, U64)
    gs_base: int = required(23, U64)
    ds: int = required(24, U64)
    es: int = required(25, U64)
    fs: int = required(26, U64)
    gs: int = required(27, U64)
    mode: int | None = optional(28, ENUM, default=1)  # 1 NATIVE, 2 COMPAT


@attrs.define(kw_only=True)
class CetEntry(Message):
    """user_x86_xsave_entry.cet (CRIU 4.0+): CET user state."""

    cet: int = required(1, U64)
    ssp: int = required(2, U64)


@attrs.define(kw_only=True)
class UserX86XsaveEntry(Message):
    """user_x86_xsave_entry: XSAVE header bitmap and extended components."""

    xstate_bv: int = required(1, U64)
    ymmh_space: list[int] = repeated(2, U32)
    bndreg_state: list[int] = repeated(3, U64)
    bndcsr_state: list[int] = repeated(4, U64)
    opmask_reg: list[int] = repeated(5, U64)
    zmm_upper: list[int] = repeated(6, U64)
    hi16_zmm: list[int] = repeated(7, U64)
    pkru: list[int] = repeated(8, U32)
    cet: CetEntry | None = optional(9, MSG, message=CetEntry)


@attrs.define(kw_only=True)
class UserX86FpregsEntry(Message):
    """user_x86_fpregs_entry: the FXSAVE legacy area (+ xsave components)."""

    cwd: int = required(1, U32)
    swd: int = required(2, U32)
    twd: int = required(3, U32)
    fop: int = required(4, U32)
    rip: int = required(5, U64)
    rdp: int = required(6, U64)
    mxcsr: int = required(7, U32)
    mxcsr_mask: int = required(8, U32)
    st_space: list[int] = repeated(9, U32)
    xmm_space: list[int] = repeated(10, U32)
    padding: list[int] = repeated(11, U32)
    xsave: UserX86XsaveEntry | None = optional(13, MSG, message=UserX86XsaveEntry)


@attrs.define(kw_only=True)
class UserDescT(Message):
    """user_desc_t: one GDT TLS slot."""

    entry_number: int = required(1, U32)
    base_addr: int = required(2, U32)
    limit: int = required(3, U32)
    seg_32bit: bool = required(4, BOOL)
    contents_h: bool = required(5, BOOL)
    contents_l: bool = required(6, BOOL)
    read_exec_only: bool = required(7, BOOL, default=True)
    limit_in_pages: bool = required(8, BOOL)
    seg_not_present: bool = required(9, BOOL, default=True)
    usable: bool = required(10, BOOL)


@attrs.define(kw_only=True)
class ThreadInfoX86(Message):
    """thread_info_x86: x86-64 registers of one thread."""

    clear_tid_addr: int = required(1, U64)
    gpregs: UserX86RegsEntry = required(2, MSG, message=UserX86RegsEntry)
    fpregs: UserX86FpregsEntry = required(3, MSG, message=UserX86FpregsEntry)
    tls: list[UserDescT] = repeated(4, MSG, message=UserDescT)


@attrs.define(kw_only=True)
class UserAarch64RegsEntry(Message):
    """user_aarch64_regs_entry: x0..x30, sp, pc, pstate."""

    regs: list[int] = repeated(1, U64)
    sp: int = required(2, U64)
    pc: int = required(3, U64)
    pstate: int = required(4, U64)


@attrs.define(kw_only=True)
class UserAarch64FpsimdContextEntry(Message):
    """user_aarch64_fpsimd_context_entry: V0..V31 as (low, high) words, fpsr, fpcr."""

    vregs: list[int] = repeated(1, U64)
    fpsr: int = required(2, U32)
    fpcr: int = required(3, U32)


@attrs.define(kw_only=True)
class ThreadInfoAarch64(Message):
    """thread_info_aarch64: aarch64 registers of one thread (pac_keys kept unknown)."""

    clear_tid_addr: int = required(1, U64)
    tls: int = required(2, U64)
    gpregs: UserAarch64RegsEntry = required(3, MSG, message=UserAarch64RegsEntry)
    fpsimd: UserAarch64FpsimdContextEntry = required(4, MSG, message=UserAarch64FpsimdContextEntry)


@attrs.define(kw_only=True)
class SaEntry(Message):
    """sa_entry: one signal's sigaction."""

    sigaction: int = required(1, U64)
    flags: int = required(2, U64)
    restorer: int = required(3, U64)
    mask: int = required(4, U64)
    compat_sigaction: bool | None = optional(5, BOOL)
    mask_extended: int | None = optional(6, U64)


@attrs.define(kw_only=True)
class RlimitEntry(Message):
    """rlimit_entry: soft and hard limit."""

    cur: int = required(1, U64)
    max: int = required(2, U64)


@attrs.define(kw_only=True)
class TaskRlimitsEntry(Message):
    """task_rlimits_entry: RLIMIT_* in kernel order."""

    rlimits: list[RlimitEntry] = repeated(1, MSG, message=RlimitEntry)


@attrs.define(kw_only=True)
class TaskCoreEntry(Message):
    """task_core_entry: per-process state (leader's core only)."""

    task_state: int = required(1, U32)
    exit_code: int = required(2, U32)
    personality: int = required(3, U32)
    flags: int = required(4, U32)
    blk_sigset: int = required(5, U64)
    comm: str = required(6, STR)
    timers: TaskTimersEntry | None = optional(7, MSG, message=TaskTimersEntry)
    rlimits: TaskRlimitsEntry | None = optional(8, MSG, message=TaskRlimitsEntry)
    cg_set: int | None = optional(9, U32)
    signals_s: SignalQueueEntry | None = optional(10, MSG, message=SignalQueueEntry)
    old_seccomp_mode: int | None = optional(11, ENUM)
    old_seccomp_filter: int | None = optional(12, U32)
    loginuid: int | None = optional(13, U32)
    oom_score_adj: int | None = optional(14, Kind.INT32)
    sigactions: list[SaEntry] = repeated(15, MSG, message=SaEntry)
    child_subreaper: bool | None = optional(18, BOOL)
    blk_sigset_extended: int | None = optional(20, U64)
    stop_signo: int | None = optional(21, U32)
    membarrier_registration_mask: int | None = optional(22, U32)

    def sigaction_for(self, signo: int) -> SaEntry:
        """The ``sa_entry`` of signal ``signo`` (``sigactions`` skips SIGKILL and SIGSTOP)."""
        if signo not in SIGACTION_SIGNALS:
            raise ValueError(f"signal {signo} has no sigaction entry")
        index = SIGACTION_SIGNALS.index(signo)
        if index >= len(self.sigactions):
            raise ValueError(f"signal {signo}: only {len(self.sigactions)} sigactions saved")
        return self.sigactions[index]


@attrs.define(kw_only=True)
class ThreadSasEntry(Message):
    """thread_sas_entry: sigaltstack."""

    ss_sp: int = required(1, U64)
    ss_size: int = required(2, U64)
    ss_flags: int = required(3, U32)


@attrs.define(kw_only=True)
class CredsEntry(Message):
    """creds_entry: ids, capabilities (two u32 words each), securebits, groups."""

    uid: int = required(1, U32)
    gid: int = required(2, U32)
    euid: int = required(3, U32)
    egid: int = required(4, U32)
    suid: int = required(5, U32)
    sgid: int = required(6, U32)
    fsuid: int = required(7, U32)
    fsgid: int = required(8, U32)
    cap_inh: list[int] = repeated(9, U32)
    cap_prm: list[int] = repeated(10, U32)
    cap_eff: list[int] = repeated(11, U32)
    cap_bnd: list[int] = repeated(12, U32)
    secbits: int = required(13, U32)
    groups: list[int] = repeated(14, U32)
    lsm_profile: str | None = optional(15, STR)
    lsm_sockcreate: str | None = optional(16, STR)
    apparmor_data: bytes | None = optional(17, Kind.BYTES)
    no_new_privs: int | None = optional(18, U32)
    cap_amb: list[int] = repeated(19, U32)


@attrs.define(kw_only=True)
class RseqEntry(Message):
    """rseq_entry: registered restartable-sequence area."""

    rseq_abi_pointer: int = required(1, U64)
    rseq_abi_size: int = required(2, U32)
    signature: int = required(3, U32)
    rseq_cs_pointer: int | None = optional(4, U64)


@attrs.define(kw_only=True)
class ThreadCoreEntry(Message):
    """thread_core_entry: per-thread state."""

    futex_rla: int = required(1, U64)
    futex_rla_len: int = required(2, U32)
    sched_nice: int | None = optional(3, Kind.SINT32)
    sched_policy: int | None = optional(4, U32)
    sched_prio: int | None = optional(5, U32)
    blk_sigset: int | None = optional(6, U64)
    sas: ThreadSasEntry | None = optional(7, MSG, message=ThreadSasEntry)
    pdeath_sig: int | None = optional(8, U32)
    signals_p: SignalQueueEntry | None = optional(9, MSG, message=SignalQueueEntry)
    creds: CredsEntry | None = optional(10, MSG, message=CredsEntry)
    seccomp_mode: int | None = optional(11, ENUM)
    seccomp_filter: int | None = optional(12, U32)
    comm: str | None = optional(13, STR)
    blk_sigset_extended: int | None = optional(14, U64)
    rseq_entry: RseqEntry | None = optional(15, MSG, message=RseqEntry)
    cg_set: int | None = optional(16, U32)


@attrs.define(kw_only=True)
class CoreEntry(Message):
    """core_entry: one thread; ``tc`` only in the leader's image.  Other arches stay unknown."""

    mtype: int = required(1, ENUM)
    thread_info: ThreadInfoX86 | None = optional(2, MSG, message=ThreadInfoX86)
    tc: TaskCoreEntry | None = optional(3, MSG, message=TaskCoreEntry)
    ids: TaskKobjIdsEntry | None = optional(4, MSG, message=TaskKobjIdsEntry)
    thread_core: ThreadCoreEntry | None = optional(5, MSG, message=ThreadCoreEntry)
    ti_aarch64: ThreadInfoAarch64 | None = optional(8, MSG, message=ThreadInfoAarch64)

    def ip_sp(self) -> tuple[int, int] | None:
        """(instruction pointer, stack pointer) for x86-64 and aarch64, else None."""
        if self.thread_info is not None:
            return self.thread_info.gpregs.ip, self.thread_info.gpregs.sp
        if self.ti_aarch64 is not None:
            return self.ti_aarch64.gpregs.pc, self.ti_aarch64.gpregs.sp
        return None

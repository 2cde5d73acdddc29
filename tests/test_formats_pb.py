"""Protobuf wire codec: hand-written bytes for every message kind, reader rules, errors."""

# ruff: noqa: RUF009  (attrs field specifiers of formats.pb in the test-only message)

from __future__ import annotations

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from formats import pb
from formats.core import (
    CoreEntry,
    CredsEntry,
    RlimitEntry,
    RseqEntry,
    SaEntry,
    TaskCoreEntry,
    TaskRlimitsEntry,
    ThreadCoreEntry,
    ThreadInfoAarch64,
    ThreadInfoX86,
    ThreadSasEntry,
    UserAarch64FpsimdContextEntry,
    UserAarch64RegsEntry,
    UserDescT,
    UserX86FpregsEntry,
    UserX86RegsEntry,
    UserX86XsaveEntry,
)
from formats.errors import ImageError
from formats.files import FdinfoEntry, FileEntry, FownEntry, FsEntry, RegFileEntry
from formats.inventory import InventoryEntry, PstreeEntry, TaskKobjIdsEntry
from formats.mm import AioRingEntry, MmEntry, VmaEntry
from formats.pagemap_msgs import PagemapEntry, PagemapHead
from formats.pb import (
    Kind,
    Message,
    RawField,
    build,
    field_default,
    optional,
    parse,
    repeated,
    required,
)


def common(cls: type[Message], data: bytes, obj: Message) -> None:
    """Parse and build both ways (construct's test idiom, with the bytes compared)."""
    assert parse(cls, data) == obj
    assert build(obj) == data
    assert build(parse(cls, data)) == data


VMA_BYTES = bytes.fromhex(
    "08 80a08003"  # 1 start = 0x601000
    "10 80c08003"  # 2 end = 0x602000
    "18 00"  # 3 pgoff = 0
    "20 00"  # 4 shmid = 0
    "28 03"  # 5 prot = READ|WRITE
    "30 22"  # 6 flags = MAP_PRIVATE|MAP_ANONYMOUS
    "38 a104"  # 7 status = 0x221 (REGULAR|HEAP|ANON_PRIVATE)
    "40 01"  # 8 fd = -1 (zigzag)
    "48 808002"  # 9 madv = 0x8000
)
VMA = VmaEntry(
    start=0x601000, end=0x602000, pgoff=0, shmid=0, prot=3, flags=0x22, status=0x221, fd=-1,
    madv=0x8000,
)  # fmt: skip


def test_inventory_entry() -> None:
    """inventory_entry from the format doc's worked example."""
    data = bytes.fromhex(
        "08 02"  # 1 img_version = 2
        "10 01"  # 2 fdinfo_per_id = true
        "20 01"  # 4 ns_per_id = true
        "30 00"  # 6 lsmtype = NO_LSM
    )
    common(
        InventoryEntry, data, InventoryEntry(img_version=2, fdinfo_per_id=True, ns_per_id=True,
                                             lsmtype=0)
    )  # fmt: skip


def test_task_kobj_ids_entry() -> None:
    """task_kobj_ids_entry: required ids then an optional namespace id."""
    data = bytes.fromhex(
        "08 02"  # 1 vm_id
        "10 02"  # 2 files_id
        "18 02"  # 3 fs_id
        "20 02"  # 4 sighand_id
        "60 05"  # 12 time_ns_id
    )
    common(TaskKobjIdsEntry, data, TaskKobjIdsEntry(vm_id=2, files_id=2, fs_id=2, sighand_id=2,
                                                    time_ns_id=5))  # fmt: skip


def test_pstree_entry() -> None:
    """pstree_entry: ppid 0 still written (required), one key per thread (unpacked)."""
    data = bytes.fromhex(
        "08 01"  # 1 pid
        "10 00"  # 2 ppid
        "18 01"  # 3 pgid
        "20 01"  # 4 sid
        "28 01"  # 5 threads[0]
        "28 02"  # 5 threads[1]
    )
    common(PstreeEntry, data, PstreeEntry(pid=1, ppid=0, pgid=1, sid=1, threads=[1, 2]))


def test_pagemap_head_and_entry_42() -> None:
    """pagemap_head and a CRIU 4.2 pagemap_entry (field 2 = 0, count in field 5)."""
    common(PagemapHead, bytes.fromhex("08 01"), PagemapHead(pages_id=1))  # 1 pages_id
    expected = bytes.fromhex(
        "08 8080808080e01f"  # 1 vaddr = 0x7f0000000000
        "10 00"  # 2 compat_nr_pages = 0
        "20 06"  # 4 flags = PE_LAZY|PE_PRESENT
        "28 02"  # 5 nr_pages = 2
    )
    obj = PagemapEntry(vaddr=0x7F0000000000, compat_nr_pages=0, flags=6, nr_pages=2)
    common(PagemapEntry, expected, obj)


def test_vma_entry() -> None:
    """vma_entry: multi-byte varints, zigzag fd, optional madv."""
    common(VmaEntry, VMA_BYTES, VMA)


def test_mm_entry() -> None:
    """mm_entry: required zeros, auxv words, an embedded VMA, negative int32 dumpable."""
    zeros = b"".join(bytes([n << 3, 0]) for n in range(1, 12))  # 1..11 mm_* = 0
    data = (
        zeros
        + bytes.fromhex("60 01")  # 12 exe_file_id = 1
        + bytes.fromhex("68 06 68 8020")  # 13 mm_saved_auxv = [AT_PAGESZ, 4096]
        + bytes([0x72, len(VMA_BYTES)])  # 14 vmas[0], length-delimited
        + VMA_BYTES
        + bytes.fromhex("78 ffffffffffffffffff01")  # 15 dumpable = -1 (10 bytes)
        + bytes.fromhex("8801 00")  # 17 thp_disabled = false (two-byte key)
    )
    obj = MmEntry(exe_file_id=1, mm_saved_auxv=[6, 4096], vmas=[VMA], dumpable=-1,
                  thp_disabled=False)  # fmt: skip
    common(MmEntry, data, obj)
    assert obj.auxv(6) == 4096


def test_core_entry_thread_core() -> None:
    """core_entry with a thread_core_entry: sint32 sched_nice = -1 is zigzag 01."""
    data = bytes.fromhex(
        "08 01"  # 1 mtype = X86_64
        "2a 08"  # 5 thread_core, 8 bytes:
        "08 80fe01"  # 1 futex_rla = 0x7f00
        "10 18"  # 2 futex_rla_len = 24
        "18 01"  # 3 sched_nice = -1
    )
    obj = CoreEntry(mtype=1, thread_core=ThreadCoreEntry(futex_rla=0x7F00, futex_rla_len=24,
                                                         sched_nice=-1))  # fmt: skip
    common(CoreEntry, data, obj)


def test_task_core_entry_negative_int32() -> None:
    """task_core_entry: string comm and oom_score_adj = -1000 sign-extended to 10 bytes."""
    data = bytes.fromhex(
        "08 01"  # 1 task_state = alive
        "10 00"  # 2 exit_code
        "18 00"  # 3 personality
        "20 80808002"  # 4 flags = 0x400000
        "28 00"  # 5 blk_sigset
        "32 06 676f6c64656e"  # 6 comm = "golden"
        "70 98f8ffffffffffffff01"  # 14 oom_score_adj = -1000
    )
    obj = TaskCoreEntry(task_state=1, flags=0x400000, comm="golden", oom_score_adj=-1000)
    common(TaskCoreEntry, data, obj)


def test_user_desc_t_bool_defaults() -> None:
    """user_desc_t: required bools, two of them default to true."""
    data = bytes.fromhex(
        "08 0c"  # 1 entry_number = 12
        "10 00 18 00"  # 2 base_addr, 3 limit
        "20 00 28 00 30 00"  # 4 seg_32bit, 5 contents_h, 6 contents_l
        "38 01"  # 7 read_exec_only = true
        "40 00"  # 8 limit_in_pages
        "48 01"  # 9 seg_not_present = true
        "50 00"  # 10 usable
    )
    common(UserDescT, data, UserDescT(entry_number=12))


def test_user_x86_regs_entry() -> None:
    """user_x86_regs_entry: 27 required registers in kernel order, optional mode."""
    # field n (1..27) holds the value n; keys from field 16 on take two bytes (0x80 0x01...)
    keys = [bytes([n << 3]) if n < 16 else bytes([(n << 3) & 0x7F | 0x80, n >> 4]) for n in
            range(1, 28)]  # fmt: skip
    data = b"".join(k + bytes([n]) for n, k in enumerate(keys, 1)) + bytes.fromhex("e001 01")
    regs = parse(UserX86RegsEntry, data)
    assert (regs.r15, regs.ax, regs.ip, regs.sp, regs.gs, regs.mode) == (1, 11, 17, 20, 27, 1)
    assert build(regs) == data
    core = CoreEntry(mtype=1, thread_info=ThreadInfoX86(clear_tid_addr=0, gpregs=regs))
    assert core.ip_sp() == (17, 20)


def test_reg_file_and_file_entry() -> None:
    """file_entry with a reg_file_entry: sub-message fown, sint32 mnt_id = -1, build_id."""
    reg_bytes = bytes.fromhex(
        "08 01"  # 1 id
        "10 808002"  # 2 flags = O_LARGEFILE
        "18 00"  # 3 pos
        "2a 0a 0800 1000 1800 2000 2800"  # 5 fown: uid, euid, signum, pid_type, pid = 0
        "32 06 2f62696e2f78"  # 6 name = "/bin/x"
        "38 01"  # 7 mnt_id = -1 (zigzag)
        "40 a08101"  # 8 size = 16544
        "58 01 58 02"  # 11 build_id = [1, 2]
    )
    reg = RegFileEntry(id=1, flags=0x8000, pos=0, fown=FownEntry(), name="/bin/x", mnt_id=-1,
                       size=16544, build_id=[1, 2])  # fmt: skip
    common(RegFileEntry, reg_bytes, reg)
    data = bytes.fromhex("08 01 10 01 1a 26") + reg_bytes  # 1 type REG, 2 id, 3 reg
    common(FileEntry, data, FileEntry(type=1, id=1, reg=reg))


def test_fdinfo_and_fs_entry() -> None:
    """fdinfo_entry and fs_entry: small all-varint messages."""
    common(FdinfoEntry, bytes.fromhex("08 04 10 00 18 01 20 00"),  # id, flags, type REG, fd
           FdinfoEntry(id=4, flags=0, type=1, fd=0))  # fmt: skip
    common(FsEntry, bytes.fromhex("08 08 10 09 18 12"),  # cwd_id, root_id, umask 0o22
           FsEntry(cwd_id=8, root_id=9, umask=0o22))  # fmt: skip


def test_thread_info_aarch64() -> None:
    """thread_info_aarch64: tls, gpregs (x regs repeated, sp, pc, pstate), fpsimd."""
    data = bytes.fromhex(
        "08 10"  # 1 clear_tid_addr = 0x10
        "10 20"  # 2 tls = 0x20
        "1a 13"  # 3 gpregs, 19 bytes:
        "08 01 08 02"  # 1 regs = [1, 2]
        "10 f0ff01"  # 2 sp = 0x7ff0
        "18 80808002"  # 3 pc = 0x400000
        "20 8080808006"  # 4 pstate = 0x60000000
        "22 08"  # 4 fpsimd, 8 bytes:
        "08 00 08 01"  # 1 vregs = [0, 1]
        "10 10"  # 2 fpsr = 0x10
        "18 00"  # 3 fpcr = 0
    )
    obj = ThreadInfoAarch64(
        clear_tid_addr=0x10,
        tls=0x20,
        gpregs=UserAarch64RegsEntry(regs=[1, 2], sp=0x7FF0, pc=0x400000, pstate=0x60000000),
        fpsimd=UserAarch64FpsimdContextEntry(vregs=[0, 1], fpsr=0x10, fpcr=0),
    )
    common(ThreadInfoAarch64, data, obj)
    assert CoreEntry(mtype=3, ti_aarch64=obj).ip_sp() == (0x400000, 0x7FF0)


def test_fpregs_and_xsave() -> None:
    """user_x86_fpregs_entry with an xsave sub-message (ymmh and pkru components)."""
    data = bytes.fromhex(
        "08 ff06"  # 1 cwd = 0x37f
        "10 00 18 00 20 00 28 00 30 00"  # 2 swd, 3 twd, 4 fop, 5 rip, 6 rdp
        "38 803f"  # 7 mxcsr = 0x1f80
        "40 ffff0b"  # 8 mxcsr_mask = 0x2ffff
        "48 00 48 01"  # 9 st_space = [0, 1]
        "50 02"  # 10 xmm_space = [2]
        "6a 0a"  # 13 xsave, 10 bytes:
        "08 07"  # 1 xstate_bv = 7
        "10 03"  # 2 ymmh_space = [3]
        "40 d4aad5aa05"  # 8 pkru = [0x55555554]
    )
    obj = UserX86FpregsEntry(
        cwd=0x37F, mxcsr=0x1F80, mxcsr_mask=0x2FFFF, st_space=[0, 1], xmm_space=[2],
        xsave=UserX86XsaveEntry(xstate_bv=7, ymmh_space=[3], pkru=[0x55555554]),
    )  # fmt: skip
    common(UserX86FpregsEntry, data, obj)


def test_aio_ring_entry() -> None:
    """aio_ring_entry: ring address, request count, ring length."""
    data = bytes.fromhex(
        "08 8080808080e01f"  # 1 id = 0x7f0000000000
        "10 8001"  # 2 nr_req = 128
        "18 8020"  # 3 ring_len = 4096
    )
    common(AioRingEntry, data, AioRingEntry(id=0x7F0000000000, nr_req=128, ring_len=4096))


def test_sa_entry() -> None:
    """sa_entry: handler, flags, restorer, mask, optional compat flag."""
    data = bytes.fromhex(
        "08 80a08002"  # 1 sigaction = 0x401000
        "10 80808020"  # 2 flags = SA_RESTORER (0x4000000)
        "18 80c08002"  # 3 restorer = 0x402000
        "20 00"  # 4 mask
        "28 00"  # 5 compat_sigaction = false
    )
    obj = SaEntry(sigaction=0x401000, flags=0x4000000, restorer=0x402000, mask=0,
                  compat_sigaction=False)  # fmt: skip
    common(SaEntry, data, obj)


def test_creds_entry() -> None:
    """creds_entry: eight ids, capability words, secbits, groups."""
    data = bytes.fromhex(
        "08e807 10e807 18e807 20e807 28e807 30e807 38e807 40e807"  # 1..8 uid..fsgid = 1000
        "48 00 48 00"  # 9 cap_inh = [0, 0]
        "50 ff01 50 01"  # 10 cap_prm = [0xff, 1]
        "58 00 58 00"  # 11 cap_eff = [0, 0]
        "60 ff01 60 01"  # 12 cap_bnd = [0xff, 1]
        "68 00"  # 13 secbits
        "70 1b"  # 14 groups = [27]
    )
    obj = CredsEntry(uid=1000, gid=1000, euid=1000, egid=1000, suid=1000, sgid=1000,
                     fsuid=1000, fsgid=1000, cap_inh=[0, 0], cap_prm=[0xFF, 1], cap_eff=[0, 0],
                     cap_bnd=[0xFF, 1], secbits=0, groups=[27])  # fmt: skip
    common(CredsEntry, data, obj)


def test_rseq_and_sas_entry() -> None:
    """rseq_entry and thread_sas_entry."""
    rseq = bytes.fromhex("08 80fe01 10 20 18 d3e0949805")  # pointer 0x7f00, size 32, signature
    common(RseqEntry, rseq, RseqEntry(rseq_abi_pointer=0x7F00, rseq_abi_size=32,
                                      signature=0x53053053))  # fmt: skip
    sas = bytes.fromhex("08 00 10 00 18 02")  # ss_sp, ss_size, ss_flags = SS_DISABLE
    common(ThreadSasEntry, sas, ThreadSasEntry(ss_flags=2))


def test_rlimits() -> None:
    """task_rlimits_entry: repeated rlimit_entry, RLIM_INFINITY as a 10-byte varint."""
    inf = "ffffffffffffffffff01"
    data = bytes.fromhex(
        f"0a 16 08 {inf} 10 {inf}"  # 1 rlimits[0]: cur, max = RLIM_INFINITY
        f"0a 10 08 80808004 10 {inf}"  # 1 rlimits[1]: cur = 8 MiB, max = RLIM_INFINITY
    )
    obj = TaskRlimitsEntry(rlimits=[RlimitEntry(cur=2**64 - 1, max=2**64 - 1),
                                    RlimitEntry(cur=8 << 20, max=2**64 - 1)])  # fmt: skip
    common(TaskRlimitsEntry, data, obj)


@attrs.define(kw_only=True)
class _Fixed(Message):
    """Test-only message with the kinds CRIU's memory images never use."""

    f64: int | None = optional(1, Kind.FIXED64)
    f32: int | None = optional(2, Kind.FIXED32)
    blob: bytes | None = optional(3, Kind.BYTES)
    big: int | None = optional(4, Kind.SINT64)
    many: list[int] = repeated(5, Kind.UINT32)
    need: int = required(6, Kind.INT64)


def test_fixed_bytes_sint64() -> None:
    """fixed64, fixed32, bytes, sint64 and int64 encode as protobuf does."""
    data = bytes.fromhex(
        "09 0807060504030201"  # 1 f64 = 0x0102030405060708 (LE)
        "15 04030201"  # 2 f32 = 0x01020304
        "1a 02 ff00"  # 3 blob
        "20 03"  # 4 big = -2 (zigzag 3)
        "30 ffffffffffffffff7f"  # 6 need = 2**63 - 1
    )
    obj = _Fixed(f64=0x0102030405060708, f32=0x01020304, blob=b"\xff\x00", big=-2, need=2**63 - 1)
    common(_Fixed, data, obj)


def test_packed_repeated_accepted_and_written_unpacked() -> None:
    """A packed repeated field is read; writing uses one key per element."""
    packed = bytes.fromhex("2a 03 01 02 03 30 00")  # 5 many packed [1,2,3], 6 need = 0
    obj = parse(_Fixed, packed)
    assert obj.many == [1, 2, 3]
    assert build(obj) == bytes.fromhex("28 01 28 02 28 03 30 00")


def test_any_order_and_last_wins() -> None:
    """Fields in any order; a repeated scalar field keeps its last value."""
    data = bytes.fromhex("18 00 08 05 10 01 20 01 08 07")  # pgid, pid=5, ppid, sid, pid=7
    entry = parse(PstreeEntry, data)
    assert (entry.pid, entry.ppid, entry.pgid, entry.sid) == (7, 1, 0, 1)


def test_submessage_occurrences_merge() -> None:
    """Two occurrences of a non-repeated sub-message merge field by field."""
    data = bytes.fromhex("08 01 2a 02 08 05 2a 02 10 18")  # mtype, thread_core twice
    core = parse(CoreEntry, data)
    assert core.thread_core is not None
    assert (core.thread_core.futex_rla, core.thread_core.futex_rla_len) == (5, 24)


def test_unknown_fields_kept_in_place() -> None:
    """Unknown fields of every wire type survive, merged back by field number."""
    data = bytes.fromhex(
        "08 02"  # 1 img_version
        "39 0102030405060708"  # 7 unknown fixed64
        "40 05"  # 8 dump_uptime (known)
        "7a 03 616263"  # 15 unknown length-delimited
        "85 01 01020304"  # 16 unknown fixed32
        "c0 3e 01"  # 1000 unknown varint
    )
    inv = parse(InventoryEntry, data)
    assert inv.dump_uptime == 5
    assert [u.number for u in inv.unknown_fields] == [7, 15, 16, 1000]
    assert build(inv) == data
    inv.unknown_fields.append(RawField(3000, bytes.fromhex("c0bb01 00")))
    assert build(inv).endswith(bytes.fromhex("c0bb01 00"))


@pytest.mark.parametrize(
    ("data", "offset", "needle"),
    [
        (bytes.fromhex("08 02 10 80"), 3, "truncated varint"),  # varint cut short
        (bytes.fromhex("08 02 1b"), 2, "wire type 3"),  # start-group
        (bytes.fromhex("08 02 1c"), 2, "wire type 4"),  # end-group
        (bytes.fromhex("08 02 7a 05 61"), 2, "runs past the end"),  # length > rest
        (bytes.fromhex("08 ffffffffffffffffff7f"), 1, "longer than 10 bytes"),
        (bytes.fromhex("0a 01 00"), 0, "wire type 2 for a scalar"),  # img_version as bytes
        (bytes.fromhex("10 01"), 100, "img_version"),  # required field 1 missing
    ],
)
def test_bad_wire_data(data: bytes, offset: int, needle: str) -> None:
    """Corrupt messages raise ImageError naming the file, the byte offset and the entry."""
    with pytest.raises(ImageError) as info:
        parse(InventoryEntry, data, path="x/inventory.img", offset=100, entry=0)
    err = info.value
    assert needle in str(err)
    assert err.path == "x/inventory.img"
    assert err.offset == offset + (0 if needle == "img_version" else 100)
    assert "x/inventory.img at byte" in str(err)
    assert "(entry 0)" in str(err)


def test_bad_utf8_string() -> None:
    """A string field that is not UTF-8 is an ImageError, not a UnicodeDecodeError."""
    data = bytes.fromhex("08 01 10 00 18 00 20 00 28 00 32 01 ff")
    with pytest.raises(ImageError, match="not UTF-8"):
        parse(TaskCoreEntry, data, path="core-1.img")


_u64 = st.integers(0, 2**64 - 1)
_u32 = st.integers(0, 2**32 - 1)


@given(
    start=_u64, end=_u64, pgoff=_u64, shmid=_u64, prot=_u32, flags=_u32, status=_u32,
    fd=st.integers(-(2**63), 2**63 - 1), madv=st.none() | _u64, fdflags=st.none() | _u32,
)  # fmt: skip
def test_vma_round_trip(  # noqa: PLR0917 (hypothesis passes the drawn values positionally)
    start: int, end: int, pgoff: int, shmid: int, prot: int, flags: int, status: int, fd: int,
    madv: int | None, fdflags: int | None,
) -> None:  # fmt: skip
    """Any vma_entry value survives build -> parse -> build."""
    vma = VmaEntry(start=start, end=end, pgoff=pgoff, shmid=shmid, prot=prot, flags=flags,
                   status=status, fd=fd, madv=madv, fdflags=fdflags)  # fmt: skip
    data = build(vma)
    assert parse(VmaEntry, data) == vma
    assert build(parse(VmaEntry, data)) == data


@given(
    st.lists(_u32, max_size=8), st.integers(-(2**31), 2**31 - 1), st.text(max_size=20),
    st.booleans(),
)  # fmt: skip
def test_core_round_trip(threads: list[int], oom: int, comm: str, subreaper: bool) -> None:
    """Nested messages, repeated scalars, negative int32 and strings round-trip."""
    core = CoreEntry(
        mtype=1,
        tc=TaskCoreEntry(comm=comm, oom_score_adj=oom, child_subreaper=subreaper),
        thread_core=ThreadCoreEntry(sched_nice=oom, blk_sigset=threads[0] if threads else None),
    )
    data = build(core)
    assert parse(CoreEntry, data) == core
    pst = PstreeEntry(pid=1, ppid=0, pgid=1, sid=1, threads=threads)
    assert parse(PstreeEntry, build(pst)) == pst


@given(st.binary(max_size=64))
def test_garbage_never_crashes(data: bytes) -> None:
    """Arbitrary bytes either parse (and rebuild from the parse) or raise ImageError."""
    try:
        entry = parse(PagemapEntry, data, path="p")
    except ImageError:
        return
    assert parse(PagemapEntry, build(entry)) == entry


def test_field_default_applies_proto_defaults() -> None:
    """field_default gives the declared default of an unset optional field."""
    reg = RegFileEntry(id=1, flags=0, pos=0, name="x")
    assert reg.mnt_id is None
    assert field_default(reg, "mnt_id") == -1  # [default = -1] in regfile.proto
    assert field_default(UserX86RegsEntry(), "mode") == 1  # NATIVE
    assert field_default(reg, "size") == 0
    assert field_default(CoreEntry(mtype=1), "thread_core") == ThreadCoreEntry()
    with pytest.raises(AttributeError):
        field_default(reg, "nope")


@given(st.integers(min_value=0, max_value=2**64 - 1))
def test_fast_varint_agrees_with_construct(value: int) -> None:
    """The varint loops that build and parse messages agree with construct's VarInt, the
    codec's definition, on every length up to 10 bytes."""
    wire = pb.PbVarInt.build(value)
    assert pb.varint_bytes(value) == wire
    reader = pb._Reader(wire + b"\x01", "<test>", 0, None)
    assert reader.varint("v") == value and reader.pos == len(wire)


@given(st.integers(min_value=-(2**63), max_value=2**63 - 1))
def test_fast_zigzag_agrees_with_construct(value: int) -> None:
    """sint64 values encode as construct's ZigZag does."""
    spec = pb.FieldSpec(1, pb.Kind.SINT64, pb.Label.OPTIONAL)
    assert pb._encode_value(spec, value) == pb.PbZigZag.build(value)

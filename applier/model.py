"""Plain values the planner works on: the image side and the live side of one task.

Both sides are reduced to the same vocabulary (``Region``: an address range with a kind, a
protection and, for file mappings, a path and offset) so that the planner is a pure function
that a test can feed with hand-made values.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence

import attrs
import numpy as np
import numpy.typing as npt

from injector.procfs import MM_STAT_FIELDS

__all__ = [
    "MM_FIELDS",
    "PROT_EXEC",
    "PROT_READ",
    "PROT_WRITE",
    "FdValue",
    "ImageTask",
    "Kind",
    "LiveTask",
    "Region",
    "SavedPages",
    "SharedObject",
    "Sigaction",
    "SignalState",
    "format_prot",
    "merge_regions",
]

PROT_READ = 1
PROT_WRITE = 2
PROT_EXEC = 4

# The mm fields PR_SET_MM_MAP sets, by their CRIU mm_entry names (the kernel's, with mm_).
MM_FIELDS = tuple(f"mm_{name}" for name in MM_STAT_FIELDS.values())


class Kind(enum.Enum):
    """What backs a range of addresses, as far as applying is concerned."""

    ANON = "anon"  # private anonymous (heap, stack, malloc arenas, thread stacks)
    FILE = "file"  # private file mapping (text, data, relro, bss-on-file)
    SHARED_FILE = "shared-file"  # never written: that would change files on disk
    SHARED_ANON = "shared-anon"  # shared anonymous / memfd / SysV
    SPECIAL = "special"  # vdso, vvar, vsyscall, uprobes: left alone
    OTHER = "other"  # AIO rings, sockets, plugin/device mappings: cannot be re-created

    @property
    def private(self) -> bool:
        return self in (Kind.ANON, Kind.FILE)


@attrs.frozen
class Region:
    """A range of a task's address space with what backs it."""

    start: int
    end: int
    prot: int
    kind: Kind
    path: str | None = None
    offset: int = 0  # file offset (bytes) of ``start``
    name: str | None = None  # [heap], [stack], [vdso], ...
    growsdown: bool = False
    # SHARED_ANON: the shmem object's inode (= CRIU's vma.shmid and pagemap-shmem id for
    # VMA_ANON_SHARED); -1 when the image names the object another way (memfd-style entry).
    inode: int = 0

    @property
    def size(self) -> int:
        return self.end - self.start

    def backing_at(self, addr: int) -> tuple[Kind, str | int | None, int]:
        """Kind, object (path or shmem inode) and offset that back ``addr``: equal tuples
        mean the same backing."""
        if self.kind is Kind.ANON:
            return (self.kind, None, 0)
        off = self.offset + (addr - self.start)
        if self.kind is Kind.SHARED_ANON:
            return (self.kind, self.inode, off)
        return (self.kind, self.path, off)

    def same_backing(self, other: Region) -> bool:
        """Whether ``other`` continues or matches this region's backing at its own start."""
        return self.backing_at(other.start) == other.backing_at(other.start) and (
            self.name == other.name or Kind.ANON in (self.kind, other.kind)
        )

    def clip(self, start: int, end: int) -> Region:
        start, end = max(start, self.start), min(end, self.end)
        offset = self.offset + start - self.start if self.kind is not Kind.ANON else 0
        return attrs.evolve(self, start=start, end=end, offset=offset)

    def describe(self) -> str:
        what = self.name or self.path or self.kind.value
        return f"{self.start:#x}-{self.end:#x} {format_prot(self.prot)} {self.kind.value} {what}"


def format_prot(prot: int) -> str:
    return "".join(
        c if prot & bit else "-"
        for c, bit in (("r", PROT_READ), ("w", PROT_WRITE), ("x", PROT_EXEC))
    )


def merge_regions(regions: Iterable[Region]) -> list[Region]:
    """Sort and merge adjacent regions the kernel would treat as one (same prot and backing).

    VMAs are split and merged by the kernel for reasons that do not matter here (an mprotect
    round trip, an anon_vma difference); comparing merged regions avoids planning no-op work.
    """
    out: list[Region] = []
    for r in sorted(regions, key=lambda r: r.start):
        if (
            out
            and out[-1].end == r.start
            and out[-1].prot == r.prot
            and out[-1].growsdown == r.growsdown
            and out[-1].same_backing(r)
        ):
            out[-1] = attrs.evolve(out[-1], end=r.end)
        else:
            out.append(r)
    return out


@attrs.frozen
class SavedPages:
    """A run of pages whose saved bytes the image holds (already resolved through parents)."""

    vaddr: int
    nr_pages: int
    source: object  # opaque handle the executor knows how to read (formats.PageRun)


@attrs.frozen
class FdValue:
    """One descriptor, image side or live side: its number, CRIU's ``fd_types`` name of its
    kind (``REG``, ``PIPE``, ``UNIXSK`` ...), close-on-exec, the file status flags (``O_*``
    without O_CLOEXEC), the position; for files reached by a path the path (``deleted``: it
    no longer leads to the open file) and mode; for pipes and sockets ``ident``, the inode
    that tells one object from another; ``what`` the live link text (``pipe:[123]``)."""

    fd: int
    kind: str
    cloexec: bool
    flags: int
    pos: int
    path: str | None = None
    ident: int | None = None
    deleted: bool = False
    mode: int | None = None
    what: str | None = None

    def describe(self) -> str:
        if self.path is not None:
            return f"fd {self.fd} ({self.path})"
        if self.what is not None:
            return f"fd {self.fd} ({self.what})"
        ident = f" {self.ident}" if self.ident is not None else ""
        return f"fd {self.fd} ({self.kind.lower()}{ident})"


@attrs.frozen
class SharedObject:
    """The saved pages of one shared memory object (pagemap-shmem-<inode>.img): ``saved``
    runs have object offsets as ``vaddr``; offsets not covered were holes (zero)."""

    inode: int
    saved: Sequence[SavedPages]


@attrs.frozen
class Sigaction:
    """One signal's disposition as ``rt_sigaction`` sees it (CRIU's ``sa_entry``): handler
    (0 SIG_DFL, 1 SIG_IGN, else an address), ``sa_flags``, ``sa_restorer``, ``sa_mask``."""

    handler: int
    flags: int
    restorer: int
    mask: int

    @property
    def kind(self) -> str:
        """ "default", "ignore" or "handler"."""
        return {0: "default", 1: "ignore"}.get(self.handler, "handler")

    def as_tuple(self) -> tuple[int, int, int, int]:
        return self.handler, self.flags, self.restorer, self.mask


@attrs.frozen
class SignalState:
    """The signal state of one task.

    ``actions``: signal -> disposition, for the signals known exactly (an image: every one
    but SIGKILL and SIGSTOP; a live task: those read with an injected call). ``ignored`` and
    ``caught``: masks of the signals ignored and handled (a live task: /proc/PID/status,
    which needs no injection; an image: from ``actions``). ``blocked``: tid -> blocked mask.
    ``pending``: (tid, or 0 for the process's shared queue, signal number, si_code) of each
    queued signal. ``itimers``: ITIMER_REAL/VIRTUAL/PROF as (interval s, us, value s, us),
    if known."""

    actions: dict[int, Sigaction]
    ignored: int
    caught: int
    blocked: dict[int, int]
    pending: tuple[tuple[int, int, int], ...] = ()
    itimers: tuple[tuple[int, int, int, int], ...] = ()

    def kind(self, sig: int) -> str:
        """ "default", "ignore" or "handler" for ``sig`` (from ``actions`` when known)."""
        known = self.actions.get(sig)
        if known is not None:
            return known.kind
        bit = 1 << (sig - 1)
        return "handler" if self.caught & bit else "ignore" if self.ignored & bit else "default"


@attrs.frozen
class ImageTask:
    """The image side of one task, reduced to what the planner needs."""

    pid: int
    page_size: int
    regions: Sequence[Region]  # every non-guard VMA of the image, sorted
    saved: Sequence[SavedPages]  # sorted, non-overlapping
    brk: int
    start_brk: int
    exe: str | None
    threads: Sequence[int]  # thread ids of the image, leader first
    mm_fields: dict[str, int] = attrs.field(factory=dict)
    shared: dict[int, SharedObject] = attrs.field(factory=dict)  # by inode
    children: tuple[int, ...] = ()  # pids of the task's children in pstree.img
    dump_uptime: int | None = None  # when the image was taken, microseconds since boot
    # The descriptor table at the checkpoint; None: the image has no descriptor state.
    fds: tuple[FdValue, ...] | None = None
    signals: SignalState | None = None  # None: the image holds no signal state


@attrs.frozen
class LiveTask:
    """The live side of one task, as read from /proc and ptrace."""

    pid: int
    regions: Sequence[Region]
    threads: Sequence[int]  # leader first
    exe: str | None
    # Pages present now (resident or swapped) in private regions: sorted page addresses.
    present: npt.NDArray[np.uint64]
    # Of those, pages that are the process's own copy (anonymous), not a file's page cache page:
    # in a private file mapping, only these differ from the file.
    anon: npt.NDArray[np.uint64]
    brk: int | None = None
    # /proc/PID/stat mm fields by their mm_entry names (mm_start_code, ..., mm_env_end).
    mm_fields: dict[str, int] = attrs.field(factory=dict)
    # Each live thread's (instruction pointer, stack pointer) at the stop.
    thread_ip_sp: dict[int, tuple[int, int]] = attrs.field(factory=dict)
    # Child processes: (pid, comm, start time in microseconds since boot).
    children: tuple[tuple[int, str, int], ...] = ()
    # The descriptor table now (read only when the fds part is restored).
    fds: tuple[FdValue, ...] | None = None
    signals: SignalState | None = None  # None: not read

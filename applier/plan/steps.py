"""The planner's vocabulary: the steps of a plan, as values with a printable ``describe()`` and
a JSON form ``as_dict()`` (docs/json.md), and the plan itself. The executor
(``applier.executor``) gives each step its work, one handler per step class."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, ClassVar, TypeVar, overload

import attrs
import numpy as np
import numpy.typing as npt

from applier.model import (
    FdValue,
    Kind,
    Region,
    SavedPages,
    Sigaction,
    format_prot,
)
from formats.signals import SIGNALS, sigset_to_signals


def signal_name(sig: int) -> str:
    """``SIGUSR1``, ``SIGRTMIN+3`` (as glibc numbers them: SIGRTMIN is 34), ``SIG33``."""
    if sig in SIGNALS:
        return SIGNALS[sig]
    return f"SIGRTMIN+{sig - 34}" if sig >= 34 else f"SIG{sig}"


def mask_text(mask: int) -> str:
    """``{SIGINT,SIGUSR1}`` for a sigset word."""
    return "{" + ",".join(signal_name(s) for s in sorted(sigset_to_signals(mask))) + "}"


def _action_text(a: Sigaction | None) -> str:
    if a is None:
        return "?"
    what = {"default": "SIG_DFL", "ignore": "SIG_IGN"}.get(a.kind, f"handler {a.handler:#x}")
    return f"{what} flags {a.flags:#x} mask {mask_text(a.mask)}"


def _action_json(a: Sigaction | None) -> dict[str, str] | None:
    if a is None:
        return None
    return {"handler": _hex(a.handler), "flags": _hex(a.flags), "restorer": _hex(a.restorer),
            "mask": _hex(a.mask)}  # fmt: skip


def _hex(value: int) -> str:
    return f"{value:#x}"


def _ranges_json(ranges: Iterable[tuple[int, int]]) -> list[list[str]]:
    return [[_hex(a), _hex(b)] for a, b in ranges]


def _region_json(op: str, region: Region) -> dict[str, Any]:
    """The fields of a step about one region (docs/json.md)."""
    return {
        "op": op,
        "start": _hex(region.start),
        "end": _hex(region.end),
        "prot": format_prot(region.prot),
        "kind": region.kind.value,
        "path": region.path,
        "name": region.name,
        "offset": _hex(region.offset) if region.kind is not Kind.ANON else None,
    }


@attrs.frozen
class Unmap:
    op: ClassVar[str] = "unmap"
    layout: ClassVar[bool] = True  # a mapping or protection change
    region: Region  # the live region (clipped) that goes away

    @property
    def start(self) -> int:
        return self.region.start

    @property
    def end(self) -> int:
        return self.region.end

    def describe(self) -> str:
        return f"unmap   {self.region.describe()}"

    def as_dict(self) -> dict[str, Any]:
        return _region_json("unmap", self.region)


@attrs.frozen
class MapAnon:
    op: ClassVar[str] = "map"
    layout: ClassVar[bool] = True  # a mapping or protection change
    region: Region

    def describe(self) -> str:
        return f"map     {self.region.describe()}"

    def as_dict(self) -> dict[str, Any]:
        return _region_json("map", self.region)


@attrs.frozen
class MapFile:
    op: ClassVar[str] = "map"
    layout: ClassVar[bool] = True  # a mapping or protection change
    region: Region

    def describe(self) -> str:
        return f"map     {self.region.describe()} @{self.region.offset:#x}"

    def as_dict(self) -> dict[str, Any]:
        return _region_json("map", self.region)


@attrs.frozen
class Protect:
    op: ClassVar[str] = "protect"
    layout: ClassVar[bool] = True  # a mapping or protection change
    start: int
    end: int
    old: int
    new: int

    def describe(self) -> str:
        return (
            f"protect {self.start:#x}-{self.end:#x} {format_prot(self.old)} -> "
            f"{format_prot(self.new)}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "op": "protect",
            "start": _hex(self.start),
            "end": _hex(self.end),
            "prot": format_prot(self.new),
            "old_prot": format_prot(self.old),
        }


@attrs.frozen
class SetBrk:
    op: ClassVar[str] = "brk"
    layout: ClassVar[bool] = False
    old: int | None
    new: int

    def describe(self) -> str:
        old = "?" if self.old is None else f"{self.old:#x}"
        return f"brk     {old} -> {self.new:#x}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "op": "brk",
            "old": None if self.old is None else _hex(self.old),
            "new": _hex(self.new),
        }


@attrs.frozen
class SetMm:
    """All mm fields (code/data/stack/arg/env bounds, heap start) in one
    prctl(PR_SET_MM, PR_SET_MM_MAP): one call keeps the kernel's ordering checks satisfied
    (arg_start <= arg_end, ...) and needs no CAP_SYS_RESOURCE, unlike the one-field calls."""

    op: ClassVar[str] = "mm"
    layout: ClassVar[bool] = False
    fields: tuple[tuple[str, int, int], ...]  # (mm_entry name, live value, image value)

    @property
    def old(self) -> dict[str, int]:
        return {name: old for name, old, _ in self.fields}

    @property
    def new(self) -> dict[str, int]:
        return {name: new for name, _, new in self.fields}

    def describe(self) -> str:
        changed = ", ".join(
            f"{name} {old:#x} -> {new:#x}" for name, old, new in self.fields if old != new
        )
        return f"prctl   PR_SET_MM_MAP {changed}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "op": "mm",
            "fields": {
                name: {"old": _hex(old), "new": _hex(new)}
                for name, old, new in self.fields
                if old != new
            },
        }


class SavedRuns(Sequence[SavedPages]):
    """Runs of saved pages held as arrays, sorted by address: run i is ``npages[i]`` pages at
    ``vaddr[i]`` whose bytes come from ``sources[source[i]]`` (a ``SavedPages.source``: the
    formats PageRun the run was cut from, so the bytes of ``a`` are at ``a - run.vaddr`` in
    that run). A sequence of SavedPages to read, but a dirty set of 100,000 scattered pages
    costs no Python object per run to plan and to write."""

    __slots__ = ("npages", "source", "sources", "vaddr")

    def __init__(
        self,
        vaddr: npt.NDArray[np.uint64],
        npages: npt.NDArray[np.uint64],
        source: npt.NDArray[np.intp],
        sources: tuple[object, ...],
    ) -> None:
        self.vaddr, self.npages, self.source, self.sources = vaddr, npages, source, sources

    @classmethod
    def of(cls, runs: Iterable[SavedPages]) -> SavedRuns:
        """``runs`` as a SavedRuns (itself if it is one), in address order."""
        if isinstance(runs, SavedRuns):
            return runs
        items = sorted(runs, key=lambda r: r.vaddr)
        return cls(
            np.array([r.vaddr for r in items], dtype=np.uint64),
            np.array([r.nr_pages for r in items], dtype=np.uint64),
            np.arange(len(items), dtype=np.intp),
            tuple(r.source for r in items),
        )

    @property
    def nr_pages(self) -> int:
        return int(self.npages.sum())

    def ends(self, page: int) -> npt.NDArray[np.uint64]:
        return self.vaddr + self.npages * np.uint64(page)

    def __len__(self) -> int:
        return len(self.vaddr)

    @overload
    def __getitem__(self, index: int) -> SavedPages: ...
    @overload
    def __getitem__(self, index: slice) -> SavedRuns: ...
    def __getitem__(self, index: int | slice) -> SavedPages | SavedRuns:
        if isinstance(index, slice):
            return SavedRuns(
                self.vaddr[index], self.npages[index], self.source[index], self.sources
            )
        return SavedPages(
            int(self.vaddr[index]), int(self.npages[index]), self.sources[self.source[index]]
        )

    def __iter__(self) -> Iterator[SavedPages]:
        for a, n, i in zip(
            self.vaddr.tolist(), self.npages.tolist(), self.source.tolist(), strict=True
        ):
            yield SavedPages(a, n, self.sources[i])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SavedRuns):
            return NotImplemented
        return (
            np.array_equal(self.vaddr, other.vaddr)
            and np.array_equal(self.npages, other.npages)
            and [self.sources[i] for i in self.source.tolist()]
            == [other.sources[i] for i in other.source.tolist()]
        )

    def __hash__(self) -> int:
        return hash((self.vaddr.tobytes(), self.npages.tobytes()))

    def __repr__(self) -> str:
        return f"SavedRuns({len(self)} runs, {self.nr_pages} pages)"


def _saved_runs(runs: Iterable[SavedPages]) -> SavedRuns:
    return SavedRuns.of(runs)


@attrs.frozen
class CodeWrite:
    """Saved pages that land in an executable mapping: ``path`` and ``offset`` (of
    ``start``) name the file behind it, None for anonymous code (a JIT's)."""

    start: int
    end: int
    path: str | None
    offset: int

    def as_dict(self) -> dict[str, Any]:
        return {"start": _hex(self.start), "end": _hex(self.end), "path": self.path}


@attrs.frozen
class WritePages:
    op: ClassVar[str] = "write"
    layout: ClassVar[bool] = False
    runs: SavedRuns = attrs.field(converter=_saved_runs)
    code: tuple[CodeWrite, ...] = ()  # the parts of ``runs`` in executable mappings

    @property
    def nr_pages(self) -> int:
        return self.runs.nr_pages

    @property
    def code_bytes(self) -> int:
        return sum(c.end - c.start for c in self.code)

    def describe(self) -> str:
        code = f", {self.code_bytes} bytes into executable mappings" if self.code else ""
        return f"write   {self.nr_pages} saved pages in {len(self.runs)} runs{code}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "op": "write",
            "pages": self.nr_pages,
            "code": [c.as_dict() for c in self.code],
            "runs": [
                [_hex(a), n]
                for a, n in zip(self.runs.vaddr.tolist(), self.runs.npages.tolist(), strict=True)
            ],
        }


@attrs.frozen
class Discard:
    """MADV_DONTNEED: anonymous pages read as zero again, private file pages as the file."""

    op: ClassVar[str] = "discard"
    layout: ClassVar[bool] = False
    ranges: tuple[tuple[int, int], ...]
    reason: str  # "zero" or "file"

    @property
    def nr_bytes(self) -> int:
        return sum(e - s for s, e in self.ranges)

    def describe(self) -> str:
        what = "zero" if self.reason == "zero" else "re-read from file"
        return f"discard {len(self.ranges)} ranges, {self.nr_bytes} bytes ({what})"

    def as_dict(self) -> dict[str, Any]:
        return {
            "op": "discard",
            "reason": self.reason,
            "bytes": self.nr_bytes,
            "ranges": _ranges_json(self.ranges),
        }


@attrs.frozen
class SetRegs:
    op: ClassVar[str] = "regs"
    layout: ClassVar[bool] = False
    tid: int  # live thread
    image_tid: int  # core-<image_tid>.img

    def describe(self) -> str:
        return f"regs    thread {self.tid} <- core-{self.image_tid}.img"

    def as_dict(self) -> dict[str, Any]:
        return {"op": "regs", "thread": self.tid, "image_thread": self.image_tid}


@attrs.frozen
class EndThread:
    """A thread started since the checkpoint, ended by an ``exit`` run in it, first of all:
    its stack and code may be in memory the image does not have."""

    op: ClassVar[str] = "thread-end"
    layout: ClassVar[bool] = False
    tid: int

    def describe(self) -> str:
        return f"thread  end {self.tid} (started since the checkpoint)"

    def as_dict(self) -> dict[str, Any]:
        return {"op": "thread-end", "thread": self.tid}


@attrs.frozen
class NewThread:
    """A thread of the image that ended since the checkpoint, created again once the layout
    is back: a ``clone3`` with its id, TLS base and tid address, then its robust list, rseq
    area, name, blocked signals and registers from ``core-<tid>.img``."""

    op: ClassVar[str] = "thread-new"
    layout: ClassVar[bool] = False
    tid: int  # the image's thread id, which the new thread gets

    def describe(self) -> str:
        return f"thread  new {self.tid} <- core-{self.tid}.img (ended since the checkpoint)"

    def as_dict(self) -> dict[str, Any]:
        return {"op": "thread-new", "thread": self.tid, "image_thread": self.tid}


@attrs.frozen
class SetSigactions:
    """Signal dispositions back to the image's, each with one injected ``rt_sigaction``
    (handler, ``sa_flags``, ``sa_restorer`` and ``sa_mask`` as saved). ``actions``: (signal,
    live disposition, or None where a read-only plan does not know it, image disposition)."""

    op: ClassVar[str] = "sigaction"
    layout: ClassVar[bool] = False
    actions: tuple[tuple[int, Sigaction | None, Sigaction], ...]
    # Signals handled both now and in the image whose live handler a read-only plan did not
    # read: the apply reads them and sets those that differ.
    unread: tuple[int, ...] = ()

    def describe(self) -> str:
        return "sigaction " + "; ".join(
            f"{signal_name(sig)} {_action_text(old)} -> {_action_text(new)}"
            for sig, old, new in self.actions
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "op": "sigaction",
            "actions": [
                {
                    "signal": sig,
                    "name": signal_name(sig),
                    "old": _action_json(old),
                    "new": _action_json(new),
                }
                for sig, old, new in self.actions
            ],
            "unread": list(self.unread),
        }


@attrs.frozen
class SetSigmask:
    """One thread's blocked signals back to the image's (PTRACE_SETSIGMASK: nothing runs in
    the target)."""

    op: ClassVar[str] = "sigmask"
    layout: ClassVar[bool] = False
    tid: int
    image_tid: int
    old: int
    new: int

    def describe(self) -> str:
        return (
            f"sigmask thread {self.tid} {mask_text(self.old)} -> {mask_text(self.new)} "
            f"(core-{self.image_tid}.img)"
        )

    def as_dict(self) -> dict[str, Any]:
        return {"op": "sigmask", "thread": self.tid, "image_thread": self.image_tid,
                "old": _hex(self.old), "new": _hex(self.new)}  # fmt: skip


@attrs.frozen
class WriteShared:
    """Shared anonymous memory (a shmem object) back to its pagemap-shmem contents, through
    the live mapping: saved pages written, the rest of the window punched to zero
    (MADV_REMOVE). Every process that maps the object sees the change."""

    op: ClassVar[str] = "shared"
    layout: ClassVar[bool] = False
    region: Region
    runs: tuple[SavedPages, ...]  # address-based (translated from object offsets)
    holes: tuple[tuple[int, int], ...]

    @property
    def nr_pages(self) -> int:
        return sum(r.nr_pages for r in self.runs)

    def describe(self) -> str:
        return (
            f"shared  {self.region.describe()}: {self.nr_pages} saved pages, "
            f"{len(self.holes)} zero ranges"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            **_region_json("shared", self.region),
            "pages": self.nr_pages,
            "holes": _ranges_json(self.holes),
        }


@attrs.frozen
class ThreadCall:
    """The system call a thread is in, live and in the image (None: running user code);
    reported by ``diff``, never executed."""

    tid: int
    image_tid: int
    now: str | None
    image: str | None

    def describe(self) -> str:
        def text(call: str | None) -> str:
            return f"in {call}" if call else "in user code"

        return f"thread {self.tid}: {text(self.now)} now, {text(self.image)} in the image"

    def as_dict(self) -> dict[str, Any]:
        return {"thread": self.tid, "image_thread": self.image_tid, "now": self.now,
                "image": self.image}  # fmt: skip


# File status flags F_SETFL can change (fs/fcntl.c SETFL_MASK): the rest of the image's
# flags (access mode, O_LARGEFILE, O_DIRECTORY ...) are fixed when a file is opened.
SETFL_MASK = 0o2000 | 0o4000 | 0o20000 | 0o40000 | 0o1000000
_FLAG_NAMES = ((0o2000, "O_APPEND"), (0o4000, "O_NONBLOCK"), (0o20000, "O_ASYNC"),
               (0o40000, "O_DIRECT"), (0o1000000, "O_NOATIME"))  # fmt: skip
_ACCESS = {0: "O_RDONLY", 1: "O_WRONLY", 2: "O_RDWR", 3: "O_ACCMODE"}


def format_fd_flags(flags: int, *, access: bool = False) -> str:
    """``O_RDWR|O_APPEND``: the F_SETFL-settable flags (and the access mode)."""
    parts = [_ACCESS[flags & 3]] if access else []
    parts += [name for bit, name in _FLAG_NAMES if flags & bit]
    return "|".join(parts) or "0"


def _cloexec(on: bool) -> str:
    return "on" if on else "off"


@attrs.frozen
class CloseFd:
    """A descriptor opened since the checkpoint, closed inside the target (its peer sees
    EOF once nothing else holds the file; the kernel drops it from epoll sets)."""

    op: ClassVar[str] = "close-fd"
    layout: ClassVar[bool] = False
    fd: FdValue  # the live descriptor
    spare: int  # descriptors at and above this number are free for the apply's own use

    def describe(self) -> str:
        return f"close   {self.fd.describe()}: opened since the checkpoint"

    def as_dict(self) -> dict[str, Any]:
        return {"op": "close-fd", "fd": self.fd.fd, "kind": self.fd.kind,
                "path": self.fd.path, "what": self.fd.what}  # fmt: skip


@attrs.frozen
class ResetFd:
    """An open file (the same one as at the checkpoint) set back: position (lseek), status
    flags (F_SETFL), close-on-exec (F_SETFD). Each pair is (now, image), None if equal."""

    op: ClassVar[str] = "reset-fd"
    layout: ClassVar[bool] = False
    fd: int
    kind: str
    path: str | None
    pos: tuple[int, int] | None = None
    flags: tuple[int, int] | None = None
    cloexec: tuple[bool, bool] | None = None

    def describe(self) -> str:
        what = f" ({self.path})" if self.path is not None else f" ({self.kind.lower()})"
        changes = []
        if self.pos is not None:
            changes.append(f"position {self.pos[0]} -> {self.pos[1]}")
        if self.flags is not None:
            changes.append(
                f"flags {format_fd_flags(self.flags[0])} -> {format_fd_flags(self.flags[1])}"
            )
        if self.cloexec is not None:
            changes.append(
                f"close-on-exec {_cloexec(self.cloexec[0])} -> {_cloexec(self.cloexec[1])}"
            )
        return f"fd      {self.fd}{what}: {', '.join(changes)}"

    def as_dict(self) -> dict[str, Any]:
        def pair(p: tuple[Any, Any] | None) -> dict[str, Any] | None:
            return None if p is None else {"old": p[0], "new": p[1]}

        flags = None
        if self.flags is not None:
            flags = {"old": format_fd_flags(self.flags[0]), "new": format_fd_flags(self.flags[1])}
        return {"op": "reset-fd", "fd": self.fd, "kind": self.kind, "path": self.path,
                "pos": pair(self.pos), "flags": flags, "cloexec": pair(self.cloexec)}  # fmt: skip


@attrs.frozen
class ReopenFd:
    """A file closed since the checkpoint, or replaced at its number by another, opened again
    inside the target at that number with its flags and position (openat, lseek, dup3)."""

    op: ClassVar[str] = "reopen-fd"
    layout: ClassVar[bool] = False
    fd: int
    path: str
    flags: int  # the image's file status flags (access mode included)
    pos: int
    cloexec: bool
    spare: int  # as CloseFd.spare
    replaces: FdValue | None = None  # what is at that number now (None: closed)

    def describe(self) -> str:
        why = (
            "closed since the checkpoint"
            if self.replaces is None
            else f"replacing {self.replaces.describe()}"
        )
        cloexec = ", close-on-exec" if self.cloexec else ""
        return (
            f"reopen  fd {self.fd} ({self.path}) {format_fd_flags(self.flags, access=True)} "
            f"at {self.pos}{cloexec}: {why}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "op": "reopen-fd",
            "fd": self.fd,
            "path": self.path,
            "flags": format_fd_flags(self.flags, access=True),
            "pos": self.pos,
            "cloexec": self.cloexec,
            "replaces": None if self.replaces is None else self.replaces.describe(),
        }


@attrs.frozen
class DupFd:
    """A pipe or socket closed (or replaced) at its number since the checkpoint but still open
    at another one (moved by the program, or parked by an apply that was killed): duplicated
    back to its number (dup3), sharing the same open file."""

    op: ClassVar[str] = "dup-fd"
    layout: ClassVar[bool] = False
    fd: int
    source: FdValue  # the live descriptor of the same object
    cloexec: bool
    spare: int  # as CloseFd.spare
    replaces: FdValue | None = None

    def describe(self) -> str:
        why = (
            "closed since the checkpoint"
            if self.replaces is None
            else f"replacing {self.replaces.describe()}"
        )
        return f"dup     {self.source.describe()} -> fd {self.fd}: {why}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "op": "dup-fd",
            "fd": self.fd,
            "source": self.source.fd,
            "kind": self.source.kind,
            "what": self.source.what,
            "cloexec": self.cloexec,
            "replaces": None if self.replaces is None else self.replaces.describe(),
        }


FdStep = CloseFd | ResetFd | ReopenFd | DupFd

Step = (
    Unmap | MapAnon | MapFile | Protect | SetBrk | SetMm | WritePages | Discard | WriteShared
    | SetRegs | CloseFd | ResetFd | ReopenFd | DupFd | SetSigactions | SetSigmask | EndThread
    | NewThread
)  # fmt: skip
S = TypeVar(
    "S", Unmap, MapAnon, MapFile, Protect, SetBrk, SetMm, WritePages, Discard, WriteShared,
    SetRegs, CloseFd, ResetFd, ReopenFd, DupFd, SetSigactions, SetSigmask, EndThread,
    NewThread,
)  # fmt: skip


def recreated(steps: Iterable[Step]) -> list[tuple[int, int]]:
    """The ranges that map steps among ``steps`` create."""
    return [(s.region.start, s.region.end) for s in steps if isinstance(s, MapAnon | MapFile)]


@attrs.frozen
class Plan:
    """What ``apply`` will do, in order, plus notes on what it leaves alone and why."""

    pid: int
    image_pid: int
    page_size: int
    steps: tuple[Step, ...]
    notes: tuple[str, ...]
    # Set once the plan was narrowed to what really differs (``applier.compare``): the saved
    # pages that compared equal to the live ones and were left out.
    compared: bool = False
    pages_unchanged: int = 0
    threads: tuple[ThreadCall, ...] = ()
    # Child processes the image does not hold: they keep running as they are.
    children: tuple[int, ...] = ()

    def recreated(self) -> list[tuple[int, int]]:
        """The ranges the plan maps anew (nothing in them is worth keeping or comparing)."""
        return recreated(self.steps)

    def of(self, kind: type[S]) -> list[S]:
        """The steps of one kind, in order."""
        return [s for s in self.steps if isinstance(s, kind)]

    @property
    def pages_to_write(self) -> int:
        return sum(s.nr_pages for s in self.of(WritePages))

    @property
    def bytes_to_discard(self) -> int:
        return sum(s.nr_bytes for s in self.of(Discard))

    def summary(self) -> dict[str, int]:
        return {
            "pages_to_write": self.pages_to_write,
            "pages_unchanged": self.pages_unchanged,
            "pages_to_discard": self.bytes_to_discard // self.page_size,
            "layout_changes": sum(s.layout for s in self.steps),
            "threads": len(self.of(SetRegs)) + len(self.of(NewThread)),
            "threads_ended": len(self.of(EndThread)),
            "threads_created": len(self.of(NewThread)),
            "fd_changes": sum(
                isinstance(s, CloseFd | ResetFd | ReopenFd | DupFd) for s in self.steps
            ),
            "signals": sum(len(s.actions) for s in self.of(SetSigactions)),
            "sigmasks": len(self.of(SetSigmask)),
            "children_left_running": len(self.children),
        }

    def as_dict(self) -> dict[str, Any]:
        """The plan as JSON-ready values (the schema is in docs/json.md)."""
        return {
            "pid": self.pid,
            "image_pid": self.image_pid,
            "page_size": self.page_size,
            "compared": self.compared,
            "summary": self.summary(),
            "steps": [step.as_dict() for step in self.steps],
            "notes": list(self.notes),
            "threads": [t.as_dict() for t in self.threads],
            "children_left_running": list(self.children),
        }

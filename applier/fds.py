"""Descriptors as CRIU 4.2 records them, and the planner's view of them.

Three sides of one concern:

* ``fd_entries``: a stopped live process -> the entries ``applier dump`` writes
  (``ids-<pid>.img``, ``fdinfo-<files_id>.img``, ``fs-<pid>.img``, and the file objects in
  ``files.img``, ``pipes-data.img`` and ``memfd.img``), in CRIU 4.2's spelling
  (criu/files.c, files-reg.c, pipes.c, sk-unix.c, sk-inet.c, eventfd.c, eventpoll.c,
  signalfd.c, timerfd.c, memfd.c, fsnotify.c): one ``file_entry`` per open file description
  (descriptors sharing one, like a dup'ed stdout, share an id: kcmp tells), regular files with
  ``mode`` and, unless write-only append logs, ``size``; sockets with their options and the
  net namespace id; cwd and root as regular-file entries after the descriptors.
* ``image_fds``: one task of an image directory -> ``FdValue``s (None when the image has no
  descriptor state: older applier images, CRIU images without ids/fdinfo).
* ``live_fds``: the live descriptor table -> ``FdValue``s.

Kinds CRIU's formats here do not model (netlink and packet sockets, pidfds, io_uring,
userfaultfd, fanotify ...) are not written by the dump; ``DumpFds.skipped`` names them.
"""

from __future__ import annotations

import stat as stat_
from collections.abc import Iterable

import attrs

from applier.model import FdValue
from formats import names
from formats.fdkinds import (
    EventfdFileEntry,
    EventpollFileEntry,
    EventpollTfdEntry,
    FhEntry,
    FifoEntry,
    FownEntry,
    InotifyFileEntry,
    InotifyWdEntry,
    MemfdFileEntry,
    MemfdInodeEntry,
    PipeDataEntry,
    PipeEntry,
    SignalfdEntry,
    TimerfdEntry,
)
from formats.files import FD_CLOEXEC, FdinfoEntry, FileEntry, FsEntry, RegFileEntry
from formats.imagedir import ImageDir
from formats.inventory import TaskKobjIdsEntry
from formats.sockets import (
    InetSkEntry,
    IpOptsEntry,
    SkOptsEntry,
    TcpOptsEntry,
    UnixSkEntry,
    ip_to_words,
)
from injector.fdinfo import (
    Descriptor,
    EventFd,
    EventPoll,
    Fifo,
    FileOwner,
    Inotify,
    Memfd,
    Pipe,
    RegularFile,
    SignalFd,
    Socket,
    TimerFd,
)
from injector.fds import FsState, PathInfo
from injector.process import Process
from injector.sockopts import SocketOptions

__all__ = ["DumpFds", "elf_build_id", "fd_entries", "image_fds", "live_fds"]

_O_ACCMODE, _O_WRONLY, _O_APPEND = 0o3, 0o1, 0o2000

# CRIU's numbering of a single process's namespaces (criu/namespaces.c collects them in this
# order; the task's vm/files/fs/sighand ids come after the dumping criu's own, id 1)
_NS_IDS = {
    "pid_ns_id": 1,
    "net_ns_id": 2,
    "ipc_ns_id": 3,
    "uts_ns_id": 4,
    "time_ns_id": 5,
    "mnt_ns_id": 6,
    "user_ns_id": 7,
    "cgroup_ns_id": 8,
}
_TASK_ID = 1
_FH_WORDS = 16  # CRIU writes f_handle with at least 16 u64 words (FH_ENTRY_SIZES__min_entries)


@attrs.define
class DumpFds:
    """The descriptor images of one task, ready for ``ImageWriter``."""

    ids: TaskKobjIdsEntry
    fs: FsEntry
    fdinfo: list[FdinfoEntry]
    files: list[FileEntry]
    pipe_data: list[PipeDataEntry] = attrs.field(factory=list)
    memfd_inodes: list[MemfdInodeEntry] = attrs.field(factory=list)
    skipped: list[str] = attrs.field(factory=list)  # "fd N (what)" not written


def _fown(owner: FileOwner | None) -> FownEntry:
    """fown_entry: zeros unless F_SETOWN named someone (as CRIU's dump_fown)."""
    if owner is None or owner.pid == 0:
        return FownEntry(uid=0, euid=0, signum=0, pid_type=0, pid=0)
    return FownEntry(
        uid=owner.uid,
        euid=owner.euid,
        signum=owner.signum,
        pid_type=owner.pid_type,
        pid=owner.pid,
    )


def _reg(
    file_id: int, name: str, flags: int, pos: int, *, mode: int, size: int, build_id: bool = False
) -> RegFileEntry:
    """reg_file_entry as files-reg.c writes it: mode always, size of regular files except
    write-only append logs (``should_check_size``), the build-id of ELF files."""
    keep_size = stat_.S_ISREG(mode) and not (flags & _O_ACCMODE == _O_WRONLY and flags & _O_APPEND)
    return RegFileEntry(
        id=file_id,
        flags=flags,
        pos=pos,
        fown=FownEntry(uid=0, euid=0, signum=0, pid_type=0, pid=0),
        name=name,
        size=size if keep_size else None,
        mode=mode,
        build_id=(elf_build_id(name) or []) if build_id and stat_.S_ISREG(mode) else [],
    )


def _sk_opts(o: SocketOptions | None, *, unix: bool) -> SkOptsEntry:
    """sk_opts_entry as criu/sockets.c dump_socket_opts fills it."""
    if o is None:
        return SkOptsEntry(
            so_sndbuf=0, so_rcvbuf=0, so_snd_tmo_sec=0, so_snd_tmo_usec=0,
            so_rcv_tmo_sec=0, so_rcv_tmo_usec=0,
        )  # fmt: skip
    return SkOptsEntry(
        so_sndbuf=o.so_sndbuf,
        so_rcvbuf=o.so_rcvbuf,
        so_snd_tmo_sec=o.so_snd_tmo_sec,
        so_snd_tmo_usec=o.so_snd_tmo_usec,
        so_rcv_tmo_sec=o.so_rcv_tmo_sec,
        so_rcv_tmo_usec=o.so_rcv_tmo_usec,
        reuseaddr=o.reuseaddr,
        so_priority=o.so_priority,
        so_rcvlowat=o.so_rcvlowat,
        so_mark=o.so_mark or None,
        so_passcred=o.so_passcred if unix else None,
        so_passsec=o.so_passsec if unix else None,
        so_dontroute=o.so_dontroute,
        so_no_check=o.so_no_check,
        so_bound_dev=o.so_bound_dev or None,
        so_reuseport=o.so_reuseport,
        so_broadcast=o.so_broadcast,
        so_keepalive=o.so_keepalive,
        so_oobinline=int(o.so_oobinline),
        so_linger=o.so_linger,
        so_buf_lock=o.so_buf_lock,
    )


def _socket(file_id: int, d: Descriptor, k: Socket) -> FileEntry | None:
    net_ns = _NS_IDS["net_ns_id"]
    fown = _fown(d.owner)
    if k.unix is not None:
        u = k.unix
        return FileEntry.of(
            UnixSkEntry(
                id=file_id,
                ino=u.ino,
                type=u.type,
                state=u.state,
                flags=d.file_flags,
                uflags=0,
                backlog=u.backlog,
                peer=u.peer,
                fown=fown,
                opts=_sk_opts(k.options, unix=True),
                name=u.name or b"",
                shutdown=u.shutdown or None,
                ns_id=net_ns,
            )
        )
    if k.inet is not None:
        i = k.inet
        o = k.options
        ip_opts = None
        tcp_opts = None
        if o is not None and o.ip is not None:
            ip_opts = IpOptsEntry(
                freebind=o.ip.freebind or None,
                pktinfo=o.ip.pktinfo or None,
                tos=o.ip.tos or None,
                ttl=o.ip.ttl,
            )
        if o is not None and o.tcp is not None:
            tcp_opts = TcpOptsEntry(
                cork=o.tcp.cork or None,
                nodelay=o.tcp.nodelay or None,
                keepcnt=o.tcp.keepcnt,
                keepidle=o.tcp.keepidle,
                keepintvl=o.tcp.keepintvl,
            )
        v6only = None
        if i.family == 10 and o is not None and o.ip is not None:
            v6only = bool(o.ip.v6only)
        return FileEntry.of(
            InetSkEntry(
                id=file_id,
                ino=i.ino,
                family=i.family,
                type=i.type,
                proto=i.protocol,
                state=i.state,
                src_port=i.sport,
                dst_port=i.dport,
                flags=d.file_flags,
                backlog=i.backlog,
                src_addr=ip_to_words(i.src),
                dst_addr=ip_to_words(i.dst),
                fown=fown,
                opts=_sk_opts(o, unix=False),
                v6only=v6only,
                ip_opts=ip_opts,
                ns_id=net_ns,
                shutdown=i.shutdown or None,
                tcp_opts=tcp_opts,
            )
        )
    return None


def _handle_words(raw: bytes) -> list[int]:
    padded = raw.ljust(max(_FH_WORDS * 8, -(-len(raw) // 8) * 8), b"\0")
    return [int.from_bytes(padded[i : i + 8], "little") for i in range(0, len(padded), 8)]


class _Files:
    """files.img ids handed out in dump order, and the side images that go with them."""

    def __init__(self, process: Process, first_id: int) -> None:
        self.process = process
        self.next_id = first_id
        self.files: list[FileEntry] = []
        self.pipe_data: list[PipeDataEntry] = []
        self.memfd_inodes: list[MemfdInodeEntry] = []
        self._pipes_done: set[int] = set()
        self._memfd_ids: dict[int, int] = {}

    def take_id(self) -> int:
        got = self.next_id
        self.next_id += 1
        return got

    def path(self, info: PathInfo) -> int:
        """A REG entry for cwd or root."""
        file_id = self.take_id()
        mode = info.stat.mode if info.stat is not None else stat_.S_IFDIR | 0o755
        size = info.stat.size if info.stat is not None else 0
        self.files.append(FileEntry.of(_reg(file_id, info.path, 0, 0, mode=mode, size=size)))
        return file_id

    def entry(self, file_id: int, d: Descriptor) -> FileEntry | None:
        k = d.kind
        fown = _fown(d.owner)
        flags = d.file_flags
        if isinstance(k, RegularFile):
            reg = _reg(
                file_id, k.path, flags, d.pos, mode=k.mode, size=k.size, build_id=not k.deleted
            )
            return FileEntry.of(reg)
        if isinstance(k, Fifo):
            # fifo_entry, and the REG entry of its path that regf_id names (criu/fifo.c)
            regf_id = self.take_id()
            self.files.append(FileEntry.of(_reg(regf_id, k.path, flags, 0, mode=k.mode, size=0)))
            return FileEntry.of(FifoEntry(id=file_id, pipe_id=k.pipe_id, regf_id=regf_id))
        if isinstance(k, Pipe):
            self._pipe_data(k, d)
            return FileEntry.of(PipeEntry(id=file_id, pipe_id=k.pipe_id, flags=flags, fown=fown))
        if isinstance(k, Socket):
            return _socket(file_id, d, k)
        if isinstance(k, EventFd):
            return FileEntry.of(
                EventfdFileEntry(id=file_id, flags=flags, fown=fown, counter=k.count)
            )
        if isinstance(k, EventPoll):
            tfds = [
                EventpollTfdEntry(
                    id=0,
                    tfd=t.tfd,
                    events=t.events,
                    data=t.data,
                    dev=t.sdev,
                    inode=t.ino,
                    pos=t.pos,
                )
                for t in k.targets
            ]
            return FileEntry.of(EventpollFileEntry(id=file_id, flags=flags, fown=fown, tfd=tfds))
        if isinstance(k, SignalFd):
            return FileEntry.of(
                SignalfdEntry(id=file_id, flags=flags, fown=fown, sigmask=k.sigmask)
            )
        if isinstance(k, TimerFd):
            return FileEntry.of(
                TimerfdEntry(
                    id=file_id,
                    flags=flags,
                    fown=fown,
                    clockid=k.clockid,
                    ticks=k.ticks,
                    settime_flags=k.settime_flags,
                    vsec=k.vsec,
                    vnsec=k.vnsec,
                    isec=k.isec,
                    insec=k.insec,
                )
            )
        if isinstance(k, Inotify):
            wds = [
                InotifyWdEntry(
                    id=file_id,
                    i_ino=w.ino,
                    mask=w.mask,
                    ignored_mask=w.ignored_mask,
                    s_dev=w.sdev,
                    wd=w.wd,
                    f_handle=FhEntry(
                        bytes=w.fhandle_bytes,
                        type=w.fhandle_type,
                        handle=_handle_words(w.f_handle),
                    ),
                )
                for w in k.watches
            ]
            return FileEntry.of(InotifyFileEntry(id=file_id, flags=flags, fown=fown, wd=wds))
        if isinstance(k, Memfd):
            inode_id = self._memfd(k)
            return FileEntry.of(
                MemfdFileEntry(id=file_id, flags=flags, pos=d.pos, fown=fown, inode_id=inode_id)
            )
        return None

    def _pipe_data(self, k: Pipe, d: Descriptor) -> None:
        """pipes-data.img: the queued bytes of each pipe, once, read through a read end."""
        if k.pipe_id in self._pipes_done or d.access_mode != 0 or not k.queued:
            return
        self._pipes_done.add(k.pipe_id)
        from injector.fds import peek_pipe  # noqa: PLC0415 - a real process only

        data = peek_pipe(self.process.pid, d.fd)
        self.pipe_data.append(
            PipeDataEntry(pipe_id=k.pipe_id, bytes=len(data), size=k.capacity, extra=data)
        )

    def _memfd(self, k: Memfd) -> int:
        if k.ino not in self._memfd_ids:
            inode_id = len(self._memfd_ids) + 1
            self._memfd_ids[k.ino] = inode_id
            self.memfd_inodes.append(
                MemfdInodeEntry(
                    name=f"memfd:{k.name}",
                    uid=k.uid,
                    gid=k.gid,
                    size=k.size,
                    shmid=k.ino,
                    seals=k.seals or 0,
                    inode_id=inode_id,
                    mode=k.mode,
                )
            )
        return self._memfd_ids[k.ino]


def fd_entries(
    process: Process,
    first_id: int,
    table: list[Descriptor] | None = None,
    fs: FsState | None = None,
) -> DumpFds:
    """The descriptor images of the stopped ``process``; file ids from ``first_id`` on (the
    ids before it are the executable and mapped files of ``capture.task_entries``)."""
    table = process.descriptors() if table is None else table
    fs = process.fs_state() if fs is None else fs
    out = _Files(process, first_id)
    fdinfo: list[FdinfoEntry] = []
    skipped: list[str] = []
    seen: list[tuple[Descriptor, int, int]] = []  # (descriptor, file id, type)
    for d in table:
        shared = next(
            (
                (fid, ftype)
                for other, fid, ftype in seen
                if other.link == d.link
                and other.file_flags == d.file_flags
                and process.same_open_file(other.fd, d.fd)
            ),
            None,
        )
        if shared is None:
            file_id = out.take_id()
            entry = out.entry(file_id, d)
            if entry is None:
                out.next_id = file_id  # nothing else was taken: the id is free again
                skipped.append(f"fd {d.fd} ({d.link.decode(errors='replace')})")
                continue
            out.files.append(entry)
            shared = (file_id, entry.type)
            seen.append((d, file_id, entry.type))
        fdinfo.append(
            FdinfoEntry(id=shared[0], flags=FD_CLOEXEC if d.cloexec else 0, type=shared[1], fd=d.fd)
        )
    cwd_id = out.path(fs.cwd)
    root_id = out.path(fs.root)
    ids = TaskKobjIdsEntry(vm_id=_TASK_ID, files_id=_TASK_ID, fs_id=_TASK_ID, sighand_id=_TASK_ID)
    for name, value in _NS_IDS.items():
        setattr(ids, name, value)
    return DumpFds(
        ids=ids,
        fs=FsEntry(cwd_id=cwd_id, root_id=root_id, umask=fs.umask),
        fdinfo=fdinfo,
        files=out.files,
        pipe_data=out.pipe_data,
        memfd_inodes=out.memfd_inodes,
        skipped=skipped,
    )


# ---- the planner's view ----------------------------------------------------------------------


def _value_of_entry(img: ImageDir, fd: int, cloexec: bool, f: FileEntry) -> FdValue:
    k = f.kind_entry()
    name = f.type_name
    flags = int(getattr(k, "flags", 0) or 0) if k is not None else 0
    if isinstance(k, FifoEntry) and k.regf_id is not None:  # a FIFO's flags are its path's
        regf = img.files.get(int(k.regf_id))
        flags = int(regf.reg.flags) if regf is not None and regf.reg is not None else 0
    if isinstance(k, RegFileEntry):
        return FdValue(fd, name, cloexec, flags, int(k.pos), path=k.name, mode=k.mode)
    ident = None
    if isinstance(k, PipeEntry | FifoEntry):
        ident = int(k.pipe_id)
    elif isinstance(k, UnixSkEntry | InetSkEntry):
        ident = int(k.ino)
    pos = int(getattr(k, "pos", 0) or 0)
    return FdValue(fd, name, cloexec, flags, pos, ident=ident)


def image_fds(img: ImageDir, pid: int) -> tuple[FdValue, ...] | None:
    """The descriptor table of task ``pid`` of ``img``; None when the image has no
    descriptor state (no ids or fdinfo image for it)."""
    if not img.has(names.ids(pid)):
        return None
    files_id = int(img.ids(pid).files_id)
    if not img.has(names.fdinfo(files_id)):
        return None
    return tuple(
        _value_of_entry(img, int(e.fd), bool(int(e.flags) & FD_CLOEXEC), img.files[int(e.id)])
        for e in img.fdinfo(pid)
    )


def _live_value(d: Descriptor) -> FdValue:
    k = d.kind
    if isinstance(k, RegularFile):
        return FdValue(
            d.fd, "REG", d.cloexec, d.file_flags, d.pos, path=k.path, deleted=k.deleted,
            mode=k.mode,
        )  # fmt: skip
    ident = None
    if isinstance(k, Pipe | Fifo):
        ident = k.pipe_id
    elif isinstance(k, Socket):
        ident = k.ino
    what = d.link.decode(errors="replace")
    kind = d.fd_type
    if isinstance(k, Socket) and kind == "UND":
        kind = "SOCKET"  # its family unknown (no duplicate could be taken): a socket all the same
    return FdValue(d.fd, kind, d.cloexec, d.file_flags, d.pos, ident=ident, what=what)


def live_fds(table: Iterable[Descriptor]) -> tuple[FdValue, ...]:
    """The planner's view of a live descriptor table."""
    return tuple(_live_value(d) for d in table)


# ---- ELF build-id (reg_file_entry.build_id) ----------------------------------------------------

_NT_GNU_BUILD_ID = 3
_PT_NOTE = 4


def elf_build_id(path: str) -> list[int] | None:
    """The GNU build-id of an ELF file as CRIU 4.2 stores it (``reg_file_entry.build_id``:
    the note's bytes as little-endian u32 words), or None (not a 64-bit little-endian ELF
    file, no build-id note, unreadable)."""
    import struct  # noqa: PLC0415 - dump only

    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
                return None
            phoff, phentsize, phnum = (
                struct.unpack_from("<Q", head, 32)[0],
                struct.unpack_from("<H", head, 54)[0],
                struct.unpack_from("<H", head, 56)[0],
            )
            f.seek(phoff)
            table = f.read(phentsize * phnum)
            for i in range(phnum):
                p_type, _flags, p_offset, _va, _pa, p_filesz = struct.unpack_from(
                    "<IIQQQQ", table, i * phentsize
                )
                if p_type != _PT_NOTE or p_filesz > 1 << 16:
                    continue
                f.seek(p_offset)
                notes = f.read(p_filesz)
                pos = 0
                while pos + 12 <= len(notes):
                    namesz, descsz, ntype = struct.unpack_from("<III", notes, pos)
                    name_at = pos + 12
                    desc_at = name_at + (-(-namesz // 4) * 4)
                    desc = notes[desc_at : desc_at + descsz]
                    if ntype == _NT_GNU_BUILD_ID and notes[name_at : name_at + namesz] == b"GNU\0":
                        padded = desc.ljust(-(-len(desc) // 4) * 4, b"\0")
                        return list(struct.unpack(f"<{len(padded) // 4}I", padded))
                    pos = desc_at + (-(-descsz // 4) * 4)
    except (OSError, struct.error):
        return None
    return None

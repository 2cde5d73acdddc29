"""The descriptor table and the fs state (cwd, root, umask) of a live process, read without
ptrace: /proc/PID/fd, /proc/PID/fdinfo, sock_diag, and short-lived local duplicates.

What CRIU learns with its parasite (``criu/files.c`` ``dump_one_file``: the descriptors are
sent to CRIU and inspected there) is learned here from outside the target:

- link text and fdinfo of every descriptor (:mod:`injector.fdinfo` parses them), and ``stat``
  of /proc/PID/fd/N (the magic link leads to the open file itself, also for pipes, sockets,
  anonymous inodes and unlinked files);
- socket type, state, names, peers and queues from NETLINK_SOCK_DIAG (:mod:`injector.sockdiag`),
  matched by inode, in the target's network namespace;
- what neither shows (pipe fill level and size, memfd seals, socket options, the SIGIO owner)
  from a local duplicate taken with ``pidfd_getfd`` and closed at once. A duplicate shares the
  open file description, so the target's flags, offsets and pipe reader/writer counts stay as
  they were, and closing it drops only our reference. Duplicates are taken only of pipes,
  FIFOs, sockets, anonymous inodes and memfds, whose ``close`` does nothing else; never of
  files on disk and devices, where ``close`` runs the filesystem's or driver's ``flush`` (FUSE
  sends FLUSH to its server, NFS writes dirty pages back), which the target would notice.
  Sockets are also left alone when this process is in a cgroup-v1 ``net_cls`` or
  ``net_prio`` hierarchy: receiving a socket descriptor (``__receive_sock``) re-tags the
  socket with the receiver's class id and priority index.

The target keeps running while its table is read, so the table is a snapshot taken one
descriptor at a time: a descriptor closed meanwhile is left out, one closed and reopened
meanwhile is read again. Stop the target (``injector.attach``) for a consistent picture.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import os
import socket
import stat as stat_
import struct
import termios
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import attrs

from injector import _libc
from injector.errors import InjectorError, NoSuchProcess, PermissionDenied, ZombieProcess
from injector.fdinfo import (
    MEMFD_PREFIX,
    Descriptor,
    Fifo,
    FileOwner,
    FileStat,
    Memfd,
    Pipe,
    Socket,
    parse_fdinfo,
)
from injector.memo import remember
from injector.sockdiag import InetSocket, find_sockets, netns_inode, open_socket_netns
from injector.sockopts import read_socket_options

__all__ = ["FsState", "PathInfo", "peek_pipe", "read_fds", "read_fs"]

_F_GETSIG: Final = 11
_F_GETOWN_EX: Final = 16
_F_GETOWNER_UIDS: Final = 17  # CONFIG_CHECKPOINT_RESTORE
_F_GETPIPE_SZ: Final = 1032
_F_GET_SEALS: Final = 1034
_RETRIES: Final = 3


@functools.cache
def _shmem_dev() -> int:
    """The device of the kernel's internal shmem mount, which every (non-hugetlb) memfd is
    on (CRIU's ``kdat.shmem_dev``), found with a memfd of our own."""
    fd = os.memfd_create("applier-shmem-probe", os.MFD_CLOEXEC)
    try:
        return os.fstat(fd).st_dev
    finally:
        os.close(fd)


@functools.cache
def _may_duplicate_sockets() -> bool:
    """False when we are in a cgroup-v1 hierarchy with net_cls or net_prio (see the module
    docstring): there, taking a socket descriptor would change the target's socket."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return False
    for line in lines:
        controllers = line.split(":")[1].split(",") if line.count(":") >= 2 else []
        if "net_cls" in controllers or "net_prio" in controllers:
            return False
    return True


def _proc_error(pid: int, exc: OSError, what: str) -> InjectorError:
    if isinstance(exc, PermissionError):
        return PermissionDenied(
            pid,
            f"cannot read {what}: it needs ptrace read access (same user and dumpable, or "
            "CAP_SYS_PTRACE)",
            exc.errno or errno.EACCES,
        )
    if isinstance(exc, FileNotFoundError | ProcessLookupError):
        return NoSuchProcess(pid, "no such process", errno.ESRCH)
    return InjectorError(pid, f"cannot read {what}", exc.errno or 0)


def _check_process(pid: int, procfs: Path) -> None:
    """NoSuchProcess / ZombieProcess unless ``pid`` is a live process."""
    if pid <= 0:
        raise NoSuchProcess(pid, "not a valid process id", errno.ESRCH)
    try:
        stat = (procfs / str(pid) / "stat").read_bytes()
    except OSError as exc:
        raise _proc_error(pid, exc, "/proc/PID/stat") from exc
    if stat[stat.rindex(b")") + 2 :][:1] in (b"Z", b"X"):
        raise ZombieProcess(pid, "is a zombie (exited, not yet reaped)", errno.ESRCH)


def _same_file(path: Path, st: FileStat) -> bool:
    try:
        other = os.stat(path)
    except OSError:
        return False
    return (other.st_dev, other.st_ino) == (st.dev, st.ino)


def _read_small(path: str) -> bytes:
    """A small /proc file in full, with os.open and os.read (an fdinfo file: 6.9 us against
    8.9 for ``open(path, "rb", buffering=0).read()``, timeit of 5,000; one per descriptor of
    every table read)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = [os.read(fd, 4096)]
        while chunks[-1]:
            chunks.append(os.read(fd, 4096))
    finally:
        os.close(fd)
    return b"".join(chunks)


# What parse_fdinfo made of the same inputs (a pure function; Descriptors are immutable, so
# shared): from one read of a table to the next nearly every descriptor is the same.
# Cleared when it grows past _PARSED_MAX entries.
_PARSED: dict[tuple[int, bytes, bytes, FileStat | None, bool, bool | None], Descriptor] = {}
_PARSED_MAX = 1 << 12


def _parsed(
    fd: int, link: bytes, text: bytes, st: FileStat | None, *, real_name: bool, memfd: bool | None
) -> Descriptor:
    key = (fd, link, text, st, real_name, memfd)
    descriptor = _PARSED.get(key)
    if descriptor is None:
        descriptor = parse_fdinfo(fd, link, text, st, real_name=real_name, memfd=memfd)
        remember(_PARSED, key, descriptor, _PARSED_MAX)
    return descriptor


def _read_one(pid: int, procfs: Path, fd: int, *, stat_all: bool = True) -> Descriptor | None:
    """One descriptor, or ``None`` if it was closed while being read. Without ``stat_all``
    only path-named files are stat'ed (what planning compares of a pipe, socket or anonymous
    inode is in its link and fdinfo; memcached's 23 descriptors, most of them such)."""
    base = f"{procfs}/{pid}"  # strings, not Paths: a table of many descriptors is read often
    fd_path = os.fsencode(f"{base}/fd/{fd}")
    info_path = f"{base}/fdinfo/{fd}"
    for _ in range(_RETRIES):
        try:
            link = os.readlink(fd_path)
            text = _read_small(info_path)
        except FileNotFoundError:
            return None
        st: FileStat | None = None
        if stat_all or link.startswith(b"/"):
            # FileNotFoundError: closed meanwhile, or a saved tree whose link leads nowhere
            with contextlib.suppress(FileNotFoundError):
                st = FileStat.of(os.stat(fd_path))
        try:
            if os.readlink(fd_path) != link:
                continue  # closed and reopened as something else: read it again
        except FileNotFoundError:
            return None
        if link.startswith(b"/") and st is None:
            return None
        real_name = False
        memfd = None
        if st is not None and link.startswith(b"/"):
            if link.endswith(b" (deleted)") and st.nlink > 0:
                real_name = _same_file(Path(base) / "root" / os.fsdecode(link[1:]), st)
            if link.startswith(MEMFD_PREFIX):
                memfd = st.dev == _shmem_dev() and st.nlink == 0
        try:
            descriptor = _parsed(fd, link, text, st, real_name=real_name, memfd=memfd)
        except ValueError as exc:
            raise InjectorError(pid, f"unparsable /proc/PID/fdinfo/{fd}: {exc}") from exc
        if st is not None and descriptor.ino is not None and descriptor.ino != st.ino:
            continue  # the stat saw a newer file than the fdinfo did
        return descriptor
    return None


def _owner(fd: int) -> FileOwner | None:
    """``fown_entry`` of a descriptor we hold, as ``criu/pie/parasite.c`` ``fill_fds_fown``
    and ``criu/files.c`` ``fill_fd_params`` read it."""
    try:
        signum = fcntl.fcntl(fd, _F_GETSIG)
        pid_type, pid = struct.unpack("=ii", fcntl.fcntl(fd, _F_GETOWN_EX, bytes(8)))
        uid = euid = 0
        if pid:
            uid, euid = struct.unpack("=II", fcntl.fcntl(fd, _F_GETOWNER_UIDS, bytes(8)))
    except OSError:
        return None
    return FileOwner(uid=uid, euid=euid, signum=signum, pid_type=pid_type if pid else 0, pid=pid)


def _queued(fd: int) -> tuple[int | None, int | None]:
    try:
        queued = struct.unpack("=i", fcntl.ioctl(fd, termios.FIONREAD, bytes(4)))[0]
        capacity = fcntl.fcntl(fd, _F_GETPIPE_SZ)
    except OSError:
        return None, None
    return queued, capacity


def _socket_netns(fd: int, namespaces: dict[int, int]) -> int | None:
    """The inode of the netns socket ``fd`` lives in; the first descriptor of each namespace
    is kept in ``namespaces`` (inode -> descriptor) for the sock_diag query there."""
    try:
        nsfd = open_socket_netns(fd)
    except OSError:
        return None
    ino = os.fstat(nsfd).st_ino
    if ino in namespaces:
        os.close(nsfd)
    else:
        namespaces[ino] = nsfd
    return ino


def _probe(descriptor: Descriptor, fd: int, namespaces: dict[int, int]) -> Descriptor:
    """What a local duplicate ``fd`` of the descriptor tells beyond /proc."""
    kind = descriptor.kind
    if isinstance(kind, Pipe | Fifo):
        queued, capacity = _queued(fd)
        kind = attrs.evolve(kind, queued=queued, capacity=capacity)
    elif isinstance(kind, Memfd):
        with contextlib.suppress(OSError):
            kind = attrs.evolve(kind, seals=fcntl.fcntl(fd, _F_GET_SEALS))
    elif isinstance(kind, Socket):
        with contextlib.suppress(OSError):
            sock = socket.socket(fileno=fd)
            try:
                kind = attrs.evolve(
                    kind,
                    family=int(sock.family),
                    type=int(sock.type),
                    protocol=sock.proto,
                    options=read_socket_options(sock),
                    netns=_socket_netns(fd, namespaces),
                )
            finally:
                sock.detach()  # the descriptor is closed by the caller
    return attrs.evolve(descriptor, kind=kind, owner=_owner(fd))


def _wants_duplicate(descriptor: Descriptor) -> bool:
    kind = descriptor.kind
    if isinstance(kind, Socket):
        return _may_duplicate_sockets()
    if isinstance(kind, Memfd | Pipe | Fifo):
        return True
    # anonymous inodes (eventfd, epoll, signalfd, timerfd, inotify, pidfd, ...)
    return descriptor.link.startswith(b"anon_inode:")


@contextlib.contextmanager
def _pidfd(pid: int) -> Iterator[int | None]:
    try:
        fd: int | None = _libc.pidfd_open(pid)
    except OSError:
        fd = None
    try:
        yield fd
    finally:
        if fd is not None:
            os.close(fd)


def _with_duplicates(
    pid: int, table: list[Descriptor], namespaces: dict[int, int], *, only_sockets: bool = False
) -> list[Descriptor]:
    out = []
    with _pidfd(pid) as pidfd:
        allowed = pidfd is not None
        for descriptor in table:
            wanted = _wants_duplicate(descriptor) and (
                not only_sockets or isinstance(descriptor.kind, Socket)
            )
            if not (allowed and pidfd is not None and wanted):
                out.append(descriptor)
                continue
            try:
                local = _libc.pidfd_getfd(pidfd, descriptor.fd)
            except OSError as exc:
                if exc.errno in (errno.EPERM, errno.EACCES, errno.ESRCH, errno.ENOSYS):
                    allowed = False  # not ours to take (or gone): no duplicates at all
                out.append(descriptor)
                continue
            try:
                # the same file? (the descriptor may have been closed and reused meanwhile)
                if descriptor.stat is None or (
                    (os.fstat(local).st_dev, os.fstat(local).st_ino)
                    == (descriptor.stat.dev, descriptor.stat.ino)
                ):
                    descriptor = _probe(descriptor, local, namespaces)
            finally:
                os.close(local)
            out.append(descriptor)
    return out


def _with_sockets(
    pid: int, procfs: Path, table: list[Descriptor], namespaces: dict[int, int]
) -> list[Descriptor]:
    """Sock_diag answers joined by inode: in the process's network namespace, and in every
    other namespace one of its sockets was seen to live in (``namespaces``)."""
    sockets = [d.kind for d in table if isinstance(d.kind, Socket)]
    if not sockets:
        return table
    try:
        own = netns_inode(pid, procfs)
    except OSError:
        own = None  # find_sockets below says why
    elsewhere: dict[int, set[int]] = {}
    at_home = set()
    for sk in sockets:
        if sk.netns is not None and sk.netns != own and sk.netns in namespaces:
            elsewhere.setdefault(sk.netns, set()).add(sk.ino)
        else:
            at_home.add(sk.ino)
    found = find_sockets(pid, at_home, procfs)
    for ns, inodes in elsewhere.items():
        found |= find_sockets(pid, inodes, procfs, netns_fd=namespaces[ns])
    out = []
    for descriptor in table:
        kind = descriptor.kind
        if isinstance(kind, Socket) and (diag := found.get(kind.ino)) is not None:
            family = diag.family if isinstance(diag, InetSocket) else socket.AF_UNIX
            kind = attrs.evolve(
                kind,
                diag=diag,
                family=kind.family if kind.family is not None else int(family),
                type=kind.type if kind.type is not None else int(diag.type),
                netns=kind.netns if kind.netns is not None else diag.netns,
            )
            descriptor = attrs.evolve(descriptor, kind=kind)
        out.append(descriptor)
    return out


def read_fds(
    pid: int,
    procfs: Path = Path("/proc"),
    *,
    duplicates: bool = True,
    sock_diag: bool = True,
    only_sockets: bool = False,
) -> list[Descriptor]:
    """Every open descriptor of process ``pid``, in descriptor order.

    ``duplicates``: learn what /proc does not show from short-lived local duplicates (see the
    module docstring; silently skipped where ``pidfd_getfd`` is not permitted);
    ``only_sockets``: of sockets only (their family and options), not of pipes, memfds and
    anonymous inodes (queued bytes, seals, the owner: what a dump records, not what planning
    an apply compares; memcached's 23 descriptors: 1.6-1.7 -> 1.3-1.4 ms), and a stat of
    path-named files only (``Descriptor.stat`` is None for the others). ``sock_diag``:
    ask sock_diag about the sockets, in the target's network namespace and in any other one a
    socket's duplicate says it lives in (a socket made before a ``setns``). Pass
    ``duplicates=False, sock_diag=False`` to read a saved procfs tree.

    Raises ``NoSuchProcess`` (``ZombieProcess``) when there is no live process ``pid``,
    ``PermissionDenied`` when /proc refuses us its table or its sockets live in a network
    namespace we may not enter."""
    _check_process(pid, procfs)
    try:
        names = os.listdir(procfs / str(pid) / "fd")
    except OSError as exc:
        raise _proc_error(pid, exc, "/proc/PID/fd") from exc
    table = []
    for fd in sorted(int(name) for name in names if name.isdigit()):
        try:
            descriptor = _read_one(pid, procfs, fd, stat_all=not only_sockets)
        except PermissionError as exc:
            raise _proc_error(pid, exc, f"/proc/PID/fd/{fd}") from exc
        except ProcessLookupError as exc:
            raise NoSuchProcess(pid, "exited while its descriptors were read", errno.ESRCH) from exc
        if descriptor is not None:
            table.append(descriptor)
    if not (procfs / str(pid)).exists():
        raise NoSuchProcess(pid, "exited while its descriptors were read", errno.ESRCH)
    namespaces: dict[int, int] = {}  # netns inode -> descriptor, from the sockets' duplicates
    try:
        if duplicates:
            table = _with_duplicates(pid, table, namespaces, only_sockets=only_sockets)
        if sock_diag:
            table = _with_sockets(pid, procfs, table, namespaces)
    finally:
        for nsfd in namespaces.values():
            os.close(nsfd)
    return table


_tee = ctypes.CDLL(None, use_errno=True).tee
_tee.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_size_t, ctypes.c_uint]
_tee.restype = ctypes.c_ssize_t
_SPLICE_F_NONBLOCK: Final = 2
_F_SETPIPE_SZ: Final = 1031


def _tee_all(source: int) -> bytes:
    """Copy what the pipe ``source`` holds, without consuming it: tee(2) into a pipe of our
    own as large as ``source``, then read that."""
    capacity = fcntl.fcntl(source, _F_GETPIPE_SZ)
    r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        if fcntl.fcntl(w, _F_GETPIPE_SZ) < capacity:
            fcntl.fcntl(w, _F_SETPIPE_SZ, capacity)
        n = _tee(source, w, capacity, _SPLICE_F_NONBLOCK)
        if n < 0:
            err = ctypes.get_errno()
            if err == errno.EAGAIN:
                return b""  # empty
            raise OSError(err, f"tee: {os.strerror(err)}")
        chunks = []
        while n > 0:
            chunk = os.read(r, n)
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(r)
        os.close(w)


def peek_pipe(pid: int, fd: int) -> bytes:
    """The bytes queued in the pipe or FIFO that descriptor ``fd`` of ``pid`` reads from,
    left in place (``tee``, as ``criu/pipes.c`` ``dump_one_pipe_data`` does for
    pipes-data.img). Needs the ``pidfd_getfd`` permission (PTRACE_MODE_ATTACH).

    Raises ``NoSuchProcess``, ``PermissionDenied``, or ``InjectorError`` with EBADF (no such
    descriptor, or it is the write end, which tee cannot read) or EINVAL (not a pipe)."""
    _check_process(pid, Path("/proc"))
    with _pidfd(pid) as pidfd:
        if pidfd is None:
            raise NoSuchProcess(pid, "no such process", errno.ESRCH)
        try:
            local = _libc.pidfd_getfd(pidfd, fd)
        except OSError as exc:
            if exc.errno in (errno.EPERM, errno.EACCES):
                raise PermissionDenied(
                    pid, "cannot take a duplicate of its descriptor (pidfd_getfd)", exc.errno
                ) from exc
            raise InjectorError(pid, f"cannot take descriptor {fd}", exc.errno or 0) from exc
    try:
        if not stat_.S_ISFIFO(os.fstat(local).st_mode):
            raise InjectorError(pid, f"descriptor {fd} is not a pipe", errno.EINVAL)
        if fcntl.fcntl(local, fcntl.F_GETFL) & os.O_ACCMODE == os.O_WRONLY:
            raise InjectorError(pid, f"descriptor {fd} is a write end", errno.EBADF)
        try:
            return _tee_all(local)
        except OSError as exc:
            raise InjectorError(pid, f"cannot peek into descriptor {fd}", exc.errno or 0) from exc
    finally:
        os.close(local)


@attrs.frozen
class PathInfo:
    """A directory reference (cwd or root): its path as readlink shows it (`` (deleted)``
    stripped into ``deleted``), and the stat of the directory itself."""

    path: str
    deleted: bool
    stat: FileStat | None

    @property
    def is_dir(self) -> bool:
        return self.stat is not None and stat_.S_ISDIR(self.stat.mode)


@attrs.frozen
class FsState:
    """``fs_entry``: cwd, root, and umask (``Umask:`` of /proc/PID/status, Linux 4.7+)."""

    cwd: PathInfo
    root: PathInfo
    umask: int | None


def _path_info(base: Path, name: str) -> PathInfo:
    link = os.readlink(bytes(base / name))
    try:
        st: FileStat | None = FileStat.of(os.stat(base / name))
    except FileNotFoundError:
        st = None
    deleted = link.endswith(b" (deleted)") and not (
        st is not None and st.nlink > 0 and _same_file(base / "root" / os.fsdecode(link[1:]), st)
    )
    raw = link[: -len(b" (deleted)")] if deleted else link
    return PathInfo(os.fsdecode(raw), deleted, st)


def read_fs(pid: int, procfs: Path = Path("/proc")) -> FsState:
    """cwd, root and umask of process ``pid`` (errors as :func:`read_fds`)."""
    _check_process(pid, procfs)
    base = procfs / str(pid)
    try:
        cwd = _path_info(base, "cwd")
        root = _path_info(base, "root")
        status = (base / "status").read_bytes()
    except OSError as exc:
        raise _proc_error(pid, exc, "/proc/PID/cwd, root and status") from exc
    umask = None
    for line in status.split(b"\n"):
        if line.startswith(b"Umask:"):
            umask = int(line.split()[1], 8)
    return FsState(cwd=cwd, root=root, umask=umask)

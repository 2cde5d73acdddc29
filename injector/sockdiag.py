"""What the kernel tells about sockets through NETLINK_SOCK_DIAG, for AF_UNIX and AF_INET/6.

A socket descriptor in /proc shows only ``socket:[INODE]``; type, state, names, peer, queue
lengths and shutdown state come from sock_diag (``net/unix/diag.c``, ``net/ipv4/inet_diag.c``,
``include/uapi/linux/{sock_diag,unix_diag,inet_diag}.h``), the way CRIU's ``criu/sockets.c``
``collect_sockets`` gathers them: one dump per family and protocol, matched by inode.

Netlink messages are in host byte order (``=`` struct codes); ports and addresses inside
``inet_diag_sockid`` are in network order (``!``).

sock_diag only sees sockets of the network namespace the netlink socket was created in. For a
target in another netns, :func:`find_sockets` creates the netlink socket inside that namespace
from a short-lived thread (``setns(CLONE_NEWNET)`` affects only the calling thread, and the
thread ends right after), so the calling process never changes namespace. That needs
CAP_SYS_ADMIN over both namespaces; without it the error says so (PermissionDenied) instead of
reporting sockets as missing.

Values carry the kernel's own numbers: ``type`` is SOCK_STREAM (1), SOCK_DGRAM (2),
SOCK_SEQPACKET (5) ..., ``state`` uses the TCP state numbers for every family (1 ESTABLISHED,
7 CLOSE, 10 LISTEN), as CRIU's images do.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import ipaddress
import os
import socket
import struct
import threading
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Final

import attrs

from injector.errors import InjectorError, NoSuchProcess, PermissionDenied

__all__ = [
    "SHUT_RD",
    "SHUT_WR",
    "TCP_CLOSE",
    "TCP_ESTABLISHED",
    "TCP_LISTEN",
    "InetSocket",
    "InetSockopt",
    "SkMemInfo",
    "SockDiag",
    "UnixSocket",
    "find_sockets",
    "iter_netlink",
    "kernel_dev",
    "netns_inode",
    "open_socket_netns",
    "parse_inet_diag_msg",
    "parse_unix_diag_msg",
]

# include/uapi/linux/sock_diag.h, netlink.h
NETLINK_SOCK_DIAG: Final = 4
SOCK_DIAG_BY_FAMILY: Final = 20
NLM_F_REQUEST: Final = 0x1
NLM_F_DUMP: Final = 0x300
NLMSG_ERROR: Final = 2
NLMSG_DONE: Final = 3

# include/net/tcp_states.h (every family uses these numbers in diag answers)
TCP_ESTABLISHED: Final = 1
TCP_CLOSE: Final = 7
TCP_LISTEN: Final = 10

# sk_shutdown bits (include/net/sock.h): what UNIX_DIAG_SHUTDOWN / INET_DIAG_SHUTDOWN carry
SHUT_RD: Final = 1  # RCV_SHUTDOWN
SHUT_WR: Final = 2  # SEND_SHUTDOWN

# unix_diag.h
UDIAG_SHOW_NAME: Final = 0x01
UDIAG_SHOW_VFS: Final = 0x02
UDIAG_SHOW_PEER: Final = 0x04
UDIAG_SHOW_ICONS: Final = 0x08
UDIAG_SHOW_RQLEN: Final = 0x10
UDIAG_SHOW_MEMINFO: Final = 0x20
UDIAG_SHOW_UID: Final = 0x40
UNIX_DIAG_NAME: Final = 0
UNIX_DIAG_VFS: Final = 1
UNIX_DIAG_PEER: Final = 2
UNIX_DIAG_ICONS: Final = 3
UNIX_DIAG_RQLEN: Final = 4
UNIX_DIAG_MEMINFO: Final = 5
UNIX_DIAG_SHUTDOWN: Final = 6
UNIX_DIAG_UID: Final = 7

# inet_diag.h
INET_DIAG_TOS: Final = 5
INET_DIAG_TCLASS: Final = 6
INET_DIAG_SKMEMINFO: Final = 7
INET_DIAG_SHUTDOWN: Final = 8
INET_DIAG_PROTOCOL: Final = 10
INET_DIAG_SKV6ONLY: Final = 11
INET_DIAG_MARK: Final = 15
INET_DIAG_CLASS_ID: Final = 17
INET_DIAG_CGROUP_ID: Final = 21
INET_DIAG_SOCKOPT: Final = 22

IPPROTO_UDPLITE: Final = 136

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_NLATTR = struct.Struct("=HH")  # len, type
_UNIX_REQ = struct.Struct("=BBHIIIII")  # family, protocol, pad, states, ino, show, cookie[2]
_UNIX_MSG = struct.Struct("=BBBxIII")  # family, type, state, pad, ino, cookie[2]
_INET_REQ_HEAD = struct.Struct("=BBBBI")  # family, protocol, ext, pad, states
_SOCKID = struct.Struct("!HH16s16s")  # sport, dport, src, dst (network order) ...
_SOCKID_TAIL = struct.Struct("=III")  # ... then if, cookie[2] in host order
_INET_MSG_HEAD = struct.Struct("=BBBB")  # family, state, timer, retrans
_INET_MSG_TAIL = struct.Struct("=IIIII")  # expires, rqueue, wqueue, uid, inode
_INET_MSG_SIZE = _INET_MSG_HEAD.size + _SOCKID.size + _SOCKID_TAIL.size + _INET_MSG_TAIL.size

_CLONE_NEWNET: Final = 0x40000000
_SIOCGSKNS: Final = 0x894C  # include/uapi/linux/sockios.h
_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.setns.restype = ctypes.c_int


def kernel_dev(raw: int) -> int:
    """A device number as the kernel keeps it inside (``MKDEV``: major << 20 | minor, what
    ``s_dev`` in fdinfo and diag answers holds) as an ``os.makedev`` value (``st_dev``)."""
    return os.makedev(raw >> 20, raw & 0xFFFFF)


@attrs.frozen
class SkMemInfo:
    """``SK_MEMINFO_*`` (include/uapi/linux/sock_diag.h): socket memory, in bytes."""

    rmem_alloc: int
    rcvbuf: int
    wmem_alloc: int
    sndbuf: int
    fwd_alloc: int
    wmem_queued: int
    optmem: int
    backlog: int
    drops: int


def _meminfo(data: bytes) -> SkMemInfo | None:
    n = len(SkMemInfo.__attrs_attrs__)
    if len(data) < 4 * n:
        return None
    return SkMemInfo(*struct.unpack_from(f"={n}I", data))


@attrs.frozen
class UnixSocket:
    """One AF_UNIX socket as unix_diag reports it.

    ``name`` is the address it is bound to as bound (``None``: unbound; a leading NUL byte:
    abstract, every byte significant; a path may be relative to the binder's cwd, and comes
    without the terminating NUL that the kernel sends and CRIU keeps in
    ``unix_sk_entry.name``); ``vfs_ino``/``vfs_dev``
    identify the socket file of a path-bound socket (``vfs_dev`` as ``os.makedev``). ``peer`` is
    the peer's inode (0: none). ``icons`` are the inodes of connections waiting in a listening
    socket's accept queue. ``rqueue``/``wqueue``: for a listening socket the number of waiting
    connections and the backlog, otherwise bytes unread and the send-buffer memory in use
    (``sk_wmem_alloc``, truesize, not payload bytes). ``shutdown`` is a SHUT_RD | SHUT_WR mask.
    ``netns`` is the inode of the network namespace it was found in.
    """

    ino: int
    type: int
    state: int
    name: bytes | None
    peer: int
    vfs_ino: int | None
    vfs_dev: int | None
    icons: tuple[int, ...]
    rqueue: int
    wqueue: int
    shutdown: int
    uid: int | None
    meminfo: SkMemInfo | None
    cookie: int
    netns: int = 0

    @property
    def abstract(self) -> bool:
        return self.name is not None and self.name[:1] == b"\0"

    @property
    def backlog(self) -> int:
        """What CRIU stores as ``unix_sk_entry.backlog`` (the diag ``wqueue``)."""
        return self.wqueue


@attrs.frozen
class InetSockopt:
    """``struct inet_diag_sockopt`` (INET_DIAG_SOCKOPT, Linux 5.10+)."""

    recverr: bool
    is_icsk: bool
    freebind: bool
    hdrincl: bool
    mc_loop: bool
    transparent: bool
    mc_all: bool
    nodefrag: bool
    bind_address_no_port: bool
    recverr_rfc4884: bool
    defer_connect: bool

    @classmethod
    def parse(cls, data: bytes) -> InetSockopt | None:
        if len(data) < 2:
            return None
        a, b = data[0], data[1]
        return cls(*(bool(a >> i & 1) for i in range(8)), *(bool(b >> i & 1) for i in range(3)))


@attrs.frozen
class InetSocket:
    """One AF_INET/AF_INET6 socket as inet_diag reports it.

    ``type`` follows from the protocol the dump asked for (TCP: SOCK_STREAM, UDP/UDP-Lite:
    SOCK_DGRAM, raw: SOCK_RAW). ``src``/``dst`` are ``ipaddress`` values (an IPv4 socket
    reports its addresses in the first 4 bytes), ports are host integers. ``rqueue``/``wqueue``:
    for TCP LISTEN the accept queue length and the backlog, for TCP otherwise bytes unread and
    bytes not yet acknowledged, for UDP the memory in the queues. ``ifindex`` is the bound
    device (0: none). ``tos``, ``tclass``, ``v6only``, ``mark`` (only with CAP_NET_ADMIN),
    ``class_id``, ``cgroup_id`` and ``sockopt`` are ``None`` when the kernel did not send them.
    """

    ino: int
    family: int
    protocol: int
    type: int
    state: int
    src: ipaddress.IPv4Address | ipaddress.IPv6Address
    sport: int
    dst: ipaddress.IPv4Address | ipaddress.IPv6Address
    dport: int
    ifindex: int
    rqueue: int
    wqueue: int
    uid: int
    shutdown: int
    timer: int
    retrans: int
    expires: int
    cookie: int
    tos: int | None
    tclass: int | None
    v6only: bool | None
    mark: int | None
    class_id: int | None
    cgroup_id: int | None
    meminfo: SkMemInfo | None
    sockopt: InetSockopt | None
    netns: int = 0

    @property
    def backlog(self) -> int:
        """What CRIU stores as ``inet_sk_entry.backlog`` (the diag ``wqueue``)."""
        return self.wqueue


def iter_netlink(data: bytes) -> Iterator[tuple[int, int, int, bytes]]:
    """(type, flags, seq, payload) of every netlink message in one received buffer; raises
    ``ValueError`` for a header that runs past the buffer."""
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, mtype, flags, seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > len(data):
            raise ValueError(f"netlink message of length {length} at offset {offset}")
        yield mtype, flags, seq, data[offset + _NLMSGHDR.size : offset + length]
        offset += (length + 3) & ~3


def _attributes(data: bytes) -> dict[int, bytes]:
    """Netlink attributes (type -> payload); the nested/byte-order flag bits are masked off and
    a truncated attribute ends the list."""
    result: dict[int, bytes] = {}
    offset = 0
    while offset + _NLATTR.size <= len(data):
        length, atype = _NLATTR.unpack_from(data, offset)
        if length < _NLATTR.size or offset + length > len(data):
            break
        result[atype & 0x3FFF] = data[offset + _NLATTR.size : offset + length]
        offset += (length + 3) & ~3
    return result


def _u32(data: bytes | None) -> int | None:
    return struct.unpack_from("=I", data)[0] if data is not None and len(data) >= 4 else None


def _u8(data: bytes | None) -> int | None:
    return data[0] if data else None


def parse_unix_diag_msg(payload: bytes, netns: int = 0) -> UnixSocket:
    """A ``unix_diag_msg`` and its attributes (the payload of one SOCK_DIAG_BY_FAMILY reply)."""
    if len(payload) < _UNIX_MSG.size:
        raise ValueError(f"unix_diag_msg of {len(payload)} bytes")
    _family, stype, state, ino, c0, c1 = _UNIX_MSG.unpack_from(payload)
    attrs_ = _attributes(payload[_UNIX_MSG.size :])
    vfs = attrs_.get(UNIX_DIAG_VFS)
    vfs_ino = vfs_dev = None
    if vfs is not None and len(vfs) >= 8:
        vfs_ino, raw_dev = struct.unpack_from("=II", vfs)
        vfs_dev = kernel_dev(raw_dev)
    rq = attrs_.get(UNIX_DIAG_RQLEN)
    rqueue, wqueue = struct.unpack_from("=II", rq) if rq is not None and len(rq) >= 8 else (0, 0)
    icons = attrs_.get(UNIX_DIAG_ICONS, b"")
    name = attrs_.get(UNIX_DIAG_NAME)
    if name and name[:1] != b"\0" and name.endswith(b"\0"):
        name = name[:-1]  # a path name arrives with its terminating NUL (unix_mkname_bsd)
    return UnixSocket(
        ino=ino,
        type=stype,
        state=state,
        name=name,
        peer=_u32(attrs_.get(UNIX_DIAG_PEER)) or 0,
        vfs_ino=vfs_ino,
        vfs_dev=vfs_dev,
        icons=struct.unpack_from(f"={len(icons) // 4}I", icons),
        rqueue=rqueue,
        wqueue=wqueue,
        shutdown=_u8(attrs_.get(UNIX_DIAG_SHUTDOWN)) or 0,
        uid=_u32(attrs_.get(UNIX_DIAG_UID)),
        meminfo=_meminfo(attrs_.get(UNIX_DIAG_MEMINFO, b"")),
        cookie=c0 | c1 << 32,
        netns=netns,
    )


_TYPE_OF_PROTOCOL = {
    socket.IPPROTO_TCP: socket.SOCK_STREAM,
    socket.IPPROTO_UDP: socket.SOCK_DGRAM,
    IPPROTO_UDPLITE: socket.SOCK_DGRAM,
}


def _address(family: int, raw: bytes) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if family == socket.AF_INET:
        return ipaddress.IPv4Address(raw[:4])
    return ipaddress.IPv6Address(raw)


def parse_inet_diag_msg(payload: bytes, protocol: int, netns: int = 0) -> InetSocket:
    """An ``inet_diag_msg`` and its attributes, from a dump that asked for ``protocol``
    (IPPROTO_TCP, IPPROTO_UDP, IPPROTO_UDPLITE or IPPROTO_RAW)."""
    if len(payload) < _INET_MSG_SIZE:
        raise ValueError(f"inet_diag_msg of {len(payload)} bytes")
    family, state, timer, retrans = _INET_MSG_HEAD.unpack_from(payload)
    offset = _INET_MSG_HEAD.size
    sport, dport, src, dst = _SOCKID.unpack_from(payload, offset)
    offset += _SOCKID.size
    ifindex, c0, c1 = _SOCKID_TAIL.unpack_from(payload, offset)
    offset += _SOCKID_TAIL.size
    expires, rqueue, wqueue, uid, ino = _INET_MSG_TAIL.unpack_from(payload, offset)
    attrs_ = _attributes(payload[_INET_MSG_SIZE:])
    stype = int(_TYPE_OF_PROTOCOL.get(protocol, socket.SOCK_RAW))
    real_protocol = protocol
    if stype == socket.SOCK_RAW:
        # raw_diag puts the socket's protocol in INET_DIAG_PROTOCOL (and in the local port)
        real_protocol = _u8(attrs_.get(INET_DIAG_PROTOCOL)) or sport
    v6only = attrs_.get(INET_DIAG_SKV6ONLY)
    cgroup = attrs_.get(INET_DIAG_CGROUP_ID)
    return InetSocket(
        ino=ino,
        family=family,
        protocol=real_protocol,
        type=stype,
        state=state,
        src=_address(family, src),
        sport=sport,
        dst=_address(family, dst),
        dport=dport,
        ifindex=ifindex,
        rqueue=rqueue,
        wqueue=wqueue,
        uid=uid,
        shutdown=_u8(attrs_.get(INET_DIAG_SHUTDOWN)) or 0,
        timer=timer,
        retrans=retrans,
        expires=expires,
        cookie=c0 | c1 << 32,
        tos=_u8(attrs_.get(INET_DIAG_TOS)),
        tclass=_u8(attrs_.get(INET_DIAG_TCLASS)),
        v6only=None if v6only is None else bool(v6only[0]),
        mark=_u32(attrs_.get(INET_DIAG_MARK)),
        class_id=_u32(attrs_.get(INET_DIAG_CLASS_ID)),
        cgroup_id=struct.unpack_from("=Q", cgroup)[0] if cgroup and len(cgroup) >= 8 else None,
        meminfo=_meminfo(attrs_.get(INET_DIAG_SKMEMINFO, b"")),
        sockopt=InetSockopt.parse(attrs_.get(INET_DIAG_SOCKOPT, b"")),
        netns=netns,
    )


def _netlink_socket() -> socket.socket:
    return socket.socket(
        socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG
    )


def _netlink_socket_in(netns_fd: int) -> socket.socket:
    """A sock_diag socket created inside the network namespace ``netns_fd`` refers to, by a
    thread of its own that enters that namespace and then ends (raises ``OSError``)."""
    box: list[socket.socket | OSError] = []

    def run() -> None:
        try:
            if _libc.setns(netns_fd, _CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns(CLONE_NEWNET): {os.strerror(err)}")
            box.append(_netlink_socket())
        except OSError as exc:
            box.append(exc)

    thread = threading.Thread(target=run, name="sockdiag-netns", daemon=True)
    thread.start()
    thread.join()
    result = box[0]
    if isinstance(result, OSError):
        raise result
    return result


class SockDiag:
    """One NETLINK_SOCK_DIAG socket (in our network namespace, or in the one ``netns_fd``
    refers to); a context manager. Methods raise ``OSError`` as the kernel answers."""

    def __init__(self, netns_fd: int | None = None) -> None:
        self._sock = _netlink_socket() if netns_fd is None else _netlink_socket_in(netns_fd)
        self._seq = 0
        # the namespace the socket was created in: the one entered, or the calling thread's
        where = os.fstat(netns_fd) if netns_fd is not None else os.stat("/proc/thread-self/ns/net")
        self.netns = where.st_ino

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> SockDiag:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _dump(self, request: bytes) -> Iterator[bytes]:
        """Send one dump request; yield the payload of every reply message."""
        self._seq += 1
        seq = self._seq
        header = _NLMSGHDR.pack(
            _NLMSGHDR.size + len(request), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq, 0
        )
        self._sock.sendto(header + request, (0, 0))
        while True:
            # a dump batch never exceeds 32 KiB (netlink_recvmsg caps max_recvmsg_len)
            data = self._sock.recv(1 << 16)
            if not data:
                raise OSError(errno.EIO, "sock_diag: connection closed")
            for mtype, _flags, mseq, payload in iter_netlink(data):
                if mseq != seq:
                    continue
                if mtype == NLMSG_DONE:
                    code = struct.unpack_from("=i", payload)[0] if len(payload) >= 4 else 0
                    if code < 0:
                        raise OSError(-code, f"sock_diag dump: {os.strerror(-code)}")
                    return
                if mtype == NLMSG_ERROR:
                    code = struct.unpack_from("=i", payload)[0]
                    if code == 0:
                        return
                    raise OSError(-code, f"sock_diag: {os.strerror(-code)}")
                yield payload

    def unix(self) -> Iterator[UnixSocket]:
        """Every AF_UNIX socket of the namespace, in all states."""
        show = (
            UDIAG_SHOW_NAME
            | UDIAG_SHOW_VFS
            | UDIAG_SHOW_PEER
            | UDIAG_SHOW_ICONS
            | UDIAG_SHOW_RQLEN
            | UDIAG_SHOW_MEMINFO
            | UDIAG_SHOW_UID
        )
        request = _UNIX_REQ.pack(socket.AF_UNIX, 0, 0, 0xFFFFFFFF, 0, show, 0, 0)
        for payload in self._dump(request):
            yield parse_unix_diag_msg(payload, self.netns)

    def inet(self, family: int, protocol: int) -> Iterator[InetSocket]:
        """Every ``family`` socket of ``protocol`` in the namespace, in all states (TIME_WAIT
        and SYN_RECV entries have inode 0)."""
        ext = 1 << (INET_DIAG_TOS - 1) | 1 << (INET_DIAG_TCLASS - 1)
        ext |= 1 << (INET_DIAG_SKMEMINFO - 1)
        # For raw sockets ``pad`` is sdiag_raw_protocol; 0 with IPPROTO_RAW asks for them all.
        request = _INET_REQ_HEAD.pack(family, protocol, ext, 0, 0xFFFFFFFF)
        request += _SOCKID.pack(0, 0, bytes(16), bytes(16)) + _SOCKID_TAIL.pack(
            0, 0xFFFFFFFF, 0xFFFFFFFF
        )
        for payload in self._dump(request):
            yield parse_inet_diag_msg(payload, protocol, self.netns)

    def find(self, inodes: Collection[int]) -> dict[int, UnixSocket | InetSocket]:
        """The sockets among ``inodes`` (unix first, then TCP, UDP, UDP-Lite and raw, for IPv4
        and IPv6; stops as soon as all are found). A protocol whose diag module is missing
        (ENOENT) is skipped."""
        wanted = set(inodes)
        found: dict[int, UnixSocket | InetSocket] = {}
        queries: list[tuple[int, int]] = [(socket.AF_UNIX, 0)]
        for protocol in (socket.IPPROTO_TCP, socket.IPPROTO_UDP, IPPROTO_UDPLITE):
            queries += [(socket.AF_INET, protocol), (socket.AF_INET6, protocol)]
        queries += [(socket.AF_INET, socket.IPPROTO_RAW), (socket.AF_INET6, socket.IPPROTO_RAW)]
        for family, protocol in queries:
            if not wanted - found.keys():
                break
            it = self.unix() if family == socket.AF_UNIX else self.inet(family, protocol)
            try:
                for sk in it:
                    if sk.ino in wanted:
                        found[sk.ino] = sk
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.EINVAL, errno.EOPNOTSUPP):
                    raise
        return found


def netns_inode(pid: int | str, procfs: Path = Path("/proc")) -> int:
    """The inode of the network namespace of ``pid`` (or ``"self"``), from the text of
    /proc/PID/ns/net (``net:[INODE]``), so saved procfs trees work as well."""
    text = os.readlink(procfs / str(pid) / "ns" / "net")
    if not (text.startswith("net:[") and text.endswith("]")):
        raise ValueError(f"unexpected /proc/{pid}/ns/net link {text!r}")
    return int(text[5:-1])


def open_socket_netns(sock_fd: int) -> int:
    """A new descriptor of the network namespace the socket ``sock_fd`` lives in
    (``SIOCGSKNS``; needs CAP_NET_ADMIN over that namespace, raises ``OSError``)."""
    fd: int = fcntl.ioctl(sock_fd, _SIOCGSKNS)
    return fd


def find_sockets(
    pid: int,
    inodes: Collection[int],
    procfs: Path = Path("/proc"),
    *,
    netns_fd: int | None = None,
) -> dict[int, UnixSocket | InetSocket]:
    """The AF_UNIX and AF_INET/6 sockets among ``inodes`` as sock_diag sees them in the
    network namespace of ``pid`` (or in the one ``netns_fd`` refers to: where some socket of
    ``pid`` lives, see :func:`open_socket_netns`). Sockets of other families, or that
    sock_diag does not list (an unbound TCP socket, one living in yet another netns), are
    simply absent.

    Raises ``NoSuchProcess`` when ``pid`` is gone, ``PermissionDenied`` when the namespace is
    not ours and we may not enter it, ``InjectorError`` for any other netlink failure."""
    if not inodes:
        return {}
    if netns_fd is not None:
        theirs = os.fstat(netns_fd).st_ino
    else:
        try:
            theirs = netns_inode(pid, procfs)
        except FileNotFoundError as exc:
            raise NoSuchProcess(pid, "no such process", errno.ESRCH) from exc
        except PermissionError as exc:
            raise PermissionDenied(
                pid, "cannot read /proc/PID/ns/net (ptrace access mode read)", exc.errno or 0
            ) from exc
    ours = os.stat("/proc/thread-self/ns/net").st_ino
    try:
        if theirs == ours:
            with SockDiag() as diag:
                return diag.find(inodes)
        if netns_fd is not None:
            with SockDiag(netns_fd) as diag:
                return diag.find(inodes)
        try:
            nsfd = os.open(procfs / str(pid) / "ns" / "net", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError as exc:
            raise NoSuchProcess(pid, "no such process", errno.ESRCH) from exc
        try:
            with SockDiag(nsfd) as diag:
                return diag.find(inodes)
        finally:
            os.close(nsfd)
    except PermissionError as exc:
        raise PermissionDenied(
            pid,
            f"its sockets live in network namespace net:[{theirs}], ours is net:[{ours}]; "
            "sock_diag sees only one namespace, and entering theirs needs CAP_SYS_ADMIN",
            exc.errno or errno.EPERM,
        ) from exc
    except OSError as exc:
        if isinstance(exc, InjectorError):
            raise
        raise InjectorError(pid, "sock_diag query failed", exc.errno or 0) from exc
    except ValueError as exc:
        raise InjectorError(pid, f"malformed sock_diag answer: {exc}") from exc

"""Socket kinds of ``files.img`` entries (CRIU images/sk-unix.proto, sk-inet.proto, sk-opts.proto,
tcp-stream.proto ``tcp_opts_entry``; criu/sk-unix.c, sk-inet.c, sockets.c).

``family``/``type``/``state``/``proto`` are the kernel's numbers; the tables below give the names
crit prints for them.  IP addresses are stored as 32-bit words holding the address bytes in
network order read as little-endian integers (one word for IPv4, four for IPv6), which
:func:`ip_from_words` and :func:`ip_to_words` convert.  A unix socket's peer is named by its
inode (``peer`` = the other end's ``ino``), not by a file id.
"""

# Message fields are attrs field specifiers made by formats.pb, not mutable defaults:
# ruff: noqa: RUF009

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

import attrs

from formats.fdkinds import FownEntry
from formats.pb import Kind, Message, optional, repeated, required

__all__ = [
    "SK_FAMILIES",
    "SK_PROTOS",
    "SK_SHUTDOWN",
    "SK_STATES",
    "SK_TYPES",
    "FilePermsEntry",
    "InetSkEntry",
    "IpOptsEntry",
    "IpOptsRawEntry",
    "SkOptsEntry",
    "TcpOptsEntry",
    "UnixSkEntry",
    "ip_from_words",
    "ip_to_words",
]

U32, U64, BOOL, STR, MSG = Kind.UINT32, Kind.UINT64, Kind.BOOL, Kind.STRING, Kind.MESSAGE

# The names crit uses (pycriu pb2dict.py sk_maps), from linux/socket.h, linux/net.h, tcp_states.h.
SK_FAMILIES = {1: "UNIX", 2: "INET", 10: "INET6", 16: "NETLINK", 17: "PACKET"}
SK_TYPES = {1: "STREAM", 2: "DGRAM", 3: "RAW", 5: "SEQPACKET", 10: "PACKET"}
SK_STATES = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2",
             6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN"}  # fmt: skip
SK_PROTOS = {0: "IP", 6: "TCP", 17: "UDP", 136: "UDPLITE"}
SK_SHUTDOWN = {0: "NONE", 1: "READ", 2: "WRITE", 3: "BOTH"}  # enum sk_shutdown

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def ip_from_words(words: Sequence[int]) -> IPAddress:
    """The address held in ``src_addr``/``dst_addr`` (1 word: IPv4, 4 words: IPv6)."""
    if len(words) not in (1, 4):
        raise ValueError(f"an IP address is 1 or 4 words, not {len(words)}")
    raw = b"".join(w.to_bytes(4, "little") for w in words)
    return ipaddress.ip_address(raw)


def ip_to_words(address: str | IPAddress) -> list[int]:
    """The words of ``src_addr``/``dst_addr`` for an address."""
    packed = ipaddress.ip_address(address).packed
    return [int.from_bytes(packed[i : i + 4], "little") for i in range(0, len(packed), 4)]


@attrs.define(kw_only=True)
class SkOptsEntry(Message):
    """sk_opts_entry: SOL_SOCKET options of a socket."""

    so_sndbuf: int = required(1, U32)
    so_rcvbuf: int = required(2, U32)
    so_snd_tmo_sec: int = required(3, U64)
    so_snd_tmo_usec: int = required(4, U64)
    so_rcv_tmo_sec: int = required(5, U64)
    so_rcv_tmo_usec: int = required(6, U64)
    reuseaddr: bool | None = optional(7, BOOL)
    so_priority: int | None = optional(8, U32)
    so_rcvlowat: int | None = optional(9, U32)
    so_mark: int | None = optional(10, U32)
    so_passcred: bool | None = optional(11, BOOL)
    so_passsec: bool | None = optional(12, BOOL)
    so_dontroute: bool | None = optional(13, BOOL)
    so_no_check: bool | None = optional(14, BOOL)
    so_bound_dev: str | None = optional(15, STR)
    so_filter: list[int] = repeated(16, Kind.FIXED64)  # the attached BPF program, 8 bytes/insn
    so_reuseport: bool | None = optional(17, BOOL)
    so_broadcast: bool | None = optional(18, BOOL)
    so_keepalive: bool | None = optional(19, BOOL)
    tcp_keepcnt: int | None = optional(20, U32)  # 20-22 deprecated: tcp_opts_entry has them
    tcp_keepidle: int | None = optional(21, U32)
    tcp_keepintvl: int | None = optional(22, U32)
    so_oobinline: int | None = optional(23, U32)
    so_linger: int | None = optional(24, U32)
    so_buf_lock: int | None = optional(25, U32)


@attrs.define(kw_only=True)
class FilePermsEntry(Message):
    """file_perms_entry: mode and owner of a bound unix socket's file."""

    mode: int = required(1, U32)
    uid: int = required(2, U32)
    gid: int = required(3, U32)


@attrs.define(kw_only=True)
class UnixSkEntry(Message):
    """unix_sk_entry (file_entry.usk): a unix socket; ``peer`` is the peer's ``ino``."""

    id: int = required(1, U32)
    ino: int = required(2, U32)
    type: int = required(3, U32)  # SK_TYPES
    state: int = required(4, U32)  # SK_STATES
    flags: int = required(5, U32)  # O_* of the file
    uflags: int = required(6, U32)  # USK_* (criu/include/sockets.h): external, service...
    backlog: int = required(7, U32)
    peer: int = required(8, U32)
    fown: FownEntry = required(9, MSG, message=FownEntry)
    opts: SkOptsEntry = required(10, MSG, message=SkOptsEntry)
    name: bytes = required(11, Kind.BYTES)  # sun_path; abstract names start with a NUL
    shutdown: int | None = optional(12, Kind.ENUM)  # SK_SHUTDOWN
    file_perms: FilePermsEntry | None = optional(13, MSG, message=FilePermsEntry)
    name_dir: str | None = optional(14, STR)
    deleted: bool | None = optional(15, BOOL)
    ns_id: int | None = optional(16, U32)
    mnt_id: int | None = optional(17, Kind.SINT32, default=-1)


@attrs.define(kw_only=True)
class IpOptsRawEntry(Message):
    """ip_opts_raw_entry: options of a SOCK_RAW inet socket."""

    hdrincl: bool | None = optional(1, BOOL)
    nodefrag: bool | None = optional(2, BOOL)
    checksum: bool | None = optional(3, BOOL)
    icmpv_filter: list[int] = repeated(4, U32)


@attrs.define(kw_only=True)
class IpOptsEntry(Message):
    """ip_opts_entry: SOL_IP options."""

    freebind: bool | None = optional(1, BOOL)
    raw: IpOptsRawEntry | None = optional(4, MSG, message=IpOptsRawEntry)
    pktinfo: bool | None = optional(5, BOOL)
    tos: int | None = optional(6, U32)
    ttl: int | None = optional(7, U32)


@attrs.define(kw_only=True)
class TcpOptsEntry(Message):
    """tcp_opts_entry: SOL_TCP options."""

    cork: bool | None = optional(1, BOOL)
    nodelay: bool | None = optional(2, BOOL)
    keepcnt: int | None = optional(3, U32)
    keepidle: int | None = optional(4, U32)
    keepintvl: int | None = optional(5, U32)


@attrs.define(kw_only=True)
class InetSkEntry(Message):
    """inet_sk_entry (file_entry.isk): a TCP/UDP/raw socket of AF_INET or AF_INET6."""

    id: int = required(1, U32)
    ino: int = required(2, U32)
    family: int = required(3, U32)  # SK_FAMILIES
    type: int = required(4, U32)  # SK_TYPES
    proto: int = required(5, U32)  # SK_PROTOS
    state: int = required(6, U32)  # SK_STATES
    src_port: int = required(7, U32)
    dst_port: int = required(8, U32)
    flags: int = required(9, U32)  # O_* of the file
    backlog: int = required(10, U32)
    src_addr: list[int] = repeated(11, U32)  # ip_from_words
    dst_addr: list[int] = repeated(12, U32)
    fown: FownEntry = required(13, MSG, message=FownEntry)
    opts: SkOptsEntry = required(14, MSG, message=SkOptsEntry)
    v6only: bool | None = optional(15, BOOL)
    ip_opts: IpOptsEntry | None = optional(16, MSG, message=IpOptsEntry)
    ifname: str | None = optional(17, STR)
    ns_id: int | None = optional(18, U32)
    shutdown: int | None = optional(19, Kind.ENUM)  # SK_SHUTDOWN
    tcp_opts: TcpOptsEntry | None = optional(20, MSG, message=TcpOptsEntry)

    def src_ip(self) -> IPAddress:
        """The local address."""
        return ip_from_words(self.src_addr)

    def dst_ip(self) -> IPAddress:
        """The peer address (0.0.0.0 / :: when unconnected)."""
        return ip_from_words(self.dst_addr)

"""Socket options of a socket we hold a descriptor of, with the names of CRIU's
``sk_opts_entry``, ``ip_opts_entry`` and ``tcp_opts_entry`` (``images/sk-opts.proto``,
``sk-inet.proto``, ``tcp-stream.proto``), read the way ``criu/sockets.c`` ``dump_socket_opts``,
``criu/sk-inet.c`` ``dump_ip_opts`` and ``criu/sk-tcp.c`` ``dump_tcp_opts`` read them.

Only ``getsockopt`` is used: nothing about the socket changes. The option numbers are the
asm-generic ones (x86_64, arm64); alpha, mips, parisc and sparc number some differently.
Not read: ``so_filter`` (an attached BPF program), which CRIU reads with SO_GET_FILTER.
"""

from __future__ import annotations

import socket
import struct
from typing import Final

import attrs

__all__ = ["IpOptions", "SocketOptions", "TcpOptions", "read_socket_options"]

SOL_SOCKET: Final = 1
SO_REUSEADDR: Final = 2
SO_DONTROUTE: Final = 5
SO_BROADCAST: Final = 6
SO_SNDBUF: Final = 7
SO_RCVBUF: Final = 8
SO_KEEPALIVE: Final = 9
SO_OOBINLINE: Final = 10
SO_NO_CHECK: Final = 11
SO_PRIORITY: Final = 12
SO_LINGER: Final = 13
SO_REUSEPORT: Final = 15
SO_PASSCRED: Final = 16
SO_RCVLOWAT: Final = 18
SO_RCVTIMEO: Final = 20  # SO_RCVTIMEO_OLD: struct timeval with 64-bit fields on 64-bit
SO_SNDTIMEO: Final = 21
SO_BINDTODEVICE: Final = 25
SO_PASSSEC: Final = 34
SO_MARK: Final = 36
SO_BUF_LOCK: Final = 72  # Linux 5.14+

IP_TOS: Final = 1
IP_TTL: Final = 2
IP_PKTINFO: Final = 8
IP_FREEBIND: Final = 15
IPV6_V6ONLY: Final = 26
IPV6_RECVPKTINFO: Final = 49
IPV6_FREEBIND: Final = 78

TCP_NODELAY: Final = 1
TCP_CORK: Final = 3
TCP_KEEPIDLE: Final = 4
TCP_KEEPINTVL: Final = 5
TCP_KEEPCNT: Final = 6

_TIMEVAL = struct.Struct("=qq")
_LINGER = struct.Struct("=ii")


@attrs.frozen
class IpOptions:
    """``ip_opts_entry``: ``tos`` and ``ttl`` only for IPv4, ``v6only``
    (``inet_sk_entry.v6only``) only for IPv6, as CRIU reads them (the IPv6 traffic class is in
    the sock_diag answer, ``InetSocket.tclass``)."""

    freebind: bool
    pktinfo: bool
    tos: int | None
    ttl: int | None
    v6only: bool | None


@attrs.frozen
class TcpOptions:
    """``tcp_opts_entry``."""

    cork: bool
    nodelay: bool
    keepcnt: int
    keepidle: int
    keepintvl: int


@attrs.frozen
class SocketOptions:
    """``sk_opts_entry`` (timeouts split in seconds and microseconds, as there); ``so_linger``
    is ``None`` when SO_LINGER is off, ``so_buf_lock`` when the kernel lacks it,
    ``so_passcred``/``so_passsec`` for sockets other than AF_UNIX and AF_NETLINK (CRIU reads
    them only there). ``ip`` and ``tcp`` for AF_INET/AF_INET6 (``tcp`` for TCP only)."""

    so_sndbuf: int
    so_rcvbuf: int
    so_snd_tmo_sec: int
    so_snd_tmo_usec: int
    so_rcv_tmo_sec: int
    so_rcv_tmo_usec: int
    reuseaddr: bool
    so_priority: int
    so_rcvlowat: int
    so_mark: int
    so_passcred: bool | None
    so_passsec: bool | None
    so_dontroute: bool
    so_no_check: bool
    so_bound_dev: str
    so_reuseport: bool
    so_broadcast: bool
    so_keepalive: bool
    so_oobinline: bool
    so_linger: int | None
    so_buf_lock: int | None
    ip: IpOptions | None = None
    tcp: TcpOptions | None = None


def _int(sock: socket.socket, level: int, name: int) -> int:
    return sock.getsockopt(level, name)


def _ip_options(sock: socket.socket) -> IpOptions:
    if sock.family == socket.AF_INET6:
        return IpOptions(
            freebind=bool(_int(sock, socket.IPPROTO_IPV6, IPV6_FREEBIND)),
            pktinfo=bool(_int(sock, socket.IPPROTO_IPV6, IPV6_RECVPKTINFO)),
            tos=None,
            ttl=None,
            v6only=bool(_int(sock, socket.IPPROTO_IPV6, IPV6_V6ONLY)),
        )
    return IpOptions(
        freebind=bool(_int(sock, socket.IPPROTO_IP, IP_FREEBIND)),
        pktinfo=bool(_int(sock, socket.IPPROTO_IP, IP_PKTINFO)),
        tos=_int(sock, socket.IPPROTO_IP, IP_TOS),
        ttl=_int(sock, socket.IPPROTO_IP, IP_TTL),
        v6only=None,
    )


def _tcp_options(sock: socket.socket) -> TcpOptions:
    return TcpOptions(
        cork=bool(_int(sock, socket.IPPROTO_TCP, TCP_CORK)),
        nodelay=bool(_int(sock, socket.IPPROTO_TCP, TCP_NODELAY)),
        keepcnt=_int(sock, socket.IPPROTO_TCP, TCP_KEEPCNT),
        keepidle=_int(sock, socket.IPPROTO_TCP, TCP_KEEPIDLE),
        keepintvl=_int(sock, socket.IPPROTO_TCP, TCP_KEEPINTVL),
    )


def read_socket_options(sock: socket.socket) -> SocketOptions:
    """Every option above of ``sock`` (raises ``OSError`` if the kernel refuses one)."""
    snd_sec, snd_usec = _TIMEVAL.unpack(sock.getsockopt(SOL_SOCKET, SO_SNDTIMEO, _TIMEVAL.size))
    rcv_sec, rcv_usec = _TIMEVAL.unpack(sock.getsockopt(SOL_SOCKET, SO_RCVTIMEO, _TIMEVAL.size))
    onoff, linger = _LINGER.unpack(sock.getsockopt(SOL_SOCKET, SO_LINGER, _LINGER.size))
    try:
        buf_lock: int | None = _int(sock, SOL_SOCKET, SO_BUF_LOCK)
    except OSError:
        buf_lock = None
    credentials = sock.family in (socket.AF_UNIX, socket.AF_NETLINK)
    device = sock.getsockopt(SOL_SOCKET, SO_BINDTODEVICE, 16).split(b"\0", 1)[0]
    inet = sock.family in (socket.AF_INET, socket.AF_INET6)
    tcp = inet and sock.type == socket.SOCK_STREAM and sock.proto == socket.IPPROTO_TCP
    return SocketOptions(
        so_sndbuf=_int(sock, SOL_SOCKET, SO_SNDBUF),
        so_rcvbuf=_int(sock, SOL_SOCKET, SO_RCVBUF),
        so_snd_tmo_sec=snd_sec,
        so_snd_tmo_usec=snd_usec,
        so_rcv_tmo_sec=rcv_sec,
        so_rcv_tmo_usec=rcv_usec,
        reuseaddr=bool(_int(sock, SOL_SOCKET, SO_REUSEADDR)),
        so_priority=_int(sock, SOL_SOCKET, SO_PRIORITY),
        so_rcvlowat=_int(sock, SOL_SOCKET, SO_RCVLOWAT),
        so_mark=_int(sock, SOL_SOCKET, SO_MARK),
        so_passcred=bool(_int(sock, SOL_SOCKET, SO_PASSCRED)) if credentials else None,
        so_passsec=bool(_int(sock, SOL_SOCKET, SO_PASSSEC)) if credentials else None,
        so_dontroute=bool(_int(sock, SOL_SOCKET, SO_DONTROUTE)),
        so_no_check=bool(_int(sock, SOL_SOCKET, SO_NO_CHECK)),
        so_bound_dev=device.decode(errors="surrogateescape"),
        so_reuseport=bool(_int(sock, SOL_SOCKET, SO_REUSEPORT)),
        so_broadcast=bool(_int(sock, SOL_SOCKET, SO_BROADCAST)),
        so_keepalive=bool(_int(sock, SOL_SOCKET, SO_KEEPALIVE)),
        so_oobinline=bool(_int(sock, SOL_SOCKET, SO_OOBINLINE)),
        so_linger=linger if onoff else None,
        so_buf_lock=buf_lock,
        ip=_ip_options(sock) if inet else None,
        tcp=_tcp_options(sock) if tcp else None,
    )

"""sock_diag: parsing hand-built netlink answers field by field, and real queries about sockets
this test process opens itself."""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from injector import NoSuchProcess
from injector.sockdiag import (
    SHUT_RD,
    SHUT_WR,
    TCP_CLOSE,
    TCP_ESTABLISHED,
    TCP_LISTEN,
    InetSocket,
    SkMemInfo,
    SockDiag,
    UnixSocket,
    find_sockets,
    iter_netlink,
    kernel_dev,
    netns_inode,
    parse_inet_diag_msg,
    parse_unix_diag_msg,
)


def nlattr(kind: int, payload: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes."""
    data = struct.pack("=HH", 4 + len(payload), kind) + payload
    return data + bytes(-len(data) % 4)


def test_unix_diag_msg_every_field() -> None:
    """unix_diag_msg: header and every attribute (path name without its NUL)."""
    header = struct.pack("=BBBxIII", socket.AF_UNIX, 1, 10, 4711, 5, 1)  # family type state
    payload = header + b"".join(
        [
            nlattr(0, b"my sock\0"),  # UNIX_DIAG_NAME
            nlattr(1, struct.pack("=II", 99, (254 << 20) | 3)),  # UNIX_DIAG_VFS
            nlattr(2, struct.pack("=I", 4712)),  # UNIX_DIAG_PEER
            nlattr(3, struct.pack("=2I", 7, 8)),  # UNIX_DIAG_ICONS
            nlattr(4, struct.pack("=II", 2, 5)),  # UNIX_DIAG_RQLEN
            nlattr(5, struct.pack("=9I", *range(1, 10))),  # UNIX_DIAG_MEMINFO
            nlattr(6, b"\x03"),  # UNIX_DIAG_SHUTDOWN
            nlattr(7, struct.pack("=I", 1000)),  # UNIX_DIAG_UID
            nlattr(99, b"future attribute"),
        ]
    )
    assert parse_unix_diag_msg(payload, netns=123) == UnixSocket(
        ino=4711,
        type=1,
        state=10,
        name=b"my sock",
        peer=4712,
        vfs_ino=99,
        vfs_dev=os.makedev(254, 3),
        icons=(7, 8),
        rqueue=2,
        wqueue=5,
        shutdown=SHUT_RD | SHUT_WR,
        uid=1000,
        meminfo=SkMemInfo(*range(1, 10)),
        cookie=5 | 1 << 32,
        netns=123,
    )
    bare = parse_unix_diag_msg(struct.pack("=BBBxIII", 1, 2, 7, 1, 0, 0) + nlattr(0, b"\0ab\0"))
    assert (bare.name, bare.abstract, bare.peer, bare.vfs_ino, bare.meminfo) == (
        b"\0ab\0",  # abstract: every byte counts, trailing NUL included
        True,
        0,
        None,
        None,
    )
    with pytest.raises(ValueError):
        parse_unix_diag_msg(b"\x01\x02")


def inet_msg(family: int, src: bytes, dst: bytes, *attributes: bytes) -> bytes:
    head = struct.pack("=BBBB", family, TCP_ESTABLISHED, 1, 2)  # family state timer retrans
    sockid = struct.pack("!HH16s16s", 8080, 443, src, dst) + struct.pack("=III", 3, 9, 0)
    tail = struct.pack("=IIIII", 100, 4, 6, 1000, 5555)  # expires rqueue wqueue uid inode
    return head + sockid + tail + b"".join(attributes)


def test_inet_diag_msg_ipv4_every_field() -> None:
    """inet_diag_msg: ports and addresses in network order, the rest host order, attributes."""
    payload = inet_msg(
        socket.AF_INET,
        bytes([127, 0, 0, 1]) + bytes(12),
        bytes([10, 1, 2, 3]) + bytes(12),
        nlattr(5, b"\x10"),  # INET_DIAG_TOS
        nlattr(7, struct.pack("=9I", *range(9))),  # INET_DIAG_SKMEMINFO
        nlattr(8, b"\x02"),  # INET_DIAG_SHUTDOWN
        nlattr(15, struct.pack("=I", 42)),  # INET_DIAG_MARK
        nlattr(17, struct.pack("=I", 0x10001)),  # INET_DIAG_CLASS_ID
        nlattr(21, struct.pack("=Q", 77)),  # INET_DIAG_CGROUP_ID
        nlattr(22, bytes([0b00000110, 0b00000001])),  # INET_DIAG_SOCKOPT
    )
    sk = parse_inet_diag_msg(payload, socket.IPPROTO_TCP, netns=5)
    assert (sk.ino, sk.family, sk.protocol, sk.type, sk.state) == (
        5555,
        socket.AF_INET,
        socket.IPPROTO_TCP,
        socket.SOCK_STREAM,
        TCP_ESTABLISHED,
    )
    assert (sk.src, sk.sport, sk.dst, sk.dport, sk.ifindex) == (
        ipaddress.IPv4Address("127.0.0.1"),
        8080,
        ipaddress.IPv4Address("10.1.2.3"),
        443,
        3,
    )
    assert (sk.rqueue, sk.wqueue, sk.uid, sk.timer, sk.retrans, sk.expires, sk.cookie) == (
        4,
        6,
        1000,
        1,
        2,
        100,
        9,
    )
    assert (sk.tos, sk.tclass, sk.v6only, sk.shutdown, sk.mark, sk.class_id, sk.cgroup_id) == (
        0x10,
        None,
        None,
        SHUT_WR,
        42,
        0x10001,
        77,
    )
    assert sk.meminfo == SkMemInfo(*range(9)) and sk.netns == 5
    assert sk.sockopt is not None
    assert (sk.sockopt.is_icsk, sk.sockopt.freebind, sk.sockopt.recverr) == (True, True, False)
    assert sk.sockopt.bind_address_no_port is True and sk.sockopt.defer_connect is False


def test_inet_diag_msg_ipv6_udp_and_raw() -> None:
    """IPv6 uses all 16 address bytes, UDP is SOCK_DGRAM, raw gets INET_DIAG_PROTOCOL."""
    one = ipaddress.IPv6Address("::1").packed
    udp = parse_inet_diag_msg(inet_msg(10, one, bytes(16), nlattr(11, b"\x01")), 17)
    assert (udp.src, udp.dst, udp.type, udp.v6only) == (
        ipaddress.IPv6Address("::1"),
        ipaddress.IPv6Address("::"),
        socket.SOCK_DGRAM,
        True,
    )
    raw = parse_inet_diag_msg(inet_msg(2, bytes(16), bytes(16), nlattr(10, b"\x01")), 255)
    assert (raw.type, raw.protocol) == (socket.SOCK_RAW, socket.IPPROTO_ICMP)
    with pytest.raises(ValueError):
        parse_inet_diag_msg(b"\x02" * 20, 6)


def test_netlink_framing() -> None:
    """Messages are split by their length and 4-byte aligned; a length past the end fails."""
    one = struct.pack("=IHHII", 16 + 3, 20, 2, 7, 0) + b"abc" + b"\0"
    two = struct.pack("=IHHII", 16 + 4, 3, 0, 7, 0) + struct.pack("=i", 0)
    assert list(iter_netlink(one + two)) == [(20, 2, 7, b"abc"), (3, 0, 7, b"\0\0\0\0")]
    with pytest.raises(ValueError, match="length 64"):
        list(iter_netlink(struct.pack("=IHHII", 64, 20, 0, 1, 0)))
    assert kernel_dev((8 << 20) | 17) == os.makedev(8, 17)


@pytest.fixture
def own_sockets() -> Iterator[dict[str, socket.socket]]:
    """Sockets of this process with known state: a unix pair, a TCP listener and connection."""
    a, b = socket.socketpair()
    b.shutdown(socket.SHUT_WR)
    listener = socket.create_server(("127.0.0.1", 0), backlog=3)
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    socks = {"a": a, "b": b, "listener": listener, "client": client, "server": server}
    try:
        yield socks
    finally:
        for s in socks.values():
            s.close()


def ino(sock: socket.socket) -> int:
    return os.fstat(sock.fileno()).st_ino


def test_find_sockets_of_this_process(own_sockets: dict[str, socket.socket]) -> None:
    """Our own unix pair and TCP sockets, as getsockname/getpeername report them."""
    s = own_sockets
    found = find_sockets(os.getpid(), [ino(x) for x in s.values()] + [1])
    assert set(found) == {ino(x) for x in s.values()}  # inode 1 is nobody's socket
    a, b = found[ino(s["a"])], found[ino(s["b"])]
    assert isinstance(a, UnixSocket) and isinstance(b, UnixSocket)
    assert (a.peer, b.peer, a.shutdown, b.shutdown) == (ino(s["b"]), ino(s["a"]), SHUT_RD, SHUT_WR)
    assert a.netns == netns_inode("self")
    listener = found[ino(s["listener"])]
    assert isinstance(listener, InetSocket)
    assert (listener.state, listener.backlog) == (TCP_LISTEN, 3)
    assert (str(listener.src), listener.sport) == s["listener"].getsockname()
    client, server = found[ino(s["client"])], found[ino(s["server"])]
    assert isinstance(client, InetSocket) and isinstance(server, InetSocket)
    assert (str(client.src), client.sport) == s["client"].getsockname()
    assert (str(client.dst), client.dport) == s["client"].getpeername()
    assert (client.state, server.state) == (TCP_ESTABLISHED, TCP_ESTABLISHED)
    assert (server.sport, server.dport) == (client.dport, client.sport)


def test_dump_lists_every_state(own_sockets: dict[str, socket.socket]) -> None:
    """A unix dump holds our pair; a closed UDP socket shows as CLOSE after bind."""
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        udp.bind(("127.0.0.1", 0))
        with SockDiag() as diag:
            assert ino(own_sockets["a"]) in {u.ino for u in diag.unix()}
            mine = [u for u in diag.inet(socket.AF_INET, socket.IPPROTO_UDP) if u.ino == ino(udp)]
        assert [(m.state, m.sport) for m in mine] == [(TCP_CLOSE, udp.getsockname()[1])]
    finally:
        udp.close()


def test_find_sockets_of_a_missing_pid() -> None:
    """No /proc/PID/ns/net: NoSuchProcess; no inodes asked: no query at all."""
    beyond = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1
    with pytest.raises(NoSuchProcess):
        find_sockets(beyond, [1])
    assert find_sockets(beyond, []) == {}

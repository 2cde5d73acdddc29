"""The values read from a live tests/data/state-target.c carry what CRIU 4.2 wrote for the same
program (tests/data/state-criu-4.2-crit-json): each file entry and fdinfo entry is rebuilt
from our values in crit's JSON spelling and compared, field by field, with the fields that do
not change from run to run (inodes, ports, ids, directories and the time left do). Socket
buffer sizes are the defaults of the machines the project runs on (Debian 12, Linux 6.18)."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from injector.fdinfo import (
    Descriptor,
    EventFd,
    EventPoll,
    Pipe,
    RegularFile,
    SignalFd,
    Socket,
    TimerFd,
)
from injector.fds import read_fds, read_fs
from injector.sockdiag import InetSocket, UnixSocket
from injector.sockopts import SocketOptions
from tests.conftest import DATA
from tests.procs import Target, build_c, spawn

pytestmark = pytest.mark.live

JSON = DATA / "state-criu-4.2-crit-json"
# crit's names for rfile.flags (lib/pycriu/images/pb2dict.py), in its order
RFILE_FLAGS = [
    ("O_WRONLY", 0o1),
    ("O_RDWR", 0o2),
    ("O_APPEND", 0o2000),
    ("O_DIRECT", 0o40000),
    ("O_LARGEFILE", 0o100000),
]
TCP_STATES = {1: "ESTABLISHED", 7: "CLOSE", 10: "LISTEN"}
SK_TYPES = {1: "STREAM", 2: "DGRAM", 5: "SEQPACKET"}


def rfile_flags(flags: int) -> str:
    return " | ".join(name for name, bit in RFILE_FLAGS if flags & bit)


def opts(o: SocketOptions | None, unix: bool) -> dict[str, Any]:
    assert o is not None
    view: dict[str, Any] = {
        "so_sndbuf": o.so_sndbuf,
        "so_rcvbuf": o.so_rcvbuf,
        "so_snd_tmo_sec": o.so_snd_tmo_sec,
        "so_snd_tmo_usec": o.so_snd_tmo_usec,
        "so_rcv_tmo_sec": o.so_rcv_tmo_sec,
        "so_rcv_tmo_usec": o.so_rcv_tmo_usec,
        "reuseaddr": o.reuseaddr,
        "so_priority": o.so_priority,
        "so_rcvlowat": o.so_rcvlowat,
    }
    if unix:
        view |= {"so_passcred": o.so_passcred, "so_passsec": o.so_passsec}
    view |= {
        "so_dontroute": o.so_dontroute,
        "so_no_check": o.so_no_check,
        "so_reuseport": o.so_reuseport,
        "so_broadcast": o.so_broadcast,
        "so_keepalive": o.so_keepalive,
        "so_oobinline": int(o.so_oobinline),
        "so_buf_lock": o.so_buf_lock,
    }
    return view


def criu_view(d: Descriptor) -> dict[str, Any]:
    """The file entry CRIU would write for ``d``, in crit's JSON spelling, run-dependent
    fields left out."""
    k = d.kind
    if isinstance(k, RegularFile):
        reg = {"flags": rfile_flags(d.file_flags), "pos": d.pos, "name": os.path.basename(k.path)}
        if not (d.access_mode == os.O_WRONLY and d.file_flags & os.O_APPEND):
            reg["size"] = k.size  # CRIU leaves the size of append-only logs out
        if not k.is_dir:
            reg["mode"] = k.mode
        return {"type": "REG", "reg": reg}
    if isinstance(k, Pipe):
        return {"type": "PIPE", "pipe": {"flags": hex(d.file_flags)}}
    if isinstance(k, Socket) and isinstance(k.diag, UnixSocket):
        u = k.diag
        return {
            "type": "UNIXSK",
            "usk": {
                "type": SK_TYPES[u.type],
                "state": TCP_STATES[u.state],
                "flags": hex(d.file_flags),
                "backlog": u.backlog,
                "opts": opts(k.options, unix=True),
                "name": (u.name or b"").decode(),
            },
        }
    if isinstance(k, Socket) and isinstance(k.diag, InetSocket):
        i = k.diag
        assert k.options is not None and k.options.ip is not None and k.options.tcp is not None
        return {
            "type": "INETSK",
            "isk": {
                "family": {int(socket.AF_INET): "INET", int(socket.AF_INET6): "INET6"}[i.family],
                "type": SK_TYPES[i.type],
                "proto": {6: "TCP", 17: "UDP"}[i.protocol],
                "state": TCP_STATES[i.state],
                "dst_port": i.dport,
                "flags": hex(d.file_flags),
                "backlog": i.backlog,
                "src_addr": [str(i.src)],
                "dst_addr": [str(i.dst)],
                "opts": opts(k.options, unix=False),
                "ip_opts": {"ttl": k.options.ip.ttl},
                "tcp_opts": {
                    "keepcnt": k.options.tcp.keepcnt,
                    "keepidle": k.options.tcp.keepidle,
                    "keepintvl": k.options.tcp.keepintvl,
                },
            },
        }
    if isinstance(k, EventFd):
        return {"type": "EVENTFD", "efd": {"flags": d.file_flags, "counter": k.count}}
    if isinstance(k, EventPoll):
        tfds = [
            {"tfd": t.tfd, "events": t.events, "data": t.data, "dev": t.sdev, "pos": t.pos}
            for t in k.targets
        ]
        return {"type": "EVENTPOLL", "epfd": {"flags": d.file_flags, "tfd": tfds}}
    if isinstance(k, SignalFd):
        sgfd = {"flags": hex(d.file_flags), "sigmask": hex(k.sigmask)}
        return {"type": "SIGNALFD", "sgfd": sgfd}
    if isinstance(k, TimerFd):
        tfd = {
            "flags": hex(d.file_flags),
            "clockid": k.clockid,
            "ticks": k.ticks,
            "settime_flags": hex(k.settime_flags),
            "isec": k.isec,
            "insec": k.insec,
        }
        return {"type": "TIMERFD", "tfd": tfd}
    raise AssertionError(f"no CRIU entry for {d}")


RUN_DEPENDENT = {"id", "ino", "pipe_id", "peer", "src_port", "vsec", "vnsec", "fown", "ns_id"}
RUN_DEPENDENT |= {"uflags", "inode"}  # uflags: CRIU's own marks; inode: of the epoll targets


def strip(entry: dict[str, Any]) -> dict[str, Any]:
    """A crit JSON file entry without run-dependent fields, names cut to their last part."""
    body_key = next(k for k in entry if k not in ("type", "id"))
    body = {k: v for k, v in entry[body_key].items() if k not in RUN_DEPENDENT}
    if "name" in body and body["name"].startswith("/"):
        body["name"] = os.path.basename(body["name"])
    if "tfd" in body and isinstance(body["tfd"], list):
        body["tfd"] = [{k: v for k, v in t.items() if k not in RUN_DEPENDENT} for t in body["tfd"]]
    return {"type": entry["type"], body_key: body}


@pytest.fixture(scope="module")
def golden_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    work = tmp_path_factory.mktemp("golden") / "work"
    with spawn(build_c(DATA / "state-target.c"), str(work)) as t:
        t.expect("ITIMER_REAL")
        yield t


def test_every_descriptor_matches_criu_42(golden_target: Target) -> None:
    """fdinfo and file entries of fds 3 and up match CRIU 4.2's for the same program."""
    files = {e["id"]: e for e in json.loads((JSON / "files.img.json").read_text())["entries"]}
    fdinfo = json.loads((JSON / "fdinfo-2.img.json").read_text())["entries"]
    table = {d.fd: d for d in read_fds(golden_target.pid)}
    expected_fds = sorted(e["fd"] for e in fdinfo if e["fd"] > 2)
    assert sorted(fd for fd in table if fd > 2) == expected_fds
    by_ino = {d.stat.ino: d.fd for d in table.values() if d.stat is not None}
    for e in fdinfo:
        if e["fd"] <= 2:  # the golden run had its stdio on files, this one on pipes
            continue
        d = table[e["fd"]]
        assert (d.fd_type, d.fd_flags) == (e["type"], e["flags"]), e
        criu = files[e["id"]]
        if criu["type"] == "REG" and not criu["reg"]["name"].startswith("/tmp/golden-state/"):
            st = os.stat(criu["reg"]["name"])  # /etc/hostname: as it is on this machine
            criu["reg"] |= {"size": st.st_size, "mode": st.st_mode}
        mine = criu_view(d)
        if isinstance(d.kind, EventPoll):  # tree order may differ: compare as sets
            criu["epfd"]["tfd"].sort(key=lambda t: t["tfd"])
            mine["epfd"]["tfd"].sort(key=lambda t: t["tfd"])
            for t in d.kind.targets:  # inode and device are those of the watched fd
                watched = table[t.tfd].stat
                assert watched is not None and (t.ino, t.dev) == (watched.ino, watched.dev)
        assert mine == strip(criu), e
        if isinstance(d.kind, Socket) and isinstance(d.kind.diag, UnixSocket):
            peer = table[by_ino[d.kind.diag.peer]].kind
            assert isinstance(peer, Socket) and peer.ino == d.kind.diag.peer


def test_fs_matches_criu_42(golden_target: Target) -> None:
    """fs entry: umask; cwd is the work directory and root is /."""
    fs_entry = json.loads((JSON / "fs-4524.img.json").read_text())["entries"][0]
    files = {e["id"]: e for e in json.loads((JSON / "files.img.json").read_text())["entries"]}
    fs = read_fs(golden_target.pid)
    assert fs.umask == fs_entry["umask"]
    assert os.path.basename(fs.cwd.path) == os.path.basename(
        files[fs_entry["cwd_id"]]["reg"]["name"]
    )
    assert fs.root.path == files[fs_entry["root_id"]]["reg"]["name"] == "/"
    assert fs.cwd.stat is not None and fs.cwd.stat.mode == files[fs_entry["cwd_id"]]["reg"]["mode"]

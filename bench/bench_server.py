"""Benchmark: reset a real server (memcached with 200,000 keys) instead of restarting it.

A memcached on a unix socket is loaded with ``--keys`` keys and checkpointed (a tracked
``applier dump``). Each round a client then overwrites ``--changed`` keys and deletes as
many (the "test"), closes its connection, and the server is put back three ways, each timed:

- **restart + reload**, what a test suite does without applier: stop memcached, start a new
  one, wait for its socket, load every key again (pipelined, ``noreply``);
- **CLI reset**: ``applier apply DIR --into PID --only-dirty``, a new interpreter each time;
- **API reset**: ``Checkpoint.restore()`` of a checkpoint kept open in this process.

Every reset is checked: a changed key has its old value back, a deleted one is there again.
CRIU 4.2's kill + ``restore -d`` (64 ms in the issue that set these goals, losing every
connection) cannot be measured here: Debian's criu 3.17 does not run on this kernel.

    python bench/bench_server.py [--keys 200000] [--changed 1000] [--repeat 5] [--json]
"""

# ruff: noqa: E402 (the repository is put on sys.path first)

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ctypes
import mmap

import numpy as np

from applier.dump import dump
from applier.fixture import Checkpoint
from bench.bench_apply import PTRACE_DETACH, PTRACE_INTERRUPT, PTRACE_SEIZE, WALL, libc
from bench.report import record
from formats.imagedir import ImageDir
from injector import _uffd

VALUE = b"v" * 100


class Memcached:
    """One memcached on a unix socket in ``workdir``."""

    def __init__(self, workdir: Path) -> None:
        self.sock = workdir / "mc.sock"
        self.sock.unlink(missing_ok=True)
        binary = shutil.which("memcached")
        if binary is None:
            raise SystemExit("bench_server: memcached is not installed (./run installs it)")
        # hashpower 18: the hash table is sized for the keys from the start. Left at its
        # default (16), memcached's maintainer thread grows it some time after the load, into
        # new memory: the floor, which writes back pages and nothing else, then left the table
        # half old and the server crashed (the applier's resets do not).
        args = [binary, "-s", str(self.sock), "-m", "512", "-t", "4", "-u", "root", "-U", "0"]
        self.proc = subprocess.Popen(
            [*args, "-o", "hashpower=18"],
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(str(self.sock))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("memcached did not start") from None
                time.sleep(0.001)
        self.fds = self.stable_fd_count()

    def stable_fd_count(self) -> int:
        """The descriptor count once it has not changed for 50 ms (memcached opens some of
        its own after it starts to accept, and closes a client's a moment after it left)."""
        count, since = self.fd_count(), time.monotonic()
        deadline = since + 5
        while time.monotonic() - since < 0.05 and time.monotonic() < deadline:
            time.sleep(0.002)
            now = self.fd_count()
            if now != count:
                count, since = now, time.monotonic()
        return count

    @property
    def pid(self) -> int:
        return self.proc.pid

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def connect(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(self.sock))
        return s

    def request(self, payload: bytes) -> bytes:
        """Send ``payload`` then a meta no-op; everything the server answered before it."""
        with self.connect() as s:
            s.sendall(payload + b"mn\r\n")
            got = b""
            while not got.endswith(b"MN\r\n"):
                chunk = s.recv(1 << 16)
                if not chunk:
                    raise RuntimeError("memcached closed the connection")
                got += chunk
        self.settle()
        return got[:-4]

    def settle(self) -> None:
        """Until the server has closed its side of every connection (fd count as at start)."""
        deadline = time.monotonic() + 5
        while self.fd_count() != self.fds:
            if time.monotonic() > deadline:
                raise RuntimeError("memcached kept a client connection")
            time.sleep(0.0002)

    def load(self, keys: int) -> None:
        batch = 5000
        for first in range(0, keys, batch):
            self.request(
                b"".join(
                    b"set k%d 0 0 %d noreply\r\n%s\r\n" % (i, len(VALUE), VALUE)
                    for i in range(first, min(keys, first + batch))
                )
            )

    def get(self, key: str) -> bytes | None:
        reply = self.request(f"get {key}\r\n".encode())
        if reply == b"END\r\n":
            return None
        return reply.split(b"\r\n")[1]

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGCONT)  # (a floor that failed may have left it stopped)
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:  # a server that hangs: it is ours, by pid
            self.proc.kill()
            self.proc.wait(10)


class ServerFloor:
    """The raw reset of a tracked server, every thread: seize and stop them all, one
    PAGEMAP_SCAN per writable private mapping for the written pages, process_vm_writev of
    those the image holds (from its mapped pages files), the write-protection reset,
    detach. Nothing else: no layout, registers or checks (so written pages the image does
    not hold are left as they are, which only makes the floor lower).

    Memory put back without the registers that go with it is not a state the server can run
    from (a mutex the checkpoint saw held, by a thread that is elsewhere now, made memcached
    abort: ``pthread_mutex_lock: Assertion `mutex->__data.__owner == 0' failed``). So the
    floor leaves it stopped (a SIGSTOP queued before the detach, after the timing), and
    ``settle`` puts it back whole with an untimed ``Checkpoint.restore()`` before it runs."""

    def __init__(self, pid: int, image: Path) -> None:
        self.pid = pid
        self.tids = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
        self.pagemap = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        self.scanner = _uffd.PageScanner(self.pagemap, 1 << 16)
        self.maps: list[mmap.mmap] = []
        starts, ends, bases = [], [], []
        with ImageDir.open(image) as img:
            files: dict[int, tuple[mmap.mmap, int]] = {}
            for run in img.page_runs(pid):
                key = id(run.pages)
                if key not in files:
                    with open(run.pages.path, "rb") as fh:
                        m = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
                    addr = np.frombuffer(m, dtype=np.uint8).__array_interface__["data"][0]
                    files[key] = (m, addr)
                    self.maps.append(m)
                starts.append(run.vaddr)
                ends.append(run.vaddr + run.nr_pages * 4096)
                bases.append(files[key][1] + run.offset)
        self.starts = np.array(starts, dtype=np.uint64)
        self.ends = np.array(ends, dtype=np.uint64)
        self.bases = np.array(bases, dtype=np.uint64)
        self.ranges = []
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            span, perms = line.split()[:2]
            if perms[1] == "w" and perms[3] == "p":
                a, b = (int(x, 16) for x in span.split("-"))
                self.ranges.append((a, b))

    def run(self) -> tuple[float, int]:
        status = ctypes.c_int()
        # Only write-protected (registered) mappings are scanned and reset: a mapping the
        # server made writable since (a malloc arena that grew) is not tracked yet.
        written = _uffd.PAGE_IS_WRITTEN
        t0 = time.perf_counter()
        for tid in self.tids:
            libc.ptrace(PTRACE_SEIZE, tid, None, None)
            libc.ptrace(PTRACE_INTERRUPT, tid, None, None)
        for tid in self.tids:
            libc.waitpid(tid, ctypes.byref(status), WALL)
        try:
            found = [
                self.scanner.scan(a, b, category_mask=written | _uffd.PAGE_IS_WPALLOWED,
                                  return_mask=written)
                for a, b in self.ranges
            ]  # fmt: skip
            pages = _uffd.regions_to_pages(np.concatenate(found))
            i = np.searchsorted(self.starts, pages, side="right") - 1
            held = (i >= 0) & (pages < self.ends[np.maximum(i, 0)])
            pages, i = pages[held], i[held]
            local = np.stack((self.bases[i] + (pages - self.starts[i]),
                              np.full(len(pages), 4096, dtype=np.uint64)), axis=1)  # fmt: skip
            remote = np.stack((pages, np.full(len(pages), 4096, dtype=np.uint64)), axis=1)
            local, remote = np.ascontiguousarray(local), np.ascontiguousarray(remote)
            for k in range(0, len(remote), 1024):
                n = min(1024, len(remote) - k)
                libc.process_vm_writev(self.pid, local[k:].ctypes.data, n, remote[k:].ctypes.data,
                                       n, 0)  # fmt: skip
            for a, b in self.ranges:
                self.scanner.scan(a, b, flags=_uffd.PM_SCAN_WP_MATCHING, category_mask=written,
                                  return_mask=written)  # fmt: skip
            # untimed: a SIGSTOP queued while every thread is in its ptrace stop, so that each
            # stops again on its way out of it, before any of its code runs
            t_kill = time.perf_counter()
            os.kill(self.pid, signal.SIGSTOP)
            t_kill = time.perf_counter() - t_kill
        finally:
            for tid in self.tids:
                libc.ptrace(PTRACE_DETACH, tid, None, None)
        return time.perf_counter() - t0 - t_kill, len(pages)

    def settle(self, cp: Checkpoint) -> None:
        """After ``run``: the whole checkpoint back, registers too, then let it run."""
        try:
            cp.restore()
        finally:
            os.kill(self.pid, signal.SIGCONT)

    def close(self) -> None:
        os.close(self.pagemap)
        for m in self.maps:
            m.close()


def overwrite(mc: Memcached, keys: int, count: int, seed: int) -> None:
    """Overwrite ``count`` keys in place with values of the same size (no new memory)."""
    step = max(1, keys // count)
    value = bytes([97 + seed % 26]) * len(VALUE)
    mc.request(b"".join(b"set k%d 0 0 %d noreply\r\n%s\r\n" % (i * step + seed % step,
                                                                 len(VALUE), value)
                        for i in range(count)))  # fmt: skip


def scribble(mc: Memcached, keys: int, changed: int, seed: int) -> None:
    """The "test": overwrite ``changed`` keys and delete as many others."""
    step = max(1, keys // (2 * changed))
    first = seed % step
    sets = [first + 2 * i * step for i in range(changed)]
    mc.request(
        b"".join(b"set k%d 0 0 3 noreply\r\nnew\r\n" % i for i in sets)
        + b"".join(b"delete k%d noreply\r\n" % (i + step) for i in sets)
    )
    assert mc.get(f"k{sets[0]}") == b"new" and mc.get(f"k{sets[0] + step}") is None


def check(mc: Memcached, keys: int, changed: int, seed: int) -> None:
    step = max(1, keys // (2 * changed))
    first = seed % step
    assert mc.get(f"k{first}") == VALUE and mc.get(f"k{first + step}") == VALUE, "not reset"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=200_000)
    ap.add_argument("--changed", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--inplace", type=int, default=200, help="keys overwritten in place")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="applier-bench-server-"))
    restart, cli, api = [], [], []
    small, small_floor, small_pages, floor_pages = [], [], [], []
    mc = Memcached(work)
    try:
        # restart + reload
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            mc.stop()
            mc = Memcached(work)
            mc.load(args.keys)
            restart.append(time.perf_counter() - t0)
        assert mc.get("k0") == VALUE
        # CLI reset, a tracked dump the CLI applies with --only-dirty
        image = work / "ckpt"
        dump(mc.pid, image, track=True)
        mc.fds = mc.fd_count()  # (the tracker's userfaultfd is in a holder, not here)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        applier = [sys.executable, "-m", "applier"]
        for seed in range(args.repeat + 1):
            scribble(mc, args.keys, args.changed, seed)
            t0 = time.perf_counter()
            subprocess.run(
                [*applier, "-q", "apply", str(image), "--into", str(mc.pid), "--only-dirty"],
                check=True, env=env, capture_output=True,
            )  # fmt: skip
            if seed:
                cli.append(time.perf_counter() - t0)
            check(mc, args.keys, args.changed, seed)
        mc.stop()  # (its tracker's holder exits with it)
        mc = Memcached(work)
        mc.load(args.keys)
        with Checkpoint.take(mc.pid) as cp:
            mc.fds = mc.fd_count()
            for seed in range(args.repeat + 1):
                scribble(mc, args.keys, args.changed, seed)
                t0 = time.perf_counter()
                cp.restore()
                if seed:
                    api.append(time.perf_counter() - t0)
                check(mc, args.keys, args.changed, seed)
            # a few hundred pages written in place, against the raw floor of the same pages
            raw = ServerFloor(mc.pid, cp.path)
            try:
                for seed in range(args.repeat + 1):
                    overwrite(mc, args.keys, args.inplace, seed)
                    f, n = raw.run()
                    raw.settle(cp)
                    overwrite(mc, args.keys, args.inplace, seed)
                    t0 = time.perf_counter()
                    stats = cp.restore()
                    o = time.perf_counter() - t0
                    assert mc.get("k0") == VALUE
                    if seed:
                        small_floor.append(f)
                        small.append(o)
                        small_pages.append(stats.pages_written)
                        floor_pages.append(n)
            finally:
                raw.close()
    finally:
        mc.stop()
        shutil.rmtree(work, ignore_errors=True)
    base = statistics.median(restart)
    rows: list[dict[str, Any]] = [
        {"case": f"memcached {args.keys // 1000}k keys: restart + reload", "floor_ms": base * 1e3,
         "applier_ms": base * 1e3, "ratio": 1.0},
        {"case": "memcached: CLI apply --only-dirty", "floor_ms": base * 1e3,
         "applier_ms": statistics.median(cli) * 1e3, "ratio": statistics.median(cli) / base},
        {"case": "memcached: Checkpoint.restore()", "floor_ms": base * 1e3,
         "applier_ms": statistics.median(api) * 1e3, "ratio": statistics.median(api) / base},
    ]  # fmt: skip
    sf, so = statistics.median(small_floor), statistics.median(small)
    pages, fpages = int(statistics.median(small_pages)), int(statistics.median(floor_pages))
    record("server", f"memcached in place: restore() {pages} pages, floor {fpages}", sf * 1e3,
           so * 1e3, "2x")  # fmt: skip
    record("server", rows[1]["case"] + " (floor: restart + reload)", base * 1e3,
           rows[1]["applier_ms"], "0.2x (5x faster)")  # fmt: skip
    record("server", rows[2]["case"] + " (floor: restart + reload)", base * 1e3,
           rows[2]["applier_ms"], "0.02x (50x faster)")  # fmt: skip
    if args.json:
        print(json.dumps(rows))
        return
    print(f"memcached, {args.keys} keys, {args.changed} set + {args.changed} deleted per round,"
          f" medians of {args.repeat}; 'floor' here is restart + reload")  # fmt: skip
    print(f"{'case':<42}{'restart ms':>11}{'applier ms':>12}{'ratio':>8}{'faster':>8}")
    for r in rows:
        floor, ours, ratio = float(r["floor_ms"]), float(r["applier_ms"]), float(r["ratio"])
        print(f"{r['case']:<42}{floor:>11.1f}{ours:>12.2f}{ratio:>8.3f}{1 / ratio:>7.0f}x")
    print(
        f"{args.inplace} keys overwritten in place, against the raw floor: floor {sf * 1e3:.2f}"
        f" ms ({fpages} pages), restore() {so * 1e3:.2f} ms ({pages} pages), {so / sf:.2f}x"
    )
    print("aims: CLI reset at least 5x faster than restart + reload, the API reset 50x; in place"
          " within 2x of the floor")  # fmt: skip


if __name__ == "__main__":
    main()

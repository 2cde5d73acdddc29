"""Threads started or ended since the checkpoint, on a real thread pool (tests/targets/
pool_target.c): apply ends the new ones and creates the gone ones again with their ids, and
the pool works afterwards (every worker answers, every worker can be joined)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from applier.api import apply
from applier.dump import dump
from applier.plan import EndThread, NewThread
from formats.imagedir import ImageDir
from tests.live_state import Snapshot, assert_same, command, snapshot
from tests.procs import TARGETS, Target, assert_untouched, build_c, run_applier, spawn

pytestmark = pytest.mark.live


@pytest.fixture
def pool() -> Iterator[Target]:
    with spawn(build_c("pool_target.c")) as t:
        yield t


def _tasks(pid: int) -> list[int]:
    return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))


def _names(pid: int) -> dict[int, str]:
    return {t: Path(f"/proc/{pid}/task/{t}/comm").read_text() for t in _tasks(pid)}


def _grow(t: Target, n: int) -> int:
    return int(command(t, f"grow {n}", "grown")[0])


def _ping(t: Target) -> list[int]:
    return [int(x) for x in command(t, "ping", "pong")]


def _quit(t: Target) -> int:
    t.send("quit")
    return t.proc.wait(timeout=10)


def _checkpoint(t: Target, where: Path) -> tuple[Path, list[int], Snapshot]:
    tasks = _tasks(t.pid)
    before = snapshot(t.pid)
    dump(t.pid, where)
    return where, tasks, before


def test_pool_that_grew_loses_the_new_threads(pool: Target, tmp_path: Path) -> None:
    """Two workers started after the checkpoint are ended before anything else; the three
    that were there keep working, every byte and register is the checkpoint's, and the
    program joins its workers and exits normally."""
    assert _grow(pool, 3) == 3
    image, tasks, before = _checkpoint(pool, tmp_path / "img")
    workers = command(pool, "tids", "tids")
    assert _grow(pool, 2) == 5
    assert len(_tasks(pool.pid)) == 6
    result = apply(image, pool.pid)
    assert [type(s) for s in result.plan.steps[:2]] == [EndThread, EndThread]
    assert result.stats.threads_ended == 2 and result.stats.verified
    assert _tasks(pool.pid) == tasks
    assert_same(before, snapshot(pool.pid))
    assert_untouched(pool)
    assert _ping(pool)[:2] == [3, 3]  # three workers, three answers
    assert command(pool, "tids", "tids") == workers
    assert _quit(pool) == 0


def test_pool_that_shrank_gets_its_threads_back(pool: Target, tmp_path: Path) -> None:
    """Two workers joined after the checkpoint come back with their ids, registers, TLS,
    robust list, rseq area, sigaltstack and tid address: all four answer, and the program can
    join all four (pthread_join waits on the tid address the kernel clears). Twice in a row."""
    assert _grow(pool, 4) == 4
    assert _ping(pool)[:2] == [4, 4]
    alts = command(pool, "alts", "alts")
    assert "(nil)" not in alts and len(set(alts)) == 4
    image, tasks, before = _checkpoint(pool, tmp_path / "img")
    workers = command(pool, "tids", "tids")
    names = _names(pool.pid)
    for shrink_by in (2, 3):
        assert command(pool, f"shrink {shrink_by}", "shrunk") == [str(4 - shrink_by)]
        assert len(_tasks(pool.pid)) == 5 - shrink_by
        result = apply(image, pool.pid)
        assert len(result.plan.of(NewThread)) == shrink_by
        assert result.stats.threads_created == shrink_by and result.stats.verified
        assert _tasks(pool.pid) == tasks
        assert_same(before, snapshot(pool.pid))
        assert_untouched(pool)
        assert _ping(pool)[:2] == [4, 4]
        assert command(pool, "tids", "tids") == workers
        assert _names(pool.pid) == names
        assert command(pool, "alts", "alts") == alts  # their sigaltstacks came back too
    assert _quit(pool) == 0


def test_grown_and_shrunk_at_once_and_the_cli_shows_each_step(pool: Target, tmp_path: Path) -> None:
    """Some workers gone and others new: diff and --dry-run name each thread step (exit 1:
    different), the apply ends and creates them, and the pool works."""
    _grow(pool, 3)
    image, tasks, _ = _checkpoint(pool, tmp_path / "img")
    command(pool, "shrink 2", "shrunk")
    _grow(pool, 2)
    assert len(_tasks(pool.pid)) == 4 and _tasks(pool.pid) != tasks
    shown = run_applier("diff", str(image), "--against", str(pool.pid))
    assert shown.returncode == 1, shown.stderr
    assert shown.stdout.count("thread  end") == 2 and shown.stdout.count("thread  new") == 2
    dry = run_applier("apply", str(image), "--into", str(pool.pid), "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    ops = [s["op"] for s in json.loads(dry.stdout)["steps"]]
    assert ops.count("thread-end") == 2 and ops.count("thread-new") == 2
    assert len(_tasks(pool.pid)) == 4  # a dry run changes nothing
    done = run_applier("apply", str(image), "--into", str(pool.pid))
    assert done.returncode == 0, done.stderr
    assert _tasks(pool.pid) == tasks
    assert _ping(pool)[:2] == [3, 3]
    assert _quit(pool) == 0


def test_dump_records_what_a_thread_needs_to_be_created_again(pool: Target, tmp_path: Path) -> None:
    """Every core has the thread's tid address, robust list and sigaltstack (as CRIU writes
    them: thread_info.clear_tid_addr, thread_core.futex_rla, thread_core.sas)."""
    _grow(pool, 2)
    dump(pool.pid, tmp_path / "img")
    image = ImageDir.open(tmp_path / "img")
    threads = image.pstree[0].threads
    assert len(threads) == 3
    for tid in threads:
        core = image.core(tid)
        assert core.thread_core is not None and core.thread_info is not None
        assert core.thread_core.futex_rla != 0 and core.thread_core.futex_rla_len == 24
        sas = core.thread_core.sas
        assert sas is not None
        if tid == pool.pid:
            assert sas.ss_flags & 2  # SS_DISABLE: the main thread has none
        else:
            assert sas.ss_sp != 0 and sas.ss_size > 0 and sas.ss_flags == 0  # the worker's
            # glibc: the tid address is &pthread->tid, the robust list head is inside the
            # same struct pthread, a few hundred bytes on
            tid_addr = core.thread_info.clear_tid_addr
            assert 0 < core.thread_core.futex_rla - tid_addr < 4096
    assert_untouched(pool)
    assert _ping(pool)[:2] == [2, 2]


def _ask(t: Target, line: str, key: str) -> list[str]:
    """One command to a runtime target (node, a JVM: not blocked in read() when idle)."""
    t.send(line)
    return t.expect(key, timeout=20)


def _runtime(argv: list[str], env: dict[str, str] | None = None) -> Target:
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        bufsize=0,
        start_new_session=True,
        env={**os.environ, **(env or {})},
    )
    return Target(proc)


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_node_libuv_pool_started_after_the_checkpoint_is_ended(tmp_path: Path) -> None:
    """libuv starts its thread pool on the first fs call: checkpointed before it, applied
    after it, the four pool threads are ended, and node starts its pool again on the next
    fs call and goes on (a real runtime's pool that grew)."""
    t = _runtime(["node", str(TARGETS / "uv_pool.js")], {"UV_THREADPOOL_SIZE": "4"})
    try:
        t.expect("ready", timeout=30)
        tasks = _tasks(t.pid)
        dump(t.pid, tmp_path / "img")
        assert _ask(t, "fs", "read") != []
        assert len(_tasks(t.pid)) == len(tasks) + 4
        result = apply(tmp_path / "img", t.pid)
        assert result.stats.threads_ended == 4 and result.stats.verified
        assert _tasks(t.pid) == tasks
        for _ in range(2):
            assert _ask(t, "fs", "read") != []
        assert len(_tasks(t.pid)) == len(tasks) + 4
        t.send("quit")
        assert t.proc.wait(timeout=10) == 0
    finally:
        t.kill()


@pytest.mark.skipif(shutil.which("java") is None or shutil.which("javac") is None, reason="no JDK")
def test_jvm_pool_that_timed_out_gets_its_workers_back(tmp_path: Path) -> None:
    """A java.util.concurrent pool whose idle workers time out (200 ms): checkpointed with
    four workers, applied after they ended, the four JVM threads are created again with
    their ids. They resume in their timed wait, find the deadline passed and leave through
    the JVM's own thread exit; the pool then starts new workers and the JVM exits normally."""
    classes = tmp_path / "classes"
    subprocess.run(["javac", "-d", str(classes), str(TARGETS / "Pool.java")], check=True)
    t = _runtime(["java", "-Xmx64m", "-XX:+UseSerialGC", "-cp", str(classes), "Pool"])
    try:
        t.expect("ready", timeout=60)
        assert _ask(t, "work 4", "worked") == ["4", "4", "4"]
        tasks = _tasks(t.pid)
        dump(t.pid, tmp_path / "img")
        deadline = time.monotonic() + 10
        while len(_tasks(t.pid)) > len(tasks) - 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(_tasks(t.pid)) == len(tasks) - 4  # the workers timed out
        result = apply(tmp_path / "img", t.pid)
        assert result.stats.threads_created == 4 and result.stats.verified
        assert set(_tasks(t.pid)) <= set(tasks)  # created with their ids (some may be gone)
        for n in (4, 8, 2):
            done, workers, size = _ask(t, f"work {n}", "worked")
            assert (done, workers) == (str(n), str(min(n, 4))) and int(size) <= 4
        assert _ask(t, "quit", "bye") == []
        assert t.proc.wait(timeout=20) == 0
    finally:
        t.kill()

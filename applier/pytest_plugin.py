"""pytest plugin: reset a warmed-up fixture process between tests instead of restarting it.

Installed with applier (entry point ``pytest11``), it offers one fixture, ``applier_checkpoint``,
a session-wide factory: ``applier_checkpoint(pid)`` checkpoints the process (once per pid)
and returns the :class:`applier.fixture.Checkpoint`; every checkpoint is closed at the end
of the session. Typical use::

    @pytest.fixture(scope="session")
    def server(applier_checkpoint):
        proc = start_server()          # slow: warms caches, loads data
        wait_until_ready(proc)
        yield proc, applier_checkpoint(proc.pid)
        proc.kill()

    @pytest.fixture
    def fresh_server(server):
        proc, checkpoint = server
        yield proc
        checkpoint.restore()           # the next test sees the server as it was
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from applier.fixture import Checkpoint

__all__ = ["applier_checkpoint"]


@pytest.fixture(scope="session")
def applier_checkpoint() -> Iterator[Callable[[int], Checkpoint]]:
    """Factory: checkpoint a live process once per pid; all are closed after the session."""
    taken: dict[int, Checkpoint] = {}

    def take(pid: int) -> Checkpoint:
        if pid not in taken or taken[pid].closed:
            taken[pid] = Checkpoint.take(pid)
        return taken[pid]

    yield take
    for checkpoint in taken.values():
        checkpoint.close()

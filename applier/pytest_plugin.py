"""pytest plugin: reset a warmed-up fixture process between tests instead of restarting it.

Installed with applier (entry point ``pytest11``), it offers one fixture, ``applier_checkpoint``,
a session-wide factory: ``applier_checkpoint(pid)`` checkpoints the process (once per pid)
and returns the :class:`applier.fixture.Checkpoint`; every checkpoint is closed at the end
of the session. A complete example is in docs/pytest.md (and docs/examples/)::

    @pytest.fixture(scope="session")
    def server(applier_checkpoint, tmp_path_factory):
        proc = start_server(tmp_path_factory.mktemp("srv"))   # slow: warms caches, loads data
        yield proc, applier_checkpoint(proc.pid)
        proc.kill()

    @pytest.fixture
    def fresh_server(server):
        proc, checkpoint = server
        yield proc
        checkpoint.restore()           # the next test sees the server as it was

Under pytest-xdist (``pytest -n 2``) every worker is its own pytest session: session
fixtures run once per worker, so each worker starts its own server and takes its own
checkpoint. A process can be checkpointed by one worker only; a second worker handed the
same pid (a server started once outside the workers, say) gets ``TargetBusy`` naming the
worker that holds it, instead of both resetting the same server under each other's tests.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from applier.fixture import Checkpoint

__all__ = ["applier_checkpoint"]


def _worker(config: pytest.Config) -> str:
    """The xdist worker id (gw0, gw1, ...), or "" outside xdist."""
    workerinput = getattr(config, "workerinput", None)
    return str(workerinput.get("workerid", "")) if isinstance(workerinput, dict) else ""


@pytest.fixture(scope="session")
def applier_checkpoint(request: pytest.FixtureRequest) -> Iterator[Callable[[int], Checkpoint]]:
    """Factory: checkpoint a live process once per pid; all are closed after the session."""
    taken: dict[int, Checkpoint] = {}
    worker = _worker(request.config)
    label = f"pytest worker {worker}" if worker else "pytest"

    def take(pid: int) -> Checkpoint:
        if pid not in taken or taken[pid].closed:
            taken[pid] = Checkpoint.take(pid, label=label)
        return taken[pid]

    yield take
    for checkpoint in taken.values():
        checkpoint.close()

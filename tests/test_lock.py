"""applier.lock: a claim kept open between the applies of one Checkpoint still excludes
every other applier while it is held, and leaves no file behind."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from applier.errors import TargetBusy
from applier.lock import KeptClaim, TargetLock


def try_acquire(pid: int) -> str:
    """A claim by another process (locks are per open file: another process is the test)."""
    code = (
        "import sys; from applier.lock import TargetLock; from applier.errors import TargetBusy\n"
        "try:\n TargetLock.acquire(int(sys.argv[1]), 'work', 'other').release(); print('got')\n"
        "except TargetBusy as e: print('busy', e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(pid)], check=False, capture_output=True, text=True
    )
    return out.stdout.strip() or out.stderr


@pytest.fixture
def pid() -> Iterator[int]:
    proc = subprocess.Popen(["sleep", "30"])
    yield proc.pid
    proc.kill()
    proc.wait()


def test_kept_claim(pid: int) -> None:
    claim = KeptClaim(pid, "work")
    with claim.held("first"):
        path = claim._lock.path  # type: ignore[union-attr]
        assert try_acquire(pid).startswith("busy pid")
    assert path.exists()  # kept between the applies
    assert try_acquire(pid) == "got"  # free meanwhile; the other removed the file
    assert not path.exists()
    with claim.held("second"):  # a new file, and held again
        assert path.exists()
        assert try_acquire(pid).startswith("busy pid")
        with pytest.raises(TargetBusy):
            TargetLock.acquire(pid, "work", "same process, other file description")
    claim.close()
    assert not path.exists()
    assert try_acquire(pid) == "got"


def test_kept_claim_closed_while_another_holds_it(pid: int) -> None:
    """Closing does not remove a file another applier holds at that moment."""
    claim = KeptClaim(pid, "work")
    with claim.held("first"):
        path = claim._lock.path  # type: ignore[union-attr]
    r, w = os.pipe()
    code = (
        "import os, sys; from applier.lock import TargetLock\n"
        "lock = TargetLock.acquire(int(sys.argv[1]), 'work', 'other')\n"
        "print('held', flush=True); sys.stdin.read(); lock.release()\n"
    )
    other = subprocess.Popen(
        [sys.executable, "-c", code, str(pid)], stdin=r, stdout=subprocess.PIPE, text=True
    )
    os.close(r)
    try:
        assert other.stdout is not None and other.stdout.readline().strip() == "held"
        claim.close()
        assert path.exists()  # still the other's
    finally:
        os.close(w)
        other.wait(10)
    assert not path.exists()

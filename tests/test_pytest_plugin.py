"""The pytest plugin under pytest-xdist: the docs example, run in two worker processes."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from applier.fixture import Checkpoint
from applier.lock import TargetBusy
from tests.procs import REPO, Target, assert_untouched

pytestmark = pytest.mark.live


def test_docs_example_under_xdist_gives_each_worker_its_own_server(tmp_path: Path) -> None:
    """pytest -n 2 docs/examples: both workers pass, each with a server and checkpoint of its
    own, and no server or tracker is left behind."""
    report = tmp_path / "report.xml"
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-n", "2", "-p", "no:cacheprovider", "-q",
         f"--junitxml={report}", "-o", "junit_family=xunit1", str(REPO / "docs" / "examples")],
        check=False, capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "8 passed" in out.stdout
    props: dict[str, dict[str, str]] = {}
    for case in ET.parse(report).iter("testcase"):
        found = {p.get("name", ""): p.get("value", "") for p in case.iter("property")}
        if found:
            props.setdefault(found["worker"], found)
        assert props[found["worker"]]["server_pid"] == found["server_pid"]  # one per worker
    assert set(props) == {"gw0", "gw1"}, props  # the test ran in both workers
    pids = {int(p["server_pid"]) for p in props.values()}
    assert len(pids) == 2  # two servers, one per worker
    for pid in pids:  # killed by their session fixtures
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()


def test_second_checkpoint_of_one_process_is_refused(target: Target) -> None:
    """Two Checkpoints of one process would reset each other's state: the second is refused
    with a message naming the holder, and works once the first is closed."""
    busy = r"checkpointed \(pytest worker gw0\) by applier pid"
    with (
        Checkpoint.take(target.pid, label="pytest worker gw0"),
        pytest.raises(TargetBusy, match=busy),
    ):
        Checkpoint.take(target.pid)
    with Checkpoint.take(target.pid) as again:
        assert again.tracked
    assert_untouched(target)

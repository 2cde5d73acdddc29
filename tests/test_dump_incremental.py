"""Incremental dumps (applier dump --parent): only pages written since the tracked parent are
stored, the rest are PE_PARENT holes; the layer applies like any image and tracking moves on."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from applier.api import apply
from applier.dump import dump
from applier.errors import MismatchError
from formats.imagedir import ImageDir
from formats.names import TRACKING as TRACKING_FILE
from formats.pagemap import PE_PARENT
from tests.live_state import assert_same, command, snapshot
from tests.procs import Target, assert_untouched

pytestmark = pytest.mark.live


def test_incremental_layer_stores_only_written_pages(target: Target, tmp_path: Path) -> None:
    """Layer 2 holds the pages written since layer 1, points to layer 1 for the rest; crit
    decodes it; tracking moves on to it; apply --only-dirty of it restores state 2 exactly."""
    one, two = tmp_path / "1", tmp_path / "2"
    dump(target.pid, one, track=True)
    command(target, "scribble", "done")
    layer = dump(target.pid, two, parent=one)
    at_two = snapshot(target.pid)
    assert layer.parent_pages > 0 and layer.pages > 0
    assert (two / "parent").is_symlink() and (two / "parent").resolve() == one.resolve()
    assert (two / TRACKING_FILE).exists() and not (one / TRACKING_FILE).exists()
    out = subprocess.run(
        ["crit", "decode", "-i", str(two / f"pagemap-{target.pid}.img")],
        check=True, capture_output=True,
    )  # fmt: skip
    entries = json.loads(out.stdout)["entries"][1:]
    assert any(e.get("flags") in (PE_PARENT, "PE_PARENT") for e in entries)
    # resolved through the chain, layer 2 covers its own pages and the parent's holes
    resolved = sum(r.nr_pages for r in ImageDir.open(two).page_runs(target.pid))
    assert resolved == layer.pages + layer.parent_pages
    command(target, "touch", "touched")  # scribble cannot run twice: it unmaps memory
    result = apply(two, target.pid, only_dirty=True)
    assert result.dirty_source == "tracker:uffd-wp"
    assert result.stats.pages_written < resolved
    assert_same(at_two, snapshot(target.pid))
    assert_untouched(target)


def test_incremental_layer_round_trip(target: Target, tmp_path: Path) -> None:
    """Dump 1 (tracked), change, dump 2 on top; apply 1 and then 2: each state exactly."""
    one, two = tmp_path / "1", tmp_path / "2"
    (checksum,) = command(target, "sum", "sum")
    dump(target.pid, one, track=True)
    at_one = snapshot(target.pid)
    command(target, "scribble", "done")
    dump(target.pid, two, parent=one)
    at_two = snapshot(target.pid)
    apply(one, target.pid)
    assert_same(at_one, snapshot(target.pid))
    assert command(target, "sum", "sum") == [checksum]
    apply(two, target.pid)
    assert_same(at_two, snapshot(target.pid))
    assert_untouched(target)


def test_parent_without_tracking_is_refused(target: Target, tmp_path: Path) -> None:
    """--parent of an untracked dump: refused before anything is written, no directory left."""
    dump(target.pid, tmp_path / "1")
    with pytest.raises(MismatchError, match="no dirty tracking"):
        dump(target.pid, tmp_path / "2", parent=tmp_path / "1")
    assert not (tmp_path / "2").exists()
    assert_untouched(target)

"""applier dump on a live process: CRIU-format images that Debian's crit decodes with the same
values, and that describe the process as /proc shows it."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from applier.dump import dump
from formats.imagedir import ImageDir
from injector import attach
from tests.procs import Target, assert_untouched, build_c, spawn

pytestmark = [pytest.mark.live, pytest.mark.crit]


@pytest.fixture
def target() -> Iterator[Target]:
    with spawn(build_c("apply_target.c")) as t:
        t.expect("ready")
        t.send("threads 3")
        t.expect("threads")
        t.wait_in_syscall(0)
        yield t


def crit(path: Path) -> dict[str, Any]:
    out = subprocess.run(["crit", "decode", "-i", str(path)], check=True, capture_output=True)
    decoded: dict[str, Any] = json.loads(out.stdout)
    return decoded


def number(value: Any) -> int:
    return int(value, 16) if isinstance(value, str) else int(value)


def test_dump_decodes_with_crit_and_matches_the_process(target: Target, tmp_path: Path) -> None:
    """Every image decodes with crit; pids, threads, VMAs and page counts agree with /proc."""
    image = tmp_path / "ckpt"
    stats = dump(target.pid, image)
    assert_untouched(target)
    for path in image.glob("*.img"):
        if not path.name.startswith("pages-"):
            crit(path)  # raises on anything crit cannot decode
    pstree = crit(image / "pstree.img")["entries"]
    assert [(e["pid"], sorted(e["threads"])) for e in pstree] == [
        (target.pid, sorted(int(t.name) for t in Path(f"/proc/{target.pid}/task").iterdir()))
    ]
    mm = crit(image / f"mm-{target.pid}.img")["entries"][0]
    live = Path(f"/proc/{target.pid}/maps").read_text().splitlines()
    assert [(number(v["start"]), number(v["end"])) for v in mm["vmas"]] == [
        tuple(int(x, 16) for x in line.split()[0].split("-")) for line in live
    ]
    entries = crit(image / f"pagemap-{target.pid}.img")["entries"][1:]
    crit_pages = sum(max(int(e.get("nr_pages", 0)), int(e.get("compat_nr_pages", 0)))
                     for e in entries)  # fmt: skip
    img = ImageDir.open(image)
    ours = sum(r.nr_pages for r in img.page_runs(target.pid))
    assert crit_pages == ours
    assert stats.pages >= ours
    with attach(target.pid) as s:
        for tid in s.tids:
            regs = crit(image / f"core-{tid}.img")["entries"][0]["thread_info"]["gpregs"]
            assert number(regs["ip"]) == s.get_regs(tid).ip

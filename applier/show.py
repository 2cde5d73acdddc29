"""``applier show IMAGE_DIR [--json]``: what an image directory holds.

Tasks and threads (ip, sp), VMAs with addresses, protection, kind and file, the pagemap runs
inside each VMA (pages present here, in a parent snapshot, lazy), and the pages files used.
Errors are :class:`formats.errors.ImageError`; ``applier.cli`` prints them on one line.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, TextIO

import numpy as np

from formats.core import MTYPES
from formats.errors import ImageError
from formats.imagedir import ImageDir
from formats.mm import MAP_SHARED, VmaEntry
from formats.pagemap import PE_LAZY, PE_PARENT, PE_PRESENT, Pagemap

__all__ = ["describe", "register", "render_text", "run"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``show`` command."""
    parser = subparsers.add_parser("show", help="describe a CRIU image directory")
    parser.add_argument("image_dir", metavar="IMAGE_DIR", help="CRIU image directory")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``applier show``."""
    with ImageDir.open(args.image_dir) as img:
        doc = describe(img)
    out: TextIO = sys.stdout
    if args.json:
        json.dump(doc, out, indent=2)
        out.write("\n")
    else:
        out.write(render_text(doc))
    return 0


def _hex(value: int) -> str:
    return f"0x{value:x}"


def _prot(vma: VmaEntry) -> str:
    p = vma.prot
    return (
        ("r" if p & 1 else "-")
        + ("w" if p & 2 else "-")
        + ("x" if p & 4 else "-")
        + ("s" if vma.flags & MAP_SHARED else "p")
    )


def _page_counts(pm: Pagemap | None, vma: VmaEntry) -> dict[str, int]:
    """Pages of the top-level pagemap inside ``vma``, by source."""
    counts = {"runs": 0, "present": 0, "parent": 0, "lazy": 0}
    if pm is None or not len(pm) or vma.is_guard:
        return counts
    page = pm.page_size
    start = np.maximum(pm.vaddr, np.uint64(vma.start))
    end = np.minimum(pm.end, np.uint64(vma.end))
    inside = end > start
    pages = np.where(inside, (end - start) // np.uint64(page), np.uint64(0))
    flags = pm.flags
    counts["runs"] = int(inside.sum())
    counts["present"] = int(pages[(flags & PE_PRESENT) != 0].sum())
    counts["parent"] = int(pages[(flags & PE_PARENT) != 0].sum())
    counts["lazy"] = int(pages[(flags & PE_LAZY) != 0].sum())
    return counts


def describe(img: ImageDir) -> dict[str, Any]:
    """The JSON-ready description ``show`` prints."""
    pages_files: dict[str, int] = {}
    processes: list[dict[str, Any]] = []
    for proc in img.pstree:
        pid = proc.pid
        threads = []
        for tid in proc.threads or [pid]:
            core = img.core(tid)
            regs = core.ip_sp()
            threads.append(
                {
                    "tid": tid,
                    "arch": MTYPES.get(core.mtype, str(core.mtype)),
                    "ip": _hex(regs[0]) if regs else None,
                    "sp": _hex(regs[1]) if regs else None,
                }
            )
        entry: dict[str, Any] = {
            "pid": pid,
            "ppid": proc.ppid,
            "pgid": proc.pgid,
            "sid": proc.sid,
            "threads": threads,
        }
        try:
            mm = img.mm(pid)
        except ImageError:  # a zombie has no mm image
            mm = None
        if mm is not None:
            has_pagemap = (img.path / f"pagemap-{pid}.img").exists()
            pm = img.pagemap(pid) if has_pagemap else None
            runs = img.page_runs(pid) if has_pagemap else []
            for run_ in runs:
                pages_files[str(run_.pages.path)] = run_.pages.size
            if pm is not None and pm.pages is not None:
                pages_files[str(pm.pages.path)] = pm.pages.size
            entry["exe"] = img.exe_path(pid)
            entry["brk"] = {"start": _hex(mm.mm_start_brk), "end": _hex(mm.mm_brk)}
            entry["vmas"] = [
                {
                    "start": _hex(v.start),
                    "end": _hex(v.end),
                    "prot": _prot(v),
                    "kind": v.kind(),
                    "path": img.vma_path(pid, v),
                    "pages": _page_counts(pm, v),
                }
                for v in mm.vmas
            ]
            entry["resolved_runs"] = len(runs)
        processes.append(entry)
    return {
        "path": str(img.path),
        "img_version": img.inventory.img_version,
        "page_size": img.page_size,
        "root_pid": img.root_pid,
        "pages_files": [{"path": p, "size": s} for p, s in sorted(pages_files.items())],
        "processes": processes,
    }


def render_text(doc: dict[str, Any]) -> str:
    """Human-readable form of :func:`describe`'s document."""
    lines = [
        f"image dir {doc['path']}: img_version {doc['img_version']}, "
        f"page size {doc['page_size']}, root pid {doc['root_pid']}"
    ]
    for pf in doc["pages_files"]:
        lines.append(f"pages file {pf['path']}: {pf['size']} bytes")
    for proc in doc["processes"]:
        lines.append(
            f"process {proc['pid']} (ppid {proc['ppid']}, pgid {proc['pgid']}, "
            f"sid {proc['sid']}) exe {proc.get('exe')}"
        )
        for th in proc["threads"]:
            lines.append(f"  thread {th['tid']} {th['arch']} ip {th['ip']} sp {th['sp']}")
        if "vmas" not in proc:
            lines.append("  no mm image")
            continue
        lines.append(f"  brk {proc['brk']['start']}-{proc['brk']['end']}")
        lines.append(f"  {len(proc['vmas'])} VMAs, {proc['resolved_runs']} resolved page runs")
        for v in proc["vmas"]:
            pages = v["pages"]
            counts = ""
            if pages["runs"]:
                counts = (
                    f"  runs {pages['runs']}: present {pages['present']}, "
                    f"parent {pages['parent']}, lazy {pages['lazy']}"
                )
            path = f" {v['path']}" if v["path"] else ""
            lines.append(
                f"    {v['start']:>18}-{v['end']:<18} {v['prot']} {v['kind']}{path}{counts}"
            )
    return "\n".join(lines) + "\n"

"""``applier show IMAGE_DIR [--json]``: what an image directory holds.

Tasks and threads (ip, sp, the system call a thread was stopped in), VMAs with addresses,
protection, kind and file, the pagemap runs inside each VMA (pages held here, in a parent
snapshot, lazy), totals, and the pages files used. Errors are
:class:`formats.errors.ImageError`; the CLI prints them on one line.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from formats.imagedir import ImageDir
    from formats.mm import MmEntry, VmaEntry
    from formats.pagemap import Pagemap

__all__ = ["describe", "register", "render_text", "run"]

LEGEND = (
    "columns: START-END (end exclusive), PROT (r/w/x, p private or s shared), KIND, PATH; "
    "then, for VMAs the pagemap covers: RUNS pagemap entries, PRESENT pages held in this "
    "directory, PARENT pages left to a parent snapshot (PE_PARENT), LAZY pages CRIU may "
    "restore on demand (PE_LAZY, a subset of PRESENT)"
)


_HELD_SHOWN = 64  # runs of a layer listed in the text output


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``show`` command."""
    parser = subparsers.add_parser(
        "show",
        help="describe a CRIU image directory",
        description="Print what a CRIU image directory holds: processes, threads (with the "
        "system call each was stopped in), VMAs and the pages the pagemap keeps for each. "
        + LEGEND
        + ".",
    )
    parser.add_argument("image_dir", metavar="IMAGE_DIR", help="CRIU image directory")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``applier show``."""
    from formats.imagedir import ImageDir  # noqa: PLC0415 - the CLI imports per command

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
    from formats.mm import MAP_SHARED  # noqa: PLC0415

    p = vma.prot
    return (
        ("r" if p & 1 else "-")
        + ("w" if p & 2 else "-")
        + ("x" if p & 4 else "-")
        + ("s" if vma.flags & MAP_SHARED else "p")
    )


def _page_counts(pm: Pagemap | None, vma: VmaEntry) -> dict[str, int]:
    """Pages of the top-level pagemap inside ``vma``, by source."""
    import numpy as np  # noqa: PLC0415

    from formats.pagemap import PE_LAZY, PE_PARENT, PE_PRESENT  # noqa: PLC0415

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


def _held_here(pm: Pagemap) -> list[dict[str, Any]]:
    """The runs whose bytes this directory holds itself (``PE_PRESENT``), for a layer."""
    from formats.pagemap import PE_PRESENT  # noqa: PLC0415

    sel = (pm.flags & PE_PRESENT) != 0
    return [
        {"start": _hex(int(a)), "end": _hex(int(b)), "pages": int(n)}
        for a, b, n in zip(pm.vaddr[sel], pm.end[sel], pm.nr_pages[sel], strict=True)
    ]


def _thread(img: ImageDir, tid: int) -> dict[str, Any]:
    from formats.core import MTYPES  # noqa: PLC0415
    from injector.regs import Arch  # noqa: PLC0415
    from injector.syscalls import ARG_REGS, format_call  # noqa: PLC0415

    core = img.core(tid)
    regs = core.ip_sp()
    call = None
    ti = core.thread_info
    if ti is not None and ti.gpregs.orig_ax < 1 << 63:  # orig_ax -1: not in a system call
        gp = ti.gpregs
        call = format_call(Arch.X86_64, gp.orig_ax, [getattr(gp, r) for r in ARG_REGS[Arch.X86_64]])
    return {
        "tid": tid,
        "arch": MTYPES.get(core.mtype, str(core.mtype)),
        "ip": _hex(regs[0]) if regs else None,
        "sp": _hex(regs[1]) if regs else None,
        "syscall": call,
    }


def _vmas(img: ImageDir, pid: int, mm: MmEntry, pm: Pagemap | None) -> list[dict[str, Any]]:
    """One row per VMA; the two vvar areas of Linux 6.13+ ([vvar], [vvar_vclock]), adjacent
    and both flagged VMA_AREA_VVAR, are one row."""
    rows: list[dict[str, Any]] = []
    for v in mm.vmas:
        kind = v.kind()
        if kind == "vvar" and rows and rows[-1]["kind"] == "vvar" and rows[-1]["_end"] == v.start:
            rows[-1]["end"] = _hex(v.end)
            rows[-1]["_end"] = v.end
            rows[-1]["areas"] += 1
            continue
        rows.append(
            {
                "start": _hex(v.start),
                "end": _hex(v.end),
                "_end": v.end,
                "prot": _prot(v),
                "kind": kind,
                "path": img.vma_path(pid, v),
                "pages": _page_counts(pm, v),
                "areas": 1,
            }
        )
    for row in rows:
        del row["_end"]
    return rows


def describe(img: ImageDir) -> dict[str, Any]:
    """The JSON-ready description ``show`` prints (``img``: a formats ImageDir)."""
    from formats.errors import ImageError  # noqa: PLC0415

    pages_files: dict[str, int] = {}
    processes: list[dict[str, Any]] = []
    page = img.page_size
    totals = {"present": 0, "parent": 0, "lazy": 0}
    for proc in img.pstree:
        pid = proc.pid
        entry: dict[str, Any] = {
            "pid": pid,
            "ppid": proc.ppid,
            "pgid": proc.pgid,
            "sid": proc.sid,
            "threads": [_thread(img, tid) for tid in proc.threads or [pid]],
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
            entry["vmas"] = _vmas(img, pid, mm, pm)
            entry["resolved_runs"] = len(runs)
            if pm is not None and (img.path / "parent").exists():
                entry["held_here"] = _held_here(pm)
            for v in entry["vmas"]:
                for key in totals:
                    totals[key] += v["pages"][key]
        entry["fds"] = _fds(img, pid)
        processes.append(entry)
    return {
        "path": str(img.path),
        "img_version": img.inventory.img_version,
        "page_size": page,
        "root_pid": img.root_pid,
        "totals": {
            "pages_present": totals["present"],
            "pages_in_parent": totals["parent"],
            "pages_lazy": totals["lazy"],
            "bytes_present": totals["present"] * page,
        },
        "pages_files": [{"path": p, "size": s} for p, s in sorted(pages_files.items())],
        "processes": processes,
    }


def _fds(img: ImageDir, pid: int) -> list[dict[str, Any]] | None:
    """The descriptor table of the image (None: it holds none)."""
    from applier.fds import image_fds  # noqa: PLC0415
    from applier.plan.steps import format_fd_flags  # noqa: PLC0415

    table = image_fds(img, pid)
    if table is None:
        return None
    return [
        {
            "fd": v.fd,
            "type": v.kind,
            "cloexec": v.cloexec,
            "flags": format_fd_flags(v.flags, access=True),
            "pos": v.pos,
            "path": v.path,
            "ident": v.ident,
        }
        for v in table
    ]


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def render_text(doc: dict[str, Any]) -> str:
    """Human-readable form of :func:`describe`'s document."""
    t = doc["totals"]
    lines = [
        f"image dir {doc['path']}: img_version {doc['img_version']}, "
        f"page size {doc['page_size']}, root pid {doc['root_pid']}",
        f"pages: {t['pages_present']} present ({_mib(t['bytes_present'])}), "
        f"{t['pages_in_parent']} in a parent, {t['pages_lazy']} lazy",
    ]
    for pf in doc["pages_files"]:
        lines.append(f"pages file {pf['path']}: {pf['size']} bytes")
    for proc in doc["processes"]:
        lines.append(
            f"process {proc['pid']} (ppid {proc['ppid']}, pgid {proc['pgid']}, "
            f"sid {proc['sid']}) exe {proc.get('exe')}"
        )
        for th in proc["threads"]:
            call = f" in {th['syscall']}" if th["syscall"] else ""
            lines.append(f"  thread {th['tid']} {th['arch']} ip {th['ip']} sp {th['sp']}{call}")
        if "vmas" not in proc:
            lines.append("  no mm image")
            continue
        lines.append(f"  brk {proc['brk']['start']}-{proc['brk']['end']}")
        lines.append(f"  {len(proc['vmas'])} VMAs, {proc['resolved_runs']} resolved page runs")
        lines.append(f"  {'START':<18}-{'END':<18} PROT KIND PATH  PAGES")
        for v in proc["vmas"]:
            pages = v["pages"]
            counts = ""
            if pages["runs"]:
                counts = (
                    f"  runs {pages['runs']}: present {pages['present']}, "
                    f"parent {pages['parent']}, lazy {pages['lazy']}"
                )
            path = f" {v['path']}" if v["path"] else ""
            areas = f" ({v['areas']} areas)" if v["areas"] > 1 else ""
            start, end = int(v["start"], 16), int(v["end"], 16)
            lines.append(
                f"  {start:#018x}-{end:#018x} {v['prot']} {v['kind']}{areas}{path}{counts}"
            )
        if "held_here" in proc:
            held = proc["held_here"]
            total = sum(r["pages"] for r in held)
            lines.append(f"  held in this layer (the rest is in the parent): {total} pages")
            lines.extend(
                f"    {int(r['start'], 16):#018x}-{int(r['end'], 16):#018x} {r['pages']} pages"
                for r in held[:_HELD_SHOWN]
            )
            if len(held) > _HELD_SHOWN:
                lines.append(f"    ... ({len(held) - _HELD_SHOWN} more runs, --json lists them)")
        fds = proc.get("fds")
        if fds is None:
            lines.append("  no descriptor images")
            continue
        lines.append(f"  {len(fds)} descriptors")
        for d in fds:
            what = d["path"] if d["path"] is not None else d["type"].lower()
            if d["path"] is None and d["ident"] is not None:
                what += f" {d['ident']}"
            cloexec = " cloexec" if d["cloexec"] else ""
            pos = f" pos {d['pos']}" if d["type"] == "REG" else ""
            lines.append(f"  fd {d['fd']:<4} {d['type']:<9} {d['flags']}{cloexec}{pos} {what}")
    lines.append(LEGEND)
    return "\n".join(lines) + "\n"

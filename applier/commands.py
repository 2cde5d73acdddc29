"""``applier diff`` and ``applier apply``: argument parsing and output only."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from applier.api import ApplyResult, apply, diff, parse_parts
from applier.dump import dump
from applier.plan import Plan

__all__ = ["plan_as_dict", "print_plan", "register"]


def _pid(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a process id: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"not a process id: {text!r}")
    return value


def _parts(text: str) -> tuple[str, ...]:
    try:
        return parse_parts(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("image_dir", metavar="IMAGE_DIR", help="CRIU image directory")
    p.add_argument("--task", type=int, metavar="VPID", help="task of the image (default: root)")
    p.add_argument(
        "--restore",
        type=_parts,
        default=parse_parts(None),
        metavar="PARTS",
        help="comma-separated parts to restore: memory,layout,brk,regs (default: all)",
    )
    p.add_argument(
        "--leave-shared",
        action="store_true",
        help="leave shared memory the image holds no pagemap-shmem for as it is (default: refuse)",
    )
    p.add_argument("--json", action="store_true", help="print the result as one JSON document")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    d = sub.add_parser(
        "diff",
        help="print what apply would change in a live process",
        description="Print the plan that would make the live process equal to the checkpoint. "
        "The target is stopped for a moment and not changed.",
    )
    _common(d)
    d.add_argument("--against", type=_pid, required=True, metavar="PID", help="live process")
    d.set_defaults(func=run_diff)

    a = sub.add_parser(
        "apply",
        help="revert a live process to a checkpoint, in place",
        description="Write a CRIU checkpoint into a running process: memory, layout, program "
        "break and registers. The process keeps its PID, files and sockets. Everything is "
        "validated first; if a step fails the process is put back as it was.",
    )
    _common(a)
    a.add_argument("--into", type=_pid, required=True, metavar="PID", help="live process")
    a.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    a.add_argument(
        "--only-dirty",
        action="store_true",
        help="write only pages changed since the image: from the dirty tracker a "
        "'dump --track' left running, else by comparing contents page by page",
    )
    a.add_argument("--no-verify", action="store_true", help="do not read back after applying")
    undo = a.add_mutually_exclusive_group()
    undo.add_argument(
        "--undo",
        metavar="DIR",
        help="write what the apply overwrites to DIR as an undo image (CRIU format; "
        "'applier apply DIR --into PID' puts it back); default: kept in memory until the "
        "apply is done",
    )
    undo.add_argument(
        "--no-undo",
        action="store_true",
        help="keep no copy of what is overwritten: faster, but a failed apply cannot be "
        "rolled back (exit code 7)",
    )
    a.set_defaults(func=run_apply)

    dp = sub.add_parser(
        "dump",
        help="checkpoint a live process into a CRIU image directory",
        description="Stop every thread of PID, write its memory, layout and registers as a "
        "CRIU image directory (inventory, pstree, core, mm, pagemap, pages, files), detach.",
    )
    dp.add_argument("image_dir", metavar="IMAGE_DIR", help="directory to create (must be empty)")
    dp.add_argument("--from", dest="pid", type=_pid, required=True, metavar="PID")
    dp.add_argument(
        "--track",
        action="store_true",
        help="leave dirty-page tracking running in the target, so that a later "
        "'apply --only-dirty' writes only the pages written since",
    )
    dp.add_argument(
        "--parent",
        metavar="DIR",
        help="incremental dump on top of DIR, a tracked dump of the same process: only pages "
        "written since are stored, the rest point into DIR (tracking moves on to this image)",
    )
    dp.add_argument("--json", action="store_true", help="print the result as JSON")
    dp.set_defaults(func=run_dump)


def plan_as_dict(plan: Plan) -> dict[str, Any]:
    steps: list[dict[str, Any]] = []
    for step in plan.steps:
        steps.append({"op": type(step).__name__, "text": step.describe().split(None, 1)[1]})
    return {
        "pid": plan.pid,
        "image_pid": plan.image_pid,
        "page_size": plan.page_size,
        "summary": plan.summary(),
        "steps": steps,
        "notes": list(plan.notes),
    }


def print_plan(plan: Plan) -> None:
    s = plan.summary()
    print(
        f"plan for pid {plan.pid} (image task {plan.image_pid}): "
        f"{s['pages_to_write']} pages to write, {s['pages_to_discard']} to discard, "
        f"{s['layout_changes']} layout changes, {s['threads']} threads"
    )
    for step in plan.steps:
        print(f"  {step.describe()}")
    for note in plan.notes:
        print(f"  note: {note}")


def run_diff(args: argparse.Namespace) -> int:
    plan = diff(
        args.image_dir,
        args.against,
        task=args.task,
        parts=args.restore,
        leave_shared=args.leave_shared,
    )
    if args.json:
        json.dump(plan_as_dict(plan), sys.stdout, indent=2)
        print()
    else:
        print_plan(plan)
    return 0


def run_apply(args: argparse.Namespace) -> int:
    result = apply(
        args.image_dir,
        args.into,
        task=args.task,
        parts=args.restore,
        leave_shared=args.leave_shared,
        only_dirty=args.only_dirty,
        verify=not args.no_verify,
        dry_run=args.dry_run,
        undo_dir=args.undo,
        undo=not args.no_undo,
        progress=not args.json,
    )
    if args.json:
        out = plan_as_dict(result.plan)
        out["dry_run"] = result.dry_run
        out["dirty_source"] = result.dirty_source
        if result.undo is not None:
            out["undo"] = {
                "path": str(result.undo.path),
                "pages": result.undo.pages,
                "scope_pages": result.undo.scope_pages,
                "seconds": result.undo.seconds,
            }
        if not result.dry_run:
            out["stats"] = result.stats.as_dict()
        json.dump(out, sys.stdout, indent=2)
        print()
    elif result.dry_run:
        print_plan(result.plan)
    else:
        print(_summary(result))
        if result.undo is not None:
            u = result.undo
            print(
                f"undo image in {u.path} ({u.pages} pages kept, scope {u.scope_pages} pages): "
                f"'applier apply {u.path} --into {result.plan.pid}' puts pid "
                f"{result.plan.pid} back as it was before this apply"
            )
    return 0


def _summary(result: ApplyResult) -> str:
    st = result.stats
    parts = [
        f"applied to pid {result.plan.pid}: {st.pages_written} pages written",
        f"{st.bytes_discarded // result.plan.page_size} discarded",
        f"{st.layout_changes} layout changes",
        f"{st.threads} threads",
    ]
    if st.pages_skipped:
        parts.insert(1, f"{st.pages_skipped} unchanged")
    text = ", ".join(parts) + f" in {st.seconds * 1000:.1f} ms"
    return text + (" (verified)" if st.verified else "")


def run_dump(args: argparse.Namespace) -> int:
    stats = dump(args.pid, args.image_dir, track=args.track, parent=args.parent)
    if args.json:
        json.dump(stats.as_dict(), sys.stdout, indent=2)
        print()
    else:
        print(
            f"dumped pid {stats.pid} into {args.image_dir}: {stats.threads} threads, "
            f"{stats.vmas} VMAs, {stats.pages} pages in {stats.seconds * 1000:.1f} ms"
            + (f", {stats.parent_pages} left to {args.parent}" if args.parent else "")
        )
        if stats.tracking:
            print(f"dirty-page tracking ({stats.tracking}) left running in pid {stats.pid}")
        elif args.track:
            print(f"no dirty-page tracking: {stats.tracking_note}", file=sys.stderr)
    return 0

"""``applier diff`` and ``applier apply``: argument parsing and output only."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import TYPE_CHECKING, Any

from applier import remote
from applier.errors import EXIT_DIFFERENT, EXIT_OK
from applier.parts import Part

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from applier.api import ApplyResult
    from applier.overrides import Overrides
    from applier.plan import Plan

__all__ = ["pid_arg", "print_plan", "register"]


def pid_arg(text: str) -> int:
    """argparse type of a process id."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a process id: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"not a process id: {text!r}")
    return value


def _parts(text: str) -> Part:
    try:
        return Part.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _fd_list(text: str) -> frozenset[int]:
    """argparse type of ``--keep-fd N[,N...]``."""
    out = set()
    for item in text.split(","):
        item = item.strip()
        if not item.isdigit():
            raise argparse.ArgumentTypeError(f"not a descriptor number: {item!r}")
        out.add(int(item))
    return frozenset(out)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("image_dir", metavar="IMAGE_DIR", help="CRIU image directory")
    p.add_argument("--task", type=int, metavar="VPID", help="task of the image (default: root)")
    p.add_argument(
        "--restore",
        type=_parts,
        default=Part.ALL,
        metavar="PARTS",
        help=f"comma-separated parts to restore: {','.join(Part.names())} (default: all)",
    )
    p.add_argument(
        "--leave-shared",
        action="store_true",
        help="leave shared memory the image holds no pagemap-shmem for as it is (default: refuse)",
    )
    p.add_argument(
        "--keep-fd",
        type=_fd_list,
        action="append",
        default=[],
        metavar="N[,N]",
        help="leave these descriptors exactly as they are (the fds part closes descriptors "
        "opened since the checkpoint, reopens files, and refuses what it cannot re-create)",
    )
    p.add_argument(
        "--json", action="store_true", help="print the result (or the error) as one JSON document"
    )
    p.add_argument(
        "--other-process",
        action="store_true",
        help="apply an image of another process (another pid, or a pid reused since): the "
        "replica case; refused by default",
    )
    p.add_argument(
        "--trust-image",
        action="store_true",
        help="use an image (or undo) directory that users other than you and root could "
        "have written; refused by default",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="also work on pid 1, applier's own process or one of its ancestors",
    )


def overrides(args: argparse.Namespace) -> Overrides:
    """The refusals the command line lifted."""
    from applier.overrides import Overrides  # noqa: PLC0415 - attrs costs 35 ms to import

    return Overrides(
        other_process=args.other_process,
        write_code=getattr(args, "write_code", False),
        trust_image=args.trust_image,
        force=args.force,
    )


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    d = sub.add_parser(
        "diff",
        help="compare a live process with a checkpoint",
        description="Report what differs between the live process and the checkpoint: pages "
        "whose contents differ, layout, program break, mm fields and registers, as the steps "
        "an apply would need. The target is stopped for a moment and not changed. Exit "
        "status as diff(1): 0 same, 1 different, 2 and up trouble.",
    )
    _common(d)
    d.add_argument("--against", type=pid_arg, required=True, metavar="PID", help="live process")
    d.set_defaults(func=run_diff)

    a = sub.add_parser(
        "apply",
        help="revert a live process to a checkpoint, in place",
        description="Write a CRIU checkpoint into a running process: memory, layout, program "
        "break, registers and descriptors (those opened since are closed, files reopened and "
        "set back to their positions and flags). The process keeps its PID, and its sockets "
        "and pipes open since the checkpoint. Everything is validated first; if a step fails "
        "the process is put back as it was.",
    )
    _common(a)
    a.add_argument("--into", type=pid_arg, required=True, metavar="PID", help="live process")
    a.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    a.add_argument(
        "--local",
        action="store_true",
        help="apply in this process even when the target's tracker holder could run the "
        "apply (it does by default: it has applier loaded; see 'dump --track')",
    )
    a.add_argument(
        "--only-dirty",
        action="store_true",
        help="write only pages changed since the image: from the dirty tracker a "
        "'dump --track' left running, else by comparing contents page by page",
    )
    a.add_argument(
        "--layer",
        action="store_true",
        help="IMAGE_DIR is an incremental layer and PID is at its parent state: write only the "
        "pages the layer holds, after checking that every page it leaves to its parent is "
        "equal in PID (refused otherwise)",
    )
    a.add_argument("--no-verify", action="store_true", help="do not read back after applying")
    a.add_argument(
        "--write-code",
        action="store_true",
        help="write saved pages into executable file mappings even where they differ from "
        "the file (a patched program); refused by default",
    )
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


def print_plan(plan: Plan, headline: str | None = None) -> None:
    """The plan as text: a headline (by default the plan's own), every step, then the
    threads' system calls (``diff``) and the notes."""
    s = plan.summary()
    if headline is None:
        unchanged = f" ({s['pages_unchanged']} unchanged)" if plan.compared else ""
        headline = (
            f"plan for pid {plan.pid} (image task {plan.image_pid}): "
            f"{s['pages_to_write']} pages to write{unchanged}, {s['pages_to_discard']} to "
            f"discard, {s['layout_changes']} layout changes, {s['threads']} threads"
            + _fd_text(s["fd_changes"])
            + _signal_counts(s)
        )
    print(headline)
    for step in plan.steps:
        print(f"  {step.describe()}")
    for call in plan.threads:
        print(f"  {call.describe()}")
    for note in plan.notes:
        print(f"  note: {note}")


def _signal_counts(s: dict[str, int]) -> str:
    """``, 2 signal dispositions, 1 blocked masks`` when the plan changes signal state."""
    if not s.get("signals") and not s.get("sigmasks"):
        return ""
    return f", {s['signals']} signal dispositions, {s['sigmasks']} blocked masks"


def run_diff(args: argparse.Namespace) -> int:
    from applier.api import diff  # noqa: PLC0415 - the CLI imports per command

    plan = diff(
        args.image_dir,
        args.against,
        task=args.task,
        parts=args.restore,
        leave_shared=args.leave_shared,
        overrides=overrides(args),
        keep_fds=frozenset().union(*args.keep_fd),
    )
    differs = bool(plan.steps)
    s = plan.summary()
    if args.json:
        json.dump({**plan.as_dict(), "differs": differs}, sys.stdout, indent=2)
        print()
    elif not differs:
        print_plan(
            plan,
            f"pid {plan.pid} is the same as image task {plan.image_pid} of {args.image_dir} "
            f"({plan.pages_unchanged} saved pages compared)",
        )
    else:
        print_plan(
            plan,
            f"pid {plan.pid} differs from image task {plan.image_pid} of {args.image_dir}: "
            f"{s['pages_to_write']} pages differ ({s['pages_unchanged']} the same), "
            f"{s['pages_to_discard']} pages to discard, {s['layout_changes']} layout changes, "
            f"{s['threads']} threads with other registers"
            + _fd_text(s["fd_changes"])
            + _signal_counts(s),
        )
    return EXIT_DIFFERENT if differs else EXIT_OK


def run_apply(args: argparse.Namespace) -> int:
    from applier.api import apply  # noqa: PLC0415 - the CLI imports per command

    if remote.SERVING:
        logger.info("applying in the tracker holder of pid %d (pid %d)", args.into, os.getpid())
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
        overrides=overrides(args),
        layer=args.layer,
        keep_fds=frozenset().union(*args.keep_fd),
    )
    if args.json:
        json.dump(apply_json(result), sys.stdout, indent=2)
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
    return EXIT_OK


def apply_json(result: ApplyResult) -> dict[str, Any]:
    """The ``apply --json`` document (docs/json.md)."""
    out = result.plan.as_dict()
    out["dry_run"] = result.dry_run
    out["dirty_source"] = result.dirty_source
    # the tracker holder that ran this apply for the command (applier.remote), or null
    out["holder"] = os.getpid() if remote.SERVING else None
    if result.undo is not None:
        out["undo"] = {
            "path": str(result.undo.path),
            "pages": result.undo.pages,
            "scope_pages": result.undo.scope_pages,
            "seconds": result.undo.seconds,
        }
    if not result.dry_run:
        out["stats"] = result.stats.as_dict()
    return out


def _fd_text(changes: int) -> str:
    return f", {changes} descriptor changes" if changes else ""


def _summary(result: ApplyResult) -> str:
    st = result.stats
    parts = [
        f"applied to pid {result.plan.pid}: {st.pages_written} pages written",
        f"{st.bytes_discarded // result.plan.page_size} discarded",
        f"{st.layout_changes} layout changes",
        f"{st.threads} threads",
    ]
    if st.fd_changes:
        parts.append(f"{st.fd_changes} descriptor changes")
    if st.signals or st.sigmasks:
        parts.append(f"{st.signals} signal dispositions, {st.sigmasks} blocked masks")
    if st.pages_skipped:
        parts.insert(1, f"{st.pages_skipped} unchanged")
    text = ", ".join(parts) + f" in {st.seconds * 1000:.1f} ms"
    return text + (" (verified)" if st.verified else "")

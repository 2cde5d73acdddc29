"""``applier dump``: argument parsing and output only."""

from __future__ import annotations

import argparse
import json
import sys

from applier.cli.apply import pid_arg

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    dp = sub.add_parser(
        "dump",
        help="checkpoint a live process into a CRIU image directory",
        description="Stop every thread of PID, write its memory, layout and registers as a "
        "CRIU image directory (inventory, pstree, core, mm, pagemap, pages, files), detach.",
    )
    dp.add_argument("image_dir", metavar="IMAGE_DIR", help="directory to create (must be empty)")
    dp.add_argument("--from", dest="pid", type=pid_arg, required=True, metavar="PID")
    dp.add_argument(
        "--track",
        action="store_true",
        help="leave dirty-page tracking running (its userfaultfd in a holder process, not in "
        "the target; 'applier untrack PID' ends it), so that a later 'apply --only-dirty' "
        "writes only the pages written since",
    )
    dp.add_argument(
        "--parent",
        metavar="DIR",
        help="incremental dump on top of DIR, a tracked dump of the same process: only pages "
        "written since are stored, the rest point into DIR (tracking moves on to this image)",
    )
    dp.add_argument("--json", action="store_true", help="print the result (or the error) as JSON")
    dp.add_argument(
        "--force", action="store_true", help="also pid 1, applier itself or its ancestors"
    )
    dp.set_defaults(func=run_dump)


def run_dump(args: argparse.Namespace) -> int:
    from applier.dump import dump  # noqa: PLC0415 - the CLI imports per command

    stats = dump(
        args.pid,
        args.image_dir,
        track=args.track,
        parent=args.parent,
        progress=not args.json,
        force=args.force,
    )
    if args.json:
        json.dump(stats.as_dict(), sys.stdout, indent=2)
        print()
    else:
        print(
            f"dumped pid {stats.pid} into {args.image_dir}: {stats.threads} threads, "
            f"{stats.vmas} VMAs, {stats.pages} pages in {stats.seconds * 1000:.1f} ms"
            + (f", {stats.parent_pages} left to {args.parent}" if args.parent else "")
        )
        if stats.tracking and stats.holder is not None:
            how = "the running tracker" if stats.tracking_reused else "started"
            print(
                f"dirty-page tracking ({stats.tracking}) of pid {stats.pid}: {how}, its "
                f"userfaultfd held by pid {stats.holder} ('applier untrack {stats.pid}' ends it)"
            )
        elif stats.tracking:
            print(f"dirty-page tracking ({stats.tracking}) left running in pid {stats.pid}")
        elif args.track:
            print(f"no dirty-page tracking: {stats.tracking_note}", file=sys.stderr)
    return 0

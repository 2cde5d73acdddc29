"""``applier untrack PID``: end the dirty-page tracking a ``dump --track`` left running."""

from __future__ import annotations

import argparse
import json
import sys

from applier.cli.apply import pid_arg

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "untrack",
        help="end the dirty-page tracking of a process",
        description="dump --track leaves the tracker's userfaultfd in a small holder process "
        "(never in the target). untrack stops that holder and waits until it has exited; the "
        "kernel then drops the write-protection of the target's memory. The target keeps "
        "running, untraced; later 'apply --only-dirty' compare page contents instead.",
    )
    p.add_argument("pid", type=pid_arg, metavar="PID", help="the tracked process")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import errno  # noqa: PLC0415 - the CLI imports per command
    import os  # noqa: PLC0415

    from applier.errors import UsageError  # noqa: PLC0415
    from applier.holder import stop  # noqa: PLC0415
    from injector.errors import NoSuchProcess  # noqa: PLC0415

    if not os.path.exists(f"/proc/{args.pid}/stat"):
        raise NoSuchProcess(args.pid, "no such process", errno.ESRCH)
    info = stop(args.pid)
    if info is None:
        raise UsageError(f"pid {args.pid}: no dirty-page tracker holder runs, nothing to untrack")
    if args.json:
        doc = {"pid": info.pid, "holder": info.holder, "image": info.image}
        json.dump(doc, sys.stdout, indent=2)
        print()
    else:
        print(f"tracking of pid {info.pid} ended: holder pid {info.holder} stopped")
    return 0

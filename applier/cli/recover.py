"""``applier recover PID``: finish an apply whose applier died (killed, crashed)."""

from __future__ import annotations

import argparse
import json
import sys

from applier.cli.apply import apply_json, pid_arg

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "recover",
        help="finish an apply that was killed half-way",
        description="An apply holds its target stopped before it writes, and keeps a journal: "
        "if applier dies (kill -9, a crash), the target is left stopped, never running "
        "half-applied. recover reads the journal, applies the same image again, and lets the "
        "target run on (unless it had been stopped before the apply). The next apply of the "
        "process does the same.",
    )
    p.add_argument("pid", type=pid_arg, metavar="PID", help="the held process")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from applier.api import recover  # noqa: PLC0415 - the CLI imports per command
    from applier.journal import Journal  # noqa: PLC0415

    journal = Journal.find(args.pid)
    result = recover(args.pid)
    if args.json:
        json.dump(apply_json(result), sys.stdout, indent=2)
        print()
    else:
        image = journal.image if journal is not None else "the image"
        print(
            f"recovered pid {args.pid}: {image} applied again, {result.stats.pages_written} "
            f"pages written in {result.stats.seconds * 1000:.1f} ms"
            + (" (verified)" if result.stats.verified else "")
        )
    return 0

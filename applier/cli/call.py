"""``applier call``: argument parsing and output only (the work is ``applier.invoke``)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from applier.cli.apply import pid_arg
from applier.errors import EXIT_OK

if TYPE_CHECKING:
    from applier.invoke import CallResult

__all__ = ["register"]

_SHOWN_PAGES = 16  # text output lists at most this many page addresses


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"not a positive number of seconds: {text!r}")
    return value


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "call",
        help="call a function inside a live process (and roll back what it did)",
        description="Call FUNCTION in PID on one thread while every other thread stays "
        "stopped, print its return value and the pages written during the call. A crash or "
        "a timeout puts the process back to its state just before the call (exit 9, 10). "
        "ARGs: integers (decimal, 0x hex) or quoted strings ('\"text\"': copied into the "
        "target, passed as a pointer).",
    )
    p.add_argument("pid", type=pid_arg, metavar="PID")
    p.add_argument(
        "function",
        metavar="FUNCTION",
        help="a symbol of the program or a loaded library, LIB:SYMBOL, NAME@VERSION, or 0xADDR",
    )
    p.add_argument("args", nargs="*", metavar="ARG", help="up to six integer or string arguments")
    p.add_argument("--thread", type=pid_arg, metavar="TID", help="run it on thread TID")
    p.add_argument(
        "--timeout",
        type=_seconds,
        default=10.0,
        metavar="S",
        help="give up after S seconds and put the process back (default: 10)",
    )
    p.add_argument(
        "--rollback",
        action="store_true",
        help="after the call returns, put memory, layout, break and registers back as they "
        "were just before it (only what the call changed is written)",
    )
    p.add_argument(
        "--record",
        metavar="DIR",
        help="DIR/before: a checkpoint taken just before the call; DIR/after: an incremental "
        "image on top of it holding the pages the call wrote",
    )
    p.add_argument("--json", action="store_true", help="print the result (or the error) as JSON")
    p.add_argument(
        "--force", action="store_true", help="also pid 1, applier itself or its ancestors"
    )
    p.set_defaults(func=run_call)


def run_call(args: argparse.Namespace) -> int:
    from applier.invoke import call, parse_arg  # noqa: PLC0415 - the CLI imports per command

    values = [parse_arg(a) for a in args.args]
    function: str = args.function
    result = call(
        args.pid,
        function,
        *values,
        thread=args.thread,
        timeout=args.timeout,
        rollback=args.rollback,
        record=args.record,
        force=args.force,
    )
    error = result.failure()
    if error is not None:
        raise error
    if args.json:
        json.dump(result.as_dict(), sys.stdout, indent=2)
        print()
    else:
        _print_text(result)
    return EXIT_OK


def _print_text(r: CallResult) -> None:
    assert r.value is not None and r.unsigned is not None
    print(f"{r.function} returned {r.value} ({r.unsigned:#x}) in pid {r.pid}, thread {r.tid}")
    shown = ", ".join(f"{p:#x}" for p in r.pages[:_SHOWN_PAGES])
    more = f", ... ({len(r.pages) - _SHOWN_PAGES} more)" if len(r.pages) > _SHOWN_PAGES else ""
    print(f"{len(r.pages)} pages written during the call" + (f": {shown}{more}" if shown else ""))
    if r.threads:
        what = "ended by the roll back" if r.rolled_back else "held until now, then let run"
        print(f"threads started by the call: {', '.join(map(str, r.threads))} ({what})")
    if r.rolled_back:
        print(f"rolled back: {r.pages_restored} pages written back, layout, break and registers")
    if r.record is not None:
        print(
            f"recorded: {r.record}/before (just before the call), {r.record}/after (the pages "
            "the call wrote, on top of before)"
        )

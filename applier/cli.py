"""Command-line interface: ``applier dump|show|diff|apply|demo``. Thin: parsing, dispatch,
exit codes.

Exit codes (also in ``docs/cli.md``):

====  =====================================================================
0     success
1     internal error (a bug: run with ``--debug`` for the traceback)
2     usage error (bad command line; an output directory not empty or not creatable)
3     bad image: malformed, truncated or inconsistent image directory
4     the image does not match the target process (executable, layout, threads)
5     target process problem: no such process, permission denied, exited
6     apply failed and the target was rolled back to its state before the apply
7     apply failed and rolling back failed too (the target may be inconsistent)
8     verification after apply found a difference (the target was rolled back unless
      --no-undo)
130   interrupted (Ctrl-C); an apply in progress is rolled back first
====  =====================================================================
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable, Sequence

from applier import commands, demo, show
from formats.errors import ImageError
from injector.errors import InjectorError

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_BAD_IMAGE = 3
EXIT_MISMATCH = 4
EXIT_TARGET = 5
EXIT_ROLLED_BACK = 6
EXIT_ROLLBACK_FAILED = 7
EXIT_VERIFY = 8

Handler = Callable[[argparse.Namespace], int]


def _error_exit_code(exc: BaseException) -> int | None:
    """Map the project's error roots to exit codes; None for unexpected errors."""
    if isinstance(exc, ImageError):
        return EXIT_BAD_IMAGE
    if isinstance(exc, InjectorError):
        return EXIT_TARGET
    code = getattr(exc, "exit_code", None)
    return code if isinstance(code, int) else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="applier",
        description="Apply CRIU checkpoint images into an already running process.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in _registrars():
        register(sub)
    return parser


def _registrars() -> list[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]]:
    """Each command module offers ``register(subparsers)`` that sets ``func`` on its parser."""
    return [show.register, commands.register, demo.register]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Handler = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        print("applier: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (``applier show --json | head``): not an error of ours.
        # Point stdout at /dev/null so the interpreter's final flush does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except Exception as exc:
        code = _error_exit_code(exc)
        if code is None or args.debug:
            traceback.print_exc()
        if code is None:
            print(f"applier: internal error: {exc!r} (a bug; please report it)", file=sys.stderr)
            return EXIT_INTERNAL
        print(f"applier: error: {exc}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())

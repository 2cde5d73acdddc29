"""Command-line interface: ``applier dump|show|diff|apply|call|recover|untrack|check|demo``.
Thin: parsing, dispatch, logging, and one error path (one line on stderr, or a JSON document under
``--json``, and the exit code ``applier.errors.exit_code`` gives; the codes are in
``applier/errors.py`` and ``docs/cli.md``).

Each command module registers its parser without importing what the command needs: the
handler imports it when it runs, so ``applier --version`` or ``--help`` start in tens of ms.

Signals: SIGINT, SIGTERM and SIGHUP end a command the same way. Until ``main`` runs there is
nothing to undo, and the ``applier`` command (``applier._entry``) just exits with 128 + the
signal (no traceback); from then on they raise ``Interrupted``, so an apply in progress is
rolled back (and its target let go) before the one-line message and the same exit code.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from applier import __version__
from applier.cli import apply as apply_cmd
from applier.cli import call as call_cmd
from applier.cli import check, demo, dump, recover, show, untrack
from applier.errors import EXIT_INTERNAL, Interrupted, exit_code

__all__ = ["build_parser", "main"]

Handler = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="applier",
        description="Apply CRIU checkpoint images into an already running process.",
        epilog="Exit codes: 0 ok (diff: same), 1 diff: different, 2 usage, 3 bad image, "
        "4 image does not match the target, 5 target problem, 6 apply failed and rolled back, "
        "7 rollback failed too, 8 verification failed, 9 call: the function crashed, "
        "10 call: it timed out (both put back), 70 internal error, 130 interrupted.",
    )
    parser.add_argument("--version", action="version", version=f"applier {__version__}")
    parser.add_argument(
        "-v",
        dest="more",
        action="count",
        default=0,
        help="say more, as criu: each v one level more (-vv, -vvv); -vNUM sets the level",
    )
    parser.add_argument(
        "--verbosity",
        type=int,
        default=DEFAULT_LEVEL,
        metavar="NUM",
        help="0 nothing, 1 errors, 2 warnings (default), 3 what is done, 4 debug",
    )
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="print errors only (the same as -v1)"
    )
    parser.add_argument("-o", "--log-file", metavar="FILE", help="write the messages to FILE")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (dump, show, apply_cmd, call_cmd, recover, untrack, check, demo):
        module.register(sub)
    return parser


DEFAULT_LEVEL = 2
LOGGERS = ("applier", "formats", "injector")  # the loggers the command line sets up
# criu's verbosity levels (criu(8), -v): 0 no output, 1 errors, 2 warnings, 3 info, 4 debug
_LEVELS = {0: logging.CRITICAL + 10, 1: logging.ERROR, 2: logging.WARNING, 3: logging.INFO}


def _criu_verbosity(argv: Sequence[str]) -> list[str]:
    """criu's ``-vNUM`` as ``--verbosity=NUM`` (argparse would read ``-v4`` as four flags)."""
    return [f"--verbosity={a[2:]}" if re.fullmatch(r"-v\d+", a) else a for a in argv]


def setup_logging(level: int, quiet: bool, log_file: str | None = None) -> None:
    """Messages of the ``applier``, ``formats`` and ``injector`` loggers on stderr (or in
    ``log_file``) at criu's verbosity ``level``; ``quiet`` is level 1, errors only."""
    threshold = _LEVELS.get(1 if quiet else level, logging.DEBUG)
    handler: logging.Handler = (
        logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    )
    handler.setFormatter(
        logging.Formatter(
            "%(asctime)s %(name)s: %(message)s" if log_file else "applier: %(message)s"
        )
    )
    for name in LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(threshold)
        logger.propagate = False


def _error_json(exc: BaseException, code: int) -> None:
    doc = {"error": {"type": type(exc).__name__, "message": str(exc), "exit_code": code}}
    json.dump(doc, sys.stdout, indent=2)
    print()


_STOPPING = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


_received: list[int] = []  # the stopping signals that arrived, in order


def _raise_interrupted(signum: int, frame: object) -> None:
    tracer = sys.modules.get("injector.tracer")  # (not loaded: nothing is traced yet)
    if tracer is not None and tracer.signal_deferred(signum):
        return  # ptrace state half changed: raised again when it is whole
    _received.append(signum)
    raise Interrupted(signum)


def _unraisable(hook: Any) -> None:
    """A signal that arrived where an exception cannot be raised (a finalizer, a logging
    lock's release) is raised again, to be answered at the next place it can."""
    if isinstance(hook.exc_value, Interrupted):
        signal.raise_signal(hook.exc_value.signum)
        return
    sys.__unraisablehook__(hook)


_parser: list[argparse.ArgumentParser] = []  # built once per process (a holder runs many)


def main(argv: Sequence[str] | None = None) -> int:
    if not _parser:
        _parser.append(build_parser())
    parser = _parser[0]
    args = parser.parse_args(_criu_verbosity(sys.argv[1:] if argv is None else argv))
    setup_logging(args.verbosity + args.more, args.quiet, args.log_file)
    func: Handler = args.func
    as_json = bool(getattr(args, "json", False))
    before = {sig: signal.getsignal(sig) for sig in _STOPPING}
    _received.clear()
    unraisable, sys.unraisablehook = sys.unraisablehook, _unraisable
    try:
        for sig in _STOPPING:  # from here a signal is an exception: an apply rolls back
            signal.signal(sig, _raise_interrupted)
        return func(args)
    except BrokenPipeError:
        # The reader went away (``applier show --json | head``): not an error of ours.
        # Point stdout at /dev/null so the interpreter's final flush does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except (Exception, KeyboardInterrupt) as exc:
        if _received and not isinstance(exc, KeyboardInterrupt) and exit_code(exc) is None:
            # The signal's exception was turned into another one on its way up (an import
            # in C that it interrupted raises ImportError): it is still an interruption. An
            # error of applier's own (a rollback that failed after the interruption) says
            # more and keeps its exit code.
            exc = Interrupted(_received[0])
        code = exit_code(exc)
        if code is None or args.debug:
            traceback.print_exc()
        if isinstance(exc, KeyboardInterrupt):
            name = signal.Signals(exc.signum).name if isinstance(exc, Interrupted) else "SIGINT"
            message = f"interrupted ({name})"
        elif code is None:
            message = f"internal error: {exc!r} (a bug; please report it)"
        else:
            message = f"error: {exc}"
        code = EXIT_INTERNAL if code is None else code
        if as_json:
            _error_json(exc, code)
        print(f"applier: {message}", file=sys.stderr)
        return code
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
        sys.unraisablehook = unraisable


if __name__ == "__main__":
    sys.exit(main())

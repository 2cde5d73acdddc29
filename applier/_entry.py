"""The ``applier`` command's entry point: it sets quiet handlers for SIGINT, SIGTERM and
SIGHUP before it imports anything else, so a Ctrl-C while the command starts ends it with
one line and 128 + the signal, never a traceback (``applier.cli.main`` then replaces them
with handlers that roll an apply back first)."""

import os
import sys

try:  # the C module itself: signal.py builds its enums on import (3 ms of a 30 ms --version)
    import _signal as _sig  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - a Python without it
    import signal as _sig


def _exit_now(signum: int, frame: object) -> None:  # pragma: no cover - timing dependent
    os.write(2, b"applier: interrupted\n")
    os._exit(128 + signum)


def main() -> int:
    for sig in (_sig.SIGINT, _sig.SIGTERM, _sig.SIGHUP):
        _sig.signal(sig, _exit_now)
    if sys.argv[1:] == ["--version"]:  # answered without loading the command line
        from applier import __version__  # noqa: PLC0415

        print(f"applier {__version__}")
        return 0
    from applier.remote import apply_in_holder  # noqa: PLC0415 - after the handlers, on purpose

    served = apply_in_holder(sys.argv[1:])  # a tracked target's holder runs the apply
    if served is not None:
        return served
    from applier.cli import main as cli_main  # noqa: PLC0415

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())

"""The error root of the ``applier`` package, and the one table that maps every error which can
reach the command line to its documented exit code (``docs/cli.md``, "Exit codes").

The codes:

====  =====================================================================
0     success (``diff``: the process equals the image)
1     ``diff`` only: the process differs from the image
2     usage error (bad command line; an output directory not empty or not creatable)
3     bad image: malformed, truncated or inconsistent image directory
4     the image does not match the target process (executable, layout, threads)
5     target process problem: no such process, permission denied, exited
6     apply failed and the target was rolled back to its state before the apply
7     apply failed and rolling back failed too (the target may be inconsistent)
8     verification after apply found a difference (the target was rolled back unless
      --no-undo)
9     ``call``: the called function crashed (a signal); the process was put back to its state
      just before the call
10    ``call``: the called function did not return within ``--timeout``; the process was put
      back to its state just before the call
70    internal error (a bug: run with ``--debug`` for the traceback)
129   SIGHUP, 130 SIGINT (Ctrl-C), 143 SIGTERM: interrupted; an apply in progress is rolled
      back first
====  =====================================================================
"""

from __future__ import annotations

from formats.errors import ImageError
from injector.errors import InjectorError

__all__ = [
    "EXIT_BAD_IMAGE",
    "EXIT_CALL_CRASHED",
    "EXIT_CALL_TIMEOUT",
    "EXIT_DIFFERENT",
    "EXIT_INTERNAL",
    "EXIT_INTERRUPTED",
    "EXIT_MISMATCH",
    "EXIT_OK",
    "EXIT_ROLLBACK_FAILED",
    "EXIT_ROLLED_BACK",
    "EXIT_TARGET",
    "EXIT_USAGE",
    "EXIT_VERIFY",
    "ApplierError",
    "ApplyFailed",
    "CallCrashed",
    "CallTimedOut",
    "Interrupted",
    "MismatchError",
    "OutputDirError",
    "RollbackFailed",
    "TargetBusy",
    "TargetGone",
    "UsageError",
    "VerifyFailed",
    "exit_code",
]

EXIT_OK = 0
EXIT_DIFFERENT = 1
EXIT_USAGE = 2
EXIT_BAD_IMAGE = 3
EXIT_MISMATCH = 4
EXIT_TARGET = 5
EXIT_ROLLED_BACK = 6
EXIT_ROLLBACK_FAILED = 7
EXIT_VERIFY = 8
EXIT_CALL_CRASHED = 9
EXIT_CALL_TIMEOUT = 10
EXIT_INTERNAL = 70  # EX_SOFTWARE (sysexits.h): 1 is diff(1)'s "different"
EXIT_INTERRUPTED = 130


class ApplierError(Exception):
    """Root of the errors raised while planning or executing an apply."""


class UsageError(ApplierError):
    """A request that cannot be carried out as given (a bad option value, a missing file)."""


class MismatchError(ApplierError):
    """The image does not belong to the target process (or cannot be applied to its layout)."""


class ApplyFailed(ApplierError):
    """A step failed; the target was put back as it was before the apply."""


class RollbackFailed(ApplierError):
    """A step failed and putting the target back failed too."""


class VerifyFailed(ApplierError):
    """Reading back after the apply found memory different from the image."""


class CallCrashed(ApplierError):
    """``applier call``: the function was killed by a signal; the process was put back to
    its state just before the call."""


class CallTimedOut(ApplierError):
    """``applier call``: the function did not return in time; the process was put back to
    its state just before the call."""


class OutputDirError(UsageError):
    """An output directory (dump, --undo) that is not empty or cannot be created."""


class Interrupted(KeyboardInterrupt):
    """A signal asked applier to stop (SIGINT, SIGTERM, SIGHUP): what was being applied is
    rolled back first; the exit code is 128 + the signal number, as a shell reports it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class TargetBusy(ApplierError):
    """Another applier holds a claim on the target (``applier.lock``)."""


class TargetGone(ApplierError):
    """The target exited (or was killed) during the apply: there is nothing left to roll back."""


# The one mapping from error classes to exit codes. Looked up along the class's MRO, so a
# subclass maps like its nearest listed base; the root ApplierError is an internal error.
_EXIT_CODES: dict[type[BaseException], int] = {
    ImageError: EXIT_BAD_IMAGE,
    InjectorError: EXIT_TARGET,
    UsageError: EXIT_USAGE,
    MismatchError: EXIT_MISMATCH,
    TargetBusy: EXIT_TARGET,
    TargetGone: EXIT_TARGET,
    ApplyFailed: EXIT_ROLLED_BACK,
    RollbackFailed: EXIT_ROLLBACK_FAILED,
    VerifyFailed: EXIT_VERIFY,
    CallCrashed: EXIT_CALL_CRASHED,
    CallTimedOut: EXIT_CALL_TIMEOUT,
    KeyboardInterrupt: EXIT_INTERRUPTED,
}


def exit_code(exc: BaseException) -> int | None:
    """The documented exit code of ``exc``; None for an error that is not one of ours (a bug)."""
    if isinstance(exc, Interrupted):
        return 128 + exc.signum
    for cls in type(exc).__mro__:
        if cls in _EXIT_CODES:
            return _EXIT_CODES[cls]
    return None

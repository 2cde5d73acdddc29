"""The error root of the ``applier`` package; each error knows the CLI exit code it maps to."""

from __future__ import annotations

__all__ = [
    "ApplierError",
    "ApplyFailed",
    "MismatchError",
    "OutputDirError",
    "RollbackFailed",
    "TargetGone",
    "VerifyFailed",
]


class ApplierError(Exception):
    """Root of the errors raised while planning or executing an apply."""

    exit_code = 1


class MismatchError(ApplierError):
    """The image does not belong to the target process (or cannot be applied to its layout)."""

    exit_code = 4


class ApplyFailed(ApplierError):
    """A step failed; the target was put back as it was before the apply."""

    exit_code = 6


class RollbackFailed(ApplierError):
    """A step failed and putting the target back failed too."""

    exit_code = 7


class VerifyFailed(ApplierError):
    """Reading back after the apply found memory different from the image."""

    exit_code = 8


class OutputDirError(ApplierError):
    """An output directory (dump, --undo) that is not empty or cannot be created."""

    exit_code = 2


class TargetGone(ApplierError):
    """The target exited (or was killed) during the apply: there is nothing left to roll back."""

    exit_code = 5

"""The one error root of the ``formats`` package.

Every problem with an image directory (wrong magic, truncated entry, inconsistent pagemap, ...)
is raised as an :class:`ImageError` that names the file and the byte offset or entry index, so
the CLI can print it on one line.
"""

from __future__ import annotations

import os

__all__ = ["ImageError"]


class ImageError(ValueError):
    """A CRIU image (or image directory) is malformed or inconsistent.

    ``path`` is the file at fault; ``offset`` the byte offset inside it where known;
    ``entry`` the entry index where that is the better locator.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        message: str,
        *,
        offset: int | None = None,
        entry: int | None = None,
    ) -> None:
        self.path = os.fspath(path)
        self.message = message
        self.offset = offset
        self.entry = entry
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.path
        if self.offset is not None:
            where += f" at byte {self.offset}"
        if self.entry is not None:
            where += f" (entry {self.entry})"
        return f"{where}: {self.message}"

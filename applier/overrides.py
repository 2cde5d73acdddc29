"""The refusals of an apply a caller may lift (``applier.trust``, the executor's code check);
kept apart from ``applier.api`` so the command line can build them without importing it."""

from __future__ import annotations

import attrs

__all__ = ["Overrides"]


@attrs.frozen(kw_only=True)
class Overrides:
    """The refusals a caller may lift (each a CLI option of the same name)."""

    other_process: bool = False  # the image is of another process (a replica)
    write_code: bool = False  # write code pages that differ from the mapped file
    trust_image: bool = False  # an image (or undo) directory others could have written
    force: bool = False  # pid 1, applier itself or one of its ancestors


NONE = Overrides()  # nothing lifted: the default

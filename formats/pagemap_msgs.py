"""``pagemap-*.img`` messages and flag bits (CRIU images/pagemap.proto, criu/include/pagemap.h).

Field names follow CRIU 4.2: field 2 is ``compat_nr_pages`` (the only count before 4.2, written
as 0 by 4.2) and field 5 is ``nr_pages``.  Their meaning is applied in :mod:`formats.pagemap`.
"""

# Message fields are attrs field specifiers made by formats.pb, not mutable defaults:

from __future__ import annotations

import attrs

from formats.pb import Kind, Message, optional, required

__all__ = ["PE_FLAGS", "PE_LAZY", "PE_PARENT", "PE_PRESENT", "PagemapEntry", "PagemapHead"]

PE_PARENT = 0x1  # pages are in the parent snapshot
PE_LAZY = 0x2  # may be restored on demand
PE_PRESENT = 0x4  # pages are in this directory's pages file
PE_FLAGS = {PE_PARENT: "PE_PARENT", PE_LAZY: "PE_LAZY", PE_PRESENT: "PE_PRESENT"}


@attrs.define(kw_only=True)
class PagemapHead(Message):
    """pagemap_head: names the pages file, ``pages-<pages_id>.img``."""

    pages_id: int = required(1, Kind.UINT32)


@attrs.define(kw_only=True)
class PagemapEntry(Message):
    """pagemap_entry: a run of pages starting at ``vaddr`` (raw; see formats.pagemap)."""

    vaddr: int = required(1, Kind.UINT64)
    compat_nr_pages: int = required(2, Kind.UINT32)
    in_parent: bool | None = optional(3, Kind.BOOL)
    flags: int | None = optional(4, Kind.UINT32)
    nr_pages: int | None = optional(5, Kind.UINT64)

"""The parts of a process an apply can restore
(``--restore memory,layout,brk,regs,fds,signals``)."""

from __future__ import annotations

import enum
from collections.abc import Iterable

__all__ = ["Part"]


class Part(enum.Flag):
    """What an apply restores; ``Part.ALL`` by default. Combine with ``|``."""

    MEMORY = enum.auto()  # page contents
    LAYOUT = enum.auto()  # mappings, protections and the mm fields (PR_SET_MM_MAP)
    BRK = enum.auto()  # the program break
    REGS = enum.auto()  # every thread's registers
    FDS = enum.auto()  # the descriptor table: close new ones, reopen files, positions, flags
    SIGNALS = enum.auto()  # signal dispositions and every thread's blocked mask
    ALL = MEMORY | LAYOUT | BRK | REGS | FDS | SIGNALS

    @classmethod
    def parse(cls, text: str | None) -> Part:
        """``"memory,layout"`` -> ``Part.MEMORY | Part.LAYOUT``; None, "" or "all" -> ALL."""
        if text is None or text.strip() in ("", "all"):
            return cls.ALL
        return cls.of(p.strip() for p in text.split(",") if p.strip())

    @classmethod
    def of(cls, parts: Part | Iterable[str]) -> Part:
        """A Part from itself or from part names (``["memory", "regs"]``); unknown names raise
        ValueError naming the first one."""
        if isinstance(parts, Part):
            return parts
        out = cls(0)
        for name in parts:
            try:
                out |= cls[name.upper()]
            except KeyError:
                raise ValueError(
                    f"unknown part {name!r} (choose from {', '.join(cls.names())})"
                ) from None
        return out

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The part names, in the order an apply handles them."""
        return tuple(str(p.name).lower() for p in cls if p is not cls.ALL)

    def labels(self) -> tuple[str, ...]:
        """The names of the parts in this set, e.g. ``("memory", "regs")``."""
        return tuple(name for name in Part.names() if Part[name.upper()] in self)

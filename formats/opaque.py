"""Images read only to be kept exact: nothing is modelled, every field stays an unknown field
and is written back byte for byte (``stats-*``, ``seccomp.img``, ``timens-*.img``)."""

from __future__ import annotations

import attrs

from formats.pb import Message

__all__ = ["SeccompEntry", "StatsEntry", "TimensEntry"]


@attrs.define(kw_only=True)
class StatsEntry(Message):
    """stats_entry (service magic): dump/restore counters, kept opaque."""


@attrs.define(kw_only=True)
class SeccompEntry(Message):
    """seccomp_entry: seccomp filters, kept opaque."""


@attrs.define(kw_only=True)
class TimensEntry(Message):
    """timens_entry: time-namespace offsets, kept opaque."""

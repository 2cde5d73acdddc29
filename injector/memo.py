"""Memos that keep what a computation made from the same inputs, between one apply and the
next (parsed /proc lines and descriptors, image registers, who shares a file), bounded
without bookkeeping: a memo that reaches its limit is emptied and fills again."""

from __future__ import annotations

from typing import TypeVar

__all__ = ["remember"]

K = TypeVar("K")
V = TypeVar("V")


def remember(memo: dict[K, V], key: K, value: V, limit: int) -> V:
    """Store ``value`` under ``key`` in ``memo`` (emptied first once it holds ``limit``
    entries); returns ``value``."""
    if len(memo) >= limit:
        memo.clear()
    memo[key] = value
    return value

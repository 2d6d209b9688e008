"""Consistency levels and quorum arithmetic (pure).

A level is ONE, QUORUM, ALL, or an explicit count; it resolves against the request's replication
factor n. Errors name the field ("r", "w", "n") and the limit.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

from kvstore.errors import InvalidArgument


class Named(enum.IntEnum):
    DEFAULT = 0
    ONE = 1
    QUORUM = 2
    ALL = 3


@dataclass(frozen=True)
class Level:
    named: Named = Named.DEFAULT
    count: int = 0

    @classmethod
    def parse(cls, text: str | int | "Level" | None) -> "Level":
        """'one', 'quorum', 'all', 'default' or an integer (as used by the CLI and client)."""
        if text is None:
            return cls()
        if isinstance(text, Level):
            return text
        if isinstance(text, int):
            return cls(count=text)
        if text.isdigit():
            return cls(count=int(text))
        try:
            return cls(Named[text.upper()])
        except KeyError:
            raise InvalidArgument(
                f"consistency level {text!r} is not one of one, quorum, all, or a number"
            ) from None


def quorum(n: int) -> int:
    return n // 2 + 1


def required(field: str, level: Level, n: int, default: Named = Named.QUORUM) -> int:
    """How many replica acknowledgements `level` needs at replication factor n."""
    if level.count:
        if level.count > n:
            raise InvalidArgument(f"{field}: {level.count} exceeds the replication factor n={n}")
        return level.count
    named = default if level.named == Named.DEFAULT else level.named
    if named == Named.ONE:
        return 1
    if named == Named.QUORUM:
        return quorum(n)
    if named == Named.ALL:
        return n
    raise InvalidArgument(f"{field}: unknown consistency level {int(level.named)}")


def resolve_n(requested: int, cluster_n: int, max_n: int = 16) -> int:
    if requested == 0:
        return cluster_n
    if not 1 <= requested <= max_n:
        raise InvalidArgument(f"n: {requested} is outside 1..{max_n}")
    return requested

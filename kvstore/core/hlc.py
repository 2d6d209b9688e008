"""Hybrid logical clock (pure): wall time comes in as an argument.

A timestamp is one uint64: (physical milliseconds << 16) | logical counter. It orders events
causally across nodes while staying close to wall time, which the default sibling resolver uses
("latest wins" among concurrent siblings).
"""
from __future__ import annotations

LOGICAL_BITS = 16
LOGICAL_MASK = (1 << LOGICAL_BITS) - 1

#: How far ahead of this node's wall clock a received timestamp may be and still be followed. A
#: node whose clock runs fast by more than this (or a forged sibling with an absurd timestamp)
#: would otherwise drag every clock it reaches into the future for good; such a timestamp is
#: ignored, and that node's writes then order by wall time alone.
MAX_DRIFT_MS = 60_000


def pack(physical_ms: int, logical: int) -> int:
    return (physical_ms << LOGICAL_BITS) | logical


def physical_ms(ts: int) -> int:
    return ts >> LOGICAL_BITS


class HybridClock:
    """One node's HLC. `now(wall_ms)` for local events, `observe(remote, wall_ms)` on receipt."""

    def __init__(self, last: int = 0) -> None:
        self.last = last
        self.ignored = 0  # received timestamps beyond MAX_DRIFT_MS, not followed

    def now(self, wall_ms: int) -> int:
        return self._advance(wall_ms)

    def _advance(self, wall_ms: int) -> int:
        phys, logical = physical_ms(self.last), self.last & LOGICAL_MASK
        if wall_ms > phys:
            self.last = pack(wall_ms, 0)
        elif logical < LOGICAL_MASK:
            self.last = pack(phys, logical + 1)
        else:  # logical overflow: borrow a millisecond rather than repeat a timestamp
            self.last = pack(phys + 1, 0)
        return self.last

    def now_many(self, wall_ms: int, count: int) -> list[int]:
        """`count` successive timestamps, as from `now` called that many times."""
        return [self._advance(wall_ms) for _ in range(count)]

    def observe(self, remote: int, wall_ms: int) -> int:
        """Take a received timestamp into account: every later local event orders after it."""
        if physical_ms(remote) > wall_ms + MAX_DRIFT_MS:
            self.ignored += 1
        elif remote > self.last:
            self.last = remote
        return self._advance(wall_ms)

"""Causal versions (pure): dotted version vectors, sibling merge, contexts.

Each stored version (a sibling) carries a *dot* -- (node id, counter), the event that wrote it --
and the version vector the writer had seen (its causal context). A sibling is obsolete when another
sibling's context covers its dot. Concurrent writes therefore survive as siblings, and a write made
with a context supersedes exactly what that context saw, even when two writes go through the same
coordinator concurrently (each gets its own dot). Coordinators ship the whole merged sibling set to
replicas, so any replica holding a dot also holds every sibling that dot's writer had not covered.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

from kvstore.errors import ResourceExhausted

VersionVector = Mapping[str, int]

#: counters travel as msgpack unsigned 64-bit integers
MAX_COUNTER = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class Sibling:
    node: str               # dot: the coordinator that stamped this write
    counter: int            # dot: that coordinator's per-key event counter
    vv: VersionVector = field(default_factory=dict)  # the causal context the writer supplied
    value: bytes | None = None  # None marks a tombstone (a delete)
    hlc: int = 0            # hybrid logical clock at stamping, for "latest wins" resolvers
    expires_at_ms: int = 0  # 0 = never; an expired sibling reads as absent

    @property
    def dot(self) -> tuple[str, int]:
        return (self.node, self.counter)

    @property
    def tombstone(self) -> bool:
        return self.value is None

    def live(self, now_ms: int) -> bool:
        return self.value is not None and (self.expires_at_ms == 0 or self.expires_at_ms > now_ms)

    def clock(self) -> dict[str, int]:
        """The full vector clock of this version: its context joined with its own dot."""
        clock = dict(self.vv)
        if clock.get(self.node, 0) < self.counter:
            clock[self.node] = self.counter
        return clock


def covers(vv: VersionVector, node: str, counter: int) -> bool:
    return vv.get(node, 0) >= counter


def join(vvs: Iterable[VersionVector]) -> dict[str, int]:
    """Pointwise maximum of version vectors."""
    out: dict[str, int] = {}
    for vv in vvs:
        for node, counter in vv.items():
            if counter > out.get(node, 0):
                out[node] = counter
    return out


class Order(enum.Enum):
    EQUAL = "equal"
    BEFORE = "before"        # a happened before b
    AFTER = "after"          # b happened before a
    CONCURRENT = "concurrent"


def compare(a: VersionVector, b: VersionVector) -> Order:
    """Causal order of two vector clocks."""
    a_le_b = all(c <= b.get(n, 0) for n, c in a.items())
    b_le_a = all(c <= a.get(n, 0) for n, c in b.items())
    if a_le_b and b_le_a:
        return Order.EQUAL
    if a_le_b:
        return Order.BEFORE
    if b_le_a:
        return Order.AFTER
    return Order.CONCURRENT


def _sort_key(s: Sibling) -> tuple[int, str, int]:
    return (s.hlc, s.node, s.counter)


def merge(*sets: Sequence[Sibling]) -> list[Sibling]:
    """Union of sibling sets minus obsolete siblings; commutative, associative, idempotent.

    A dot identifies one write, so equal dots are the same sibling. A sibling survives unless some
    sibling's context covers its dot. The result is in a canonical order (hlc, node, counter).
    """
    if len(sets) == 2 and len(sets[1]) == 1:
        # The usual write: one new version whose context covers everything held (what a
        # coordinator stamps, what a replica receives). It alone survives; no join needed.
        new = sets[1][0]
        vv = new.vv
        if vv.get(new.node, 0) < new.counter:
            for s in sets[0]:
                if vv.get(s.node, 0) < s.counter or s.vv.get(new.node, 0) >= new.counter:
                    break  # something held is concurrent with it, or already covers it
            else:
                return [new]
    by_dot: dict[tuple[str, int], Sibling] = {}
    for siblings in sets:
        for s in siblings:
            by_dot.setdefault(s.dot, s)
    candidates = list(by_dot.values())
    context = join(s.vv for s in candidates)
    survivors = [s for s in candidates if not covers(context, s.node, s.counter)]
    survivors.sort(key=_sort_key)
    return survivors


def context_of(siblings: Iterable[Sibling]) -> dict[str, int]:
    """The causal context a reader gets: everything these siblings saw, plus themselves."""
    return join(s.clock() for s in siblings)


def next_counter(local: Sequence[Sibling], node: str, context: VersionVector, floor: int = 0) -> int:
    """A counter for a new write by `node`, above every event of `node` known for this key, and
    at least `floor`. The coordinator passes its clock in ms as the floor: what it knows of a
    key can be gone (tombstones purged, ranges cleaned up and back, a replica restored), and a
    counter derived from the local copy alone would then reuse a dot that an old tombstone's
    vector still covers, silently deleting the new write on every replica that meets it."""
    known = context.get(node, 0)
    for s in local:
        known = max(known, s.vv.get(node, 0), s.counter if s.node == node else 0)
    if known >= MAX_COUNTER:  # only a forged replica write gets here: clients' contexts stay < 2^53
        raise ResourceExhausted(f"the version counter of node {node} on this key is at its limit of 2^64-1")
    return max(known + 1, floor)


def stamp(
    local: Sequence[Sibling],
    node: str,
    context: VersionVector,
    value: bytes | None,
    hlc: int,
    expires_at_ms: int = 0,
    counter_floor: int = 0,
) -> tuple[Sibling, list[Sibling]]:
    """A new write through coordinator `node`: returns (the new sibling, the merged set to store).

    `local` must be the coordinator's current siblings for the key, read in the same serial step
    that stores the result, so two concurrent writes can never share a dot.
    """
    new = Sibling(node, next_counter(local, node, context, counter_floor), dict(context), value, hlc, expires_at_ms)
    return new, merge(local, [new])


def is_current(local: Sequence[Sibling], context: VersionVector, now_ms: int) -> bool:
    """True when `context` covers every live sibling (the conditional-put test)."""
    return all(covers(context, s.node, s.counter) for s in local if s.live(now_ms))


def dominated_by(siblings: Sequence[Sibling], other: Sequence[Sibling]) -> bool:
    """True when merging `other` into `siblings` changes nothing, i.e. `other` adds no news.
    Used by read repair: a replica whose set is dominated needs the merged set."""
    return {s.dot for s in merge(siblings, other)} == {s.dot for s in siblings}


def prune(vv: VersionVector, members: set[str], max_entries: int) -> dict[str, int]:
    """Bound a version vector's size: when it has more than `max_entries` entries, drop those of
    nodes that are no longer members (they can never coordinate again). Like Riak's clock
    pruning, the cost of pruning is at worst a spurious sibling (an old write from a pruned node
    held by a stale replica looks concurrent again), never a lost write."""
    if len(vv) <= max_entries:
        return dict(vv)
    return {node: counter for node, counter in vv.items() if node in members}


def resolve_latest(siblings: Sequence[Sibling]) -> Sibling | None:
    """The default resolver: the sibling with the highest HLC (ties by node, counter)."""
    return max(siblings, key=_sort_key) if siblings else None

"""Key listing (pure): which nodes cover which token ranges, and merging their sorted pages.

A listing walks the key space in byte order, one page per client call, with the last key (or the
position reached) as the cursor for the next. Keys are hashed onto the ring, so every node holds a
scattered part of any key range: the coordinator asks a set of nodes that covers every token range
(`plan`, as Riak's coverage queries), each for its live keys in its assigned ranges after the
cursor, and merges their pages (`merge`). A node answers at most a page of keys and tells how far it
got (`Page.upto`), so a page never waits on a node's whole store. Ranges with no replica up cannot
be listed: the listing goes on without them and says so (partial), where Riak's list-keys returned
a partial set and then timed out (LESSONS.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

Range = tuple[int, int]  # (start_exclusive, end_inclusive) tokens, as Ring.ranges()


@dataclass(frozen=True)
class Page:
    """One node's answer: its live keys in its ranges, after the cursor, in byte order. It holds
    every such key up to and including `upto`; `upto` None means through the end of the listing."""

    keys: list[bytes]
    upto: bytes | None


@dataclass(frozen=True)
class Plan:
    assigned: dict[str, list[Range]]   # node id -> the ranges it lists
    missing: list[Range]               # ranges with no replica up: not listed


def plan(ranges: Iterable[tuple[Range, Sequence[str]]], up: set[str], me: str, copies: int = 1) -> Plan:
    """Each range to `copies` of its up replicas (fewer when fewer are up), preferring this node
    (no RPC) and then the nodes already asked, so that few nodes are asked. `ranges` pairs each
    range with its replicas in preference order."""
    assigned: dict[str, list[Range]] = {}
    missing: list[Range] = []
    for rng, replicas in ranges:
        live = [r for r in replicas if r in up]
        if not live:
            missing.append(rng)
            continue
        live.sort(key=lambda r: (r != me, -len(assigned.get(r, ())), r))
        for node_id in live[:copies]:
            assigned.setdefault(node_id, []).append(rng)
    return Plan(assigned, missing)


def merge(pages: Sequence[Page], limit: int) -> tuple[list[bytes], bytes | None]:
    """The listing's next keys from every node's page: (keys, cursor). Only keys that every page
    has reached are certain (a node that stopped early may hold smaller ones), so the merge stops
    at the least `upto`; duplicates (the same key from several replicas) appear once. `cursor` is
    where the next page starts after (the last key returned, or the position every node reached),
    None when the listing is complete."""
    reached = [p.upto for p in pages if p.upto is not None]
    frontier = min(reached) if reached else None
    keys = sorted({k for p in pages for k in p.keys if frontier is None or k <= frontier})
    if len(keys) > limit:
        keys = keys[:limit]
        return keys, keys[-1]
    return keys, frontier


def prefix_end(prefix: bytes) -> bytes | None:
    """The least key greater than every key starting with `prefix`; None when there is none (an
    empty prefix, or one of only 0xff bytes)."""
    trimmed = prefix.rstrip(b"\xff")
    if not trimmed:
        return None
    return trimmed[:-1] + bytes([trimmed[-1] + 1])

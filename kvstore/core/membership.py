"""The membership table and its merge rules (pure). Gossip carries these states between nodes.

Per node: address, zone, generation (process start), heartbeat counter, status and tokens. A state
supersedes another of the same node when its (generation, heartbeat) is higher, so a restarted node
(new generation) replaces its old self, and a removed node cannot come back through stale gossip
(its removal is gossiped with a higher version than anything it had).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping

from kvstore.core.ring import Ring, RingNode

_U64 = (1 << 64) - 1


class Status(enum.Enum):
    JOINING = "joining"
    NORMAL = "normal"
    LEAVING = "leaving"
    LEFT = "left"
    REMOVED = "removed"


#: statuses whose tokens are part of the ring that places keys
RING_STATUSES = frozenset({Status.NORMAL, Status.LEAVING})


@dataclass(frozen=True)
class NodeState:
    node_id: str
    address: str
    generation: int            # process start (ms since epoch); a restart increases it
    heartbeat: int = 0         # incremented by the node itself every gossip round
    status: Status = Status.NORMAL
    tokens: tuple[int, ...] = ()
    zone: str = ""
    app: Mapping[str, Any] = field(default_factory=dict)  # small facts: load, version

    @property
    def version(self) -> tuple[int, int]:
        return (self.generation, self.heartbeat)

    def beat(self) -> "NodeState":
        return replace(self, heartbeat=self.heartbeat + 1)

    def to_wire(self) -> list:
        return [self.node_id, self.address, self.generation, self.heartbeat, self.status.value,
                list(self.tokens), self.zone, dict(self.app)]

    @classmethod
    def from_wire(cls, item: Any) -> "NodeState":
        """Decode a gossiped state; raises ValueError naming the bad field."""
        if not isinstance(item, list) or len(item) != 8:
            raise ValueError("node state must be an 8-element array")
        node_id, address, gen, hb, status, tokens, zone, app = item
        if not isinstance(node_id, str) or not 0 < len(node_id) <= 128:
            raise ValueError("node_id must be a string of 1..128 characters")
        if not isinstance(address, str) or not 0 < len(address) <= 256:
            raise ValueError("address must be a string of 1..256 characters")
        for name, v in (("generation", gen), ("heartbeat", hb)):
            if not isinstance(v, int) or not 0 <= v <= _U64:
                raise ValueError(f"{name} must be in 0..2^64-1")
        if not isinstance(tokens, list) or len(tokens) > 4096 or not all(
            isinstance(t, int) and 0 <= t <= _U64 for t in tokens
        ):
            raise ValueError("tokens must be at most 4096 integers in 0..2^64-1")
        if not isinstance(zone, str) or len(zone) > 128 or not isinstance(app, dict):
            raise ValueError("zone must be a short string and app a map")
        try:
            st = Status(status)
        except ValueError:
            raise ValueError(f"status {str(status)[:20]!r} is unknown") from None
        return cls(node_id, address, gen, hb, st, tuple(tokens), zone, app)


Table = Mapping[str, NodeState]


def newer(incoming: NodeState, current: NodeState | None) -> bool:
    if current is None:
        return True
    if current.status == Status.REMOVED and incoming.generation <= current.generation:
        return False  # a removed node stays removed unless it truly restarts as new
    return incoming.version > current.version


def merge(table: Table, incoming: Iterable[NodeState], self_id: str = "") -> tuple[dict[str, NodeState], list[str]]:
    """Merge gossiped states into a table: returns (new table, ids whose state changed).
    The local node's own entry is never taken from others (it is authoritative for itself)."""
    out = dict(table)
    changed = []
    for state in incoming:
        if state.node_id == self_id:
            continue
        if newer(state, out.get(state.node_id)):
            out[state.node_id] = state
            changed.append(state.node_id)
    return out, changed


def ring_of(table: Table) -> Ring:
    """The ring this table defines: nodes in ring statuses with their tokens."""
    return Ring(
        RingNode(s.node_id, s.address, s.zone, s.tokens)
        for s in table.values()
        if s.status in RING_STATUSES and s.tokens
    )

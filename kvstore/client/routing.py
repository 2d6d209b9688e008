"""Token-aware routing for clients (pure): which node to send a key's request to."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

from kvstore.core.ring import Ring, RingNode


@dataclass
class Topology:
    ring: Ring
    addresses: dict[str, str]          # node id -> address
    up: set[str] = field(default_factory=set)
    n: int = 3

    @classmethod
    def from_nodes(cls, nodes: Iterable[tuple[str, str, str, tuple[int, ...], bool]], n: int) -> "Topology":
        nodes = list(nodes)
        ring = Ring(RingNode(nid, addr, zone, tokens) for nid, addr, zone, tokens, _ in nodes)
        return cls(ring, {nid: addr for nid, addr, *_ in nodes}, {nid for nid, *_, up in nodes if up}, n)

    def coordinator(self, key: bytes, n: int | None = None, avoid: set[str] = frozenset(),
                    order: Mapping[str, int] | None = None) -> str | None:
        """Address of a live, non-avoided node of the key's preference list. With a session
        `order` (address -> rank), the one ranked first, so a session's calls concentrate on few
        coordinators and share batches: with N=3 on 3 nodes all go to its first node, on 5
        nodes 3/5 go to the first and most of the rest to the second. Without one, the first in
        preference order."""
        if len(self.ring) == 0:
            return None
        best, best_rank = None, 0
        for node_id in self.ring.replicas_of(key, n or self.n):
            addr = self.addresses.get(node_id)
            if addr is None or node_id not in self.up or addr in avoid:
                continue
            if order is None:
                return addr
            rank = order.get(addr, len(order))
            if best is None or rank < best_rank:
                best, best_rank = addr, rank
        return best

"""Token-aware routing for clients (pure): which node to send a key's request to."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

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
                     home: str | None = None) -> str | None:
        """Address of a live, non-avoided node of the key's preference list: `home` when it is
        one (so a session's calls share batches), else the first such node."""
        if len(self.ring) == 0:
            return None
        pref = self.ring.replicas_of(key, n or self.n)
        if home is not None and home not in avoid:
            for node_id in pref:
                if self.addresses.get(node_id) == home and node_id in self.up:
                    return home
        for node_id in pref:
            addr = self.addresses.get(node_id)
            if node_id in self.up and addr not in avoid and addr is not None:
                return addr
        return None

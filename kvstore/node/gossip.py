"""Gossip membership on a node: keeps the membership table, exchanges it with peers, and tells
the coordinator who is up. Merge rules live in kvstore/core/membership.py (pure)."""
from __future__ import annotations

import logging
import random
from typing import Any, Callable

import trio

from kvstore.core.membership import NodeState, Status, merge, ring_of
from kvstore.core.ring import Ring
from kvstore.errors import KvError

log = logging.getLogger(__name__)


class Gossip:
    def __init__(
        self,
        me: NodeState,
        seeds: tuple[str, ...],
        interval_s: float,
        call: Callable[..., Any],
        rng: random.Random,
    ) -> None:
        self.me = me
        self.table: dict[str, NodeState] = {me.node_id: me}
        self.seeds = tuple(s for s in seeds if s != me.address)
        self.interval_s = interval_s
        self.call = call                 # async (address, kind, body, timeout_s) -> body
        self.rng = rng
        self.last_advance: dict[str, float] = {}   # node id -> trio time its heartbeat last rose
        self.changed = trio.Event()
        self.rounds = 0
        self._ring: Ring = ring_of(self.table)

    @property
    def down_after_s(self) -> float:
        return max(1.0, 8 * self.interval_s)

    def ring(self) -> Ring:
        return self._ring

    def set_me(self, me: NodeState) -> None:
        self.me = me
        self.table[me.node_id] = me
        self._refresh()

    def is_up(self, node_id: str) -> bool:
        if node_id == self.me.node_id:
            return True
        seen = self.last_advance.get(node_id)
        return seen is not None and trio.current_time() - seen < self.down_after_s

    def states(self) -> list[list]:
        return [s.to_wire() for s in self.table.values()]

    def receive(self, wire_states: Any) -> None:
        if not isinstance(wire_states, list) or len(wire_states) > 10_000:
            raise ValueError("gossip: states must be an array of at most 10000 entries")
        incoming = [NodeState.from_wire(w) for w in wire_states]
        self.table, changed = merge(self.table, incoming, self.me.node_id)
        now = trio.current_time()
        for node_id in changed:
            self.last_advance[node_id] = now
        if changed:
            self._refresh()

    def _refresh(self) -> None:
        ring = ring_of(self.table)
        if ring.digest() != self._ring.digest():
            self._ring = ring
            log.info("ring changed: %d nodes, digest %s", len(ring), ring.digest()[:12])
        self.changed.set()
        self.changed = trio.Event()

    def _targets(self) -> list[str]:
        others = [s.address for s in self.table.values()
                  if s.node_id != self.me.node_id and s.status not in (Status.LEFT, Status.REMOVED)]
        return others

    async def round(self) -> None:
        self.set_me(self.me.beat())
        others = self._targets()
        targets = []
        if others:
            targets.append(self.rng.choice(others))
        if self.seeds and (not others or self.rng.random() < 0.1):
            targets.append(self.rng.choice(self.seeds))
        for address in dict.fromkeys(targets):
            try:
                reply = await self.call(address, "gossip", self.states(), max(self.interval_s * 2, 0.5))
                self.receive(reply)
            except (KvError, ValueError) as exc:
                log.debug("gossip with %s failed: %s", address, exc)
        self.rounds += 1

    async def run(self) -> None:
        while True:
            await self.round()
            await trio.sleep(self.interval_s)

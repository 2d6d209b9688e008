"""Gossip membership on a node: push-pull digest exchange with one peer per round, a phi-accrual
failure detector per peer, and the ring derived from the table. Merge rules, digests and the
detector are pure (kvstore/core/membership.py, kvstore/core/failure.py); this module does the I/O.

One round, as two unary calls:  A -> B  gossip-syn(digest(A))  ->  [states A needs, ids B needs]
                                 A -> B  gossip-ack(states B asked for)   (only when B asked)
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import replace
from typing import Any, Awaitable, Callable

import trio

from kvstore.core import membership as mb
from kvstore.core.failure import DetectorConfig, PhiAccrualDetector
from kvstore.core.membership import NodeState, Status
from kvstore.core.ring import Ring
from kvstore.errors import InvalidArgument, KvError

log = logging.getLogger(__name__)

#: (address, kind, body, timeout_s) -> reply body
CallFn = Callable[[str, str, Any, float], Awaitable[Any]]

DOWN_PROBE_PROBABILITY = 0.1   # memberlist/Cassandra: now and then talk to a node believed down
SEED_PROBABILITY = 0.1         # and to a seed, so partitions that share a seed heal
#: A node id this node has never seen enters its table only after a direct `ping` to the state's
#: address answers with that id: a relayed state naming a member that does not exist (forged, or
#: garbage from a broken peer) would otherwise take ranges of the ring and break routing. At most
#: MAX_CANDIDATES wait at once; one is dropped after CANDIDATE_TRIES unanswered rounds (gossip
#: offers it again if it is real).
MAX_CANDIDATES = 64
CANDIDATE_TRIES = 20
#: statuses that place (or will place) a node in the ring, and so need the check above
_VERIFIED_STATUSES = frozenset({Status.JOINING, Status.NORMAL, Status.LEAVING})


class Gossip:
    def __init__(
        self,
        me: NodeState,
        seeds: tuple[str, ...],
        interval_s: float,
        call: CallFn,
        rng: random.Random,
        phi_threshold: float = 8.0,
    ) -> None:
        self.me = me
        self.table: dict[str, NodeState] = {me.node_id: me}
        self.seeds = tuple(s for s in seeds if s != me.address)
        self.interval_s = interval_s
        self.call = call
        self.rng = rng
        self.detector = PhiAccrualDetector(DetectorConfig.for_interval(interval_s, threshold=phi_threshold))
        self.rounds = 0
        self.refused = 0
        self.removed_self = trio.Event()   # this node was removed by an operator: it must stop
        self.changed = trio.Event()
        self.on_change: Callable[[], None] | None = None  # called on trio after every merge or change of self
        self._ring_members = mb.ring_members(self.table)
        self._ring: Ring = Ring(self._ring_members)
        self._in_flight: set[str] = set()  # addresses with an exchange under way
        self._verifying = False            # a candidate check is under way
        self.candidates: dict[str, tuple[NodeState, int]] = {}  # unverified new members, tries

    # ---- what the node asks -----------------------------------------------------------

    def ring(self) -> Ring:
        return self._ring

    def is_up(self, node_id: str) -> bool:
        if node_id == self.me.node_id:
            return True
        return self.detector.is_available(node_id, trio.current_time())

    def phi(self, node_id: str) -> float:
        return 0.0 if node_id == self.me.node_id else self.detector.phi(node_id, trio.current_time())

    def set_me(self, me: NodeState) -> None:
        self.me = me
        self.table[me.node_id] = me
        self._refresh()

    def set_status(self, status: Status) -> None:
        self.set_me(mb.transition(self.me, status))

    # ---- receiving ------------------------------------------------------------------------

    def _merge(self, states: list[NodeState], verified: bool = False) -> None:
        if not verified:
            states = self._hold_new_members(states)
        res = mb.merge_states(self.table, states, self.me.node_id, int(time.time() * 1000))
        self.table = dict(res.table)
        now = trio.current_time()
        for node_id in res.changed:
            state = self.table[node_id]
            if state.status in (Status.REMOVED, Status.LEFT):
                self.detector.remove(node_id)
            else:
                self.detector.heartbeat(node_id, now, state.generation)
        for refusal in res.refused:
            self.refused += 1
            log.info("gossip: refused %s", refusal)
        about_self = res.about_self
        if about_self is not None:
            if about_self.status == Status.REMOVED:
                log.error("this node (%s) was removed from the cluster: stopping; rejoin only with a "
                          "wiped data directory", self.me.node_id)
                self.removed_self.set()
            else:
                # A state of this node that outranks its own: an old process, an id clash, or a
                # forged state. This node is authoritative for itself: it re-asserts its state in
                # a newer generation, which outranks the other everywhere within a few rounds.
                log.error("a state of this node (%s) outranks its own (generation %d, heartbeat %d, "
                          "from %s): re-asserting; if another process uses this id, stop one",
                          self.me.node_id, about_self.generation, about_self.heartbeat, about_self.address)
                generation = max(self.me.generation, about_self.generation) + 1
                self.set_me(replace(self.me, generation=generation, heartbeat=0))
        if res.changed:
            self._refresh()

    def _hold_new_members(self, states: list[NodeState]) -> list[NodeState]:
        """States of ids not in the table become candidates (see MAX_CANDIDATES); the rest merge."""
        known = []
        for state in states:
            if (state.node_id in self.table or state.node_id == self.me.node_id
                    or state.status not in _VERIFIED_STATUSES):
                known.append(state)
                continue
            held = self.candidates.get(state.node_id)
            if held is None and len(self.candidates) >= MAX_CANDIDATES:
                self.refused += 1
                continue
            if held is None or mb.newer(state, held[0]):
                self.candidates[state.node_id] = (state, held[1] if held else 0)
        return known

    async def verify_candidates(self) -> None:
        """Ping every candidate's address; admit those that answer with their own id."""
        async def verify(node_id: str, state: NodeState, tries: int) -> None:
            try:
                answer = await self.call(state.address, "ping", None, max(self.interval_s * 2, 0.5))
            except KvError:
                answer = None
            if self.candidates.get(node_id, (None,))[0] is not state:
                return  # replaced by a newer state meanwhile: verified next round
            if answer == node_id:
                del self.candidates[node_id]
                self._merge([state], verified=True)
            elif answer is not None or tries + 1 >= CANDIDATE_TRIES:
                del self.candidates[node_id]
                self.refused += 1
                log.info("gossip: dropped member %s at %s (%s)", node_id, state.address,
                         f"that address is {str(answer)[:40]!r}" if answer is not None else "never answered")
            else:
                self.candidates[node_id] = (state, tries + 1)

        async with trio.open_nursery() as nursery:
            for node_id, (state, tries) in list(self.candidates.items()):
                nursery.start_soon(verify, node_id, state, tries)

    def handle_syn(self, body: Any) -> list:
        try:
            states, ids = mb.compare_digests(self.table, body)
        except ValueError as exc:
            raise InvalidArgument(f"gossip digest: {exc}") from None
        return [[s.to_wire() for s in states], ids]

    def handle_ack(self, body: Any) -> None:
        try:
            self._merge(mb.parse_states(body))
        except ValueError as exc:
            raise InvalidArgument(f"gossip states: {exc}") from None

    def _refresh(self) -> None:
        # Building a ring and its digest took a few % of a loaded node's CPU when done for every
        # heartbeat; the members it is built from change only with membership.
        members = mb.ring_members(self.table)
        if members != self._ring_members:
            self._ring_members = members
            ring = Ring(members)
            if ring.digest() != self._ring.digest():
                self._ring = ring
                log.info("ring changed: %d nodes, digest %s", len(ring), ring.digest()[:12])
        self.changed.set()
        self.changed = trio.Event()
        if self.on_change is not None:
            self.on_change()

    # ---- sending ----------------------------------------------------------------------------

    def _targets(self) -> list[str]:
        others = [s for s in self.table.values()
                  if s.node_id != self.me.node_id and s.status not in (Status.LEFT, Status.REMOVED)]
        # a peer whose last exchange still hangs (cut off, paused) is not chosen as this round's
        # live peer: heartbeats keep flowing to the others while the detector judges that one
        up = [s.address for s in others if self.is_up(s.node_id) and s.address not in self._in_flight]
        down = [s.address for s in others if not self.is_up(s.node_id)]
        targets = []
        if up:
            targets.append(self.rng.choice(up))
        if down and (not up or self.rng.random() < DOWN_PROBE_PROBABILITY):
            targets.append(self.rng.choice(down))
        if self.seeds and (not up or self.rng.random() < SEED_PROBABILITY):
            targets.append(self.rng.choice(self.seeds))
        return list(dict.fromkeys(targets))

    async def exchange(self, address: str) -> None:
        timeout = max(self.interval_s * 2, 0.5)
        reply = await self.call(address, "gossip-syn", mb.digest(self.table), timeout)
        if not (isinstance(reply, list) and len(reply) == 2):
            raise InvalidArgument("gossip reply: expected [states, ids]")
        try:
            states = mb.parse_states(reply[0])
            # the node we dialed answered for its own address: no need to ping it again
            self._merge([st for st in states if st.address == address], verified=True)
            self._merge([st for st in states if st.address != address])
            wanted = mb.parse_ids(reply[1])
        except ValueError as exc:
            raise InvalidArgument(f"gossip reply: {exc}") from None
        if wanted:
            await self.call(address, "gossip-ack", [s.to_wire() for s in mb.delta_for(self.table, wanted)], timeout)

    def _start_round(self, nursery: trio.Nursery) -> None:
        self.set_me(self.me.beat())
        for address in self._targets():
            if address not in self._in_flight:  # at most one exchange per peer at a time
                self._in_flight.add(address)
                nursery.start_soon(self._exchange_quietly, address)
        if self.candidates and not self._verifying:  # learned earlier: admit the real ones now
            self._verifying = True
            nursery.start_soon(self._verify_in_background)
        self.rounds += 1

    async def _verify_in_background(self) -> None:
        try:
            await self.verify_candidates()
        finally:
            self._verifying = False

    async def round(self) -> None:
        """One round, waiting for its exchanges and then the candidates they brought (used while
        learning the cluster at start)."""
        async with trio.open_nursery() as nursery:
            self._start_round(nursery)
        if self.candidates:
            await self.verify_candidates()

    async def _exchange_quietly(self, address: str) -> None:
        try:
            await self.exchange(address)
        except KvError as exc:
            log.debug("gossip with %s failed: %s", address, exc)
        finally:
            self._in_flight.discard(address)

    async def run(self) -> None:
        """A round every interval, whether or not earlier exchanges have answered: a round that
        waited for a peer that no longer answers (a partition drops packets silently, so only the
        call's deadline ends it) would starve every other peer of heartbeats, and they would
        mark each other down too."""
        async with trio.open_nursery() as nursery:
            while True:
                self._start_round(nursery)
                await trio.sleep(self.interval_s)

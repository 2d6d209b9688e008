"""Deterministic simulation of many nodes' membership cores over a fake network (pure). Belongs
here: the protocol driver the real node would run (push-pull rounds, peer choice, detector
feeding), a fake network (loss, delay in rounds, partitions) and crash/restart. Everything comes
from one seeded random.Random, so a scenario replays exactly; time is round * interval_s.

A round at each live node, in a shuffled order: beat its own heartbeat, then push-pull with one
random peer its detector believes available; with a small probability also with one it believes
down, and with a seed (always when it knows no live peer). One push-pull exchange is three
messages, each lost independently: syn (digest), ack (states the initiator needs + ids the
responder needs), ack2 (those states). With delay_rounds = 0 an exchange completes in place.

Speed (a 1,000-node run in a fraction of a second): digests are the nodes' cached version maps, compared with
C-level set operations; an XOR fingerprint of each map short-cuts the common case of equal tables
(the outcome is what compare_digests would return: nothing to send). Convergence is tracked
incrementally: each node counts how many tracked ids it holds at their true generation and status.
`heartbeats=False` turns off beating and detectors, to measure how one membership change spreads:
with heartbeats every exchange carries O(n) fresh states, which does not change that spread.
"""
from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from kvstore.core.failure import DetectorConfig, PhiAccrualDetector
from kvstore.core.membership import (
    RING_STATUSES,
    NodeState,
    Status,
    compare_versions,
    delta_for,
    merge_states,
    removal,
    ring_of,
    transition,
)

#: statuses of nodes that are no longer gossip partners (they shut down)
_GONE = frozenset({Status.LEFT, Status.REMOVED})
_PICK_TRIES = 8     # random draws before falling back to a scan for an available peer


class NotConverged(AssertionError):
    """The scenario did not converge within its round budget."""


def convergence_target(n: int) -> float:
    """Rounds within which a single change should reach all n nodes: 2*log2(n) + 3."""
    return 2 * math.log2(max(n, 2)) + 3


@dataclass
class _Message:
    kind: str           # "syn", "ack" or "ack2"
    sender: int
    receiver: int
    body: Any


class _Node:
    """One simulated node: its own state, its table with cached digest and fingerprints, and its
    detector. `matches` counts tracked ids held at their true (generation, status)."""

    def __init__(self, index: int, own: NodeState, detector: PhiAccrualDetector | None) -> None:
        self.index = index
        self.node_id = own.node_id
        self.own = own
        self.table: dict[str, NodeState] = {}
        self.versions: dict[str, tuple[int, int]] = {}
        self.version_fp = 0
        self.ring_fp = 0
        self.matches = 0
        self.detector = detector
        self.members: list[str] | None = None   # gossip partners, rebuilt when membership changes
        self.alive = True
        self.halted = ""                        # why it stopped for good ("removed"), if it did


def _version_hash(state: NodeState | None) -> int:
    return 0 if state is None else hash((state.node_id, state.generation, state.heartbeat))


def _ring_hash(state: NodeState | None) -> int:
    if state is None or state.status not in RING_STATUSES or not state.tokens:
        return 0
    return hash((state.node_id, state.address, state.zone, state.tokens))


class Simulation:
    """n nodes gossiping membership. Indices 0..n-1; node ids "n0000"...; seeds are 0..seeds-1.

    full_view=False starts every node knowing only itself and the seeds (a cluster forming);
    full_view=True starts from a converged table (to measure how one change spreads).
    """

    def __init__(
        self,
        n: int,
        seed: int = 0,
        *,
        loss: float = 0.0,
        delay_rounds: int = 0,
        seeds: int = 3,
        interval_s: float = 1.0,
        tokens_per_node: int = 8,
        heartbeats: bool = True,
        full_view: bool = False,
        seed_probability: float = 0.1,
        unreachable_probability: float = 0.1,
        detector: DetectorConfig | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if n < 1:
            raise ValueError("n: need at least one node")
        if not 0.0 <= loss < 1.0:
            raise ValueError("loss: must be in [0, 1)")
        if delay_rounds < 0:
            raise ValueError("delay_rounds: must be >= 0")
        # the seed builds a private generator; the global one is never touched
        self.rng = rng if rng is not None else random.Random(seed)
        self.n = n
        self.loss = loss
        self.delay_rounds = delay_rounds
        self.interval_s = interval_s
        self.heartbeats = heartbeats
        self.seed_probability = seed_probability
        self.unreachable_probability = unreachable_probability
        self.detector_config = (detector or DetectorConfig.for_interval(interval_s)).validate()
        self.round = 0
        self.messages_sent = 0
        self.messages_lost = 0
        self.refusal_count = 0
        self.refusals: list[str] = []           # the first few, for reading
        self.seed_indices = list(range(min(seeds, n)))
        self._group: list[int] | None = None
        self._queue: dict[int, list[_Message]] = defaultdict(list)
        self._truth: dict[str, tuple[int, Status]] = {}
        self._removed: set[str] = set()
        self._ring_digests: dict[int, str] = {}
        self.index_of: dict[str, int] = {}

        states = []
        for i in range(n):
            tokens = tuple(sorted(self.rng.getrandbits(64) for _ in range(tokens_per_node)))
            states.append(NodeState(f"n{i:04d}", f"sim:{i}", 1, 0, Status.NORMAL, tokens))
            self.index_of[states[-1].node_id] = i
        self._truth = {s.node_id: (s.generation, s.status) for s in states}
        self.nodes = [_Node(i, s, self._new_detector()) for i, s in enumerate(states)]
        if full_view:
            self._start_converged(states)
        else:
            for node in self.nodes:
                self._set_entry(node, node.own)

    # --- scenario controls ----------------------------------------------------------------------

    def partition(self, groups: Iterable[Iterable[int]]) -> None:
        """Cut the network into groups that cannot talk to each other; nodes in no listed group
        form one more group together."""
        groups = [set(g) for g in groups]
        self._group = [len(groups)] * self.n
        for number, members in enumerate(groups):
            for i in members:
                self._group[i] = number

    def heal(self) -> None:
        self._group = None

    def crash(self, i: int) -> None:
        """Stop node i (its in-memory table and detector are lost)."""
        node = self.nodes[i]
        node.alive = False
        if node.node_id not in self._removed:
            self._set_truth(node.node_id, None)

    def restart(self, i: int) -> None:
        """Start node i again: a new generation, JOINING, knowing only itself and the seeds. It
        becomes NORMAL once it has learned of a normal peer (as the node's join does)."""
        node = self.nodes[i]
        if node.alive:
            raise ValueError(f"node {i} is running; crash it first")
        generation = max(node.own.generation + 1, self.round + 1)
        own = transition(node.own, Status.JOINING, generation=generation)
        fresh = _Node(i, own, self._new_detector())
        self.nodes[i] = fresh
        self._set_entry(fresh, own)
        fresh.matches = sum(1 for node_id in self._truth if self._matches(fresh.table.get(node_id)))
        if own.node_id not in self._removed:
            self._set_truth(own.node_id, (own.generation, own.status))

    def set_status(self, i: int, status: Status) -> NodeState:
        """Node i moves itself to `status` (raises IllegalTransition when the table forbids it)."""
        node = self.nodes[i]
        self._set_own(node, transition(node.own, status))
        return node.own

    def remove(self, i: int, by: int) -> NodeState:
        """An operator removes node i through node `by` (which writes the removal)."""
        remover = self.nodes[by]
        node_id = self.nodes[i].node_id
        state = removal(remover.table[node_id])
        self._set_entry(remover, state)
        if remover.detector is not None:
            remover.detector.remove(node_id)
        self._removed.add(node_id)
        self._set_truth(node_id, (state.generation, Status.REMOVED))
        return state

    # --- running --------------------------------------------------------------------------------

    def step(self) -> None:
        self.round += 1
        now = self.round * self.interval_s
        for message in self._queue.pop(self.round, ()):
            self._deliver(message, now)
        order = [node.index for node in self.nodes if node.alive]
        self.rng.shuffle(order)
        for i in order:
            node = self.nodes[i]
            if not node.alive:      # halted earlier in this round
                continue
            if node.own.status is Status.JOINING and self._knows_normal_peer(node):
                self._set_own(node, transition(node.own, Status.NORMAL))
            if self.heartbeats:
                self._set_own(node, node.own.beat())
            for target in self._pick_targets(node, now):
                self._send("syn", i, target, self._digest_of(node), now)

    def run(self, rounds: int) -> None:
        for _ in range(rounds):
            self.step()

    def run_until(self, done: Callable[[], bool], max_rounds: int, what: str = "condition") -> int:
        """Step until done(); returns the rounds it took (0 if already true)."""
        for taken in range(max_rounds + 1):
            if done():
                return taken
            if taken < max_rounds:
                self.step()
        raise NotConverged(f"{what} not reached within {max_rounds} rounds (round {self.round})")

    def run_until_converged(self, max_rounds: int) -> int:
        return self.run_until(self.converged, max_rounds, "convergence")

    # --- observing ------------------------------------------------------------------------------

    def live(self) -> list[int]:
        return [node.index for node in self.nodes if node.alive]

    def converged(self) -> bool:
        """Every live node holds every live node's latest generation and status (and every
        removal), and all live nodes compute the same ring digest."""
        live = [node for node in self.nodes if node.alive]
        want = len(self._truth)
        if any(node.matches != want for node in live):
            return False
        return len({self._ring_digest(node) for node in live}) <= 1

    def views(self) -> list[dict[str, NodeState] | None]:
        """Each node's table (a copy), None for nodes that are not running."""
        return [dict(node.table) if node.alive else None for node in self.nodes]

    def ring_digest(self, i: int) -> str:
        return self._ring_digest(self.nodes[i])

    def sees_down(self, observer: int, target: int) -> bool:
        """Whether the observer's detector holds the target down (always False without heartbeats)."""
        node = self.nodes[observer]
        if node.detector is None:
            return False
        return not node.detector.is_available(self.nodes[target].node_id, self.round * self.interval_s)

    def observers_seeing_down(self, target: int) -> list[int]:
        return [i for i in self.live() if i != target and self.sees_down(i, target)]

    def halted(self) -> dict[int, str]:
        return {node.index: node.halted for node in self.nodes if node.halted}

    # --- table bookkeeping ----------------------------------------------------------------------

    def _new_detector(self) -> PhiAccrualDetector | None:
        return PhiAccrualDetector(self.detector_config) if self.heartbeats else None

    def _start_converged(self, states: list[NodeState]) -> None:
        table = {s.node_id: s for s in states}
        versions = {s.node_id: s.version for s in states}
        ids = [s.node_id for s in states]
        version_fp = ring_fp = 0
        for s in states:
            version_fp ^= _version_hash(s)
            ring_fp ^= _ring_hash(s)
        for node in self.nodes:
            node.table, node.versions = dict(table), dict(versions)
            node.version_fp, node.ring_fp, node.matches = version_fp, ring_fp, len(self._truth)
            node.members = ids[:node.index] + ids[node.index + 1:]
            if node.detector is not None:
                for s in states:
                    if s.node_id != node.node_id:
                        node.detector.heartbeat(s.node_id, 0.0, s.generation)

    def _matches(self, state: NodeState | None) -> bool:
        return state is not None and self._truth.get(state.node_id) == (state.generation, state.status)

    def _set_entry(self, node: _Node, state: NodeState) -> None:
        old = node.table.get(state.node_id)
        node.table[state.node_id] = state
        node.versions[state.node_id] = state.version
        node.version_fp ^= _version_hash(old) ^ _version_hash(state)
        if (old is not None and old.generation == state.generation and old.status is state.status
                and (old.tokens is state.tokens or old.tokens == state.tokens)
                and old.address == state.address and old.zone == state.zone):
            return      # a heartbeat: ring, match and partners are unchanged (the common case)
        node.ring_fp ^= _ring_hash(old) ^ _ring_hash(state)
        if state.node_id in self._truth:
            node.matches += self._matches(state) - self._matches(old)
        if old is None or (old.status in _GONE) != (state.status in _GONE):
            node.members = None

    def _set_own(self, node: _Node, state: NodeState) -> None:
        before = node.own
        node.own = state
        self._set_entry(node, state)
        if (before.generation, before.status) != (state.generation, state.status) \
                and state.node_id not in self._removed:
            self._set_truth(state.node_id, (state.generation, state.status))

    def _set_truth(self, node_id: str, truth: tuple[int, Status] | None) -> None:
        """Change what converged means for one id, keeping every node's match count exact."""
        for node in self.nodes:
            node.matches -= self._matches(node.table.get(node_id))
        if truth is None:
            self._truth.pop(node_id, None)
        else:
            self._truth[node_id] = truth
        for node in self.nodes:
            node.matches += self._matches(node.table.get(node_id))

    def _ring_digest(self, node: _Node) -> str:
        digest = self._ring_digests.get(node.ring_fp)
        if digest is None:
            digest = self._ring_digests[node.ring_fp] = ring_of(node.table).digest()
        return digest

    def _knows_normal_peer(self, node: _Node) -> bool:
        return self.n == 1 or any(s.status is Status.NORMAL for s in node.table.values()
                                  if s.node_id != node.node_id)

    # --- peer choice ----------------------------------------------------------------------------

    def _members(self, node: _Node) -> list[str]:
        if node.members is None:
            left, removed, me = Status.LEFT, Status.REMOVED, node.node_id
            node.members = [s.node_id for s in node.table.values()
                            if s.status is not left and s.status is not removed and s.node_id != me]
        return node.members

    def _available(self, node: _Node, node_id: str, now: float) -> bool:
        return node.detector is None or node.detector.is_available(node_id, now)

    def _pick(self, node: _Node, members: list[str], now: float, available: bool) -> str | None:
        for _ in range(_PICK_TRIES):
            candidate = self.rng.choice(members)
            if self._available(node, candidate, now) == available:
                return candidate
        if not available:   # down peers are an optional extra: no scan for them
            return None
        live = [m for m in members if self._available(node, m, now)]
        return self.rng.choice(live) if live else None

    def _pick_targets(self, node: _Node, now: float) -> list[int]:
        members = self._members(node)
        targets: list[str] = []
        live = self._pick(node, members, now, True) if members else None
        if live is not None:
            targets.append(live)
        if node.detector is not None and members and self.rng.random() < self.unreachable_probability:
            down = self._pick(node, members, now, False)
            if down is not None:
                targets.append(down)
        seeds = [s for s in self.seed_indices if s != node.index]
        if seeds and (live is None or self.rng.random() < self.seed_probability):
            targets.append(self.nodes[self.rng.choice(seeds)].node_id)
        return [self.index_of[t] for t in dict.fromkeys(targets)]

    # --- the network and the protocol -----------------------------------------------------------

    def _digest_of(self, node: _Node) -> tuple[dict[str, tuple[int, int]], int]:
        # in flight for several rounds, a digest must be a snapshot
        versions = node.versions if self.delay_rounds == 0 else dict(node.versions)
        return versions, node.version_fp

    def _send(self, kind: str, sender: int, receiver: int, body: Any, now: float) -> None:
        self.messages_sent += 1
        if self.loss and self.rng.random() < self.loss:
            self.messages_lost += 1
            return
        message = _Message(kind, sender, receiver, body)
        if self.delay_rounds == 0:
            self._deliver(message, now)
        else:
            self._queue[self.round + self.delay_rounds].append(message)

    def _deliver(self, message: _Message, now: float) -> None:
        node = self.nodes[message.receiver]
        if not node.alive or (self._group is not None
                              and self._group[message.sender] != self._group[message.receiver]):
            self.messages_lost += 1
            return
        if message.kind == "syn":
            versions, fingerprint = message.body
            if fingerprint == node.version_fp:
                return          # equal tables: compare_digests would find nothing to send
            they_need, i_need = compare_versions(node.versions, versions)
            if they_need or i_need:
                self._send("ack", node.index, message.sender,
                           (delta_for(node.table, they_need), i_need), now)
        elif message.kind == "ack":
            states, ids = message.body
            self._merge(node, states, now)
            if ids and node.alive:
                self._send("ack2", node.index, message.sender, delta_for(node.table, ids), now)
        else:
            self._merge(node, message.body, now)

    def _merge(self, node: _Node, states: list[NodeState], now: float) -> None:
        if not states:
            return
        result = merge_states(node.table, states, node.node_id)
        for node_id in result.changed:
            state = result.table[node_id]
            self._set_entry(node, state)
            if node.detector is not None:
                if state.status in _GONE:
                    node.detector.remove(node_id)
                else:
                    node.detector.heartbeat(node_id, now, state.generation)
        self.refusal_count += len(result.refused)
        if len(self.refusals) < 100:
            self.refusals.extend(f"{node.node_id}: {r}" for r in result.refused)
        if result.about_self is not None and result.about_self.status is Status.REMOVED:
            node.alive, node.halted = False, "removed"     # a removed node stops serving


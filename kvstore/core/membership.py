"""The membership table and its rules (pure): node states, the status transitions they may make,
how gossiped states merge, and the digests a push-pull gossip round exchanges. Belongs here: data
and decisions only; the node (kvstore/node/gossip.py) does the calls, the clock and the logging.

Per node: address, zone, generation (process start), heartbeat counter, status and tokens. Only a
node writes its own state, with one exception: an operator's removal, written by another node.

Precedence. A state supersedes another of the same node when its (generation, heartbeat) is higher,
so a restarted node (new generation) replaces its old self, except that REMOVED outranks
everything. A removal is stamped with the reserved heartbeat REMOVED_HEARTBEAT (2**64 - 1), so
within its generation no state of the node can out-beat it, and digests, which carry only
(generation, heartbeat), still show who holds the removal.

Removal is final for a node id (decision). Like Scylla's banned host ids and Cassandra's refusal to
restart a decommissioned node, a removed id never returns, not even with a higher generation: its
ranges were re-replicated from survivors, so its old data and tokens are stale. A machine that
wants back in wipes its data directory and joins under a new node id. A node that learns of its own
removal (`MergeResult.about_self`) must stop serving. LEFT (graceful decommission) is different:
the node streamed its data away and may come back as JOINING in a new generation.

Transitions. Within one generation a node moves along TRANSITIONS. Gossip may skip intermediate
states, so a merge accepts any status *reachable* from the one it holds and refuses the rest
(a Refusal, returned, never an exception): a node that went back to JOINING or out of LEFT within
the same process is a bug or a hostile peer, and must not make the ring flap.
"""
from __future__ import annotations

import enum
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from kvstore.core.ring import Ring, RingNode

_U64 = (1 << 64) - 1
#: the heartbeat of every REMOVED state, and of no other (see the module docstring)
REMOVED_HEARTBEAT = _U64
#: most entries a gossiped digest or state list may carry; bigger ones are refused unread
MAX_GOSSIP_ENTRIES = 10_000
#: Plausibility of gossiped versions (checked when the caller passes `now_ms`). A generation is
#: the author's process start in ms since the epoch; one from further ahead of our clock than
#: MAX_CLOCK_SKEW_MS would outrank the real node for that long (a forged 2^64-1 forever).
MAX_CLOCK_SKEW_MS = 3_600_000
#: no profile gossips faster than this, so a node cannot have beaten more often since it started;
#: BEAT_SLACK covers the extra beats of status changes
MIN_ROUND_MS = 10
BEAT_SLACK = 1_000


class Status(enum.Enum):
    JOINING = "joining"
    NORMAL = "normal"
    LEAVING = "leaving"
    LEFT = "left"
    REMOVED = "removed"


_REMOVED = Status.REMOVED

#: statuses whose tokens are part of the ring that places keys
RING_STATUSES = frozenset({Status.NORMAL, Status.LEAVING})

#: direct moves of a node's status within one generation (one process lifetime)
TRANSITIONS: Mapping[Status, frozenset[Status]] = {
    Status.JOINING: frozenset({Status.NORMAL,      # streaming done: takes its tokens
                               Status.LEFT,        # join rolled back (Scylla #5898: joins must be abortable)
                               Status.REMOVED}),
    Status.NORMAL: frozenset({Status.LEAVING, Status.REMOVED}),
    Status.LEAVING: frozenset({Status.LEFT,        # decommission streamed everything away
                               Status.NORMAL,      # decommission failed: all or nothing (Scylla #2042)
                               Status.REMOVED}),
    Status.LEFT: frozenset({Status.REMOVED}),
    Status.REMOVED: frozenset(),                   # final for the node id, in every generation
}

#: the status a new generation (process restart) starts in, by the status of the old one;
#: a removed node id has no next generation
RESTART_TRANSITIONS: Mapping[Status, frozenset[Status]] = {
    status: frozenset() if status is Status.REMOVED else frozenset({Status.JOINING})
    for status in Status
}


def _reachable(start: Status) -> frozenset[Status]:
    seen, todo = {start}, [start]
    while todo:
        for nxt in TRANSITIONS[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return frozenset(seen)


#: statuses a node can show after `status` within the same generation, in zero or more moves:
#: what a merge accepts, since gossip may skip the states in between
REACHABLE: Mapping[Status, frozenset[Status]] = {s: _reachable(s) for s in Status}


class IllegalTransition(ValueError):
    """A local caller asked for a status change the transition table does not allow (a bug in the
    caller, not in a peer: peers' illegal states are refused by merge, see Refusal)."""

    def __init__(self, node_id: str, from_status: Status, to_status: Status, new_generation: bool) -> None:
        self.node_id, self.from_status, self.to_status = node_id, from_status, to_status
        table = RESTART_TRANSITIONS if new_generation else TRANSITIONS
        allowed = ", ".join(sorted(s.value for s in table[from_status])) or "nothing"
        where = "in a new generation" if new_generation else "within a generation"
        super().__init__(f"node {node_id}: illegal transition {from_status.value} -> {to_status.value} "
                         f"{where} (allowed from {from_status.value}: {allowed})")


@dataclass(frozen=True)
class NodeState:
    """One node's gossiped state. A REMOVED state always carries REMOVED_HEARTBEAT (it is set on
    construction), and no other state may: that heartbeat is what digests read removal from."""

    node_id: str
    address: str
    generation: int            # process start (ms since epoch); a restart increases it
    heartbeat: int = 0         # incremented by the node itself every gossip round
    status: Status = Status.NORMAL
    tokens: tuple[int, ...] = ()
    zone: str = ""
    app: Mapping[str, Any] = field(default_factory=dict)  # small facts: load, version

    def __post_init__(self) -> None:
        if self.status is Status.REMOVED:
            object.__setattr__(self, "heartbeat", REMOVED_HEARTBEAT)
        elif self.heartbeat == REMOVED_HEARTBEAT:
            raise ValueError(f"node {self.node_id}: heartbeat 2^64-1 is reserved for removed states")

    @property
    def version(self) -> tuple[int, int]:
        return (self.generation, self.heartbeat)

    @property
    def precedence(self) -> tuple[bool, int, int]:
        """Sort key of the states of one node: the greatest is the newest."""
        return (self.status is Status.REMOVED, self.generation, self.heartbeat)

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
        _check_id(node_id)
        if not isinstance(address, str) or not 0 < len(address) <= 256:
            raise ValueError("address must be a string of 1..256 characters")
        for name, v in (("generation", gen), ("heartbeat", hb)):
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= _U64:
                raise ValueError(f"{name} must be in 0..2^64-1")
        if not isinstance(tokens, list) or len(tokens) > 4096 or not all(
            isinstance(t, int) and 0 <= t <= _U64 for t in tokens
        ):
            raise ValueError("tokens must be at most 4096 integers in 0..2^64-1")
        if len(set(tokens)) != len(tokens):
            raise ValueError("tokens must be distinct")
        if not isinstance(zone, str) or len(zone) > 128 or not isinstance(app, dict):
            raise ValueError("zone must be a short string and app a map")
        try:
            st = Status(status)
        except ValueError:
            raise ValueError(f"status {str(status)[:20]!r} is unknown") from None
        return cls(node_id, address, gen, hb, st, tuple(tokens), zone, app)


Table = Mapping[str, NodeState]


def _check_id(node_id: Any) -> None:
    if not isinstance(node_id, str) or not 0 < len(node_id) <= 128:
        raise ValueError("node_id must be a string of 1..128 characters")


# --- transitions ---------------------------------------------------------------------------------

def transition(state: NodeState, new_status: Status, *, generation: int | None = None) -> NodeState:
    """`state` moved to `new_status`, as its node (or, for REMOVED, an operator) would publish it.

    Within the generation the heartbeat rises by one, so the change supersedes `state` everywhere.
    With `generation` (a restart: strictly higher than state.generation) the heartbeat starts at 0.
    Raises IllegalTransition when the tables do not allow the move."""
    if generation is None or generation == state.generation:
        if new_status not in TRANSITIONS[state.status]:
            raise IllegalTransition(state.node_id, state.status, new_status, new_generation=False)
        return replace(state, status=new_status, heartbeat=state.heartbeat + 1)
    if generation < state.generation:
        raise ValueError(f"node {state.node_id}: generation {generation} is older than {state.generation}")
    if new_status not in RESTART_TRANSITIONS[state.status]:
        raise IllegalTransition(state.node_id, state.status, new_status, new_generation=True)
    return replace(state, status=new_status, generation=generation, heartbeat=0)


def removal(state: NodeState) -> NodeState:
    """The operator's removal of the node `state` describes (allowed from every status)."""
    return transition(state, Status.REMOVED)


# --- merging -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Refusal:
    """An incoming state merge would not take although it is newer: the peer (or the node it
    describes) is at fault. Reasons: "illegal transition" within a generation, "removed" for a
    removed node id trying to come back in a new generation."""

    node_id: str
    held: Status
    offered: Status
    generation: int
    reason: str

    def __str__(self) -> str:
        return (f"refused state of {self.node_id}: {self.reason} {self.held.value} -> "
                f"{self.offered.value} (generation {self.generation})")


@dataclass(frozen=True)
class MergeResult:
    table: dict[str, NodeState]
    changed: list[str]                 # ids whose entry was replaced, in arrival order
    refused: list[Refusal]             # newer states that were not taken (log them, count them)
    about_self: NodeState | None       # a state of the local node that outranks its own entry: a
                                       # removal (stop serving) or a newer generation (id clash)


def _judge(incoming: NodeState, current: NodeState | None) -> Refusal | bool:
    """True: take incoming. False: it is stale or equal. A Refusal: newer but not acceptable.
    (Written for speed: a simulation judges millions of heartbeat updates.)"""
    if current is None:
        return True
    if current.status is _REMOVED:
        if incoming.status is not _REMOVED:
            if incoming.generation > current.generation:
                return Refusal(incoming.node_id, current.status, incoming.status, incoming.generation,
                               "removed")
            return False
    elif incoming.status is _REMOVED:
        return True                     # a removal outranks every state that is not one
    if incoming.generation != current.generation:
        return incoming.generation > current.generation
    if incoming.heartbeat != current.heartbeat:
        if incoming.heartbeat < current.heartbeat:
            return False
        if incoming.status is current.status or incoming.status in REACHABLE[current.status]:
            return True
        return Refusal(incoming.node_id, current.status, incoming.status, incoming.generation,
                       "illegal transition")
    # One author per version, so equal versions are equal states, except two operators removing
    # the same node from different views: any deterministic pick converges, take the larger.
    return incoming != current and _content_key(incoming) > _content_key(current)


def _content_key(state: NodeState) -> tuple:
    return (state.status.value, state.address, state.tokens, state.zone,
            sorted((repr(k), repr(v)) for k, v in state.app.items()))


def newer(incoming: NodeState, current: NodeState | None) -> bool:
    """Whether a merge would replace `current` with `incoming`."""
    return _judge(incoming, current) is True


def implausible(state: NodeState, now_ms: int) -> str:
    """Why a gossiped state cannot be real at local time now_ms ("" when it can): a generation
    from the future, or more heartbeats than rounds since its generation began."""
    if state.generation > now_ms + MAX_CLOCK_SKEW_MS:
        return f"generation {state.generation} is more than {MAX_CLOCK_SKEW_MS} ms ahead of {now_ms}"
    if state.status is not Status.REMOVED:
        most = max(0, now_ms + MAX_CLOCK_SKEW_MS - state.generation) // MIN_ROUND_MS + BEAT_SLACK
        if state.heartbeat > most:
            return f"heartbeat {state.heartbeat} exceeds the {most} rounds possible since generation {state.generation}"
    return ""


def merge_states(table: Table, incoming: Iterable[NodeState], self_id: str = "",
                 now_ms: int | None = None) -> MergeResult:
    """Merge gossiped states into a table (pure: `table` is not modified). The local node's own
    entry is never taken from others: it is authoritative for itself. With `now_ms` (a node's
    wall clock), implausible states (see `implausible`) are refused."""
    out = dict(table)
    changed: dict[str, None] = {}      # ordered set
    refused: list[Refusal] = []
    about_self: NodeState | None = None
    for state in incoming:
        if now_ms is not None:
            why = implausible(state, now_ms)
            if why:
                held = out.get(state.node_id)
                refused.append(Refusal(state.node_id, held.status if held else state.status, state.status,
                                       state.generation, why))
                continue
        if state.node_id == self_id:
            mine = out.get(self_id)
            if mine is None or state.precedence > mine.precedence:
                if about_self is None or state.precedence > about_self.precedence:
                    about_self = state
            continue
        verdict = _judge(state, out.get(state.node_id))
        if verdict is True:
            changed[state.node_id] = None
            out[state.node_id] = state
        elif verdict is not False:
            refused.append(verdict)
    return MergeResult(out, list(changed), refused, about_self)


def merge(table: Table, incoming: Iterable[NodeState], self_id: str = "") -> tuple[dict[str, NodeState], list[str]]:
    """Merge gossiped states into a table: returns (new table, ids whose state changed). Refused
    states are dropped; use merge_states to see them."""
    result = merge_states(table, incoming, self_id)
    return result.table, result.changed


# --- digests and push-pull -----------------------------------------------------------------------
#
# One round between A (initiator) and B:
#   A -> B  digest(A.table)
#   B -> A  compare_digests(B.table, digest of A): the states A needs, and the ids B needs
#   A -> B  delta_for(A.table, ids B needs)
# Both then merge what they received. A digest is O(n) small triples; full states travel only
# where the versions differ.

Versions = Mapping[str, tuple[int, int]]


def digest(table: Table) -> list[list]:
    """Wire form: [[node_id, generation, heartbeat], ...]."""
    return [[s.node_id, s.generation, s.heartbeat] for s in table.values()]


def versions_of(table: Table) -> dict[str, tuple[int, int]]:
    """The digest as a map node id -> (generation, heartbeat)."""
    return {s.node_id: (s.generation, s.heartbeat) for s in table.values()}


def parse_digest(wire: Any) -> dict[str, tuple[int, int]]:
    """Validate a gossiped digest; raises ValueError naming the problem."""
    if not isinstance(wire, list) or len(wire) > MAX_GOSSIP_ENTRIES:
        raise ValueError(f"digest must be an array of at most {MAX_GOSSIP_ENTRIES} entries")
    out: dict[str, tuple[int, int]] = {}
    for entry in wire:
        if not isinstance(entry, list) or len(entry) != 3:
            raise ValueError("digest entry must be [node_id, generation, heartbeat]")
        node_id, gen, hb = entry
        _check_id(node_id)
        if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= _U64 for v in (gen, hb)):
            raise ValueError("digest generation and heartbeat must be in 0..2^64-1")
        out[node_id] = (gen, hb)
    return out


def _precedence(version: tuple[int, int]) -> tuple[bool, int, int]:
    return (version[1] == REMOVED_HEARTBEAT, version[0], version[1])


def compare_versions(mine: Versions, theirs: Versions) -> tuple[list[str], list[str]]:
    """(ids where mine is newer or they lack it, ids where theirs is newer or I lack it), sorted.
    Equal entries cost a C-level set operation, not Python code: digests are mostly equal."""
    if mine == theirs:
        return [], []
    they_need, i_need = [], []
    for node_id in sorted({node_id for node_id, _ in mine.items() ^ theirs.items()}):
        have, other = mine.get(node_id), theirs.get(node_id)
        if other is None or (have is not None and _precedence(have) > _precedence(other)):
            they_need.append(node_id)
        elif have is None or _precedence(other) > _precedence(have):
            i_need.append(node_id)
    return they_need, i_need


def compare_digests(table: Table, remote_digest: Any) -> tuple[list[NodeState], list[str]]:
    """Answer to a peer's digest in wire form: (states the peer needs, ids I need).
    Raises ValueError on a malformed digest (it came from the network: always validated)."""
    they_need, i_need = compare_versions(versions_of(table), parse_digest(remote_digest))
    return [table[node_id] for node_id in they_need], i_need


def delta_for(table: Table, ids: Iterable[str]) -> list[NodeState]:
    """The states of `ids` that this table has (unknown ids are skipped, duplicates sent once)."""
    return [table[node_id] for node_id in dict.fromkeys(ids) if node_id in table]


def parse_ids(wire: Any) -> list[str]:
    """Validate a gossiped list of node ids; raises ValueError naming the problem."""
    if not isinstance(wire, list) or len(wire) > MAX_GOSSIP_ENTRIES:
        raise ValueError(f"ids must be an array of at most {MAX_GOSSIP_ENTRIES} strings")
    for node_id in wire:
        _check_id(node_id)
    return wire


def parse_states(wire: Any) -> list[NodeState]:
    """Validate a gossiped list of states; raises ValueError naming the problem."""
    if not isinstance(wire, list) or len(wire) > MAX_GOSSIP_ENTRIES:
        raise ValueError(f"states must be an array of at most {MAX_GOSSIP_ENTRIES} entries")
    return [NodeState.from_wire(item) for item in wire]


def ring_members(table: Table) -> tuple[RingNode, ...]:
    """What the ring of this table depends on, by node id: equal members give an equal ring (most
    gossip changes are heartbeats, which leave it alone)."""
    return tuple(sorted(
        (RingNode(s.node_id, s.address, s.zone, s.tokens)
         for s in table.values() if s.status in RING_STATUSES and s.tokens),
        key=lambda n: n.node_id,
    ))


def ring_of(table: Table) -> Ring:
    """The ring this table defines: nodes in ring statuses with their tokens."""
    return Ring(ring_members(table))


def token_digest(tokens: Iterable[int]) -> str:
    """A short fingerprint of a token set (status views carry it, not the tokens)."""
    return hashlib.blake2b(b"".join(t.to_bytes(8, "big") for t in sorted(tokens)), digest_size=8).hexdigest()


def allocation_ring(table: Table, me: str) -> Ring:
    """The ring a joiner takes tokens against: the members in ring statuses and those still
    joining (their tokens are taken too), other than itself. Against the ring alone, two nodes
    joining at once computed the same balanced tokens, and the second owned nothing."""
    return Ring(RingNode(s.node_id, s.address, s.zone, s.tokens) for s in table.values()
                if s.node_id != me and s.tokens and (s.status in RING_STATUSES or s.status is Status.JOINING))


def token_clash(table: Table, me: str) -> str | None:
    """A member with a lower id (ring status or joining) holding a token `me` holds too: two
    joiners that picked at once from the same ring. The one with the higher id picks again."""
    mine = table.get(me)
    if mine is None or not mine.tokens:
        return None
    taken = set(mine.tokens)
    for s in sorted(table.values(), key=lambda s: s.node_id):
        if (s.node_id < me and (s.status in RING_STATUSES or s.status is Status.JOINING)
                and not taken.isdisjoint(s.tokens)):
            return s.node_id
    return None

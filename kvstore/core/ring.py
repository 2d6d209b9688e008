"""The consistent-hash ring: key tokens, preference lists, ownership, token allocation. Pure: a
function of the membership table only; no I/O or clocks, randomness comes in as `random.Random`."""

from __future__ import annotations

import bisect
import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from itertools import chain, islice
from types import MappingProxyType
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only for annotations: core modules never draw from the global random state
    import random

TOKEN_SPACE = 2**64
# Part of the digest input: bump it whenever the canonical encoding below changes.
RING_DIGEST_VERSION = "kvstore-ring-v1"
#: keys whose replicas a ring remembers (per n; up to 16 MiB with 1 KiB keys): see replicas_of
MEMO_KEYS = 16384

Token = int
KeyOrToken = bytes | int


def key_token(key: bytes) -> Token:
    """Token of a key: the first 8 bytes of blake2b (stable across processes, unlike `hash`)."""
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big")


def in_range(token: Token, start_exclusive: Token, end_inclusive: Token) -> bool:
    """Whether `token` lies in (start, end], wrapping past 2**64 when start >= end."""
    if start_exclusive < end_inclusive:
        return start_exclusive < token <= end_inclusive
    return token > start_exclusive or token <= end_inclusive


def range_size(start_exclusive: Token, end_inclusive: Token) -> int:
    """Number of tokens in (start, end] clockwise; start == end is the whole ring (one token)."""
    return (end_inclusive - start_exclusive - 1) % TOKEN_SPACE + 1


@dataclass(frozen=True)
class RingNode:
    node_id: str
    address: str
    zone: str = ""
    tokens: tuple[Token, ...] = ()


class Ring:
    """Sorted tokens with their owners; the range (previous token, token] belongs to the owner.

    A token claimed by two nodes goes to the smaller node id and the other follows it with an
    empty range: collisions are 2**-64 events, the rule only has to be the same on every node.
    """

    def __init__(self, nodes: Iterable[RingNode] = ()) -> None:
        table: dict[str, RingNode] = {}
        for node in nodes:
            _check_node(node)
            if node.node_id in table:
                raise ValueError(f"ring table lists node id {node.node_id!r} twice")
            table[node.node_id] = node
        self._nodes = MappingProxyType(dict(sorted(table.items())))
        self._canonical = tuple(
            (n.node_id, n.address, n.zone, tuple(sorted(n.tokens))) for n in self._nodes.values()
        )
        claims = sorted((t, n.node_id) for n in table.values() for t in n.tokens)
        self._tokens: list[Token] = [token for token, _ in claims]
        self._owners: list[str] = [node_id for _, node_id in claims]
        self._sizes = [(t - self._tokens[i - 1]) % TOKEN_SPACE for i, t in enumerate(self._tokens)]
        if self._sizes and not any(self._sizes):  # one distinct token: its first claim owns all
            self._sizes[0] = TOKEN_SPACE
        self._owner_count = len(set(self._owners))
        self._zoned = any(n.zone for n in table.values())
        self._zone_count = len({n.zone for n in table.values()})
        self._replica_tables: dict[int, list[tuple[str, ...] | None]] = {}
        self._memo: dict[int, dict[bytes, tuple[str, ...]]] = {}  # n -> key -> replicas_of

    # --- the membership table -------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._nodes)

    @property
    def node_ids(self) -> tuple[str, ...]:
        return tuple(self._nodes)

    @property
    def nodes(self) -> Mapping[str, RingNode]:
        return self._nodes

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Ring) and self._canonical == other._canonical

    def __hash__(self) -> int:
        return hash(self._canonical)

    def __repr__(self) -> str:
        return f"Ring({len(self)} nodes, {len(self._tokens)} tokens, digest={self.digest()[:12]})"

    def digest(self) -> str:
        """sha256 over a canonical encoding: equal tables give equal digests in any process."""
        payload = json.dumps([RING_DIGEST_VERSION, self._canonical], separators=(",", ":"))
        return hashlib.sha256(payload.encode("ascii")).hexdigest()

    def warning_for(self, n: int) -> str | None:
        """Why replication factor n cannot be met as asked, or None when it can."""
        count = len(self._nodes)
        if count < n:
            return (
                f"cluster has {count} node{'' if count == 1 else 's'}, fewer than replication "
                f"factor n={n}: each key has only {count} replica{'' if count == 1 else 's'}"
            )
        if self._zoned and self._zone_count < n:
            return (
                f"cluster spans {self._zone_count} zones, fewer than replication factor n={n}: "
                f"some replicas of each key share a zone"
            )
        return None

    # --- placement ------------------------------------------------------------------------

    def preference_list(self, key_or_token: KeyOrToken, n: int) -> list[str]:
        """The key's n replicas: distinct nodes clockwise from its token, distinct zones first.

        With zones, nodes of not-yet-used zones come first (in walk order), then the remaining
        nodes in walk order. Returns all nodes when there are fewer than n (see `warning_for`).
        """
        _check_replication_factor(n)
        if not self._tokens:
            return []
        return list(self._replicas_at(self._start_index(key_or_token), n))

    def replicas_of(self, key: bytes, n: int) -> tuple[str, ...]:
        """`preference_list` of a key as the ring's own tuple, not a copy: the per-key hot path.
        The last MEMO_KEYS keys' answers are remembered per n (the ring never changes, so they
        stay right): a request's key is routed, then coordinated, each asking again."""
        memo = self._memo.get(n)
        if memo is not None:
            found = memo.get(key)
            if found is not None:
                return found
        tokens = self._tokens
        if n < 1 or not tokens:
            return tuple(self.preference_list(key, n))  # raises for a bad n; () for an empty ring
        token = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big")
        index = bisect.bisect_left(tokens, token) % len(tokens)
        table = self._replica_tables.get(n)
        replicas = table[index] if table is not None else None
        if replicas is None:
            replicas = self._replicas_at(index, n)
        if memo is None:
            memo = self._memo[n] = {}
        elif len(memo) >= MEMO_KEYS:
            memo.clear()
        memo[key] = replicas
        return replicas

    def walk(self, key_or_token: KeyOrToken) -> Iterator[str]:
        """Every node once, clockwise from the key's token: the fallbacks for sloppy quorums."""
        if not self._tokens:
            return iter(())
        return self._walk_from(self._start_index(key_or_token))

    def ranges(self) -> list[tuple[Token, Token, str]]:
        """(start_exclusive, end_inclusive, owner) for every range; the first one wraps."""
        return [(start, end, owner) for start, end, owner, _ in self._nonempty_ranges()]

    def _nonempty_ranges(self) -> Iterator[tuple[Token, Token, str, int]]:
        for i, size in enumerate(self._sizes):
            if size:
                yield self._tokens[i - 1], self._tokens[i], self._owners[i], size

    def ownership(self) -> dict[str, float]:
        """Share of the token space each node owns as primary; sums to 1.0."""
        return self.replica_ownership(1)

    def replica_ownership(self, n: int) -> dict[str, float]:
        """Share of the key space each node holds a replica of; sums to min(n, nodes)."""
        _check_replication_factor(n)
        owned = dict.fromkeys(self._nodes, 0)
        for index, size in enumerate(self._sizes):
            for node_id in self._replicas_at(index, n):
                owned[node_id] += size
        return {node_id: size / TOKEN_SPACE for node_id, size in owned.items()}

    def _start_index(self, key_or_token: KeyOrToken) -> int:
        if isinstance(key_or_token, bytes):
            token = key_token(key_or_token)
        elif isinstance(key_or_token, int) and 0 <= key_or_token < TOKEN_SPACE:
            token = key_or_token
        else:
            raise ValueError(f"expected a bytes key or a token in [0, 2**64), got {key_or_token!r}")
        return bisect.bisect_left(self._tokens, token) % len(self._tokens)

    def _walk_from(self, start: int) -> Iterator[str]:
        seen: set[str] = set()
        count = len(self._owners)
        for step in range(start - count, start):  # negative indices wrap around the ring
            owner = self._owners[step]
            if owner not in seen:
                seen.add(owner)
                yield owner
                if len(seen) == self._owner_count:
                    return

    def _replicas_at(self, index: int, n: int) -> tuple[str, ...]:
        # Every key in one range has the same replicas: compute each range once per n, lazily.
        table = self._replica_tables.setdefault(n, [None] * len(self._tokens))
        replicas = table[index]
        if replicas is None:
            replicas = table[index] = self._collect_replicas(index, n)
        return replicas

    def _collect_replicas(self, start: int, n: int) -> tuple[str, ...]:
        walk = self._walk_from(start)
        if not self._zoned:
            return tuple(islice(walk, n))
        picked: list[str] = []
        used_zones: set[str] = set()
        skipped: list[str] = []
        for node_id in walk:
            zone = self._nodes[node_id].zone
            if zone in used_zones:
                skipped.append(node_id)
                continue
            picked.append(node_id)
            used_zones.add(zone)
            if len(picked) == n or len(used_zones) == self._zone_count:
                break
        picked.extend(islice(chain(skipped, walk), n - len(picked)))
        return tuple(picked)

    def _replica_set(self, token: Token, n: int) -> frozenset[str]:
        return frozenset(self._replicas_at(self._start_index(token), n) if self._tokens else ())


def moved_ranges(
    old: Ring, new: Ring, n: int
) -> list[tuple[Token, Token, frozenset[str], frozenset[str]]]:
    """Ranges (start_exclusive, end_inclusive, old replicas, new replicas) whose replicas differ.

    Between two adjacent boundaries of either ring every key has the same replicas in both rings,
    so comparing one token per merged segment is exact. Adjacent segments with the same change
    are coalesced.
    """
    _check_replication_factor(n)
    boundaries = sorted(set(old._tokens).union(new._tokens))
    moved: list[tuple[Token, Token, frozenset[str], frozenset[str]]] = []
    for i, end in enumerate(boundaries):
        before, after = old._replica_set(end, n), new._replica_set(end, n)
        if before == after:
            continue
        start = boundaries[i - 1]
        if moved and moved[-1][1] == start and moved[-1][2:] == (before, after):
            start = moved.pop()[0]
        moved.append((start, end, before, after))
    return moved


# --- token allocation -------------------------------------------------------------------------


def random_tokens(
    count: int, rng: random.Random, exclude: Iterable[Token] = ()
) -> tuple[Token, ...]:
    """`count` distinct uniformly random tokens not in `exclude`: the fallback allocation."""
    taken = set(exclude)
    chosen: set[Token] = set()
    while len(chosen) < count:
        token = rng.getrandbits(64)
        if token not in taken:
            chosen.add(token)
    return tuple(sorted(chosen))


def allocate_tokens(existing: Ring | None, count: int, rng: random.Random) -> tuple[Token, ...]:
    """Tokens for a node joining `existing` that keep ownership proportional to token count.

    An empty ring gets evenly spaced tokens at a random offset. A joiner takes its fair share
    count/(all tokens) from the most loaded nodes, lowering them to a common level; each donor's
    part is cut from the front of its largest ranges, in equal pieces per token.
    """
    if count < 1:
        raise ValueError(f"a node needs at least one token, asked for {count}")
    if existing is None or not existing._tokens:
        offset = rng.getrandbits(64)
        spaced = ((offset + i * TOKEN_SPACE // count) % TOKEN_SPACE for i in range(count))
        return tuple(sorted(spaced))
    chosen = _balanced_split_tokens(existing, count)
    if len(chosen) < count:  # only when ranges are too small to split; keep the count anyway
        taken = chosen | set(existing._tokens)
        chosen.update(random_tokens(count - len(chosen), rng, exclude=taken))
    return tuple(sorted(chosen))


def _balanced_split_tokens(ring: Ring, count: int) -> set[Token]:
    weights = {node_id: len(node.tokens) for node_id, node in ring.nodes.items()}
    ranges_by_owner: dict[str, list[tuple[Token, int]]] = {node_id: [] for node_id in weights}
    for start, _, owner, size in ring._nonempty_ranges():
        ranges_by_owner[owner].append((start, size))
    for ranges in ranges_by_owner.values():
        ranges.sort(key=lambda r: (-r[1], r[0]))  # largest first: they have the most to give
    owned = {node_id: sum(size for _, size in ranges_by_owner[node_id]) for node_id in weights}
    fair_share = TOKEN_SPACE * count / (sum(weights.values()) + count)
    donations = _level_down(owned, weights, fair_share, max_donors=count)
    chosen: set[Token] = set()
    for node_id, tokens in _apportion(donations, ranges_by_owner, count).items():
        chosen.update(_cut_fronts(ranges_by_owner[node_id][:tokens], tokens, donations[node_id]))
    return chosen


def _level_down(
    owned: dict[str, int], weights: dict[str, int], total: float, max_donors: int
) -> dict[str, float]:
    """What each node gives so the most loaded (per token) fall to one level, `total` in all.

    Each token can cut one range, so at most `max_donors` nodes give; with fewer tokens than
    nodes the most loaded give more now and the rest give on later joins.
    """
    by_load = sorted(owned, key=lambda node_id: (-owned[node_id] / weights[node_id], node_id))
    donors = by_load[:max_donors]
    donors_owned = donors_weight = 0
    for rank, node_id in enumerate(donors):
        donors_owned += owned[node_id]
        donors_weight += weights[node_id]
        level = (donors_owned - total) / donors_weight
        following = donors[rank + 1] if rank + 1 < len(donors) else None
        if following is None or level >= owned[following] / weights[following]:
            break
    gifts = {node_id: owned[node_id] - level * weights[node_id] for node_id in donors}
    return {node_id: gift for node_id, gift in gifts.items() if gift >= 1}


def _apportion(
    donations: dict[str, float], ranges_by_owner: dict[str, list[tuple[Token, int]]], count: int
) -> dict[str, int]:
    """Tokens per donor: one each, then each extra token goes to a donor whose largest ranges
    cannot yet hold its gift, else to the one giving the largest pieces.

    Equal pieces keep the joiner's new ranges alike and small enough to fit in donors' ranges.
    """
    tokens = dict.fromkeys(donations, 1)
    if not tokens:
        return tokens

    def urgency(node_id: str) -> tuple[float, float]:
        room = sum(size - 1 for _, size in ranges_by_owner[node_id][: tokens[node_id]])
        return max(donations[node_id] - room, 0.0), donations[node_id] / tokens[node_id]

    for _ in range(count - len(tokens)):
        tokens[max(tokens, key=urgency)] += 1
    return tokens


def _cut_fronts(largest: list[tuple[Token, int]], tokens: int, amount: float) -> list[Token]:
    """Tokens that take `amount` from the front of these ranges, in equal pieces per token.

    A piece never takes a whole range: the donor's token keeps at least its own position.
    More tokens than ranges subdivide the joiner's pieces (same ownership, all tokens used).
    """
    pieces = [tokens // len(largest) + (i < tokens % len(largest)) for i in range(len(largest))]
    takes = [0] * len(largest)
    remaining, pieces_left = amount, tokens
    # Water-fill: ranges that cannot give a full equal piece give all they can, first.
    for i in sorted(range(len(largest)), key=lambda i: (largest[i][1] - 1) / pieces[i]):
        takes[i] = min(largest[i][1] - 1, int(remaining * pieces[i] / pieces_left))
        remaining -= takes[i]
        pieces_left -= pieces[i]
    cuts: list[Token] = []
    for (start, _), take, piece_count in zip(largest, takes, pieces):
        count = min(piece_count, take)  # a piece of k tokens needs at least k tokens of room
        cuts += [(start + take * (j + 1) // count) % TOKEN_SPACE for j in range(count)]
    return cuts


def _check_node(node: RingNode) -> None:
    if not node.node_id or not node.tokens:
        raise ValueError(f"ring node {node.node_id!r} needs an id and tokens (allocate them first)")
    if len(set(node.tokens)) != len(node.tokens):
        raise ValueError(f"node {node.node_id!r} lists a token twice")
    if not all(isinstance(t, int) and 0 <= t < TOKEN_SPACE for t in node.tokens):
        raise ValueError(f"node {node.node_id!r} has a token outside the integers [0, 2**64)")


def _check_replication_factor(n: int) -> None:
    if n < 1:
        raise ValueError(f"replication factor n must be >= 1, got {n}")

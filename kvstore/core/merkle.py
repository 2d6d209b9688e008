"""Merkle trees for anti-entropy (pure): one fixed-shape tree per token range over (key, version
hash), their comparison, and their versioned wire form. No I/O: callers scan storage and ship trees.

A tree splits its range (start, end] into 2**depth equal buckets in clockwise order; a leaf hashes
the sorted (key, version hash) pairs whose token falls in its bucket, an inner node its two
children. Two replicas with the same range and depth compare roots, descend only into differing
subtrees, and end with the differing buckets; `keys_differing` then compares those buckets'
keys. Versions are hashed by their dots (a dot names one write), never by their sealed values.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from kvstore.core.ring import TOKEN_SPACE, Token, range_size
from kvstore.core.versions import Sibling

MERKLE_WIRE_FORMAT = 1
DIGEST_SIZE = 16  # 128 bits: a chance collision between two differing replicas is negligible
DEFAULT_DEPTH = 10  # 1,024 buckets: ~100 keys per bucket at 100k keys, 16 KiB of leaves on the wire
MAX_DEPTH = 16  # 65,536 leaves = 1 MiB on the wire; deeper trees cost more than they save
_VERSION_PERSON = b"kvs-version-v1"  # blake2b personalisation: separates the three hash domains
_LEAF_PERSON = b"kvs-leaf-v1"
_INNER_PERSON = b"kvs-inner-v1"
_U64 = 2**64

VersionHash = bytes
Bucket = tuple[Token, Token]  # (start_exclusive, end_inclusive), as in Ring.ranges()


def version_hash(siblings: Iterable[Sibling]) -> VersionHash:
    """Hash of a record's sorted sibling dots and tombstone flags.

    Not the values: a value is a sealed envelope whose bytes change when a replica re-wraps it,
    while its dot names the write; equal dot sets are equal versions.
    """
    h = hashlib.blake2b(digest_size=DIGEST_SIZE, person=_VERSION_PERSON)
    for node, counter, tombstone in sorted((s.node, s.counter, s.tombstone) for s in siblings):
        if not 0 <= counter < _U64:
            raise ValueError(f"sibling counter {counter} of node {node!r} is outside 0..2^64-1")
        name = node.encode()
        h.update(len(name).to_bytes(4, "big") + name + counter.to_bytes(8, "big"))
        h.update(b"\x01" if tombstone else b"\x00")
    return h.digest()


def keys_differing(
    mine: Mapping[bytes, VersionHash], theirs: Mapping[bytes, VersionHash]
) -> list[bytes]:
    """Keys present on one side only or with different version hashes, sorted.

    The final step inside a differing bucket: each such key is exchanged both ways and merged.
    """
    return sorted(key for key in mine.keys() | theirs.keys() if mine.get(key) != theirs.get(key))


def token_in_range(token: Token, start_exclusive: Token, end_inclusive: Token) -> bool:
    """True when token lies in (start, end] clockwise; start == end is the whole ring."""
    return (token - start_exclusive - 1) % TOKEN_SPACE < range_size(start_exclusive, end_inclusive)


def _inner(left: bytes, right: bytes) -> bytes:
    return hashlib.blake2b(left + right, digest_size=DIGEST_SIZE, person=_INNER_PERSON).digest()


EMPTY_LEAF = hashlib.blake2b(b"", digest_size=DIGEST_SIZE, person=_LEAF_PERSON).digest()


class MerkleTree:
    """A fixed-shape tree over one token range; build it with `build` or receive it `from_wire`.

    Leaves are the source of truth: inner nodes are recomputed from them, so a tree from the wire
    cannot carry inconsistent inner hashes.
    """

    __slots__ = ("_start", "_end", "_depth", "_size", "_levels")

    def __init__(
        self, start_exclusive: Token, end_inclusive: Token, depth: int, leaves: Sequence[bytes]
    ) -> None:
        _check_shape(start_exclusive, end_inclusive, depth)
        if len(leaves) != 1 << depth:
            raise ValueError(f"a depth-{depth} tree has {1 << depth} leaves, got {len(leaves)}")
        self._start, self._end, self._depth = start_exclusive, end_inclusive, depth
        self._size = range_size(start_exclusive, end_inclusive)
        levels = [list(leaves)]
        while len(levels[-1]) > 1:  # levels[0] = leaves, levels[-1] = [root]
            below = levels[-1]
            levels.append([_inner(below[i], below[i + 1]) for i in range(0, len(below), 2)])
        self._levels = levels

    @classmethod
    def build(
        cls,
        range_start_exclusive: Token,
        range_end_inclusive: Token,
        items: Iterable[tuple[Token, bytes, VersionHash]],
        depth: int = DEFAULT_DEPTH,
    ) -> MerkleTree:
        """The tree of (token, key, version hash) items, all inside (start, end], keys distinct.

        start >= end wraps past zero, as in `range_size`; start == end is the whole ring.
        """
        _check_shape(range_start_exclusive, range_end_inclusive, depth)
        size = range_size(range_start_exclusive, range_end_inclusive)
        first = range_start_exclusive + 1
        buckets = 1 << depth
        contents: list[list[tuple[bytes, bytes]]] = [[] for _ in range(buckets)]
        for token, key, vhash in items:
            offset = (token - first) % TOKEN_SPACE
            if offset >= size or not 0 <= token < TOKEN_SPACE:
                raise ValueError(
                    f"key {key!r} has token {token}, outside the tree's range "
                    f"({range_start_exclusive}, {range_end_inclusive}]"
                )
            contents[offset * buckets // size].append((key, vhash))
        leaves = [_leaf_hash(bucket) if bucket else EMPTY_LEAF for bucket in contents]
        return cls(range_start_exclusive, range_end_inclusive, depth, leaves)

    # --- shape ----------------------------------------------------------------------------

    @property
    def range(self) -> Bucket:
        return (self._start, self._end)

    @property
    def depth(self) -> int:
        return self._depth

    @property
    def root(self) -> bytes:
        return self._levels[-1][0]

    @property
    def leaves(self) -> tuple[bytes, ...]:
        return tuple(self._levels[0])

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, MerkleTree)
            and self._shape() == other._shape()
            and self.root == other.root
        )

    def __hash__(self) -> int:
        return hash((self._shape(), self.root))

    def __repr__(self) -> str:
        return (
            f"MerkleTree(({self._start}, {self._end}], depth={self._depth}, "
            f"root={self.root.hex()[:12]})"
        )

    def bucket_range(self, index: int) -> Bucket:
        """(start_exclusive, end_inclusive) of bucket `index`; start == end means it holds no token
        (only when the range has fewer tokens than buckets)."""
        if not 0 <= index < 1 << self._depth:
            raise ValueError(f"bucket index {index} outside 0..{(1 << self._depth) - 1}")
        lo, hi = self._offsets(index)
        return ((self._start + lo) % TOKEN_SPACE, (self._start + hi) % TOKEN_SPACE)

    def bucket_of(self, token: Token) -> int:
        """Index of the bucket holding `token`, which must lie in the tree's range."""
        offset = (token - self._start - 1) % TOKEN_SPACE
        if offset >= self._size or not 0 <= token < TOKEN_SPACE:
            raise ValueError(
                f"token {token} is outside the tree's range ({self._start}, {self._end}]"
            )
        return offset * (1 << self._depth) // self._size

    def _offsets(self, index: int) -> tuple[int, int]:
        # Bucket i holds the offsets o (token - start - 1) with floor(o * buckets / size) == i,
        # that is o in [ceil(i * size / buckets), ceil((i + 1) * size / buckets)).
        buckets = 1 << self._depth
        return (-(-index * self._size // buckets), -(-(index + 1) * self._size // buckets))

    def _shape(self) -> tuple[int, int, int]:
        return (self._start, self._end, self._depth)

    # --- comparison -----------------------------------------------------------------------

    def diff(self, other: MerkleTree) -> list[Bucket]:
        """Buckets whose contents differ, clockwise; descends only into differing subtrees."""
        if self._shape() != other._shape():
            raise ValueError(
                f"cannot compare trees of different shapes: ({self._start}, {self._end}] depth "
                f"{self._depth} vs ({other._start}, {other._end}] depth {other._depth}"
            )
        differing = [0] if self.root != other.root else []
        for level in range(self._depth - 1, -1, -1):  # from the root's children down to the leaves
            if not differing:
                break
            mine, theirs = self._levels[level], other._levels[level]
            differing = [c for i in differing for c in (2 * i, 2 * i + 1) if mine[c] != theirs[c]]
        return [self.bucket_range(i) for i in differing]

    def leaves_in(
        self, start_exclusive: Token, end_inclusive: Token
    ) -> list[tuple[Token, Token, bytes]]:
        """(bucket start, bucket end, leaf hash) of every non-empty bucket overlapping the
        sub-range (start, end], clockwise; the sub-range must lie inside the tree's range."""
        first = (start_exclusive - self._start) % TOKEN_SPACE  # the sub-range's first offset
        length = range_size(start_exclusive, end_inclusive)
        if first + length <= self._size:
            spans = [(first, first + length)]
        elif self._size == TOKEN_SPACE:  # whole-ring tree: the sub-range may wrap past its start
            spans = [(first, TOKEN_SPACE), (0, first + length - TOKEN_SPACE)]
        else:
            raise ValueError(
                f"sub-range ({start_exclusive}, {end_inclusive}] is not inside the tree's range "
                f"({self._start}, {self._end}]"
            )
        buckets = 1 << self._depth
        indices: dict[int, None] = {}  # ordered set: a wrapping sub-range may meet one bucket twice
        for lo, hi in spans:
            for index in range(lo * buckets // self._size, (hi - 1) * buckets // self._size + 1):
                bucket_lo, bucket_hi = self._offsets(index)
                if bucket_lo != bucket_hi:
                    indices[index] = None
        return [(*self.bucket_range(i), self._levels[0][i]) for i in indices]

    # --- wire -----------------------------------------------------------------------------

    def to_wire(self) -> list[Any]:
        """[format, start_exclusive, end_inclusive, depth, concatenated leaf hashes]: msgpack-able;
        inner nodes are recomputed by the receiver."""
        return [MERKLE_WIRE_FORMAT, self._start, self._end, self._depth, b"".join(self._levels[0])]

    @classmethod
    def from_wire(cls, doc: Any) -> MerkleTree:
        """A tree from `to_wire` output; raises ValueError naming the field at fault."""
        if not isinstance(doc, (list, tuple)) or len(doc) != 5:
            raise ValueError(
                "merkle tree: expected a list of 5 fields [format, start, end, depth, leaves]"
            )
        version, start, end, depth, leaves = doc
        if version != MERKLE_WIRE_FORMAT or isinstance(version, bool):
            raise ValueError(
                f"merkle tree: unknown format {version!r} (this node reads {MERKLE_WIRE_FORMAT})"
            )
        _check_shape(start, end, depth, prefix="merkle tree: ")
        if not isinstance(leaves, bytes) or len(leaves) != (1 << depth) * DIGEST_SIZE:
            got = f"{len(leaves)} bytes" if isinstance(leaves, bytes) else type(leaves).__name__
            raise ValueError(
                f"merkle tree: leaves must be {1 << depth} hashes of {DIGEST_SIZE} bytes "
                f"({(1 << depth) * DIGEST_SIZE} bytes), got {got}"
            )
        hashes = [leaves[i : i + DIGEST_SIZE] for i in range(0, len(leaves), DIGEST_SIZE)]
        tree = cls(start, end, depth, hashes)
        for index, leaf in enumerate(hashes):
            lo, hi = tree._offsets(index)
            if lo == hi and leaf != EMPTY_LEAF:
                raise ValueError(
                    f"merkle tree: bucket {index} holds no token but its leaf is not empty"
                )
        return tree


def _leaf_hash(pairs: list[tuple[bytes, bytes]]) -> bytes:
    pairs.sort()
    h = hashlib.blake2b(digest_size=DIGEST_SIZE, person=_LEAF_PERSON)
    previous = None
    for key, vhash in pairs:
        if key == previous:
            raise ValueError(f"key {key!r} appears twice in the tree's items")
        previous = key
        h.update(len(key).to_bytes(4, "big") + key + len(vhash).to_bytes(4, "big") + vhash)
    return h.digest()


def _check_shape(start: Any, end: Any, depth: Any, prefix: str = "") -> None:
    for name, token in (("range start", start), ("range end", end)):
        if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < TOKEN_SPACE:
            raise ValueError(f"{prefix}{name} must be a token in [0, 2**64), got {token!r}")
    if not isinstance(depth, int) or isinstance(depth, bool) or not 0 <= depth <= MAX_DEPTH:
        raise ValueError(f"{prefix}depth must be an integer in 0..{MAX_DEPTH}, got {depth!r}")

"""Merkle trees for anti-entropy, checked against a naive model: a dict of bucket contents."""

import random
from fractions import Fraction

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.core.merkle import (
    DIGEST_SIZE,
    EMPTY_LEAF,
    MAX_DEPTH,
    MerkleTree,
    keys_differing,
    token_in_range,
    version_hash,
)
from kvstore.core.ring import TOKEN_SPACE, key_token, range_size
from kvstore.core.versions import Sibling

FAST = settings(max_examples=150, deadline=None)
LAST = TOKEN_SPACE - 1


# --- the naive model: each bucket's set of (key, version hash), by exact fractions --------------


def naive_bucket(start: int, end: int, depth: int, token: int) -> int:
    """The bucket of a token: its clockwise position in (start, end] scaled to 2**depth parts."""
    position = (token - start - 1) % TOKEN_SPACE  # tokens strictly between start and token
    return int(Fraction(position * 2**depth, range_size(start, end)))


def naive_contents(start, end, depth, items) -> dict[int, set[tuple[bytes, bytes]]]:
    contents: dict[int, set[tuple[bytes, bytes]]] = {}
    for token, key, vhash in items:
        contents.setdefault(naive_bucket(start, end, depth, token), set()).add((key, vhash))
    return contents


def naive_diff(start, end, depth, mine, theirs) -> list[int]:
    a, b = naive_contents(start, end, depth, mine), naive_contents(start, end, depth, theirs)
    return sorted(i for i in a.keys() | b.keys() if a.get(i) != b.get(i))


# --- strategies ---------------------------------------------------------------------------------

TOKENS = st.one_of(st.integers(0, LAST), st.sampled_from([0, 1, 2**63, LAST - 1, LAST]))


@st.composite
def token_ranges(draw):
    """(start, end): arbitrary (often wrapping), the whole ring, or fewer tokens than buckets."""
    start = draw(TOKENS)
    kind = draw(st.sampled_from(["arbitrary", "wraps", "whole", "tiny"]))
    if kind == "whole":
        return start, start
    if kind == "tiny":
        return start, (start + draw(st.integers(1, 40))) % TOKEN_SPACE
    if kind == "wraps":
        return draw(st.integers(2**63, LAST)), draw(st.integers(0, 2**63))
    return start, draw(TOKENS)


@st.composite
def trees(draw, max_items=40):
    """(start, end, depth, items) with distinct keys and tokens inside the range."""
    start, end = draw(token_ranges())
    size = range_size(start, end)
    depth = draw(st.integers(0, 6))
    keys = draw(st.lists(st.binary(max_size=6), unique=True, max_size=max_items))
    items = [
        ((start + 1 + draw(st.integers(0, size - 1))) % TOKEN_SPACE, key,
         draw(st.binary(min_size=DIGEST_SIZE, max_size=DIGEST_SIZE)))
        for key in keys
    ]
    return start, end, depth, items


def as_dict(items) -> dict[bytes, bytes]:
    return {key: vhash for _, key, vhash in items}


# --- comparison ---------------------------------------------------------------------------------


@FAST
@given(trees(), st.randoms(use_true_random=False))
def test_identical_item_sets_have_equal_roots_and_no_diff(tree, rnd):
    start, end, depth, items = tree
    shuffled = list(items)
    rnd.shuffle(shuffled)
    mine = MerkleTree.build(start, end, items, depth=depth)
    theirs = MerkleTree.build(start, end, iter(shuffled), depth=depth)
    assert mine.root == theirs.root
    assert mine == theirs
    assert mine.diff(theirs) == []


@FAST
@given(trees(), st.data())
def test_one_changed_added_or_removed_item_differs_in_exactly_its_bucket(tree, data):
    start, end, depth, items = tree
    change = data.draw(st.sampled_from(["change", "add", "remove"] if items else ["add"]))
    theirs = list(items)
    if change == "add":
        key = data.draw(st.binary(max_size=6).filter(lambda k: k not in as_dict(items)))
        offset = data.draw(st.integers(0, range_size(start, end) - 1))
        token = (start + 1 + offset) % TOKEN_SPACE
        theirs.append((token, key, b"\x07" * DIGEST_SIZE))
    else:
        index = data.draw(st.integers(0, len(items) - 1))
        token, key, vhash = items[index]
        if change == "remove":
            del theirs[index]
        else:
            theirs[index] = (token, key, bytes(b ^ 0xFF for b in vhash))

    mine_tree = MerkleTree.build(start, end, items, depth=depth)
    theirs_tree = MerkleTree.build(start, end, theirs, depth=depth)
    bucket = naive_bucket(start, end, depth, token)
    assert naive_diff(start, end, depth, items, theirs) == [bucket]
    assert mine_tree.root != theirs_tree.root
    assert mine_tree.diff(theirs_tree) == [mine_tree.bucket_range(bucket)]
    assert theirs_tree.diff(mine_tree) == [mine_tree.bucket_range(bucket)]
    assert mine_tree.bucket_of(token) == bucket

    # The final key-level step: only the keys in the differing bucket are compared.
    lo, hi = mine_tree.bucket_range(bucket)
    assert token_in_range(token, lo, hi)

    def in_bucket(item_set):
        return {k: v for t, k, v in item_set if token_in_range(t, lo, hi)}

    assert keys_differing(in_bucket(items), in_bucket(theirs)) == [key]


@FAST
@given(trees(), trees())
def test_diff_names_exactly_the_buckets_the_model_says_differ(tree, other):
    start, end, depth, items = tree
    # Reuse the other draw's keys and hashes, moved into this range: some buckets agree, most not.
    moved = [(t if token_in_range(t, start, end) else (start + 1 + t % range_size(start, end))
              % TOKEN_SPACE, k, v) for t, k, v in other[3]]
    shared = items[: len(items) // 2]
    theirs = shared + [item for item in moved if item[1] not in as_dict(shared)]
    mine_tree = MerkleTree.build(start, end, items, depth=depth)
    theirs_tree = MerkleTree.build(start, end, theirs, depth=depth)
    expected = naive_diff(start, end, depth, items, theirs)
    assert mine_tree.diff(theirs_tree) == [mine_tree.bucket_range(i) for i in expected]
    assert (mine_tree.root == theirs_tree.root) == (expected == [])


def test_diff_descends_only_into_differing_subtrees():
    items = [(key_token(k), k, version_hash([Sibling("n1", 1)])) for k in (b"a", b"b", b"c")]
    mine = MerkleTree.build(0, 0, items, depth=8)
    theirs = MerkleTree.build(0, 0, items[:2], depth=8)

    class CountingLeaves(list):
        reads = 0

        def __getitem__(self, index):
            CountingLeaves.reads += 1
            return super().__getitem__(index)

    mine._levels = [CountingLeaves(level) for level in mine._levels]
    assert mine.diff(theirs) == [mine.bucket_range(mine.bucket_of(items[2][0]))]
    assert CountingLeaves.reads <= 2 * 8 + 1  # two children per level, plus the root


def test_trees_of_different_shapes_are_not_compared():
    a = MerkleTree.build(0, 100, [], depth=4)
    for b in (MerkleTree.build(0, 101, [], depth=4), MerkleTree.build(0, 100, [], depth=5)):
        with pytest.raises(ValueError, match="different shapes"):
            a.diff(b)


def test_keys_differing_finds_missing_extra_and_changed_keys():
    mine = {b"same": b"1", b"changed": b"1", b"only-mine": b"1"}
    theirs = {b"same": b"1", b"changed": b"2", b"only-theirs": b"1"}
    assert keys_differing(mine, theirs) == [b"changed", b"only-mine", b"only-theirs"]
    assert keys_differing(mine, dict(mine)) == []


# --- shape: buckets, wrap-around, sub-ranges ----------------------------------------------------


@FAST
@given(token_ranges(), st.integers(0, 8))
def test_buckets_tile_the_range_clockwise_in_equal_parts(bounds, depth):
    start, end = bounds
    tree = MerkleTree.build(start, end, [], depth=depth)
    size = range_size(start, end)
    ranges = [tree.bucket_range(i) for i in range(2**depth)]
    assert ranges[0][0] == start and ranges[-1][1] == end
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    sizes = [0 if lo == hi and depth else range_size(lo, hi) for lo, hi in ranges]
    assert sum(sizes) == size
    assert max(sizes) - min(sizes) <= 1
    for index, (lo, hi) in enumerate(ranges):
        if lo != hi or depth == 0:  # a non-empty bucket: its first and last token are its own
            first, last = (lo + 1) % TOKEN_SPACE, hi
            assert tree.bucket_of(first) == tree.bucket_of(last) == index
            assert naive_bucket(start, end, depth, first) == index
            assert naive_bucket(start, end, depth, last) == index


def test_wrap_around_range_puts_tokens_either_side_of_zero_in_their_buckets():
    start, end = LAST - 1000, 999  # 2,000 tokens: 1,000 up to LAST, then 0..999
    items = [(LAST, b"before-zero", b"v" * 16), (0, b"zero", b"v" * 16), (999, b"end", b"v" * 16)]
    tree = MerkleTree.build(start, end, items, depth=1)
    assert tree.bucket_range(0) == (start, LAST)
    assert tree.bucket_range(1) == (LAST, 999)
    assert [tree.bucket_of(t) for t, _, _ in items] == [0, 1, 1]
    without_zero = MerkleTree.build(start, end, [items[0], items[2]], depth=1)
    assert tree.diff(without_zero) == [(LAST, 999)]
    with pytest.raises(ValueError, match="outside the tree's range"):
        MerkleTree.build(start, end, [(start, b"start is exclusive", b"v" * 16)])
    with pytest.raises(ValueError, match="outside the tree's range"):
        MerkleTree.build(start, end, [(1000, b"past the end", b"v" * 16)])


def test_whole_ring_tree_takes_every_token():
    keys = [b"key-%d" % i for i in range(500)]
    items = [(key_token(k), k, b"h" * 16) for k in keys] + [(0, b"at-zero", b"h" * 16)]
    tree = MerkleTree.build(12345, 12345, items, depth=10)
    assert tree.bucket_range(0)[0] == 12345 and tree.bucket_range(1023)[1] == 12345
    assert tree.bucket_of(12345) == 1023 and tree.bucket_of(12346) == 0


def test_range_with_fewer_tokens_than_buckets_leaves_buckets_empty():
    tree = MerkleTree.build(10, 13, [(11, b"a", b"x" * 16), (13, b"b", b"x" * 16)], depth=3)
    non_empty = [i for i in range(8) if tree.bucket_range(i)[0] != tree.bucket_range(i)[1]]
    assert [tree.bucket_range(i) for i in non_empty] == [(10, 11), (11, 12), (12, 13)]
    assert all(tree.leaves[i] == EMPTY_LEAF for i in range(8) if i not in non_empty)


@FAST
@given(st.integers(0, LAST), st.integers(1, 300), st.integers(0, 5), st.data())
def test_leaves_in_returns_the_non_empty_buckets_a_sub_range_touches(start, size, depth, data):
    whole = data.draw(st.booleans())
    end = start if whole else (start + size) % TOKEN_SPACE
    span = TOKEN_SPACE if whole else size
    tree = MerkleTree.build(start, end, [], depth=depth)
    sub_first = data.draw(st.integers(0, span - 1))
    sub_length = data.draw(st.integers(1, min(span - sub_first if not whole else span, 300)))
    sub_start = (start + sub_first) % TOKEN_SPACE
    sub_end = (sub_start + sub_length) % TOKEN_SPACE
    touched = list(dict.fromkeys(tree.bucket_of((sub_start + i) % TOKEN_SPACE)
                                 for i in range(1, sub_length + 1)))  # naive: every token
    assert tree.leaves_in(sub_start, sub_end) == [
        (*tree.bucket_range(i), tree.leaves[i]) for i in touched
    ]


def test_leaves_in_rejects_a_sub_range_outside_the_tree():
    tree = MerkleTree.build(100, 200, [], depth=2)
    for sub in ((99, 150), (150, 201), (200, 300)):
        with pytest.raises(ValueError, match="not inside"):
            tree.leaves_in(*sub)


def test_build_rejects_a_key_listed_twice():
    with pytest.raises(ValueError, match="twice"):
        MerkleTree.build(0, 0, [(5, b"k", b"1" * 16), (5, b"k", b"2" * 16)])


def test_building_a_hundred_thousand_items_is_fast_enough_to_run_in_a_unit_test():
    rnd = random.Random(7)
    items = [(rnd.getrandbits(64), b"key-%d" % i, rnd.randbytes(16)) for i in range(100_000)]
    tree = MerkleTree.build(0, 0, items)
    assert tree.depth == 10 and len(tree.leaves) == 1024
    assert EMPTY_LEAF not in tree.leaves  # ~98 items per bucket


# --- version hashes -----------------------------------------------------------------------------


def test_version_hash_covers_dots_and_tombstones_not_values_or_order():
    a, b = Sibling("n1", 3, {"n2": 1}, b"sealed-1", hlc=5), Sibling("n2", 1, {}, b"v", hlc=2)
    rewrapped = Sibling("n1", 3, {"n2": 1}, b"sealed-differently", hlc=5)
    assert version_hash([a, b]) == version_hash([b, rewrapped])
    assert len(version_hash([a])) == DIGEST_SIZE
    distinct = {
        version_hash([]),
        version_hash([a]),
        version_hash([a, b]),
        version_hash([Sibling("n1", 4, {}, b"sealed-1")]),
        version_hash([Sibling("n1", 3, {}, None)]),  # the same dot as a tombstone
        version_hash([Sibling("n", 13, {}, b"x")]),  # "n1",3 vs "n",13: encodings do not collide
    }
    assert len(distinct) == 6


# --- wire ---------------------------------------------------------------------------------------


@FAST
@given(trees())
def test_wire_round_trip_through_msgpack(tree):
    start, end, depth, items = tree
    built = MerkleTree.build(start, end, items, depth=depth)
    received = MerkleTree.from_wire(msgpack.unpackb(msgpack.packb(built.to_wire())))
    assert received == built
    assert received.leaves == built.leaves and received.range == (start, end)
    assert received.diff(built) == []


def test_wire_format_version_one_is_the_documented_list():
    tree = MerkleTree.build(5, 9, [(7, b"k", b"h" * 16)], depth=1)
    version, start, end, depth, leaves = tree.to_wire()
    assert (version, start, end, depth) == (1, 5, 9, 1)
    assert leaves == b"".join(tree.leaves) and len(leaves) == 2 * DIGEST_SIZE


GOOD = MerkleTree.build(0, 2**40, [(7, b"k", b"h" * 16)], depth=2).to_wire()


@pytest.mark.parametrize(
    ("doc", "problem"),
    [
        ("not a list", "list of 5 fields"),
        (GOOD[:4], "list of 5 fields"),
        ([2, *GOOD[1:]], "unknown format 2"),
        ([True, *GOOD[1:]], "unknown format True"),
        ([1, -1, *GOOD[2:]], "range start"),
        ([1, 0, TOKEN_SPACE, *GOOD[3:]], "range end"),
        ([1, "0", *GOOD[2:]], "range start"),
        ([*GOOD[:3], MAX_DEPTH + 1, GOOD[4]], "depth"),
        ([*GOOD[:3], 2.0, GOOD[4]], "depth"),
        ([*GOOD[:4], GOOD[4][:-1]], "leaves must be 4 hashes"),
        ([*GOOD[:4], "leaves"], "got str"),
        ([1, 0, 2, 2, b"\x00" * 4 * DIGEST_SIZE], "bucket 1 holds no token"),
    ],
)
def test_from_wire_rejects_malformed_trees_naming_the_problem(doc, problem):
    with pytest.raises(ValueError, match=problem):
        MerkleTree.from_wire(doc)

"""Ring placement, ownership and allocation, checked against a deliberately naive model."""

import ast
import hashlib
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kvstore.core.ring as ring_module
from kvstore.core.ring import (
    TOKEN_SPACE,
    Ring,
    RingNode,
    allocate_tokens,
    key_token,
    moved_ranges,
    random_tokens,
    range_size,
)

FAST = settings(max_examples=60, deadline=None)


# --- the naive model: a linear scan over every (token, node) claim ---------------------------


def naive_walk(nodes: list[RingNode], token: int) -> list[str]:
    claims = sorted((t, node.node_id) for node in nodes for t in node.tokens)
    clockwise = [node_id for t, node_id in claims if t >= token] + [
        node_id for t, node_id in claims if t < token
    ]
    return list(dict.fromkeys(clockwise))


def naive_preference_list(nodes: list[RingNode], key_or_token: bytes | int, n: int) -> list[str]:
    token = key_token(key_or_token) if isinstance(key_or_token, bytes) else key_or_token
    walk = naive_walk(nodes, token)
    zone = {node.node_id: node.zone for node in nodes}
    if not any(zone.values()):
        return walk[:n]
    zone_firsts: list[str] = []
    for node_id in walk:
        if zone[node_id] not in {zone[p] for p in zone_firsts}:
            zone_firsts.append(node_id)
    picked = zone_firsts[:n]
    return (picked + [node_id for node_id in walk if node_id not in picked])[:n]


def in_range(token: int, start_exclusive: int, end_inclusive: int) -> bool:
    return (token - start_exclusive - 1) % TOKEN_SPACE < range_size(start_exclusive, end_inclusive)


# --- strategies -------------------------------------------------------------------------------

tokens_st = st.integers(0, TOKEN_SPACE - 1)
keys_st = st.one_of(st.binary(max_size=12), tokens_st)


@st.composite
def ring_tables(draw, min_nodes=1, max_nodes=7, zones=("",)):
    count = draw(st.integers(min_nodes, max_nodes))
    return [
        RingNode(
            f"node-{i}",
            f"10.0.0.{i}:7400",
            draw(st.sampled_from(zones)),
            tuple(draw(st.lists(tokens_st, min_size=1, max_size=6, unique=True))),
        )
        for i in range(count)
    ]


any_zoning = st.sampled_from([("",), ("", "a", "b"), ("a", "b", "c")])


@st.composite
def zoned_ring_tables(draw, min_nodes=1):
    return draw(ring_tables(min_nodes=min_nodes, zones=draw(any_zoning)))


def newcomer(tokens: tuple[int, ...], zone: str = "") -> RingNode:
    return RingNode("node-new", "10.0.0.99:7400", zone, tokens)


# --- tokens -----------------------------------------------------------------------------------


def test_key_token_is_first_8_bytes_of_blake2b_and_stable_across_processes():
    assert key_token(b"kvstore") == 6207448997899732193
    assert key_token(b"x") == int.from_bytes(hashlib.blake2b(b"x", digest_size=8).digest(), "big")


def test_range_size_counts_tokens_clockwise_and_equal_ends_mean_whole_ring():
    assert range_size(5, 10) == 5
    assert range_size(TOKEN_SPACE - 1, 0) == 1
    assert range_size(7, 7) == TOKEN_SPACE


# --- preference lists -------------------------------------------------------------------------


@FAST
@given(zoned_ring_tables(), st.lists(keys_st, min_size=1, max_size=5), st.integers(1, 5))
def test_preference_list_has_n_distinct_nodes_and_matches_naive_model(nodes, keys, n):
    ring = Ring(nodes)
    for key in keys:
        replicas = ring.preference_list(key, n)
        assert len(set(replicas)) == len(replicas) == min(n, len(nodes))
        assert replicas == naive_preference_list(nodes, key, n)
        if isinstance(key, bytes):  # the hot path's form: the same replicas, computed cold or cached
            cold = Ring(nodes)
            assert cold.replicas_of(key, n) == tuple(replicas)
            assert cold.replicas_of(key, n) == ring.replicas_of(key, n) == tuple(replicas)


@FAST
@given(ring_tables(), keys_st)
def test_walk_visits_every_node_once_starting_with_the_primary(nodes, key):
    ring = Ring(nodes)
    walked = list(ring.walk(key))
    token = key_token(key) if isinstance(key, bytes) else key
    assert walked == naive_walk(nodes, token)
    assert sorted(walked) == sorted(ring.node_ids)
    assert walked[0] == ring.preference_list(key, 1)[0]


def test_preference_list_skips_a_node_met_twice():
    ring = Ring([RingNode("a", "", tokens=(10, 20)), RingNode("b", "", tokens=(30,))])
    assert ring.preference_list(5, 2) == ["a", "b"]
    assert ring.preference_list(25, 3) == ["b", "a"]
    assert ring.preference_list(31, 2) == ["a", "b"]  # wraps past the last token


def test_zones_come_before_a_second_node_of_the_same_zone():
    ring = Ring(
        [
            RingNode("a1", "", "a", (10,)),
            RingNode("a2", "", "a", (20,)),
            RingNode("b1", "", "b", (30,)),
        ]
    )
    assert ring.preference_list(0, 2) == ["a1", "b1"]
    assert ring.preference_list(0, 3) == ["a1", "b1", "a2"]


@FAST
@given(ring_tables(min_nodes=3, zones=("a", "b", "c")), st.lists(keys_st, max_size=8))
def test_three_zones_give_every_key_replicas_in_three_zones(nodes, keys):
    if len({node.zone for node in nodes}) < 3:
        nodes = [RingNode(n.node_id, n.address, "abc"[i % 3], n.tokens)
                 for i, n in enumerate(nodes)]
    ring = Ring(nodes)
    for key in keys + [start for start, _, _ in ring.ranges()]:
        zones = {ring.nodes[node_id].zone for node_id in ring.preference_list(key, 3)}
        assert zones == {"a", "b", "c"}


def test_token_claimed_by_two_nodes_goes_to_the_smaller_node_id_and_the_other_follows():
    for order in (1, -1):
        nodes = [RingNode("b", "", tokens=(100,)), RingNode("a", "", tokens=(100, 200))]
        ring = Ring(nodes[::order])
        assert ring.preference_list(50, 2) == ["a", "b"]
        assert ring.ownership() == {"a": 1.0, "b": 0.0}
        assert [owner for _, _, owner in ring.ranges()] == ["a", "a"]


# --- membership changes -----------------------------------------------------------------------


@FAST
@given(zoned_ring_tables(), st.lists(tokens_st, min_size=1, max_size=6, unique=True), st.data())
def test_adding_a_node_moves_keys_only_to_it(nodes, new_tokens, data):
    zones = sorted({node.zone for node in nodes})
    zone = data.draw(st.sampled_from(zones + ["z-new"])) if zones != [""] else ""
    joiner = newcomer(tuple(new_tokens), zone)
    old, new = Ring(nodes), Ring(nodes + [joiner])
    samples = data.draw(st.lists(keys_st, min_size=1, max_size=10)) + new_tokens
    for key in samples:
        assert new.preference_list(key, 1)[0] in (old.preference_list(key, 1)[0], joiner.node_id)
        for n in (1, 2, 3):
            before, after = old.preference_list(key, n), new.preference_list(key, n)
            assert set(after) - {joiner.node_id} <= set(before)
            if zones == [""]:  # without zones the order is kept too: the joiner slots in
                kept = [node_id for node_id in after if node_id != joiner.node_id]
                assert kept == before[: len(kept)]


@FAST
@given(zoned_ring_tables(min_nodes=2), st.data())
def test_removing_a_node_moves_only_its_keys(nodes, data):
    leaver = data.draw(st.sampled_from(nodes))
    old = Ring(nodes)
    new = Ring(node for node in nodes if node is not leaver)
    for key in data.draw(st.lists(keys_st, min_size=1, max_size=10)) + list(leaver.tokens):
        if old.preference_list(key, 1) != [leaver.node_id]:
            assert new.preference_list(key, 1) == old.preference_list(key, 1)
        for n in (1, 2, 3):
            before, after = old.preference_list(key, n), new.preference_list(key, n)
            assert set(before) - {leaver.node_id} <= set(after)


@FAST
@given(zoned_ring_tables(), zoned_ring_tables(), st.integers(1, 4), st.lists(tokens_st, max_size=9))
def test_moved_ranges_match_preference_lists(old_nodes, new_nodes, n, samples):
    old, new = Ring(old_nodes), Ring(new_nodes[:2] + old_nodes[2:])
    moved = moved_ranges(old, new, n)
    boundaries = {t for ring in (old, new) for _, t, _ in ring.ranges()}
    for token in samples + [(t + delta) % TOKEN_SPACE for t in boundaries for delta in (0, 1)]:
        before, after = set(old.preference_list(token, n)), set(new.preference_list(token, n))
        containing = [(b, a) for start, end, b, a in moved if in_range(token, start, end)]
        assert containing == ([] if before == after else [(before, after)])


def test_moved_ranges_between_equal_rings_is_empty():
    nodes = [RingNode("a", "", tokens=(1, 2**63)), RingNode("b", "", tokens=(2**62,))]
    assert moved_ranges(Ring(nodes), Ring(reversed(nodes)), 2) == []


def test_moved_ranges_from_an_empty_ring_covers_everything():
    ring = Ring([RingNode("a", "", tokens=(5,))])
    assert moved_ranges(Ring(), ring, 3) == [(5, 5, frozenset(), frozenset({"a"}))]


# --- identity ---------------------------------------------------------------------------------


@FAST
@given(ring_tables(), st.randoms(use_true_random=False))
def test_ring_is_independent_of_input_order(nodes, rng):
    shuffled = [
        RingNode(n.node_id, n.address, n.zone, tuple(rng.sample(n.tokens, len(n.tokens))))
        for n in nodes
    ]
    rng.shuffle(shuffled)
    assert Ring(shuffled) == Ring(nodes)
    assert Ring(shuffled).digest() == Ring(nodes).digest()
    assert Ring(shuffled).ranges() == Ring(nodes).ranges()


@FAST
@given(ring_tables(), st.data())
def test_digest_changes_when_tokens_change(nodes, data):
    victim = data.draw(st.sampled_from(nodes))
    moved_token = data.draw(tokens_st.filter(lambda t: t not in victim.tokens))
    tokens = victim.tokens[:-1] + (moved_token,)
    changed = RingNode(victim.node_id, victim.address, victim.zone, tokens)
    others = [node for node in nodes if node is not victim]
    assert Ring(others + [changed]).digest() != Ring(nodes).digest()


def test_digest_covers_address_and_zone_and_is_stable_across_processes():
    nodes = [
        RingNode("a", "10.0.0.1:7400", "z1", (1, 2**63)),
        RingNode("b", "10.0.0.2:7400", "z2", (2**62,)),
    ]
    digest = Ring(nodes).digest()
    # Pinned: a change here means nodes of different versions disagree about the ring.
    assert digest == "a09f05d92753c1de3f4416e394cc13e5d2d85c293526e8b96699ff1d243ce980"
    assert Ring([nodes[0], RingNode("b", "10.0.0.3:7400", "z2", (2**62,))]).digest() != digest
    assert Ring([nodes[0], RingNode("b", "10.0.0.2:7400", "z1", (2**62,))]).digest() != digest


def test_ring_table_accessors():
    ring = Ring([RingNode("b", "addr-b", tokens=(9,)), RingNode("a", "addr-a", tokens=(3,))])
    assert len(ring) == 2
    assert ring.node_ids == ("a", "b")
    assert ring.nodes["b"].address == "addr-b"


# --- ownership --------------------------------------------------------------------------------


@FAST
@given(zoned_ring_tables(), st.integers(1, 4))
def test_ownership_sums_to_one_and_replicas_to_min_n_nodes(nodes, n):
    ring = Ring(nodes)
    assert sum(ring.ownership().values()) == pytest.approx(1.0)
    assert sum(ring.replica_ownership(n).values()) == pytest.approx(min(n, len(nodes)))
    by_ranges = dict.fromkeys(ring.node_ids, 0)
    for start, end, owner in ring.ranges():
        by_ranges[owner] += range_size(start, end)
    assert ring.ownership() == pytest.approx({k: v / TOKEN_SPACE for k, v in by_ranges.items()})


@FAST
@given(ring_tables())
def test_ranges_cover_the_ring_once_and_end_at_their_owners_tokens(nodes):
    ranges = Ring(nodes).ranges()
    assert sum(range_size(start, end) for start, end, _ in ranges) == TOKEN_SPACE
    for (_, previous_end, _), (start, end, owner) in zip(ranges[-1:] + ranges, ranges):
        assert start == previous_end
        assert naive_walk(nodes, end)[0] == owner


def test_balanced_allocation_keeps_max_over_mean_below_sanity_bound():
    rng = random.Random(3)
    members: list[RingNode] = []
    ring = Ring()
    for size in range(1, 17):
        members.append(RingNode(f"n{size}", "", tokens=allocate_tokens(ring, 64, rng)))
        ring = Ring(members)
        if size >= 3:
            shares = ring.ownership().values()
            assert max(shares) * size < 1.15, f"{size} nodes"


def test_allocation_on_an_empty_ring_spaces_tokens_evenly():
    tokens = allocate_tokens(None, 4, random.Random(0))
    gaps = {range_size(a, b) for a, b in zip(tokens, tokens[1:] + tokens[:1])}
    assert gaps == {TOKEN_SPACE // 4}


@pytest.mark.parametrize(
    "existing",
    [
        [RingNode("a", "", tokens=(123,))],  # more new tokens than existing ranges
        # ranges too small to split
        [RingNode("a", "", tokens=(0, 1)), RingNode("b", "", tokens=(2,))],
        [RingNode(f"n{i}", "", tokens=(i * 2**58,)) for i in range(40)],  # more nodes than tokens
    ],
)
def test_allocated_tokens_are_new_distinct_and_as_many_as_asked(existing):
    ring = Ring(existing)
    tokens = allocate_tokens(ring, 16, random.Random(1))
    assert len(set(tokens)) == 16
    assert not set(tokens) & {end for _, end, _ in ring.ranges()}
    assert all(0 <= t < TOKEN_SPACE for t in tokens)


def test_random_tokens_are_distinct_and_avoid_excluded():
    tokens = random_tokens(100, random.Random(5), exclude={1, 2, 3})
    assert len(set(tokens)) == 100 and not {1, 2, 3} & set(tokens)


# --- warnings and validation ------------------------------------------------------------------


def test_warning_for_cluster_smaller_than_replication_factor():
    two = Ring([RingNode("a", "", tokens=(1,)), RingNode("b", "", tokens=(2,))])
    assert two.warning_for(3) == (
        "cluster has 2 nodes, fewer than replication factor n=3: each key has only 2 replicas"
    )
    assert two.warning_for(2) is None
    assert "1 node," in Ring([RingNode("a", "", tokens=(1,))]).warning_for(3)


def test_warning_for_fewer_zones_than_replication_factor():
    ring = Ring([RingNode(f"n{i}", "", "ab"[i % 2], (i,)) for i in range(4)])
    assert "2 zones" in ring.warning_for(3)
    assert ring.warning_for(2) is None


@pytest.mark.parametrize(
    "nodes",
    [
        [RingNode("a", "", tokens=(1,)), RingNode("a", "", tokens=(2,))],
        [RingNode("a", "", tokens=())],
        [RingNode("a", "", tokens=(TOKEN_SPACE,))],
        [RingNode("a", "", tokens=(-1,))],
        [RingNode("a", "", tokens=(4, 4))],
    ],
)
def test_ring_rejects_malformed_tables(nodes):
    with pytest.raises(ValueError):
        Ring(nodes)


def test_empty_ring_has_no_replicas():
    assert Ring().preference_list(b"k", 3) == []
    assert list(Ring().walk(b"k")) == []
    assert Ring().warning_for(1) is not None


def test_preference_list_rejects_bad_arguments():
    ring = Ring([RingNode("a", "", tokens=(1,))])
    with pytest.raises(ValueError):
        ring.preference_list(TOKEN_SPACE, 1)
    with pytest.raises(ValueError):
        ring.preference_list(b"k", 0)


def test_ring_module_imports_nothing_that_does_io():
    allowed = {
        "__future__", "bisect", "hashlib", "json", "collections.abc", "dataclasses", "itertools",
        "types", "typing",
    }
    tree = ast.parse(Path(ring_module.__file__).read_text())
    type_checking_only = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and getattr(block.test, "id", None) == "TYPE_CHECKING"
        for statement in block.body
        for node in ast.walk(statement)
    }
    imported = set()
    for node in ast.walk(tree):
        if id(node) in type_checking_only:
            continue
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module)
    assert imported <= allowed


def test_in_range_handles_wrap_around() -> None:
    from kvstore.core.ring import in_range

    assert in_range(5, 1, 5) and not in_range(1, 1, 5) and not in_range(6, 1, 5)
    assert in_range(2**64 - 1, 2**63, 3) and in_range(0, 2**63, 3) and in_range(3, 2**63, 3)
    assert not in_range(4, 2**63, 3)

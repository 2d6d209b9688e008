"""The pure side of key listing (kvstore/core/listing.py): coverage plans, merging pages that
stop at different places, and prefix bounds."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.core import listing
from kvstore.core.listing import Page

NODES = ["a", "b", "c", "d", "e"]


@given(
    st.lists(st.lists(st.sampled_from(NODES), min_size=1, max_size=3, unique=True), min_size=1, max_size=30),
    st.sets(st.sampled_from(NODES)),
    st.integers(1, 3),
)
def test_plan_covers_each_range_with_distinct_up_replicas_or_reports_it_missing(replica_lists, up, copies) -> None:
    ranges = [((i, i + 1), reps) for i, reps in enumerate(replica_lists)]
    plan = listing.plan(ranges, set(up), "a", copies)
    for rng, reps in ranges:
        askers = [node for node, assigned in plan.assigned.items() if rng in assigned]
        live = [r for r in reps if r in up]
        assert sorted(askers) == sorted(set(askers))
        assert set(askers) <= set(live)
        assert len(askers) == min(copies, len(live))
        assert (rng in plan.missing) == (not live)
        if "a" in live:
            assert "a" in askers  # this node lists what it can itself: no RPC


def test_plan_prefers_nodes_already_asked() -> None:
    ranges = [((0, 1), ["b", "c"]), ((1, 2), ["c", "b"]), ((2, 3), ["d", "b"])]
    plan = listing.plan(ranges, {"b", "c", "d"}, "a")
    assert plan.assigned == {"b": [(0, 1), (1, 2), (2, 3)]}


class _Holder:
    """A node's share: its sorted keys, answering pages like kvstore/node/listing.serve_page,
    with a scan budget that may stop it before the page is full."""

    def __init__(self, keys: set[bytes], budget: int) -> None:
        self.keys = sorted(keys)
        self.budget = budget

    def page(self, after: bytes | None, limit: int) -> Page:
        rest = [k for k in self.keys if after is None or k > after]
        if len(rest) > self.budget:
            if self.budget < limit:
                return Page(rest[: self.budget], rest[self.budget - 1] if self.budget else after)
        if len(rest) > limit:
            return Page(rest[:limit], rest[limit - 1])
        return Page(rest, None)


keys_st = st.sets(st.binary(min_size=1, max_size=3), max_size=40)


@settings(max_examples=200)
@given(st.lists(st.tuples(keys_st, st.integers(1, 6)), min_size=1, max_size=4), st.integers(1, 8))
def test_paging_through_merged_shares_lists_their_union_once_in_order(shares, limit) -> None:
    holders = [_Holder(keys, budget) for keys, budget in shares]
    expected = sorted(set().union(*(keys for keys, _ in shares)))
    got: list[bytes] = []
    cursor: bytes | None = None
    for _ in range(10_000):
        keys, cursor = listing.merge([h.page(cursor, limit) for h in holders], limit)
        assert len(keys) <= limit
        got.extend(keys)
        if cursor is None:
            break
    assert got == expected


def test_merge_stops_at_the_node_that_got_least_far() -> None:
    pages = [Page([b"a", b"m"], None), Page([b"c"], b"f")]  # the second may hold keys after f
    assert listing.merge(pages, 10) == ([b"a", b"c"], b"f")


@given(st.binary(max_size=4), st.binary(max_size=6))
def test_prefix_end_bounds_exactly_the_keys_with_the_prefix(prefix, key) -> None:
    end = listing.prefix_end(prefix)
    inside = prefix <= key and (end is None or key < end)
    assert inside == key.startswith(prefix)


def test_prefix_end_examples() -> None:
    assert listing.prefix_end(b"ab") == b"ac"
    assert listing.prefix_end(b"a\xff") == b"b"
    assert listing.prefix_end(b"\xff\xff") is None
    assert listing.prefix_end(b"") is None

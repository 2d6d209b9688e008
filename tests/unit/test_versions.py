"""Dotted version vectors: merge laws, sibling survival, stamping, against a naive model."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.core import versions
from kvstore.core.versions import Order, Sibling

NODES = ["a", "b", "c"]


@st.composite
def histories(draw: st.DrawFn) -> dict[str, list[Sibling]]:
    """Replica states produced by the real write path: one random history of stamps and merges
    (so a dot always names one write, as it does in a cluster)."""
    replicas: dict[str, list[Sibling]] = {n: [] for n in NODES}
    for _ in range(draw(st.integers(0, 8))):
        node = draw(st.sampled_from(NODES))
        op = draw(st.sampled_from(["write", "blind", "sync"]))
        if op == "sync":
            other = draw(st.sampled_from(NODES))
            replicas[node] = versions.merge(replicas[node], replicas[other])
            continue
        context = versions.context_of(replicas[node]) if op == "write" else {}
        _, replicas[node] = versions.stamp(replicas[node], node, context, b"v", 0)
    return replicas


def dots(siblings: list[Sibling]) -> set:
    return {s.dot for s in siblings}


@settings(max_examples=300)
@given(histories())
def test_merge_is_commutative(h: dict[str, list[Sibling]]) -> None:
    assert versions.merge(h["a"], h["b"]) == versions.merge(h["b"], h["a"])


@settings(max_examples=300)
@given(histories())
def test_merge_is_associative(h: dict[str, list[Sibling]]) -> None:
    a, b, c = h["a"], h["b"], h["c"]
    assert versions.merge(versions.merge(a, b), c) == versions.merge(a, versions.merge(b, c))


@settings(max_examples=300)
@given(histories())
def test_merge_is_idempotent(h: dict[str, list[Sibling]]) -> None:
    assert versions.merge(h["a"], h["a"]) == versions.merge(h["a"])


@settings(max_examples=300)
@given(histories(), st.sampled_from(NODES))
def test_merging_in_one_sibling_takes_the_short_cut_only_when_it_changes_nothing(h, source) -> None:
    """merge(held, [one]) has a fast path for the usual write; it must give what the general
    merge gives (three sets always take the general path), whatever the histories."""
    for one in h[source]:
        for held in h.values():
            assert versions.merge(held, [one]) == versions.merge(held, [one], [])
    incoming, _ = versions.stamp(h["a"], "a", versions.context_of(h["a"]), b"new", 0)
    for held in h.values():
        assert versions.merge(held, [incoming]) == versions.merge(held, [incoming], [])
    # forged: each covers the other's dot (no real history does this; a bad replica could send it)
    held, forged = [Sibling("b", 5, {"a": 3}, b"x")], Sibling("a", 3, {"b": 5}, b"y")
    assert versions.merge(held, [forged]) == versions.merge(held, [forged], []) == []


def naive_survivors(siblings: list[Sibling]) -> set:
    """Reference: a write survives unless some other write's context saw it."""
    return {s.dot for s in siblings if not any(o.vv.get(s.node, 0) >= s.counter for o in siblings)}


@settings(max_examples=300)
@given(histories())
def test_merge_keeps_exactly_the_unseen_writes(h: dict[str, list[Sibling]]) -> None:
    union = {s.dot: s for s in h["a"] + h["b"]}
    assert dots(versions.merge(h["a"], h["b"])) == naive_survivors(list(union.values()))


@settings(max_examples=300)
@given(histories())
def test_no_write_is_lost_once_replicas_sync(h: dict[str, list[Sibling]]) -> None:
    """Every surviving write on any replica survives a full merge unless another write saw it."""
    merged = versions.merge(*h.values())
    everything = {s.dot: s for sibs in h.values() for s in sibs}
    assert dots(merged) == naive_survivors(list(everything.values()))


def test_blind_writes_through_one_coordinator_become_siblings() -> None:
    first, stored = versions.stamp([], "a", {}, b"one", 1)
    second, stored = versions.stamp(stored, "a", {}, b"two", 2)
    assert first.dot != second.dot
    assert sorted(s.value for s in stored) == [b"one", b"two"]


def test_write_with_context_supersedes_exactly_what_was_read() -> None:
    _, stored = versions.stamp([], "a", {}, b"one", 1)
    ctx = versions.context_of(stored)
    _, stored = versions.stamp(stored, "a", {}, b"concurrent", 2)  # not seen by the reader
    _, stored = versions.stamp(stored, "a", ctx, b"three", 3)
    assert sorted(s.value for s in stored) == [b"concurrent", b"three"]


def test_concurrent_writes_on_two_replicas_survive_a_merge() -> None:
    _, on_a = versions.stamp([], "a", {}, b"from-a", 1)
    _, on_b = versions.stamp([], "b", {}, b"from-b", 2)
    merged = versions.merge(on_a, on_b)
    assert sorted(s.value for s in merged) == [b"from-a", b"from-b"]
    _, resolved = versions.stamp(merged, "a", versions.context_of(merged), b"resolved", 3)
    assert [s.value for s in resolved] == [b"resolved"]
    # the stale replica b learns the resolution and drops both old siblings
    assert [s.value for s in versions.merge(on_b, resolved)] == [b"resolved"]


def test_tombstone_supersedes_what_it_saw_and_a_later_write_supersedes_it() -> None:
    _, stored = versions.stamp([], "a", {}, b"v", 1)
    tomb, stored = versions.stamp(stored, "b", versions.context_of(stored), None, 2)
    assert [s.tombstone for s in stored] == [True]
    _, stored = versions.stamp(stored, "c", versions.context_of(stored), b"back", 3)
    assert [s.value for s in stored] == [b"back"]


def test_is_current_detects_a_changed_key() -> None:
    _, stored = versions.stamp([], "a", {}, b"v", 1)
    ctx = versions.context_of(stored)
    assert versions.is_current(stored, ctx, now_ms=0)
    _, stored = versions.stamp(stored, "b", {}, b"other", 2)
    assert not versions.is_current(stored, ctx, now_ms=0)
    assert versions.is_current([], {}, now_ms=0)  # empty context: key must not exist


def test_expired_sibling_is_not_live() -> None:
    s = Sibling("a", 1, {}, b"v", 0, expires_at_ms=100)
    assert s.live(99) and not s.live(100)


@settings(max_examples=200)
@given(st.dictionaries(st.sampled_from(NODES), st.integers(1, 5)),
       st.dictionaries(st.sampled_from(NODES), st.integers(1, 5)))
def test_compare_matches_pointwise_definition(a: dict, b: dict) -> None:
    le = all(a.get(n, 0) <= b.get(n, 0) for n in NODES)
    ge = all(a.get(n, 0) >= b.get(n, 0) for n in NODES)
    expected = {(True, True): Order.EQUAL, (True, False): Order.BEFORE,
                (False, True): Order.AFTER, (False, False): Order.CONCURRENT}[(le, ge)]
    assert versions.compare(a, b) == expected


def test_next_counter_is_above_every_known_event_of_the_node() -> None:
    local = [Sibling("b", 4, {"a": 7}, b"x", 0)]
    assert versions.next_counter(local, "a", {"a": 2}) == 8
    assert versions.next_counter(local, "b", {}) == 5
    assert versions.next_counter([], "c", {"c": 9}) == 10


def test_all_stamps_through_one_node_are_unique() -> None:
    stored: list[Sibling] = []
    seen = set()
    for i in range(50):
        new, stored = versions.stamp(stored, "a", {}, bytes([i]), i)
        assert new.dot not in seen
        seen.add(new.dot)
    assert len(stored) == 50


def test_prune_drops_only_departed_nodes_and_only_past_the_bound() -> None:
    vv = {"a": 3, "b": 2, "gone": 9}
    assert versions.prune(vv, {"a", "b"}, max_entries=3) == vv
    assert versions.prune(vv, {"a", "b"}, max_entries=2) == {"a": 3, "b": 2}


def test_pruning_can_only_add_a_sibling_never_lose_a_write() -> None:
    _, on_gone = versions.stamp([], "gone", {}, b"old", 1)
    ctx = versions.context_of(on_gone)
    new, current = versions.stamp(on_gone, "a", versions.prune(ctx, {"a"}, 0), b"new", 2)
    merged = versions.merge(current, on_gone)
    assert b"new" in [s.value for s in merged]  # the new write survives a stale replica


def test_a_write_after_its_key_was_purged_locally_is_not_covered_by_an_old_tombstone() -> None:
    # x written and deleted through A; A purged the tombstone, a replica that failed to purge kept it
    x, after_x = versions.stamp([], "A", {}, b"x", hlc=1, counter_floor=1_000)
    tomb, _ = versions.stamp(after_x, "A", versions.context_of(after_x), None, hlc=2, counter_floor=1_001)
    # later (A's clock moved on) a blind put through A finds nothing locally
    y, stored = versions.stamp([], "A", {}, b"y", hlc=3, counter_floor=5_000)
    assert y.dot not in {x.dot, tomb.dot}
    # the new write survives meeting the old tombstone (read repair, anti-entropy)
    assert b"y" in [s.value for s in versions.merge(stored, [tomb])]


def test_counters_stay_above_what_the_key_has_seen_even_with_a_floor() -> None:
    first, stored = versions.stamp([], "A", {}, b"1", hlc=1, counter_floor=10)
    second, _ = versions.stamp(stored, "A", versions.context_of(stored), b"2", hlc=2, counter_floor=10)
    assert (first.counter, second.counter) == (10, 11)  # two writes within one ms still differ


def test_no_counter_left_is_a_precise_error_not_an_unpackable_dot() -> None:
    from kvstore.core.versions import MAX_COUNTER, next_counter
    from kvstore.errors import ResourceExhausted

    last = Sibling("n1", MAX_COUNTER, {}, b"v", 1)
    assert next_counter([Sibling("n1", MAX_COUNTER - 1, {}, b"v", 1)], "n1", {}) == MAX_COUNTER
    with pytest.raises(ResourceExhausted, match="version counter of node n1 on this key is at its limit"):
        next_counter([last], "n1", {})
    assert next_counter([last], "n2", {}) == 1  # other coordinators are unaffected

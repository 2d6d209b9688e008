"""Membership: the transition tables, merge precedence and refusals, and push-pull digests,
checked against naive models over random but legal histories."""
from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.core.membership import (
    MAX_GOSSIP_ENTRIES,
    REACHABLE,
    REMOVED_HEARTBEAT,
    RESTART_TRANSITIONS,
    TRANSITIONS,
    IllegalTransition,
    NodeState,
    allocation_ring,
    Status,
    compare_digests,
    compare_versions,
    delta_for,
    digest,
    merge,
    merge_states,
    newer,
    parse_digest,
    parse_ids,
    parse_states,
    removal,
    ring_members,
    ring_of,
    token_clash,
    token_digest,
    transition,
    versions_of,
)

FAST = settings(max_examples=150, deadline=None)
S = Status


def node(node_id: str = "a", generation: int = 10, heartbeat: int = 5, status: Status = S.NORMAL,
         tokens: tuple[int, ...] = (1, 2)) -> NodeState:
    return NodeState(node_id, f"{node_id}:7000", generation, heartbeat, status, tokens)


# --- transitions -------------------------------------------------------------------------------

@pytest.mark.parametrize("before, after", list(itertools.product(Status, Status)),
                         ids=lambda s: s.value)
def test_transition_within_a_generation_follows_the_table(before: Status, after: Status) -> None:
    state = node(status=before)
    if after in TRANSITIONS[before]:
        moved = transition(state, after)
        assert moved.status is after and moved.generation == state.generation
        assert moved.precedence > state.precedence
    else:
        with pytest.raises(IllegalTransition) as info:
            transition(state, after)
        assert (info.value.from_status, info.value.to_status) == (before, after)
        assert f"{before.value} -> {after.value}" in str(info.value)
        assert isinstance(info.value, ValueError)


def test_the_lifecycle_transitions_are_legal() -> None:
    s = node(status=S.JOINING, heartbeat=0)
    for status in (S.NORMAL, S.LEAVING, S.LEFT, S.REMOVED):
        s = transition(s, status)
    assert s.status is S.REMOVED and s.heartbeat == REMOVED_HEARTBEAT
    assert transition(node(status=S.LEAVING), S.NORMAL).status is S.NORMAL   # failed decommission
    assert transition(node(status=S.JOINING), S.LEFT).status is S.LEFT       # join rolled back


@pytest.mark.parametrize("before", list(Status), ids=lambda s: s.value)
def test_a_new_generation_starts_joining_except_for_a_removed_id(before: Status) -> None:
    state = node(status=before)
    if before is S.REMOVED:
        with pytest.raises(IllegalTransition, match="removed -> joining in a new generation"):
            transition(state, S.JOINING, generation=11)
        return
    restarted = transition(state, S.JOINING, generation=11)
    assert (restarted.generation, restarted.heartbeat, restarted.status) == (11, 0, S.JOINING)
    assert restarted.tokens == state.tokens
    with pytest.raises(IllegalTransition):
        transition(state, S.NORMAL, generation=11)
    assert RESTART_TRANSITIONS[before] == {S.JOINING}


def test_a_new_generation_must_be_newer() -> None:
    with pytest.raises(ValueError, match="generation 9 is older than 10"):
        transition(node(status=S.LEFT), S.JOINING, generation=9)


def test_removal_is_allowed_from_every_status_and_outranks_the_generation() -> None:
    for status in (S.JOINING, S.NORMAL, S.LEAVING, S.LEFT):
        gone = removal(node(status=status))
        assert gone.status is S.REMOVED and gone.heartbeat == REMOVED_HEARTBEAT
        assert gone.precedence > node(generation=99, heartbeat=99).precedence


def test_reachable_is_the_closure_of_the_table() -> None:
    assert REACHABLE[S.JOINING] == set(Status)
    assert REACHABLE[S.NORMAL] == {S.NORMAL, S.LEAVING, S.LEFT, S.REMOVED}
    assert REACHABLE[S.LEFT] == {S.LEFT, S.REMOVED}
    assert REACHABLE[S.REMOVED] == {S.REMOVED}


def test_a_removed_state_always_carries_the_reserved_heartbeat() -> None:
    assert NodeState("a", "a:1", 1, 7, S.REMOVED).heartbeat == REMOVED_HEARTBEAT
    with pytest.raises(ValueError, match="reserved for removed"):
        NodeState("a", "a:1", 1, REMOVED_HEARTBEAT, S.NORMAL)
    with pytest.raises(ValueError, match="reserved for removed"):
        NodeState.from_wire(["a", "a:1", 1, REMOVED_HEARTBEAT, "normal", [], "", {}])


def test_wire_format_is_unchanged() -> None:
    state = NodeState("a", "h:1", 3, 4, S.LEAVING, (5, 6), "z1", {"load": 1})
    assert state.to_wire() == ["a", "h:1", 3, 4, "leaving", [5, 6], "z1", {"load": 1}]
    assert NodeState.from_wire(state.to_wire()) == state


# --- merge ---------------------------------------------------------------------------------------

def test_a_higher_generation_supersedes_a_higher_heartbeat() -> None:
    old, restarted = node(generation=10, heartbeat=500), node(generation=11, heartbeat=0, status=S.JOINING)
    table, changed = merge({"a": old}, [restarted])
    assert table["a"] == restarted and changed == ["a"]
    table, changed = merge({"a": restarted}, [old])
    assert table["a"] == restarted and changed == []


def test_stale_and_equal_states_change_nothing() -> None:
    current = node(heartbeat=7)
    result = merge_states({"a": current}, [node(heartbeat=6), current])
    assert result.table == {"a": current} and result.changed == [] and result.refused == []


def test_gossip_may_skip_intermediate_states() -> None:
    joining = node(status=S.JOINING, heartbeat=1)
    leaving = node(status=S.LEAVING, heartbeat=9)         # normal in between was never seen
    table, changed = merge({"a": joining}, [leaving])
    assert table["a"] == leaving and changed == ["a"]


@pytest.mark.parametrize("held, offered", [
    (S.NORMAL, S.JOINING), (S.LEAVING, S.JOINING), (S.LEFT, S.NORMAL), (S.LEFT, S.JOINING),
    (S.LEFT, S.LEAVING),
])
def test_an_illegal_transition_within_a_generation_is_refused_not_raised(held: Status, offered: Status) -> None:
    current = node(status=held, heartbeat=5)
    result = merge_states({"a": current}, [node(status=offered, heartbeat=6), node("b")])
    assert result.table["a"] == current
    assert result.changed == ["b"]                         # the rest of the message still counts
    [refusal] = result.refused
    assert (refusal.node_id, refusal.held, refusal.offered, refusal.reason) == \
        ("a", held, offered, "illegal transition")
    assert f"{held.value} -> {offered.value}" in str(refusal)
    assert not newer(node(status=offered, heartbeat=6), current)


def test_a_removed_node_is_never_resurrected_by_stale_gossip() -> None:
    gone = removal(node(generation=10, heartbeat=5))
    stale = [node(generation=10, heartbeat=10**6), node(generation=9, heartbeat=1), node(generation=10, heartbeat=6)]
    result = merge_states({"a": gone}, stale)
    assert result.table["a"] == gone and result.changed == [] and result.refused == []


def test_a_removed_node_id_cannot_rejoin_with_a_new_generation() -> None:
    gone = removal(node(generation=10))
    zombie = node(generation=11, heartbeat=0, status=S.JOINING)
    result = merge_states({"a": gone}, [zombie, node(generation=12, status=S.NORMAL)])
    assert result.table["a"] == gone and result.changed == []
    assert [r.reason for r in result.refused] == ["removed", "removed"]


def test_a_removal_wins_over_any_live_state_of_the_node() -> None:
    gone = removal(node(generation=10, heartbeat=5))
    for current in (node(generation=10, heartbeat=50), node(generation=12, heartbeat=1)):
        table, changed = merge({"a": current}, [gone])
        assert table["a"] == gone and changed == ["a"]


def test_equal_removals_from_two_views_pick_the_same_winner_everywhere() -> None:
    one = removal(node(tokens=(1,)))
    other = removal(node(tokens=(2,)))
    assert merge({"a": one}, [other])[0] == merge({"a": other}, [one])[0]


def test_the_local_entry_is_never_taken_from_others_but_its_removal_is_reported() -> None:
    me = node("me", heartbeat=3)
    result = merge_states({"me": me}, [node("me", heartbeat=9)], self_id="me")
    assert result.table["me"] == me and result.about_self == node("me", heartbeat=9)
    result = merge_states({"me": me}, [removal(node("me"))], self_id="me")
    assert result.table["me"] == me and result.about_self is not None
    assert result.about_self.status is S.REMOVED
    assert merge_states({"me": me}, [node("me", heartbeat=1)], self_id="me").about_self is None


def test_merge_does_not_modify_its_input() -> None:
    table = {"a": node(heartbeat=1)}
    merge(table, [node(heartbeat=2), node("b")])
    assert table == {"a": node(heartbeat=1)}


# --- random legal histories ----------------------------------------------------------------------

@st.composite
def histories(draw: Any) -> dict[str, list[NodeState]]:
    """Per node id, the sequence of states its node (and an operator) really published."""
    out = {}
    for node_id in draw(st.lists(st.sampled_from("abcdef"), min_size=1, max_size=6, unique=True)):
        state = NodeState(node_id, f"{node_id}:1", draw(st.integers(1, 3)), 0,
                          draw(st.sampled_from([S.JOINING, S.NORMAL])), (ord(node_id),))
        history = [state]
        for _ in range(draw(st.integers(0, 12))):
            if state.status is S.REMOVED:
                break
            step = draw(st.sampled_from(["beat", "beat", "move", "restart"]))
            if step == "beat":
                state = state.beat()
            elif step == "move":
                state = transition(state, draw(st.sampled_from(sorted(TRANSITIONS[state.status], key=str))))
            else:
                state = transition(state, S.JOINING, generation=state.generation + draw(st.integers(1, 2)))
            history.append(state)
        out[node_id] = history
    return out


@st.composite
def two_views(draw: Any) -> tuple[dict[str, NodeState], dict[str, NodeState]]:
    """Two nodes' tables: each holds some point (or nothing) of every node's history."""
    views: list[dict[str, NodeState]] = [{}, {}]
    for node_id, history in draw(histories()).items():
        for view in views:
            pick = draw(st.integers(-1, len(history) - 1))
            if pick >= 0:
                view[node_id] = history[pick]
    return views[0], views[1]


def newest(*states: NodeState) -> NodeState:
    return max(states, key=lambda s: s.precedence)


@FAST
@given(two_views())
def test_compare_digests_names_exactly_the_needed_deltas(views: tuple[dict, dict]) -> None:
    a, b = views
    states_a_needs, ids_b_needs = compare_digests(b, digest(a))
    # naive model: whoever holds the strictly newer state (or the only one) sends it
    assert {s.node_id for s in states_a_needs} == {
        i for i in b if i not in a or b[i].precedence > a[i].precedence}
    assert set(ids_b_needs) == {i for i in a if i not in b or a[i].precedence > b[i].precedence}
    assert all(b[s.node_id] is s for s in states_a_needs)


@FAST
@given(two_views())
def test_one_push_pull_round_leaves_both_tables_equal_to_their_merge(views: tuple[dict, dict]) -> None:
    a, b = views
    # A -> B: digest.  B -> A: states A needs, ids B needs.  A -> B: those states.
    states_a_needs, ids_b_needs = compare_digests(b, digest(a))
    a_after = merge_states(a, states_a_needs)
    b_after = merge_states(b, delta_for(a_after.table, ids_b_needs))
    assert a_after.refused == [] and b_after.refused == []   # legal histories: nothing refused
    expected = {i: newest(*(v[i] for v in (a, b) if i in v)) for i in a.keys() | b.keys()}
    assert a_after.table == b_after.table == expected == merge(a, b.values())[0]
    assert ring_of(a_after.table).digest() == ring_of(b_after.table).digest()


@FAST
@given(two_views(), two_views())
def test_merge_is_commutative_associative_and_idempotent(v1: tuple[dict, dict], v2: tuple[dict, dict]) -> None:
    a, b = v1
    c = {k: s for k, s in v2[0].items() if k not in a and k not in b}   # a third, unrelated view

    def m(x: dict, y: dict) -> dict:
        return merge(x, y.values())[0]

    assert m(a, b) == m(b, a)
    assert m(m(a, b), c) == m(a, m(b, c))
    assert m(a, a) == a
    assert m(m(a, b), b) == m(a, b)


states_any = st.builds(
    NodeState, st.sampled_from("abc"), st.just("h:1"), st.integers(0, 3), st.integers(0, 5),
    st.sampled_from(list(Status)), st.just(()),
)


@FAST
@given(st.dictionaries(st.sampled_from("abc"), states_any), st.lists(states_any, max_size=12))
def test_merge_never_crashes_on_arbitrary_states(table: dict, incoming: list) -> None:
    table = {k: NodeState(k, s.address, s.generation, s.heartbeat, s.status) for k, s in table.items()}
    result = merge_states(table, incoming)
    for node_id, state in result.table.items():
        assert node_id == state.node_id
        if node_id in table:
            assert state.precedence >= table[node_id].precedence
    assert len(result.changed) == len(set(result.changed))


# --- digests on the wire -------------------------------------------------------------------------

def test_digest_wire_form() -> None:
    table = {"a": node("a", 3, 4), "b": removal(node("b", 1, 1))}
    assert digest(table) == [["a", 3, 4], ["b", 1, REMOVED_HEARTBEAT]]
    assert parse_digest(digest(table)) == versions_of(table) == {"a": (3, 4), "b": (1, REMOVED_HEARTBEAT)}
    assert compare_digests(table, digest(table)) == ([], [])
    assert compare_versions({}, {}) == ([], [])


@pytest.mark.parametrize("wire, message", [
    ({"a": 1}, "digest must be an array"),
    ([["a", 1]], r"\[node_id, generation, heartbeat\]"),
    ([["", 1, 1]], "node_id"),
    ([["a", -1, 1]], "0..2"),
    ([["a", 1, 2**64]], "0..2"),
    ([["a", True, 1]], "0..2"),
    ([["a", 1, 1]] * (MAX_GOSSIP_ENTRIES + 1), "at most"),
])
def test_a_malformed_digest_is_refused_with_a_reason(wire: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        compare_digests({}, wire)


def test_ids_and_states_from_the_wire_are_validated() -> None:
    assert parse_ids(["a", "b"]) == ["a", "b"]
    with pytest.raises(ValueError, match="node_id"):
        parse_ids(["a", 3])
    assert parse_states([node().to_wire()]) == [node()]
    with pytest.raises(ValueError, match="8-element"):
        parse_states([["a"]])


def test_delta_for_skips_unknown_ids_and_duplicates() -> None:
    table = {"a": node("a"), "b": node("b")}
    assert delta_for(table, ["b", "zz", "b", "a"]) == [table["b"], table["a"]]


# --- plausibility of gossiped versions (found by tests/node/test_fuzz.py) ------------------------

def test_generation_from_the_future_is_refused_when_now_is_known() -> None:
    from kvstore.core.membership import MAX_CLOCK_SKEW_MS, merge_states

    now = 1_800_000_000_000
    real = NodeState("n2", "10.0.0.2:7000", now - 5_000, 40, Status.NORMAL, (1, 2))
    forged = NodeState("n2", "evil:1", (1 << 64) - 1, 0, Status.NORMAL, (3,))
    res = merge_states({"n2": real}, [forged], "n1", now)
    assert res.table["n2"] == real and res.changed == []
    assert "ahead of" in res.refused[0].reason
    near = NodeState("n2", "10.0.0.2:7000", now + MAX_CLOCK_SKEW_MS, 0, Status.NORMAL, (1, 2))
    assert merge_states({"n2": real}, [near], "n1", now).table["n2"] == near  # skew within bounds


def test_more_heartbeats_than_rounds_since_the_generation_is_refused() -> None:
    from kvstore.core.membership import merge_states

    now = 1_800_000_000_000
    real = NodeState("n2", "10.0.0.2:7000", now - 5_000, 40, Status.NORMAL, (1, 2))
    forged = replace(real, heartbeat=(1 << 64) - 2, address="evil:1")
    res = merge_states({"n2": real}, [forged], "n1", now)
    assert res.table["n2"] == real and "rounds possible" in res.refused[0].reason
    beaten = replace(real, heartbeat=41)
    assert merge_states({"n2": real}, [beaten], "n1", now).table["n2"] == beaten
    # without a clock (the simulation, pure callers) nothing changes
    assert merge_states({"n2": real}, [forged], "n1").table["n2"] == forged


def test_a_gossiped_state_listing_a_token_twice_is_malformed() -> None:
    wire = ["n2", "10.0.0.2:7000", 1, 1, "normal", [5, 5], "", {}]
    with pytest.raises(ValueError, match="tokens must be distinct"):
        NodeState.from_wire(wire)


def test_ring_members_ignore_heartbeats_but_not_what_the_ring_is_made_of() -> None:
    table = {n.node_id: n for n in (node("a", tokens=(1, 5)), node("b", tokens=(3, 7)))}
    members = ring_members(table)
    assert ring_of(table).digest() == ring_of({k: table[k] for k in ("b", "a")}).digest()
    beat = {**table, "a": replace(table["a"], heartbeat=99)}
    assert ring_members(beat) == members  # gossip need not rebuild the ring
    assert ring_members({**table, "a": replace(table["a"], tokens=(1, 6))}) != members
    assert ring_members({**table, "a": replace(table["a"], address="a:7001")}) != members
    assert ring_members({**table, "a": replace(table["a"], status=S.LEFT)}) != members
    assert [n.node_id for n in ring_members({**table, "c": node("c", tokens=(9,))})] == ["a", "b", "c"]


# --- token allocation ----------------------------------------------------------------------------

def test_two_joiners_that_saw_the_same_ring_pick_distinct_balanced_tokens() -> None:
    """The second joiner takes tokens against the members joining too: against the ring alone
    (where joiners are not yet) both computed the same tokens and one of them owned nothing."""
    from random import Random

    from kvstore.core.ring import allocate_tokens

    first = node("a", tokens=allocate_tokens(None, 16, Random(1)))
    table = {"a": first}
    b_tokens = allocate_tokens(allocation_ring(table, "b"), 16, Random(2))
    assert allocate_tokens(ring_of(table), 16, Random(3)) == b_tokens  # the clash, reproduced
    table["b"] = node("b", status=S.JOINING, tokens=b_tokens)
    c_tokens = allocate_tokens(allocation_ring(table, "c"), 16, Random(3))
    table["c"] = node("c", status=S.JOINING, tokens=c_tokens)
    assert set(b_tokens).isdisjoint(c_tokens)
    share = ring_of({k: replace(v, status=S.NORMAL) for k, v in table.items()}).ownership()
    assert all(0.25 < share[n] < 0.42 for n in "abc"), share


def test_a_token_clash_is_resolved_by_the_higher_id_only() -> None:
    table = {"a": node("a", tokens=(1, 5)), "b": node("b", status=S.JOINING, tokens=(2, 6)),
             "c": node("c", status=S.JOINING, tokens=(2, 7))}
    assert token_clash(table, "c") == "b"
    assert token_clash(table, "b") is None  # the lower id keeps its tokens
    assert token_clash({**table, "c": node("c", status=S.JOINING, tokens=(3,))}, "c") is None
    assert token_clash({**table, "b": removal(table["b"])}, "c") is None


def test_token_digest_depends_on_the_set_only() -> None:
    assert token_digest((3, 1, 2)) == token_digest([1, 2, 3]) != token_digest((1, 2))

"""Session batches coordinated on the transport loop (kvstore/node/express.py): the usual batch
never reaches trio; anything else does and is answered as before; a replica that fails under the
loop's path costs what it costs on trio's (a hint, not an acknowledgement)."""
from __future__ import annotations

import threading

import pytest

from kvstore.core.records import decode_record
from kvstore.errors import InvalidArgument, StaleContext
from kvstore.node.express import RouteView
from kvstore.node.fastpath import SharedClock
from kvstore.node.server import KVServicer

from .conftest import eventually


@pytest.fixture
def trio_batches(monkeypatch) -> list[str]:
    """The kinds of the session batches that went through trio's path, in order."""
    seen: list[str] = []
    real = KVServicer._session_run

    async def counted(self, kind, batch, budget):
        seen.append(kind)
        return await real(self, kind, batch, budget)

    monkeypatch.setattr(KVServicer, "_session_run", counted)
    return seen


async def sees_all_up(node) -> None:
    """Wait until `node`'s loop coordinates by a view with every member up (gossip's convergence
    reaches it within a refresh, 0.1 s)."""

    async def all_up() -> bool:
        view = node.route_view
        return view is not None and view.up == frozenset(view.ring.node_ids)

    await eventually(all_up, what="a route view with every member up")


async def freeze_route_view(monkeypatch, node) -> None:
    """`node`'s loop keeps coordinating by a view with every member up: a link cut after this is
    one nobody has noticed yet (the view is otherwise refreshed every 0.1 s, and sees the cut)."""
    await sees_all_up(node)
    frozen, real = node.route_view, RouteView.of
    monkeypatch.setattr(RouteView, "of", staticmethod(lambda n: frozen if n is node else real(n)))


async def test_usual_batches_stay_on_the_loop_and_unusual_ones_go_through_trio(nodes, trio_batches) -> None:
    cluster = await nodes.cluster(3)
    await sees_all_up(cluster[0])
    keys = [b"loop-%d" % i for i in range(40)]
    async with nodes.client(cluster[0], token_aware=False) as kv:
        contexts = await kv.put_many([(k, b"v-" + k) for k in keys], w="all")
        assert all(isinstance(c, bytes) and c for c in contexts)
        got = await kv.get_many(keys, r="all")
        assert [g.value for g in got] == [b"v-" + k for k in keys]
        await kv.delete(keys[0], context=got[0].context)
        assert not (await kv.get(keys[0])).found
        # a conditional put whose context is stale fails alone, with its own status
        stale = got[1].context
        await kv.put(keys[1], b"newer", context=stale)
        with pytest.raises(StaleContext):
            await kv.put(keys[1], b"lost update", context=stale, conditional=True)
        assert trio_batches == []
        # a batch with an invalid item is trio's: that item fails, the others are stored
        results = await kv.put_many([(b"fine", b"1"), (b"x" * 100_000, b"2")])
        assert results[0] and isinstance(results[1], InvalidArgument) and "key" in str(results[1])
        assert trio_batches == ["put"]
        assert (await kv.get(b"fine")).value == b"1"
    # every replica holds what the loop coordinated
    for node in cluster:
        [raw] = await node.engine.get_many([keys[5]])
        assert [node.store.open_value(keys[5], s) for s in decode_record(raw, keys[5])] == [b"v-" + keys[5]]


async def test_a_replica_that_fails_under_the_loop_path_gets_a_hint_not_an_ack(nodes, trio_batches, monkeypatch) -> None:
    cluster = await nodes.cluster(3)
    coord, cut = cluster[0], cluster[2]
    await freeze_route_view(monkeypatch, coord)
    coord.peer(cut.node_id).blocked = True  # its link fails; nobody has seen it down yet
    keys = [b"cut-%d" % i for i in range(30)]
    async with nodes.client(coord, token_aware=False) as kv:
        assert all(isinstance(c, bytes) for c in await kv.put_many([(k, b"v") for k in keys], w="quorum"))
        failed = await kv.put_many([(b"all-of-them", b"v")], w="all", timeout_s=2)
        assert "w: got 2 of 3" in str(failed[0])
    assert trio_batches == []  # the loop coordinated them; only the failed ops went to trio
    # N=3 on 3 nodes: no spare node, so the coordinator keeps each write for the cut replica
    assert (await coord.engine.hint_counts()).get(cut.node_id) == len(keys) + 1
    coord.peer(cut.node_id).blocked = False
    await coord.replay_hints(everything=True)

    async def replayed() -> bool:
        return all(r is not None for r in await cut.engine.get_many(keys))

    await eventually(replayed, what="hints replayed to the replica")
    assert all(r is not None for r in await cut.engine.get_many(keys))


async def test_a_read_whose_replica_fails_under_the_loop_path_is_answered_by_trio(nodes, trio_batches,
                                                                                  monkeypatch) -> None:
    cluster = await nodes.cluster(3, read_repair_chance=0.0)
    coord = cluster[0]
    await sees_all_up(coord)
    async with nodes.client(coord, token_aware=False) as kv:
        await kv.put(b"k", b"v", w="all")
        pref = coord.ring().preference_list(b"k", 3)
        asked_first = next(t for t in pref if t != coord.node_id)
        await freeze_route_view(monkeypatch, coord)
        coord.peer(asked_first).blocked = True  # its link fails; nobody has seen it down yet
        assert (await kv.get(b"k", r="one")).value == b"v"  # this node alone answers, on the loop
        assert trio_batches == []
        assert (await kv.get(b"k", r="quorum")).value == b"v"  # trio's path asks the spare
        assert trio_batches == ["get"]


async def test_replicas_that_disagree_are_merged_and_repaired(nodes, trio_batches) -> None:
    cluster = await nodes.cluster(3, read_repair_chance=1.0)
    await sees_all_up(cluster[0])
    async with nodes.client(cluster[0], token_aware=False) as kv:
        await kv.put(b"k", b"old", w="all")
        old = {n.node_id: (await n.engine.get_many([b"k"]))[0] for n in cluster}
        await kv.put(b"k", b"new", w="all", context=(await kv.get(b"k")).context)
        stale = cluster[2]
        await stale.engine.update_many([(b"k", lambda _: old[stale.node_id])])
        assert (await kv.get(b"k", r="all")).value == b"new"
        assert trio_batches == []

    async def repaired() -> bool:
        [raw] = await stale.engine.get_many([b"k"])
        return [stale.store.open_value(b"k", s) for s in decode_record(raw, b"k")] == [b"new"]

    await eventually(repaired, what="read repair of the stale replica")
    assert await repaired()


async def test_a_node_with_the_loop_path_off_answers_every_batch_through_trio(nodes, trio_batches) -> None:
    cluster = await nodes.cluster(3, coordinate_on_loop=False)
    async with nodes.client(cluster[0], token_aware=False) as kv:
        await kv.put_many([(b"a", b"1"), (b"b", b"2")])
        assert [g.value for g in await kv.get_many([b"a", b"b"])] == [b"1", b"2"]
    assert trio_batches == ["put", "get"]


def test_the_shared_clock_never_repeats_a_timestamp_across_threads() -> None:
    clock = SharedClock()
    seen: list[list[int]] = [[], []]

    def stamp(out: list[int]) -> None:
        for _ in range(2_000):
            out.extend(clock.now_many(1_000, 3))
            out.append(clock.observe(clock.last, 1_000))

    threads = [threading.Thread(target=stamp, args=(out,)) for out in seen]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = seen[0] + seen[1]
    assert len(set(every)) == len(every) == 16_000
    assert all(a < b for a, b in zip(seen[0], seen[0][1:]))  # each thread's own are increasing


"""Three real nodes in-process: placement, quorums, hinted handoff, siblings, read repair."""
from __future__ import annotations

import time

import msgpack
import pytest
import trio

from kvstore.core.records import decode_record, encode_record
from kvstore.core.versions import Sibling
from kvstore.errors import Unavailable
from kvstore.node.gossip import Gossip
from tests.node.conftest import eventually


async def stored_on(nodes_list, key: bytes) -> list[str]:
    """Node ids whose own storage holds a record for key (read directly from each engine)."""
    out = []
    for n in nodes_list:
        [raw] = await n.engine.get_many([key])
        if raw is not None:
            out.append(n.node_id)
    return sorted(out)


async def test_every_key_lands_on_exactly_n_replicas_of_its_preference_list(nodes) -> None:
    cluster = await nodes.cluster(4)
    keys = [b"key-%d" % i for i in range(200)]
    async with nodes.client(cluster[0]) as kv:
        results = await kv.put_many([(k, k) for k in keys])
        failed = [r for r in results if not isinstance(r, bytes)]
        assert failed == [], f"{len(failed)} puts failed, first: {failed[:1]}"
        for node in cluster:  # readable through every coordinator
            async with nodes.client(node, token_aware=False) as one:
                got = await one.get_many(keys[:20])
                assert [getattr(g, "value", g) for g in got] == keys[:20]
    ring = cluster[0].ring()
    for key in keys:
        await eventually(lambda: _n_copies(cluster, key, 3), what=f"3 copies of {key!r}")
        assert await stored_on(cluster, key) == sorted(ring.preference_list(key, 3))


async def _n_copies(cluster, key, n) -> bool:
    return len(await stored_on(cluster, key)) == n


async def test_locate_reports_where_a_key_is_stored(nodes) -> None:
    cluster = await nodes.cluster(4)
    async with nodes.client(cluster[0]) as kv:
        await kv.put(b"where", b"x", w="all")
        loc = await kv.locate(b"where")
    stored = sorted(r.node_id for r in loc.replicas if r.stored)
    primaries = sorted(r.node_id for r in loc.replicas if r.primary)
    assert stored == primaries and len(stored) == 3


async def test_quorum_survives_one_dead_replica_and_hints_reach_it_after_restart(nodes, tmp_path) -> None:
    cluster = await nodes.cluster(4, storage="sqlite")
    victim = cluster[3]
    survivors = cluster[:3]
    await nodes.stop(victim)
    await eventually(lambda: _all_see_down(survivors, victim.node_id), what="victim marked down")
    async with nodes.client(*survivors) as kv:
        keys = [b"during-outage-%d" % i for i in range(100)]
        assert all(isinstance(r, bytes) for r in await kv.put_many([(k, b"v") for k in keys]))
        got = await kv.get_many(keys)
        assert all(g.value == b"v" for g in got)
    victims_keys = [k for k in keys if victim.node_id in survivors[0].ring().preference_list(k, 3)]
    assert victims_keys, "some keys must belong to the victim"
    held = 0
    for n in survivors:
        held += (await n.engine.hint_counts()).get(victim.node_id, 0)
    assert held == len(victims_keys)  # each missed write is held as a hint by exactly one fallback

    restarted = await nodes.start(victim.node_id, seeds=tuple(n.address for n in survivors), storage="sqlite")
    await eventually(lambda: _holds_all(restarted, victims_keys), timeout_s=20, what="hints replayed")
    await eventually(lambda: _no_hints(survivors, victim.node_id), what="hints deleted after ack")
    for key in victims_keys:
        [raw] = await restarted.engine.get_many([key])
        assert [restarted.store.open_value(key, s) for s in decode_record(raw, key)] == [b"v"]


async def _all_see_down(nodes_list, node_id) -> bool:
    return all(not n.is_up(node_id) for n in nodes_list)


async def _holds_all(node, keys) -> bool:
    return all(r is not None for r in await node.engine.get_many(keys))


async def _no_hints(nodes_list, target) -> bool:
    for n in nodes_list:
        if (await n.engine.hint_counts()).get(target, 0):
            return False
    return True


async def test_strict_quorum_counts_only_primaries(nodes) -> None:
    cluster = await nodes.cluster(3)
    await nodes.stop(cluster[2])
    await eventually(lambda: _all_see_down(cluster[:2], cluster[2].node_id), what="down")
    async with nodes.client(*cluster[:2]) as kv:
        await kv.put(b"k", b"v", w="quorum", strict=True)
        with pytest.raises(Unavailable, match=r"w: got 2 of 3"):
            await kv.put(b"k", b"v", w="all", timeout_s=2)  # no spare node for a hint in 3 nodes


async def test_stale_contexts_from_two_clients_become_siblings_then_resolve(nodes) -> None:
    cluster = await nodes.cluster(3)
    async with nodes.client(cluster[0], token_aware=False) as a, nodes.client(cluster[1], token_aware=False) as b:
        await a.put(b"doc", b"v0")
        ctx = (await a.get(b"doc")).context
        await a.put(b"doc", b"from-a", context=ctx)
        await b.put(b"doc", b"from-b", context=ctx)
        got = await a.get(b"doc", r="all")
        assert sorted(s.value for s in got.siblings) == [b"from-a", b"from-b"]
        await b.put(b"doc", b"merged", context=got.context)
        assert [s.value for s in (await a.get(b"doc", r="all")).siblings] == [b"merged"]


async def test_the_later_of_two_concurrent_writes_wins_even_when_its_coordinator_clock_is_behind(nodes) -> None:
    # n2's wall clock runs 30 s behind n1's; it still saw n1's write arrive, so its own later
    # write must carry the later hybrid timestamp, and "latest wins" must pick it
    cluster = await nodes.cluster(3)
    n1, n2 = cluster[0], cluster[1]
    n2.now_ms = lambda: int(time.time() * 1000) - 30_000
    async with nodes.client(n1, token_aware=False) as a, nodes.client(n2, token_aware=False) as b:
        await a.put(b"doc", b"v0", w="all")
        ctx = (await a.get(b"doc")).context
        await a.put(b"doc", b"first, via n1", context=ctx, w="all")
        await b.put(b"doc", b"second, via n2", context=ctx, w="all")  # concurrent: same old context
        got = await a.get(b"doc", r="all")
        assert sorted(s.value for s in got.siblings) == [b"first, via n1", b"second, via n2"]
        assert got.value == b"second, via n2"
        # and n2's writes to other keys order after what it received too
        await b.put(b"other", b"x", w="all")
        first = next(s for s in got.siblings if s.node_id == "n1")
        assert (await a.get(b"other")).siblings[0].hlc > first.hlc


async def test_read_repairs_a_stale_replica(nodes) -> None:
    cluster = await nodes.cluster(3)
    async with nodes.client(cluster[0]) as kv:
        await kv.put(b"k", b"old", w="all")
        old = {n.node_id: (await n.engine.get_many([b"k"]))[0] for n in cluster}
        await kv.put(b"k", b"new", w="all", context=(await kv.get(b"k")).context)
        stale = cluster[1]
        # roll one replica back to the old version behind the cluster's back
        await stale.engine.update_many([(b"k", lambda _: old[stale.node_id])])
        assert await kv.get(b"k", r="all") is not None

    async def repaired() -> bool:
        [raw] = await stale.engine.get_many([b"k"])
        return [stale.store.open_value(b"k", s) for s in decode_record(raw)] == [b"new"]

    await eventually(repaired, what="read repair")
    assert any(n.coordinator.repairs for n in cluster)


async def test_cluster_smaller_than_n_warns_and_serves(nodes) -> None:
    cluster = await nodes.cluster(2)
    async with nodes.client(cluster[0]) as kv:
        await kv.put(b"k", b"v", w="all")
        status = await kv.status()
    assert "fewer than replication factor n=3" in status["warning"]


async def test_tombstones_are_purged_only_when_every_replica_holds_them(nodes) -> None:
    cluster = await nodes.cluster(3, tombstone_grace_s=0.0)
    async with nodes.client(cluster[0]) as kv:
        await kv.put(b"gone", b"v", w="all")
        await kv.put(b"partial", b"v", w="all")
        await kv.delete(b"gone", w="all")
        await kv.delete(b"partial", w="all")
    # one replica of "partial" still has the live value: nothing may be purged for it
    lagging = cluster[2]
    await trio.sleep(0.01)  # the tombstones must be older than the (zero) grace period
    old_value = [Sibling("elsewhere", 1, {}, b"v", 1)]
    await lagging.engine.update_many([(b"partial", lambda _: encode_record(old_value))])
    for n in cluster:  # nothing is purged before a repair has covered the tombstones
        assert await n.purge_tombstones() == 0
        await n.repairer.repair()
    purged = 0
    for n in cluster:
        purged += await n.purge_tombstones()
    assert purged == 1
    assert await stored_on(cluster, b"gone") == []
    assert len(await stored_on(cluster, b"partial")) == 3
    async with nodes.client(cluster[0]) as kv:
        assert not (await kv.get(b"gone", r="all")).found


async def test_read_asks_a_spare_replica_when_one_it_chose_fails(nodes) -> None:
    cluster = await nodes.cluster(3, read_repair_chance=0.0)
    coordinator, cut = cluster[0], cluster[1]
    keys = [b"spare-%d" % i for i in range(50)]
    async with nodes.client(coordinator, token_aware=False) as kv:
        await kv.put_many([(k, k) for k in keys], w="all")
        coordinator.peer_for_address(cut.address).blocked = True  # not yet seen as down
        got = await kv.get_many(keys, r="quorum")
    assert [g.value for g in got] == keys


async def test_a_hint_is_kept_when_both_the_primary_and_its_fallback_fail(nodes) -> None:
    cluster = await nodes.cluster(4)
    coord = cluster[0]
    ring = coord.ring()
    key = next(
        k for k in (b"twice-%d" % i for i in range(1000))
        if ring.preference_list(k, 3)[0] == coord.node_id
    )
    pref = ring.preference_list(key, 3)
    victim = pref[2]
    [fallback] = [n.node_id for n in cluster if n.node_id not in pref]
    # The coordinator still believes both are up, but its links to them are cut.
    coord.peer(victim).blocked = True
    coord.peer(fallback).blocked = True
    async with nodes.client(coord, token_aware=False) as kv:
        await kv.put(key, b"kept", w=2)
    assert (await coord.engine.hint_counts()).get(victim, 0) == 1
    coord.peer(victim).blocked = False
    coord.peer(fallback).blocked = False
    await coord.replay_hints(everything=True)
    [holder] = [n for n in cluster if n.node_id == victim]
    assert await _holds_all(holder, [key])
    assert (await coord.engine.hint_counts()).get(victim, 0) == 0


async def test_drop_hints_gives_up_a_handoff_and_repair_brings_the_replica_up_to_date(nodes) -> None:
    import sys

    cluster = await nodes.cluster(3, storage="sqlite")
    victim, survivors = cluster[2], cluster[:2]
    await nodes.stop(victim)
    await eventually(lambda: _all_see_down(survivors, victim.node_id), what="victim marked down")
    keys = [b"handoff-%d" % i for i in range(60)]
    async with nodes.client(*survivors) as kv:
        assert all(isinstance(r, bytes) for r in await kv.put_many([(k, b"v") for k in keys]))
    held = {n.node_id: (await n.engine.hint_counts()).get(victim.node_id, 0) for n in survivors}
    assert sum(held.values()) == len(keys)  # 3 nodes, N=3: coordinators keep the hints themselves

    for node in survivors:
        done = await trio.run_process(
            [sys.executable, "-m", "kvstore.cli.main", "drop-hints", victim.node_id, "--yes",
             "--address", node.address], capture_stdout=True, capture_stderr=True, check=False)
        assert done.returncode == 0, done.stderr
        assert f"dropped {held[node.node_id]} hints".encode() in done.stdout
    assert await _no_hints(survivors, victim.node_id)

    back = await nodes.start(victim.node_id, seeds=tuple(n.address for n in survivors), storage="sqlite")
    # a restarted member learns the ring before it serves: never a ring of one, where QUORUM is 1
    assert len(back.ring()) == 3
    await nodes.converged([*survivors, back])
    async with nodes.client(back) as kv:
        report = msgpack.unpackb(await kv.command("repair", {}, address=back.address, timeout_s=60))
    assert report["state"] == "done", report
    assert await _holds_all(back, keys), report


async def test_a_corrupt_record_on_the_replica_asked_first_costs_only_that_replica(nodes) -> None:
    """Replicas answer reads with their stored bytes; a corrupt one is that replica's failure
    (DataLoss), the coordinator asks the spare, and the read still returns the value."""
    cluster = await nodes.cluster(3, read_repair_chance=0.0)
    coord = cluster[0]
    async with nodes.client(coord, token_aware=False) as kv:  # every call coordinated by coord
        await kv.put(b"k", b"v", w="all")
        first = next(t for t in coord.ring().replicas_of(b"k", 3) if t != coord.node_id)
        victim = next(n for n in cluster if n.node_id == first)
        await victim.engine.update_many([(b"k", lambda _: b"\xc1 not a record")])
        for _ in range(5):
            assert (await kv.get(b"k")).value == b"v"
        with pytest.raises(Unavailable, match="got 2 of 3"):
            await kv.get(b"k", r="all")


async def test_a_restarted_member_knows_every_member_before_it_serves(nodes, monkeypatch) -> None:
    """A restarted node used to serve once it had heard from a seed. When the pings that admit
    the other members were slow (a loaded machine), that was a ring of two, on which it
    coordinated keys it does not replicate and acknowledged them on nodes that do not either
    (lost writes in a chaos soak). Slow pings are simulated here: one member admitted per round."""
    cluster = await nodes.cluster(5, storage="sqlite")
    victim = cluster[-1]
    await nodes.stop(victim)
    verify = Gossip.verify_candidates

    async def one_per_round(self: Gossip) -> None:
        if self.candidates:
            first, *rest = self.candidates.items()
            self.candidates = dict([first])
            await verify(self)
            self.candidates.update(rest)

    monkeypatch.setattr(Gossip, "verify_candidates", one_per_round)
    back = await nodes.start(victim.node_id, seeds=(cluster[0].address,), storage="sqlite")
    assert len(back.ring()) == 5

"""Growing and shrinking a live cluster: joins stream their ranges, decommission and removenode
re-home data, and afterwards every key sits on exactly the N nodes the ring names."""
from __future__ import annotations

from functools import partial

import msgpack
import pytest
import trio

from kvstore.client import Client
from kvstore.errors import KvError
from tests.node.conftest import eventually


class Writer:
    """A continuous write load that remembers what was acknowledged."""

    def __init__(self, kv, prefix: bytes) -> None:
        self.kv, self.prefix, self.acked, self.stop = kv, prefix, {}, trio.Event()

    async def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            batch = [(self.prefix + b"-%06d" % (i + j), b"v%d" % (i + j)) for j in range(50)]
            i += 50
            for (k, v), r in zip(batch, await self.kv.put_many(batch)):
                if isinstance(r, bytes):
                    self.acked[k] = v
            await trio.sleep(0.01)


async def placement_errors(nodes_list, keys, n=3) -> list[str]:
    """Keys not stored on exactly the preference list the (shared) ring names."""
    ring = nodes_list[0].ring()
    held = {node.node_id: set() for node in nodes_list}
    for node in nodes_list:
        raws = await node.engine.get_many(list(keys))
        held[node.node_id] = {k for k, r in zip(keys, raws) if r is not None}
    bad = []
    for key in keys:
        want = set(ring.preference_list(key, n))
        have = {nid for nid, ks in held.items() if key in ks}
        if want != have:
            bad.append(f"{key!r}: on {sorted(have)}, ring says {sorted(want)}")
    return bad


async def all_acked_readable(kv, acked: dict[bytes, bytes]) -> list[bytes]:
    keys = list(acked)
    lost = []
    for start in range(0, len(keys), 500):
        chunk = keys[start:start + 500]
        for k, got in zip(chunk, await kv.get_many(chunk, r="quorum")):
            if isinstance(got, KvError) or got.value != acked[k]:
                lost.append(k)
    return lost


async def cleanup(kv, nodes_list) -> None:
    for node in nodes_list:
        await kv.command("cleanup", {}, address=node.address)


async def test_nodes_join_under_write_load_and_take_exactly_their_ranges(nodes) -> None:
    cluster = await nodes.cluster(3)
    async with nodes.client(*cluster) as kv:
        base = {b"base-%05d" % i: b"b%d" % i for i in range(3000)}
        failures = [r for r in await kv.put_many(list(base.items())) if not isinstance(r, bytes)]
        assert failures == [], str(failures[:1])
        writer = Writer(kv, b"load")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer.run)
            cluster.append(await nodes.start())
            cluster.append(await nodes.start())
            await nodes.converged(cluster)
            await trio.sleep(0.2)
            writer.stop.set()
        assert len(writer.acked) > 100
        acked = {**base, **writer.acked}
        await cleanup(kv, cluster)
        errors = await placement_errors(cluster, list(acked))
        assert errors == [], f"{len(errors)} misplaced, e.g. {errors[:2]}"
        assert await all_acked_readable(kv, acked) == []
        status = await kv.status(cluster[3].address)
        assert status["stream"]["op"] == "join" and status["stream"]["state"] == "done"


async def test_nodes_joining_at_the_same_time_each_own_a_fair_share(nodes) -> None:
    """Two joiners that learn the same ring compute the same balanced tokens: one of them must
    pick again, or it owns nothing (seen in 2 of 8 three-node test clusters)."""
    first = await nodes.start()
    async with trio.open_nursery() as nursery:
        for _ in range(2):
            nursery.start_soon(partial(nodes.start, seeds=(first.address,)))
    await nodes.converged(nodes.nodes)
    share = first.ring().ownership()
    assert all(0.2 < share[n.node_id] < 0.5 for n in nodes.nodes), share
    tokens = [set(n.gossip.me.tokens) for n in nodes.nodes]
    assert all(a.isdisjoint(b) for i, a in enumerate(tokens) for b in tokens[i + 1:])


async def test_decommission_under_load_moves_data_away_and_the_node_leaves(nodes) -> None:
    cluster = await nodes.cluster(4)
    leaving, staying = cluster[3], cluster[:3]
    async with nodes.client(*staying) as kv:
        base = {b"d-%05d" % i: b"x%d" % i for i in range(2000)}
        await kv.put_many(list(base.items()))
        writer = Writer(kv, b"dload")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer.run)
            report = msgpack.unpackb(await kv.command("decommission", {}, address=leaving.address, timeout_s=60))
            writer.stop.set()
        assert report["streamed"] > 0
        with trio.fail_after(10):
            await leaving.stopped.wait()
        await eventually(lambda: _ring_size(staying, 3), what="ring of 3")
        acked = {**base, **writer.acked}
        assert await placement_errors(staying, list(acked)) == []
        assert await all_acked_readable(kv, acked) == []


async def _ring_size(nodes_list, size) -> bool:
    return all(len(n.ring()) == size for n in nodes_list)


async def test_removenode_rereplicates_a_dead_nodes_ranges(nodes) -> None:
    cluster = await nodes.cluster(4)
    dead, alive = cluster[3], cluster[:3]
    async with nodes.client(*alive) as kv:
        data = {b"r-%05d" % i: b"y%d" % i for i in range(2000)}
        await kv.put_many(list(data.items()), w="all")
        await nodes.stop(dead)
        await eventually(lambda: _all_see_down(alive, dead.node_id), what="dead node marked down")
        report = msgpack.unpackb(await kv.command("removenode", {"node_id": dead.node_id},
                                                  address=alive[0].address, timeout_s=60))
        assert report["removed"] == dead.node_id
        await eventually(lambda: _ring_size(alive, 3), what="ring of 3")
        assert await placement_errors(alive, list(data)) == []
        assert await all_acked_readable(kv, data) == []


async def _all_see_down(nodes_list, node_id) -> bool:
    return all(not n.is_up(node_id) for n in nodes_list)


async def test_decommission_of_the_last_node_is_refused(nodes) -> None:
    node = await nodes.start()
    async with nodes.client(node) as kv:
        try:
            await kv.command("decommission", {}, address=node.address)
        except KvError as exc:
            assert "last node" in str(exc)
        else:
            raise AssertionError("decommissioning the last node must fail")
        await kv.put(b"still", b"serving")


async def test_repair_restores_a_record_deleted_behind_the_clusters_back(nodes) -> None:
    cluster = await nodes.cluster(3, storage="sqlite")
    async with nodes.client(*cluster) as kv:
        data = {b"m-%04d" % i: b"z%d" % i for i in range(500)}
        await kv.put_many(list(data.items()), w="all")
        victim = cluster[1]
        lost = list(data)[:40]
        await victim.engine.update_many([(k, lambda _: None) for k in lost])
        assert all(r is None for r in await victim.engine.get_many(lost))
        report = msgpack.unpackb(await kv.command("repair", {}, address=victim.address, timeout_s=60))
        assert report["state"] == "done" and report["keys_pulled"] >= len(lost)
        assert all(r is not None for r in await victim.engine.get_many(lost))
        again = msgpack.unpackb(await kv.command("repair", {}, address=victim.address, timeout_s=60))
        assert again["differing_buckets"] == 0  # converged: trees now agree
        assert (await kv.status(victim.address))["repaired_at_ms"] > 0


async def test_an_interrupted_join_resumes_from_its_saved_cursors(nodes) -> None:
    import json

    from kvstore.node.node import serve

    cluster = await nodes.cluster(3)
    async with nodes.client(*cluster) as kv:
        data = {b"j-%05d" % i: b"v" * 512 for i in range(3000)}
        await kv.put_many(list(data.items()), w="all")
    config = nodes.config("n4", seeds=tuple(n.address for n in cluster), storage="sqlite",
                          stream_rate_bytes_per_s=200_000.0)  # slow enough to interrupt
    with trio.move_on_after(3.0):  # the "crash": the joining node is cancelled mid-stream
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, config)
            raise AssertionError("the slow join should not have finished")
    ident = json.loads((config.data_dir / "node.json").read_text())
    assert ident["bootstrap"]["done"] is False and ident["bootstrap"]["cursors"], ident.get("bootstrap")
    joined = await nodes.start("n4", seeds=tuple(n.address for n in cluster), storage="sqlite")
    assert joined.elastic.progress["state"] == "done"
    ident = json.loads((config.data_dir / "node.json").read_text())
    assert ident["bootstrap"]["done"] is True
    cluster.append(joined)
    await nodes.converged(cluster)
    async with nodes.client(*cluster) as kv:
        for node in cluster:
            await kv.command("cleanup", {}, address=node.address)
    assert await placement_errors(cluster, list(data)) == []


async def test_a_join_can_be_aborted_and_the_node_joins_afresh_later(nodes) -> None:
    import json

    cluster = await nodes.cluster(3)
    async with nodes.client(*cluster) as kv:
        data = {b"a-%05d" % i: b"v" * 512 for i in range(3000)}
        await kv.put_many(list(data.items()), w="all")
        seeds = tuple(n.address for n in cluster)
        config = nodes.config("n4", seeds=seeds, storage="sqlite", stream_rate_bytes_per_s=200_000.0)
        from kvstore.node.node import serve

        async with trio.open_nursery() as nursery:
            async def run_joiner() -> None:
                await serve(config, task_status=trio.TASK_STATUS_IGNORED)

            nursery.start_soon(run_joiner)
            # the joiner is streaming (slowly) once the others see it JOINING
            await eventually(lambda: _sees_status(cluster, "n4", "joining"), what="n4 seen joining")
            # writes while it joins go to it as a pending replica, on top of the quorum
            acked = {}
            for k, r in zip([b"during-%d" % i for i in range(50)],
                            await kv.put_many([(b"during-%d" % i, b"d") for i in range(50)])):
                if isinstance(r, bytes):
                    acked[k] = b"d"
            assert len(acked) == 50
            address = next(m["address"] for m in (await kv.status(cluster[0].address))["members"]
                           if m["node_id"] == "n4")
            async with Client([address], token_aware=False, retries=0) as direct:  # a joiner coordinates nothing
                with pytest.raises(KvError, match="not serving requests yet"):
                    await direct.get(b"a-00001", timeout_s=2)
            report = msgpack.unpackb(await kv.command("abort-join", {}, address=address, timeout_s=30))
            assert report["aborted"] is True and report["state"] == "aborted"
            with trio.fail_after(20):  # serve() returns: the node stopped by itself
                while nursery.child_tasks:
                    await trio.sleep(0.05)
        await eventually(lambda: _sees_status(cluster, "n4", "left"), what="n4 seen left")
        assert all(len(n.ring()) == 3 for n in cluster)
        ident = json.loads((config.data_dir / "node.json").read_text())
        assert ident["tokens"] == [] and "bootstrap" not in ident
        assert await all_acked_readable(kv, {**data, **acked}) == []
        with pytest.raises(KvError):  # a joining node refuses a second abort; a normal one too
            await kv.command("abort-join", {}, address=cluster[0].address)

    # started again on the same data dir, it joins afresh (new tokens, full stream) and serves
    again = await nodes.start("n4", seeds=seeds, storage="sqlite")
    assert again.elastic.progress["state"] == "done" and again.gossip.me.status.value == "normal"
    cluster.append(again)
    await nodes.converged(cluster)
    async with nodes.client(*cluster) as kv:
        for node in cluster:
            await kv.command("cleanup", {}, address=node.address)
        assert await all_acked_readable(kv, data) == []
    assert await placement_errors(cluster, list(data)) == []


async def _sees_status(nodes_list, node_id: str, status: str) -> bool:
    for n in nodes_list:
        state = n.gossip.table.get(node_id)
        if state is None or state.status.value != status:
            return False
    return True


async def test_writes_that_land_on_a_source_behind_the_stream_still_reach_the_joiner(nodes) -> None:
    """A coordinator that chose its replicas just before it saw the joiner can deliver a write to
    a source after the join's stream went past that key; the catch-up pass must bring it over."""
    from kvstore.core import hlc
    from kvstore.core.versions import Sibling

    cluster = await nodes.cluster(3)
    async with nodes.client(*cluster) as kv:
        await kv.put_many([(b"s-%05d" % i, b"v" * 512) for i in range(2000)], w="all")
    seeds = tuple(n.address for n in cluster)
    late: list[bytes] = []
    joined: list = []

    async def join() -> None:
        joined.append(await nodes.start("n4", seeds=seeds, storage="sqlite", stream_rate_bytes_per_s=300_000.0))

    async def joiner_phase() -> str:
        state = cluster[0].gossip.table.get("n4")
        if state is None:
            return ""
        try:
            async with Client([state.address], token_aware=False, retries=0) as kv:
                stream = (await kv.status(state.address)).get("stream") or {}
        except KvError:
            return ""
        return stream.get("phase", stream.get("state", ""))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(join)
        with trio.fail_after(60):
            while await joiner_phase() != "running":
                await trio.sleep(0.05)
            i = 0
            while not joined and await joiner_phase() == "running":  # pass 1 under way
                key = b"late-%05d" % i
                i += 1
                sib = Sibling("zz", 1, {}, b"late", hlc.pack(cluster[0].now_ms(), 0))
                for node in cluster:  # straight into the sources, as a late replica write lands
                    await node.store.merge_many([(key, [sib])])
                late.append(key)
                await trio.sleep(0.02)
    [n4] = joined
    assert len(late) > 20, "the first pass ended before the test could write behind it"
    ring = n4.ring()
    mine = [k for k in late if "n4" in ring.preference_list(k, 3)]
    assert mine
    raws = await n4.engine.get_many(mine)
    missing = [k for k, r in zip(mine, raws) if r is None]
    assert missing == [], f"{len(missing)} of {len(mine)} late writes never reached the joiner"

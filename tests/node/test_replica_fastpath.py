"""Replica batches served on the transport loop (kvstore/node/fastpath.py): with sqlite, a
coordinator's records and plain reads never cross into the replica's trio loop, and must still
be stored, read and observed by the replica's clock exactly as through trio."""
from __future__ import annotations

from kvstore.core.hlc import pack

from .test_replication import stored_on


async def test_writes_and_reads_through_the_loop_path_land_on_every_replica(nodes) -> None:
    cluster = await nodes.cluster(3, storage="sqlite")
    coordinator = cluster[0]
    # the coordinator's clock runs 20 s ahead (inside the drift replicas follow): its writes'
    # timestamps must reach the replicas' clocks, so their later writes order after them
    ahead = pack(coordinator.now_ms() + 20_000, 0)
    coordinator.clock.last = ahead
    keys = [b"loop-%d" % i for i in range(40)]
    async with nodes.client(coordinator, token_aware=False) as kv:
        contexts = await kv.put_many([(k, b"v-" + k) for k in keys], w="all")
        assert all(isinstance(c, bytes) for c in contexts), contexts[:1]
        got = await kv.get_many(keys, r="all")  # the other replicas answer through their loop path
        assert [g.value for g in got] == [b"v-" + k for k in keys]
    for replica in cluster[1:]:  # its own next write orders after the ones it stored
        async with nodes.client(replica, token_aware=False) as direct:
            await direct.put(b"later-" + replica.node_id.encode(), b"x", w="all")
            [sibling] = (await direct.get(b"later-" + replica.node_id.encode())).siblings
            assert sibling.node_id == replica.node_id and sibling.hlc > ahead
    for key in keys:
        assert await stored_on(cluster, key) == sorted(n.node_id for n in cluster)

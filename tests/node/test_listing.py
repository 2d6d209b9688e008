"""Key listing (KV.ListKeys) on real in-process clusters: every live key once, in byte order, across
pages and nodes; prefixes and resumption; a node down; ranges with no replica up reported as
missing, never silently dropped; bad requests refused by field."""
from __future__ import annotations

import pytest
import trio

from kvstore.client import SyncClient
from kvstore.errors import InvalidArgument, Unavailable
from tests.node.test_cli import kv_cli


async def _fill(kv, count: int) -> set[bytes]:
    keys = {b"user/%04d" % i for i in range(count)} | {b"order/%04d" % i for i in range(count // 2)}
    await kv.put_many([(k, b"v-" + k) for k in sorted(keys)])
    return keys


async def _listed(kv, **options) -> list[bytes]:
    return [k async for k in kv.list_keys(**options)]


async def test_lists_every_live_key_once_in_order_across_small_pages(nodes) -> None:
    await nodes.cluster(3)
    async with nodes.client() as kv:
        keys = await _fill(kv, 120)
        for k in [b"user/0003", b"order/0010"]:
            await kv.delete(k)
            keys.discard(k)
        await kv.put(b"user/short-lived", b"x", ttl_s=1)
        with trio.fail_after(5):
            while (await kv.get(b"user/short-lived")).found:  # expired: not listed either
                await trio.sleep(0.2)
        assert await _listed(kv) == sorted(keys)
        assert await _listed(kv, page_size=7) == sorted(keys)
        assert await _listed(kv, page_size=7, replicas=3) == sorted(keys)
        assert await _listed(kv, prefix=b"order/") == sorted(k for k in keys if k.startswith(b"order/"))
        assert await _listed(kv, limit=10) == sorted(keys)[:10]
        assert await _listed(kv, limit=2000) == sorted(keys)  # more than a page may hold
        middle = sorted(keys)[50]
        assert await _listed(kv, start_after=middle, page_size=9) == sorted(keys)[51:]


async def test_five_nodes_merge_scattered_ranges_and_survive_a_stopped_node(nodes) -> None:
    """With N=3 of 5 no node holds every key: each page merges several nodes' shares."""
    started = await nodes.cluster(5)
    async with nodes.client(started[0]) as kv:
        keys = await _fill(kv, 150)
        first = await kv.list_keys_page(limit=20)
        assert first.keys == sorted(keys)[:20] and first.cursor and first.missing_ranges == 0
        assert await _listed(kv, page_size=13) == sorted(keys)
        await nodes.stop(started[3])
        with trio.fail_after(15):
            while started[0].is_up(started[3].node_id):
                await trio.sleep(0.1)
        assert await _listed(kv, page_size=13) == sorted(keys)


async def test_a_node_failing_its_share_is_replaced_by_another_replica_within_the_call(nodes) -> None:
    started = await nodes.cluster(5)
    coordinator = started[0]
    async with nodes.client(coordinator) as kv:
        keys = await _fill(kv, 100)
        for other in started[1:]:  # its link fails before anyone has seen it down
            coordinator.peer(other.node_id).blocked = True
            page = await kv.list_keys_page()
            assert (page.keys, page.cursor, page.missing_ranges) == (sorted(keys), b"", 0)
            coordinator.peer(other.node_id).blocked = False


async def test_ranges_with_no_replica_up_are_reported_missing_not_dropped(nodes) -> None:
    started = await nodes.cluster(3)
    async with nodes.client(started[0], n=1) as kv:  # one copy per key: a stopped node's keys are gone
        keys = await _fill(kv, 90)
        gone, ring = started[2].node_id, started[0].ring()
        reachable = sorted(k for k in keys if ring.preference_list(k, 1) != [gone])
        await nodes.stop(started[2])
        with trio.fail_after(15):
            while started[0].is_up(gone):
                await trio.sleep(0.1)
        assert len(reachable) < len(keys), ring.ownership()
        with pytest.raises(Unavailable, match="partial"):
            await _listed(kv)
        assert await _listed(kv, allow_partial=True, page_size=11) == reachable
        page = await kv.list_keys_page()
        assert 0 < page.missing_ranges < page.total_ranges


async def test_bad_listing_requests_name_the_field_and_cost_only_themselves(nodes) -> None:
    node = (await nodes.cluster(3))[0]
    async with nodes.client(node) as kv:
        await kv.put(b"k", b"v")
        limit = node.config.limits.max_batch_items
        with pytest.raises(InvalidArgument, match=rf"limit: {limit + 1} exceeds the limit of {limit}"):
            await kv.list_keys_page(limit=limit + 1)
        with pytest.raises(InvalidArgument, match="prefix: .* exceeds the limit"):
            await kv.list_keys_page(prefix=b"p" * (node.config.limits.max_key_bytes + 1))
        with pytest.raises(InvalidArgument, match="replicas: 4 exceeds n=3"):
            await kv.list_keys_page(replicas=4)
        assert await _listed(kv) == [b"k"]
    # a hostile peer's page request: refused by field, the node keeps serving
    with pytest.raises(InvalidArgument, match="limit must be"):
        await node.peer(nodes.nodes[1].node_id).call("list-keys", {"ranges": [], "limit": -1}, 5.0)
    reply = await node.peer(nodes.nodes[1].node_id).call("list-keys", {"ranges": [[0, 0]], "limit": 5}, 5.0)
    assert reply["keys"] == [b"k"]


async def test_sync_client_and_cli_list_keys(nodes) -> None:
    node = (await nodes.cluster(3))[0]
    async with nodes.client(node) as kv:
        keys = await _fill(kv, 30)

    def sync_list() -> list[bytes]:
        with SyncClient(node.address) as skv:
            return skv.list_keys(prefix=b"user/", limit=12)

    assert await trio.to_thread.run_sync(sync_list) == sorted(k for k in keys if k.startswith(b"user/"))[:12]
    out = await kv_cli("keys", "--prefix", "order/", "--address", node.address)
    assert out.returncode == 0
    assert out.stdout.splitlines() == sorted(k for k in keys if k.startswith(b"order/"))
    limited = await kv_cli("keys", "--limit", "5", "--after", "order/0003", "--address", node.address)
    assert limited.stdout.splitlines() == sorted(keys)[4:9]
    bad = await kv_cli("keys", "--limit", "-1", "--address", node.address)
    assert bad.returncode == 5 and b"--limit" in bad.stderr


"""The client's view of the ring: refreshed once for all the calls that find it stale."""
from __future__ import annotations

import trio

from .test_observability import METRICS, sample, scrape


async def _ring_calls(node) -> float:
    samples = await scrape(node)
    return sample(samples, "grpc_server_handled_total", grpc_service="kvstore.v1.KV",
                  grpc_method="Ring", grpc_code="OK") or 0.0


async def test_a_stale_ring_is_refreshed_once_for_all_calls_in_flight(nodes) -> None:
    node = await nodes.start(**METRICS)
    async with nodes.client(node, ring_refresh_s=3600) as kv:
        await kv.put(b"warm", b"up")  # the first call loads the ring
        before = await _ring_calls(node)
        assert before >= 1
        kv._topology_at = -1e9  # what an UNAVAILABLE reply does: the ring may have changed
        stored: list[bytes] = []

        async def put(i: int) -> None:
            await kv.put(b"k%d" % i, b"v%d" % i)
            stored.append(b"k%d" % i)

        async with trio.open_nursery() as nursery:
            for i in range(64):
                nursery.start_soon(put, i)
        assert len(stored) == 64
        assert await _ring_calls(node) == before + 1
        assert (await kv.get(b"k63")).value == b"v63"


async def test_calls_made_before_the_first_ring_wait_for_one_refresh(nodes) -> None:
    node = await nodes.start(**METRICS)
    before = await _ring_calls(node)
    async with nodes.client(node, ring_refresh_s=3600) as kv:  # no refresh due to time on a slow machine
        async with trio.open_nursery() as nursery:
            for i in range(16):
                nursery.start_soon(kv.put, b"k%d" % i, b"v")
        assert kv._topology is not None  # they were routed by the ring, not at random
    assert await _ring_calls(node) == before + 1


async def test_a_refresh_keeps_the_routes_while_the_ring_is_the_same_and_drops_them_when_it_changes(nodes) -> None:
    first = await nodes.start()
    async with nodes.client(first, ring_refresh_s=3600) as kv:
        await kv.put(b"k", b"v")
        topology = kv._topology
        assert kv._routes  # the key's coordinator is remembered
        await kv.refresh_ring()  # what every ring_refresh_s does: the same ring came back
        assert kv._topology is topology and b"k" in kv._routes

        second = await nodes.start()
        await nodes.converged([first, second])
        await kv.refresh_ring()
        assert kv._topology is not topology
        assert set(kv._topology.addresses) == {first.node_id, second.node_id}
        assert b"k" not in kv._routes  # routed again on the new ring
        await kv.put(b"k", b"v2")
        assert (await kv.get(b"k")).value == b"v2"

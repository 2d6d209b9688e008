"""Overload: a node flooded beyond its budgets refuses work with RESOURCE_EXHAUSTED at once, ends
every call, keeps answering health checks, and loses nothing it stored before."""
from __future__ import annotations

import os
from typing import Any

import grpc
import msgpack
import pytest
import trio

from kvstore._proto import admin_pb2, admin_pb2_grpc, kv_pb2, kv_pb2_grpc
from kvstore.config import NodeConfig
from kvstore.errors import Overloaded

CLIENTS = 4             # separate TCP connections (own subchannel pool each)
IN_FLIGHT_PER_CLIENT = 40  # concurrent batch calls per connection, well over its budget
CALLS_PER_CLIENT = 200  # bounded: each client stops after this many calls
ITEMS_PER_CALL = 100
FLOOD_TIMEOUT_S = 60    # every call must have ended by then (generous: 5 engineers share 2 cores)


async def _finish(future: grpc.Future) -> Any:
    """Wait for a grpc future without blocking trio: the status code, or the response."""
    token = trio.lowlevel.current_trio_token()
    done = trio.Event()
    future.add_done_callback(lambda _: token.run_sync_soon(done.set))
    await done.wait()
    try:
        return future.result()
    except grpc.RpcError as exc:
        return exc


def _channel(address: str) -> grpc.Channel:
    # grpc shares one TCP connection between channels with equal arguments unless told not to
    return grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])


async def test_flooded_node_refuses_fast_stays_healthy_and_keeps_data(nodes) -> None:
    node = await nodes.start(max_concurrent_requests=12, max_concurrent_requests_per_connection=6)
    async with nodes.client(node) as kv:
        before = {b"kept-%d" % i: os.urandom(64) for i in range(50)}
        await kv.put_many(before.items())

    channels = [_channel(node.address) for _ in range(CLIENTS)]
    health = _channel(node.address)
    outcomes: list[grpc.StatusCode] = []
    status_ok = 0
    flood_done = trio.Event()
    try:
        async def client(channel: grpc.Channel, c: int) -> None:
            stub = kv_pb2_grpc.KVStub(channel)
            calls = iter(range(CALLS_PER_CLIENT))

            async def worker() -> None:
                for i in calls:
                    if i % 2:
                        req = kv_pb2.BatchPutRequest(items=[
                            kv_pb2.PutRequest(key=b"flood-%d-%d-%d" % (c, i, j), value=b"x" * 512)
                            for j in range(ITEMS_PER_CALL)])
                        result = await _finish(stub.BatchPut.future(req, timeout=30))
                    else:
                        req = kv_pb2.BatchGetRequest(items=[kv_pb2.GetRequest(key=k) for k in before])
                        result = await _finish(stub.BatchGet.future(req, timeout=30))
                    outcomes.append(result.code() if isinstance(result, grpc.RpcError) else grpc.StatusCode.OK)

            async with trio.open_nursery() as workers:
                for _ in range(IN_FLIGHT_PER_CLIENT):
                    workers.start_soon(worker)

        async def check_health() -> None:
            nonlocal status_ok
            stub = admin_pb2_grpc.AdminStub(health)
            while not flood_done.is_set():
                # its normal deadline (the client default): a flooded node must still answer in it
                result = await _finish(stub.Status.future(admin_pb2.StatusRequest(), timeout=5))
                assert not isinstance(result, grpc.RpcError), f"Status failed during the flood: {result}"
                status_ok += 1
                await trio.sleep(0.02)

        with trio.fail_after(FLOOD_TIMEOUT_S):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(check_health)
                async with trio.open_nursery() as flood:
                    for c, channel in enumerate(channels):
                        flood.start_soon(client, channel, c)
                flood_done.set()
    finally:
        for channel in [*channels, health]:
            channel.close()

    assert len(outcomes) == CLIENTS * CALLS_PER_CLIENT  # every call ended
    codes = {code for code in outcomes}
    assert codes <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    assert outcomes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) > 0
    assert outcomes.count(grpc.StatusCode.OK) > 0
    assert status_ok >= 1
    async with nodes.client(node) as kv:
        got = await kv.get_many(list(before))
        assert [g.value for g in got] == list(before.values())
        view = await kv.status()
    assert view["admission"]["refused"]["client"] == outcomes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert view["admission"]["in_flight"]["client"] == 0 and view["admission"]["connections"] == 0


async def test_refusal_names_the_budget_and_its_limit(nodes) -> None:
    node = await nodes.start(max_concurrent_requests=2, max_concurrent_requests_per_connection=1)
    channel = _channel(node.address)
    try:
        stub = kv_pb2_grpc.KVStub(channel)
        big = kv_pb2.BatchPutRequest(items=[kv_pb2.PutRequest(key=b"k%d" % i, value=b"v" * 256)
                                            for i in range(1000)])
        futures = [stub.BatchPut.future(big, timeout=30) for _ in range(8)]
        results = [await _finish(f) for f in futures]
    finally:
        channel.close()
    refused = [r for r in results if isinstance(r, grpc.RpcError)]
    assert refused, "eight concurrent calls on one connection with a budget of one: some must be refused"
    for exc in refused:
        assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_concurrent_requests_per_connection is 1" in exc.details()


async def test_request_without_deadline_gets_the_node_default(nodes) -> None:
    node = await nodes.start(admin_command_timeout_s=0.5)
    async with nodes.client(node) as kv:
        await kv.put(b"k", b"v")
    with trio.fail_after(8):
        reply = await _slow_rewrap(node, timeout=None)  # sent with no deadline
    assert isinstance(reply, grpc.RpcError)
    assert reply.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert reply.details() == "deadline: no answer within 0.5s (the node default for requests sent without one)"
    async with nodes.client(node) as kv:  # the cut-short command cost only itself
        assert (await kv.get(b"k")).value == b"v"


@pytest.mark.parametrize("field,value,message", [
    ("max_concurrent_requests", 0, "max_concurrent_requests: 0 must be an integer >= 1"),
    ("max_concurrent_requests_per_connection", 2000,
     "max_concurrent_requests_per_connection: must be <= max_concurrent_requests"),
    ("max_inflight_request_bytes", -1, "max_inflight_request_bytes: -1 must be an integer >= 1"),
    ("max_stream_batches_in_flight", 0, "max_stream_batches_in_flight: 0 must be an integer >= 1"),
    ("admin_command_timeout_s", 0, "admin_command_timeout_s: must be > 0"),
])
def test_limit_settings_are_validated(field: str, value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        NodeConfig(**{field: value}).validate()


async def test_requests_a_peer_forwards_share_no_per_connection_budget(nodes) -> None:
    # every client stays within its own budget of 2; n1 forwards all of them to n2 over one
    # connection, which would be 8 at once on that connection
    n1, n2 = await nodes.cluster(2, max_concurrent_requests_per_connection=2)
    keys = [k for k in (b"fwd-%d" % i for i in range(400)) if n1.ring().preference_list(k, 1) == ["n2"]][:40]
    channels = [_channel(n1.address) for _ in range(4)]
    outcomes: list[Any] = []
    try:
        async def client(channel: grpc.Channel, mine: list[bytes]) -> None:
            stub = kv_pb2_grpc.KVStub(channel)
            for i in range(0, len(mine), 2):
                futures = [stub.Put.future(kv_pb2.PutRequest(key=k, value=b"v", options=kv_pb2.Options(n=1)),
                                           timeout=30) for k in mine[i:i + 2]]
                outcomes.extend([await _finish(f) for f in futures])

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for c, channel in enumerate(channels):
                    nursery.start_soon(client, channel, keys[c::4])
    finally:
        for channel in channels:
            channel.close()
    errors = [o for o in outcomes if isinstance(o, grpc.RpcError)]
    assert len(outcomes) == len(keys) and not errors, [e.details() for e in errors]


async def test_work_of_a_request_whose_deadline_passed_is_cancelled(nodes) -> None:
    node = await nodes.start()
    async with nodes.client(node) as kv:
        await kv.put(b"k", b"v")
    reply = await _slow_rewrap(node, timeout=0.5)
    assert isinstance(reply, grpc.RpcError) and reply.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # the re-wrap (sleeping 10 s after its first record) is cut short and its admission slot
    # handed back well before those 10 s; the slot is released just after the command's own
    # cleanup, so wait for both rather than racing the two
    with trio.fail_after(5):
        while node.rewrap_progress.get("running") or node.admission.in_flight["client"]:
            await trio.sleep(0.05)


async def _slow_rewrap(node: Any, timeout: float | None) -> Any:
    """A command that takes 10 s (a re-wrap at 0.1 records/s sleeps after its first record):
    its reply, or the RpcError that ended it."""
    channel = _channel(node.address)
    try:
        slow = admin_pb2.CommandRequest(name="rewrap", args=msgpack.packb({"rate_per_s": 0.1}))
        return await _finish(admin_pb2_grpc.AdminStub(channel).Command.future(slow, timeout=timeout))
    finally:
        channel.close()


async def _full_node(nodes, nursery: trio.Nursery) -> Any:
    """A node with one request slot, holding k=v, whose slot a command holds until its 1 s
    deadline cuts it short."""
    node = await nodes.start(max_concurrent_requests=1, max_concurrent_requests_per_connection=1)
    async with nodes.client(node) as kv:
        await kv.put(b"k", b"v")  # the re-wrap sleeps after its first record
    nursery.start_soon(_slow_rewrap, node, 1.0)
    with trio.fail_after(5):
        while not node.admission.in_flight["client"]:
            await trio.sleep(0.01)
    return node


async def test_the_client_retries_a_refused_write_until_the_node_has_room(nodes) -> None:
    # a put made while the node is full is refused at admission (nothing done) and the client
    # tries again, with backoff, until the slot is free
    async with trio.open_nursery() as nursery:
        node = await _full_node(nodes, nursery)
        async with nodes.client(node, retries=20, timeout_s=10) as kv:
            await kv.put(b"k", b"written while the node was full")
            assert node.admission.refused["client"] >= 1  # it was refused at least once first
            assert (await kv.get(b"k")).value == b"written while the node was full"


async def test_a_refusal_the_client_may_not_retry_names_the_budget(nodes) -> None:
    async with trio.open_nursery() as nursery:
        node = await _full_node(nodes, nursery)
        async with nodes.client(node, retries=0) as kv:
            with pytest.raises(Overloaded, match="the limit of max_concurrent_requests is 1"):
                await kv.put(b"k", b"refused")
    async with nodes.client(node) as kv:  # refused means not done: the old value is still there
        assert (await kv.get(b"k")).value == b"v"

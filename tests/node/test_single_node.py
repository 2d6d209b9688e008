"""One real node over gRPC: the public API end to end, errors and limits, hostile input."""
from __future__ import annotations

import os
import threading

import grpc
import pytest
import trio

import kvstore
from kvstore._proto import kv_pb2
from kvstore.errors import InvalidArgument, NotFound, StaleContext


async def test_put_get_delete_round_trip(nodes) -> None:
    node = await nodes.start()
    async with nodes.client(node) as kv:
        await kv.put(b"greeting", b"hello")
        assert (await kv.get(b"greeting")).value == b"hello"
        assert await kv.get_value(b"greeting") == b"hello"
        await kv.put(b"greeting", b"hello again")
        got = await kv.get(b"greeting")
        assert [s.value for s in got.siblings] == [b"hello again"]  # blind overwrite, no sibling pile-up
        await kv.delete(b"greeting")
        assert not (await kv.get(b"greeting")).found
        with pytest.raises(NotFound):
            await kv.get_value(b"greeting")


async def test_batches_report_errors_per_item(nodes) -> None:
    node = await nodes.start()
    async with nodes.client(node, token_aware=False) as kv:
        results = await kv.put_many([(b"a", b"1"), (b"", b"bad"), (b"c", b"3")])
        assert isinstance(results[1], InvalidArgument) and "key: must not be empty" in str(results[1])
        assert isinstance(results[0], bytes) and isinstance(results[2], bytes)
        got = await kv.get_many([b"a", b"c", b"missing"])
        assert [g.value for g in got] == [b"1", b"3", None]
        await kv.delete_many([b"a"])
        assert not (await kv.get(b"a")).found


async def test_stale_context_conditional_put_fails_with_failed_precondition(nodes) -> None:
    node = await nodes.start()
    async with nodes.client(node) as kv:
        await kv.put(b"k", b"v1")
        read = await kv.get(b"k")
        await kv.put(b"k", b"v2", context=read.context, conditional=True)
        with pytest.raises(StaleContext, match="no longer current"):
            await kv.put(b"k", b"v3", context=read.context, conditional=True)
        assert (await kv.get(b"k")).value == b"v2"
        # an empty-context conditional put means "only if absent"
        absent = await kv.get(b"new")
        await kv.put(b"new", b"first", context=absent.context, conditional=True)
        with pytest.raises(StaleContext):
            await kv.put(b"new", b"second", context=absent.context, conditional=True)


async def test_concurrent_writes_with_one_context_through_one_node_become_siblings(nodes) -> None:
    node = await nodes.start()
    async with nodes.client(node) as kv:
        await kv.put(b"k", b"base")
        ctx = (await kv.get(b"k")).context
        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(lambda i=i: kv.put(b"k", b"w%d" % i, context=ctx))
        got = await kv.get(b"k")
        assert sorted(s.value for s in got.siblings) == sorted(b"w%d" % i for i in range(20))
        await kv.put(b"k", b"merged", context=got.context)
        assert [s.value for s in (await kv.get(b"k")).siblings] == [b"merged"]


@pytest.mark.parametrize("call,message", [
    (lambda kv: kv.put(b"", b"v"), "key: must not be empty"),
    (lambda kv: kv.put(b"k" * 1025, b"v"), "key: 1025 bytes exceeds the limit of 1024 bytes"),
    (lambda kv: kv.get(b"k" * 1025), "key: 1025 bytes exceeds the limit of 1024 bytes"),
    (lambda kv: kv.put(b"k", b"v" * ((1 << 20) + 1)), "value: 1048577 bytes exceeds the limit of 1048576 bytes"),
    (lambda kv: kv.put(b"k", b"v", w=4), "w: 4 exceeds the replication factor n=3"),
    (lambda kv: kv.get(b"k", r=9), "r: 9 exceeds the replication factor n=3"),
    (lambda kv: kv.put(b"k", b"v", context=b"\xc1garbage"), "context: not a context"),
    (lambda kv: kv.put(b"k", b"v", ttl_s=10**9), "ttl_s: 1000000000 is outside"),
])
async def test_bad_input_is_invalid_argument_naming_field_and_limit(nodes, call, message) -> None:
    node = await nodes.start()
    async with nodes.client(node) as kv:
        with pytest.raises(InvalidArgument, match=message):
            await call(kv)
        await kv.put(b"still", b"serving")
        assert (await kv.get(b"still")).value == b"serving"


async def test_largest_allowed_value_round_trips(nodes) -> None:
    node = await nodes.start()
    async with nodes.client(node) as kv:
        big = os.urandom(1 << 20)
        await kv.put(b"big", big)
        assert (await kv.get(b"big")).value == big


async def test_unknown_consistency_level_enum_is_rejected(nodes) -> None:
    node = await nodes.start()
    channel = grpc.insecure_channel(node.address)
    try:
        stub = __import__("kvstore._proto.kv_pb2_grpc", fromlist=["KVStub"]).KVStub(channel)
        req = kv_pb2.PutRequest(key=b"k", value=b"v", w=kv_pb2.Level(named=42))
        with pytest.raises(grpc.RpcError) as info:
            await trio.to_thread.run_sync(lambda: stub.Put(req, timeout=5))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "w: unknown consistency level 42" in info.value.details()
    finally:
        channel.close()


METHODS = ["/kvstore.v1.KV/Put", "/kvstore.v1.KV/Get", "/kvstore.v1.KV/Delete", "/kvstore.v1.KV/BatchPut",
           "/kvstore.v1.KV/BatchGet", "/kvstore.v1.KV/BatchDelete", "/kvstore.v1.KV/Ring",
           "/kvstore.v1.Internal/Call", "/kvstore.v1.Admin/Status", "/kvstore.v1.Admin/Locate"]


async def test_random_bytes_to_every_method_cost_only_that_request(nodes) -> None:
    node = await nodes.start()
    async with nodes.client(node) as kv:
        await kv.put(b"kept", b"value")
    channel = grpc.insecure_channel(node.address)
    rng = __import__("random").Random(7)

    def blast() -> list[grpc.StatusCode]:
        codes = []
        for method in METHODS:
            call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
            for size in (1, 7, 64, 1000):
                try:
                    call(bytes(rng.getrandbits(8) for _ in range(size)), timeout=5)
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as exc:
                    codes.append(exc.code())
        for name in ("/kvstore.v1.Internal/Stream", "/kvstore.v1.KV/Session"):
            stream = channel.stream_stream(name, request_serializer=None, response_deserializer=None)
            try:
                list(stream(iter([os.urandom(50), b"\x0a\x03\x01\x02\x03"]), timeout=2))
            except grpc.RpcError as exc:
                codes.append(exc.code())
        return codes

    try:
        codes = await trio.to_thread.run_sync(blast)
    finally:
        channel.close()
    assert grpc.StatusCode.UNAVAILABLE not in codes
    async with nodes.client(node) as kv:
        assert (await kv.get(b"kept")).value == b"value"
        await kv.put(b"after", b"fine")


async def test_ttl_sets_an_expiry(nodes) -> None:
    node = await nodes.start()
    async with nodes.client(node) as kv:
        await kv.put(b"temp", b"v", ttl_s=60)
        [sib] = (await kv.get(b"temp")).siblings
        assert 55_000 < sib.expires_at_ms - node.now_ms() <= 60_000


async def test_sync_client_has_the_same_methods(nodes) -> None:
    node = await nodes.start()

    def use() -> bytes | None:
        with kvstore.SyncClient(node.address) as kv:
            kv.put(b"sync", b"facade")
            return kv.get(b"sync").value

    assert await trio.to_thread.run_sync(use) == b"facade"


async def test_stop_while_busy_drains_and_leaves_no_threads(nodes) -> None:
    import threading

    before = {t.ident for t in threading.enumerate()}
    node = await nodes.start(storage="sqlite")
    ours = [t.name for t in threading.enumerate() if t.ident not in before and t.name.startswith("kvstore")]
    assert "kvstore-transport" in ours and any(n.startswith("kvstore-sqlite") for n in ours)
    results: list[object] = []
    some_done = trio.Event()

    async def writer(i: int) -> None:
        async with nodes.client(node) as kv:
            for j in range(30):
                try:
                    await kv.put(b"busy-%d-%d" % (i, j), b"v")
                    results.append(b"busy-%d-%d" % (i, j))
                    if len(results) >= 8:
                        some_done.set()
                except kvstore.KvError as exc:
                    results.append(exc)
                    return

    async with trio.open_nursery() as nursery:
        for i in range(8):
            nursery.start_soon(writer, i)
        with trio.fail_after(30):
            await some_done.wait()  # stop while writes are still coming (not after a fixed sleep)
        await nodes.stop(node)
    # our transport and storage threads are gone (grpc's own pollers are not ours to stop)
    leftover = [t.name for t in threading.enumerate()
                if t.ident not in before and t.name.startswith("kvstore")]
    assert leftover == []
    # every write acknowledged before or during the drain is on disk
    acked = [k for k in results if isinstance(k, bytes)]
    again = await nodes.start(node.node_id, seeds=(), storage="sqlite")
    async with nodes.client(again) as kv:
        got = await kv.get_many(acked)
    assert [g.value for g in got] == [b"v"] * len(acked)


async def test_a_restart_takes_a_newer_generation_even_when_the_clock_went_back(nodes, tmp_path) -> None:
    import json

    node = await nodes.start("g1", storage="sqlite")
    first = node.gossip.me.generation
    await nodes.stop(node)
    ident_file = tmp_path / "g1" / "node.json"
    ident = json.loads(ident_file.read_text())
    assert ident["generation"] == first
    ahead = first + 3_600_000  # as if the previous run's clock was an hour ahead of this one
    ident["generation"] = ahead
    ident_file.write_text(json.dumps(ident))
    again = await nodes.start("g1", storage="sqlite")
    assert again.gossip.me.generation == ahead + 1  # peers would ignore anything not newer


async def test_a_client_sending_batch_after_batch_starts_no_thread_per_batch(nodes, monkeypatch) -> None:
    """grpcio's blocking channel polls in a thread that lives only while some call is in flight;
    the client's health watch keeps one in flight, so batches do not each start a thread."""
    node = await nodes.start()
    async with nodes.client(node) as kv:
        await kv.put(b"warm", b"up")
        started: list[str] = []
        real_start = threading.Thread.start

        def counting_start(thread: threading.Thread) -> None:
            started.append(thread.name)
            real_start(thread)

        monkeypatch.setattr(threading.Thread, "start", counting_start)
        for i in range(20):
            await kv.put(b"k%d" % i, b"v")  # one batch each, one after another
            assert (await kv.get(b"k%d" % i)).value == b"v"
        assert started == []


async def test_a_stopping_node_ends_its_health_watches_after_not_serving(nodes) -> None:
    """A Watch left open made the node's stop wait its whole grace period, then cut it off."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    node = await nodes.start()
    opened = trio.Event()
    token = trio.lowlevel.current_trio_token()

    def watch() -> tuple[list[int], grpc.StatusCode]:
        with grpc.insecure_channel(node.address) as channel:
            call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
            statuses = []
            for reply in call:
                statuses.append(reply.status)
                if len(statuses) == 1:
                    trio.from_thread.run_sync(opened.set, trio_token=token)
            return statuses, call.code()

    async with trio.open_nursery() as nursery:
        result: list = []

        async def run() -> None:
            result.append(await trio.to_thread.run_sync(watch))

        nursery.start_soon(run)
        with trio.fail_after(10):
            await opened.wait()
            await nodes.stop(node)
    statuses, code = result[0]
    assert statuses[0] == health_pb2.HealthCheckResponse.SERVING
    assert statuses[-1] == health_pb2.HealthCheckResponse.NOT_SERVING
    assert code == grpc.StatusCode.OK


async def test_a_restart_with_the_clock_set_back_stamps_after_what_it_stamped_before(nodes, monkeypatch) -> None:
    """The node saves a clock lease while it runs and starts above it: a wall clock set back
    across a restart (NTP step, a VM restored) does not give later writes earlier timestamps, and
    the newest value stays the one written last."""
    from kvstore.node.node import Node

    node = await nodes.start(name="solo", storage="sqlite")
    async with nodes.client(node) as kv:
        await kv.put(b"k", b"before")
        before = (await kv.get(b"k")).siblings[0].hlc
    await nodes.stop(node)
    real = Node.now_ms
    monkeypatch.setattr(Node, "now_ms", staticmethod(lambda: real() - 3_600_000))  # an hour back
    node = await nodes.start(name="solo", storage="sqlite", seeds=())
    async with nodes.client(node) as kv:
        await kv.put(b"k", b"after")
        got = await kv.get(b"k")
    assert got.value == b"after" and [s.value for s in got.siblings] == [b"after"]
    assert got.siblings[0].hlc > before


async def test_a_clock_lease_that_cannot_be_saved_costs_no_request(nodes, monkeypatch) -> None:
    import kvstore.node.node as node_module

    node = await nodes.start()
    failures = []

    def full_disk(*args) -> None:
        failures.append(args)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(node_module, "save_identity", full_disk)
    with trio.fail_after(10):
        while not failures:
            await trio.sleep(0.1)
    async with nodes.client(node) as kv:
        await kv.put(b"k", b"v")
        assert await kv.get_value(b"k") == b"v"
    assert not node.stopping.is_set()

"""Metrics endpoint, health service, reflection and request-id logs of real in-process nodes."""
from __future__ import annotations

import io
import json
import logging
import socket
import urllib.request
from typing import Any, Callable

import grpc
import pytest
import trio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from kvstore._proto import kv_pb2, kv_pb2_grpc
from kvstore.node import logs
from kvstore.node.node import Node

from .conftest import Nodes, eventually

METRICS = {"metrics_listen": "127.0.0.1:0"}


def scrape_now(node: Node) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics of a node (blocking): sample (name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://{node.metrics_server.address}/metrics", timeout=10) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def scrape(node: Node) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return await trio.to_thread.run_sync(scrape_now, node)


def sample(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def with_channel(address: str, fn: Callable[[grpc.Channel], Any]) -> Any:
    """Run fn with a plain synchronous channel (called in a worker thread, never on trio)."""
    with grpc.insecure_channel(address) as channel:
        return fn(channel)


async def in_thread(address: str, fn: Callable[[grpc.Channel], Any]) -> Any:
    return await trio.to_thread.run_sync(with_channel, address, fn)


def _put(key: bytes, value: bytes = b"v") -> kv_pb2.PutRequest:
    return kv_pb2.PutRequest(key=key, value=value)


# ---- metrics ----------------------------------------------------------------------------------

async def test_metrics_count_requests_by_method_code_and_item(nodes: Nodes) -> None:
    node = await nodes.start("m1", storage="sqlite", **METRICS)
    too_long = b"k" * (node.config.limits.max_key_bytes + 1)

    def calls(channel: grpc.Channel) -> None:
        kv = kv_pb2_grpc.KVStub(channel)
        for i in range(3):
            kv.Put(_put(b"key-%d" % i), timeout=10)
        with pytest.raises(grpc.RpcError) as bad:
            kv.Put(_put(too_long), timeout=10)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        kv.Get(kv_pb2.GetRequest(key=b"key-0"), timeout=10)
        kv.Get(kv_pb2.GetRequest(key=b"key-1"), timeout=10)
        reply = kv.BatchPut(kv_pb2.BatchPutRequest(items=[_put(b"key-9"), _put(too_long)]), timeout=10)
        assert [s.code for s in reply.statuses] == [0, grpc.StatusCode.INVALID_ARGUMENT.value[0]]

    await in_thread(node.address, calls)
    m = await scrape(node)
    kv = "kvstore.v1.KV"
    handled = "grpc_server_handled_total"
    assert sample(m, handled, grpc_service=kv, grpc_method="Put", grpc_code="OK") == 3
    assert sample(m, handled, grpc_service=kv, grpc_method="Put", grpc_code="INVALID_ARGUMENT") == 1
    assert sample(m, handled, grpc_service=kv, grpc_method="Get", grpc_code="OK") == 2
    assert sample(m, handled, grpc_service=kv, grpc_method="BatchPut", grpc_code="OK") == 1
    assert sample(m, "grpc_server_handling_seconds_count", grpc_service=kv, grpc_method="Put") == 4
    inf_bucket = sample(m, "grpc_server_handling_seconds_bucket", grpc_service=kv, grpc_method="Get", le="+Inf")
    assert inf_bucket == 2
    # items: each key of a batch counts once, with its own status
    assert sample(m, "kvstore_items_total", op="put", code="OK") == 4
    assert sample(m, "kvstore_items_total", op="put", code="INVALID_ARGUMENT") == 2
    assert sample(m, "kvstore_items_total", op="get", code="OK") == 2
    # scrape-time state of this very node
    assert sample(m, "kvstore_node_info", node_id="m1", address=node.address, version=_version(m)) == 1
    assert sample(m, "kvstore_ready") == 1
    assert sample(m, "kvstore_storage_bytes") > 0
    assert sample(m, "kvstore_envelope_ops_total", op="seal") == 4


def _version(samples: dict) -> str:
    [version] = [dict(labels)["version"] for name, labels in samples if name == "kvstore_node_info"]
    return version


async def test_cluster_metrics_show_replica_streams_gossip_and_hints_per_node(nodes: Nodes) -> None:
    n1, n2, n3 = await nodes.cluster(3, **METRICS)
    async with nodes.client(n1) as client:
        for i in range(30):
            await client.put(b"r-%d" % i, b"x")
    m1, m2, m3 = [await scrape(n) for n in (n1, n2, n3)]
    # every node has its own registry: its own identity, its own view of the others
    assert sample(m1, "kvstore_node_info", node_id="n1", address=n1.address, version=_version(m1)) == 1
    assert sample(m2, "kvstore_node_info", node_id="n2", address=n2.address, version=_version(m2)) == 1
    assert sample(m1, "kvstore_peers", state="up") == 2
    assert sample(m1, "kvstore_gossip_rounds_total") > 0
    assert sample(m1, "kvstore_gossip_phi", peer="n2") is not None
    assert sample(m1, "kvstore_gossip_phi", peer="n1") is None  # never itself
    assert sample(m1, "kvstore_members", status="normal") == 3
    # the client routes each key to a replica; whichever coordinated it sent it to the other two
    # replicas (N=3 on 3 nodes) on their replica streams
    by_node = {"n1": m1, "n2": m2, "n3": m3}
    assert sum(sample(m, "kvstore_items_total", op="put", code="OK") or 0 for m in by_node.values()) == 30
    sent = batches = 0
    for name, m in by_node.items():
        for peer in set(by_node) - {name}:
            sent += sample(m, "kvstore_replica_ops_sent_total", peer=peer) or 0
            batches += sample(m, "kvstore_replica_batches_sent_total", peer=peer) or 0
            assert sample(m, "kvstore_replica_queue_ops", peer=peer) in (None, 0)
    assert sent == 60
    assert 1 <= batches <= 60

    await nodes.stop(n3)

    async def n3_down() -> bool:
        return sample(await scrape(n1), "kvstore_peers", state="down") == 1

    await eventually(n3_down, what="n1 to report n3 down")
    async with nodes.client(n1) as client:
        for i in range(10):
            await client.put(b"h-%d" % i, b"x", w=1)
    assert sample(await scrape(n1), "kvstore_peer_up", peer="n3") == 0

    async def hints_counted() -> bool:
        # 3 nodes, N=3: no spare node, so each write's coordinator keeps the hint for n3 itself
        # (the count is refreshed every hint_replay_interval_s)
        held = [sample(await scrape(n), "kvstore_hints_pending", target="n3") or 0 for n in (n1, n2)]
        assert sum(held) <= 10
        return sum(held) == 10

    await eventually(hints_counted, what="10 hints pending for n3")


# ---- health and reflection -----------------------------------------------------------------------

def _check(service: str) -> Callable[[grpc.Channel], Any]:
    def check(channel: grpc.Channel) -> Any:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return check


async def test_health_is_serving_then_not_serving_while_the_node_drains(nodes: Nodes) -> None:
    node = await nodes.start("h1", drain_notice_s=2.0)
    serving = health_pb2.HealthCheckResponse.SERVING
    assert (await in_thread(node.address, _check(""))).status == serving
    assert (await in_thread(node.address, _check("kvstore.v1.KV"))).status == serving
    with pytest.raises(grpc.RpcError) as unknown:
        await in_thread(node.address, _check("no.such.Service"))
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND

    node.request_stop()
    seen = []
    with trio.fail_after(5):
        while not seen or seen[-1] == serving:
            seen.append((await in_thread(node.address, _check("kvstore.v1.KV"))).status)
    assert seen[-1] == health_pb2.HealthCheckResponse.NOT_SERVING
    with trio.fail_after(10):
        await node.stopped.wait()


async def test_reflection_lists_the_kv_service_and_describes_it(nodes: Nodes) -> None:
    node = await nodes.start("r1")

    def ask(channel: grpc.Channel) -> list[reflection_pb2.ServerReflectionResponse]:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [reflection_pb2.ServerReflectionRequest(list_services=""),
                    reflection_pb2.ServerReflectionRequest(file_containing_symbol="kvstore.v1.KV")]
        return list(stub.ServerReflectionInfo(iter(requests), timeout=5))

    listed, described = await in_thread(node.address, ask)
    names = {s.name for s in listed.list_services_response.service}
    assert {"kvstore.v1.KV", "kvstore.v1.Admin", "grpc.health.v1.Health"} <= names
    files = described.file_descriptor_response.file_descriptor_proto
    assert files and any(b"kvstore.v1" in f and b"PutRequest" in f for f in files)


# ---- request ids and JSON logs -------------------------------------------------------------------

@pytest.fixture
def json_log() -> Any:
    """Every record of the kvstore loggers at DEBUG, as JSON lines in a buffer."""
    buffer = io.StringIO()
    handler = logs.make_handler("json", buffer)
    logger = logging.getLogger("kvstore")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield buffer
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def _lines(buffer: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


def _put_with_metadata(key: bytes, metadata: tuple) -> Callable[[grpc.Channel], Any]:
    def put(channel: grpc.Channel) -> Any:
        _, call = kv_pb2_grpc.KVStub(channel).Put.with_call(_put(key), metadata=metadata, timeout=10)
        return dict(call.trailing_metadata())
    return put


async def test_request_ids_reach_logs_forwarded_nodes_and_the_reply(nodes: Nodes, json_log: io.StringIO) -> None:
    # N=1 on two nodes: a key n1 does not own is forwarded to n2, which coordinates it
    n1, n2 = await nodes.cluster(2, replication_factor=1)
    remote = next(b"f-%d" % i for i in range(1000) if n1.ring().preference_list(b"f-%d" % i, 1) == ["n2"])

    trailing = await in_thread(n1.address, _put_with_metadata(remote, (("x-request-id", "trace-42"),)))
    assert trailing["x-request-id"] == "trace-42"
    lines = _lines(json_log)
    assert all(set(doc) >= {"ts", "level", "logger", "node", "msg"} for doc in lines)
    traced = [doc for doc in lines if doc.get("request_id") == "trace-42"]
    # the node that coordinated it (n2, reached by forwarding) logged the write under the same id
    assert any(doc["node"] == "n2" and doc["logger"] == "kvstore.node.coordinator"
               and doc["msg"].startswith("write of 1 keys") for doc in traced), traced

    # without an id: one is generated, returned, and used in the coordinator's lines
    local = next(b"g-%d" % i for i in range(1000) if n1.ring().preference_list(b"g-%d" % i, 1) == ["n1"])
    generated = (await in_thread(n1.address, _put_with_metadata(local, ())))["x-request-id"]
    assert generated and generated != "trace-42"
    assert any(doc.get("request_id") == generated and doc["node"] == "n1"
               and doc["logger"] == "kvstore.node.coordinator" for doc in _lines(json_log))


async def test_a_malformed_request_id_is_refused_naming_the_header_and_limit(nodes: Nodes) -> None:
    node = await nodes.start("b1")
    for bad in ("x" * (logs.MAX_REQUEST_ID_CHARS + 1), "has spaces"):
        with pytest.raises(grpc.RpcError) as refused:
            await in_thread(node.address, _put_with_metadata(b"k", (("x-request-id", bad),)))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "x-request-id" in refused.value.details() and str(logs.MAX_REQUEST_ID_CHARS) in refused.value.details()
    # the node is unharmed: the same call with a good id works
    trailing = await in_thread(node.address, _put_with_metadata(b"k", (("x-request-id", "ok-1"),)))
    assert trailing["x-request-id"] == "ok-1"
    # and a request that fails for its own reasons still returns its id
    with pytest.raises(grpc.RpcError) as failed:
        await in_thread(node.address, _put_with_metadata(b"", (("x-request-id", "ok-2"),)))
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(failed.value.trailing_metadata())["x-request-id"] == "ok-2"


# ---- joins, re-wrap and data keys ------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape_at(address: str) -> dict:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def test_a_joining_node_is_not_serving_and_shows_its_stream_progress(nodes: Nodes) -> None:
    cluster = await nodes.cluster(3)
    async with nodes.client(*cluster) as kv:
        await kv.put_many([(b"j-%04d" % i, b"x" * 1024) for i in range(100)])
    listen, metrics_at = f"127.0.0.1:{_free_port()}", f"127.0.0.1:{_free_port()}"
    # slow enough (a few hundred KiB at 64 KiB/s: seconds) for the join to be watched while it streams
    joining = dict(listen=listen, metrics_listen=metrics_at, stream_rate_bytes_per_s=64 * 1024)
    seen_health, seen_running = [], []

    async def watch() -> None:
        while True:
            try:
                seen_health.append((await in_thread(listen, _check(""))).status)
                m = await trio.to_thread.run_sync(scrape_at, metrics_at)
                seen_running.append(sample(m, "kvstore_stream_running", op="join"))
            except (grpc.RpcError, OSError):
                pass  # not listening yet
            await trio.sleep(0.05)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        joiner = await nodes.start("n4", **joining)
        nursery.cancel_scope.cancel()
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    assert not_serving in seen_health, "health never said NOT_SERVING while the node joined"
    assert 1 in seen_running, "the stream never showed as running"
    m = await trio.to_thread.run_sync(scrape_at, metrics_at)
    assert sample(m, "kvstore_stream_running", op="join") == 0
    streamed = sample(m, "kvstore_stream_keys", op="join", state="done")
    # records come from each of a range's 3 current replicas, and the catch-up pass pulls again
    # what was written in the last CATCH_UP_MARGIN_S (here: everything), so a key may arrive 6 times
    assert streamed == joiner.elastic.progress["keys"] and 0 < streamed <= 2 * 3 * 100
    assert sample(m, "kvstore_stream_bytes", op="join", state="done") > 1024 * streamed
    assert (await in_thread(listen, _check(""))).status == health_pb2.HealthCheckResponse.SERVING


async def test_dek_rotations_and_rewrap_progress_are_exposed(nodes: Nodes) -> None:
    node = await nodes.start("k1", **METRICS)
    async with nodes.client(node) as kv:
        await kv.put_many([(b"w-%d" % i, b"v") for i in range(20)])
        before = sample(await scrape(node), "kvstore_dek_rotations_total")
        node.keys.sealer.clear_cache()  # the next seal must take a fresh data key
        await kv.put(b"w-after", b"v")
    assert sample(await scrape(node), "kvstore_dek_rotations_total") == before + 1
    await node.rewrap()
    m = await scrape(node)
    assert sample(m, "kvstore_rewrap_running") == 0
    assert sample(m, "kvstore_rewrap_records", stage="scanned") == 21

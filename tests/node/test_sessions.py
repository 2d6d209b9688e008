"""Client sessions (KV.Session): a client's batches on one long-lived stream per node, answered by
id, each admitted, authorized, counted and failed on its own like the Batch* call it stands for."""
from __future__ import annotations

import queue
from concurrent import futures

import grpc
import trio

from kvstore._proto import kv_pb2, kv_pb2_grpc
from kvstore.client import Client

from .test_observability import METRICS, sample, scrape

INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]


def _put(rid: int, *pairs: tuple[bytes, bytes]) -> kv_pb2.SessionRequest:
    return kv_pb2.SessionRequest(id=rid, timeout_ms=5000, put=kv_pb2.BatchPutRequest(
        items=[kv_pb2.PutRequest(key=k, value=v) for k, v in pairs]))


def _session(address: str, frames: list[bytes]) -> tuple[dict[int, kv_pb2.SessionResponse], grpc.StatusCode, str]:
    """Send raw frames on one session, half-close, and collect the replies and the final status."""
    with grpc.insecure_channel(address) as channel:
        call = channel.stream_stream("/kvstore.v1.KV/Session", request_serializer=None,
                                     response_deserializer=kv_pb2.SessionResponse.FromString)(iter(frames), timeout=10)
        replies: dict[int, kv_pb2.SessionResponse] = {}
        try:
            for reply in call:
                replies[reply.id] = reply
        except grpc.RpcError:
            pass
        return replies, call.code(), call.details() or ""


async def test_session_batches_are_answered_by_id_and_fail_alone(nodes) -> None:
    node = await nodes.start(**METRICS)
    frames = [_put(1, (b"k1", b"v1"), (b"", b"no key")).SerializeToString(),
              kv_pb2.SessionRequest(id=2).SerializeToString(),  # no batch in it
              _put(3, (b"k3", b"v3")).SerializeToString()]
    replies, code, _ = await trio.to_thread.run_sync(_session, node.address, frames)
    assert code == grpc.StatusCode.OK and sorted(replies) == [1, 2, 3]
    assert [s.code for s in replies[1].put.statuses] == [0, INVALID]
    assert "key" in replies[1].put.statuses[1].message
    assert replies[2].error.code == INVALID and "put, get or delete" in replies[2].error.message
    assert replies[3].error.code == 0 and [s.code for s in replies[3].put.statuses] == [0]
    async with nodes.client(node) as kv:
        assert (await kv.get(b"k1")).value == b"v1" and (await kv.get(b"k3")).value == b"v3"
    # each batch is counted as the method it stands for; a batch of no kind as Session
    m = await scrape(node)
    handled, service = "grpc_server_handled_total", "kvstore.v1.KV"
    assert sample(m, handled, grpc_service=service, grpc_method="BatchPut", grpc_code="OK") == 2
    assert sample(m, handled, grpc_service=service, grpc_method="Session", grpc_code="INVALID_ARGUMENT") == 1
    assert sample(m, "kvstore_items_total", op="put", code="INVALID_ARGUMENT") == 1


async def test_an_undecodable_session_frame_ends_that_session_only(nodes) -> None:
    node = await nodes.start()
    frames = [b"\xff\xff", _put(1, (b"k", b"v")).SerializeToString()]
    _, code, details = await trio.to_thread.run_sync(_session, node.address, frames)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == "session: request: 2 bytes are not a valid kvstore.v1.SessionRequest message"
    async with nodes.client(node) as kv:
        await kv.put(b"after", b"fine")
        assert (await kv.get(b"after")).value == b"fine"


async def test_a_stopping_node_ends_open_sessions_with_ok(nodes) -> None:
    """A client holds its session open for its whole life: a stopping node must end it, or its
    stop would wait out the whole grace period and then cut the stream."""
    node = await nodes.start()
    answered = trio.Event()
    token = trio.lowlevel.current_trio_token()
    requests: queue.SimpleQueue = queue.SimpleQueue()

    def hold() -> tuple[list[int], grpc.StatusCode]:
        with grpc.insecure_channel(node.address) as channel:
            call = kv_pb2_grpc.KVStub(channel).Session(iter(requests.get, None))
            requests.put(_put(1, (b"k", b"v")))
            ids = []
            try:
                for reply in call:
                    ids.append(reply.id)
                    trio.from_thread.run_sync(answered.set, trio_token=token)
            except grpc.RpcError:
                pass
            requests.put(None)
            return ids, call.code()

    result: list = []
    async with trio.open_nursery() as nursery:
        async def run() -> None:
            result.append(await trio.to_thread.run_sync(hold))

        nursery.start_soon(run)
        with trio.fail_after(10):
            await answered.wait()
            await nodes.stop(node)
    ids, code = result[0]
    assert ids == [1] and code == grpc.StatusCode.OK


async def test_the_client_opens_a_new_session_on_another_node_when_its_node_stops(nodes) -> None:
    cluster = await nodes.cluster(3)
    async with nodes.client(*cluster) as kv:
        await kv.put(b"before", b"1")
        [used] = [n for n in cluster if n.address in kv._conns and kv._conns[n.address].session is not None]
        await nodes.stop(used)
        await kv.put(b"after", b"2")  # its session ended; the next batch goes elsewhere
        assert (await kv.get(b"before")).value == b"1" and (await kv.get(b"after")).value == b"2"


class _OldNode(kv_pb2_grpc.KVServicer):
    """A node of a version before sessions: Batch* methods only (Session is UNIMPLEMENTED)."""

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}

    def BatchPut(self, request, context):
        for item in request.items:
            self.data[item.key] = item.value
        return kv_pb2.BatchPutResponse(results=[kv_pb2.PutResponse() for _ in request.items],
                                       statuses=[kv_pb2.ItemStatus() for _ in request.items])

    def BatchGet(self, request, context):
        found = [self.data.get(i.key) for i in request.items]
        return kv_pb2.BatchGetResponse(
            results=[kv_pb2.GetResponse(found=v is not None, siblings=[kv_pb2.Sibling(value=v)] if v else [])
                     for v in found],
            statuses=[kv_pb2.ItemStatus() for _ in found])


async def test_a_node_without_sessions_gets_unary_batches() -> None:
    old = _OldNode()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    kv_pb2_grpc.add_KVServicer_to_server(old, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        async with Client([f"127.0.0.1:{port}"], token_aware=False) as kv:
            with trio.fail_after(10):
                await kv.put(b"k", b"v")
                assert (await kv.get(b"k")).value == b"v"
                assert old.data == {b"k": b"v"}
                results = await kv.put_many({b"a": b"1", b"b": b"2"})
                assert all(isinstance(r, bytes) for r in results)
            assert old.data == {b"k": b"v", b"a": b"1", b"b": b"2"}
    finally:
        server.stop(0)


async def test_a_reply_over_the_message_limit_fails_alone_and_the_session_goes_on(nodes, monkeypatch) -> None:
    """Sent, a reply over the limit would end the stream, and every batch in flight on it."""
    from kvstore.core.limits import Limits

    node = await nodes.start()
    async with nodes.client(node) as kv:
        await kv.put(b"big", b"x" * 20_000)
    # a lower limit, seen only by the session's check (the server's channel options are set)
    monkeypatch.setattr(Limits, "max_message_bytes", property(lambda self: 10_000))
    big_get = kv_pb2.SessionRequest(id=1, timeout_ms=5000, get=kv_pb2.BatchGetRequest(
        items=[kv_pb2.GetRequest(key=b"big")]))
    frames = [big_get.SerializeToString(), _put(2, (b"small", b"v")).SerializeToString()]
    replies, code, _ = await trio.to_thread.run_sync(_session, node.address, frames)
    assert code == grpc.StatusCode.OK
    assert replies[1].error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert "exceeds the message limit of 10000 bytes (max_message_bytes)" in replies[1].error.message
    assert replies[2].error.code == 0 and [s.code for s in replies[2].put.statuses] == [0]

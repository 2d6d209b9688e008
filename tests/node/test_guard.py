"""The gate in front of every servicer (kvstore/node/guard.py) and forged gossip: regressions
found by tests/node/test_fuzz.py, each pinned by a fixed case."""
from __future__ import annotations

import time
from dataclasses import replace

import grpc
import msgpack
import trio

from kvstore._proto import internal_pb2, kv_pb2
from kvstore.core.membership import Status

U64 = (1 << 64) - 1


def _call(address: str, method: str, payload: bytes) -> object:
    channel = grpc.insecure_channel(address)
    try:
        return channel.unary_unary(method)(payload, timeout=10)
    except grpc.RpcError as exc:
        return exc
    finally:
        channel.close()


def _stream(address: str, frames: list[bytes]) -> object:
    channel = grpc.insecure_channel(address)
    try:
        return list(channel.stream_stream("/kvstore.v1.Internal/Stream")(iter(frames), timeout=10))
    except grpc.RpcError as exc:
        return exc
    finally:
        channel.close()


async def test_malformed_protobuf_is_invalid_argument_not_internal(nodes) -> None:
    node = await nodes.start()
    # field 1 (key, bytes) announcing 2^31 bytes that never come: grpc alone answered INTERNAL
    result = await trio.to_thread.run_sync(_call, node.address, "/kvstore.v1.KV/Put", b"\x0a\x80\x80\x80\x80\x08")
    assert isinstance(result, grpc.RpcError) and result.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert result.details() == "request: 6 bytes are not a valid kvstore.v1.PutRequest message"


async def test_undecodable_replica_frames_end_the_stream_with_invalid_argument(nodes) -> None:
    node = await nodes.start()
    good = msgpack.packb([1, 7, [["r", b"some-key"]]])
    frames = [internal_pb2.Frame(payload=b"\xc1").SerializeToString(), b"\xff\xff",
              internal_pb2.Frame(payload=good).SerializeToString()]
    result = await trio.to_thread.run_sync(_stream, node.address, frames)
    assert isinstance(result, grpc.RpcError) and result.code() == grpc.StatusCode.INVALID_ARGUMENT
    # the first bad frame found is named (frames are handled concurrently), and the count of the rest
    assert result.details() in ("stream: frame: payload is not valid msgpack (1 more bad frames)",
                                "stream: request: 2 bytes are not a valid kvstore.v1.Frame message (1 more bad frames)")


async def test_gossiped_state_with_an_absurd_generation_is_refused(nodes) -> None:
    n1, n2 = await nodes.cluster(2)
    real = n1.gossip.table["n2"]
    forged = ["n2", "evil:666", U64, 5, "normal", [1, 2, 3], "", {}]
    payload = internal_pb2.Frame(payload=msgpack.packb([1, "gossip-ack", [forged]])).SerializeToString()
    await trio.to_thread.run_sync(_call, n1.address, "/kvstore.v1.Internal/Call", payload)
    assert n1.gossip.table["n2"] == real or n1.gossip.table["n2"].generation == real.generation
    assert n1.gossip.table["n2"].address == real.address and n1.gossip.refused >= 1


async def test_a_node_outranked_by_a_forged_state_of_itself_reasserts(nodes) -> None:
    n1, n2 = await nodes.cluster(2)
    real = n2.gossip.me
    # plausible (same generation, a few beats ahead) but wrong: leaving, another address, no tokens
    forged = replace(real, heartbeat=real.heartbeat + 50, status=Status.LEAVING, address="evil:666", tokens=(7,))
    payload = internal_pb2.Frame(payload=msgpack.packb([1, "gossip-ack", [forged.to_wire()]])).SerializeToString()
    await trio.to_thread.run_sync(_call, n1.address, "/kvstore.v1.Internal/Call", payload)
    assert n1.gossip.table["n2"].address == "evil:666"  # taken: nothing tells it from a real update
    deadline = time.monotonic() + 10
    while n1.gossip.table["n2"].address != real.address:
        assert time.monotonic() < deadline, "n2 never re-asserted itself"
        await trio.sleep(0.05)
    seen = n1.gossip.table["n2"]
    assert (seen.status, seen.tokens) == (Status.NORMAL, real.tokens) and seen.generation > real.generation
    await nodes.converged([n1, n2])


async def test_forged_context_with_a_huge_counter_is_invalid_argument(nodes) -> None:
    node = await nodes.start()
    forged = msgpack.packb([1, {"n1": U64}])
    req = kv_pb2.PutRequest(key=b"k", value=b"v", context=forged).SerializeToString()
    result = await trio.to_thread.run_sync(_call, node.address, "/kvstore.v1.KV/Put", req)
    assert isinstance(result, grpc.RpcError) and result.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert result.details() == f"context: counter {U64} of node 'n1' exceeds the limit of 2^53"
    async with nodes.client(node) as kv:  # the key was not bricked
        await kv.put(b"k", b"fine")
        assert (await kv.get(b"k")).value == b"fine"


async def test_replica_write_with_the_last_counter_costs_only_writes_of_that_key(nodes) -> None:
    node = await nodes.start()
    # a peer's replica write with counter 2^64-1 for this node: the next local write of the key
    # has no counter left and must say so, not fail to pack 2^64 (INTERNAL)
    op = ["w", b"brick", [["n1", U64, {}, 1, 0, None]], ""]
    frame = internal_pb2.Frame(payload=msgpack.packb([1, 9, [op]])).SerializeToString()
    replies = await trio.to_thread.run_sync(_stream, node.address, [frame])
    assert msgpack.unpackb(internal_pb2.Frame.FromString(replies[0]).payload) == [1, 9, [[0, None]]]
    req = kv_pb2.PutRequest(key=b"brick", value=b"v").SerializeToString()
    result = await trio.to_thread.run_sync(_call, node.address, "/kvstore.v1.KV/Put", req)
    assert isinstance(result, grpc.RpcError) and result.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "version counter of node n1 on this key is at its limit" in result.details()
    async with nodes.client(node) as kv:
        await kv.put(b"other", b"fine")
        assert (await kv.get(b"other")).value == b"fine"


async def test_gossiped_tokens_listed_twice_are_refused_not_a_crash(nodes) -> None:
    n1, n2 = await nodes.cluster(2)
    forged = ["fake", "127.0.0.1:1", int(time.time() * 1000), 1, "normal", [5, 5], "", {}]
    for kind, body in (("gossip-ack", [forged]), ("rereplicate", forged)):
        payload = internal_pb2.Frame(payload=msgpack.packb([1, kind, body])).SerializeToString()
        reply = await trio.to_thread.run_sync(_call, n1.address, "/kvstore.v1.Internal/Call", payload)
        assert msgpack.unpackb(internal_pb2.Frame.FromString(reply).payload)[1:] == [
            3, f"{'gossip states' if kind == 'gossip-ack' else 'rereplicate'}: tokens must be distinct"]
    assert "fake" not in n1.gossip.table
    await nodes.converged([n1, n2])  # gossip rounds still run


async def test_a_relayed_member_that_does_not_answer_as_itself_never_enters_the_ring(nodes) -> None:
    n1, n2 = await nodes.cluster(2)
    now = int(time.time() * 1000)
    ghosts = [["ghost", "127.0.0.1:1", now, 3, "normal", [11, 12], "", {}],       # nobody listens
              ["twin", n2.address, now, 3, "normal", [13, 14], "", {}]]           # n2 answers there
    payload = internal_pb2.Frame(payload=msgpack.packb([1, "gossip-ack", ghosts])).SerializeToString()
    await trio.to_thread.run_sync(_call, n1.address, "/kvstore.v1.Internal/Call", payload)
    assert set(n1.gossip.candidates) == {"ghost", "twin"}
    deadline = time.monotonic() + 10
    while "twin" in n1.gossip.candidates:  # pinged at n2's address, answered "n2": dropped
        assert time.monotonic() < deadline
        await trio.sleep(0.05)
    assert set(n1.gossip.table) == {"n1", "n2"} and set(n1.ring().node_ids) == {"n1", "n2"}
    # a real joiner is admitted as soon as it answers its ping
    n3 = await nodes.start("n3", seeds=(n2.address,))
    await nodes.converged([n1, n2, n3])
    assert "ghost" not in n1.ring().node_ids


async def test_replica_slots_come_back_when_streams_are_cut_mid_flight(nodes) -> None:
    node = await nodes.start()
    frame = internal_pb2.Frame(payload=msgpack.packb([1, 1, [["r", b"k%d" % i] for i in range(200)]]))

    def cut_streams() -> None:
        channel = grpc.insecure_channel(node.address)
        try:
            for _ in range(20):
                call = channel.stream_stream("/kvstore.v1.Internal/Stream")(
                    iter([frame.SerializeToString()] * 8), timeout=10)
                call.cancel()  # the server's handler is cancelled with batches spawned or queued
        finally:
            channel.close()

    await trio.to_thread.run_sync(cut_streams)
    with trio.fail_after(10):
        while node.admission.replica_batches:
            await trio.sleep(0.05)
    assert node.admission.replica_batches == 0

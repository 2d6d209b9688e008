"""Connections to other nodes: one long-lived replica stream per peer, with coalescing.

Trio side (`Peer`): callers queue replica ops; a sender task takes *everything* queued whenever no
batch is in flight (no timer) and sends it as one frame, so concurrent requests share RPCs. The
asyncio side (`_Conn`, on the transport loop) owns the grpc.aio channel and the bidi stream, and
matches reply frames to batches by id. A dead or slow peer fails its own batches at the replica
deadline and never holds up requests for keys it does not hold.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import grpc
import trio

from kvstore._proto import internal_pb2, internal_pb2_grpc, kv_pb2_grpc, admin_pb2_grpc
from kvstore.core import wire
from kvstore.core.wire import ReplicaOp
from kvstore.errors import KvError, Unavailable
from kvstore.node.bridge import Transport
from kvstore.node.status import error_from
from kvstore.tls import aio_channel

log = logging.getLogger(__name__)

MAX_OPS_PER_BATCH = 512
MAX_IN_FLIGHT = 2          # batches per peer in flight at once: pipelining without flooding
MAX_QUEUED_OPS = 50_000    # beyond this a peer is not keeping up: fail fast instead of growing


def channel_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1_000),
    ]


class _Conn:
    """asyncio side of one peer connection. Every method runs on the transport loop."""

    def __init__(self, address: str, max_message_bytes: int, credentials: grpc.ChannelCredentials | None = None) -> None:
        self.address = address
        self.channel = aio_channel(address, channel_options(max_message_bytes), credentials)
        self.internal = internal_pb2_grpc.InternalStub(self.channel)
        self.kv = kv_pb2_grpc.KVStub(self.channel)
        self.admin = admin_pb2_grpc.AdminStub(self.channel)
        self.stream: Any = None
        self.reader: asyncio.Task | None = None
        self.write_lock = asyncio.Lock()
        self.pending: dict[int, asyncio.Future] = {}

    async def send_batch(self, batch_id: int, payload: bytes, timeout_s: float) -> list[tuple[int, Any]]:
        fut = asyncio.get_running_loop().create_future()
        self.pending[batch_id] = fut
        try:
            # One deadline for the write and the reply: asyncio.timeout arms one timer, where
            # wait_for around each step cost a timer and a task per step, twice per batch.
            async with asyncio.timeout(timeout_s):
                async with self.write_lock:
                    if self.stream is None:
                        self.stream = self.internal.Stream()
                        self.reader = asyncio.create_task(self._read(self.stream))
                    await self.stream.write(internal_pb2.Frame(payload=payload))
                return await fut
        except (asyncio.TimeoutError, TimeoutError):
            raise Unavailable(f"peer {self.address}: no reply within {timeout_s:.1f}s") from None
        except grpc.aio.AioRpcError as exc:
            self._reset()
            raise Unavailable(f"peer {self.address}: {exc.code().name}") from None
        except (grpc.aio.UsageError, asyncio.InvalidStateError):
            # The stream finished under us (the peer died between our check and the write).
            self._reset()
            raise Unavailable(f"peer {self.address}: stream closed") from None
        finally:
            self.pending.pop(batch_id, None)

    async def _read(self, stream: Any) -> None:
        try:
            async for frame in stream:
                try:
                    batch_id, results = wire.decode_reply(frame.payload)
                except KvError as exc:
                    log.warning("peer %s sent a bad reply: %s", self.address, exc)
                    continue
                fut = self.pending.get(batch_id)
                if fut is not None and not fut.done():
                    fut.set_result(results)
            error: Exception = Unavailable(f"peer {self.address}: stream ended")
        except grpc.aio.AioRpcError as exc:
            error = Unavailable(f"peer {self.address}: {exc.code().name}")
        except asyncio.CancelledError:
            error = Unavailable(f"peer {self.address}: connection closed")
        if self.stream is stream:
            self.stream = None
        for fut in list(self.pending.values()):
            if not fut.done():
                fut.set_exception(error)

    def _reset(self) -> None:
        if self.stream is not None:
            self.stream.cancel()
            self.stream = None

    async def call(self, payload: bytes, timeout_s: float) -> bytes:
        try:
            reply = await self.internal.Call(internal_pb2.Frame(payload=payload), timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise Unavailable(f"peer {self.address}: {exc.code().name}: {exc.details()}") from None
        return reply.payload

    async def close(self) -> None:
        self._reset()
        if self.reader is not None:
            self.reader.cancel()
        await self.channel.close()


@dataclass
class _Queued:
    ops: list[ReplicaOp]
    results: list[tuple[int, Any]] | BaseException | None = None
    done: trio.Event = field(default_factory=trio.Event)


class Peer:
    """Trio side of a peer: coalescing replica sender, unary calls, reachability."""

    _ids = itertools.count(1)

    def __init__(self, node_id: str, address: str, transport: Transport, max_message_bytes: int,
                 credentials: grpc.ChannelCredentials | None = None) -> None:
        self.node_id = node_id
        self.credentials = credentials  # TLS with this node's certificate; None: plaintext
        self.address = address
        self.transport = transport
        self.max_message_bytes = max_message_bytes
        self.conn: _Conn | None = None
        self.queue: list[_Queued] = []
        self.queued_ops = 0
        self.wakeup = trio.Event()
        self.reachable = True          # last RPC outcome; the failure detector has the final word
        self.blocked = False           # fault injection (test hooks only): behave as if cut off
        self.batches_sent = 0
        self.ops_sent = 0
        # ... sent by the transport loop's own path (kvstore/node/express.py): counted apart, each
        # pair by one thread only (`+=` from two threads can lose an increment)
        self.loop_batches_sent = 0
        self.loop_ops_sent = 0

    async def connect(self) -> None:
        if self.conn is None:
            address, limit, credentials = self.address, self.max_message_bytes, self.credentials

            async def make() -> _Conn:
                return _Conn(address, limit, credentials)

            self.conn = await self.transport.run(make)

    async def replicate(self, ops: Sequence[ReplicaOp], timeout_s: float) -> list[tuple[int, Any]]:
        """Send ops (coalesced with other callers' ops); returns (code, payload) per op."""
        if self.blocked:
            raise Unavailable(f"peer {self.node_id}: link cut by fault injection")
        if self.queued_ops + len(ops) > MAX_QUEUED_OPS:
            raise Unavailable(f"peer {self.node_id}: {self.queued_ops} replica ops queued, not keeping up")
        item = _Queued(list(ops))
        self.queue.append(item)
        self.queued_ops += len(ops)
        self.wakeup.set()
        with trio.move_on_after(timeout_s) as scope:
            await item.done.wait()
        if scope.cancelled_caught:
            raise Unavailable(f"peer {self.node_id}: no reply within {timeout_s:.1f}s")
        if isinstance(item.results, BaseException):
            raise item.results
        assert item.results is not None
        return item.results

    async def run_sender(self, timeout_s: float) -> None:
        """Sender loop; run MAX_IN_FLIGHT of these per peer in the node's nursery."""
        await self.connect()
        while True:
            while not self.queue:
                self.wakeup = trio.Event()
                await self.wakeup.wait()
            taken: list[_Queued] = []
            count = 0
            while self.queue and (not taken or count + len(self.queue[0].ops) <= MAX_OPS_PER_BATCH):
                item = self.queue.pop(0)
                taken.append(item)
                count += len(item.ops)
            self.queued_ops -= count
            await self._send(taken, timeout_s)

    async def _send(self, taken: list[_Queued], timeout_s: float) -> None:
        ops = [op for item in taken for op in item.ops]
        batch_id = next(self._ids)
        assert self.conn is not None
        try:
            results = await self.transport.run(
                self.conn.send_batch, batch_id, wire.encode_batch(batch_id, ops), timeout_s
            )
            if len(results) != len(ops):
                raise Unavailable(f"peer {self.node_id}: answered {len(results)} of {len(ops)} ops")
            self.reachable = True
        except Exception as exc:  # noqa: BLE001 - a sender must outlive any one failed batch
            if not isinstance(exc, Unavailable):
                log.warning("peer %s: replica batch failed unexpectedly: %r", self.node_id, exc)
                exc = Unavailable(f"peer {self.node_id}: send failed: {type(exc).__name__}")
            self.reachable = False
            for item in taken:
                item.results = exc
                item.done.set()
            return
        self.batches_sent += 1
        self.ops_sent += len(ops)
        offset = 0
        for item in taken:
            item.results = results[offset : offset + len(item.ops)]
            offset += len(item.ops)
            item.done.set()

    async def call(self, kind: str, body: Any, timeout_s: float) -> Any:
        """A unary Call (gossip and other small messages); raises Unavailable or the remote error."""
        if self.blocked:
            raise Unavailable(f"peer {self.node_id}: link cut by fault injection")
        await self.connect()
        assert self.conn is not None
        try:
            raw = await self.transport.run(self.conn.call, wire.encode_call(kind, body), timeout_s)
            self.reachable = True
        except Unavailable:
            self.reachable = False
            raise
        doc = wire.unpackb(raw)
        if not (isinstance(doc, list) and len(doc) == 3 and isinstance(doc[1], int)):
            raise Unavailable(f"peer {self.node_id}: malformed call reply")
        if doc[1] != 0:
            raise error_from(doc[1], str(doc[2]))
        return doc[2]

    async def stub(self, name: str) -> Any:
        """The KV or Admin stub of this peer's channel (for forwarding), used via transport.run."""
        if self.blocked:
            raise Unavailable(f"peer {self.node_id}: link cut by fault injection")
        await self.connect()
        assert self.conn is not None
        return getattr(self.conn, name)

    async def aclose(self) -> None:
        if self.conn is not None:
            conn, self.conn = self.conn, None
            await self.transport.run(conn.close)

"""Peer sender resilience (kvstore/node/peers.py): a failed replica batch, whatever the failure,
costs that batch only; the sender loop lives on and the next batch goes through."""
from __future__ import annotations

import asyncio

import pytest
import trio

from kvstore.core import wire
from kvstore.errors import Unavailable
from kvstore.node.bridge import open_transport
from kvstore.node.peers import Peer, _Conn


class FlakyStream:
    """Stands in for a grpc.aio stream call: the first write fails as a finished RPC does."""

    def __init__(self, conn: _Conn, failure: BaseException | None) -> None:
        self.conn = conn
        self.failure: BaseException | None = failure

    async def write(self, frame) -> None:
        if self.failure is not None:
            failure, self.failure = self.failure, None
            raise failure
        batch_id, ops = wire.decode_batch(frame.payload)
        self.conn.pending[batch_id].set_result([(0, None)] * len(ops))

    def cancel(self) -> bool:
        return True

    def __aiter__(self):
        return self

    async def __anext__(self):
        await asyncio.sleep(3600)


@pytest.mark.parametrize(
    "failure", [asyncio.InvalidStateError("RPC already finished"), RuntimeError("surprise")]
)
async def test_failed_batch_costs_that_batch_only(failure: BaseException) -> None:
    async with open_transport(grace_s=1.0) as transport:
        peer = Peer("n2", "127.0.0.1:1", transport, 1 << 20)

        async def make():
            conn = _Conn("127.0.0.1:1", 1 << 20)
            conn.stream = FlakyStream(conn, failure)
            conn.internal = type("Stub", (), {"Stream": lambda self: FlakyStream(conn, None)})()
            conn.reader = asyncio.create_task(asyncio.sleep(0))
            return conn

        peer.conn = await transport.run(make)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peer.run_sender, 2.0)
            with pytest.raises(Unavailable):
                await peer.replicate([wire.ReadOp(b"k")], 2.0)
            assert not peer.reachable
            results = await peer.replicate([wire.ReadOp(b"k")], 2.0)
            assert results == [(0, None)]
            assert peer.reachable and peer.batches_sent == 1
            nursery.cancel_scope.cancel()
        await peer.aclose()

"""The client's session stream (kvstore/client/aio.py _Session) against a scripted stream: which
batches get their answers, and which fail how, when the node ends the stream."""
from __future__ import annotations

import threading

import pytest
import trio

from kvstore._proto import kv_pb2
from kvstore.client.aio import _never_sent, _Session, _TooLarge
from kvstore.errors import Unavailable


class _Stream:
    """Stands in for grpcio's stream call: reads `read` requests, answers the first `answer` of
    them, then ends with status OK (as a stopping node does)."""

    def __init__(self, requests, read: int, answer: int) -> None:
        self.requests, self.read, self.answer = requests, read, answer
        self.seen: list[int] = []

    def __iter__(self):
        got = [next(self.requests) for _ in range(self.read)]
        self.seen = [r.id for r in got]
        for r in got[: self.answer]:
            yield kv_pb2.SessionResponse(id=r.id, put=kv_pb2.BatchPutResponse(
                results=[kv_pb2.PutResponse(context=b"ctx")], statuses=[kv_pb2.ItemStatus()]))

    def cancel(self) -> None:
        pass


class _Stub:
    def __init__(self, read: int, answer: int) -> None:
        self.read, self.answer = read, answer
        self.stream: _Stream | None = None

    def Session(self, requests):  # noqa: N802 - grpc's name
        self.stream = _Stream(requests, self.read, self.answer)
        return self.stream


def _item() -> list[kv_pb2.PutRequest]:
    return [kv_pb2.PutRequest(key=b"k", value=b"v")]


async def test_answers_that_arrive_with_the_end_of_the_stream_still_count() -> None:
    """A stopping node answers what it read, then ends the session: the last answers and the end
    reach trio together, and an answered write must not be reported as failed."""
    stub = _Stub(read=2, answer=1)
    session = _Session(stub, max_message=1 << 20)
    outcomes: dict[int, object] = {}

    async def call(n: int) -> None:
        try:
            outcomes[n] = await session.call("put", _item(), 5.0)
        except Unavailable as exc:
            outcomes[n] = exc

    async with trio.open_nursery() as nursery:
        nursery.start_soon(call, 1)
        await trio.sleep(0.05)  # the first is sent first
        nursery.start_soon(call, 2)
    assert stub.stream is not None and stub.stream.seen == [1, 2]
    assert [r.context for r in outcomes[1].results] == [b"ctx"]
    # the other was never read by the node: it failed, and may safely go to another node
    assert isinstance(outcomes[2], Unavailable) and _never_sent(outcomes[2])
    with pytest.raises(Unavailable):  # the session is over; the client opens a new one
        await session.call("put", _item(), 5.0)


async def test_a_batch_over_the_message_limit_is_not_sent_on_the_session() -> None:
    stub = _Stub(read=1, answer=1)
    session = _Session(stub, max_message=100)
    with pytest.raises(_TooLarge):
        await session.call("put", [kv_pb2.PutRequest(key=b"k", value=b"v" * 200)], 5.0)
    assert session.pending == {}
    # the next batch that fits is sent and answered as usual
    [result] = (await session.call("put", _item(), 5.0)).results
    assert result.context == b"ctx"
    session.close()


class _Endless:
    """A stream that answers every request until the client ends its request iterator."""

    def Session(self, requests):  # noqa: N802 - grpc's name
        return _EndlessStream(requests)


class _EndlessStream:
    def __init__(self, requests) -> None:
        self.requests = requests

    def __iter__(self):
        for r in self.requests:
            yield kv_pb2.SessionResponse(id=r.id, put=kv_pb2.BatchPutResponse(
                results=[kv_pb2.PutResponse(context=b"ctx")], statuses=[kv_pb2.ItemStatus()]))

    def cancel(self) -> None:
        pass  # a real stream also ends its iteration; here only the request iterator does


async def test_closing_a_session_ends_its_reader_thread() -> None:
    """A session holds a thread reading its stream (and grpcio one sending requests): closing it
    must end them, or every client would leave threads behind."""
    before = set(threading.enumerate())
    session = _Session(_Endless(), max_message=1 << 20)
    await session.call("put", _item(), 5.0)
    [reader] = [t for t in set(threading.enumerate()) - before if t.name == "kvstore-session"]
    session.close()
    reader.join(5)
    assert not reader.is_alive()

"""gRPC servicers: thin translators on the transport loop. Each call hops to trio once
(Transport.to_trio), and errors become statuses through kvstore/node/status.py only."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable, Sequence

import grpc

from kvstore._proto import admin_pb2, admin_pb2_grpc, internal_pb2, internal_pb2_grpc, kv_pb2, kv_pb2_grpc
from kvstore.core import wire
from kvstore.errors import DeadlineExceeded, InvalidArgument, KvError, ResourceExhausted
from kvstore.node import express, listing, logs
from kvstore.node.api import FORWARDED_HEADER, OP_LABELS, SESSION_KINDS, raise_item, session_reply
from kvstore.node.fastpath import serve_on_loop
from kvstore.node.interceptor import ObservingInterceptor
from kvstore.node.guard import KV_BACKSTOP_SLACK_S, Gate, Malformed, add_guarded
from kvstore.node.status import code_of, message_of, number_of

log = logging.getLogger(__name__)


def _forwarded(context: grpc.aio.ServicerContext) -> bool:
    return any(k == FORWARDED_HEADER for k, _ in (context.invocation_metadata() or ()))


class _Base:
    def __init__(self, node: Any) -> None:
        self.node = node

    async def _run(self, context: grpc.aio.ServicerContext, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        try:
            return await self.node.transport.to_trio(logs.carry(fn, self.node.node_id), *args)
        except KvError as exc:
            await context.abort(code_of(exc), message_of(exc))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug: answer INTERNAL, keep serving
            if isinstance(exc, grpc.aio.AbortError):
                raise
            log.exception("unexpected error in %s", getattr(fn, "__name__", fn))
            await context.abort(code_of(exc), message_of(exc))


# a session request's batch kind -> the unary method whose role it needs
_SESSION_METHODS = {"put": "/kvstore.v1.KV/BatchPut", "get": "/kvstore.v1.KV/BatchGet",
                    "delete": "/kvstore.v1.KV/BatchDelete"}


class _Handlers:
    """The tasks a stream's handler started, one per message: awaited before the stream ends,
    cancelled if it ends early. `finished` runs as each one ends: a done callback, not a finally,
    so it also runs for a task cancelled before it started (it hands back the message's slots)."""

    def __init__(self, finished: Callable[[], Any]) -> None:
        self.tasks: set[asyncio.Task] = set()
        self.finished = finished

    def start(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        self.finished()

    async def drain(self) -> None:
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)

    def cancel(self) -> None:
        for task in list(self.tasks):
            task.cancel()


class KVServicer(_Base, kv_pb2_grpc.KVServicer):
    def __init__(self, node: Any) -> None:
        super().__init__(node)
        # session batches are counted and timed as their Batch* method (an unknown kind as Session)
        self._recorders: dict[str, Callable[[grpc.StatusCode, float], None]] = {}

    async def _single(self, context: Any, request: Any, batch: Callable, is_delete: bool | None) -> Any:
        forwarded, timeout = _forwarded(context), context.time_remaining()

        async def one() -> Any:
            if is_delete is None:
                results, statuses = await self.node.api.get_batch([request], forwarded, timeout)
            else:
                results, statuses = await self.node.api.write_batch([request], is_delete, forwarded, timeout)
            self.node.metrics.count_items(OP_LABELS[is_delete], statuses)
            raise_item(statuses[0])
            return results[0]

        return await self._run(context, one)

    async def Put(self, request: kv_pb2.PutRequest, context: Any) -> kv_pb2.PutResponse:
        return await self._single(context, request, None, False)

    async def Delete(self, request: kv_pb2.DeleteRequest, context: Any) -> kv_pb2.DeleteResponse:
        return await self._single(context, request, None, True)

    async def Get(self, request: kv_pb2.GetRequest, context: Any) -> kv_pb2.GetResponse:
        return await self._single(context, request, None, None)

    async def _batch(self, context: Any, request: Any, is_delete: bool | None, response_cls: Any) -> Any:
        forwarded, timeout = _forwarded(context), context.time_remaining()

        async def run() -> Any:
            if is_delete is None:
                results, statuses = await self.node.api.get_batch(list(request.items), forwarded, timeout)
            else:
                results, statuses = await self.node.api.write_batch(list(request.items), is_delete, forwarded, timeout)
            self.node.metrics.count_items(OP_LABELS[is_delete], statuses)
            return response_cls(results=results, statuses=statuses)

        return await self._run(context, run)

    async def BatchPut(self, request: kv_pb2.BatchPutRequest, context: Any) -> kv_pb2.BatchPutResponse:
        return await self._batch(context, request, False, kv_pb2.BatchPutResponse)

    async def BatchDelete(self, request: kv_pb2.BatchDeleteRequest, context: Any) -> kv_pb2.BatchDeleteResponse:
        return await self._batch(context, request, True, kv_pb2.BatchDeleteResponse)

    async def BatchGet(self, request: kv_pb2.BatchGetRequest, context: Any) -> kv_pb2.BatchGetResponse:
        return await self._batch(context, request, None, kv_pb2.BatchGetResponse)

    async def ListKeys(self, request: kv_pb2.ListKeysRequest, context: Any) -> kv_pb2.ListKeysResponse:
        return await self._run(context, listing.list_keys, self.node, request, context.time_remaining())

    async def Ring(self, request: kv_pb2.RingRequest, context: Any) -> kv_pb2.RingResponse:
        return await self._run(context, self.node.ring_response)

    async def Session(self, request_iterator: Any, context: Any) -> None:
        """A client session: Batch* requests on one stream, each handled concurrently and answered
        by id. One message each way per batch instead of a call: 140-160 against 320-350 µs of
        this node's CPU per batch (measured, bare grpc.aio, 70 KB messages). Each batch is admitted,
        authorized (by the role its Batch* method needs) and timed like the unary call."""
        sessions = self.node.sessions
        try:
            rid = next((logs.check_request_id(v if isinstance(v, str) else "") for k, v
                        in context.invocation_metadata() or () if k == logs.REQUEST_ID_HEADER), None)
        except KvError as exc:
            await context.abort(code_of(exc), message_of(exc))
        me = asyncio.current_task()
        assert me is not None
        write_lock = asyncio.Lock()
        room = asyncio.Semaphore(self.node.config.max_session_batches_in_flight)
        tasks = _Handlers(room.release)
        peer = context.peer() or "?"

        limit = self.node.config.limits.max_message_bytes

        async def handle(request: kv_pb2.SessionRequest) -> None:
            reply = await self._session_batch(request, context, peer, rid)
            size = reply.ByteSize()
            if size > limit:  # sent, it would end the session and every batch in flight on it
                too_big = ResourceExhausted(f"reply: {size} bytes exceeds the message limit of {limit} bytes "
                                            "(max_message_bytes): ask for fewer keys per batch")
                reply = kv_pb2.SessionResponse(id=request.id, error=kv_pb2.ItemStatus(
                    code=number_of(code_of(too_big)), message=message_of(too_big)))
            try:
                async with write_lock:
                    await context.write(reply)
            except Exception as exc:  # noqa: BLE001 - the stream ended under the write: client gone
                log.debug("session reply %d not sent: %s", request.id, exc)

        bad: KvError | None = None
        try:
            while True:
                await room.acquire()
                if sessions.ended:
                    room.release()
                    break
                sessions.reading.add(me)
                try:
                    request = await context.read()
                except asyncio.CancelledError:
                    room.release()
                    if sessions.ended:
                        me.uncancel()  # it was Sessions.end(), not grpc: this handler goes on
                        break  # answer what is in flight, then end
                    raise
                finally:
                    sessions.reading.discard(me)
                if request is grpc.aio.EOF:
                    room.release()
                    break
                if isinstance(request, Malformed):  # it has no id to answer by: end the stream
                    room.release()
                    bad = request.error()
                    break
                tasks.start(handle(request))
            await tasks.drain()
        finally:
            tasks.cancel()
        if bad is not None:
            await context.abort(code_of(bad), f"session: {message_of(bad)}")

    async def _session_batch(self, request: kv_pb2.SessionRequest, context: Any, peer: str,
                             session_rid: str | None) -> kv_pb2.SessionResponse:
        """One batch of a session, answered like its Batch* call: admitted, authorized for that
        method's role, timed, logged under a request id (the session's x-request-id, or one of
        its own) and counted in the metrics as that method."""
        node = self.node
        kind = request.WhichOneof("batch")
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        logs.request_id.set(session_rid or logs.new_request_id())
        logs.node_id.set(node.node_id)
        try:
            if kind is None:
                raise InvalidArgument("batch: a session request carries put, get or delete")
            authorizer = node.security.authorizer
            if authorizer is not None:  # decided exactly as for the Batch* call
                authorizer.check(_SESSION_METHODS[kind], context.auth_context(), context.invocation_metadata() or ())
            ticket = node.admission.admit("client", peer, request.ByteSize())
            try:
                budget = request.timeout_ms / 1000 if request.timeout_ms else node.config.request_timeout_s
                try:
                    # the API answers by the budget itself (acks got/needed); this is a backstop
                    async with asyncio.timeout(budget + KV_BACKSTOP_SLACK_S):
                        batch = getattr(request, kind)
                        result = await express.run(node, kind, batch, budget)  # the usual batch, here
                        if result is None:  # anything else: trio's path, with the time left
                            left = budget - (time.perf_counter() - started)
                            result = await node.transport.to_trio(logs.carry(self._session_run, node.node_id),
                                                                  kind, batch, left)
                except TimeoutError:
                    raise DeadlineExceeded(f"deadline: no answer within {budget:.3g}s") from None
            finally:
                node.admission.release(ticket)
            result.id = request.id
            return result
        except Exception as exc:  # noqa: BLE001 - a KvError as its status; a bug as INTERNAL
            if not isinstance(exc, KvError):
                log.exception("unexpected error in a session batch")
            code = code_of(exc)
            return kv_pb2.SessionResponse(id=request.id, error=kv_pb2.ItemStatus(code=number_of(code),
                                                                                message=message_of(exc)))
        finally:
            self._session_recorder(kind or "none")(code, time.perf_counter() - started)

    async def _session_run(self, kind: str, batch: Any, budget: float) -> Any:
        node, is_delete = self.node, SESSION_KINDS[kind]
        items = list(batch.items)
        if is_delete is None:
            results, statuses = await node.api.get_batch(items, False, budget)
        else:
            results, statuses = await node.api.write_batch(items, is_delete, False, budget)
        return session_reply(node, kind, results, statuses)

    def _session_recorder(self, kind: str) -> Callable[[grpc.StatusCode, float], None]:
        found = self._recorders.get(kind)
        if found is None:
            method = _SESSION_METHODS[kind].rsplit("/", 1)[1] if kind in _SESSION_METHODS else "Session"
            found = self._recorders[kind] = self.node.metrics.rpc_recorder("kvstore.v1.KV", method)
        return found


class Sessions:
    """The open KV.Session streams of a server, so a stopping node can end them: a client holds
    its session open for its whole life, and `server.stop(grace)` would wait out the grace."""

    def __init__(self) -> None:
        self.reading: set[asyncio.Task] = set()  # session handlers waiting for their next request
        self.ended = False

    def end(self) -> None:
        """On the transport loop: sessions read no more requests, answer the ones in flight, and
        end with status OK (the client's next batch opens a new session, elsewhere if need be).
        A request the node had received but not yet read when its read was cancelled goes
        unanswered: the client fails it as UNAVAILABLE when the stream ends."""
        self.ended = True
        for task in list(self.reading):
            task.cancel()


class InternalServicer(_Base, internal_pb2_grpc.InternalServicer):
    async def Stream(self, request_iterator: Any, context: Any) -> None:
        """Replica batches: each frame is handled concurrently; replies go back by batch id. A
        frame is read only when the stream and the node have a free slot (backpressure, see
        kvstore/node/limits.py). An undecodable frame cannot be answered by id: it is dropped and
        the stream ends with INVALID_ARGUMENT naming the first one."""
        write_lock = asyncio.Lock()
        mine = asyncio.Semaphore(self.node.config.max_stream_batches_in_flight)
        node_slots = self.node.admission.replica_slots
        bad: list[KvError] = []

        async def handle(payload: bytes) -> None:
            try:
                batch_id, ops = wire.decode_batch(payload)
                reply = await serve_on_loop(self.node, batch_id, ops)
                if reply is None:
                    reply = await self.node.transport.to_trio(logs.carry(self.node.handle_batch, self.node.node_id),
                                                              batch_id, ops)
                if reply is not None:
                    async with write_lock:
                        await context.write(internal_pb2.Frame(payload=reply))
            except KvError as exc:  # undecodable batch: nothing to answer by id
                log.warning("dropped a replica batch: %s", exc)
                bad.append(exc)
            except Exception:  # a bug, or the stream ended under the write: this batch only
                log.exception("replica batch failed")

        def finished() -> None:
            node_slots.release()
            mine.release()

        tasks = _Handlers(finished)
        try:
            while True:
                await mine.acquire()
                await node_slots.acquire()
                try:
                    frame = await context.read()
                except BaseException:
                    node_slots.release()
                    mine.release()
                    raise
                if frame is grpc.aio.EOF or isinstance(frame, Malformed):
                    node_slots.release()
                    mine.release()
                    if frame is grpc.aio.EOF:
                        break
                    bad.append(frame.error())
                    continue
                tasks.start(handle(frame.payload))
            await tasks.drain()
        finally:
            tasks.cancel()
        if bad:
            more = f" ({len(bad) - 1} more bad frames)" if len(bad) > 1 else ""
            await context.abort(code_of(bad[0]), f"stream: {message_of(bad[0])}{more}")

    async def Call(self, request: internal_pb2.Frame, context: Any) -> internal_pb2.Frame:
        reply = await self._run(context, self.node.handle_call, request.payload)
        return internal_pb2.Frame(payload=reply)


class AdminServicer(_Base, admin_pb2_grpc.AdminServicer):
    async def Status(self, request: admin_pb2.StatusRequest, context: Any) -> admin_pb2.StatusResponse:
        return await self._run(context, self.node.status_response)

    async def Locate(self, request: admin_pb2.LocateRequest, context: Any) -> admin_pb2.LocateResponse:
        return await self._run(context, self.node.locate, request.key)

    async def Command(self, request: admin_pb2.CommandRequest, context: Any) -> admin_pb2.CommandResponse:
        payload = await self._run(context, self.node.admin_command, request.name, request.args)
        return admin_pb2.CommandResponse(payload=payload)


def make_server(node: Any, options: list[tuple[str, Any]],
                interceptors: Sequence[grpc.aio.ServerInterceptor] = ()) -> grpc.aio.Server:
    """Build (not start) the gRPC server with every service, health and reflection included;
    call on the transport loop. `interceptors`: the authorization check (kvstore/node/auth.py)
    when the node runs TLS; it runs inside the observing one, so denied calls are counted too."""
    # so_reuseport off: two nodes must never silently share a port (grpc enables it by default)
    server = grpc.aio.server(options=[*options, ("grpc.so_reuseport", 0)],
                             interceptors=[ObservingInterceptor(node.metrics, lambda: node.node_id), *interceptors])
    gate = Gate(node.config, node.admission)
    add_guarded(server, gate, kv_pb2_grpc.add_KVServicer_to_server, KVServicer(node))
    add_guarded(server, gate, internal_pb2_grpc.add_InternalServicer_to_server, InternalServicer(node))
    add_guarded(server, gate, admin_pb2_grpc.add_AdminServicer_to_server, AdminServicer(node))
    node.health.register(server)
    return server

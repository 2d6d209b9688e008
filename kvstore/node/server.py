"""gRPC servicers: thin translators on the transport loop. Each call hops to trio once
(Transport.to_trio), and errors become statuses through kvstore/node/status.py only."""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable, Sequence

import grpc

from kvstore._proto import admin_pb2, admin_pb2_grpc, internal_pb2, internal_pb2_grpc, kv_pb2, kv_pb2_grpc
from kvstore.errors import KvError
from kvstore.node import logs
from kvstore.node.api import FORWARDED_HEADER, raise_item
from kvstore.node.interceptor import ObservingInterceptor
from kvstore.node.guard import Gate, Malformed, add_guarded
from kvstore.node.status import code_of, message_of

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


_OPS = {None: "get", False: "put", True: "delete"}  # is_delete -> op label of kvstore_items_total


class KVServicer(_Base, kv_pb2_grpc.KVServicer):
    async def _single(self, context: Any, request: Any, batch: Callable, is_delete: bool | None) -> Any:
        forwarded, timeout = _forwarded(context), context.time_remaining()

        async def one() -> Any:
            if is_delete is None:
                results, statuses = await self.node.api.get_batch([request], forwarded, timeout)
            else:
                results, statuses = await self.node.api.write_batch([request], is_delete, forwarded, timeout)
            self.node.metrics.count_items(_OPS[is_delete], statuses)
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
            self.node.metrics.count_items(_OPS[is_delete], statuses)
            return response_cls(results=results, statuses=statuses)

        return await self._run(context, run)

    async def BatchPut(self, request: kv_pb2.BatchPutRequest, context: Any) -> kv_pb2.BatchPutResponse:
        return await self._batch(context, request, False, kv_pb2.BatchPutResponse)

    async def BatchDelete(self, request: kv_pb2.BatchDeleteRequest, context: Any) -> kv_pb2.BatchDeleteResponse:
        return await self._batch(context, request, True, kv_pb2.BatchDeleteResponse)

    async def BatchGet(self, request: kv_pb2.BatchGetRequest, context: Any) -> kv_pb2.BatchGetResponse:
        return await self._batch(context, request, None, kv_pb2.BatchGetResponse)

    async def Ring(self, request: kv_pb2.RingRequest, context: Any) -> kv_pb2.RingResponse:
        return await self._run(context, self.node.ring_response)


class InternalServicer(_Base, internal_pb2_grpc.InternalServicer):
    async def Stream(self, request_iterator: Any, context: Any) -> None:
        """Replica batches: each frame is handled concurrently; replies go back by batch id. A
        frame is read only when the stream and the node have a free slot (backpressure, see
        kvstore/node/limits.py). An undecodable frame cannot be answered by id: it is dropped and
        the stream ends with INVALID_ARGUMENT naming the first one."""
        write_lock = asyncio.Lock()
        tasks: set[asyncio.Task] = set()
        mine = asyncio.Semaphore(self.node.config.max_stream_batches_in_flight)
        node_slots = self.node.admission.replica_slots
        bad: list[KvError] = []

        async def handle(payload: bytes) -> None:
            try:
                reply = await self.node.transport.to_trio(logs.carry(self.node.handle_batch, self.node.node_id),
                                                          payload)
                if reply is not None:
                    async with write_lock:
                        await context.write(internal_pb2.Frame(payload=reply))
            except KvError as exc:  # undecodable batch: nothing to answer by id
                log.warning("dropped a replica batch: %s", exc)
                bad.append(exc)
            except Exception:  # a bug, or the stream ended under the write: this batch only
                log.exception("replica batch failed")

        def finished(task: asyncio.Task) -> None:
            # a done callback, not a finally: it also runs for a task cancelled before it started
            tasks.discard(task)
            node_slots.release()
            mine.release()

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
                task = asyncio.create_task(handle(frame.payload))
                tasks.add(task)
                task.add_done_callback(finished)
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            for task in tasks:
                task.cancel()
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

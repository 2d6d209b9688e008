"""The gRPC server interceptor: per unary RPC, one request id (from `x-request-id` metadata, or
generated) set for the call's logs and returned in the trailing metadata, and one metrics update
(status code, latency) when it ends. Runs on the transport loop."""
from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Callable

import grpc

from kvstore.errors import KvError
from kvstore.node import logs
from kvstore.node.status import code_of, message_of


def _split(full_method: str) -> tuple[str, str]:
    """'/kvstore.v1.KV/Put' -> ('kvstore.v1.KV', 'Put')."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service, method


class ObservingInterceptor(grpc.aio.ServerInterceptor):
    """Wraps unary-unary handlers; streaming ones (replica streams, health Watch, reflection)
    pass through untouched. Wrapped handlers are cached per method, so the per-call cost is one
    metadata scan, one context variable, one trailing-metadata entry and one metrics record."""

    def __init__(self, metrics: Any, node_id: Callable[[], str]) -> None:
        self.metrics = metrics
        self.node_id = node_id
        self._wrapped: dict[str, grpc.RpcMethodHandler | None] = {}

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        wrapped = self._wrapped.get(details.method)
        if wrapped is None:
            wrapped = self._wrapped[details.method] = self._wrap(details.method, handler)
        return wrapped

    def _wrap(self, full_method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        service, method = _split(full_method)
        inner = handler.unary_unary
        record = self.metrics.rpc_recorder(service, method)
        node_id = self.node_id

        async def observed(request: Any, context: grpc.aio.ServicerContext) -> Any:
            start = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                rid = None
                for key, value in context.invocation_metadata() or ():
                    if key == logs.REQUEST_ID_HEADER:
                        rid = logs.check_request_id(value if isinstance(value, str) else "")
                        break
                rid = rid or logs.new_request_id()
                logs.request_id.set(rid)
                logs.node_id.set(node_id())
                context.set_trailing_metadata(((logs.REQUEST_ID_HEADER, rid),))
                return await inner(request, context)
            except KvError as exc:  # a bad x-request-id: costs this request only
                code = code_of(exc)
                await context.abort(code, message_of(exc))
            except grpc.aio.AbortError:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception:
                code = grpc.StatusCode.UNKNOWN
                raise
            finally:
                record(code, time.perf_counter() - start)

        return grpc.unary_unary_rpc_method_handler(
            observed,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

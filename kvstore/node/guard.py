"""The gate every inbound RPC passes before its servicer (kvstore/node/server.py) runs: a request
that is not valid protobuf gets INVALID_ARGUMENT (grpc itself would answer INTERNAL), admission
control refuses work beyond the node's budgets (kvstore/node/limits.py), and a request sent without
a deadline gets the node's default one. Wrapping happens once, when services are registered, so a
call pays for two counters and one asyncio timeout, nothing per byte.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Callable

import grpc

from kvstore.errors import DeadlineExceeded, InvalidArgument, KvError
from kvstore.node.api import FORWARDED_HEADER
from kvstore.node.limits import Admission
from kvstore.node.status import code_of, message_of

#: beyond the default deadline, how long a KV request sent without one may take before the gate
#: cuts it: the API answers at that deadline by itself (with acks got/needed); this is a backstop
KV_BACKSTOP_SLACK_S = 1.0

HEALTH_METHODS = frozenset({"/kvstore.v1.Admin/Status"})
INTERNAL_METHODS = frozenset({"/kvstore.v1.Internal/Call"})
COMMAND_METHODS = frozenset({"/kvstore.v1.Admin/Command"})
KV_PREFIX = "/kvstore.v1.KV/"


@dataclass(frozen=True)
class Malformed:
    """Stands in for a request message that did not parse (the servicer never sees it)."""

    type_name: str
    size: int

    def error(self) -> InvalidArgument:
        return InvalidArgument(f"request: {self.size} bytes are not a valid {self.type_name} message")


def safe_deserializer(deserialize: Callable[[bytes], Any] | None, type_name: str) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        if deserialize is None:
            return data
        try:
            return deserialize(data)
        except Exception:  # protobuf's DecodeError, and anything a hostile payload provokes
            return Malformed(type_name, len(data))

    return parse


def _type_name(deserialize: Any) -> str:
    owner = getattr(deserialize, "__self__", None)  # Message.FromString is a bound classmethod
    descriptor = getattr(owner, "DESCRIPTOR", None)
    return getattr(descriptor, "full_name", "request")


async def _abort(context: grpc.aio.ServicerContext, exc: KvError) -> None:
    await context.abort(code_of(exc), message_of(exc))


class Gate:
    """Wraps the generated handlers of one server with the checks above."""

    def __init__(self, config: Any, admission: Admission) -> None:
        self.config = config
        self.admission = admission

    def _pool(self, method: str) -> str:
        if method in HEALTH_METHODS:
            return "health"
        if method in INTERNAL_METHODS:
            return "internal"
        return "client"  # the replica stream is not unary: backpressure in its servicer instead

    def _default_timeout(self, method: str) -> float:
        if method in COMMAND_METHODS:
            return self.config.admin_command_timeout_s
        return self.config.request_timeout_s

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        type_name = _type_name(handler.request_deserializer)
        deserializer = safe_deserializer(handler.request_deserializer, type_name)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(method, handler.unary_unary), deserializer, handler.response_serializer)
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                handler.stream_stream, deserializer, handler.response_serializer)
        raise TypeError(f"{method}: only unary-unary and stream-stream methods are served")

    def _unary(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        pool = self._pool(method)
        default = self._default_timeout(method)
        slack = KV_BACKSTOP_SLACK_S if method.startswith(KV_PREFIX) else 0.0
        admission = self.admission

        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, Malformed):
                await _abort(context, request.error())
            remaining = context.time_remaining()
            # grpc reports "no deadline" as None or as a huge number, depending on the version;
            # a deadline the client set is enforced by grpc itself (it cancels this handler)
            own_deadline = remaining is not None and remaining <= 1e9
            # a peer forwarding requests carries many clients on one connection: only the node
            # budgets apply to it (the coordinating node already admitted each client)
            forwarded = any(k == FORWARDED_HEADER for k, _ in (context.invocation_metadata() or ()))
            try:
                ticket = admission.admit(pool, "" if forwarded else (context.peer() or "?"), request.ByteSize())
            except KvError as exc:
                await _abort(context, exc)
            try:
                async with asyncio.timeout(None if own_deadline else default + slack):
                    return await behavior(request, context)
            except TimeoutError:
                await _abort(context, DeadlineExceeded(
                    f"deadline: no answer within {default:.3g}s (the node default for requests sent without one)"))
            finally:
                admission.release(ticket)

        return guarded


class _Recorder:
    """Stands in for the server while generated add_*_to_server functions register handlers."""

    def __init__(self) -> None:
        self.services: list[tuple[str, dict[str, grpc.RpcMethodHandler]]] = []

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass  # the same handlers also arrive through add_registered_method_handlers

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.services.append((service, handlers))


def add_guarded(server: grpc.aio.Server, gate: Gate, add_fn: Callable[[Any, Any], None], servicer: Any) -> None:
    """Like the generated `add_XServicer_to_server(servicer, server)`, with every handler gated."""
    recorder = _Recorder()
    add_fn(servicer, recorder)
    for service, handlers in recorder.services:
        wrapped = {name: gate.wrap(f"/{service}/{name}", h) for name, h in handlers.items()}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, wrapped),))
        server.add_registered_method_handlers(service, wrapped)

"""The standard gRPC health service (grpc.health.v1) and server reflection, for load balancers,
orchestrators and grpcurl. NOT_SERVING until the node is ready, SERVING while it serves, and
NOT_SERVING again from the moment it starts draining. Watch streams end (status OK, after their
NOT_SERVING) when the server stops: left open, each made the stop wait its whole grace period."""
from __future__ import annotations

import asyncio
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kvstore._proto import admin_pb2, internal_pb2, kv_pb2

KV_SERVICE = kv_pb2.DESCRIPTOR.services_by_name["KV"].full_name
#: services whose health is reported: "" is the whole node (what most checkers ask about)
SERVICES = (
    "",
    KV_SERVICE,
    admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name,
    internal_pb2.DESCRIPTOR.services_by_name["Internal"].full_name,
)
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


class _Servicer(health.aio.HealthServicer):
    """grpcio's servicer, with Watch streams that end once `end_watches` is called."""

    def __init__(self) -> None:
        super().__init__()
        self._ended: asyncio.Event | None = None  # made on the transport loop, at first use

    def _ended_event(self) -> asyncio.Event:
        if self._ended is None:
            self._ended = asyncio.Event()
        return self._ended

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Any) -> None:
        ended = self._ended_event()
        if ended.is_set():
            return
        watch = asyncio.ensure_future(super().Watch(request, context))
        end = asyncio.ensure_future(ended.wait())
        try:
            await asyncio.wait((watch, end), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (watch, end):
                task.cancel()
            await asyncio.gather(watch, end, return_exceptions=True)

    def end_watches(self) -> None:
        self._ended_event().set()


class Health:
    """The node's health servicer. `serving` may be read anywhere; `set` runs on the transport
    loop (Transport.run), where the servicer and its watchers live."""

    def __init__(self) -> None:
        self.servicer = _Servicer()
        self.serving = False

    def register(self, server: grpc.aio.Server) -> None:
        """Add the health and reflection services to a server that is not started yet."""
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)
        reflection.enable_server_reflection((*SERVICES[1:], HEALTH_SERVICE, reflection.SERVICE_NAME), server)

    async def set(self, serving: bool) -> None:
        """SERVING or NOT_SERVING for every service; Watch streams are told at once."""
        self.serving = serving
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in SERVICES:
            await self.servicer.set(service, status)

    def end_watches(self) -> None:
        """End every Watch stream (the server is about to stop). On the transport loop."""
        self.servicer.end_watches()

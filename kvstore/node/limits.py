"""Admission control for inbound RPCs: concurrency budgets per node and per client connection,
request bytes in flight, and default deadlines. Runs on the transport loop (the servicers call it
before anything crosses into trio), so an overloaded node refuses work in microseconds with
RESOURCE_EXHAUSTED instead of queueing it: latency stays bounded and refused callers back off.

Pools, each with its own budget so one kind of traffic cannot starve another:
  client    KV (every method), Admin.Locate, Admin.Command: per node, per connection
            (grpc's `context.peer()`, one entry per client TCP connection; requests a peer
            forwards are exempt, as one peer connection carries many clients) and by bytes
  internal  Internal.Call (gossip, hint acks, repair trees): per node; gossip must get through
            when the node is busy with clients (LESSONS: flapping detection under load)
  health    Admin.Status: a small budget of its own, so a client flood cannot starve health checks
Replica batches on Internal.Stream are not refused but slowed: a stream reads its next frame only
when it has a free slot (per stream and per node), and the sending peer's replica deadline turns
a slow node into hints elsewhere (kvstore/node/peers.py caps what a peer queues).
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from kvstore.errors import OVERLOADED_PREFIX, Overloaded

#: Admin.Status calls served at once; each is a cheap snapshot of the node's own view.
HEALTH_CONCURRENCY = 64


@dataclass
class _Ticket:
    pool: str
    connection: str
    nbytes: int


class Admission:
    """Counters of admitted work; every method runs on the transport loop (single-threaded)."""

    def __init__(self, config: Any) -> None:
        self.max_requests = config.max_concurrent_requests
        self.max_per_connection = config.max_concurrent_requests_per_connection
        self.max_bytes = config.max_inflight_request_bytes
        self.max_internal = config.max_concurrent_internal_calls
        self.in_flight = {"client": 0, "internal": 0, "health": 0}
        self.by_connection: dict[str, int] = {}
        self.bytes_in_flight = 0
        self.refused = {"client": 0, "internal": 0, "health": 0}
        # replica batches being handled, node-wide and per stream (backpressure, not refusal)
        self.max_replica_batches = config.max_replica_batches_in_flight
        self.replica_slots = asyncio.Semaphore(config.max_replica_batches_in_flight)
        self.per_stream = config.max_stream_batches_in_flight

    def admit(self, pool: str, connection: str = "", nbytes: int = 0) -> _Ticket:
        """Take a slot or raise Overloaded naming the budget that is spent (and its limit)."""
        used = self.in_flight[pool]
        if pool == "client":
            if used >= self.max_requests:
                self._refuse(pool, f"{used} requests in flight, the limit of max_concurrent_requests "
                                   f"is {self.max_requests}")
            mine = self.by_connection.get(connection, 0)
            if connection and mine >= self.max_per_connection:  # "": forwarded by a peer
                self._refuse(pool, f"{mine} requests in flight on this connection, the limit of "
                                   f"max_concurrent_requests_per_connection is {self.max_per_connection}")
            # one request bigger than the whole budget still gets in when nothing else is in flight
            if self.bytes_in_flight and self.bytes_in_flight + nbytes > self.max_bytes:
                self._refuse(pool, f"{self.bytes_in_flight} request bytes in flight, the limit of "
                                   f"max_inflight_request_bytes is {self.max_bytes}")
            self.by_connection[connection] = mine + 1
            self.bytes_in_flight += nbytes
        elif pool == "internal":
            if used >= self.max_internal:
                self._refuse(pool, f"{used} internal calls in flight, the limit of "
                                   f"max_concurrent_internal_calls is {self.max_internal}")
        elif used >= HEALTH_CONCURRENCY:
            self._refuse(pool, f"{used} status calls in flight, the limit is {HEALTH_CONCURRENCY}")
        self.in_flight[pool] = used + 1
        return _Ticket(pool, connection, nbytes)

    def release(self, ticket: _Ticket) -> None:
        self.in_flight[ticket.pool] -= 1
        if ticket.pool == "client":
            left = self.by_connection[ticket.connection] - 1
            if left:
                self.by_connection[ticket.connection] = left
            else:
                del self.by_connection[ticket.connection]
            self.bytes_in_flight -= ticket.nbytes

    def _refuse(self, pool: str, why: str) -> None:
        self.refused[pool] += 1
        raise Overloaded(f"{OVERLOADED_PREFIX}{why}; retry with backoff or use another node")

    @property
    def replica_batches(self) -> int:
        """Replica batches being handled now (slots taken)."""
        return self.max_replica_batches - self.replica_slots._value  # asyncio keeps no public count

    def snapshot(self) -> dict[str, Any]:
        """For the node's status document."""
        return {"in_flight": dict(self.in_flight), "refused": dict(self.refused),
                "connections": len(self.by_connection), "request_bytes": self.bytes_in_flight,
                "replica_batches": self.replica_batches}


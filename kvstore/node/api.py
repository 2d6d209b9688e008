"""The public API on one node: protobuf requests in, protobuf responses out.

Validates each item (errors name the field and the limit), forwards items whose key this node
does not replicate to a live replica, hands the rest to the coordinator, and turns results into
per-item statuses. Runs on trio; kvstore/node/server.py only moves calls across the bridge. The
validation helpers (write_req, read_req, get_response) also serve the loop's path
(kvstore/node/express.py): they read the node's state but change none of it.
"""
from __future__ import annotations

import logging
from functools import partial
from typing import Any, Awaitable, Callable, Sequence

import trio

from kvstore._proto import kv_pb2
from kvstore.core import quorum
from kvstore.core.records import decode_context, encode_context
from kvstore.core.ring import Ring
from kvstore.core.versions import Sibling
from kvstore.errors import KvError, Unavailable
from kvstore.node.coordinator import ReadReq, ReadResult, WriteReq
from kvstore.node.status import code_of, error_from, message_of, number_of

log = logging.getLogger(__name__)

FORWARDED_HEADER = "kv-forwarded"

OK = kv_pb2.ItemStatus(code=0)
OP_LABELS = {None: "get", False: "put", True: "delete"}  # is_delete -> op label of kvstore_items_total
SESSION_KINDS: dict[str, bool | None] = {"put": False, "get": None, "delete": True}  # batch kind -> is_delete


def session_reply(node: Any, kind: str, results: Sequence[Any],
                  statuses: list[kv_pb2.ItemStatus]) -> kv_pb2.SessionResponse:
    """A session batch's reply, its items counted in the metrics (trio's path and the loop's)."""
    node.metrics.count_items(OP_LABELS[SESSION_KINDS[kind]], statuses)
    reply = kv_pb2.SessionResponse()  # filled in place: a Batch*Response kwarg would be copied
    batch_reply = getattr(reply, kind)
    batch_reply.results.extend(results)
    batch_reply.statuses.extend(statuses)
    return reply


def item_status(exc: BaseException) -> kv_pb2.ItemStatus:
    return kv_pb2.ItemStatus(code=number_of(code_of(exc)), message=message_of(exc))


def _level(field: str, level: kv_pb2.Level, n: int, ring_size: int) -> int:
    """Acks needed. Counts are checked against n; named levels resolve against the replicas that
    exist, so a cluster smaller than n (a dev node) still serves QUORUM with what it has."""
    memo = (field, level.named, level.count, n, ring_size)
    needed = _LEVELS.get(memo)
    if needed is None:  # a batch's items almost always ask the same: resolved once, then looked up
        lv = quorum.Level(level.named, level.count)
        needed = quorum.required(field, lv, n)  # raises for a bad level: never memoised
        if not lv.count:
            needed = quorum.required(field, lv, max(1, min(n, ring_size)))
        if len(_LEVELS) >= 4096:
            _LEVELS.clear()
        _LEVELS[memo] = needed
    return needed


_LEVELS: dict[tuple[str, int, int, int, int], int] = {}


class Api:
    def __init__(self, node: Any) -> None:
        self.node = node

    def deadline(self, timeout_s: float | None, options: kv_pb2.Options | None = None) -> float:
        budget = self.node.config.request_timeout_s
        if timeout_s is not None:
            budget = min(budget, timeout_s)
        if options is not None and options.timeout_ms:
            budget = min(budget, options.timeout_ms / 1000)
        return trio.current_time() + max(budget, 0.0)

    # ---- writes (put and delete share one path) -------------------------------------

    def write_req(self, item: Any, is_delete: bool) -> WriteReq:
        limits = self.node.config.limits
        limits.check_key(item.key)
        opts = item.options
        n = quorum.resolve_n(opts.n, self.node.config.replication_factor)
        w = _level("w", item.w, n, len(self.node.ring()))
        context = decode_context(item.context)
        blind = not item.context
        if is_delete:
            return WriteReq(item.key, None, context, n, w, opts.strict, blind=blind)
        limits.check_value(item.value)
        limits.check_ttl(item.ttl_s)
        return WriteReq(item.key, item.value, context, n, w, opts.strict, item.ttl_s, item.conditional, blind)

    def check_serving(self) -> None:
        """Until the node is ready its ring may be partial (a restarted node that has not heard
        from its peers yet sees a ring of one, where QUORUM is 1): no reads or writes before."""
        if not self.node.serving:
            raise Unavailable(f"node {self.node.node_id} is starting (or joining): not serving requests yet")

    async def write_batch(
        self, items: Sequence[Any], is_delete: bool, forwarded: bool, timeout_s: float | None
    ) -> tuple[list[Any], list[kv_pb2.ItemStatus]]:
        self.check_serving()
        self.node.config.limits.check_batch(len(items))
        response_cls = kv_pb2.DeleteResponse if is_delete else kv_pb2.PutResponse
        results: list[Any] = [response_cls() for _ in items]
        statuses: list[kv_pb2.ItemStatus] = [OK] * len(items)
        deadline = self.deadline(timeout_s, items[0].options if items else None)
        local, remote = self._partition(items, lambda item: self.write_req(item, is_delete), forwarded, statuses)

        async def here() -> None:
            outcomes = await self.node.coordinator.write_many([r for _, r in local], deadline)
            for (i, _), out in zip(local, outcomes):
                if isinstance(out, KvError):
                    statuses[i] = item_status(out)
                else:
                    results[i] = response_cls(context=encode_context(out))

        await self._alongside(here if local else None, [
            partial(self._forward, t, idx, items, is_delete, deadline, results, statuses) for t, idx in remote.items()
        ])
        return results, statuses

    # ---- reads ------------------------------------------------------------------------

    async def get_batch(
        self, items: Sequence[kv_pb2.GetRequest], forwarded: bool, timeout_s: float | None
    ) -> tuple[list[kv_pb2.GetResponse], list[kv_pb2.ItemStatus]]:
        self.check_serving()
        self.node.config.limits.check_batch(len(items))
        results = [kv_pb2.GetResponse() for _ in items]
        statuses: list[kv_pb2.ItemStatus] = [OK] * len(items)
        deadline = self.deadline(timeout_s, items[0].options if items else None)
        local, remote = self._partition(items, self.read_req, forwarded, statuses)

        async def here() -> None:
            outcomes = await self.node.coordinator.read_many([r for _, r in local], deadline)
            now_ms = self.node.now_ms()
            for (i, req), out in zip(local, outcomes):
                try:
                    if isinstance(out, KvError):
                        raise out
                    results[i] = self.get_response(req.key, out, now_ms)
                except KvError as exc:
                    statuses[i] = item_status(exc)

        await self._alongside(here if local else None, [
            partial(self._forward, t, idx, items, None, deadline, results, statuses) for t, idx in remote.items()
        ])
        return results, statuses

    @staticmethod
    async def _alongside(here: Callable[[], Awaitable[None]] | None,
                         forwards: list[Callable[[], Awaitable[None]]]) -> None:
        """Run `here` (the items coordinated on this node) while the forwards run; without
        anything to forward, no nursery (a batch's usual case: its client routed it here)."""
        if not forwards:
            if here is not None:
                await here()
            return
        async with trio.open_nursery() as nursery:
            for forward in forwards:
                nursery.start_soon(forward)
            if here is not None:
                await here()

    def get_response(self, key: bytes, result: ReadResult, now_ms: int) -> kv_pb2.GetResponse:
        live = [s for s in result.siblings if s.live(now_ms)]
        store = self.node.store
        return kv_pb2.GetResponse(
            found=bool(live),
            siblings=[_sibling_pb(s, store.open_value(key, s)) for s in live],
            context=encode_context(result.context),
        )

    def read_req(self, item: kv_pb2.GetRequest) -> ReadReq:
        self.node.config.limits.check_key(item.key)
        n = quorum.resolve_n(item.options.n, self.node.config.replication_factor)
        return ReadReq(item.key, n, _level("r", item.r, n, len(self.node.ring())), item.options.strict)

    # ---- routing ----------------------------------------------------------------------

    def _partition(
        self, items: Sequence[Any], build: Any, forwarded: bool, statuses: list[kv_pb2.ItemStatus]
    ) -> tuple[list[tuple[int, Any]], dict[str, list[int]]]:
        """Validate each item into a request and split them into those coordinated here and
        those forwarded (by target node); an invalid item gets its status and goes nowhere."""
        local: list[tuple[int, Any]] = []
        remote: dict[str, list[int]] = {}
        ring = self.node.ring()
        for i, item in enumerate(items):
            try:
                req = build(item)
                target = self._route(ring, req, forwarded)
            except KvError as exc:
                statuses[i] = item_status(exc)
                continue
            if target is None:
                local.append((i, req))
            else:
                remote.setdefault(target, []).append(i)
        return local, remote

    def _route(self, ring: Ring, req: WriteReq | ReadReq, forwarded: bool) -> str | None:
        """None to coordinate here, else the replica to forward to."""
        if len(ring) == 0:
            raise Unavailable("the ring is empty: this node has not joined a cluster yet")
        pref = ring.replicas_of(req.key, req.n)
        if forwarded or self.node.node_id in pref:
            return None
        for node_id in pref:
            if self.node.is_up(node_id):
                return node_id
        raise Unavailable(f"no replica of the key is reachable (replicas: {', '.join(pref)})")

    async def _forward(
        self,
        target: str,
        idx: list[int],
        items: Sequence[Any],
        is_delete: bool | None,
        deadline: float,
        results: list[Any],
        statuses: list[kv_pb2.ItemStatus],
    ) -> None:
        if is_delete is None:
            method, request = "BatchGet", kv_pb2.BatchGetRequest(items=[items[i] for i in idx])
        elif is_delete:
            method, request = "BatchDelete", kv_pb2.BatchDeleteRequest(items=[items[i] for i in idx])
        else:
            method, request = "BatchPut", kv_pb2.BatchPutRequest(items=[items[i] for i in idx])
        try:
            reply = await self.node.forward(target, method, request, deadline)
        except KvError as exc:
            for i in idx:
                statuses[i] = item_status(exc)
            return
        for j, i in enumerate(idx):
            results[i] = reply.results[j]
            statuses[i] = reply.statuses[j]


def _sibling_pb(s: Sibling, plaintext: bytes) -> kv_pb2.Sibling:
    return kv_pb2.Sibling(
        value=plaintext, tombstone=s.tombstone, hlc=s.hlc, node_id=s.node, expires_at_ms=s.expires_at_ms
    )


def raise_item(status: kv_pb2.ItemStatus) -> None:
    """For single-item calls: raise the item's error, if any."""
    if status.code != 0:
        raise error_from(status.code, status.message)

"""Client batches coordinated on the transport loop, without trio: the common case only.

What belongs here: a session's put, delete or get batch whose every key has this node among its
replicas, every replica up and connected, and no range moving (no join or decommission under
way). The loop stamps writes through the sqlite writer, ships the stored records on the replica
streams itself and answers the client when W have acknowledged; it reads through a reader thread
and the streams and answers at R. On trio the same batch crosses threads four more times (loop ->
trio -> writer -> trio -> loop out, loop -> trio -> loop back) and runs a trio task per batch and
per peer. Anything else returns None before anything is sent, and the batch goes to trio's path
(kvstore/node/api.py, coordinator.py), which knows every case.

Failures after the loop started a batch: a replica's failed write ops go to trio's
`Coordinator.after_replies` (hinted fallback, or a hint kept here), whose outcomes come back as
acknowledgements; a failed read is asked again through trio's path (reads are idempotent).
Read repair of replicas that disagree goes to trio once every asked replica answered.

Trio publishes what the loop needs to decide (`RouteView`: ring, live members, their `Peer`s)
every ROUTE_VIEW_INTERVAL_S; a view that is a moment stale costs at most a failed send, which
the paths above handle as trio's would.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from kvstore._proto import kv_pb2
from kvstore.core import versions, wire
from kvstore.core.records import decode_record, encode_context
from kvstore.core.ring import Ring
from kvstore.core.wire import ReadOp, RecordOp
from kvstore.errors import KvError, Unavailable
from kvstore.node.api import OK, SESSION_KINDS, item_status, session_reply
from kvstore.node.coordinator import Pending, ReadReq, ReadResult, WriteReq
from kvstore.node.local import Stamp, Stamped
from kvstore.node.peers import Peer

log = logging.getLogger(__name__)

ROUTE_VIEW_INTERVAL_S = 0.1


@dataclass(frozen=True)
class RouteView:
    """What trio knows of the cluster, for the loop: replaced whole, never changed."""

    ring: Ring
    up: frozenset[str]          # members up by the failure detector and reachable
    peers: dict[str, Peer]      # by node id, the up ones other than this node

    @staticmethod
    def of(node: Any) -> RouteView | None:
        """On trio: the node's view now, or None when the loop must leave every batch to trio."""
        if not node.serving or node.gossip is None or node.elastic.moving():
            return None
        ring = node.ring()
        up: set[str] = set()
        peers: dict[str, Peer] = {}
        for node_id in ring.node_ids:
            if node_id == node.node_id:
                up.add(node_id)
            elif node.is_up(node_id):
                peer = node.peer(node_id)
                if peer.conn is not None and not peer.blocked:
                    up.add(node_id)
                    peers[node_id] = peer
        return RouteView(ring, frozenset(up), peers)


def _usable(view: RouteView, me: str, pref: Sequence[str]) -> bool:
    return me in pref and all(t in view.up for t in pref)


async def run(node: Any, kind: str, batch: Any, budget: float) -> kv_pb2.SessionResponse | None:
    """A session batch coordinated here on the loop, or None to hand it to trio."""
    view: RouteView | None = node.route_view
    if view is None or not node.serving or not node.config.coordinate_on_loop:
        return None
    items = batch.items
    if not items or len(items) > node.config.limits.max_batch_items:
        return None
    budget = min(budget, node.config.request_timeout_s)  # as Api.deadline
    if budget <= 0:
        return None
    if items[0].options.timeout_ms:
        budget = min(budget, items[0].options.timeout_ms / 1000)
    is_delete = SESSION_KINDS[kind]
    try:
        if is_delete is None:
            reqs: Any = [node.api.read_req(item) for item in items]
        else:
            reqs = [node.api.write_req(item, is_delete) for item in items]
    except KvError:
        return None  # trio's path answers each bad item with its own status
    me = node.node_id
    prefs = []
    for req in reqs:
        pref = view.ring.replicas_of(req.key, req.n)
        if not _usable(view, me, pref):
            return None
        prefs.append(pref)
    if is_delete is None:
        got = await _Read(node, view, reqs, prefs).run(budget)
    else:
        got = await _Write(node, view, reqs, prefs, is_delete).run(budget)
    if got is None:
        return None
    return session_reply(node, kind, *got)


def _threadsafe(loop: asyncio.AbstractEventLoop, fn: Callable[..., None]) -> Callable[..., None]:
    """`fn` called on the loop, from any thread; dropped once the loop is closed."""

    def call(*args: Any) -> None:
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: nobody waits for this any more
            pass

    return call


_tasks: set[asyncio.Task] = set()  # the loop keeps only weak references to its tasks


def _start(coro: Any) -> None:
    """A task on the running loop that nobody awaits (a replica's share of a batch), kept alive."""
    task = asyncio.get_running_loop().create_task(coro)
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)


def _on_trio(node: Any, async_fn: Callable[..., Any], *args: Any) -> None:
    """`async_fn(*args)` started in the node's background nursery, from the loop; dropped when
    the node has stopped (its nursery is closed)."""

    def start() -> None:
        try:
            node.background.start_soon(async_fn, *args)
        except RuntimeError:  # the nursery is closed: the node is stopping
            log.debug("node stopping: %s not started", getattr(async_fn, "__name__", async_fn))

    node.transport.to_trio_nowait(start)


# ---- writes --------------------------------------------------------------------------------------


class _Write:
    """One batch of puts or deletes: stamp, ship, count acknowledgements (as Coordinator.write_many)."""

    def __init__(self, node: Any, view: RouteView, reqs: list[WriteReq], prefs: list[Sequence[str]],
                 is_delete: bool) -> None:
        self.node, self.view, self.reqs, self.prefs, self.is_delete = node, view, reqs, prefs, is_delete
        self.loop = asyncio.get_running_loop()
        self.finished = self.loop.create_future()
        self.outcomes: list[Any] = [None] * len(reqs)   # the new version's clock, or a KvError
        self.pendings: list[Pending | None] = [None] * len(reqs)  # per stamped write
        self.undone = 0
        self.stamped_any = False

    async def run(self, budget: float) -> tuple[list[Any], list[kv_pb2.ItemStatus]] | None:
        node, reqs = self.node, self.reqs
        now_ms = node.now_ms()
        hlcs = node.clock.now_many(now_ms, len(reqs))
        stamps = [
            Stamp(r.key, r.value, r.context, hlc, now_ms + r.ttl_s * 1000 if r.ttl_s else 0,
                  r.conditional, r.blind and not r.conditional)
            for r, hlc in zip(reqs, hlcs)
        ]
        try:
            queued = node.store.stamp_many_nowait(stamps, now_ms, _threadsafe(self.loop, self._stamped),
                                                  _threadsafe(self.loop, self._committed))
        except Exception as exc:  # noqa: BLE001 - e.g. the engine is closing: trio's path answers
            log.debug("a write batch goes through trio: %s", exc)
            return None
        if not queued:
            return None
        try:
            async with asyncio.timeout(budget):
                await asyncio.shield(self.finished)
        except TimeoutError:
            pass
        response_cls = kv_pb2.DeleteResponse if self.is_delete else kv_pb2.PutResponse
        results: list[Any] = []
        statuses: list[kv_pb2.ItemStatus] = []
        for i, req in enumerate(reqs):
            out, pending = self.outcomes[i], self.pendings[i]
            if isinstance(out, KvError):
                failed: KvError | None = out
            else:  # not stamped by the deadline: no acknowledgement at all
                failed = (pending or Pending(req.w)).shortfall()
            if failed is not None:
                results.append(response_cls())
                statuses.append(item_status(failed))
            else:
                results.append(response_cls(context=encode_context(out)))
                statuses.append(OK)
        return results, statuses

    # -- on the loop, called from the writer thread through _threadsafe --

    def _stamped(self, stamped: list[Stamped | BaseException]) -> None:
        self.stamped_any = True
        me = self.node.node_id
        plans: dict[str, list[tuple[int, RecordOp, bool]]] = {}
        for i, (req, st) in enumerate(zip(self.reqs, stamped)):
            if isinstance(st, BaseException):
                self.outcomes[i] = st if isinstance(st, KvError) else KvError(str(st))
                continue
            self.outcomes[i] = st.new.clock()
            op = RecordOp(req.key, st.record, st.base, max(s.hlc for s in st.siblings))
            pref = self.prefs[i]
            for target in pref:
                if target != me:
                    plans.setdefault(target, []).append((i, op, True))
            self.pendings[i] = Pending(needed=req.w, outstanding=len(pref))  # the others and this node's commit
            self.undone += 1
        for target, items in plans.items():
            _start(self._send(target, items))
        self._maybe_finished()

    def _committed(self, error: BaseException | None) -> None:
        if error is not None:
            log.warning("local commit of a %d-key write failed: %s", len(self.reqs), error)
            if not self.stamped_any:  # the transaction failed before stamping: nothing was sent
                exc = error if isinstance(error, KvError) else KvError(str(error))
                self.outcomes = [exc] * len(self.reqs)
                self._maybe_finished()
                return
        me = self.node.node_id
        for i, pending in enumerate(self.pendings):
            if pending is not None:  # stamped: its commit is an acknowledgement
                self._result(i, me, error is None)

    def _result(self, i: int, peer_id: str, ok: bool) -> None:
        pending = self.pendings[i]
        assert pending is not None
        if pending.record(peer_id, ok):
            self.undone -= 1
            self._maybe_finished()

    def _maybe_finished(self) -> None:
        if self.undone == 0 and not self.finished.done():
            self.finished.set_result(None)

    async def _send(self, target: str, items: list[tuple[int, RecordOp, bool]]) -> None:
        node = self.node
        replies = await _replicate(node, self.view.peers[target], [op for _, op, _ in items])
        failed_items, failed_replies = [], []
        for item, reply in zip(items, replies):
            if reply[0] == 0:
                self._result(item[0], target, True)
            else:
                failed_items.append(item)
                failed_replies.append(reply)
        if failed_items:  # hinted fallbacks, or hints kept here: trio's business
            on_result = _threadsafe(self.loop, self._result)
            _on_trio(node, node.coordinator.after_replies, self.view.ring, target, failed_items, self.reqs,
                     failed_replies, on_result)


async def _replicate(node: Any, peer: Peer, ops: list[Any]) -> list[tuple[int, Any]]:
    """`ops` sent to `peer` as one replica batch: (code, payload) per op; every op failed (14,
    UNAVAILABLE) when the peer did not answer."""
    conn = peer.conn
    if conn is None or peer.blocked:
        return [(14, f"peer {peer.node_id}: not connected")] * len(ops)
    batch_id = next(Peer._ids)
    try:
        results = await conn.send_batch(batch_id, wire.encode_batch(batch_id, ops), node.config.replica_timeout_s)
        if len(results) != len(ops):
            raise Unavailable(f"peer {peer.node_id}: answered {len(results)} of {len(ops)} ops")
    except Exception as exc:  # noqa: BLE001 - a failed batch is a failed op each
        if not isinstance(exc, KvError):
            log.warning("peer %s: replica batch failed unexpectedly: %r", peer.node_id, exc)
        log.debug("replica %s failed: %s", peer.node_id, exc)
        peer.reachable = False
        return [(14, str(exc))] * len(ops)
    peer.reachable = True
    peer.loop_batches_sent += 1
    peer.loop_ops_sent += len(ops)
    return results


# ---- reads ---------------------------------------------------------------------------------------


class _Read:
    """One batch of gets: this node's records and R-1 replicas' (all N for read_repair_chance of
    the keys), answered at R replies each (as Coordinator.read_many)."""

    def __init__(self, node: Any, view: RouteView, reqs: list[ReadReq], prefs: list[Sequence[str]]) -> None:
        self.node, self.view, self.reqs, self.prefs = node, view, reqs, prefs
        self.loop = asyncio.get_running_loop()
        self.settled = self.loop.create_future()
        self.replies: list[dict[str, bytes | None]] = [{} for _ in reqs]
        self.unsettled = len(reqs)
        self.failed = False
        self.asked_total = 0
        self.answered_total = 0

    async def run(self, budget: float) -> tuple[list[kv_pb2.GetResponse], list[kv_pb2.ItemStatus]] | None:
        node, me = self.node, self.node.node_id
        chance = node.config.read_repair_chance
        asks: dict[str, list[int]] = {}
        for i, (req, pref) in enumerate(zip(self.reqs, self.prefs)):
            cut = len(pref) if chance and node.rng.random() < chance else req.r
            for target in [me, *(t for t in pref if t != me)][:cut]:
                if target != me:
                    asks.setdefault(target, []).append(i)
                    self.asked_total += 1
        self.asked_total += len(self.reqs)
        keys = [req.key for req in self.reqs]
        try:
            if not node.store.read_raw_nowait(keys, _threadsafe(self.loop, self._local)):
                return None
        except Exception as exc:  # noqa: BLE001 - e.g. the engine is closing: trio's path answers
            log.debug("a read batch goes through trio: %s", exc)
            return None
        for target, idx in asks.items():
            _start(self._ask(target, idx))
        started = time.monotonic()
        try:
            async with asyncio.timeout(budget):
                await asyncio.shield(self.settled)
        except TimeoutError:
            pass
        if self.failed or self.unsettled:
            # a replica failed or is slow: trio's path asks the spares, within what is left
            if budget - (time.monotonic() - started) <= 0:
                return self._unavailable()
            return None
        now_ms = node.now_ms()
        results: list[kv_pb2.GetResponse] = []
        statuses: list[kv_pb2.ItemStatus] = []
        newest = 0
        for req, got in zip(self.reqs, self.replies):
            try:
                raws = list(got.values())
                first = raws[0]
                if all(raw == first for raw in raws):
                    sibs = decode_record(first, req.key) if first else []
                else:
                    sets = [decode_record(raw, req.key) if raw else [] for raw in raws]
                    sibs = versions.merge(*sets)
                    newest = max(newest, max((s.hlc for s in sibs), default=0))
                results.append(node.api.get_response(req.key, ReadResult(sibs, versions.context_of(sibs)), now_ms))
                statuses.append(OK)
            except KvError:
                return None  # a corrupt record: trio's path reads around it
        if newest:
            node.clock.observe(newest, now_ms)
        return results, statuses

    def _unavailable(self) -> tuple[list[kv_pb2.GetResponse], list[kv_pb2.ItemStatus]]:
        statuses = []
        for req, got in zip(self.reqs, self.replies):
            if len(got) >= req.r:
                statuses.append(item_status(Unavailable("r: answered too late")))
            else:
                statuses.append(item_status(Unavailable(
                    f"r: got {len(got)} of {req.r} replies needed (answered: {', '.join(sorted(got)) or 'none'})")))
        return [kv_pb2.GetResponse() for _ in self.reqs], statuses

    def _record(self, i: int, node_id: str, raw: bytes | None) -> None:
        got = self.replies[i]
        before = len(got)
        got[node_id] = raw
        if before < self.reqs[i].r <= len(got):
            self.unsettled -= 1
            if self.unsettled == 0 and not self.settled.done():
                self.settled.set_result(None)
        self.answered_total += 1
        if self.answered_total == self.asked_total:
            self._repair_if_needed()

    def _fail(self) -> None:
        self.failed = True
        if not self.settled.done():
            self.settled.set_result(None)

    def _local(self, outcome: list[bytes | None] | BaseException) -> None:
        if isinstance(outcome, BaseException):
            self._fail()
            return
        me = self.node.node_id
        for i, raw in enumerate(outcome):
            self._record(i, me, raw)

    async def _ask(self, target: str, idx: list[int]) -> None:
        replies = await _replicate(self.node, self.view.peers[target], [ReadOp(self.reqs[i].key) for i in idx])
        for i, (code, payload) in zip(idx, replies):
            if code != 0 or not (payload is None or isinstance(payload, bytes)):
                self._fail()
                return
            self._record(i, target, payload)

    def _repair_if_needed(self) -> None:
        """Every asked replica answered: replicas that disagree are repaired on trio."""
        if not self.node.config.read_repair:
            return
        stale = [i for i, got in enumerate(self.replies)
                 if len(got) > 1 and len(set(got.values())) > 1]
        if not stale:
            return
        try:
            replies = [{node_id: decode_record(raw, self.reqs[i].key) if raw else []
                        for node_id, raw in self.replies[i].items()} for i in stale]
        except KvError:
            return  # a corrupt record: anti-entropy's business
        reqs = [self.reqs[i] for i in stale]
        _on_trio(self.node, self.node.coordinator.repair, reqs, replies)

"""Key listing on a node (KV.ListKeys): the coordinator's side, on trio, and every node's share.

The coordinator plans which nodes list which token ranges (kvstore/core/listing.py), asks each for
a page of its live keys after the cursor (this node through its own store, others with the
`list-keys` Call), and merges them. A page costs each node at most SCAN_ROWS_PER_PAGE stored
records read, however few of them are live keys of its ranges; a node that stopped early says how
far it got, and the page ends there. A node that fails a page is left out and its ranges go to
another replica, within the same call; ranges left with none are reported as missing. The nodes
of a plan are asked at once.
"""
from __future__ import annotations

import logging
from typing import Any

import trio

from kvstore._proto import kv_pb2
from kvstore.core import listing, quorum
from kvstore.core.records import decode_record
from kvstore.core.ring import key_token
from kvstore.errors import DeadlineExceeded, InvalidArgument, KvError, Unavailable
from kvstore.node.elastic import RangeIndex, _parse_ranges

log = logging.getLogger(__name__)

SCAN_ROWS = 1000                  # stored records read per engine scan
SCAN_ROWS_PER_PAGE = 20_000       # ... and per page at most, before a node answers what it has


def _live(raw: bytes, key: bytes, now_ms: int) -> bool:
    try:
        return any(s.live(now_ms) for s in decode_record(raw, key))
    except KvError:
        return True  # a corrupt record: its key exists (a get reports the damage), so list it


async def serve_page(node: Any, body: Any) -> dict[str, Any]:
    """This node's share of a page: its live keys in `ranges` after `after` (and starting with
    `prefix`), at most `limit`, and `upto`, the last key it has looked at (None: the end)."""
    if not isinstance(body, dict):
        raise InvalidArgument("list-keys: body must be a map")
    ranges = _parse_ranges(body.get("ranges"))
    after, prefix, limit = body.get("after"), body.get("prefix", b""), body.get("limit")
    if after is not None and not isinstance(after, bytes):
        raise InvalidArgument("list-keys: after must be a key")
    if not isinstance(prefix, bytes):
        raise InvalidArgument("list-keys: prefix must be bytes")
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= node.config.limits.max_batch_items:
        raise InvalidArgument(f"list-keys: limit must be 1..{node.config.limits.max_batch_items}")
    index = RangeIndex((s, e, True) for s, e in ranges)
    now_ms = node.now_ms()
    keys: list[bytes] = []
    cursor, read = after, 0
    while True:
        rows = await node.engine.scan(cursor, SCAN_ROWS, prefix)
        for key, raw in rows:
            if index.find(key_token(key)) and _live(raw, key, now_ms):
                keys.append(key)
                if len(keys) == limit:
                    return {"keys": keys, "upto": key}
        if len(rows) < SCAN_ROWS:
            return {"keys": keys, "upto": None}
        cursor = rows[-1][0]
        read += len(rows)
        if read >= SCAN_ROWS_PER_PAGE:
            return {"keys": keys, "upto": cursor}


def _check_request(node: Any, request: kv_pb2.ListKeysRequest) -> tuple[int, int, int]:
    """(n, replicas per range, page limit), or InvalidArgument naming the field."""
    limits = node.config.limits
    if len(request.prefix) > limits.max_key_bytes:
        raise InvalidArgument(f"prefix: {len(request.prefix)} bytes exceeds the limit of {limits.max_key_bytes} bytes")
    if len(request.start_after) > limits.max_key_bytes:
        raise InvalidArgument(
            f"start_after: {len(request.start_after)} bytes exceeds the limit of {limits.max_key_bytes} bytes")
    if request.limit > limits.max_batch_items:
        raise InvalidArgument(f"limit: {request.limit} exceeds the limit of {limits.max_batch_items} keys "
                              "per page (max_batch_items)")
    n = quorum.resolve_n(request.options.n, node.config.replication_factor)
    if request.replicas > n:
        raise InvalidArgument(f"replicas: {request.replicas} exceeds n={n}, the replicas each key has")
    return n, max(1, request.replicas), request.limit or limits.max_batch_items


async def list_keys(node: Any, request: kv_pb2.ListKeysRequest, timeout_s: float | None) -> kv_pb2.ListKeysResponse:
    """One page of the listing, coordinated here (on trio)."""
    n, copies, limit = _check_request(node, request)
    node.api.check_serving()
    started = trio.current_time()
    deadline = node.api.deadline(timeout_s, request.options)
    ring = node.ring()
    ranges = [((start, end), ring.preference_list(end, n)) for start, end, _ in ring.ranges()]
    up = {node_id for node_id in ring.node_ids if node_id == node.node_id or node.is_up(node_id)}
    after = request.start_after or None
    body = {"after": after, "prefix": request.prefix, "limit": limit}
    pages: list[listing.Page] = []
    missing: list[listing.Range] = []
    todo = ranges
    while todo:
        plan = listing.plan(todo, up, node.node_id, copies)
        missing.extend(plan.missing)
        todo = []
        got: dict[str, listing.Page | Unavailable] = {}

        async def ask(node_id: str, assigned: list[listing.Range]) -> None:
            try:
                got[node_id] = await _page_from(node, node_id, {**body, "ranges": [list(r) for r in assigned]},
                                                max(deadline - trio.current_time(), 0.001))
            except Unavailable as exc:
                got[node_id] = exc

        with trio.move_on_at(deadline) as scope:
            async with trio.open_nursery() as nursery:  # every node's share at once
                for node_id, assigned in plan.assigned.items():
                    nursery.start_soon(ask, node_id, assigned)
        if scope.cancelled_caught:
            raise DeadlineExceeded(f"deadline: the key listing page took over {deadline - started:.3g}s")
        for node_id, assigned in plan.assigned.items():
            page = got[node_id]
            if isinstance(page, Unavailable):
                log.info("key listing: %s failed a page (%s); its ranges go to other replicas", node_id, page)
                up.discard(node_id)
                failed = set(assigned)
                todo.extend((r, reps) for r, reps in ranges if r in failed)
            else:
                pages.append(page)
    keys, cursor = listing.merge(pages, limit) if pages else ([], None)
    return kv_pb2.ListKeysResponse(keys=keys, cursor=cursor or b"", missing_ranges=len(missing),
                                   total_ranges=len(ranges))


async def _page_from(node: Any, node_id: str, body: dict[str, Any], timeout_s: float) -> listing.Page:
    if node_id == node.node_id:
        reply = await serve_page(node, body)
    else:
        reply = await node.peer(node_id).call("list-keys", body, timeout_s)
    if not isinstance(reply, dict):
        raise Unavailable(f"peer {node_id}: a malformed key listing page")
    keys, upto = reply.get("keys"), reply.get("upto")
    if not (isinstance(keys, list) and all(isinstance(k, bytes) for k in keys)
            and (upto is None or isinstance(upto, bytes))):
        raise Unavailable(f"peer {node_id}: a malformed key listing page")
    return listing.Page(keys, upto)

"""Elastic membership on a node: bootstrap streaming when joining, decommission, removal of a
dead node, cleanup, and the pending replicas that writes must also reach while ranges move.

Data moves as sealed records (never decrypted), in pages, rate-limited, with progress (keys,
bytes, ETA) in the node's status. A join records its cursor per source in the node's identity
file, so an interrupted join resumes where it stopped, and an operator can abort a join
(`abort-join`: the node goes JOINING -> LEFT, forgets its tokens and stops; started again it joins
afresh). Decommission is all or nothing: if any stream fails, the node goes back to NORMAL and
keeps serving.
"""
from __future__ import annotations

import bisect
import logging
from dataclasses import replace
from typing import Any, Iterable, Sequence

import trio

from kvstore.core import hlc
from kvstore.core import membership as mb
from kvstore.core.membership import NodeState, Status
from kvstore.core.records import decode_record
from kvstore.core.ring import Ring, in_range, key_token, moved_ranges
from kvstore.core.wire import WriteOp
from kvstore.errors import InvalidArgument, KvError, Unavailable

log = logging.getLogger(__name__)

PAGE_ROWS = 500          # rows a source scans per stream call: bounded work per request
PUSH_BATCH = 256         # records per replica batch when pushing
CATCH_UP_MARGIN_S = 120.0  # join catch-up pass: records stamped this long before the cluster saw
                           # the joiner (in-flight writes plus clock skew between nodes)
ABORT_WAIT_S = 10.0      # abort-join: how long to wait for the cluster to see this node leave
Ranges = list[tuple[int, int]]


def _newest(raw: bytes, key: bytes) -> int:
    """The highest sibling HLC of a stored record (a record that does not decode counts as new:
    the receiver's merge judges it)."""
    try:
        return max((s.hlc for s in decode_record(raw, key)), default=0)
    except KvError:
        return 1 << 64


def _parse_ranges(raw: Any) -> Ranges:
    if not isinstance(raw, list) or len(raw) > 100_000:
        raise InvalidArgument("ranges: must be a list of [start, end] token pairs")
    out = []
    for r in raw:
        if not (isinstance(r, list) and len(r) == 2 and all(isinstance(t, int) and 0 <= t < 2**64 for t in r)):
            raise InvalidArgument("ranges: each range must be [start, end] tokens in 0..2^64-1")
        out.append((r[0], r[1]))
    return out


class RangeIndex:
    """Which of a set of disjoint token ranges holds a token (bisect over range ends)."""

    def __init__(self, ranges: Iterable[tuple[int, int, Any]]) -> None:
        self.items = sorted(ranges, key=lambda r: r[1])
        self.ends = [r[1] for r in self.items]

    def find(self, token: int) -> Any | None:
        if not self.items:
            return None
        i = bisect.bisect_left(self.ends, token)
        for j in (i % len(self.items), (i + 1) % len(self.items), i - 1):
            start, end, value = self.items[j]
            if in_range(token, start, end):
                return value
        for start, end, value in self.items:  # wrap-around corner cases: linear, rare
            if in_range(token, start, end):
                return value
        return None


class Elastic:
    def __init__(self, node: Any) -> None:
        self.node = node
        self.progress: dict[str, Any] = {}
        self._future: tuple[int, Ring] | None = None
        self.join_scope = trio.CancelScope()   # around the join's streaming; abort-join cancels it
        self.join_aborted = trio.Event()

    # ---- rings -------------------------------------------------------------------------

    def _table(self) -> dict[str, NodeState]:
        return self.node.gossip.table

    def moving(self) -> bool:
        return any(s.status in (Status.JOINING, Status.LEAVING) and s.tokens for s in self._table().values())

    def future_ring(self) -> Ring:
        """The ring once every join and decommission in flight completes."""
        table = self._table()
        stamp = hash(tuple(sorted((s.node_id, s.status.value, s.tokens[:1]) for s in table.values())))
        if self._future is None or self._future[0] != stamp:
            future = {k: replace(s, status=Status.NORMAL) if s.status == Status.JOINING else s
                      for k, s in table.items() if s.status != Status.LEAVING}
            self._future = (stamp, mb.ring_of(future))
        return self._future[1]

    def pending(self, key: bytes, n: int, current: Sequence[str]) -> list[str]:
        """Replicas a write must also reach because ranges are moving to them."""
        if not self.moving():
            return []
        return [t for t in self.future_ring().preference_list(key, n) if t not in current]

    # ---- the source side of a stream -------------------------------------------------------

    async def serve_stream(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise InvalidArgument("stream: body must be a map")
        ranges = _parse_ranges(body.get("ranges"))
        after = body.get("after")
        if after is not None and not isinstance(after, bytes):
            raise InvalidArgument("stream: after must be a key")
        since = body.get("since_hlc", 0)
        if not isinstance(since, int) or isinstance(since, bool) or not 0 <= since < 1 << 64:
            raise InvalidArgument("stream: since_hlc must be an unsigned 64-bit integer")
        rows = await self.node.engine.scan(after, PAGE_ROWS)
        index = RangeIndex((s, e, True) for s, e in ranges)
        records = [[k, raw] for k, raw in rows if index.find(key_token(k)) and (not since or _newest(raw, k) >= since)]
        return {"records": records, "next": rows[-1][0] if len(rows) == PAGE_ROWS else None}

    # ---- progress and pacing ---------------------------------------------------------------

    def _start(self, op: str, total_keys: int | None = None) -> dict[str, Any]:
        self.progress = {"op": op, "state": "running", "keys": 0, "bytes": 0,
                         "started": trio.current_time(), "total_keys": total_keys}
        return self.progress

    async def _account(self, keys: int, nbytes: int) -> None:
        p = self.progress
        p["keys"] += keys
        p["bytes"] += nbytes
        elapsed = max(trio.current_time() - p["started"], 1e-6)
        p["keys_per_s"] = p["keys"] / elapsed
        p["mb_per_s"] = p["bytes"] / elapsed / 1e6
        if p.get("total_keys"):
            left = max(p["total_keys"] - p["keys"], 0)
            p["eta_s"] = left / p["keys_per_s"] if p["keys_per_s"] else None
        rate = self.node.config.stream_rate_bytes_per_s
        ahead = p["bytes"] / rate - elapsed
        if ahead > 0:
            await trio.sleep(ahead)

    def _finish(self, state: str, error: str = "") -> None:
        self.progress["state"] = state
        self.progress["elapsed_s"] = trio.current_time() - self.progress["started"]
        if error:
            self.progress["error"] = error

    # ---- waiting for the cluster to see a status ----------------------------------------------

    async def member_views(self) -> list[tuple[str, Any]]:
        """Each other live member (ring status or joining) with its own view of the cluster (the
        `status` call), None for one that did not answer."""
        node = self.node
        views: list[tuple[str, Any]] = []
        for s in list(self._table().values()):
            if s.node_id == node.node_id or s.status not in mb.RING_STATUSES | {Status.JOINING}:
                continue
            if not node.is_up(s.node_id):
                continue
            try:
                views.append((s.node_id, await node.peer(s.node_id).call("status", None, node.config.replica_timeout_s)))
            except KvError:
                views.append((s.node_id, None))
        return views

    async def wait_seen(self, status: Status, timeout_s: float = 30.0, tokens: tuple[int, ...] | None = None) -> None:
        """Until every live member's own view shows this node in `status` (so every coordinator
        sends writes for moving ranges to their new replicas before data starts to move), and
        with `tokens`, holding those."""
        node = self.node
        with trio.fail_after(timeout_s):
            while True:
                lagging = []
                for node_id, view in await self.member_views():
                    try:
                        mine = [m for m in view["members"] if m["node_id"] == node.node_id]
                        if not mine or mine[0]["status"] != status.value or (
                                tokens is not None and mine[0].get("token_digest") != mb.token_digest(tokens)):
                            lagging.append(node_id)
                    except (KeyError, TypeError):  # no answer (None), or a malformed one
                        lagging.append(node_id)
                if not lagging:
                    return
                await trio.sleep(node.config.gossip_interval_s)

    # ---- join ------------------------------------------------------------------------------

    async def bootstrap(self) -> None:
        """Pull every range this node will replicate from a current replica, resuming from the
        cursors saved in the identity file."""
        node = self.node
        n = node.config.replication_factor
        current, future = node.ring(), self.future_ring()
        by_source: dict[str, Ranges] = {}
        for start, end, old, new in moved_ranges(current, future, n):
            if node.node_id not in new or node.node_id in old:
                continue
            # pull from every live replica, not one: a write acknowledged at QUORUM may be missing
            # on any single replica, but not on all the live ones
            sources = sorted(t for t in old if node.is_up(t))
            if not sources:
                if old:
                    raise Unavailable(f"no live replica holds range ({start}, {end}]: its owners "
                                      f"{sorted(old)} are down")
                continue
            for source in sources:
                by_source.setdefault(source, []).append((start, end))
        state = node.ident.setdefault("bootstrap", {"done": False, "cursors": {}})
        self._start("join")
        # Every coordinator now sends new writes here too, but a write whose coordinator chose
        # its replicas just before it saw this node JOINING can still land on a source after the
        # pass below went by its key. Such writes were stamped within CATCH_UP_MARGIN_S of now
        # (by the coordinator's clock: the margin covers skew too) and land within the replica
        # timeout (join_settle_s); a second pass, once that has passed, pulls every record
        # written since.
        seen_ms = node.now_ms()
        for source, ranges in by_source.items():
            cursor = state["cursors"].get(source)
            if cursor == "done":
                continue
            await self._pull(source, ranges, bytes.fromhex(cursor) if cursor else None, state)
        self.progress["phase"] = "catch-up"
        wait_s = seen_ms / 1000 + node.config.join_settle_s - node.now_ms() / 1000
        if wait_s > 0:
            await trio.sleep(wait_s)
        since = hlc.pack(max(seen_ms - int(CATCH_UP_MARGIN_S * 1000), 0), 0)
        for source, ranges in by_source.items():
            await self._pull(source, ranges, None, None, since)
        state["done"] = True
        node.save_identity()
        self._finish("done")

    async def _pull(self, source: str, ranges: Ranges, after: bytes | None, state: dict[str, Any] | None,
                    since_hlc: int = 0) -> None:
        """Stream `ranges` from `source` into this node's store, page by page from `after`
        (saving the cursor in `state` when given), only records written since `since_hlc` if set."""
        node = self.node
        while True:
            body: dict[str, Any] = {"ranges": [list(r) for r in ranges], "after": after}
            if since_hlc:
                body["since_hlc"] = since_hlc
            page = await node.peer(source).call("stream-ranges", body, max(node.config.request_timeout_s, 10.0))
            records = page.get("records") or []
            if records:
                items = [(k, decode_record(raw, k)) for k, raw in records]
                await node.store.merge_many(items)
                await self._account(len(records), sum(len(raw) for _, raw in records))
            after = page.get("next")
            if state is not None:
                state["cursors"][source] = after.hex() if after else "done"
                node.save_identity()
            if after is None:
                return

    # ---- pushing data to new replicas (decommission, removenode) -------------------------------

    async def push(self, moves: list[tuple[int, int, list[str]]], op: str) -> int:
        """Send every local record in the given ranges to the listed new replicas."""
        node = self.node
        index = RangeIndex((s, e, targets) for s, e, targets in moves)
        sent, after = 0, None
        self._start(op, await node.engine.count())
        while True:
            rows = await node.engine.scan(after, PAGE_ROWS)
            if not rows:
                break
            after = rows[-1][0]
            per_target: dict[str, list[WriteOp]] = {}
            nbytes = 0
            for key, raw in rows:
                targets = index.find(key_token(key))
                if targets:
                    op_ = WriteOp(key, decode_record(raw, key))
                    nbytes += len(raw)
                    for t in targets:
                        per_target.setdefault(t, []).append(op_)
            for target, ops in per_target.items():
                for i in range(0, len(ops), PUSH_BATCH):
                    replies = await node.peer(target).replicate(ops[i:i + PUSH_BATCH], node.config.replica_timeout_s * 5)
                    failed = [code for code, _ in replies if code != 0]
                    if failed:
                        raise Unavailable(f"{op}: {target} refused {len(failed)} records (code {failed[0]})")
                    sent += len(ops[i:i + PUSH_BATCH])
            await self._account(len(rows), nbytes)
        self._finish("done")
        return sent

    # ---- aborting a join ------------------------------------------------------------------------

    async def abort_join(self) -> dict[str, Any]:
        """Operator command on a joining node: stop streaming, leave, stop (Scylla #5898)."""
        node = self.node
        if node.gossip.me.status != Status.JOINING or self.join_scope.cancel_called:
            raise InvalidArgument(f"abort-join: node is {node.gossip.me.status.value}, not joining")
        self.join_scope.cancel()
        with trio.move_on_after(ABORT_WAIT_S):
            await self.join_aborted.wait()
        return {"aborted": self.join_aborted.is_set(), **self.progress}

    async def finish_abort(self) -> None:
        """After the join's scope was cancelled: LEFT (the others drop it as a pending replica;
        writes never counted on it alone, see coordinator), identity reset, stop."""
        node = self.node
        if self.progress.get("op") != "join":  # aborted before streaming began
            self._start("join")
        self._finish("aborted", "join aborted by an operator")
        node.gossip.set_status(Status.LEFT)
        try:
            await self.wait_seen(Status.LEFT, timeout_s=ABORT_WAIT_S)
        except trio.TooSlowError:
            log.warning("abort-join: not every member saw this node leave within %.0f s; gossip "
                        "carries it on", ABORT_WAIT_S)
        node.ident["tokens"] = []
        node.ident.pop("bootstrap", None)
        node.save_identity()
        log.warning("join aborted: this node left (its partly streamed data stays on disk; wipe the "
                    "data dir or run cleanup after a later join); stopping")
        self.join_aborted.set()
        node.request_stop()

    async def decommission(self) -> dict[str, Any]:
        node = self.node
        me = node.gossip.me
        if me.status != Status.NORMAL:
            raise InvalidArgument(f"decommission: node is {me.status.value}, not normal")
        others = [s for s in self._table().values() if s.node_id != node.node_id and s.status == Status.NORMAL]
        if not others:
            raise InvalidArgument("decommission: this is the last node of the cluster")
        n = node.config.replication_factor
        node.gossip.set_status(Status.LEAVING)
        try:
            await self.wait_seen(Status.LEAVING)
            current, future = node.ring(), self.future_ring()
            moves = [(s, e, sorted(new - old)) for s, e, old, new in moved_ranges(current, future, n)
                     if node.node_id in old and new - old]
            sent = await self.push(moves, "decommission")
            await node.replay_hints(everything=True)
        except BaseException as exc:
            node.gossip.set_status(Status.NORMAL)  # all or nothing: keep owning and serving
            self._finish("failed", str(exc))
            log.error("decommission failed, node stays normal: %s", exc)
            raise
        node.gossip.set_status(Status.LEFT)
        await self.wait_seen(Status.LEFT, timeout_s=10.0)
        log.info("decommissioned: streamed %d records; stopping", sent)
        node.request_stop()
        return {"streamed": sent, **self.progress}

    async def removenode(self, node_id: str) -> dict[str, Any]:
        """Declare a dead node removed; every live node re-replicates the ranges it held."""
        node = self.node
        state = self._table().get(node_id)
        if state is None:
            raise InvalidArgument(f"removenode: {node_id!r} is not a member")
        if node_id == node.node_id:
            raise InvalidArgument("removenode: use decommission to remove the node you are talking to")
        if node.is_up(node_id):
            raise InvalidArgument(f"removenode: {node_id} is up; decommission it instead")
        old_state = state
        node.gossip.table[node_id] = mb.removal(state)
        node.gossip._refresh()
        await trio.sleep(3 * node.config.gossip_interval_s)
        reports = {}
        for s in list(self._table().values()):
            if s.status != Status.NORMAL or not node.is_up(s.node_id):
                continue
            if s.node_id == node.node_id:
                reports[s.node_id] = await self.rereplicate(old_state.to_wire())
            else:
                reports[s.node_id] = await node.peer(s.node_id).call(
                    "rereplicate", old_state.to_wire(), 3600.0)
        return {"removed": node_id, "streamed": reports}

    async def rereplicate(self, removed_wire: Any) -> int:
        """Push this node's share of a removed node's ranges to their new replicas. Of the
        surviving replicas of a range, only the first (by id) sends, so data moves once."""
        node = self.node
        try:
            removed = NodeState.from_wire(removed_wire)
        except ValueError as exc:
            raise InvalidArgument(f"rereplicate: {exc}") from None
        table = dict(self._table())
        table[removed.node_id] = replace(removed, status=Status.NORMAL, heartbeat=0)
        before, after = mb.ring_of(table), node.ring()
        n = node.config.replication_factor
        moves = []
        for s, e, old, new in moved_ranges(before, after, n):
            survivors = sorted(old & new)
            if survivors and survivors[0] == node.node_id and new - old:
                moves.append((s, e, sorted(new - old)))
        return await self.push(moves, "removenode")

    async def cleanup(self) -> int:
        """Delete local records of keys this node no longer replicates (after joins)."""
        node = self.node
        if self.moving():
            raise InvalidArgument("cleanup: ranges are moving (a join or decommission is in flight)")
        n = node.config.replication_factor
        ring = node.ring()
        deleted, after = 0, None
        while True:
            rows = await node.engine.scan(after, PAGE_ROWS)
            if not rows:
                return deleted
            after = rows[-1][0]
            foreign = [(k, raw) for k, raw in rows if node.node_id not in ring.preference_list(k, n)]
            if foreign:
                res = await node.engine.update_many(
                    [(k, lambda old, raw=raw: None if old == raw else old) for k, raw in foreign])
                deleted += sum(1 for r in res if r is None)

"""Merkle anti-entropy on a node: compare every range this node replicates with each other
replica, stream only the keys that differ (as sealed records, both ways), and remember when a
full repair last completed (tombstones are purged only if written before it: no zombie data).

A round costs one local scan, one scan per peer for its trees, and one more per peer only when
trees differ; it runs on `kvstore repair` and periodically (anti_entropy_interval_s).
"""
from __future__ import annotations

import logging
from typing import Any

import trio

from kvstore.core.merkle import MerkleTree, keys_differing, version_hash
from kvstore.core.records import decode_record, siblings_from_reply
from kvstore.core.ring import key_token
from kvstore.core.wire import ReadOp, WriteOp
from kvstore.errors import InvalidArgument, KvError
from kvstore.node.elastic import PAGE_ROWS, RangeIndex, _parse_ranges

log = logging.getLogger(__name__)

TREE_DEPTH = 6          # 64 buckets per range: a few KB per peer per round
EXCHANGE_BATCH = 256


class Repair:
    def __init__(self, node: Any) -> None:
        self.node = node
        self.progress: dict[str, Any] = {}

    async def _scan(self, ranges: list[tuple[int, int]]) -> dict[tuple[int, int], dict[bytes, tuple[int, bytes]]]:
        """One pass over local data: per range, key -> (token, version hash)."""
        index = RangeIndex((s, e, (s, e)) for s, e in ranges)
        out: dict[tuple[int, int], dict[bytes, tuple[int, bytes]]] = {r: {} for r in ranges}
        after = None
        while True:
            rows = await self.node.engine.scan(after, PAGE_ROWS)
            if not rows:
                return out
            after = rows[-1][0]
            for key, raw in rows:
                token = key_token(key)
                r = index.find(token)
                if r is None:
                    continue
                try:
                    out[r][key] = (token, version_hash(decode_record(raw, key)))
                except KvError:
                    out[r][key] = (token, b"corrupt")  # differs from every healthy replica: repaired
            await trio.sleep(0)

    @staticmethod
    def _tree(r: tuple[int, int], items: dict[bytes, tuple[int, bytes]]) -> MerkleTree:
        return MerkleTree.build(r[0], r[1], ((t, k, h) for k, (t, h) in items.items()), depth=TREE_DEPTH)

    # ---- the peer side ---------------------------------------------------------------------

    async def serve_trees(self, body: Any) -> list:
        ranges = _parse_ranges(body)
        scanned = await self._scan(ranges)
        return [self._tree(r, scanned[r]).to_wire() for r in ranges]

    async def serve_digests(self, body: Any) -> list:
        ranges = _parse_ranges(body)
        scanned = await self._scan(ranges)
        return [[k, h] for r in ranges for k, (_, h) in scanned[r].items()]

    # ---- the initiating side ---------------------------------------------------------------

    async def repair(self, only: tuple[int, int] | None = None) -> dict[str, Any]:
        node = self.node
        n = node.config.replication_factor
        ring = node.ring()
        started_ms = node.now_ms()
        peers_ranges: dict[str, list[tuple[int, int]]] = {}
        mine: list[tuple[int, int]] = []
        for start, end, _owner in ring.ranges():
            if only is not None and (start, end) != only:
                continue
            replicas = ring.preference_list(end, n)
            if node.node_id not in replicas:
                continue
            mine.append((start, end))
            for peer in replicas:
                if peer != node.node_id:
                    peers_ranges.setdefault(peer, []).append((start, end))
        self.progress = {"state": "running", "ranges": len(mine), "peers": len(peers_ranges),
                         "differing_buckets": 0, "keys_pulled": 0, "keys_pushed": 0}
        local = await self._scan(mine)
        complete = True
        for peer_id, ranges in peers_ranges.items():
            if not node.is_up(peer_id):
                complete = False
                continue
            try:
                await self._repair_with(peer_id, ranges, local)
            except KvError as exc:
                complete = False
                log.warning("repair with %s failed: %s", peer_id, exc)
        self.progress["state"] = "done" if complete else "partial"
        if complete and only is None:
            node.ident["repaired_at_ms"] = started_ms  # tombstones older than this may be purged
            node.save_identity()
        return dict(self.progress)

    async def _repair_with(self, peer_id: str, ranges: list[tuple[int, int]],
                           local: dict[tuple[int, int], dict[bytes, tuple[int, bytes]]]) -> None:
        node = self.node
        peer = node.peer(peer_id)
        timeout = max(node.config.request_timeout_s, 30.0)
        wires = await peer.call("merkle-trees", [list(r) for r in ranges], timeout)
        if not isinstance(wires, list) or len(wires) != len(ranges):
            raise InvalidArgument(f"repair: {peer_id} answered {len(wires) if isinstance(wires, list) else '?'} trees")
        buckets: list[tuple[int, int]] = []
        for r, wire_tree in zip(ranges, wires):
            try:
                theirs = MerkleTree.from_wire(wire_tree)
            except ValueError as exc:
                raise InvalidArgument(f"repair: bad tree from {peer_id}: {exc}") from None
            buckets.extend(b for b in self._tree(r, local[r]).diff(theirs) if b[0] != b[1])
        if not buckets:
            return
        self.progress["differing_buckets"] += len(buckets)
        digests = await peer.call("range-digests", [list(b) for b in buckets], timeout)
        theirs_map = {bytes(k): bytes(h) for k, h in digests}
        index = RangeIndex((s, e, True) for s, e in buckets)
        mine_map = {k: h for r in ranges for k, (t, h) in local[r].items() if index.find(t)}
        differing = keys_differing(mine_map, theirs_map)
        for i in range(0, len(differing), EXCHANGE_BATCH):
            keys = differing[i:i + EXCHANGE_BATCH]
            replies = await peer.replicate([ReadOp(k) for k in keys], node.config.replica_timeout_s * 5)
            pulled = [(k, siblings_from_reply(p)) for k, (code, p) in zip(keys, replies) if code == 0 and p]
            if pulled:
                await node.store.merge_many(pulled)
                self.progress["keys_pulled"] += len(pulled)
            merged = await node.store.read_many(keys)
            push = [WriteOp(k, sibs) for k, sibs in zip(keys, merged) if isinstance(sibs, list) and sibs]
            if push:
                await peer.replicate(push, node.config.replica_timeout_s * 5)
                self.progress["keys_pushed"] += len(push)

    async def run_periodically(self) -> None:
        interval = self.node.config.anti_entropy_interval_s
        while True:
            await trio.sleep(interval)
            try:
                await self.repair()
            except KvError as exc:
                log.info("anti-entropy round failed: %s", exc)

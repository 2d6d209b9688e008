"""Coordinating reads and writes across a key's replicas: quorums, sloppy quorum with hints, and
read repair. Requests arrive here already validated; forwarding to a replica happens before
(kvstore/node/api.py). Everything runs on the node's trio loop.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Protocol, Sequence

import trio

from kvstore.config import NodeConfig
from kvstore.core import versions
from kvstore.core.hlc import HybridClock
from kvstore.core.records import siblings_from_reply
from kvstore.core.ring import Ring
from kvstore.core.versions import Sibling, VersionVector
from kvstore.core.wire import ReadOp, RecordOp, WriteOp
from kvstore.errors import DataLoss, KvError, Unavailable
from kvstore.node.local import LocalStore, Stamp, decode_records
from kvstore.node.peers import Peer
from kvstore.node.status import error_from

log = logging.getLogger(__name__)


class ClusterView(Protocol):
    node_id: str
    config: NodeConfig
    store: LocalStore
    clock: HybridClock
    background: trio.Nursery
    rng: random.Random
    elastic: Any

    def ring(self) -> Ring: ...
    def is_up(self, node_id: str) -> bool: ...
    def peer(self, node_id: str) -> Peer: ...
    def now_ms(self) -> int: ...


@dataclass
class WriteReq:
    key: bytes
    value: bytes | None          # None: delete
    context: VersionVector
    n: int
    w: int                       # acknowledgements needed
    strict: bool = False
    ttl_s: int = 0
    conditional: bool = False
    blind: bool = False          # no context supplied: supersede what the coordinator holds


@dataclass
class ReadReq:
    key: bytes
    n: int
    r: int
    strict: bool = False


@dataclass
class ReadResult:
    siblings: list[Sibling]      # every non-obsolete sibling, tombstones included
    context: dict[str, int]


@dataclass
class Pending:
    """Acknowledgement bookkeeping of one key's write (trio's path here, the loop's in
    kvstore/node/express.py)."""

    needed: int
    acks: int = 0
    outstanding: int = 0
    acked_by: list[str] = field(default_factory=list)
    done: bool = False

    def record(self, peer_id: str, ok: bool) -> bool:
        """One acknowledgement (or failure) from `peer_id`; True when it settles the write: W
        acknowledgements, or nobody left to answer."""
        self.outstanding -= 1
        if ok:
            self.acks += 1
            self.acked_by.append(peer_id)
        if not self.done and (self.acks >= self.needed or self.outstanding <= 0):
            self.done = True
            return True
        return False

    def shortfall(self) -> Unavailable | None:
        """The error of a write short of W acknowledgements, else None."""
        if self.acks >= self.needed:
            return None
        return Unavailable(f"w: got {self.acks} of {self.needed} acknowledgements needed "
                           f"(acked by {', '.join(self.acked_by) or 'none'})")


def _same_dots(sets: Iterable[list[Sibling]]) -> bool:
    """True when every sibling set holds the same versions in the same order (stored records are
    kept in merge's canonical order, so replicas that agree compare equal without a merge)."""
    it = iter(sets)
    head = next(it, [])
    first: list[tuple[str, int]] | None = None
    for other in it:
        if other is head:  # a replica that sent the bytes this node holds: the same list
            continue
        if first is None:
            first = [s.dot for s in head]
        if [s.dot for s in other] != first:
            return False
    return True


def _liveness(view: ClusterView) -> Callable[[str], bool]:
    """view.is_up, asked once per node for a whole batch (a failure detector query per key and
    replica was a measurable part of a batch's CPU)."""
    known: dict[str, bool] = {}

    def is_up(node_id: str) -> bool:
        up = known.get(node_id)
        if up is None:
            up = known[node_id] = view.is_up(node_id)
        return up

    return is_up


class Coordinator:
    def __init__(self, view: ClusterView) -> None:
        self.view = view
        self.repairs = 0  # replicas updated by read repair (a metric)

    # ---- writes -------------------------------------------------------------------------

    async def write_many(self, reqs: Sequence[WriteReq], deadline: float) -> list[dict[str, int] | KvError]:
        """Stamp, replicate and wait for W acknowledgements per key. The stamped versions go to
        the replicas as soon as they are stamped, while this node's own transaction commits (the
        commit is one acknowledgement among the others): measured, +3.5-4.5 % puts/s."""
        view = self.view
        now_ms = view.now_ms()
        stamps = [
            Stamp(
                r.key,
                r.value,
                r.context,
                view.clock.now(now_ms),
                now_ms + r.ttl_s * 1000 if r.ttl_s else 0,
                r.conditional,
                r.blind and not r.conditional,
            )
            for r in reqs
        ]
        stamped, committed = await view.store.stamp_many(stamps, now_ms)
        results: list[dict[str, int] | KvError] = [{} for _ in reqs]
        pendings: list[Pending | None] = [None] * len(reqs)
        all_done = trio.Event()
        ring = view.ring()
        # keys of ranges moving to a joining node or away from a leaving one (checked per batch)
        moving = view.elastic.moving()
        is_up = _liveness(view)
        undone = 0  # pendings not done yet: all_done is set when it reaches 0
        plans: dict[str, list[tuple[int, RecordOp, bool]]] = {}  # peer -> (item, op, primary)
        # no spare node to hold a hint (e.g. 3 nodes, N=3): the coordinator keeps it itself, like
        # Cassandra; it never counts towards W, but the owner gets the write when it is back
        self_hints: list[tuple[str, bytes, list[Sibling]]] = []
        for i, (req, st) in enumerate(zip(reqs, stamped)):
            if isinstance(st, BaseException):
                results[i] = st if isinstance(st, KvError) else KvError(str(st))
                continue
            results[i] = st.new.clock()
            pending = Pending(needed=req.w, outstanding=1)  # 1: this node's own commit
            pendings[i] = pending
            pref = ring.replicas_of(req.key, req.n)  # the ring as it is now, after the stamp's wait
            # immutable: one object serves every primary (a fallback gets a copy naming its owner)
            op = RecordOp(req.key, st.record, st.base, max(s.hlc for s in st.siblings))
            # ranges moving to a joining node or away from a leaving one: the new replicas must
            # get the write too, and it is not acknowledged until they have it (as Cassandra)
            for target in view.elastic.pending(req.key, req.n, pref) if moving else ():
                plans.setdefault(target, []).append((i, op, False))
                pending.outstanding += 1
                pending.needed += 1
            used = set(pref)
            for target in pref:
                if target == view.node_id:
                    continue
                if is_up(target):
                    plans.setdefault(target, []).append((i, op, True))
                    pending.outstanding += 1
                elif not req.strict:
                    fb = self._fallback(ring, req.key, used)
                    if fb is not None:
                        used.add(fb)
                        plans.setdefault(fb, []).append((i, replace(op, hint_for=target), False))
                        pending.outstanding += 1
                    else:
                        self_hints.append((target, req.key, st.siblings))
                else:
                    self_hints.append((target, req.key, st.siblings))
            if pending.acks >= pending.needed or pending.outstanding == 0:
                pending.done = True
            else:
                undone += 1

        def on_result(i: int, peer_id: str, ok: bool) -> None:
            nonlocal undone
            p = pendings[i]
            assert p is not None
            if p.record(peer_id, ok):
                undone -= 1
                if undone == 0:
                    all_done.set()

        if self_hints:
            await view.store.merge_many([(k, sibs) for _, k, sibs in self_hints], [t for t, _, _ in self_hints])
        if log.isEnabledFor(logging.DEBUG):  # request tracing: these lines carry the request id
            log.debug("write of %d keys: replicas %s, %d hints kept here",
                      len(reqs), ",".join(f"{p}:{len(it)}" for p, it in plans.items()) or "-", len(self_hints))
        for peer_id, items in plans.items():
            view.background.start_soon(self._deliver, ring, peer_id, items, reqs, on_result)

        async def commit_here() -> None:
            try:
                await committed()
                ok = True
            except Exception as exc:  # noqa: BLE001 - one acknowledgement short, like a failed replica
                log.warning("local commit of a %d-key write failed: %s", len(reqs), exc)
                ok = False
            for i, p in enumerate(pendings):
                if p is not None:
                    on_result(i, view.node_id, ok)

        view.background.start_soon(commit_here)
        if undone == 0:
            all_done.set()
        with trio.move_on_at(deadline):
            await all_done.wait()
        for i, p in enumerate(pendings):
            short = p.shortfall() if p is not None else None
            if short is not None:
                log.debug("write of key %d/%d: %s by the deadline", i + 1, len(reqs), short)
                results[i] = short
        return results

    def _fallback(self, ring: Ring, key: bytes, used: set[str]) -> str | None:
        """The next live node clockwise after the preference list, for a hinted write."""
        for node in ring.walk(key):
            if node not in used and node != self.view.node_id and self.view.is_up(node):
                return node
        return None

    async def _deliver(
        self,
        ring: Ring,
        peer_id: str,
        items: list[tuple[int, RecordOp, bool]],
        reqs: Sequence[WriteReq],
        on_result: Callable[[int, str, bool], None],
    ) -> None:
        """Send one peer its share; a primary that fails is replaced by a hinted fallback."""
        view = self.view
        try:
            replies = await view.peer(peer_id).replicate([op for _, op, _ in items], view.config.replica_timeout_s)
        except KvError as exc:
            log.debug("replica %s failed: %s", peer_id, exc)
            replies = [(14, None)] * len(items)
        await self.after_replies(ring, peer_id, items, reqs, replies, on_result)

    async def after_replies(
        self,
        ring: Ring,
        peer_id: str,
        items: list[tuple[int, RecordOp, bool]],
        reqs: Sequence[WriteReq],
        replies: Sequence[tuple[int, Any]],
        on_result: Callable[[int, str, bool], None],
    ) -> None:
        """A peer's replies to its share of a write: acknowledgements pass to `on_result`; each op
        it failed goes to a hinted fallback, or is kept here as a hint when nobody else can take
        it (then it counts as not acknowledged)."""
        view = self.view
        retry: dict[str, list[tuple[int, RecordOp, bool]]] = {}
        local_hints: list[tuple[str, RecordOp]] = []  # (owner, write)
        for (i, op, primary), (code, _) in zip(items, replies):
            if code == 0:
                on_result(i, peer_id, True)
                continue
            req = reqs[i]
            fb = None
            if primary and not req.strict:
                used = set(ring.preference_list(req.key, req.n))
                fb = self._fallback(ring, req.key, used | {peer_id})
            if fb is None:
                # Nobody else can hold it: keep the hint here, for the primary it was meant for
                # (when this was already a fallback, for the primary that fallback stood in for).
                target = peer_id if primary else op.hint_for
                if target:
                    local_hints.append((target, op))
                on_result(i, peer_id, False)
            else:
                retry.setdefault(fb, []).append((i, replace(op, hint_for=peer_id), False))
        if local_hints:
            await view.store.merge_many([(op.key, op) for _, op in local_hints], [t for t, _ in local_hints])
        for fb, fb_items in retry.items():
            view.background.start_soon(self._deliver, ring, fb, fb_items, reqs, on_result)

    # ---- reads --------------------------------------------------------------------------

    async def read_many(self, reqs: Sequence[ReadReq], deadline: float) -> list[ReadResult | KvError]:
        view = self.view
        ring = view.ring()
        replies: list[dict[str, list[Sibling]]] = [{} for _ in reqs]
        needed = [r.r for r in reqs]
        # Ask R live replicas (this node first: its read is free); with read_repair_chance, or
        # when one of them fails, the rest too. Asking all N for every read costs a third more
        # replica RPCs at R=2, N=3, for repairs anti-entropy makes anyway.
        first: dict[str, list[int]] = {}
        spare: dict[str, list[int]] = {}
        local_items: list[int] = []
        outstanding = [0] * len(reqs)
        spares_left = [0] * len(reqs)
        is_up = _liveness(view)
        for i, req in enumerate(reqs):
            pref = ring.replicas_of(req.key, req.n)
            live = [t for t in pref if t == view.node_id or is_up(t)]
            live.sort(key=lambda t: t != view.node_id)
            everyone = view.rng.random() < view.config.read_repair_chance
            cut = len(live) if everyone else needed[i]
            for t in live[:cut]:
                if t == view.node_id:
                    local_items.append(i)
                else:
                    first.setdefault(t, []).append(i)
            for t in live[cut:]:
                spare.setdefault(t, []).append(i)
            outstanding[i] = min(cut, len(live))
            spares_left[i] = max(len(live) - cut, 0)
        errors: list[KvError | None] = [None] * len(reqs)
        all_done = trio.Event()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("read of %d keys: %d here, replicas %s", len(reqs), len(local_items),
                      ",".join(f"{p}:{len(it)}" for p, it in first.items()) or "-")

        # An item is settled once it has R replies or nobody is left to ask; settled stays
        # settled, so a count of the unsettled ones is kept (rechecking every item on every
        # reply made a batch quadratic in its size).
        settled = [False] * len(reqs)
        unsettled = len(reqs)

        def check(i: int) -> None:
            nonlocal unsettled
            if not settled[i] and (len(replies[i]) >= needed[i] or (outstanding[i] <= 0 and spares_left[i] <= 0)):
                settled[i] = True
                unsettled -= 1
            if unsettled == 0:
                all_done.set()

        def settle() -> None:
            for i in range(len(reqs)):
                check(i)
            if unsettled == 0:
                all_done.set()

        def record(i: int, node: str, sibs: list[Sibling] | None, err: KvError | None = None) -> None:
            outstanding[i] -= 1
            if sibs is not None:
                replies[i][node] = sibs
            elif err is not None and errors[i] is None:
                errors[i] = err
            check(i)

        # this node's records, as stored and decoded: a replica answering the same bytes (the
        # usual case) needs no decoding, no merge and no clock update
        local_raw: dict[int, bytes | None] = {}
        local_sibs: dict[int, list[Sibling]] = {}

        async def ask(peer_id: str, items: list[int]) -> None:
            ops = [ReadOp(reqs[i].key) for i in items]
            try:
                res = await view.peer(peer_id).replicate(ops, view.config.replica_timeout_s)
            except KvError:
                res = [(14, None)] * len(items)
            newest = 0  # the reply's newest timestamp: this node's later writes order after it
            for i, (code, payload) in zip(items, res):
                if code != 0:
                    record(i, peer_id, None, error_from(code, f"replica {peer_id}: {payload}"))
                    continue
                if i in local_sibs and payload == local_raw[i]:
                    record(i, peer_id, local_sibs[i])
                    continue
                try:
                    sibs = siblings_from_reply(payload)
                except (ValueError, TypeError) as exc:
                    bad = DataLoss if isinstance(payload, bytes) else Unavailable
                    record(i, peer_id, None, bad(f"replica {peer_id}: key {reqs[i].key[:64]!r}: bad reply: {exc}"))
                    continue
                newest = max(newest, max((s.hlc for s in sibs), default=0))
                record(i, peer_id, sibs)
            if newest:
                view.clock.observe(newest, view.now_ms())

        async def gather() -> None:
            async with trio.open_nursery() as nursery:
                for peer_id, items in first.items():
                    nursery.start_soon(ask, peer_id, items)
                if local_items:
                    keys = [reqs[i].key for i in local_items]
                    raw = await view.store.read_raw_many(keys)
                    for i, r, sibs in zip(local_items, raw, decode_records(keys, raw)):
                        if isinstance(sibs, KvError):  # e.g. a corrupt record: others may answer
                            record(i, view.node_id, None, sibs)
                        else:
                            local_raw[i], local_sibs[i] = r, sibs
                            record(i, view.node_id, sibs)
            # replicas that failed or were short: ask the spares of the items still lacking replies
            second: dict[str, list[int]] = {}
            for peer_id, items in spare.items():
                for i in items:
                    if len(replies[i]) < needed[i]:
                        second.setdefault(peer_id, []).append(i)
                        outstanding[i] += 1
            for peer_id, items in spare.items():
                for i in items:
                    spares_left[i] -= 1
            settle()
            if second:
                async with trio.open_nursery() as nursery:
                    for peer_id, items in second.items():
                        nursery.start_soon(ask, peer_id, items)
            # every replica asked answered or failed: repair the stale ones
            if view.config.read_repair:
                await self.repair(reqs, replies)

        settle()
        view.background.start_soon(gather)
        with trio.move_on_at(deadline):
            await all_done.wait()
        out: list[ReadResult | KvError] = []
        for i, req in enumerate(reqs):
            got = dict(replies[i])
            if len(got) < needed[i]:
                err = errors[i]
                if err is not None and not err.retryable and len(got) == 0:
                    out.append(err)
                else:
                    out.append(Unavailable(
                        f"r: got {len(got)} of {needed[i]} replies needed "
                        f"(answered: {', '.join(sorted(got)) or 'none'})"
                    ))
                continue
            # replicas that agree hold the same versions in merge's canonical order already
            merged = next(iter(got.values())) if _same_dots(got.values()) else versions.merge(*got.values())
            out.append(ReadResult(merged, versions.context_of(merged)))
        return out

    async def repair(self, reqs: Sequence[ReadReq], replies: list[dict[str, list[Sibling]]]) -> None:
        view = self.view
        per_peer: dict[str, list[WriteOp]] = {}
        local: list[tuple[bytes, list[Sibling]]] = []
        for req, got in zip(reqs, replies):
            if not got or _same_dots(got.values()):
                continue  # the usual case: every replica asked holds the same versions
            merged = versions.merge(*got.values())
            dots = {s.dot for s in merged}
            for node, sibs in got.items():
                if {s.dot for s in sibs} != dots:
                    if node == view.node_id:
                        local.append((req.key, merged))
                    else:
                        per_peer.setdefault(node, []).append(WriteOp(req.key, merged))
        self.repairs += len(local) + sum(map(len, per_peer.values()))
        if local:
            await view.store.merge_many(local)
        for node, ops in per_peer.items():
            try:
                await view.peer(node).replicate(ops, view.config.replica_timeout_s)
            except KvError as exc:
                log.debug("read repair of %d keys on %s failed: %s", len(ops), node, exc)

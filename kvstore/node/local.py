"""One node's replica store: versioned records on a storage engine.

Stamping (a coordinator's new write) and merging (a replica receiving siblings) both run as pure
updaters inside the engine's serial writer, so a read-stamp-store is atomic without locks and
concurrent writes share one transaction. Values pass through a `Sealer` (encryption at rest) on
their way in and out.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Awaitable, Callable, Protocol, Sequence

from kvstore.core import versions
from kvstore.core.limits import Limits
from kvstore.core.records import decode_record, digest, encode_record, value_aad
from kvstore.core.versions import Sibling, VersionVector
from kvstore.core.wire import RecordOp
from kvstore.errors import InvalidArgument, KvError, StaleContext
from kvstore.storage.base import Engine, UpdateResult

log = logging.getLogger(__name__)


@dataclass
class Stamp:
    """A coordinator write to stamp locally."""

    key: bytes
    value: bytes | None      # None = delete (tombstone)
    context: VersionVector
    hlc: int
    expires_at_ms: int = 0
    conditional: bool = False
    # No context was supplied (the caller never read): the write supersedes what this coordinator
    # holds, so repeated blind puts do not pile up siblings. Writes concurrent across coordinators,
    # and writes made with stale contexts, still become siblings.
    blind: bool = False


@dataclass
class Stamped:
    new: Sibling               # the write itself
    siblings: list[Sibling]    # the merged set now stored
    record: bytes              # ... as stored (encoded): what replicas are sent (wire.RecordOp)
    base: bytes                # records.digest of the record it replaced


class Sealer(Protocol):
    """Encryption at rest (kvstore.kms.Sealer or NullSealer)."""

    def seal(self, plaintext: bytes, aad: bytes) -> bytes: ...
    def open(self, envelope: bytes, aad: bytes, key_for_errors: bytes | None = None) -> bytes: ...


def decode_records(keys: Sequence[bytes], raw: Sequence[bytes | None]) -> list[list[Sibling] | KvError]:
    """Siblings per stored record (none for None); a corrupt record yields DataLoss in its slot."""
    out: list[list[Sibling] | KvError] = []
    for k, r in zip(keys, raw):
        try:
            out.append(decode_record(r, k) if r else [])
        except KvError as exc:
            out.append(exc)
    return out


class LocalStore:
    def __init__(self, engine: Engine, node_id: str, limits: Limits, sealer: Sealer,
                 drop_writes: bool = False) -> None:
        self.drop_writes = drop_writes  # test-only broken node: pretend to store, store nothing
        self.members: "Callable[[], set[str]] | None" = None  # current members, for clock pruning
        # told the newest HLC of every sibling that arrives here, so this node's own later writes
        # order after them (the node's HybridClock.observe)
        self.observe_hlc: "Callable[[int], object] | None" = None
        self.engine = engine
        self.node_id = node_id
        # lowest counter a new stamp may take: raised past the dots of a failed commit
        self._counter_floor = 0
        self.limits = limits
        self.sealer = sealer

    def open_value(self, key: bytes, sibling: Sibling) -> bytes:
        """The plaintext of a sibling's sealed value (DataLoss / PermissionDenied on failure)."""
        assert sibling.value is not None
        return self.sealer.open(sibling.value, value_aad(key, sibling.node, sibling.counter), key)

    async def stamp_many(
        self, stamps: Sequence[Stamp], now_ms: int
    ) -> tuple[list[Stamped | BaseException], Callable[[], Awaitable[None]]]:
        """Stamp writes as this coordinator. Returns as soon as they are stamped, with a function
        that waits for their commit here (raising if it failed): the caller can ship the stamped
        versions to replicas meanwhile. The commit is then one acknowledgement among the others."""
        made: dict[int, Stamped] = {}
        results, commit = await self.engine.update_many_early(self._stampers(stamps, now_ms, made))

        async def committed() -> None:
            try:
                await commit()
            except BaseException:
                self._burn_dots(made)
                raise

        return [r if isinstance(r, BaseException) else made[i] for i, r in enumerate(results)], committed

    def stamp_many_nowait(self, stamps: Sequence[Stamp], now_ms: int,
                          stamped: Callable[[list[Stamped | BaseException]], None],
                          committed: Callable[[BaseException | None], None]) -> bool:
        """stamp_many for a caller that is not on trio (kvstore/node/express.py): queued at once;
        on the writer thread, `stamped` gets the results before the commit and `committed` the
        commit's outcome (None: stored). False, with nothing queued, when the engine takes work
        only from trio."""
        submit = getattr(self.engine, "update_many_early_nowait", None)
        if submit is None:
            return False
        made: dict[int, Stamped] = {}

        def applied(results: list[UpdateResult]) -> None:
            stamped([r if isinstance(r, BaseException) else made[i] for i, r in enumerate(results)])

        def done(outcome: list[UpdateResult] | BaseException) -> None:
            if isinstance(outcome, BaseException):
                self._burn_dots(made)
                committed(outcome)
            else:
                committed(None)

        submit(self._stampers(stamps, now_ms, made), applied, done)
        return True

    def raise_counter_floor(self, floor: int) -> None:
        """Every later write's counter is at least `floor` (a restart's saved clock lease)."""
        self._counter_floor = max(self._counter_floor, floor)

    def _burn_dots(self, made: dict[int, Stamped]) -> None:
        """After a failed commit: nothing was stored, but the dots may have reached replicas, and a
        later write must never reuse one (it would be taken for this write and dropped as a
        duplicate)."""
        top = max((m.new.counter for m in made.values()), default=0)
        self._counter_floor = max(self._counter_floor, top + 1)

    def _stampers(self, stamps: Sequence[Stamp], now_ms: int,
                  made: dict[int, Stamped]) -> list[tuple[bytes, Callable[[bytes | None], bytes | None]]]:
        """The writer's updater per stamp; each puts its Stamped in `made` under its index."""
        floor = max(now_ms, self._counter_floor)
        me = self.node_id

        def updater(i: int, st: Stamp):
            def apply(old: bytes | None) -> bytes | None:
                local = decode_record(old, st.key) if old else []
                if st.conditional and not versions.is_current(local, st.context, now_ms):
                    raise StaleContext(
                        f"key {st.key[:64]!r}: the context is no longer current "
                        "(the value changed since it was read)"
                    )
                context = versions.context_of(local) if st.blind else st.context
                if self.members is not None and len(context) > self.limits.max_vv_entries:
                    # (the member set is built only when a vector is long enough to prune)
                    context = versions.prune(context, self.members(), self.limits.max_vv_entries)
                # versions.stamp, with the value sealed once its dot (part of the AAD) is known and
                # before the sibling is built: one sibling made instead of two, and no search for it
                counter = versions.next_counter(local, me, context, floor)
                value = st.value
                if value is not None:
                    value = self.sealer.seal(value, value_aad(st.key, me, counter))
                new = Sibling(me, counter, dict(context), value, st.hlc, st.expires_at_ms)
                merged = versions.merge(local, [new])
                self._check_siblings(st.key, merged)
                record = encode_record(merged)
                made[i] = Stamped(new, merged, record, digest(old))
                return old if self.drop_writes else record

            return apply

        return [(st.key, updater(i, st)) for i, st in enumerate(stamps)]

    async def merge_many(
        self, items: Sequence[tuple[bytes, list[Sibling] | RecordOp]], hint_for: Sequence[str] | None = None
    ) -> list[BaseException | None]:
        """Merge incoming siblings into stored records (or into hints held for `hint_for[i]`).
        Per item: None once stored, or the exception that failed it. (The merged record is not
        decoded back: no caller needs it, and on a replica that was a decode per replicated op.)
        A RecordOp whose base is the stored record's digest replaces it as it is: its siblings
        are those plus the write, so merging would give the same set (and cost a decode of each,
        a merge and an encode per replicated op)."""

        updater = self._merger
        if self.observe_hlc is not None:
            newest = max((inc.hlc if isinstance(inc, RecordOp) else max((s.hlc for s in inc), default=0)
                          for _, inc in items), default=0)
            if newest:
                self.observe_hlc(newest)
        data_items = [(i, k, s) for i, (k, s) in enumerate(items) if not (hint_for and hint_for[i])]
        hint_items = [(i, k, s) for i, (k, s) in enumerate(items) if hint_for and hint_for[i]]
        out: list[BaseException | None] = [None] * len(items)
        if data_items:
            res = await self.engine.update_many([(k, updater(k, s)) for _, k, s in data_items])
            for (i, _, _), r in zip(data_items, res):
                if isinstance(r, BaseException):
                    out[i] = r
        if hint_items:
            assert hint_for is not None
            res = await self.engine.hint_update_many(
                [(hint_for[i], k, updater(k, s)) for i, k, s in hint_items]
            )
            for (i, _, _), r in zip(hint_items, res):
                if isinstance(r, BaseException):
                    out[i] = r
        return out

    def _merger(self, key: bytes, incoming: list[Sibling] | RecordOp) -> Callable[[bytes | None], bytes | None]:
        """The updater that merges `incoming` into the record stored under `key` (see merge_many)."""

        def apply(old: bytes | None) -> bytes | None:
            if isinstance(incoming, RecordOp):
                if digest(old) == incoming.base:
                    return old if self.drop_writes else incoming.record
                try:
                    sent = decode_record(incoming.record, key)
                except KvError as exc:
                    raise InvalidArgument(f"replica op for key {key[:64]!r}: {exc}") from None
            else:
                sent = incoming
            local = decode_record(old, key) if old else []
            merged = versions.merge(local, sent)
            if old is not None and [s.dot for s in merged] == [s.dot for s in local]:
                return old  # nothing new: keep the bytes as they are
            if len(merged) >= self.limits.warn_siblings:
                # a replica never refuses what a coordinator accepted: that would diverge
                log.warning("key %r has %d siblings", key[:64], len(merged))
            return old if self.drop_writes else encode_record(merged)

        return apply

    # -- from another thread (the transport loop's replica path, kvstore/node/fastpath.py) --

    def merge_records_nowait(self, ops: Sequence[RecordOp],
                             done: Callable[[list[BaseException | None] | BaseException], None]) -> bool:
        """merge_many of records (no hints) for a caller that is not on trio: queued at once, and
        `done` called on the storage thread once committed, with a result per op (None: stored)
        or the error of the whole transaction. The caller tells the clock (`observe_hlc`) on
        trio. False, with nothing queued, when the engine takes work only from trio."""
        submit = getattr(self.engine, "update_many_nowait", None)
        if submit is None:
            return False

        def finished(results: list[UpdateResult] | BaseException) -> None:
            done(results if isinstance(results, BaseException)
                 else [r if isinstance(r, BaseException) else None for r in results])

        submit([(op.key, self._merger(op.key, op)) for op in ops], finished)
        return True

    def read_raw_nowait(self, keys: Sequence[bytes],
                        done: Callable[[list[bytes | None] | BaseException], None]) -> bool:
        """read_raw_many for a caller that is not on trio; like merge_records_nowait."""
        submit = getattr(self.engine, "get_many_nowait", None)
        if submit is None:
            return False
        submit(keys, done)
        return True

    async def purge_many(self, items: Sequence[tuple[bytes, frozenset[tuple[str, int]]]]) -> int:
        """Delete records that are exactly the given tombstones (anything else is left alone)."""
        purged = [False] * len(items)

        def updater(i: int, key: bytes, dots: frozenset[tuple[str, int]]):
            def apply(old: bytes | None) -> bytes | None:
                if old is None:
                    return None
                local = decode_record(old, key)
                if all(s.tombstone for s in local) and {s.dot for s in local} == dots:
                    purged[i] = True
                    return None
                return old

            return apply

        await self.engine.update_many([(k, updater(i, k, d)) for i, (k, d) in enumerate(items)])
        return sum(purged)

    async def read_raw_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """The stored records' bytes, undecoded (None where there is none)."""
        return await self.engine.get_many(keys)

    async def read_many(self, keys: Sequence[bytes]) -> list[list[Sibling] | KvError]:
        """Stored siblings per key; a corrupt record yields DataLoss in its slot only."""
        return decode_records(keys, await self.engine.get_many(keys))

    def _check_siblings(self, key: bytes, merged: list[Sibling]) -> None:
        self.limits.check_siblings(len(merged), key)
        if len(merged) >= self.limits.warn_siblings:
            log.warning("key %r has %d siblings (limit %d)", key[:64], len(merged), self.limits.max_siblings)

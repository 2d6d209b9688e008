"""The in-memory engine (tests, `--storage memory`) and the pieces every engine shares.

`apply_updates` is the one definition of updater semantics (in order, composing, failing per item);
the sqlite engine runs the same function inside its writer thread, so both engines agree by
construction. Nothing here survives the process.
"""
from __future__ import annotations

import bisect
import dataclasses
import threading
from collections import Counter
from typing import Awaitable, Callable, Hashable, Sequence, TypeVar

import trio

from kvstore.core.listing import prefix_end
from kvstore.storage.base import Updater, UpdateResult

K = TypeVar("K", bound=Hashable)


@dataclasses.dataclass
class EngineStats:
    """Counters for tests and benchmarks, written by the engine's writer: read, don't set."""

    #: update_many / hint_update_many / delete_hints_if_unchanged calls accepted.
    calls: int = 0
    #: Individual updates applied (including ones whose updater raised).
    updates: int = 0
    #: Committed transactions. With group commit this is below `calls` under concurrency.
    transactions: int = 0
    #: Transactions that failed as a whole (every call in them got the error).
    failed_transactions: int = 0
    #: Background WAL checkpoints run (sqlite only).
    checkpoints: int = 0
    #: Explicit fsyncs of the WAL file under FsyncPolicy.BATCH (sqlite only).
    wal_fsyncs: int = 0
    #: RESTART checkpoints run because the WAL passed `wal_restart_bytes` (sqlite only).
    wal_restarts: int = 0


async def already_committed() -> None:
    """The commit function of an update_many_early with nothing left to wait for (the memory
    engine commits as it applies; sqlite with no updates)."""


def apply_updates(
    ops: Sequence[tuple[K, Updater]],
    staged: dict[K, bytes | None],
    load: Callable[[K], bytes | None],
) -> list[UpdateResult]:
    """Run updaters in order; each sees what the previous ones left for its key.

    `staged` holds records already changed in this transaction (it is updated in place; None means
    deleted); `load` gives the committed record of a key not staged yet. An updater that raises, or
    returns something other than bytes/None, fails only its own item: its exception is the result
    and the record is left as it was.
    """
    results: list[UpdateResult] = []
    for key, updater in ops:
        old = staged[key] if key in staged else load(key)
        try:
            new = updater(old)
            if new is not None and not isinstance(new, bytes):
                if not isinstance(new, (bytearray, memoryview)):
                    raise TypeError(
                        f"updater returned {type(new).__name__}; expected bytes or None"
                    )
                new = bytes(new)
        except Exception as exc:  # noqa: BLE001 - the caller gets it back in this item's slot
            results.append(exc)
            continue
        staged[key] = new
        results.append(new)
    return results


def unchanged_deleter(expected: bytes, deleted: list[bool]) -> Updater:
    """Updater for delete_hints_if_unchanged: delete only if the record is still `expected`."""

    def update(current: bytes | None) -> bytes | None:
        if current is not None and current == expected:
            deleted.append(True)
            return None
        return current

    return update


def check_limit(limit: int) -> None:
    # SQL treats a negative LIMIT as "no limit"; refuse it so both engines agree.
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")


class MemoryEngine:
    """Engine protocol over plain dicts; every call is one 'transaction', atomic under a lock: the
    `*_nowait` methods run on the caller's thread (the transport loop's paths), the rest on trio."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._data: dict[bytes, bytes] = {}
        self._hints: dict[tuple[str, bytes], bytes] = {}
        # Sorted keys for scan, rebuilt only when the key set changes (not on overwrite), so paging
        # through a large store is not quadratic.
        self._sorted_keys: list[bytes] | None = None
        self._closed = False
        self.stats = EngineStats()

    async def _enter(self) -> None:
        await trio.lowlevel.checkpoint()
        self._check_open()

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("storage engine is closed")

    def _commit(self, table: dict[K, bytes], staged: dict[K, bytes | None]) -> bool:
        """Apply staged records; return True when the set of keys changed."""
        keys_changed = False
        for key, record in staged.items():
            if record is None:
                keys_changed |= table.pop(key, None) is not None
            else:
                keys_changed |= key not in table
                table[key] = record
        self.stats.transactions += 1
        return keys_changed

    def _update(
        self, table: dict[K, bytes], ops: Sequence[tuple[K, Updater]]
    ) -> list[UpdateResult]:
        if not ops:
            return []
        staged: dict[K, bytes | None] = {}
        with self._lock:
            results = apply_updates(ops, staged, table.get)
            self.stats.calls += 1
            self.stats.updates += len(ops)
            if self._commit(table, staged) and table is self._data:
                self._sorted_keys = None
        return results

    def _get(self, keys: Sequence[bytes]) -> list[bytes | None]:
        with self._lock:
            return [self._data.get(bytes(key)) for key in keys]

    async def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        await self._enter()
        return self._get(keys)

    # -- any thread (see kvstore/storage/sqlite.py): applied at once on the caller's thread --

    def update_many_nowait(self, updates: Sequence[tuple[bytes, Updater]],
                           done: Callable[[list[UpdateResult] | BaseException], None]) -> None:
        self._check_open()
        done(self._update(self._data, [(bytes(key), updater) for key, updater in updates]))

    def update_many_early_nowait(self, updates: Sequence[tuple[bytes, Updater]],
                                 applied: Callable[[list[UpdateResult]], None],
                                 done: Callable[[list[UpdateResult] | BaseException], None]) -> None:
        self._check_open()
        results = self._update(self._data, [(bytes(key), updater) for key, updater in updates])
        applied(results)
        done(results)

    def get_many_nowait(self, keys: Sequence[bytes],
                        done: Callable[[list[bytes | None] | BaseException], None]) -> None:
        self._check_open()
        done(self._get(keys))

    async def update_many(self, updates: Sequence[tuple[bytes, Updater]]) -> list[UpdateResult]:
        await self._enter()
        return self._update(self._data, [(bytes(key), updater) for key, updater in updates])

    async def update_many_early(
        self, updates: Sequence[tuple[bytes, Updater]]
    ) -> tuple[list[UpdateResult], Callable[[], Awaitable[None]]]:
        return await self.update_many(updates), already_committed

    async def scan(self, after: bytes | None, limit: int, prefix: bytes = b"") -> list[tuple[bytes, bytes]]:
        await self._enter()
        check_limit(limit)
        with self._lock:
            if self._sorted_keys is None:
                self._sorted_keys = sorted(self._data)
            keys = self._sorted_keys
            start = 0 if after is None else bisect.bisect_right(keys, bytes(after))
            if prefix:
                start = max(start, bisect.bisect_left(keys, bytes(prefix)))
                end = prefix_end(prefix)
                stop = len(keys) if end is None else bisect.bisect_left(keys, end)
            else:
                stop = len(keys)
            return [(key, self._data[key]) for key in keys[start : min(stop, start + limit)]]

    async def count(self) -> int:
        await self._enter()
        return len(self._data)

    async def hint_update_many(
        self, updates: Sequence[tuple[str, bytes, Updater]]
    ) -> list[UpdateResult]:
        await self._enter()
        ops = [((target, bytes(key)), updater) for target, key, updater in updates]
        return self._update(self._hints, ops)

    async def hints_for(self, target: str, limit: int) -> list[tuple[bytes, bytes]]:
        await self._enter()
        check_limit(limit)
        with self._lock:
            keys = sorted(key for (owner, key) in self._hints if owner == target)[:limit]
            return [(key, self._hints[(target, key)]) for key in keys]

    async def hint_counts(self) -> dict[str, int]:
        await self._enter()
        with self._lock:
            return dict(Counter(target for target, _ in self._hints))

    async def delete_hints_if_unchanged(
        self, target: str, items: Sequence[tuple[bytes, bytes]]
    ) -> int:
        await self._enter()
        deleted: list[bool] = []
        ops = [((target, bytes(key)), unchanged_deleter(record, deleted)) for key, record in items]
        self._update(self._hints, ops)
        return len(deleted)

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()
        self._closed = True

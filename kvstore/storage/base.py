"""The storage engine protocol every engine implements (sqlite for durability, memory for tests).

Engines store opaque record bytes (msgpack records built by kvstore/core/records.py) in two tables:
`data` (key -> record) and `hints` ((target node id, key) -> record held for a down replica).
Read-modify-write goes through pure updater functions that the engine applies in one serial writer,
so a coordinator can stamp versions atomically without locks, and concurrent writes share one
transaction (group commit).
"""
from __future__ import annotations

import enum
from typing import Awaitable, Callable, Protocol, Sequence

#: A pure function from the current record (None when absent) to the new record (None deletes it).
#: It runs inside the engine's writer (possibly in a worker thread): it must not touch trio state.
#: Raising an exception fails that one update; the others in the transaction still commit.
Updater = Callable[[bytes | None], bytes | None]

#: Result of one update: the record now stored (None if absent/deleted) or the exception it raised.
UpdateResult = bytes | None | BaseException


class FsyncPolicy(enum.Enum):
    """What a commit waits for, and what a power failure (not a process crash) can lose.

    kill -9 never loses an acknowledged write under any policy: a commit has reached the OS (WAL
    written) before the write is acknowledged.
    """

    ALWAYS = "always"  # fsync the WAL on every commit: power failure loses nothing acknowledged
    BATCH = "batch"    # fsync the WAL every fsync_interval_s: power failure loses up to that window
    NEVER = "never"    # leave flushing to the OS: power failure may lose recent commits


class Engine(Protocol):
    async def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """Current records of `keys`, in order (None for absent keys)."""

    async def update_many(self, updates: Sequence[tuple[bytes, Updater]]) -> list[UpdateResult]:
        """Apply updaters in order (several to one key compose), commit once, return results."""

    async def update_many_early(
        self, updates: Sequence[tuple[bytes, Updater]]
    ) -> tuple[list[UpdateResult], Callable[[], Awaitable[None]]]:
        """update_many that returns once the updaters have run, before the commit, with a function
        that waits for the commit (raising its error: then none of these updates is stored). A
        coordinator ships its stamped versions to replicas while its own transaction commits."""

    async def scan(self, after: bytes | None, limit: int, prefix: bytes = b"") -> list[tuple[bytes, bytes]]:
        """Up to `limit` (key, record) pairs with key > `after` (all keys when None) and starting
        with `prefix`, in key order."""

    async def count(self) -> int:
        """Number of keys in the data table."""

    async def hint_update_many(
        self, updates: Sequence[tuple[str, bytes, Updater]]
    ) -> list[UpdateResult]:
        """Like update_many on the hints table, addressed by (target node id, key)."""

    async def hints_for(self, target: str, limit: int) -> list[tuple[bytes, bytes]]:
        """Up to `limit` (key, record) hints held for `target`, in key order."""

    async def hint_counts(self) -> dict[str, int]:
        """Number of hints held per target node id."""

    async def delete_hints_if_unchanged(
        self, target: str, items: Sequence[tuple[bytes, bytes]]
    ) -> int:
        """Delete each (key, record) hint for `target` only if its record is still exactly that
        (a hint updated meanwhile survives to be replayed again). Returns how many were deleted."""

    async def aclose(self) -> None:
        """Finish pending writes, checkpoint, close. Idempotent."""

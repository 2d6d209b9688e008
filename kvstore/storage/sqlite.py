"""The durable engine: one sqlite3 database in WAL mode, driven from trio by engine-owned threads.

Threads (all started by `SqliteEngine.open`, all joined by `aclose`):

- writer: the only connection that writes. It takes every write request queued while it was busy,
  applies them in order in ONE transaction (group commit) and commits once.
- readers: read connections (WAL lets them run beside the writer); each drains the queued reads
  and runs them in one read transaction.
- maintenance: its own connection runs PASSIVE WAL checkpoints every `checkpoint_interval_s`, so a
  checkpoint never runs inside a commit, and, under FsyncPolicy.BATCH, fsyncs the WAL file. Under
  steady writes a PASSIVE checkpoint never catches up with the writer, so sqlite never starts the
  WAL over and the file grows without bound; once it passes `wal_restart_bytes` the thread runs one
  RESTART checkpoint (it waits for the writer's current commit, copies the few frames the PASSIVE
  one left, and lets the next commit start the WAL over, truncated to JOURNAL_SIZE_LIMIT_BYTES).

Tables are rowid tables with a unique key index (format 2). Format 1 used WITHOUT ROWID tables,
where a record over ~1 KB (a 1 KiB value once sealed) does not fit a 4 KiB page's cell and every
record took an overflow page: 3.4x the disk and twice the write cost. A format 1 database is
migrated on open (one transaction, then VACUUM); see `_migrate_v1`. Writes are UPSERTs (ON
CONFLICT DO UPDATE), which keep the rowid and leave the key index untouched when a key exists.

A trio caller puts its request on a queue (never blocks) and waits on a trio.Event; the thread wakes
every request of a batch with one `TrioToken.run_sync_soon`: threads are crossed once per batch.
A cancelled caller stops waiting, but a write it submitted still commits (outcome unknown to it).

What each FsyncPolicy loses. kill -9 of the process loses nothing acknowledged under any policy:
a request is acknowledged only after COMMIT has written its WAL frames to the OS.

- ALWAYS (`synchronous=FULL`): every commit fsyncs the WAL; power failure loses nothing
  acknowledged.
- BATCH (`synchronous=NORMAL`): the WAL is fsynced every `fsync_interval_s`; power failure loses at
  most the writes acknowledged in that window. The database stays consistent (checkpoints fsync).
- NEVER (`synchronous=OFF`): nothing is fsynced, not even checkpoints; power failure may lose any
  recent writes (typically up to ~30 s of Linux dirty-page writeback) and can corrupt the database.
  For tests and throwaway clusters.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import queue
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence

import trio

from kvstore.core.listing import prefix_end
from kvstore.errors import Internal
from kvstore.storage.base import FsyncPolicy, Updater, UpdateResult
from kvstore.storage.memory import EngineStats, already_committed, apply_updates, check_limit, unchanged_deleter

#: Version of the table layout, stored in `meta`. Bump it (and add a migration) on any change.
FORMAT_VERSION = 2
#: Older format versions `open` migrates in place.
MIGRATES_FROM = (1,)
#: Bind parameters per IN (...) query; old sqlite builds allow at most 999 variables.
QUERY_CHUNK = 500
#: A group commit stops taking requests after this many updates, bounding one transaction's time.
MAX_BATCH_UPDATES = 4096
#: Queued reads one reader takes at once, so the other readers get a share of a burst.
MAX_READ_BATCH = 256
#: Sqlite truncates the WAL file to this size when it restarts it, so disk use stays bounded.
JOURNAL_SIZE_LIMIT_BYTES = 64 * 1024 * 1024
#: WAL size past which the maintenance thread runs a RESTART checkpoint (see the module docstring).
WAL_RESTART_BYTES = 2 * JOURNAL_SIZE_LIMIT_BYTES
#: Bytes of records (keys included) the writer keeps in memory: see _RecordCache.
RECORD_CACHE_BYTES = 32 * 1024 * 1024

_SYNCHRONOUS = {FsyncPolicy.ALWAYS: "FULL", FsyncPolicy.BATCH: "NORMAL", FsyncPolicy.NEVER: "OFF"}
_DATA_TABLE = "CREATE TABLE {name} (key BLOB PRIMARY KEY, record BLOB NOT NULL)"
_HINTS_TABLE = (
    "CREATE TABLE {name} (target TEXT NOT NULL, key BLOB NOT NULL, record BLOB NOT NULL,"
    " PRIMARY KEY (target, key))"
)
_SCHEMA = (
    "CREATE TABLE meta (name TEXT PRIMARY KEY, value) WITHOUT ROWID",
    _DATA_TABLE.format(name="data"),
    _HINTS_TABLE.format(name="hints"),
)
log = logging.getLogger(__name__)

_CLOSE = object()  # queue sentinel: finish what is ahead of it, then exit

#: Address of a record: (None, key) in `data`, (target node id, key) in `hints`.
_Slot = tuple[str | None, bytes]


class StorageFormatError(Exception):
    """The database file is not one this version of kvstore can open (the message says why).
    The operator must act: upgrade kvstore, or point the node at the right data directory."""


@dataclasses.dataclass(frozen=True)
class SqliteSettings:
    fsync: FsyncPolicy = FsyncPolicy.ALWAYS
    #: Under BATCH, the window of acknowledged writes a power failure can lose.
    fsync_interval_s: float = 0.05
    #: How often the WAL is copied into the database; longer means a larger WAL and slower reopen.
    checkpoint_interval_s: float = 1.0
    #: Read connections; reads of one connection run one after another.
    reader_threads: int = 2
    #: WAL size that triggers a RESTART checkpoint, bounding the WAL file under steady writes.
    wal_restart_bytes: int = WAL_RESTART_BYTES
    #: The writer's copy of recently touched records (see _RecordCache); 0 turns it off.
    record_cache_bytes: int = RECORD_CACHE_BYTES

    def validate(self) -> None:
        if not isinstance(self.fsync, FsyncPolicy):
            raise ValueError(f"fsync must be a FsyncPolicy, got {self.fsync!r}")
        if not self.fsync_interval_s > 0:
            raise ValueError(f"fsync_interval_s must be > 0, got {self.fsync_interval_s}")
        if not self.checkpoint_interval_s > 0:
            raise ValueError(
                f"checkpoint_interval_s must be > 0, got {self.checkpoint_interval_s}"
            )
        if self.reader_threads < 1:
            raise ValueError(f"reader_threads must be >= 1, got {self.reader_threads}")
        if self.record_cache_bytes < 0:
            raise ValueError(f"record_cache_bytes must be >= 0, got {self.record_cache_bytes}")
        if self.wal_restart_bytes < 1:
            raise ValueError(f"wal_restart_bytes must be >= 1, got {self.wal_restart_bytes}")


class _Request:
    """One call crossing to a thread: `ops` for a write, `job` for a read. A trio caller waits on
    `done`; a caller on another thread (the `*_nowait` methods) gets `notify` called instead, on
    the engine's thread, once the request is finished."""

    __slots__ = ("ops", "job", "result", "error", "done", "applied", "applied_result", "notify", "on_applied")

    def __init__(self, ops: Sequence[tuple[_Slot, Updater]] = (), job: Callable | None = None,
                 early: bool = False, notify: "Callable[[_Request], None] | None" = None,
                 on_applied: Callable[[list[UpdateResult]], None] | None = None):
        self.ops = ops
        self.job = job
        self.result: Any = None
        self.error: BaseException | None = None
        self.notify = notify
        self.done = trio.Event() if notify is None else None
        # update_many_early: set once the updaters ran, before the commit
        self.applied: trio.Event | None = trio.Event() if early else None
        self.applied_result: Any = None
        self.on_applied = on_applied  # update_many_early_nowait's: called on the writer instead


def _set_all(requests: Sequence[_Request]) -> None:
    for request in requests:
        if request.applied is not None:
            request.applied.set()  # a transaction that failed before its updaters ran
        assert request.done is not None
        request.done.set()


def _take_batch(
    requests: queue.SimpleQueue, limit: int, weight: Callable[[_Request], int]
) -> tuple[list[_Request], bool]:
    """Block for one request, then take what else is queued, up to `limit` total weight.
    Returns the batch and whether the close sentinel was reached (nothing follows it)."""
    item = requests.get()
    batch: list[_Request] = []
    total = 0
    while item is not _CLOSE:
        batch.append(item)
        total += weight(item)
        if total >= limit:
            return batch, False
        try:
            item = requests.get_nowait()
        except queue.Empty:
            return batch, False
    return batch, True


def _chunks(items: list, size: int = QUERY_CHUNK):
    for start in range(0, len(items), size):
        yield items[start : start + size]


_UNKNOWN = object()  # _RecordCache.get: not held (None means held as absent)


class _RecordCache:
    """The writer thread's copy of the data records it last read or committed (None for a key
    known to be absent), so a write's read of the old record (every replica write and every
    coordinator stamp) is a dict lookup rather than a query. Touched by the writer thread only,
    and only with committed state: records read inside its write transaction (no other writer
    can run) and records after their COMMIT; a failed transaction empties it. Bounded by bytes of
    keys and records; when full it starts over (a uniform key space larger than the budget then
    hits at the budget's share, and costs a dict miss per key)."""

    ENTRY_OVERHEAD = 100  # bytes a dict entry and its objects cost beyond the key and record

    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self.records: dict[bytes, bytes | None] = {}
        self.size = 0

    def get(self, key: bytes) -> bytes | None | object:
        return self.records.get(key, _UNKNOWN)

    def put(self, key: bytes, record: bytes | None) -> None:
        if not self.budget:
            return
        old = self.records.get(key, _UNKNOWN)
        if old is not _UNKNOWN:
            self.size -= len(key) + len(old or b"") + self.ENTRY_OVERHEAD  # type: ignore[arg-type]
        self.size += len(key) + len(record or b"") + self.ENTRY_OVERHEAD
        self.records[key] = record
        if self.size > self.budget:
            self.clear()

    def clear(self) -> None:
        self.records.clear()
        self.size = 0


class SqliteEngine:
    """The Engine protocol on sqlite3. Create it with `await SqliteEngine.open(path)` inside the
    trio run that will use it; `stats` counts calls, transactions, checkpoints and WAL fsyncs."""

    def __init__(self, path: Path, settings: SqliteSettings, token: trio.lowlevel.TrioToken):
        self.path = path
        self.settings = settings
        self.stats = EngineStats()
        self._token = token
        self._writes: queue.SimpleQueue = queue.SimpleQueue()
        self._cache = _RecordCache(settings.record_cache_bytes)  # the writer thread's only
        self._reads: queue.SimpleQueue = queue.SimpleQueue()
        self._stop_maintenance = threading.Event()
        self._threads: list[tuple[threading.Thread, trio.Event]] = []
        self._closing = False
        # held by *_nowait callers (other threads) from their open check to their queue put, and
        # by aclose while it sets _closing: trio callers need no lock (they run on trio, as aclose)
        self._queueing = threading.Lock()
        self._closed = trio.Event()
        #: Set by a thread that failed outside a request (fsync, checkpoint); writes then refuse.
        self._failure: Exception | None = None

    @classmethod
    async def open(
        cls,
        path: Path,
        fsync: FsyncPolicy = FsyncPolicy.ALWAYS,
        fsync_interval_s: float = 0.05,
        checkpoint_interval_s: float = 1.0,
        wal_restart_bytes: int = WAL_RESTART_BYTES,
        record_cache_bytes: int = RECORD_CACHE_BYTES,
    ) -> SqliteEngine:
        settings = SqliteSettings(
            fsync, fsync_interval_s, checkpoint_interval_s, wal_restart_bytes=wal_restart_bytes,
            record_cache_bytes=record_cache_bytes,
        )
        settings.validate()
        engine = cls(Path(path), settings, trio.lowlevel.current_trio_token())
        init = _Request()
        engine._spawn("writer", engine._writer_main, init)
        with trio.CancelScope(shield=True):  # a half-opened engine would leak its writer thread
            await init.done.wait()
            if init.error is not None:
                await engine.aclose()
                raise init.error
        for number in range(settings.reader_threads):
            engine._spawn(f"reader-{number}", engine._reader_main)
        engine._spawn("maintenance", engine._maintenance_main)
        return engine

    # -- trio side ---------------------------------------------------------------------------------

    async def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        keys = [bytes(key) for key in keys]

        def job(conn: sqlite3.Connection) -> list[bytes | None]:
            found = _load_records(conn, None, keys)
            return [found.get(key) for key in keys]

        return await self._read(job)

    async def update_many(self, updates: Sequence[tuple[bytes, Updater]]) -> list[UpdateResult]:
        return await self._write([((None, bytes(key)), updater) for key, updater in updates])

    async def update_many_early(
        self, updates: Sequence[tuple[bytes, Updater]]
    ) -> tuple[list[UpdateResult], Callable[[], Awaitable[None]]]:
        self._check_open(writing=True)
        if not updates:
            await trio.lowlevel.checkpoint()
            return [], already_committed
        request = _Request(ops=[((None, bytes(key)), updater) for key, updater in updates], early=True)
        self._writes.put(request)
        assert request.applied is not None
        await request.applied.wait()  # also set by a failure before the updaters ran
        if request.applied_result is None:
            await request.done.wait()
            raise self._write_error(request)

        async def committed() -> None:
            await request.done.wait()
            if request.error is not None:
                raise self._write_error(request)

        return request.applied_result, committed

    # -- any thread: a caller that is not on trio (the transport loop's replica path) -------------

    def update_many_nowait(self, updates: Sequence[tuple[bytes, Updater]],
                           done: Callable[[list[UpdateResult] | BaseException], None]) -> None:
        """update_many for a caller on another thread: queues the updates and returns at once.
        `done` is called on the writer thread once they are committed, with their results, or
        with the error that failed the whole transaction (then none of them is stored). Raises
        at once if the engine is closed or has failed."""
        def notify(request: _Request) -> None:  # the request as an argument: a closure over it
            # would make a reference cycle, and with it each batch cyclic garbage (measured: young
            # collections of ~43,000 objects every 0.5 s, 18-39 ms each with the GIL held)
            done(self._write_error(request) if request.error is not None else request.result)

        request = _Request(ops=[((None, bytes(key)), updater) for key, updater in updates], notify=notify)
        with self._queueing:  # never behind the close sentinel, where nothing would answer it
            self._check_open(writing=True)
            self._writes.put(request)

    def update_many_early_nowait(self, updates: Sequence[tuple[bytes, Updater]],
                                 applied: Callable[[list[UpdateResult]], None],
                                 done: Callable[[list[UpdateResult] | BaseException], None]) -> None:
        """update_many_early for a caller on another thread: `applied` is called on the writer
        thread with the results once the updaters ran, before the commit (not at all when the
        transaction fails before that), then `done` as for update_many_nowait."""
        def notify(request: _Request) -> None:  # (not a closure over request: see update_many_nowait)
            done(self._write_error(request) if request.error is not None else request.result)

        request = _Request(ops=[((None, bytes(key)), updater) for key, updater in updates],
                           notify=notify, on_applied=applied)
        with self._queueing:
            self._check_open(writing=True)
            self._writes.put(request)

    def get_many_nowait(self, keys: Sequence[bytes],
                        done: Callable[[list[bytes | None] | BaseException], None]) -> None:
        """get_many for a caller on another thread: `done` is called on a reader thread with the
        records (None where there is none) or the error. Raises at once if the engine is closed."""
        wanted = [bytes(key) for key in keys]

        def job(conn: sqlite3.Connection) -> list[bytes | None]:
            found = _load_records(conn, None, wanted)
            return [found.get(key) for key in wanted]

        def notify(request: _Request) -> None:  # (not a closure over request: see update_many_nowait)
            done(request.error if request.error is not None else request.result)

        request = _Request(job=job, notify=notify)
        with self._queueing:
            self._check_open(writing=False)
            self._reads.put(request)

    async def scan(self, after: bytes | None, limit: int, prefix: bytes = b"") -> list[tuple[bytes, bytes]]:
        check_limit(limit)
        where, args = scan_bounds(after, prefix)
        sql = "SELECT key, record FROM data" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY key LIMIT ?"
        args.append(limit)
        return await self._read(lambda conn: conn.execute(sql, args).fetchall())

    async def count(self) -> int:
        # O(keys): sqlite keeps no row count, so this walks the table.
        sql = "SELECT count(*) FROM data"
        return await self._read(lambda conn: conn.execute(sql).fetchone()[0])

    async def hint_update_many(
        self, updates: Sequence[tuple[str, bytes, Updater]]
    ) -> list[UpdateResult]:
        return await self._write([((target, bytes(key)), up) for target, key, up in updates])

    async def hints_for(self, target: str, limit: int) -> list[tuple[bytes, bytes]]:
        check_limit(limit)
        sql = "SELECT key, record FROM hints WHERE target = ? ORDER BY key LIMIT ?"
        return await self._read(lambda conn: conn.execute(sql, (target, limit)).fetchall())

    async def hint_counts(self) -> dict[str, int]:
        sql = "SELECT target, count(*) FROM hints GROUP BY target"
        return await self._read(lambda conn: dict(conn.execute(sql).fetchall()))

    async def delete_hints_if_unchanged(
        self, target: str, items: Sequence[tuple[bytes, bytes]]
    ) -> int:
        deleted: list[bool] = []  # appended by the writer thread, read after the request is done
        await self._write(
            [((target, bytes(key)), unchanged_deleter(record, deleted)) for key, record in items]
        )
        return len(deleted)

    async def aclose(self) -> None:
        """Finish queued reads and writes, checkpoint (TRUNCATE), close, join every thread."""
        if self._closing:
            await self._closed.wait()
            return
        with self._queueing:  # a *_nowait caller on another thread has queued, or sees _closing
            self._closing = True
        # Shielded: an interrupted close would leak threads; every step below is short and bounded.
        with trio.CancelScope(shield=True):
            self._stop_maintenance.set()
            for _ in range(self.settings.reader_threads):
                self._reads.put(_CLOSE)
            writer, *others = self._threads
            for thread, exited in others:
                await exited.wait()
                thread.join()
            # The writer goes last: it drains queued writes, and its TRUNCATE checkpoint must not
            # wait for readers.
            self._writes.put(_CLOSE)
            await writer[1].wait()
            writer[0].join()
            self._closed.set()
        if self._failure is not None:
            raise Internal(f"storage engine {self.path} failed: {self._failure}") from self._failure

    def _check_open(self, writing: bool) -> None:
        if self._closing:
            raise trio.ClosedResourceError(f"storage engine {self.path} is closed")
        if writing and self._failure is not None:
            # Fail-stop: after a failed fsync the durability of earlier acks is unknown.
            raise Internal(f"storage engine {self.path} failed: {self._failure}") from self._failure

    async def _write(self, ops: list[tuple[_Slot, Updater]]) -> list[UpdateResult]:
        self._check_open(writing=True)
        if not ops:
            await trio.lowlevel.checkpoint()
            return []
        request = _Request(ops=ops)
        self._writes.put(request)
        await request.done.wait()
        if request.error is not None:
            raise self._write_error(request)
        return request.result

    def _write_error(self, request: _Request) -> Internal:
        # The whole group commit failed; each caller gets its own exception object.
        error = request.error
        exc = Internal(f"storage write to {self.path} failed: {error}")
        exc.__cause__ = error
        return exc

    async def _read(self, job: Callable[[sqlite3.Connection], Any]) -> Any:
        self._check_open(writing=False)
        request = _Request(job=job)
        self._reads.put(request)
        await request.done.wait()
        if request.error is not None:
            raise request.error
        return request.result

    # -- threads -----------------------------------------------------------------------------------

    def _spawn(self, role: str, target: Callable, *args: Any) -> None:
        exited = trio.Event()

        def main() -> None:
            try:
                target(*args)
            finally:
                self._wake(exited.set)

        thread = threading.Thread(target=main, name=f"kvstore-sqlite-{role}", daemon=True)
        thread.start()
        self._threads.append((thread, exited))

    def _finish(self, batch: list[_Request]) -> None:
        """On an engine thread: tell every caller of the batch it is done, trio callers with one
        wakeup of trio, callers of the `*_nowait` methods through their own `notify`."""
        waiting = [request for request in batch if request.notify is None]
        for request in batch:
            if request.notify is not None:
                self._call(request.notify, request)
        if waiting:
            self._wake(_set_all, waiting)

    @staticmethod
    def _call(fn: Callable, *args: Any) -> None:
        """A `*_nowait` caller's callback, on an engine thread: its failure must not stop it."""
        try:
            fn(*args)
        except Exception:  # noqa: BLE001
            log.exception("storage completion callback failed")

    def _wake(self, fn: Callable, *args: Any) -> None:
        try:
            self._token.run_sync_soon(fn, *args)
        except trio.RunFinishedError:
            pass  # the trio run is gone; nobody is waiting any more

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, exactly once per batch.
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=10.0)
        conn.execute(f"PRAGMA synchronous={_SYNCHRONOUS[self.settings.fsync]}")
        return conn

    def _writer_main(self, init: _Request) -> None:
        try:
            conn = self._open_database()
        except BaseException as exc:
            init.error = exc
            self._wake(_set_all, [init])
            return
        self._wake(_set_all, [init])
        try:
            self._write_loop(conn)
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # leave a compact database behind
        except Exception as exc:  # noqa: BLE001 - reported by aclose
            self._failure = exc
        finally:
            conn.close()

    def _open_database(self) -> sqlite3.Connection:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Created 0600 before sqlite sees it; sqlite gives the -wal and -shm files the same mode.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
        os.chmod(self.path, 0o600)
        conn: sqlite3.Connection | None = None
        try:
            conn = self._connect()
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
            version = self._check_format(conn) if "meta" in tables else None
            if tables and "meta" not in tables:
                raise StorageFormatError(f"{self.path} is a sqlite database but not a kvstore one")
            if conn.execute("PRAGMA journal_mode=WAL").fetchone()[0].lower() != "wal":
                raise StorageFormatError(f"{self.path}: sqlite refused WAL mode")
            conn.execute("PRAGMA wal_autocheckpoint=0")  # the maintenance thread checkpoints
            conn.execute(f"PRAGMA journal_size_limit={JOURNAL_SIZE_LIMIT_BYTES}")
            if version == 1:
                _migrate_v1(conn, self.path)
            if not tables:
                conn.execute("BEGIN IMMEDIATE")
                for statement in _SCHEMA:
                    conn.execute(statement)
                conn.execute("INSERT INTO meta VALUES ('format_version', ?)", (FORMAT_VERSION,))
                conn.execute("COMMIT")
                _fsync_directory(self.path.parent)  # the new file's directory entry is durable too
            for suffix in ("-wal", "-shm"):
                if os.path.exists(f"{self.path}{suffix}"):
                    os.chmod(f"{self.path}{suffix}", 0o600)
        except BaseException as exc:
            if conn is not None:
                conn.close()
            if isinstance(exc, sqlite3.DatabaseError):
                message = f"{self.path} is not a usable sqlite database: {exc}"
                raise StorageFormatError(message) from exc
            raise
        return conn

    def _check_format(self, conn: sqlite3.Connection) -> int:
        """The database's format version, when this kvstore can open it (possibly migrating)."""
        row = conn.execute("SELECT value FROM meta WHERE name = 'format_version'").fetchone()
        version = row[0] if row else None
        if version in MIGRATES_FROM or version == FORMAT_VERSION:
            return version
        if isinstance(version, int) and version > FORMAT_VERSION:
            raise StorageFormatError(
                f"{self.path} has storage format_version {version}, written by a newer kvstore; "
                f"this kvstore reads only format_version {FORMAT_VERSION}: upgrade it"
            )
        raise StorageFormatError(
            f"{self.path} has an unknown storage format_version {version!r} "
            f"(expected {FORMAT_VERSION}, or {', '.join(map(str, MIGRATES_FROM))} to migrate)"
        )

    def _write_loop(self, conn: sqlite3.Connection) -> None:
        closing = False
        while not closing:
            # Everything that queued up while the previous commit ran goes into this transaction.
            batch, closing = _take_batch(self._writes, MAX_BATCH_UPDATES, lambda r: len(r.ops))
            if batch:
                self._commit_batch(conn, batch)
            del batch  # not held while this thread waits: its callers' results go with it

    def _commit_batch(self, conn: sqlite3.Connection, batch: list[_Request]) -> None:
        stats = self.stats
        try:
            conn.execute("BEGIN IMMEDIATE")
            committed = self._load_batch(conn, batch)
            staged: dict[_Slot, bytes | None] = {}
            for request in batch:
                request.result = apply_updates(request.ops, staged, committed.__getitem__)
                if request.applied is not None:
                    # its caller goes on (ships the results) while the rest applies and commits
                    request.applied_result = request.result
                    self._wake(request.applied.set)
                elif request.on_applied is not None:
                    self._call(request.on_applied, request.result)
            changed = {slot: rec for slot, rec in staged.items() if rec != committed[slot]}
            _store(conn, changed)
            conn.execute("COMMIT")
            stats.transactions += 1
            for (target, key), record in changed.items():
                if target is None:
                    self._cache.put(key, record)
        except Exception as exc:  # noqa: BLE001 - e.g. disk full: every caller in the batch is told
            self._cache.clear()  # what was committed is uncertain now: read it again
            stats.failed_transactions += 1
            for request in batch:
                request.result, request.error = None, exc
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except Exception:  # noqa: BLE001 - the callers must still be woken (below)
                    log.exception("ROLLBACK after a failed commit failed too")
        finally:
            stats.calls += len(batch)
            stats.updates += sum(len(request.ops) for request in batch)
            self._finish(batch)

    def _load_batch(self, conn: sqlite3.Connection, batch: list[_Request]) -> dict[_Slot, bytes | None]:
        """Committed records of every slot the batch touches (None when absent), in few queries;
        data records the cache holds need none."""
        keys_by_table: dict[str | None, set[bytes]] = {}
        for request in batch:
            for (target, key), _ in request.ops:
                keys_by_table.setdefault(target, set()).add(key)
        committed: dict[_Slot, bytes | None] = {}
        cache = self._cache
        for target, keys in keys_by_table.items():
            if target is None:
                missing = []
                for key in keys:
                    held = cache.get(key)
                    if held is _UNKNOWN:
                        missing.append(key)
                    else:
                        committed[(None, key)] = held  # type: ignore[assignment]
                found = _load_records(conn, None, missing) if missing else {}
                for key in missing:
                    record = committed[(None, key)] = found.get(key)
                    cache.put(key, record)  # committed, and no other writer runs: it stays right
                continue
            found = _load_records(conn, target, list(keys))
            committed.update(((target, key), found.get(key)) for key in keys)
        return committed

    def _reader_main(self) -> None:
        conn = self._connect()
        conn.execute("PRAGMA query_only=1")
        try:
            closing = False
            while not closing:
                batch, closing = _take_batch(self._reads, MAX_READ_BATCH, lambda r: 1)
                if batch:
                    _run_reads(conn, batch)
                    self._finish(batch)
                del batch  # not held while this thread waits: its callers' results go with it
        finally:
            conn.close()

    def _maintenance_main(self) -> None:
        conn = self._connect()
        try:
            self._maintain(conn)
        except Exception as exc:  # noqa: BLE001 - fail-stop, see _check_open
            self._failure = exc
        finally:
            conn.close()

    def _restart_wal(self, conn: sqlite3.Connection) -> None:
        # Waits (busy timeout) for the writer's current commit; returns busy=1 if readers keep the
        # WAL pinned, in which case the next interval tries again.
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
        if not busy:
            self.stats.wal_restarts += 1

    def _maintain(self, conn: sqlite3.Connection) -> None:
        batch_fsync = self.settings.fsync is FsyncPolicy.BATCH
        wal_fd: int | None = None
        fsynced_at = checkpointed_at = 0  # not stats.transactions: commits may precede this thread
        now = time.monotonic()
        next_fsync, next_checkpoint = now, now + self.settings.checkpoint_interval_s
        try:
            while True:
                deadline = min(next_fsync, next_checkpoint) if batch_fsync else next_checkpoint
                if self._stop_maintenance.wait(max(0.0, deadline - time.monotonic())):
                    return  # the writer's TRUNCATE checkpoint at close makes everything durable
                now = time.monotonic()
                # Read the commit counter before acting: commits racing us are covered next time.
                transactions = self.stats.transactions
                if batch_fsync and now >= next_fsync:
                    if transactions != fsynced_at:
                        if wal_fd is None:
                            wal_fd = os.open(f"{self.path}-wal", os.O_RDONLY)
                        os.fsync(wal_fd)
                        self.stats.wal_fsyncs += 1
                        fsynced_at = transactions
                    next_fsync = now + self.settings.fsync_interval_s
                if now >= next_checkpoint:
                    if transactions != checkpointed_at:
                        # PASSIVE never waits for readers or the writer, so commits go on meanwhile.
                        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                        self.stats.checkpoints += 1
                        checkpointed_at = transactions
                        if _size(f"{self.path}-wal") > self.settings.wal_restart_bytes:
                            self._restart_wal(conn)
                    next_checkpoint = now + self.settings.checkpoint_interval_s
        finally:
            if wal_fd is not None:
                os.close(wal_fd)


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except FileNotFoundError:
        return 0


def _migrate_v1(conn: sqlite3.Connection, path: Path) -> None:
    """Format 1 -> 2: copy `data` and `hints` into rowid tables, in one transaction (a crash or an
    error leaves format 1 intact and the next open migrates again), then VACUUM to return the
    space the old tables held."""
    started = time.monotonic()
    try:
        conn.execute("BEGIN IMMEDIATE")
        for name, create, columns in (("data", _DATA_TABLE, "key, record"),
                                      ("hints", _HINTS_TABLE, "target, key, record")):
            conn.execute(create.format(name=f"{name}_v2"))
            conn.execute(f"INSERT INTO {name}_v2 ({columns}) SELECT {columns} FROM {name}")
            conn.execute(f"DROP TABLE {name}")
            conn.execute(f"ALTER TABLE {name}_v2 RENAME TO {name}")
        conn.execute("UPDATE meta SET value = ? WHERE name = 'format_version'", (FORMAT_VERSION,))
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise StorageFormatError(
            f"migrating {path} from storage format 1 to {FORMAT_VERSION} failed: {exc}; "
            "the database is unchanged (still format 1)"
        ) from exc
    keys = conn.execute("SELECT count(*) FROM data").fetchone()[0]
    try:
        conn.execute("VACUUM")  # needs free disk about the database's size
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    except sqlite3.Error as exc:  # the data is migrated; only the space is not returned yet
        log.warning("%s: VACUUM after the format migration failed (%s); run it offline to "
                    "return the old tables' space", path, exc)
    log.info("migrated %s from storage format 1 to %d (%d keys) in %.1fs",
             path, FORMAT_VERSION, keys, time.monotonic() - started)


def _load_records(
    conn: sqlite3.Connection, target: str | None, keys: list[bytes]
) -> dict[bytes, bytes]:
    found: dict[bytes, bytes] = {}
    for chunk in _chunks(keys):
        marks = ",".join("?" * len(chunk))
        if target is None:
            sql, args = f"SELECT key, record FROM data WHERE key IN ({marks})", chunk
        else:
            sql = f"SELECT key, record FROM hints WHERE target = ? AND key IN ({marks})"
            args = [target, *chunk]
        found.update(conn.execute(sql, args))
    return found


def _run_reads(conn: sqlite3.Connection, batch: list[_Request]) -> None:
    # One snapshot for the batch; it starts after every write acknowledged before these reads were
    # queued, so a caller always sees its own acknowledged writes.
    try:
        conn.execute("BEGIN")
        for request in batch:
            try:
                request.result = request.job(conn)
            except Exception as exc:  # noqa: BLE001 - handed to its caller
                request.error = exc
    except Exception as exc:  # noqa: BLE001 - the snapshot itself failed: every read fails
        for request in batch:
            request.error = exc
    finally:
        if conn.in_transaction:
            conn.execute("COMMIT")


def scan_bounds(after: bytes | None, prefix: bytes) -> tuple[list[str], list[Any]]:
    """The WHERE terms and arguments of a scan after `after` within `prefix` (on an index range)."""
    where: list[str] = []
    args: list[Any] = []
    if after is not None:
        where.append("key > ?")
        args.append(bytes(after))
    if prefix:
        where.append("key >= ?")
        args.append(bytes(prefix))
        end = prefix_end(prefix)
        if end is not None:
            where.append("key < ?")
            args.append(end)
    return where, args


def _store(conn: sqlite3.Connection, changed: dict[_Slot, bytes | None]) -> None:
    puts = [(target, key, rec) for (target, key), rec in changed.items() if rec is not None]
    dels = [(target, key) for (target, key), rec in changed.items() if rec is None]
    # UPSERT, not INSERT OR REPLACE: an existing key keeps its rowid, so only its table row is
    # rewritten, not the key index too (measured: about half the time and WAL bytes per write).
    conn.executemany(
        "INSERT INTO data (key, record) VALUES (?, ?)"
        " ON CONFLICT (key) DO UPDATE SET record = excluded.record",
        [(key, rec) for target, key, rec in puts if target is None],
    )
    conn.executemany("DELETE FROM data WHERE key = ?", [(k,) for t, k in dels if t is None])
    conn.executemany(
        "INSERT INTO hints (target, key, record) VALUES (?, ?, ?)"
        " ON CONFLICT (target, key) DO UPDATE SET record = excluded.record",
        [row for row in puts if row[0] is not None],
    )
    conn.executemany(
        "DELETE FROM hints WHERE target = ? AND key = ?",
        [row for row in dels if row[0] is not None],
    )


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

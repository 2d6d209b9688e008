"""Storage engines: protocol behaviour on both engines, durability and file handling on sqlite."""
from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import trio

from kvstore.storage.base import Engine, FsyncPolicy
from kvstore.storage.memory import MemoryEngine
from kvstore.storage.sqlite import SqliteEngine, StorageFormatError

REPO_ROOT = Path(__file__).resolve().parents[2]


def put(record: bytes):
    return lambda current: record


def delete(current: bytes | None) -> None:
    return None


def append(suffix: bytes):
    return lambda current: (current or b"") + suffix


def boom(current: bytes | None) -> bytes:
    raise ValueError("updater failed")


@pytest.fixture(params=["memory", "sqlite"])
async def engine(request, tmp_path):
    if request.param == "memory":
        engine = MemoryEngine()
    else:
        engine = await SqliteEngine.open(tmp_path / "kv.db", FsyncPolicy.ALWAYS)
    yield engine
    await engine.aclose()


async def test_roundtrip_put_get_delete(engine: Engine):
    assert await engine.update_many([(b"a", put(b"1")), (b"b", put(b"2"))]) == [b"1", b"2"]
    assert await engine.get_many([b"b", b"missing", b"a"]) == [b"2", None, b"1"]
    assert await engine.update_many([(b"a", delete)]) == [None]
    assert await engine.get_many([b"a", b"b"]) == [None, b"2"]
    assert await engine.count() == 1
    assert await engine.update_many([]) == []
    assert await engine.get_many([]) == []


async def test_updaters_to_one_key_compose_in_order(engine: Engine):
    results = await engine.update_many(
        [(b"k", append(b"x")), (b"other", put(b"o")), (b"k", append(b"y")), (b"k", append(b"z"))]
    )
    assert results == [b"x", b"o", b"xy", b"xyz"]
    assert await engine.get_many([b"k"]) == [b"xyz"]
    # Delete then recreate in one call: the second updater sees the deletion.
    assert await engine.update_many([(b"k", delete), (b"k", append(b"new"))]) == [None, b"new"]


async def test_raising_updater_fails_only_its_item(engine: Engine):
    await engine.update_many([(b"k", put(b"before"))])
    results = await engine.update_many(
        [(b"k", append(b"+1")), (b"k", boom), (b"j", lambda _: "not bytes"), (b"k", append(b"+2"))]
    )
    assert results[0] == b"before+1"
    assert isinstance(results[1], ValueError)
    assert isinstance(results[2], TypeError)
    assert results[3] == b"before+1+2"  # the failed updater left the record as it was
    assert await engine.get_many([b"k", b"j"]) == [b"before+1+2", None]


async def test_concurrent_calls_all_land_and_share_transactions(engine: Engine):
    calls = 300
    counter_values: list[bytes] = []

    async def writer(number: int) -> None:
        key = b"key-%03d" % number
        mine, counter = await engine.update_many([(key, put(key)), (b"counter", append(b"."))])
        assert mine == key
        counter_values.append(counter)

    async with trio.open_nursery() as nursery:
        for number in range(calls):
            nursery.start_soon(writer, number)

    keys = [b"key-%03d" % number for number in range(calls)]
    assert await engine.get_many(keys) == keys
    # Each call saw the previous calls' increments, also those in its own batch.
    assert sorted(counter_values) == [b"." * n for n in range(1, calls + 1)]
    assert engine.stats.calls == calls
    if isinstance(engine, SqliteEngine):
        assert engine.stats.transactions < calls


async def test_scan_is_key_ordered_and_pages(engine: Engine):
    keys = [bytes([a, b]) for a in (0, 1, 255) for b in (0, 7)] + [b"\x01", b"\xff\xff\xff"]
    shuffled = random.Random(1).sample(keys, len(keys))
    await engine.update_many([(key, put(b"r" + key)) for key in shuffled])
    await engine.update_many([(b"\x01\x07", delete)])
    expected = [(key, b"r" + key) for key in sorted(keys) if key != b"\x01\x07"]

    pages, after = [], None
    while page := await engine.scan(after, 3):
        assert len(page) <= 3
        pages.append(page)
        after = page[-1][0]
    assert [item for page in pages for item in page] == expected
    assert [len(page) for page in pages] == [3, 3, 1]
    assert await engine.scan(b"\x01", 2) == expected[3:5]  # strictly after
    assert await engine.scan(None, 0) == []
    with pytest.raises(ValueError):
        await engine.scan(None, -1)


async def test_scan_with_a_prefix_stays_inside_it(engine: Engine):
    keys = [b"a", b"ab", b"ab\x00", b"ab\xff", b"ab\xff\xff", b"ac", b"b", b"\xff", b"\xff\x01"]
    await engine.update_many([(key, put(b"r" + key)) for key in keys])
    for prefix in (b"ab", b"ab\xff", b"\xff", b"a", b"zz"):
        inside = [(key, b"r" + key) for key in sorted(keys) if key.startswith(prefix)]
        assert await engine.scan(None, 100, prefix) == inside
        assert await engine.scan(None, 2, prefix) == inside[:2]
        if inside:
            assert await engine.scan(inside[0][0], 100, prefix) == inside[1:]
    assert await engine.scan(b"b", 100, b"a") == []  # after the prefix's keys: nothing


async def test_hints_are_per_target_and_delete_only_if_unchanged(engine: Engine):
    results = await engine.hint_update_many(
        [("n2", b"b", put(b"hb")), ("n2", b"a", put(b"ha")), ("n3", b"a", put(b"x")),
         ("n2", b"c", put(b"hc")), ("n2", b"c", boom)]
    )
    assert results[:4] == [b"hb", b"ha", b"x", b"hc"] and isinstance(results[4], ValueError)
    assert await engine.hint_counts() == {"n2": 3, "n3": 1}
    assert await engine.hints_for("n2", 2) == [(b"a", b"ha"), (b"b", b"hb")]
    snapshot = await engine.hints_for("n2", 10)

    # A write for n2/b arrives while the snapshot is being replayed.
    await engine.hint_update_many([("n2", b"b", append(b"+new"))])
    deleted = await engine.delete_hints_if_unchanged("n2", snapshot + [(b"gone", b"?")])
    assert deleted == 2
    assert await engine.hints_for("n2", 10) == [(b"b", b"hb+new")]
    assert await engine.hint_counts() == {"n2": 1, "n3": 1}
    assert await engine.get_many([b"a", b"b"]) == [None, None]  # hints are not data
    assert await engine.hints_for("nobody", 10) == []


async def test_closed_engine_refuses_calls_and_close_is_idempotent(engine: Engine):
    await engine.update_many([(b"k", put(b"v"))])
    await engine.aclose()
    await engine.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await engine.update_many([(b"k", put(b"w"))])
    with pytest.raises(trio.ClosedResourceError):
        await engine.get_many([b"k"])


@pytest.mark.parametrize("cache_bytes", [0, 600, 32 << 20], ids=["no-cache", "cache-refilled", "cache"])
async def test_sqlite_agrees_with_memory_on_a_random_workload(tmp_path, cache_bytes):
    """With the writer's record cache off, so small it starts over every few writes, and large."""
    rng = random.Random(7)
    memory = MemoryEngine()
    durable = await SqliteEngine.open(tmp_path / "kv.db", FsyncPolicy.NEVER, record_cache_bytes=cache_bytes)
    try:
        for _ in range(60):
            updates = []
            for _ in range(rng.randrange(1, 12)):
                key = b"k%d" % rng.randrange(20)
                updater = rng.choice([put(b"v%d" % rng.randrange(5)), delete, append(b"+"), boom])
                updates.append((key, updater))
            got = [await e.update_many(updates) for e in (memory, durable)]
            assert [r if not isinstance(r, Exception) else "err" for r in got[0]] == [
                r if not isinstance(r, Exception) else "err" for r in got[1]
            ]
        assert await memory.scan(None, 100) == await durable.scan(None, 100)
        assert await memory.count() == await durable.count()
    finally:
        await durable.aclose()
        await memory.aclose()


# -- sqlite only -----------------------------------------------------------------------------------


async def test_sqlite_a_failed_commit_leaves_later_writes_building_on_what_was_committed(tmp_path, monkeypatch):
    """A write's updater sees the committed record, never one staged by a transaction that then
    failed, whether the old record comes from the database or the writer's record cache."""
    import kvstore.storage.sqlite as engine_module

    engine = await SqliteEngine.open(tmp_path / "kv.db", FsyncPolicy.NEVER)
    try:
        assert await engine.update_many([(b"k", put(b"v1"))]) == [b"v1"]
        real_store = engine_module._store

        def failing_store(conn, changed):
            raise sqlite3.OperationalError("disk I/O error")

        monkeypatch.setattr(engine_module, "_store", failing_store)
        with pytest.raises(Exception, match="disk I/O error"):
            await engine.update_many([(b"k", put(b"v2")), (b"other", put(b"x"))])
        monkeypatch.setattr(engine_module, "_store", real_store)
        assert await engine.update_many([(b"k", append(b"+")), (b"other", append(b"+"))]) == [b"v1+", b"+"]
        assert await engine.get_many([b"k", b"other"]) == [b"v1+", b"+"]
    finally:
        await engine.aclose()


async def test_sqlite_reopen_keeps_data_under_every_fsync_policy(tmp_path):
    for policy in FsyncPolicy:
        path = tmp_path / f"{policy.value}.db"
        engine = await SqliteEngine.open(path, policy)
        await engine.update_many([(b"k", put(b"v"))])
        await engine.hint_update_many([("n2", b"k", put(b"h"))])
        await engine.aclose()
        engine = await SqliteEngine.open(path, policy)
        assert await engine.get_many([b"k"]) == [b"v"]
        assert await engine.hints_for("n2", 10) == [(b"k", b"h")]
        await engine.aclose()


async def test_sqlite_batch_policy_fsyncs_and_checkpoints_in_background(tmp_path):
    engine = await SqliteEngine.open(
        tmp_path / "kv.db", FsyncPolicy.BATCH, fsync_interval_s=0.005, checkpoint_interval_s=0.005
    )
    try:
        await engine.update_many([(b"k", put(b"v"))])
        # The maintenance thread runs on real time; wait for it, with a bound.
        with trio.fail_after(5):
            while engine.stats.wal_fsyncs == 0 or engine.stats.checkpoints == 0:
                await trio.sleep(0.005)
    finally:
        await engine.aclose()


async def test_sqlite_refuses_unknown_format_version(tmp_path):
    path = tmp_path / "kv.db"
    await (await SqliteEngine.open(path)).aclose()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE meta SET value = 3 WHERE name = 'format_version'")
    threads_before = set(threading.enumerate())
    with pytest.raises(StorageFormatError, match="format_version 3.*newer kvstore"):
        await SqliteEngine.open(path)
    # none of the engine's threads is left (an idle trio worker from an earlier test may have
    # exited meanwhile: only threads started since count)
    assert set(threading.enumerate()) - threads_before == set()


def _make_format_1_database(path: Path, records: dict[bytes, bytes], hints: dict[tuple[str, bytes], bytes]) -> None:
    """A data directory as kvstore with storage format 1 left it (WITHOUT ROWID tables, WAL)."""
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE meta (name TEXT PRIMARY KEY, value) WITHOUT ROWID")
        conn.execute("CREATE TABLE data (key BLOB PRIMARY KEY, record BLOB NOT NULL) WITHOUT ROWID")
        conn.execute("CREATE TABLE hints (target TEXT NOT NULL, key BLOB NOT NULL, record BLOB NOT NULL,"
                     " PRIMARY KEY (target, key)) WITHOUT ROWID")
        conn.execute("INSERT INTO meta VALUES ('format_version', 1)")
        conn.executemany("INSERT INTO data VALUES (?, ?)", records.items())
        conn.executemany("INSERT INTO hints VALUES (?, ?, ?)", [(t, k, r) for (t, k), r in hints.items()])
    conn.close()


async def test_sqlite_migrates_format_1_to_rowid_tables_keeping_every_record(tmp_path):
    path = tmp_path / "kv.db"
    rng = random.Random(7)
    records = {b"key-%04d" % i: rng.randbytes(rng.choice([10, 1150, 5000])) for i in range(300)}
    hints = {("n2", b"key-0001"): b"h1", ("n3", b"key-0001"): b"h2", ("n3", b"zzz"): rng.randbytes(1150)}
    _make_format_1_database(path, records, hints)
    before = path.stat().st_size

    engine = await SqliteEngine.open(path)
    try:
        keys = sorted(records)
        assert await engine.get_many(keys) == [records[k] for k in keys]
        assert await engine.scan(None, 1000) == sorted(records.items())
        assert await engine.hints_for("n3", 10) == [(b"key-0001", b"h2"), (b"zzz", hints[("n3", b"zzz")])]
        assert await engine.hint_counts() == {"n2": 1, "n3": 2}
        # writes go on as before: replace, insert, delete, hints
        await engine.update_many([(b"key-0000", put(b"new")), (b"fresh", put(b"f")), (b"key-0002", delete)])
        await engine.hint_update_many([("n2", b"key-0001", put(b"h1b"))])
        assert await engine.get_many([b"key-0000", b"fresh", b"key-0002"]) == [b"new", b"f", None]
        assert await engine.hints_for("n2", 10) == [(b"key-0001", b"h1b")]
    finally:
        await engine.aclose()

    with sqlite3.connect(path) as conn:
        version = conn.execute("SELECT value FROM meta WHERE name = 'format_version'").fetchone()[0]
        tables = dict(conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'table'").fetchall())
    conn.close()
    assert version == 2
    assert "WITHOUT ROWID" not in tables["data"] and "WITHOUT ROWID" not in tables["hints"]
    assert not {"data_v2", "hints_v2"} & set(tables)
    # records no longer take an overflow page each, and VACUUM returned the old tables' pages
    assert path.stat().st_size < before

    engine = await SqliteEngine.open(path)  # a migrated database opens as format 2, unchanged
    try:
        assert await engine.count() == len(records)
    finally:
        await engine.aclose()


async def test_sqlite_failed_migration_leaves_format_1_intact(tmp_path):
    path = tmp_path / "kv.db"
    _make_format_1_database(path, {b"k": b"v"}, {})
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE data_v2 (x)")  # in the way of the migration's first step
    conn.close()
    with pytest.raises(StorageFormatError, match="migrating .* failed: .*data_v2.*still format 1"):
        await SqliteEngine.open(path)
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT value FROM meta WHERE name = 'format_version'").fetchone()[0] == 1
        assert conn.execute("SELECT record FROM data WHERE key = ?", (b"k",)).fetchone()[0] == b"v"
    conn.close()


async def test_sqlite_restarts_a_wal_that_passes_the_limit(tmp_path):
    path = tmp_path / "kv.db"
    engine = await SqliteEngine.open(path, FsyncPolicy.BATCH, checkpoint_interval_s=0.005,
                                     wal_restart_bytes=64 * 1024)
    wal = Path(f"{path}-wal")
    value = os.urandom(1100)
    try:
        sizes = []
        for round_ in range(8):
            restarts = engine.stats.wal_restarts
            # ~35 pages (140 KiB) of WAL per round: past the limit every time
            await engine.update_many([(b"r%d-%03d" % (round_, i), put(value)) for i in range(100)])
            sizes.append(wal.stat().st_size)
            with trio.fail_after(5):  # the maintenance thread runs on real time; bounded wait
                while engine.stats.wal_restarts == restarts:
                    await trio.sleep(0.005)
        # Every round starts the WAL over, so the file holds about one round's frames; without the
        # restarts it would hold all eight rounds' (8x the first).
        assert sizes[0] > 64 * 1024
        assert max(sizes) < 2 * sizes[0], sizes
        assert await engine.count() == 800
    finally:
        await engine.aclose()


async def test_sqlite_refuses_a_foreign_database(tmp_path):
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE t (x)")
    with pytest.raises(StorageFormatError, match="not a kvstore"):
        await SqliteEngine.open(path)
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StorageFormatError, match="not a usable sqlite database"):
        await SqliteEngine.open(garbage)


async def test_sqlite_files_are_private(tmp_path):
    path = tmp_path / "kv.db"
    engine = await SqliteEngine.open(path)
    try:
        await engine.update_many([(b"k", put(b"v"))])
        for name in ("kv.db", "kv.db-wal", "kv.db-shm"):
            assert (tmp_path / name).stat().st_mode & 0o777 == 0o600, name
    finally:
        await engine.aclose()


async def test_sqlite_aclose_joins_every_thread(tmp_path):
    threads_before = set(threading.enumerate())
    engine = await SqliteEngine.open(tmp_path / "kv.db", FsyncPolicy.BATCH)
    assert len(set(threading.enumerate()) - threads_before) >= 3
    async with trio.open_nursery() as nursery:
        for number in range(20):
            nursery.start_soon(engine.update_many, [(b"%d" % number, put(b"v"))])
            nursery.start_soon(engine.get_many, [b"%d" % number])
    await engine.aclose()
    # none of the engine's threads is left (an idle trio worker from an earlier test may have
    # exited meanwhile: only threads started since count)
    assert set(threading.enumerate()) - threads_before == set()


KILLED_WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import trio

    from kvstore.storage.base import FsyncPolicy
    from kvstore.storage.sqlite import SqliteEngine

    async def main():
        engine = await SqliteEngine.open(Path(sys.argv[1]), FsyncPolicy.ALWAYS)

        async def writer(worker):
            for number in range(1_000_000):
                key = b"%d-%d" % (worker, number)
                await engine.update_many([(key, lambda _, key=key: b"value-" + key)])
                sys.stdout.write(key.decode() + "\\n")
                sys.stdout.flush()

        async with trio.open_nursery() as nursery:
            for worker in range(8):
                nursery.start_soon(writer, worker)

    trio.run(main)
    """
)


async def test_sqlite_keeps_every_acknowledged_write_across_kill_9(tmp_path):
    path = tmp_path / "kv.db"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    process = await trio.lowlevel.open_process(
        [sys.executable, "-c", KILLED_WRITER, str(path)], stdout=subprocess.PIPE, env=env
    )
    output = b""
    try:
        with trio.fail_after(30):
            while output.count(b"\n") < 300:
                chunk = await process.stdout.receive_some()
                assert chunk, f"writer exited early with {await process.wait()}"
                output += chunk
            process.send_signal(signal.SIGKILL)  # mid-way: writes are in flight
            while chunk := await process.stdout.receive_some():
                output += chunk
    finally:
        process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()
            await process.stdout.aclose()
    assert process.returncode == -signal.SIGKILL

    acked = [line for line in output.split(b"\n")[:-1]]  # a torn last line was not acknowledged
    engine = await SqliteEngine.open(path)
    try:
        assert await engine.get_many(acked) == [b"value-" + key for key in acked]
    finally:
        await engine.aclose()


async def test_update_many_early_hands_out_results_then_commits(engine: Engine):
    results, committed = await engine.update_many_early(
        [(b"a", put(b"1")), (b"a", append(b"2")), (b"b", boom)]
    )
    assert results[:2] == [b"1", b"12"] and isinstance(results[2], ValueError)
    await committed()
    assert await engine.get_many([b"a", b"b"]) == [b"12", None]
    empty, nothing = await engine.update_many_early([])
    assert empty == []
    await nothing()


async def test_sqlite_early_results_whose_commit_fails_are_not_stored(tmp_path, monkeypatch):
    import kvstore.storage.sqlite as sqlite_module
    from kvstore.errors import Internal

    engine = await SqliteEngine.open(tmp_path / "kv.db", FsyncPolicy.ALWAYS)
    try:
        real_store = sqlite_module._store

        def failing_store(conn, changed):
            raise sqlite3.OperationalError("disk I/O error (injected)")

        monkeypatch.setattr(sqlite_module, "_store", failing_store)
        results, committed = await engine.update_many_early([(b"k", put(b"v"))])
        assert results == [b"v"]  # handed out before the commit...
        with pytest.raises(Internal, match="injected"):
            await committed()  # ...which then failed
        monkeypatch.setattr(sqlite_module, "_store", real_store)
        assert await engine.get_many([b"k"]) == [None]
        assert await engine.update_many([(b"k", put(b"w"))]) == [b"w"]  # the engine goes on
    finally:
        await engine.aclose()


async def test_a_stamp_whose_commit_failed_never_gives_its_dot_to_a_later_write(tmp_path, monkeypatch):
    """The coordinator ships stamped versions before its own commit ends. If that commit fails,
    replicas may hold a version whose dot this node has no record of: a later write in the same
    millisecond must not take the same dot, or replicas would drop it as a duplicate."""
    import kvstore.storage.sqlite as sqlite_module
    from kvstore.core.limits import Limits
    from kvstore.kms.envelope import NullSealer
    from kvstore.node.local import LocalStore, Stamp

    engine = await SqliteEngine.open(tmp_path / "kv.db", FsyncPolicy.ALWAYS)
    store = LocalStore(engine, "n1", Limits(), NullSealer())
    try:
        real_store = sqlite_module._store
        monkeypatch.setattr(sqlite_module, "_store", lambda conn, changed: (_ for _ in ()).throw(
            sqlite3.OperationalError("disk I/O error (injected)")))
        [lost], committed = await store.stamp_many([Stamp(b"k", b"v1", {}, hlc=1)], now_ms=1_000)
        with pytest.raises(Exception, match="injected"):
            await committed()
        monkeypatch.setattr(sqlite_module, "_store", real_store)
        [kept], committed = await store.stamp_many([Stamp(b"k", b"v2", {}, hlc=2)], now_ms=1_000)
        await committed()
        assert kept.new.dot != lost.new.dot
        assert kept.new.counter > lost.new.counter
    finally:
        await engine.aclose()


async def test_sqlite_nowait_calls_answer_a_thread_that_is_not_trio(tmp_path):
    """The transport loop's replica path (kvstore/node/fastpath.py) queues work from its own
    thread and is answered by a callback on the engine's thread, never through trio."""
    engine = await SqliteEngine.open(tmp_path / "kv.db", FsyncPolicy.BATCH)

    def from_another_thread() -> tuple[list, list, list[str]]:
        outcomes: list = []
        threads: list[str] = []
        for submit, arg in ((engine.update_many_nowait, [(b"a", put(b"1")), (b"b", boom), (b"c", append(b"3"))]),
                            (engine.get_many_nowait, [b"a", b"b", b"c", b"missing"])):
            answered = threading.Event()

            def done(outcome) -> None:
                outcomes.append(outcome)
                threads.append(threading.current_thread().name)
                answered.set()

            submit(arg, done)
            assert answered.wait(10)
        return outcomes[0], outcomes[1], threads

    writes, reads, threads = await trio.to_thread.run_sync(from_another_thread)
    assert writes[0] == b"1" and isinstance(writes[1], ValueError) and writes[2] == b"3"
    assert reads == [b"1", None, b"3", None]  # the failed updater cost only its own key
    assert threads[0] == "kvstore-sqlite-writer" and threads[1].startswith("kvstore-sqlite-reader")
    assert await engine.get_many([b"a"]) == [b"1"]  # and trio callers see the same data
    await engine.aclose()
    with pytest.raises(trio.ClosedResourceError):
        engine.update_many_nowait([(b"a", put(b"2"))], lambda outcome: None)
    with pytest.raises(trio.ClosedResourceError):
        engine.get_many_nowait([b"a"], lambda outcome: None)


async def test_nowait_calls_of_either_engine_answer_from_another_thread(engine: Engine):
    """The transport loop's paths (kvstore/node/fastpath.py, express.py) call engines from their
    own thread: each engine answers through the callbacks, `applied` before `done` for an early
    update, and a failed updater costs only its own key."""

    def from_another_thread() -> list[tuple[str, object]]:
        calls: list[tuple[str, object]] = []
        finished = threading.Event()

        def record(name: str, last: bool = False):
            def callback(outcome) -> None:
                calls.append((name, outcome))
                if last:
                    finished.set()
            return callback

        def then_read(outcome) -> None:  # a read queued once the second write is committed
            record("done2")(outcome)
            engine.get_many_nowait([b"a", b"b"], record("read", last=True))

        engine.update_many_early_nowait([(b"a", put(b"1")), (b"b", boom)], record("applied"), record("done"))
        engine.update_many_nowait([(b"a", append(b"2"))], then_read)
        assert finished.wait(10)
        return calls

    calls = await trio.to_thread.run_sync(from_another_thread)
    names = [name for name, _ in calls]
    assert names.index("applied") < names.index("done") < names.index("done2")
    applied = dict(calls)["applied"]
    assert applied[0] == b"1" and isinstance(applied[1], ValueError)
    assert dict(calls)["done2"] == [b"12"]
    assert dict(calls)["read"] == [b"12", None]
    assert await engine.get_many([b"a", b"b"]) == [b"12", None]
    await engine.aclose()
    with pytest.raises(trio.ClosedResourceError):
        engine.update_many_early_nowait([(b"a", put(b"3"))], lambda results: None, lambda outcome: None)


async def test_a_nowait_stamp_whose_commit_failed_never_gives_its_dot_to_a_later_write(tmp_path, monkeypatch):
    """As the test above, for the loop's path: `committed` gets the error, and the dot is burnt."""
    import kvstore.storage.sqlite as sqlite_module
    from kvstore.core.limits import Limits
    from kvstore.kms.envelope import NullSealer
    from kvstore.node.local import LocalStore, Stamp

    engine = await SqliteEngine.open(tmp_path / "kv.db", FsyncPolicy.ALWAYS)
    store = LocalStore(engine, "n1", Limits(), NullSealer())

    def stamp(value: bytes, hlc: int) -> tuple[list, BaseException | None]:
        got: dict[str, object] = {}
        finished = threading.Event()

        def committed(error) -> None:
            got["error"] = error
            finished.set()

        assert store.stamp_many_nowait([Stamp(b"k", value, {}, hlc=hlc)], 1_000,
                                       lambda stamped: got.setdefault("stamped", stamped), committed)
        assert finished.wait(10)
        return got["stamped"], got["error"]  # type: ignore[return-value]

    try:
        real_store = sqlite_module._store
        monkeypatch.setattr(sqlite_module, "_store", lambda conn, changed: (_ for _ in ()).throw(
            sqlite3.OperationalError("disk I/O error (injected)")))
        [lost], error = await trio.to_thread.run_sync(stamp, b"v1", 1)
        assert "injected" in str(error)
        monkeypatch.setattr(sqlite_module, "_store", real_store)
        [kept], error = await trio.to_thread.run_sync(stamp, b"v2", 2)
        assert error is None
        assert kept.new.counter > lost.new.counter
        assert await engine.get_many([b"k"]) == [kept.record]
    finally:
        await engine.aclose()


async def test_sqlite_nowait_calls_leave_no_reference_cycles(tmp_path):
    """A node makes thousands of nowait calls a second: if each left a reference cycle, every
    batch would be garbage only the cyclic collector frees, and its collections (tens of ms with
    the GIL held, every half second) became the put p99. With the collector off, what a call
    held must be freed by reference counting alone."""
    import gc
    import weakref

    engine = await SqliteEngine.open(tmp_path / "kv.db", FsyncPolicy.BATCH)

    class Callback:
        def __init__(self) -> None:
            self.called = threading.Event()

        def __call__(self, *outcome) -> None:
            self.called.set()

    def submit_all() -> list[weakref.ref]:
        refs = []
        for submit, args in ((engine.update_many_nowait, ([(b"a", put(b"1"))],)),
                             (engine.update_many_early_nowait, ([(b"b", put(b"2"))], Callback())),
                             (engine.get_many_nowait, ([b"a"],))):
            done = Callback()
            submit(*args, done)
            assert done.called.wait(10)
            refs.append(weakref.ref(done))
        return refs

    gc.collect()
    gc.disable()
    try:
        refs = await trio.to_thread.run_sync(submit_all)
        with trio.fail_after(10):  # an engine thread lets go of a batch once it has answered it
            while any(ref() is not None for ref in refs):
                await trio.sleep(0.01)
    finally:
        gc.enable()
        await engine.aclose()

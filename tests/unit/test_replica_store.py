"""A replica receiving a coordinator's record (wire.RecordOp, kvstore/node/local.py merge_many):
stored as it is when the replica held what the coordinator held, merged otherwise."""
from __future__ import annotations

from kvstore.core.limits import Limits
from kvstore.core.records import decode_record, digest, encode_record
from kvstore.core.versions import Sibling
from kvstore.core.wire import RecordOp
from kvstore.errors import InvalidArgument
from kvstore.kms.envelope import NullSealer
from kvstore.node.local import LocalStore, Stamp
from kvstore.storage.memory import MemoryEngine


def store(node_id: str) -> LocalStore:
    return LocalStore(MemoryEngine(), node_id, Limits(), NullSealer())


async def ship(coordinator: LocalStore, key: bytes, value: bytes, hlc: int) -> RecordOp:
    """Stamp a blind write on the coordinator; the op it sends its replicas."""
    [st], committed = await coordinator.stamp_many([Stamp(key, value, {}, hlc=hlc, blind=True)], now_ms=1_000)
    await committed()
    return RecordOp(key, st.record, st.base, hlc)


async def stored(node: LocalStore, key: bytes) -> bytes | None:
    [raw] = await node.read_raw_many([key])
    return raw


async def values(node: LocalStore, key: bytes) -> set[bytes | None]:
    [sibs] = await node.read_many([key])
    assert isinstance(sibs, list)
    return {node.open_value(key, s) for s in sibs}


async def test_a_replica_in_step_with_the_coordinator_stores_its_record_as_it_is() -> None:
    coordinator, replica = store("n1"), store("n2")
    first = await ship(coordinator, b"k", b"v1", hlc=1)
    assert first.base == b""  # nothing was there
    assert await replica.merge_many([(b"k", first)]) == [None]
    second = await ship(coordinator, b"k", b"v2", hlc=2)
    assert second.base == digest(first.record)
    assert await replica.merge_many([(b"k", second)]) == [None]
    assert await stored(replica, b"k") == await stored(coordinator, b"k") == second.record
    assert await values(replica, b"k") == {b"v2"}


async def test_a_replica_holding_a_write_the_coordinator_lacks_keeps_it() -> None:
    coordinator, replica = store("n1"), store("n2")
    # a concurrent write another coordinator (n3) made, which reached this replica only
    other = await ship(store("n3"), b"k", b"from-n3", hlc=5)
    assert await replica.merge_many([(b"k", other)]) == [None]
    op = await ship(coordinator, b"k", b"from-n1", hlc=6)
    assert await replica.merge_many([(b"k", op)]) == [None]
    assert await values(replica, b"k") == {b"from-n1", b"from-n3"}
    assert await values(coordinator, b"k") == {b"from-n1"}


async def test_a_replica_that_missed_earlier_writes_ends_with_the_coordinators_siblings() -> None:
    coordinator, replica = store("n1"), store("n2")
    await ship(coordinator, b"k", b"v1", hlc=1)  # never reached the replica
    op = await ship(coordinator, b"k", b"v2", hlc=2)
    assert op.base != digest(None)
    assert await replica.merge_many([(b"k", op)]) == [None]
    assert await values(replica, b"k") == await values(coordinator, b"k") == {b"v2"}


async def test_a_record_op_is_held_as_a_hint_for_its_owner() -> None:
    coordinator, fallback = store("n1"), store("n4")
    op = await ship(coordinator, b"k", b"v1", hlc=1)
    assert await fallback.merge_many([(b"k", op)], ["n2"]) == [None]
    assert await stored(fallback, b"k") is None
    [(key, record)] = await fallback.engine.hints_for("n2", 10)
    assert key == b"k" and decode_record(record) == decode_record(op.record)


async def test_a_malformed_record_that_must_be_merged_fails_only_its_item() -> None:
    replica = store("n2")
    await replica.merge_many([(b"bad", await ship(store("n3"), b"bad", b"old", hlc=1))])
    good = await ship(store("n1"), b"good", b"v", hlc=2)
    bad = RecordOp(b"bad", b"\xc1 not a record", digest(b"something else"), 3)
    [bad_result, good_result] = await replica.merge_many([(b"bad", bad), (b"good", good)])
    assert isinstance(bad_result, InvalidArgument) and "b'bad'" in str(bad_result)
    assert good_result is None
    assert await values(replica, b"bad") == {b"old"}
    assert await values(replica, b"good") == {b"v"}


async def test_the_replicas_clock_observes_a_shipped_records_hlc() -> None:
    replica = store("n2")
    seen: list[int] = []
    replica.observe_hlc = seen.append
    record = encode_record([Sibling("n1", 1, {}, b"v", hlc=77)])
    await replica.merge_many([(b"k", RecordOp(b"k", record, b"", 77))])
    assert seen == [77]


async def test_a_dropping_test_node_stores_nothing_from_a_record_op() -> None:
    replica = LocalStore(MemoryEngine(), "n2", Limits(), NullSealer(), drop_writes=True)
    op = await ship(store("n1"), b"k", b"v", hlc=1)
    assert await replica.merge_many([(b"k", op)]) == [None]
    assert await stored(replica, b"k") is None


async def test_records_queued_from_another_thread_are_stored_or_merged_like_merge_many(tmp_path) -> None:
    """merge_records_nowait (the transport loop's path, kvstore/node/fastpath.py) on sqlite: the
    same outcomes as merge_many, reported to a callback; an engine that takes work only from
    trio says so instead of queueing anything."""
    import threading

    import trio

    from kvstore.storage.base import FsyncPolicy
    from kvstore.storage.sqlite import SqliteEngine

    engine = await SqliteEngine.open(tmp_path / "kv.db", FsyncPolicy.BATCH)
    coordinator, elsewhere = store("n1"), store("n3")
    replica = LocalStore(engine, "n2", Limits(), NullSealer())
    try:
        first = await ship(coordinator, b"k", b"v1", hlc=1)
        concurrent = await ship(elsewhere, b"k", b"v2", hlc=2)  # a write the coordinator never saw
        broken = RecordOp(b"bad", b"\xc1", b"not the stored digest", 3)

        def queue(ops: list[RecordOp]) -> list:
            answered, outcome = threading.Event(), []
            assert replica.merge_records_nowait(ops, lambda got: (outcome.append(got), answered.set()))
            assert answered.wait(10)
            return outcome[0]

        assert await trio.to_thread.run_sync(queue, [first]) == [None]
        assert await stored(replica, b"k") == first.record  # in step: stored as it is
        results = await trio.to_thread.run_sync(queue, [concurrent, broken])
        assert results[0] is None and isinstance(results[1], InvalidArgument)
        assert await values(replica, b"k") == {b"v1", b"v2"}  # not in step: merged, both kept
        assert await stored(replica, b"bad") is None
    finally:
        await engine.aclose()
    trio_only = LocalStore(object(), "n4", Limits(), NullSealer())  # an engine with no *_nowait calls
    assert not trio_only.merge_records_nowait([first], lambda got: None)
    assert not trio_only.stamp_many_nowait([], 0, lambda stamped: None, lambda error: None)

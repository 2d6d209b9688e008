"""A coordinator's stamp (kvstore/node/local.py) against the pure definition (versions.stamp), and
the per-thread msgpack packer every record, AAD and envelope goes through."""
from __future__ import annotations

import threading

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.core import versions
from kvstore.core.limits import Limits
from kvstore.packing import packb
from kvstore.core.records import decode_record, digest, encode_record
from kvstore.core.versions import Sibling
from kvstore.kms.envelope import NullSealer
from kvstore.node.local import LocalStore, Stamp
from kvstore.storage.memory import MemoryEngine

NODES = ["n1", "n2", "n3"]
held = st.lists(
    st.builds(
        Sibling,
        node=st.sampled_from(NODES),
        counter=st.integers(1, 5_000),
        vv=st.dictionaries(st.sampled_from(NODES), st.integers(1, 5_000), max_size=3),
        value=st.one_of(st.none(), st.binary(max_size=16)),
        hlc=st.integers(0, 10),
    ).filter(lambda s: s.vv.get(s.node, 0) < s.counter),
    max_size=3,
    unique_by=lambda s: s.dot,
).map(lambda sibs: versions.merge(sibs))  # what a node can hold: no sibling covered by another


@settings(max_examples=150, deadline=None)
@given(local=held, context=st.dictionaries(st.sampled_from(NODES), st.integers(1, 6_000), max_size=3),
       blind=st.booleans(), value=st.one_of(st.none(), st.binary(max_size=16)),
       floor=st.sampled_from([0, 4_000, 9_000]))
async def test_the_coordinators_stamp_is_versions_stamp_with_the_value_sealed(
        local: list[Sibling], context: dict[str, int], blind: bool, value: bytes | None, floor: int) -> None:
    engine = MemoryEngine()
    old = encode_record(local) if local else None
    if old is not None:
        await engine.update_many([(b"k", lambda _: old)])
    store = LocalStore(engine, "n1", Limits(), NullSealer())
    [stamped], committed = await store.stamp_many(
        [Stamp(b"k", value, {} if blind else context, hlc=7, blind=blind)], now_ms=floor)
    await committed()
    assert not isinstance(stamped, BaseException)

    wanted_context = versions.context_of(local) if blind else context
    new, merged = versions.stamp(local, "n1", wanted_context, value, 7, counter_floor=floor)
    sealed = None if value is None else NullSealer().seal(value, b"")
    assert (stamped.new.dot, stamped.new.vv, stamped.new.hlc) == (new.dot, new.vv, new.hlc)
    assert stamped.new.value == sealed
    assert [s.dot for s in stamped.siblings] == [s.dot for s in merged]
    assert stamped.record == encode_record(stamped.siblings)
    assert stamped.base == digest(old)
    [raw] = await store.read_raw_many([b"k"])
    assert raw == stamped.record
    assert [s.dot for s in decode_record(raw)] == [s.dot for s in merged]


@pytest.mark.parametrize("obj", [
    [1, [["n1", 2**64 - 1, {"n2": 3}, 0, 0, b"\x00" * 1500]]],
    [b"kvstore-value-v1", b"key", "n1", 17],
    {"a": None, "b": [True, 1.5, "x" * 70_000]},
    [],
])
def test_packb_writes_what_msgpack_packb_writes(obj) -> None:
    assert packb(obj) == msgpack.packb(obj, use_bin_type=True)


def test_a_failed_pack_leaves_nothing_behind_for_the_next() -> None:
    with pytest.raises(TypeError):
        packb([b"half written", object()])
    with pytest.raises(OverflowError):
        packb([b"half written", 2**70])
    assert packb([b"next"]) == msgpack.packb([b"next"], use_bin_type=True)


def test_threads_packing_at_once_each_get_their_own_bytes() -> None:
    errors: list[str] = []

    def work(n: int) -> None:
        for i in range(2_000):
            obj = [n, i, bytes([n]) * (i % 300)]
            if packb(obj) != msgpack.packb(obj, use_bin_type=True):
                errors.append(f"thread {n} item {i}")

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []

"""Replica batch and call formats (kvstore/core/wire.py): validation of what peers send."""
from __future__ import annotations

import msgpack
import pytest

from kvstore.core.wire import MAX_KEY_BYTES, ReadOp, RecordOp, WriteOp, decode_batch, decode_call, encode_batch
from kvstore.errors import InvalidArgument


def test_batches_round_trip() -> None:
    ops = [WriteOp(b"k", [], "n2"), ReadOp(b"r"), RecordOp(b"k", b"record", b"d" * 16, 99, "n3")]
    assert decode_batch(encode_batch(7, ops)) == (7, ops)


@pytest.mark.parametrize("op,message", [
    (["r", b""], "replica op: key must be 1..65536 bytes, not 0"),
    (["w", b"k" * (MAX_KEY_BYTES + 1), [], ""], "replica op: key must be 1..65536 bytes, not 65537"),
    (["w", b"k", [], "x" * 129], "replica op: hint_for must be a node id of at most 128 characters"),
    (["q", b"k"], "replica op: unknown or malformed op 'q'"),
    (["c", b"k", "record", b"", "", 1], 'replica op: record op must be ["c", key, record, base, hint_for, hlc]'),
    (["c", b"k", b"rec", b"d" * 65, "", 1],
     "replica op: record op: base must be at most 64 bytes, hlc a u64 and record non-empty"),
    (["c", b"k", b"", b"", "", 1], "replica op: record op: base must be at most 64 bytes, hlc a u64 and record non-empty"),
    (["c", b"k", b"rec", b"", "", -1], "replica op: record op: base must be at most 64 bytes, hlc a u64 and record non-empty"),
    (["c", b"k", b"rec", b"", "x" * 129, 1], "replica op: hint_for must be a node id of at most 128 characters"),
])
def test_a_malformed_op_costs_only_its_slot(op: list, message: str) -> None:
    batch_id, ops = decode_batch(msgpack.packb([1, 3, [op, ["r", b"fine"]]]))
    assert batch_id == 3 and ops[1] == ReadOp(b"fine")
    assert isinstance(ops[0], InvalidArgument) and str(ops[0]) == message


@pytest.mark.parametrize("payload,message", [
    (b"\xc1", "frame: payload is not valid msgpack"),
    (msgpack.packb([2, 1, []]), "batch: expected [1, id, ops]"),
    (msgpack.packb([1, "id", []]), "batch: id must be an integer and ops an array"),
])
def test_a_malformed_batch_envelope_raises(payload: bytes, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message.replace("[", r"\[").replace("]", r"\]")):
        decode_batch(payload)


def test_a_call_needs_version_kind_and_body() -> None:
    assert decode_call(msgpack.packb([1, "ping", None])) == ("ping", None)
    with pytest.raises(InvalidArgument, match="call: expected"):
        decode_call(msgpack.packb([1, 5, None]))

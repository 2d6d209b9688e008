"""Replica batch and call formats (kvstore/core/wire.py): validation of what peers send."""
from __future__ import annotations

import msgpack
import pytest

from kvstore.core.wire import MAX_KEY_BYTES, ReadOp, WriteOp, decode_batch, decode_call, encode_batch
from kvstore.errors import InvalidArgument


def test_batches_round_trip() -> None:
    ops = [WriteOp(b"k", [], "n2"), ReadOp(b"r")]
    assert decode_batch(encode_batch(7, ops)) == (7, ops)


@pytest.mark.parametrize("op,message", [
    (["r", b""], "replica op: key must be 1..65536 bytes, not 0"),
    (["w", b"k" * (MAX_KEY_BYTES + 1), [], ""], "replica op: key must be 1..65536 bytes, not 65537"),
    (["w", b"k", [], "x" * 129], "replica op: hint_for must be a node id of at most 128 characters"),
    (["q", b"k"], "replica op: unknown or malformed op 'q'"),
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

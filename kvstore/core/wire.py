"""Node-to-node message formats (pure): msgpack documents framed by internal.proto's Frame.

Every document starts with its format version. Decoders validate shape and types and raise
InvalidArgument naming the problem, so a malformed or hostile peer message costs that message only.

Replica batch (on the Stream RPC):   [1, batch_id, [op, ...]]
  op: ["w", key, siblings, hint_for]  merge `siblings` into the record (hint_for: "" or node id
                                      when the receiver holds the write for a down owner)
      ["c", key, record, base, hint_for, hlc]
                                      the coordinator's record after a write (`record`, encoded
                                      as stored) and the digest of the one it replaced (`base`,
                                      records.digest): a receiver whose record has that digest
                                      stores `record` as it is; any other merges its siblings in.
                                      `hlc`: the newest HLC in it (the receiver's clock observes it)
      ["r", key]                      read the record: the reply's payload is the stored record's
                                      bytes as they are, nil when there is none (earlier nodes
                                      sent the siblings array; records.siblings_from_reply reads both)
      ["p", key, [[node, counter], ...]]  purge: delete the record if it is exactly these
                                      tombstones (tombstone GC, after every replica has them)
Reply:                               [1, batch_id, [[code, payload], ...]]  (code 0 = ok)
Call (unary):                        [1, kind, body]  -> [1, code, body]
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import msgpack

from kvstore.core.records import siblings_from_wire, sibling_to_wire
from kvstore.core.versions import Sibling
from kvstore.errors import InvalidArgument
from kvstore.packing import packb

WIRE_FORMAT = 1
MAX_BATCH_OPS = 10_000
#: the largest key any node may be configured to accept (Limits.validate), and the longest node id
#: (membership): a replica op beyond them did not come from a coordinator's validated request
MAX_KEY_BYTES = 64 * 1024
MAX_NODE_ID_CHARS = 128


@dataclass(frozen=True, slots=True)
class WriteOp:
    key: bytes
    siblings: list[Sibling]
    hint_for: str = ""


@dataclass(frozen=True, slots=True)
class RecordOp:
    key: bytes
    record: bytes
    base: bytes
    hlc: int
    hint_for: str = ""


@dataclass(frozen=True, slots=True)
class ReadOp:
    key: bytes


@dataclass(frozen=True, slots=True)
class PurgeOp:
    key: bytes
    dots: frozenset[tuple[str, int]]


ReplicaOp = WriteOp | RecordOp | ReadOp | PurgeOp
#: the largest digest a RecordOp may name (records.digest makes 16 bytes)
MAX_DIGEST_BYTES = 64


def unpackb(data: bytes) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except (ValueError, TypeError, msgpack.UnpackException):
        raise InvalidArgument("frame: payload is not valid msgpack") from None


def encode_batch(batch_id: int, ops: Sequence[ReplicaOp]) -> bytes:
    wire = [_encode_op(op) for op in ops]
    return packb([WIRE_FORMAT, batch_id, wire])


def _encode_op(op: ReplicaOp) -> list:
    if isinstance(op, RecordOp):
        return ["c", op.key, op.record, op.base, op.hint_for, op.hlc]
    if isinstance(op, WriteOp):
        return ["w", op.key, [sibling_to_wire(s) for s in op.siblings], op.hint_for]
    if isinstance(op, PurgeOp):
        return ["p", op.key, [list(d) for d in sorted(op.dots)]]
    return ["r", op.key]


def decode_batch(data: bytes) -> tuple[int, list[ReplicaOp | InvalidArgument]]:
    """Decode a batch. A malformed op becomes an InvalidArgument in its slot; a malformed envelope
    raises (the batch id is unknown, so nothing can be answered)."""
    doc = unpackb(data)
    if not (isinstance(doc, list) and len(doc) == 3 and doc[0] == WIRE_FORMAT):
        raise InvalidArgument(f"batch: expected [{WIRE_FORMAT}, id, ops]")
    _, batch_id, raw_ops = doc
    if not isinstance(batch_id, int) or not isinstance(raw_ops, list):
        raise InvalidArgument("batch: id must be an integer and ops an array")
    if len(raw_ops) > MAX_BATCH_OPS:
        raise InvalidArgument(f"batch: {len(raw_ops)} ops exceeds the limit of {MAX_BATCH_OPS}")
    ops: list[ReplicaOp | InvalidArgument] = []
    for raw in raw_ops:
        try:
            ops.append(_decode_op(raw))
        except (ValueError, TypeError) as exc:
            ops.append(InvalidArgument(f"replica op: {exc}"))
    return batch_id, ops


def _decode_op(raw: Any) -> ReplicaOp:
    if not isinstance(raw, list) or not raw:
        raise ValueError("op must be a non-empty array")
    kind = raw[0]
    if len(raw) > 1 and isinstance(raw[1], bytes) and not 0 < len(raw[1]) <= MAX_KEY_BYTES:
        raise ValueError(f"key must be 1..{MAX_KEY_BYTES} bytes, not {len(raw[1])}")
    if kind == "c" and len(raw) == 6:
        _, key, record, base, hint_for, hlc = raw
        if not (isinstance(key, bytes) and isinstance(record, bytes) and isinstance(base, bytes)
                and isinstance(hint_for, str) and isinstance(hlc, int)):
            raise ValueError("record op must be [\"c\", key, record, base, hint_for, hlc]")
        if len(hint_for) > MAX_NODE_ID_CHARS:
            raise ValueError(f"hint_for must be a node id of at most {MAX_NODE_ID_CHARS} characters")
        if len(base) > MAX_DIGEST_BYTES or not 0 <= hlc < 1 << 64 or not record:
            raise ValueError(f"record op: base must be at most {MAX_DIGEST_BYTES} bytes, hlc a u64 "
                             "and record non-empty")
        return RecordOp(key, record, base, hlc, hint_for)
    if kind == "w" and len(raw) == 4 and isinstance(raw[3], str) and len(raw[3]) > MAX_NODE_ID_CHARS:
        raise ValueError(f"hint_for must be a node id of at most {MAX_NODE_ID_CHARS} characters")
    if kind == "w" and len(raw) == 4 and isinstance(raw[1], bytes) and isinstance(raw[3], str):
        return WriteOp(raw[1], siblings_from_wire(raw[2]), raw[3])
    if kind == "r" and len(raw) == 2 and isinstance(raw[1], bytes):
        return ReadOp(raw[1])
    if kind == "p" and len(raw) == 3 and isinstance(raw[1], bytes) and isinstance(raw[2], list):
        dots = raw[2]
        if not all(isinstance(d, list) and len(d) == 2 and isinstance(d[0], str) and isinstance(d[1], int)
                   for d in dots):
            raise ValueError("purge dots must be [node, counter] pairs")
        return PurgeOp(raw[1], frozenset((d[0], d[1]) for d in dots))
    raise ValueError(f"unknown or malformed op {str(kind)[:16]!r}")


def encode_reply(batch_id: int, results: Sequence[tuple[int, Any]]) -> bytes:
    return packb([WIRE_FORMAT, batch_id, [list(r) for r in results]])


def decode_reply(data: bytes) -> tuple[int, list[tuple[int, Any]]]:
    doc = unpackb(data)
    if not (isinstance(doc, list) and len(doc) == 3 and doc[0] == WIRE_FORMAT and isinstance(doc[2], list)):
        raise InvalidArgument("reply: expected [1, id, results]")
    results = []
    for r in doc[2]:
        if not (isinstance(r, list) and len(r) == 2 and isinstance(r[0], int)):
            raise InvalidArgument("reply: each result must be [code, payload]")
        results.append((r[0], r[1]))
    return doc[1], results


def encode_call(kind: str, body: Any) -> bytes:
    return packb([WIRE_FORMAT, kind, body])


def decode_call(data: bytes) -> tuple[str, Any]:
    doc = unpackb(data)
    if not (isinstance(doc, list) and len(doc) == 3 and doc[0] == WIRE_FORMAT and isinstance(doc[1], str)):
        raise InvalidArgument("call: expected [1, kind, body]")
    return doc[1], doc[2]

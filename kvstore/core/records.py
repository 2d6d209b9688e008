"""Byte formats (pure): stored records and client contexts, msgpack, versioned from day one.

A record is what one node stores for one key: its siblings. Sibling values are opaque bytes here
(sealed envelopes once encryption at rest is on). Every decoder checks the format version and
shape and raises a domain error naming what is wrong, so a corrupt record or a forged context
costs one request, never the node.
"""
from __future__ import annotations

import hashlib
from typing import Any, Sequence

import msgpack

from kvstore.core.versions import Sibling
from kvstore.errors import DataLoss, InvalidArgument
from kvstore.packing import packb as _packb

RECORD_FORMAT = 1
CONTEXT_FORMAT = 1
MAX_CONTEXT_BYTES = 64 * 1024
_U64 = (1 << 64) - 1
#: Counters a client's context may carry. A real counter grows by one per write of the key through
#: one node, so 2^53 is never reached; a forged one near 2^64 would leave the next write of that
#: node no counter to take (and, merged into the stored version vector, brick the key for it).
MAX_CONTEXT_COUNTER = 1 << 53


def _unpackb(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)


def _valid_vv(vv: Any) -> bool:
    if not isinstance(vv, dict):
        return False
    for n, c in vv.items():  # a loop, not all(<generator>): every decoded sibling comes here
        if not (isinstance(n, str) and isinstance(c, int) and 0 < c <= _U64):
            return False
    return True


def sibling_to_wire(s: Sibling) -> list:
    return [s.node, s.counter, dict(s.vv), s.hlc, s.expires_at_ms, s.value]


def sibling_from_wire(item: Any) -> Sibling:
    """Decode one sibling; raises ValueError on any malformed field."""
    if type(item) is list and len(item) == 6:
        # Every replicated op and stored record comes through here: first one test of the
        # well-formed case, then the field by field checks that name what is wrong.
        node, counter, vv, hlc, expires, value = item
        if (type(node) is str and node and type(counter) is int and 0 < counter <= _U64
                and type(hlc) is int and 0 <= hlc <= _U64 and type(expires) is int and 0 <= expires <= _U64
                and (value is None or type(value) is bytes) and _valid_vv(vv) and vv.get(node, 0) < counter):
            return Sibling(node, counter, vv, value, hlc, expires)
    if not isinstance(item, list) or len(item) != 6:
        raise ValueError("sibling must be a 6-element array")
    node, counter, vv, hlc, expires, value = item
    if not isinstance(node, str) or not node:
        raise ValueError("sibling node id must be a non-empty string")
    if not isinstance(counter, int) or not 0 < counter <= _U64:
        raise ValueError("sibling counter must be in 1..2^64-1")
    if not _valid_vv(vv):
        raise ValueError("sibling version vector must map node ids to counters in 1..2^64-1")
    if vv.get(node, 0) >= counter:  # it would cover its own dot: merge drops it, and what its vv covers
        raise ValueError(f"sibling ({node}, {counter}) has a version vector that already covers its own dot")
    if not isinstance(hlc, int) or not 0 <= hlc <= _U64:
        raise ValueError("sibling hlc must be in 0..2^64-1")
    if not isinstance(expires, int) or not 0 <= expires <= _U64:
        raise ValueError("sibling expires_at_ms must be in 0..2^64-1")
    if value is not None and not isinstance(value, bytes):
        raise ValueError("sibling value must be bytes or nil")
    return Sibling(node, counter, vv, value, hlc, expires)


def siblings_from_wire(items: Any) -> list[Sibling]:
    if not isinstance(items, list):
        raise ValueError("siblings must be an array")
    return [sibling_from_wire(item) for item in items]


def encode_record(siblings: Sequence[Sibling]) -> bytes:
    return _packb([RECORD_FORMAT, [sibling_to_wire(s) for s in siblings]])


def _record_siblings(data: bytes) -> list[Sibling]:
    try:
        doc = _unpackb(data)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise ValueError(f"record is not msgpack: {exc}") from None
    if not isinstance(doc, list) or len(doc) < 2:
        raise ValueError("record must be an array [format, siblings]")
    if doc[0] != RECORD_FORMAT:
        raise ValueError(f"unknown record format {doc[0]!r} (this node reads {RECORD_FORMAT})")
    return siblings_from_wire(doc[1])


def decode_record(data: bytes, key: bytes = b"") -> list[Sibling]:
    """Decode a stored record; a corrupt one raises DataLoss naming the key."""
    try:
        return _record_siblings(data)
    except (ValueError, TypeError) as exc:
        raise DataLoss(f"record of key {key!r} is corrupt: {exc}") from None


def digest(data: bytes | None) -> bytes:
    """What names a stored record's exact bytes on the wire: 16 bytes of SHA-256 (empty for no
    record). A coordinator ships its new record with the digest of the one it replaced; a replica
    whose record has that digest holds the same siblings, so the shipped record is exactly their
    merge, and it stores it without decoding or merging anything (wire.RecordOp)."""
    return hashlib.sha256(data).digest()[:16] if data else b""


def siblings_from_reply(payload: Any) -> list[Sibling]:
    """A replica's answer to a read op: the bytes of its stored record as they are (None when it
    holds none), so it decodes nothing and a reader holding the same bytes decodes nothing more;
    older nodes sent the siblings as an array. Raises ValueError when malformed."""
    if payload is None:
        return []
    if isinstance(payload, bytes):
        return _record_siblings(payload)
    return siblings_from_wire(payload)


def value_aad(key: bytes, node: str, counter: int) -> bytes:
    """The encryption context a sibling's value is sealed under: its key and its dot. Both travel
    with the value through replication, hints and streams, so a replica never needs to re-seal,
    and a value moved to another key or another version fails to open."""
    return _packb([b"kvstore-value-v1", key, node, counter])


def encode_context(vv: dict[str, int]) -> bytes:
    return _packb([CONTEXT_FORMAT, vv])


def decode_context(data: bytes) -> dict[str, int]:
    """Decode a client-supplied context; empty bytes mean "no context" (a blind write)."""
    if not data:
        return {}
    if len(data) > MAX_CONTEXT_BYTES:
        raise InvalidArgument(f"context: {len(data)} bytes exceeds the limit of {MAX_CONTEXT_BYTES}")
    try:
        doc = _unpackb(data)
    except (ValueError, TypeError, msgpack.UnpackException):
        raise InvalidArgument("context: not a context returned by kvstore (undecodable)") from None
    if not isinstance(doc, list) or len(doc) != 2 or doc[0] != CONTEXT_FORMAT or not _valid_vv(doc[1]):
        raise InvalidArgument("context: not a context returned by kvstore (bad format)")
    for node, counter in doc[1].items():
        if counter > MAX_CONTEXT_COUNTER:
            raise InvalidArgument(f"context: counter {counter} of node {node[:64]!r} exceeds the limit of 2^53")
    return doc[1]

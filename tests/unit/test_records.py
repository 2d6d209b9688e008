"""Record and context byte formats: round trips, version checks, hostile input."""
from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.core.records import (
    decode_context,
    decode_record,
    encode_context,
    encode_record,
    sibling_to_wire,
    siblings_from_reply,
)
from kvstore.core.versions import Sibling
from kvstore.errors import DataLoss, InvalidArgument

siblings = st.lists(
    st.builds(
        Sibling,
        node=st.text(min_size=1, max_size=8),
        counter=st.integers(1, 2**64 - 1),
        vv=st.dictionaries(st.text(min_size=1, max_size=4), st.integers(1, 2**64 - 1), max_size=3),
        value=st.one_of(st.none(), st.binary(max_size=64)),
        hlc=st.integers(0, 2**64 - 1),
        expires_at_ms=st.integers(0, 2**64 - 1),
    ).filter(lambda s: s.vv.get(s.node, 0) < s.counter),  # a valid sibling never covers its own dot
    max_size=4,
)


@settings(max_examples=100)
@given(siblings)
def test_record_round_trips(sibs: list[Sibling]) -> None:
    assert decode_record(encode_record(sibs)) == sibs


def test_record_carries_its_format_version() -> None:
    assert msgpack.unpackb(encode_record([]))[0] == 1


def test_unknown_record_format_is_data_loss_naming_the_key() -> None:
    with pytest.raises(DataLoss, match="b'k'.*unknown record format 9"):
        decode_record(msgpack.packb([9, []]), b"k")


@settings(max_examples=200)
@given(st.binary(max_size=64))
def test_random_bytes_never_decode_to_garbage(data: bytes) -> None:
    try:
        decode_record(data)
    except DataLoss:
        pass


def test_context_round_trips_and_empty_means_none() -> None:
    assert decode_context(encode_context({"a": 3})) == {"a": 3}
    assert decode_context(b"") == {}


@pytest.mark.parametrize("bad", [b"\xff", msgpack.packb([2, {}]), msgpack.packb([1, {"a": -1}]),
                                 msgpack.packb([1, {"a": "x"}]), msgpack.packb("hello")])
def test_forged_context_is_invalid_argument(bad: bytes) -> None:
    with pytest.raises(InvalidArgument, match="context"):
        decode_context(bad)


def test_oversized_context_names_the_limit() -> None:
    with pytest.raises(InvalidArgument, match="exceeds the limit of 65536"):
        decode_context(b"x" * 70000)


def test_context_counters_beyond_two_to_the_53_are_refused() -> None:
    import msgpack

    from kvstore.core.records import MAX_CONTEXT_COUNTER, decode_context

    assert decode_context(msgpack.packb([1, {"n1": MAX_CONTEXT_COUNTER}])) == {"n1": MAX_CONTEXT_COUNTER}
    with pytest.raises(InvalidArgument, match=r"context: counter 9007199254740993 of node 'n1' exceeds"):
        decode_context(msgpack.packb([1, {"n1": MAX_CONTEXT_COUNTER + 1}]))


def test_a_sibling_whose_vector_covers_its_own_dot_is_refused() -> None:
    # merge([s]) would drop it, and its vector would wipe the siblings it claims to have seen
    forged = encode_record([Sibling("n1", 5, {"n1": 5, "n2": 9}, b"v", 1)])
    with pytest.raises(DataLoss, match=r"\(n1, 5\) has a version vector that already covers its own dot"):
        decode_record(forged, b"k")


@settings(max_examples=200)
@given(siblings)
def test_a_read_reply_decodes_from_record_bytes_and_from_the_older_array_form(sibs: list[Sibling]) -> None:
    """Replicas answer read ops with their stored record's bytes; nodes before that sent the
    siblings as an array. Both decode to the same siblings; None means the replica holds none."""
    assert siblings_from_reply(encode_record(sibs)) == sibs
    assert siblings_from_reply([sibling_to_wire(s) for s in sibs]) == sibs
    assert siblings_from_reply(None) == []


@pytest.mark.parametrize("bad", [b"\xc1", msgpack.packb([99, []]), msgpack.packb([1, [["n", 0, {}, 0, 0, None]]]), 7])
def test_a_malformed_read_reply_is_a_value_error_not_a_crash(bad) -> None:
    with pytest.raises((ValueError, TypeError)):
        siblings_from_reply(bad)

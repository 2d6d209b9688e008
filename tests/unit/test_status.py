"""The one map between domain errors and gRPC statuses: what a node raises is what a client catches."""
from __future__ import annotations

import pytest

from kvstore.config import NodeConfig
from kvstore.errors import ALL_ERRORS, KvError, Overloaded, ResourceExhausted
from kvstore.node.limits import Admission
from kvstore.node.status import code_of, error_from, message_of, number_of


@pytest.mark.parametrize("cls", ALL_ERRORS, ids=lambda c: c.__name__)
def test_every_domain_error_survives_the_trip_to_a_client(cls: type[KvError]) -> None:
    sent = cls("what went wrong")
    for code in (code_of(sent), number_of(code_of(sent))):  # as a status, and as a replica reply's number
        got = error_from(code, message_of(sent))
        assert type(got) is cls
        assert str(got) == "what went wrong"
        assert got.retryable == sent.retryable


def test_an_admission_refusal_reaches_the_client_as_retryable_overloaded() -> None:
    admission = Admission(NodeConfig(max_concurrent_requests=1))
    admission.admit("client", "conn-1")
    with pytest.raises(Overloaded) as refused:
        admission.admit("client", "conn-2")
    got = error_from(code_of(refused.value), message_of(refused.value))
    assert isinstance(got, Overloaded) and got.retryable
    assert "max_concurrent_requests is 1" in str(got)


def test_other_resource_exhausted_errors_stay_not_retryable() -> None:
    too_big = ResourceExhausted("key k has 101 siblings, over the limit of 100")
    got = error_from(code_of(too_big), message_of(too_big))
    assert type(got) is ResourceExhausted and not got.retryable

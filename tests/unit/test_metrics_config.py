"""Where a node serves its metrics (metrics_listen) and how the setting is validated."""
from __future__ import annotations

import pytest

from kvstore.config import profile
from kvstore.node.metrics import metrics_address


def test_auto_serves_at_the_grpc_port_plus_1000_on_loopback_or_the_listen_address() -> None:
    assert metrics_address("auto", "0.0.0.0:7000") == "127.0.0.1:8000"
    assert metrics_address("auto", "[::]:7000") == "127.0.0.1:8000"
    assert metrics_address("auto", "10.1.2.3:7000") == "10.1.2.3:8000"  # e.g. a node in its own netns
    assert metrics_address("auto", "127.0.0.1:0") == "127.0.0.1:0"  # any free port, like gRPC
    assert metrics_address("off", "127.0.0.1:7000") is None
    assert metrics_address("10.0.0.5:9100", "127.0.0.1:7000") == "10.0.0.5:9100"


def test_metrics_are_on_by_default_and_off_in_the_test_profile() -> None:
    assert profile("lan").metrics_listen == "auto"
    assert profile("local").metrics_listen == "auto"
    assert profile("test").metrics_listen == "off"


@pytest.mark.parametrize("value, message", [
    ("9100", "metrics_listen: '9100' is not host:port"),
    ("localhost:http", "metrics_listen: 'localhost:http' is not host:port"),
])
def test_bad_metrics_addresses_are_refused_naming_the_field(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        profile("lan", metrics_listen=value, insecure=True).validate()


def test_auto_refuses_a_listen_port_whose_metrics_port_would_not_exist() -> None:
    with pytest.raises(ValueError, match="metrics_listen: auto would use port 65600"):
        profile("lan", listen="127.0.0.1:64600", insecure=True).validate()
    assert profile("lan", listen="127.0.0.1:64600", metrics_listen="off", insecure=True).validate()


def test_drain_notice_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="drain_notice_s: must be >= 0"):
        profile("lan", drain_notice_s=-1.0, insecure=True).validate()

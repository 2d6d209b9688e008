"""Consistency levels, request limits and configuration validation."""
from __future__ import annotations

from pathlib import Path

import pytest

from kvstore import config
from kvstore.core import quorum
from kvstore.core.limits import Limits
from kvstore.core.quorum import Level, Named
from kvstore.errors import InvalidArgument, ResourceExhausted


@pytest.mark.parametrize("n,level,expected", [
    (3, Level(Named.ONE), 1), (3, Level(Named.QUORUM), 2), (3, Level(Named.ALL), 3),
    (5, Level(Named.QUORUM), 3), (3, Level(count=2), 2), (3, Level(), 2), (1, Level(Named.QUORUM), 1),
])
def test_levels_resolve_against_n(n: int, level: Level, expected: int) -> None:
    assert quorum.required("w", level, n) == expected


def test_level_above_n_names_field_and_limit() -> None:
    with pytest.raises(InvalidArgument, match=r"w: 4 exceeds the replication factor n=3"):
        quorum.required("w", Level(count=4), 3)


def test_unknown_level_is_rejected() -> None:
    with pytest.raises(InvalidArgument, match="r: unknown consistency level 7"):
        quorum.required("r", Level(7), 3)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="'most'"):
        Level.parse("most")


def test_level_parse_accepts_names_and_numbers() -> None:
    assert Level.parse("Quorum") == Level(Named.QUORUM)
    assert Level.parse("2") == Level(count=2)
    assert Level.parse(None) == Level()


def test_n_outside_range_is_rejected() -> None:
    assert quorum.resolve_n(0, 3) == 3
    with pytest.raises(InvalidArgument, match="n: 17 is outside 1..16"):
        quorum.resolve_n(17, 3)


def test_key_and_value_limits_name_field_and_limit() -> None:
    limits = Limits(max_value_bytes=10)
    with pytest.raises(InvalidArgument, match="key: must not be empty"):
        limits.check_key(b"")
    with pytest.raises(InvalidArgument, match="key: 1025 bytes exceeds the limit of 1024 bytes"):
        limits.check_key(b"k" * 1025)
    limits.check_key(b"k" * 1024)
    with pytest.raises(InvalidArgument, match="value: 11 bytes exceeds the limit of 10 bytes"):
        limits.check_value(b"v" * 11)
    with pytest.raises(ResourceExhausted, match="101 siblings, over the limit of 100"):
        limits.check_siblings(101, b"k")


def test_profiles_are_deltas_from_base() -> None:
    local = config.profile("local")
    assert local.gossip_interval_s < config.BASE.gossip_interval_s
    assert local.replication_factor == config.BASE.replication_factor
    with pytest.raises(ValueError, match="profile: 'wan'"):
        config.profile("wan")


@pytest.mark.parametrize("change,message", [
    ({"fsync": "sometimes"}, "fsync: 'sometimes'"),
    ({"replication_factor": 0}, "replication_factor"),
    ({"listen": "nohost"}, "listen: 'nohost' is not host:port"),
    ({"replica_timeout_s": 10.0, "request_timeout_s": 5.0}, "replica_timeout_s"),
])
def test_validate_names_the_bad_field(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        config.BASE.replace(**change).validate()


def test_toml_file_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text('profile = "local"\nlisten = "127.0.0.1:7100"\nseeds = ["127.0.0.1:7000"]\ninsecure = true\n'
                    '[limits]\nmax_value_bytes = 2048\n')
    cfg = config.load(path, None, listen="127.0.0.1:7200")
    assert cfg.listen == "127.0.0.1:7200"
    assert cfg.seeds == ("127.0.0.1:7000",)
    assert cfg.gossip_interval_s == config.PROFILES["local"]["gossip_interval_s"]
    assert cfg.limits.max_value_bytes == 2048


def test_unknown_toml_setting_is_named(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text("replicas = 3\n")
    with pytest.raises(ValueError, match="replicas: unknown setting"):
        config.load(path)

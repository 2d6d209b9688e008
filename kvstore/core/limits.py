"""Request limits and input validation (pure). Messages name the field and the limit."""
from __future__ import annotations

from dataclasses import dataclass

from kvstore.errors import InvalidArgument, ResourceExhausted


@dataclass(frozen=True)
class Limits:
    max_key_bytes: int = 1024          # Riak/Cassandra-style keys are short; long keys bloat every index
    max_value_bytes: int = 1 << 20     # 1 MiB: larger values belong in a blob store
    max_batch_items: int = 1000        # one batch is one transaction and one message
    warn_siblings: int = 25            # Riak's warning threshold (riak_kv #680)
    max_siblings: int = 100            # Riak's hard limit: beyond it writes are refused
    max_ttl_s: int = 10 * 365 * 86400  # ten years
    max_vv_entries: int = 64           # version vector entries before departed nodes are pruned

    def validate(self) -> "Limits":
        if not 1 <= self.max_key_bytes <= 64 * 1024:
            raise ValueError("max_key_bytes must be in 1..65536")
        if not 0 <= self.max_value_bytes <= 64 << 20:
            raise ValueError("max_value_bytes must be in 0..64 MiB")
        if not 1 <= self.warn_siblings <= self.max_siblings:
            raise ValueError("warn_siblings must be in 1..max_siblings")
        return self

    @property
    def max_message_bytes(self) -> int:
        """gRPC message limit: a batch of several values (clients coalesce up to 4 MiB, replica
        batches carry up to 512 ops) plus one maximal value; per-item limits are checked apart."""
        return max(64 << 20, 2 * (self.max_value_bytes + self.max_key_bytes) + (4 << 20))

    def check_key(self, key: bytes, field: str = "key") -> None:
        if not key:
            raise InvalidArgument(f"{field}: must not be empty")
        if len(key) > self.max_key_bytes:
            raise InvalidArgument(
                f"{field}: {len(key)} bytes exceeds the limit of {self.max_key_bytes} bytes"
            )

    def check_value(self, value: bytes, field: str = "value") -> None:
        if len(value) > self.max_value_bytes:
            raise InvalidArgument(
                f"{field}: {len(value)} bytes exceeds the limit of {self.max_value_bytes} bytes"
            )

    def check_ttl(self, ttl_s: int) -> None:
        if not 0 <= ttl_s <= self.max_ttl_s:
            raise InvalidArgument(f"ttl_s: {ttl_s} is outside 0..{self.max_ttl_s}")

    def check_batch(self, count: int, field: str = "items") -> None:
        if count > self.max_batch_items:
            raise InvalidArgument(f"{field}: {count} items exceeds the limit of {self.max_batch_items}")

    def check_siblings(self, count: int, key: bytes) -> None:
        if count > self.max_siblings:
            raise ResourceExhausted(
                f"key {key[:64]!r} would have {count} siblings, over the limit of "
                f"{self.max_siblings}: read it and write back a resolved value with its context"
            )

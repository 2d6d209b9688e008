"""kvstore: a Dynamo-style distributed key-value store.

The public surface: `Client` (trio) and `SyncClient`, the resolver helpers, and the error classes.
The clients load lazily, so pure modules (kvstore.core) import without grpc.
"""
from typing import Any

from kvstore.errors import (
    DataLoss,
    DeadlineExceeded,
    InvalidArgument,
    KvError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    StaleContext,
    Unauthenticated,
    Unavailable,
)

_CLIENT_NAMES = ("Client", "SyncClient", "Version", "Versions", "latest")

__all__ = [
    *_CLIENT_NAMES,
    "KvError", "InvalidArgument", "NotFound", "StaleContext", "Unavailable", "DeadlineExceeded",
    "ResourceExhausted", "DataLoss", "Unauthenticated", "PermissionDenied",
]


def __getattr__(name: str) -> Any:
    if name in _CLIENT_NAMES:
        from kvstore import client

        return getattr(client, name)
    raise AttributeError(f"module 'kvstore' has no attribute {name!r}")

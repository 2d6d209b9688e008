"""kvstore: a Dynamo-style distributed key-value store.

The public surface: `Client` (trio) and `SyncClient`, the resolver helpers, and the error classes.
"""
from kvstore.client import Client, SyncClient, Version, Versions, latest
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

__all__ = [
    "Client", "SyncClient", "Version", "Versions", "latest",
    "KvError", "InvalidArgument", "NotFound", "StaleContext", "Unavailable", "DeadlineExceeded",
    "ResourceExhausted", "DataLoss", "Unauthenticated", "PermissionDenied",
]

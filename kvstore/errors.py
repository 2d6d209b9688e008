"""The domain errors of kvstore: a small flat set, each naming who must act.

Pure: no gRPC here. kvstore/node/status.py maps these to gRPC status codes (the one map), and the
client maps status codes back to these classes, so callers catch the same exceptions whether an
error was raised locally or on a node.
"""
from __future__ import annotations


class KvError(Exception):
    """Base class of every kvstore error."""

    #: gRPC status code name this error travels as (see kvstore/node/status.py).
    code_name = "UNKNOWN"
    #: True when repeating the same request later may succeed.
    retryable = False


class InvalidArgument(KvError):
    """The request is malformed: the message names the field and the limit. Fix the request."""

    code_name = "INVALID_ARGUMENT"


class NotFound(KvError):
    """The key has no live value."""

    code_name = "NOT_FOUND"


class StaleContext(KvError):
    """A conditional write's context no longer covers the current versions: read again, retry."""

    code_name = "FAILED_PRECONDITION"


class Unavailable(KvError):
    """Not enough replicas answered in time (the message names acks got/needed). Retryable."""

    code_name = "UNAVAILABLE"
    retryable = True


class DeadlineExceeded(KvError):
    """The request's deadline passed; the outcome of a write is unknown."""

    code_name = "DEADLINE_EXCEEDED"


class ResourceExhausted(KvError):
    """Too large, too many siblings, or the node is overloaded (the message says which)."""

    code_name = "RESOURCE_EXHAUSTED"


class Overloaded(ResourceExhausted):
    """The node refused the request at once because a concurrency or memory budget is spent (the
    message names it and its limit). Nothing was done: retry with backoff, or ask another node.
    It travels as RESOURCE_EXHAUSTED with a message starting with OVERLOADED_PREFIX, which is how
    a client tells it from the other RESOURCE_EXHAUSTED errors (those are not retryable)."""

    retryable = True


OVERLOADED_PREFIX = "overloaded: "


class DataLoss(KvError):
    """Stored data failed an integrity check (e.g. an envelope did not authenticate)."""

    code_name = "DATA_LOSS"


class Unauthenticated(KvError):
    """No identity, or one the node does not know (a certificate without a kvstore identity, an
    unknown bearer token): present a client certificate of the cluster CA or a valid token."""

    code_name = "UNAUTHENTICATED"


class PermissionDenied(KvError):
    """The caller's identity lacks the role the method needs (the message names both); never
    says anything about the keys in the request. Ask an operator for the role."""

    code_name = "PERMISSION_DENIED"


class Internal(KvError):
    """A bug or an unexpected failure inside a node."""

    code_name = "INTERNAL"


ALL_ERRORS: tuple[type[KvError], ...] = (
    InvalidArgument,
    NotFound,
    StaleContext,
    Unavailable,
    DeadlineExceeded,
    ResourceExhausted,
    DataLoss,
    Unauthenticated,
    PermissionDenied,
    Internal,
)
BY_CODE_NAME: dict[str, type[KvError]] = {cls.code_name: cls for cls in ALL_ERRORS}

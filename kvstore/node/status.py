"""The one map between domain errors (kvstore.errors) and gRPC status codes, both directions."""
from __future__ import annotations

import grpc

from kvstore.errors import BY_CODE_NAME, OVERLOADED_PREFIX, Internal, KvError, Overloaded


def code_of(exc: BaseException) -> grpc.StatusCode:
    """The status code an exception travels as; anything not a KvError is INTERNAL."""
    name = exc.code_name if isinstance(exc, KvError) else "INTERNAL"
    return grpc.StatusCode[name]


def message_of(exc: BaseException) -> str:
    if isinstance(exc, KvError):
        return str(exc) or type(exc).__name__
    return f"internal error: {type(exc).__name__}"  # never leak internals to a client


def number_of(code: grpc.StatusCode) -> int:
    return code.value[0]


_BY_NUMBER = {c.value[0]: c for c in grpc.StatusCode}


def error_from(code: grpc.StatusCode | int, message: str) -> KvError:
    """The domain error for a status received from a node (the client side of the map)."""
    if isinstance(code, int):
        code = _BY_NUMBER.get(code, grpc.StatusCode.UNKNOWN)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and message.startswith(OVERLOADED_PREFIX):
        return Overloaded(message)  # refused at admission: nothing was done, so it is retryable
    cls = BY_CODE_NAME.get(code.name, Internal)
    return cls(message)

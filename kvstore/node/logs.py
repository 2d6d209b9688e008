"""Structured logs and request ids: the log formats (text, one JSON object per line), the context
variables that tag every record with its node and request id, and carrying them across the bridge.

A request id comes from the client's `x-request-id` metadata or is generated per RPC (see
kvstore/node/interceptor.py). Context variables follow trio tasks (a child task copies its
parent's), but work handed from the transport thread to trio starts in a fresh context, so
`carry` re-establishes both variables on the trio side.
"""
from __future__ import annotations

import contextvars
import datetime
import itertools
import json
import logging
import secrets
import sys
from typing import Any, Awaitable, Callable

from kvstore.errors import InvalidArgument

REQUEST_ID_HEADER = "x-request-id"
#: ids are logged and echoed back: keep them short and printable (W3C trace ids are 32 hex chars)
MAX_REQUEST_ID_CHARS = 128
_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:/")

LOG_FORMATS = ("text", "json")

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("kvstore_request_id", default=None)
node_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("kvstore_node_id", default=None)

# Generated ids: a random per-process prefix and a counter. Unique across nodes and restarts in
# practice, and a fraction of the cost of uuid4 on a path taken by every RPC.
_PREFIX = secrets.token_hex(4)
_counter = itertools.count(1)


def new_request_id() -> str:
    return f"{_PREFIX}-{next(_counter):x}"


def check_request_id(value: str) -> str:
    """A client-supplied id, or InvalidArgument naming the header and the limit."""
    if not 1 <= len(value) <= MAX_REQUEST_ID_CHARS or not _ID_CHARS.issuperset(value):
        raise InvalidArgument(
            f"{REQUEST_ID_HEADER}: must be 1..{MAX_REQUEST_ID_CHARS} characters of letters, digits and "
            f"-_.:/ (got {len(value)} characters)"
        )
    return value


def request_metadata() -> tuple[tuple[str, str], ...]:
    """Metadata that passes the current request id on to another node (forwarded requests)."""
    rid = request_id.get()
    return ((REQUEST_ID_HEADER, rid),) if rid else ()


def carry(fn: Callable[..., Awaitable[Any]], node: str | None) -> Callable[..., Awaitable[Any]]:
    """`fn` wrapped so it runs with the caller's request id and the given node id, wherever it is
    started (Transport.to_trio starts it in a context of its own)."""
    rid = request_id.get()

    async def with_ids(*args: Any) -> Any:
        request_id.set(rid)
        node_id.set(node)
        return await fn(*args)

    return with_ids


# ---- formatting ------------------------------------------------------------------------------

class _Tag(logging.Filter):
    """Adds `node` and `request_id` to every record (None when not known)."""

    def __init__(self, default_node: Callable[[], str | None]) -> None:
        super().__init__()
        self.default_node = default_node

    def filter(self, record: logging.LogRecord) -> bool:
        record.node = node_id.get() or self.default_node()
        record.request_id = request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC, ISO 8601, ms), level, logger, node, msg, and request_id
    and exc when there are any."""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
        doc: dict[str, Any] = {
            "ts": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "node": getattr(record, "node", None),
            "msg": record.getMessage(),
        }
        rid = getattr(record, "request_id", None)
        if rid:
            doc["request_id"] = rid
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """The classic line, with the request id appended when there is one."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        rid = getattr(record, "request_id", None)
        return f"{line} [request_id={rid}]" if rid else line


_process_node: list[str | None] = [None]


def set_process_node(node: str) -> None:
    """The node id for records logged outside any node's context (one node per process)."""
    _process_node[0] = node


def make_handler(fmt: str, stream: Any = None) -> logging.Handler:
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log_format: {fmt!r} is not one of {', '.join(LOG_FORMATS)}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.addFilter(_Tag(lambda: _process_node[0]))
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    return handler


def configure(level: str | int, fmt: str, stream: Any = None) -> logging.Handler:
    """Replace the root logger's handlers with one writing `fmt` ("text" or "json")."""
    handler = make_handler(fmt, stream)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    return handler

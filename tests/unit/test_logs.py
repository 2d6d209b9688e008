"""Log formats, request-id validation and carrying ids into tasks (kvstore/node/logs.py)."""
from __future__ import annotations

import io
import json
import logging

import pytest
import trio

from kvstore.config import profile
from kvstore.errors import InvalidArgument
from kvstore.node import logs


def _logger_writing(fmt: str) -> tuple[logging.Logger, io.StringIO]:
    buffer = io.StringIO()
    logger = logging.getLogger(f"kvstore.test.{fmt}")
    logger.handlers[:] = [logs.make_handler(fmt, buffer)]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger, buffer


def test_json_lines_carry_node_request_id_and_exception() -> None:
    logger, buffer = _logger_writing("json")
    token_node, token_rid = logs.node_id.set("n7"), logs.request_id.set("rid-1")
    try:
        logger.info("stored %d keys", 3)
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")
    finally:
        logs.node_id.reset(token_node)
        logs.request_id.reset(token_rid)
    logger.warning("outside a request")
    first, second, third = [json.loads(line) for line in buffer.getvalue().splitlines()]
    assert first["msg"] == "stored 3 keys" and first["level"] == "INFO"
    assert first["logger"] == "kvstore.test.json" and first["node"] == "n7" and first["request_id"] == "rid-1"
    assert first["ts"].endswith("Z") and "T" in first["ts"]
    assert "ValueError: boom" in second["exc"]
    assert "request_id" not in third and third["level"] == "WARNING"


def test_text_lines_append_the_request_id_only_when_known() -> None:
    logger, buffer = _logger_writing("text")
    logger.info("plain")
    token = logs.request_id.set("rid-2")
    try:
        logger.info("traced")
    finally:
        logs.request_id.reset(token)
    plain, traced = buffer.getvalue().splitlines()
    assert plain.endswith("kvstore.test.text: plain")
    assert traced.endswith("traced [request_id=rid-2]")


def test_unknown_log_format_is_refused_naming_the_field() -> None:
    with pytest.raises(ValueError, match="log_format"):
        logs.make_handler("xml")
    with pytest.raises(ValueError, match="log_format: 'xml'"):
        profile("test", log_format="xml").validate()


@pytest.mark.parametrize("value", ["", "a" * (logs.MAX_REQUEST_ID_CHARS + 1), "two words", "new\nline", "é"])
def test_bad_request_ids_are_refused_naming_header_and_limit(value: str) -> None:
    with pytest.raises(InvalidArgument, match=f"x-request-id: must be 1..{logs.MAX_REQUEST_ID_CHARS}"):
        logs.check_request_id(value)


def test_good_request_ids_pass_and_generated_ones_are_distinct_and_valid() -> None:
    trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    assert logs.check_request_id(trace) == trace
    generated = {logs.new_request_id() for _ in range(1000)}
    assert len(generated) == 1000
    assert all(logs.check_request_id(g) == g for g in generated)


async def test_carry_sets_ids_in_a_fresh_task_and_its_children() -> None:
    seen: list[tuple[str | None, str | None]] = []

    async def work() -> None:
        seen.append((logs.request_id.get(), logs.node_id.get()))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(child)

    async def child() -> None:
        seen.append((logs.request_id.get(), logs.node_id.get()))

    token = logs.request_id.set("rid-3")
    try:
        wrapped = logs.carry(work, "n9")
    finally:
        logs.request_id.reset(token)
    # the task starts in a context without the id, as work handed over from the transport does
    async with trio.open_nursery() as nursery:
        nursery.start_soon(wrapped)
    assert seen == [("rid-3", "n9"), ("rid-3", "n9")]
    assert logs.request_id.get() is None  # nothing leaked into the caller's context

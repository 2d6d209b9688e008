"""Counting KV items by status code (Metrics.count_items)."""
from __future__ import annotations

from kvstore._proto import kv_pb2
from kvstore.node.api import OK
from kvstore.node.metrics import Metrics


def _items(metrics: Metrics) -> dict[tuple[str, str], float]:
    return {(s.labels["op"], s.labels["code"]): s.value
            for family in metrics.items.collect() for s in family.samples if s.name == "kvstore_items_total"}


async def test_items_count_once_each_whether_shared_copied_or_failed() -> None:
    metrics = Metrics(object())  # the collector is never asked here
    forwarded_ok = kv_pb2.ItemStatus(code=0)  # an equal copy, as in a reply from another node
    failed = kv_pb2.ItemStatus(code=14, message="w: got 1 of 2 acknowledgements needed")
    metrics.count_items("put", [OK, forwarded_ok, failed, OK, failed])
    metrics.count_items("get", [OK] * 64)
    metrics.count_items("delete", [kv_pb2.ItemStatus(code=3, message="key: empty")])
    assert _items(metrics) == {("put", "OK"): 3, ("put", "UNAVAILABLE"): 2, ("get", "OK"): 64,
                               ("delete", "INVALID_ARGUMENT"): 1}

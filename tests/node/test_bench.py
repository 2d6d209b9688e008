"""`kvstore bench` against real nodes: what it counts is what happened, errors land by code."""
from __future__ import annotations

from kvstore.bench import BenchConfig, run_bench


def _config(nodes, **overrides) -> BenchConfig:
    base = dict(addresses=tuple(n.address for n in nodes), duration_s=30.0, max_ops=600, concurrency=16,
                keys=200, value_bytes=64, progress=False)
    base.update(overrides)
    return BenchConfig(**base).validate()


async def test_a_mixed_run_counts_every_op_it_issued_and_reports_sane_latencies(nodes) -> None:
    cluster = await nodes.cluster(3)
    report = await run_bench(_config(cluster, put_ratio=0.5, get_ratio=0.4, delete_ratio=0.1))
    ops = report["ops"]
    assert sum(o["ok"] for o in ops.values()) == 600  # bounded by op count, nothing failed
    assert all(not o["errors"] for o in ops.values())
    assert ops["put"]["ok"] > ops["delete"]["ok"] > 0 and ops["get"]["ok"] > ops["delete"]["ok"]
    for o in ops.values():
        assert 0 < o["p50_ms"] <= o["p99_ms"] <= o["max_ms"]
    assert report["client_cpu_s"] > 0 and report["server_cpu_s"] is not None


async def test_a_single_kind_run_reports_only_that_kind(nodes) -> None:
    cluster = await nodes.cluster(1)
    report = await run_bench(_config(cluster, put_ratio=0.0, get_ratio=1.0, max_ops=300))
    assert list(report["ops"]) == ["get"]
    assert report["ops"]["get"]["ok"] == 300
    async with nodes.client(*cluster) as kv:  # the prefill wrote every key, so the gets found values
        found = await kv.get_many([b"bench-%08d" % i for i in range(200)])
    assert all(v.found for v in found)


async def test_failed_ops_are_counted_by_error_code_not_as_ok(nodes) -> None:
    # w=2 on a one-node cluster: each write gets one acknowledgement of the two it asks for
    cluster = await nodes.cluster(1)
    report = await run_bench(_config(cluster, put_ratio=1.0, get_ratio=0.0, max_ops=100, w="2", prefill=False))
    put = report["ops"]["put"]
    assert put["ok"] == 0
    assert put["errors"] == {"UNAVAILABLE": 100}

"""Interpreter settings for kvstore's own long-running processes (a node, `kvstore bench`).

Not applied by the client library: a process that imports kvstore.client keeps its own settings.

The cyclic garbage collector. With CPython's default thresholds (700, 10, 10) a node under load
ran a young-generation collection every few hundred allocations, and the older generations swept
every object the node had built at startup (grpc, protobuf descriptors, the ring, the keyring)
again and again: `perf` put gc_collect_main and its visitors at about a tenth of the CPU of a
3-node cluster taking puts. Almost nothing a request allocates is cyclic: reference counting
frees it. So after startup everything alive is frozen into the permanent generation (never
scanned again), and young collections run every GC_GEN0_THRESHOLD allocations. Measured with
scripts/bench-vs-etcd's workload (3 nodes, 64 in flight, 1 KiB): server CPU per get 222-265 ->
175-247 µs and get p99 35-47 -> 23-28 ms; puts 283-365 -> 260-355 µs (see docs/benchmarks.md).
Cycles are still collected, just less often; memory stays bounded (a generation holds at most
GC_GEN0_THRESHOLD young container objects).
"""
from __future__ import annotations

import gc

GC_GEN0_THRESHOLD = 50_000
GC_GEN1_THRESHOLD = 20
GC_GEN2_THRESHOLD = 100


def tune_gc() -> None:
    """Call once startup is done: freeze what exists now and collect young objects less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, GC_GEN1_THRESHOLD, GC_GEN2_THRESHOLD)

"""`kvstore bench`: a trio load generator on the client library.

Many concurrent workers issue a mix of puts, gets and deletes over a key space (uniform or zipf),
bounded by duration and op count. Latencies go into HDR histograms (hdrhistogram); the report has
ops/s, p50/p90/p99/p99.9/max per op, errors by code, and client and server CPU seconds.
"""
from __future__ import annotations

import bisect
import itertools
import json
import os
import random
import resource
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

import trio
from hdrh.histogram import HdrHistogram

from kvstore.client import Client
from kvstore.errors import KvError
from kvstore.tls import TlsFiles, TlsMaterial

MAX_LATENCY_US = 60_000_000


@dataclass(frozen=True)
class BenchConfig:
    addresses: tuple[str, ...]
    duration_s: float = 10.0
    max_ops: int = 0                  # 0 = bounded by duration only
    concurrency: int = 64
    put_ratio: float = 0.5
    get_ratio: float = 0.5
    delete_ratio: float = 0.0
    value_bytes: int = 1024
    keys: int = 10_000
    distribution: str = "uniform"     # uniform | zipf
    zipf_s: float = 1.1
    r: str = "quorum"
    w: str = "quorum"
    prefill: bool = True              # write every key once first, so gets find values
    seed: int = 1
    progress: bool = True
    tls: TlsFiles | TlsMaterial | None = None  # the cluster CA and a client certificate (None: plaintext)
    token: str | None = field(default=None, repr=False)  # bearer token; never in the report

    def validate(self) -> "BenchConfig":
        if not self.addresses:
            raise ValueError("addresses: at least one host:port is needed")
        if self.duration_s <= 0 or self.duration_s > 3600:
            raise ValueError("duration_s: must be in (0, 3600]")
        if not 1 <= self.concurrency <= 10_000:
            raise ValueError("concurrency: must be in 1..10000")
        if self.distribution not in ("uniform", "zipf"):
            raise ValueError("distribution: must be uniform or zipf")
        if abs(self.put_ratio + self.get_ratio + self.delete_ratio - 1.0) > 1e-6:
            raise ValueError("mix: put + get + delete ratios must sum to 1")
        return self


@dataclass
class OpStats:
    hist: HdrHistogram = field(default_factory=lambda: HdrHistogram(1, MAX_LATENCY_US, 3))
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    def summary(self, elapsed_s: float) -> dict[str, Any]:
        h = self.hist
        pct = {f"p{p:g}_ms": h.get_value_at_percentile(p) / 1000 for p in (50, 90, 99, 99.9)}
        return {"ok": self.ok, "ops_per_s": self.ok / elapsed_s if elapsed_s else 0.0, **pct,
                "max_ms": h.get_max_value() / 1000, "errors": dict(self.errors)}


class KeyChooser:
    def __init__(self, cfg: BenchConfig, rng: random.Random) -> None:
        self.rng = rng
        self.keys = [b"bench-%08d" % i for i in range(cfg.keys)]
        self.cdf: list[float] | None = None
        if cfg.distribution == "zipf":
            weights = [1.0 / (i + 1) ** cfg.zipf_s for i in range(cfg.keys)]
            self.cdf = list(itertools.accumulate(weights))

    def __call__(self) -> bytes:
        if self.cdf is None:
            return self.keys[self.rng.randrange(len(self.keys))]
        return self.keys[bisect.bisect_left(self.cdf, self.rng.random() * self.cdf[-1])]


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _server_cpu(client: Client, addresses: tuple[str, ...]) -> float | None:
    total = 0.0
    for address in addresses:
        try:
            total += (await client.status(address)).get("cpu_s", 0.0)
        except KvError:
            return None
    return total


async def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    cfg.validate()
    rng = random.Random(cfg.seed)
    choose = KeyChooser(cfg, rng)
    value = os.urandom(cfg.value_bytes)
    stats = {"put": OpStats(), "get": OpStats(), "delete": OpStats()}
    ops = ["put", "get", "delete"]
    weights = [cfg.put_ratio, cfg.get_ratio, cfg.delete_ratio]
    mixed = [op for op, w in zip(ops, weights) if w > 0]
    only = mixed[0] if len(mixed) == 1 else None  # one kind of op: no draw per op (as etcd's loop)
    async with Client(list(cfg.addresses), timeout_s=10.0, tls=cfg.tls, token=cfg.token) as kv:
        if cfg.prefill:
            for start in range(0, cfg.keys, 500):
                await kv.put_many([(k, value) for k in choose.keys[start:start + 500]], w=cfg.w)
        server_cpu0, client_cpu0 = await _server_cpu(kv, cfg.addresses), _cpu_s()
        issued = 0
        started = trio.current_time()
        deadline = started + cfg.duration_s
        bar = None
        if cfg.progress:
            from tqdm import tqdm

            bar = tqdm(total=int(cfg.duration_s), unit="s", file=sys.stderr, leave=False,
                       bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt}s {postfix}")

        async def worker() -> None:
            nonlocal issued
            while trio.current_time() < deadline and (not cfg.max_ops or issued < cfg.max_ops):
                issued += 1
                op = only if only else rng.choices(ops, weights)[0]
                key = choose()
                t0 = trio.current_time()
                try:
                    if op == "put":
                        await kv.put(key, value, w=cfg.w)
                    elif op == "get":
                        await kv.get(key, r=cfg.r)
                    else:
                        await kv.delete(key, w=cfg.w)
                except KvError as exc:
                    st = stats[op]
                    st.errors[exc.code_name] = st.errors.get(exc.code_name, 0) + 1
                    continue
                st = stats[op]
                st.ok += 1
                st.hist.record_value(max(1, min(int((trio.current_time() - t0) * 1e6), MAX_LATENCY_US)))

        async def progress() -> None:
            while bar is not None:
                await trio.sleep(1)
                elapsed = trio.current_time() - started
                done = sum(s.ok for s in stats.values())
                bar.set_postfix_str(f"{done / max(elapsed, 1e-9):,.0f} ops/s")
                bar.update(1)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(progress)
            async with trio.open_nursery() as workers:
                for _ in range(cfg.concurrency):
                    workers.start_soon(worker)
            nursery.cancel_scope.cancel()
        if bar is not None:
            bar.close()
        elapsed = trio.current_time() - started
        server_cpu1, client_cpu1 = await _server_cpu(kv, cfg.addresses), _cpu_s()
    total_ok = sum(s.ok for s in stats.values())
    return {
        "config": {**{k: v for k, v in asdict(cfg).items() if k not in ("tls", "token")},
                   "addresses": list(cfg.addresses), "tls": cfg.tls is not None, "token": bool(cfg.token)},
        "elapsed_s": elapsed,
        "ops_per_s": total_ok / elapsed,
        "ops": {op: s.summary(elapsed) for op, s in stats.items() if s.ok or s.errors},
        "client_cpu_s": client_cpu1 - client_cpu0,
        "server_cpu_s": (server_cpu1 - server_cpu0) if server_cpu0 is not None and server_cpu1 is not None else None,
    }


def format_report(report: dict[str, Any]) -> str:
    lines = [f"{report['ops_per_s']:,.0f} ops/s over {report['elapsed_s']:.1f}s "
             f"(client cpu {report['client_cpu_s']:.1f}s, server cpu "
             f"{report['server_cpu_s'] if report['server_cpu_s'] is None else round(report['server_cpu_s'], 1)}s)"]
    for op, s in report["ops"].items():
        lines.append(
            f"{op:<6} {s['ops_per_s']:>9,.0f}/s  p50 {s['p50_ms']:.2f}  p90 {s['p90_ms']:.2f}  "
            f"p99 {s['p99_ms']:.2f}  p99.9 {s['p99.9_ms']:.2f}  max {s['max_ms']:.2f} ms"
            + (f"  errors {s['errors']}" if s["errors"] else "")
        )
    return "\n".join(lines)


def dumps(report: dict[str, Any]) -> str:
    return json.dumps(report, sort_keys=True)

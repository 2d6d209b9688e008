"""Prometheus metrics of one node: its own registry (several nodes may share a process), the
per-RPC counters and histograms the interceptor updates, a collector that reads node state at
scrape time (peers, hints, gossip, streams, storage, keys), and the HTTP endpoint serving them.

State is read on the trio thread: the HTTP thread asks trio for a snapshot once per scrape, so
nothing here races the node, and hot paths pay only the per-RPC updates.
"""
from __future__ import annotations

import importlib.metadata
import logging
import os
from collections import Counter as Tally
from typing import Any, Callable, Iterable

import grpc
import trio
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector

from kvstore.node.api import OK

log = logging.getLogger(__name__)

#: seconds; from a cached single-node get (~0.3 ms) to a request that ran into its deadline
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
AUTO_PORT_OFFSET = 1000
SQLITE_FILE_SUFFIXES = ("", "-wal", "-shm")

Recorder = Callable[[grpc.StatusCode, float], None]


def metrics_address(setting: str, grpc_listen: str) -> str | None:
    """Where to serve metrics for a `metrics_listen` setting: None when "off"; for "auto" the
    gRPC listen port + 1000 (any free port when the gRPC port is 0), on the gRPC listen host when
    that is one address (a node in its own network namespace is reachable only there), else on
    127.0.0.1 (a node listening on every interface does not publish its metrics too)."""
    if setting == "off":
        return None
    if setting == "auto":
        host, _, port_text = grpc_listen.rpartition(":")
        port = int(port_text)
        host = host.strip("[]")
        if host in ("", "0.0.0.0", "::", "*", "localhost"):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"{host}:{port + AUTO_PORT_OFFSET if port else 0}"
    return setting


class Metrics:
    """The node's registry and the instruments updated on the request path."""

    def __init__(self, node: Any) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.handled = Counter(
            "grpc_server_handled", "RPCs completed on this node, by method and status code",
            ["grpc_service", "grpc_method", "grpc_code"], registry=self.registry)
        self.handling = Histogram(
            "grpc_server_handling_seconds", "RPC latency on this node (unary methods), by method",
            ["grpc_service", "grpc_method"], buckets=LATENCY_BUCKETS_S, registry=self.registry)
        self.items = Counter(
            "kvstore_items", "Keys handled by KV calls (each item of a batch), by op and status code",
            ["op", "code"], registry=self.registry)
        self._items: dict[tuple[str, str], Any] = {}
        self.registry.register(NodeCollector(node))
        ProcessCollector(registry=self.registry)

    def rpc_recorder(self, service: str, method: str) -> Recorder:
        """The per-RPC update for one method: one counter increment, one histogram observation."""
        handled: dict[grpc.StatusCode, Any] = {}
        latency = self.handling.labels(service, method)

        def record(code: grpc.StatusCode, seconds: float) -> None:
            child = handled.get(code)
            if child is None:
                child = handled[code] = self.handled.labels(service, method, code.name)
            child.inc()
            latency.observe(seconds)

        return record

    def count_items(self, op: str, statuses: list[Any]) -> None:
        """Per KV call (single or batch): its items by status code, in one increment per distinct
        code. Successes are mostly the api's shared OK status, which list.count matches by identity in
        C, so a healthy batch costs well under a microsecond of scanning and one increment."""
        ok = statuses.count(OK)
        if ok:
            self._item_counter(op, "OK").inc(ok)
        if ok < len(statuses):  # failures (list.count already took equal copies of OK)
            for number, count in Tally(s.code for s in statuses if s is not OK and s != OK).items():
                self._item_counter(op, _CODE_NAMES.get(number, "UNKNOWN")).inc(count)

    def _item_counter(self, op: str, code_name: str) -> Any:
        child = self._items.get((op, code_name))
        if child is None:
            child = self._items[(op, code_name)] = self.items.labels(op, code_name)
        return child


_CODE_NAMES = {c.value[0]: c.name for c in grpc.StatusCode}
try:
    _VERSION = importlib.metadata.version("kvstore")
except importlib.metadata.PackageNotFoundError:  # running from a source tree
    _VERSION = ""


class NodeCollector:
    """Reads node state at scrape time. collect() runs on the HTTP thread and hops to trio once."""

    def __init__(self, node: Any) -> None:
        self.node = node
        self.token = trio.lowlevel.current_trio_token()

    def collect(self) -> Iterable[Metric]:
        try:
            return trio.from_thread.run_sync(node_families, self.node, trio_token=self.token)
        except trio.RunFinishedError:  # the node's trio run is over
            return []


def _gauge(name: str, doc: str, labels: list[str] | None = None) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels)


def _counter(name: str, doc: str, labels: list[str] | None = None) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, labels=labels)


def storage_bytes(engine: Any) -> int | None:
    """Bytes on disk of a sqlite engine (database, WAL and shared-memory files); None in memory."""
    path = getattr(engine, "path", None)
    if path is None:
        return None
    total = 0
    for suffix in SQLITE_FILE_SUFFIXES:
        try:
            total += os.stat(f"{path}{suffix}").st_size
        except OSError:
            pass
    return total


def node_families(node: Any) -> list[Metric]:
    """Every scrape-time metric of `node`, read on its trio thread."""
    out: list[Metric] = []
    info = _gauge("kvstore_node_info", "This node: id, gRPC address and version (value 1)",
                  ["node_id", "address", "version"])
    info.add_metric([node.node_id, node.address, _VERSION], 1)
    ready = _gauge("kvstore_ready", "1 while the node serves clients (health SERVING), else 0")
    ready.add_metric([], 1 if node.health.serving else 0)
    out += [info, ready]

    gossip = node.gossip
    names = {}
    if gossip is not None:
        names = {s.address: s.node_id for s in gossip.table.values()}
        rounds = _counter("kvstore_gossip_rounds", "Gossip rounds this node started")
        rounds.add_metric([], gossip.rounds)
        refused = _counter("kvstore_gossip_refused", "Gossip states refused (absurd generation, bad tokens)")
        refused.add_metric([], gossip.refused)
        phi = _gauge("kvstore_gossip_phi", "Phi-accrual suspicion of each peer (down above the threshold)",
                     ["peer"])
        up = _gauge("kvstore_peer_up", "1 when the failure detector sees the peer up, else 0", ["peer"])
        members = _gauge("kvstore_members", "Cluster members this node knows, by status", ["status"])
        peers = _gauge("kvstore_peers", "Other members (not left or removed) up and down", ["state"])
        statuses = Tally(s.status.value for s in gossip.table.values())
        for status, count in sorted(statuses.items()):
            members.add_metric([status], count)
        counts = {"up": 0, "down": 0}
        for s in gossip.table.values():
            if s.node_id == node.node_id or s.status.value in ("left", "removed"):
                continue
            is_up = node.is_up(s.node_id)
            counts["up" if is_up else "down"] += 1
            phi.add_metric([s.node_id], gossip.phi(s.node_id))
            up.add_metric([s.node_id], 1 if is_up else 0)
        for state, count in counts.items():
            peers.add_metric([state], count)
        out += [rounds, refused, phi, up, members, peers]

    queued = _gauge("kvstore_replica_queue_ops", "Replica ops queued on each peer's stream, not yet sent",
                    ["peer"])
    batches = _counter("kvstore_replica_batches_sent", "Replica batches each peer acknowledged", ["peer"])
    ops = _counter("kvstore_replica_ops_sent", "Replica ops in those batches", ["peer"])
    reachable = _gauge("kvstore_peer_reachable", "1 when the last RPC to the peer succeeded", ["peer"])
    for address, peer in sorted(node.peers.items()):
        if address == node.address:
            continue  # gossip may dial this node's own address as a seed: not a replica stream
        label = [names.get(address, address)]
        queued.add_metric(label, peer.queued_ops)
        batches.add_metric(label, peer.batches_sent + peer.loop_batches_sent)
        ops.add_metric(label, peer.ops_sent + peer.loop_ops_sent)
        reachable.add_metric(label, 1 if peer.reachable else 0)
    out += [queued, batches, ops, reachable]

    hints = _gauge("kvstore_hints_pending", "Hinted writes held here for each target node", ["target"])
    for target, count in sorted(node.hint_counts.items()):
        hints.add_metric([target], count)
    out.append(hints)

    out += _stream_families(node.elastic.progress)
    out += _repair_families(node.repairer.progress)

    keys = _gauge("kvstore_keys", "Keys stored on this node (refreshed every few gossip intervals)")
    keys.add_metric([], node.key_count)
    out.append(keys)
    size = storage_bytes(node.engine)
    if size is not None:
        disk = _gauge("kvstore_storage_bytes", "Bytes on disk of the storage engine (database and WAL)")
        disk.add_metric([], size)
        out.append(disk)
    repairs = _counter("kvstore_read_repairs", "Replicas updated by read repair")
    repairs.add_metric([], node.coordinator.repairs)
    out.append(repairs)
    out += _key_families(node)
    return out


def _stream_families(progress: dict[str, Any]) -> list[Metric]:
    """Join, decommission and removenode streaming: the current or last run."""
    if not progress:
        return []
    op, state = str(progress.get("op", "")), str(progress.get("state", ""))
    running = _gauge("kvstore_stream_running", "1 while a join/decommission/removenode stream runs", ["op"])
    running.add_metric([op], 1 if state == "running" else 0)
    keys = _gauge("kvstore_stream_keys", "Keys streamed by the current or last stream", ["op", "state"])
    keys.add_metric([op, state], progress.get("keys", 0))
    nbytes = _gauge("kvstore_stream_bytes", "Bytes streamed by the current or last stream", ["op", "state"])
    nbytes.add_metric([op, state], progress.get("bytes", 0))
    out: list[Metric] = [running, keys, nbytes]
    if progress.get("total_keys"):
        total = _gauge("kvstore_stream_keys_expected", "Keys the current or last stream expects to move", ["op"])
        total.add_metric([op], progress["total_keys"])
        out.append(total)
    if progress.get("eta_s") is not None and state == "running":
        eta = _gauge("kvstore_stream_eta_seconds", "Estimated seconds left in the running stream", ["op"])
        eta.add_metric([op], progress["eta_s"])
        out.append(eta)
    return out


def _repair_families(progress: dict[str, Any]) -> list[Metric]:
    if not progress:
        return []
    state = str(progress.get("state", ""))
    running = _gauge("kvstore_repair_running", "1 while an anti-entropy repair runs")
    running.add_metric([], 1 if state == "running" else 0)
    keys = _gauge("kvstore_repair_keys", "Keys moved by the current or last repair", ["direction"])
    keys.add_metric(["pulled"], progress.get("keys_pulled", 0))
    keys.add_metric(["pushed"], progress.get("keys_pushed", 0))
    return [running, keys]


def _key_families(node: Any) -> list[Metric]:
    """Encryption at rest: DEK use and rotation, and the re-wrap job's progress."""
    out: list[Metric] = []
    stats = getattr(node.keys.sealer, "stats", None)
    if stats is not None:
        rotations = _counter("kvstore_dek_rotations", "Data keys replaced (age, use count, KEK change)")
        rotations.add_metric([], stats.dek_rotations)
        seals = _counter("kvstore_envelope_ops", "Values sealed and opened", ["op"])
        seals.add_metric(["seal"], stats.seals)
        seals.add_metric(["open"], stats.opens)
        cache = _counter("kvstore_dek_cache_lookups", "Opens by whether the DEK was cached", ["result"])
        cache.add_metric(["hit"], stats.cache_hits)
        cache.add_metric(["miss"], stats.cache_misses)
        out += [rotations, seals, cache]
    rewrap = node.rewrap_progress
    if rewrap:
        running = _gauge("kvstore_rewrap_running", "1 while a re-wrap pass runs")
        running.add_metric([], 1 if rewrap.get("running") else 0)
        records = _gauge("kvstore_rewrap_records", "Records of the current or last re-wrap pass", ["stage"])
        records.add_metric(["scanned"], rewrap.get("scanned", 0))
        records.add_metric(["rewrapped"], rewrap.get("rewrapped", 0))
        out += [running, records]
    return out


class MetricsServer:
    """The HTTP endpoint (prometheus-client's threaded WSGI server) serving one registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.httpd: Any = None
        self.thread: Any = None
        self.address = ""

    def start(self, address: str) -> str:
        host, _, port = address.rpartition(":")
        host = host.strip("[]")
        try:
            self.httpd, self.thread = start_http_server(int(port), host, registry=self.registry)
        except OSError as exc:
            raise SystemExit(f"metrics_listen: cannot serve metrics on {address}: {exc.strerror or exc}; "
                             f"choose another host:port, or off") from None
        self.address = f"{host}:{self.httpd.server_port}"
        log.info("metrics on http://%s/metrics", self.address)
        return self.address

    async def aclose(self) -> None:
        httpd, self.httpd = self.httpd, None
        if httpd is not None:
            def stop() -> None:
                httpd.shutdown()
                httpd.server_close()

            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(stop)

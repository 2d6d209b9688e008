"""Chaos runs: a cluster, the workload, a seeded nemesis schedule, healing, the final state, the check.

`run_scenario(scenario, root, seed)` does one run end to end and returns (CheckResult, History,
report text); the history (JSON lines) and report are saved under root. The seed fixes the fault
schedule and every worker's choices, so a failing run replays with the same seed (timing still
varies: the nodes are real processes).

After the workload: heal everything, wait until the nodes agree and hints are replayed, then
collect the final state, in three phases of raw records (each node's own record of every key,
read with an internal replica read: no coordinator, no repair):
  settled       right after settling;
  anti-entropy  after `repair` (Merkle anti-entropy) ran on every node in turn, and then
                `purge-tombstones` (nodes run with tombstone_grace_s = 0, so every tombstone the
                replicas agree on is garbage-collected: a delete must hold after GC);
  after-reads   after every key was read with R=ALL through every node as coordinator (read
                repair); reads and raw reads repeat (bounded) until they agree.
"""
from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import grpc
import msgpack
import trio

from cluster.checker import CheckResult, check, format_report
from cluster.history import AFTER_READS, ANTI_ENTROPY, SETTLED, FinalRead, FinalState, History, ReplicaState
from cluster.launcher import HARNESS_CERT_NAME, STATUS_TIMEOUT_S, LocalCluster, free_base_port, status_of
from cluster.netns import available as netns_available
from cluster.nemesis import ALL_FAULTS, CHANNEL_OPTIONS, Nemesis, Step, admin_command, make_schedule
from cluster.workload import Workload, WorkloadConfig
from kvstore._proto import internal_pb2, internal_pb2_grpc
from kvstore.client import Client
from kvstore.core import wire
from kvstore.core.records import siblings_from_reply
from kvstore.errors import KvError
from kvstore.tls import TlsMaterial, channel

log = logging.getLogger(__name__)

RAW_READ_TIMEOUT_S = 5.0
RAW_READ_BATCH = 1000      # keys per internal replica read batch (a node takes up to 10,000)
HINT_DRAIN_S = 15.0        # hint replay runs every 0.1 s in the test profile: 15 s means it is stuck
FINAL_READ_BATCH = 500     # keys per final get_many: a few batches in flight, never thousands
FINAL_READ_TIMEOUT_S = 10.0
# channels with the same target and arguments share grpc's global subchannels, and with them any
# reconnect backoff left from a node's downtime (Client sets no backoff options): other
# arguments than the workload's clients give the final reads subchannels of their own
FINAL_CHANNEL_BYTES = (64 << 20) + 1
ANTI_ENTROPY_TIMEOUT_S = 60.0  # one node's repair with all its peers
FINAL_ROUNDS = 3           # final read + raw read rounds, until replicas agree
ROUND_PAUSE_S = 1.0        # read repair runs in the background after a read answers


@dataclass
class Scenario:
    name: str
    nodes: int = 3
    faults: tuple[str, ...] = ()            # kinds the seeded schedule draws from
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    warmup_s: float = 1.5                   # fault-free start of the workload
    cooldown_s: float = 2.0                 # fault-free end of the workload
    fault_s: tuple[float, float] = (2.0, 4.0)
    gap_s: tuple[float, float] = (1.0, 2.0)
    schedule: Callable[[random.Random, list[str]], list[Step]] | None = None  # instead of drawing from faults
    settle_s: float = 1.0                   # after healing, before the final state
    profile: str = "test"
    drop_writes: bool = False               # every node acks writes it never stores (proves the checker)
    extra_args: tuple[str, ...] = ()
    anti_entropy: bool = True               # run `repair` on every node before the final reads
    purge_tombstones: bool = True           # then GC tombstones (grace 0): deleted keys must stay deleted
    network: str = "auto"                   # netns when this machine can (root), else loopback + hook

    def make_schedule(self, seed: int, names: list[str]) -> list[Step]:
        rng = random.Random(f"nemesis:{seed}")
        if self.schedule is not None:
            return self.schedule(rng, names)
        if not self.faults:
            return []
        unknown = set(self.faults) - set(ALL_FAULTS)
        if unknown:
            raise ValueError(f"faults: unknown kinds {sorted(unknown)}")
        return make_schedule(rng, self.faults, names, start_s=self.warmup_s,
                             end_s=self.workload.duration_s - self.cooldown_s, fault_s=self.fault_s, gap_s=self.gap_s)


# ---- raw replica reads ------------------------------------------------------------------------


def raw_records(address: str, keys: Sequence[bytes], timeout_s: float = RAW_READ_TIMEOUT_S,
                credentials: grpc.ChannelCredentials | None = None) -> list[tuple[int, Any]]:
    """Each key's record as the node at `address` stores it: one internal replica read batch
    (the same frames peers exchange), answered from its local store only. Blocking. Internal
    methods take node certificates only: with TLS pass LocalCluster.credentials("harness")."""
    opts = [("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20),
            *CHANNEL_OPTIONS]
    out: list[tuple[int, Any]] = []
    with channel(address, opts, credentials) as ch:
        stub = internal_pb2_grpc.InternalStub(ch)
        for start in range(0, len(keys), RAW_READ_BATCH):
            chunk = keys[start:start + RAW_READ_BATCH]
            payload = wire.encode_batch(start + 1, [wire.ReadOp(k) for k in chunk])
            frames = list(stub.Stream(iter([internal_pb2.Frame(payload=payload)]), timeout=timeout_s))
            if len(frames) != 1:
                raise ValueError(f"{address}: {len(frames)} reply frames to one replica read batch")
            _, results = wire.decode_reply(frames[0].payload)
            if len(results) != len(chunk):
                raise ValueError(f"{address}: {len(results)} results for {len(chunk)} keys")
            out += results
    return out


# ---- the run -----------------------------------------------------------------------------------


@dataclass
class Run:
    scenario: Scenario
    root: Path
    seed: int
    base_port: int
    say: Callable[[str], None] = print
    history: History = field(default_factory=History)
    t0: float = 0.0
    _live: list[tuple[ReplicaState, list[tuple[str, int]]]] = field(default_factory=list)
    _tls: TlsMaterial | None = None                    # the cluster's admin client certificate
    _admin: grpc.ChannelCredentials | None = None      # ... as channel credentials
    _harness: grpc.ChannelCredentials | None = None    # a node certificate, for raw replica reads

    def now(self) -> float:
        return trio.current_time() - self.t0

    async def go(self) -> tuple[CheckResult, History, str]:
        sc = self.scenario
        extra = ["--test-hooks", *sc.extra_args] + (["--test-drop-writes"] if sc.drop_writes else [])
        if sc.purge_tombstones:
            # no grace period, so the purge after the final repair may drop every agreed tombstone
            # (nodes purge only on that explicit command: the periodic purge is hourly)
            self.root.mkdir(parents=True, exist_ok=True)
            (self.root / "node.toml").write_text("tombstone_grace_s = 0.0\n")
            extra += ["--config", str(self.root / "node.toml")]
        network = sc.network
        if network == "auto":
            network = "netns" if netns_available()[0] else "loopback"
        cluster = LocalCluster(self.root / "cluster", base_port=self.base_port, profile=sc.profile,
                               extra_args=extra, converge_timeout_s=20.0, start_timeout_s=30.0, network=network)
        self.say(f"network: {network}" + (" (a namespace per node; partitions are blackhole routes)"
                                           if network == "netns" else " (127.0.0.1; partitions via the test hook)"))
        self.history.meta = {"scenario": sc.name, "seed": self.seed, "nodes": sc.nodes, "profile": sc.profile,
                             "network": network,
                             "replication_factor": 3, "workload": _plain(sc.workload),
                             "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        try:
            with cluster:
                await trio.to_thread.run_sync(cluster.up, sc.nodes)
                schedule = sc.make_schedule(self.seed, cluster.names())
                self.history.meta["schedule"] = [s.describe() for s in schedule]
                self.say(f"chaos {sc.name}: seed {self.seed}, {sc.nodes} nodes on ports {self.base_port}+, "
                         f"{len(schedule)} faults, workload {sc.workload.duration_s:.0f} s, dir {self.root}")
                for step in schedule:
                    self.say(f"  {step.describe()}")
                self.t0 = trio.current_time()
                nemesis = Nemesis(cluster, self.history, self.now)
                workload = Workload(sc.workload, self.history, lambda: cluster.addresses(), self.seed,
                                    run_id=f"s{self.seed}", t0=self.t0, tls=cluster.tls())
                async with trio.open_nursery() as watching:
                    watching.start_soon(nemesis.watch)
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(workload.run)
                        await nemesis.run(schedule)
                    self.say(f"  workload done at {self.now():.1f}s: {workload.ops_started} ops; healing")
                    await nemesis.heal_all()
                    await self.settle(cluster)
                    self.history.meta["addresses"] = {r.name: r.address for r in cluster.nodes}
                    keys = sorted(set(sc.workload.all_keys()) | {op.key for op in self.history.ops})
                    final = await self.final_state(cluster, keys)
                    final.notes[:0] = self.history.final.notes  # from settling
                    self.history.final = final
                    watching.cancel_scope.cancel()
        finally:
            self.history.meta.setdefault("addresses", {r.name: r.address for r in cluster.nodes})
            path = self.history.save(self.root / "history.jsonl")
        result = check(self.history)
        report = format_report(result, self.history) + f"\nhistory: {path}\nreplay: seed {self.seed}"
        (self.root / "report.txt").write_text(report + "\n")
        return result, self.history, report

    async def settle(self, cluster: LocalCluster) -> None:
        """Until no node holds hints (bounded), then settle_s more."""
        deadline = trio.current_time() + HINT_DRAIN_S
        held: dict[str, Any] = {}
        while trio.current_time() < deadline:
            held = {}
            for rec in cluster.nodes:
                try:
                    view = await trio.to_thread.run_sync(status_of, rec.address, STATUS_TIMEOUT_S,
                                                         cluster.credentials())
                except grpc.RpcError as exc:
                    held[rec.name] = f"no status: {exc.code().name}"
                    continue
                hints = {t: c for t, c in view.get("hints", {}).items() if c}
                if hints:
                    held[rec.name] = hints
            if not held:
                break
            await trio.sleep(0.25)
        else:
            self.history.final.notes.append(f"hints not drained within {HINT_DRAIN_S:.0f} s: {held}")
        await trio.sleep(self.scenario.settle_s)

    async def final_state(self, cluster: LocalCluster, keys: list[bytes]) -> FinalState:
        final = FinalState()
        nodes = [(r.name, r.node_id, r.address) for r in cluster.nodes]
        self._tls, self._admin = cluster.tls(), cluster.credentials()
        self._harness = cluster.credentials(HARNESS_CERT_NAME)
        async with Client([a for _, _, a in nodes], token_aware=False, tls=self._tls) as kv:
            try:
                topo = await kv.refresh_ring()
                primaries = {k: set(topo.ring.preference_list(k, topo.n)) for k in keys}
            except KvError as exc:
                final.notes.append(f"no ring for the final state: {exc}")
                primaries = {k: set() for k in keys}
        names: dict[tuple[str, int], bytes] = {}  # (node id, hlc) -> value, from the final reads
        await self._raw(nodes, keys, primaries, SETTLED, final, names)
        if self.scenario.anti_entropy:
            await self._anti_entropy(nodes, final)
            if self.scenario.purge_tombstones:
                await self._purge(nodes, final)
            await self._raw(nodes, keys, primaries, ANTI_ENTROPY, final, names)
        for rnd in range(FINAL_ROUNDS):
            reads = await self._reads(nodes, keys, rnd, names)
            final.reads.extend(reads)
            await trio.sleep(ROUND_PAUSE_S)
            after = await self._raw(nodes, keys, primaries, AFTER_READS, final, names, keep=False)
            agreed = _reads_agree(reads) and _replicas_agree(after)
            if agreed or rnd == FINAL_ROUNDS - 1:
                final.replicas.extend(after)
                break
        for rs, live in self._live:  # raw records carry sealed values: name them by (node id, hlc)
            rs.values = sorted(names[x] for x in live if x in names)
        return final

    async def _anti_entropy(self, nodes: list[tuple[str, str, str]], final: FinalState) -> None:
        """`repair` on every node in turn (each exchanges Merkle trees with the other replicas of its ranges)."""
        for name, _, address in nodes:
            t = trio.current_time()
            try:
                raw = await trio.to_thread.run_sync(admin_command, address, "repair", {}, ANTI_ENTROPY_TIMEOUT_S,
                                                    self._admin)
                progress = msgpack.unpackb(raw, raw=False)
            except grpc.RpcError as exc:
                final.notes.append(f"repair on {name} failed: {exc.code().name}: {exc.details()}")
                continue
            if progress.get("state") != "done":
                final.notes.append(f"repair on {name} incomplete: {progress}")
            log.info("repair on %s: %s in %.1f s", name, progress, trio.current_time() - t)

    async def _purge(self, nodes: list[tuple[str, str, str]], final: FinalState) -> None:
        """`purge-tombstones` on every node: tombstones every replica agrees on, written before
        the repair that just completed, go; the final reads then show whether a delete held."""
        total = 0
        for name, _, address in nodes:
            try:
                raw = await trio.to_thread.run_sync(admin_command, address, "purge-tombstones", {},
                                                    ANTI_ENTROPY_TIMEOUT_S, self._admin)
                total += int(msgpack.unpackb(raw, raw=False).get("purged", 0))
            except grpc.RpcError as exc:
                final.notes.append(f"purge-tombstones on {name} failed: {exc.code().name}: {exc.details()}")
        self.history.meta["tombstones_purged"] = total
        self.say(f"  tombstone GC after repair: {total} purged")

    async def _reads(self, nodes: list[tuple[str, str, str]], keys: list[bytes], rnd: int,
                     names: dict[tuple[str, int], bytes]) -> list[FinalRead]:
        out: list[FinalRead] = []
        for _, _, address in nodes:
            results: list[Any] = []
            async with Client([address], token_aware=False, timeout_s=FINAL_READ_TIMEOUT_S, retries=2,
                              max_message_bytes=FINAL_CHANNEL_BYTES, tls=self._tls) as kv:
                for start in range(0, len(keys), FINAL_READ_BATCH):  # in turn: R=ALL fans out to every replica
                    results += await kv.get_many(keys[start:start + FINAL_READ_BATCH], r="all")
            for key, res in zip(keys, results):
                if isinstance(res, KvError):
                    out.append(FinalRead(key, address, rnd, False, error=f"{type(res).__name__}: {res}"))
                    continue
                for s in res.siblings:
                    names[(s.node_id, s.hlc)] = s.value
                out.append(FinalRead(key, address, rnd, True, [s.value for s in res.siblings]))
        return out

    async def _raw(self, nodes: list[tuple[str, str, str]], keys: list[bytes], primaries: dict[bytes, set[str]],
                   phase: str, final: FinalState, names: dict[tuple[str, int], bytes],
                   keep: bool = True) -> list[ReplicaState]:
        states: list[ReplicaState] = []
        for _, node_id, address in nodes:
            try:
                results = await trio.to_thread.run_sync(raw_records, address, keys, RAW_READ_TIMEOUT_S,
                                                        self._harness)
            except (grpc.RpcError, ValueError, KvError) as exc:
                text = f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.RpcError) else str(exc)
                states += [ReplicaState(k, node_id, address, node_id in primaries[k], phase, False, error=text)
                           for k in keys if node_id in primaries[k]]
                continue
            for key, (code, payload) in zip(keys, results):
                primary = node_id in primaries[key]
                if code != 0:
                    states.append(ReplicaState(key, node_id, address, primary, phase, False, error=f"code {code}: {payload}"))
                    continue
                try:
                    sibs = siblings_from_reply(payload)  # the replica's stored record, as it is
                except (ValueError, TypeError) as exc:
                    states.append(ReplicaState(key, node_id, address, primary, phase, False, error=f"corrupt record: {exc}"))
                    continue
                if not sibs and not primary:
                    continue  # a bystander that never held the key
                rs = ReplicaState(key, node_id, address, primary, phase, True,
                                  sorted((s.node, s.counter, s.tombstone) for s in sibs))
                self._live.append((rs, [(s.node, s.hlc) for s in sibs if not s.tombstone]))
                states.append(rs)
        if keep:
            final.replicas.extend(states)
        return states


def _reads_agree(reads: list[FinalRead]) -> bool:
    by_key: dict[bytes, set[frozenset[bytes]]] = {}
    for rd in reads:
        if not rd.ok:
            return False
        by_key.setdefault(rd.key, set()).add(frozenset(rd.values))
    return all(len(v) == 1 for v in by_key.values())


def _replicas_agree(states: list[ReplicaState]) -> bool:
    by_key: dict[bytes, set[tuple[Any, ...]]] = {}
    for rs in states:
        if not rs.primary:
            continue
        if not rs.ok:
            return False
        by_key.setdefault(rs.key, set()).add(tuple(rs.dots))
    return all(len(v) == 1 for v in by_key.values())


def _plain(cfg: WorkloadConfig) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(cfg)


async def run_scenario(scenario: Scenario, root: Path | str, seed: int | None = None, *,
                       base_port: int | None = None, say: Callable[[str], None] = print) -> tuple[CheckResult, History, str]:
    """One chaos run under root (created); returns (result, history, report)."""
    seed = random.SystemRandom().randrange(1, 2**31) if seed is None else seed
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    port = base_port or free_base_port(rng=random.Random(os.getpid() ^ seed ^ time.time_ns()))
    return await Run(scenario, root, seed, port, say).go()


# ---- the catalogue: scenarios the tests and scripts/chaos run -------------------------------------

def _wl(**kw: Any) -> WorkloadConfig:
    return replace(WorkloadConfig(), **kw)


def kill_one_during_writes(rng: random.Random, names: list[str]) -> list[Step]:
    node = rng.choice(names[1:])
    return [Step("kill", (node,), 3.0, 6.0)]


def kill_restart_loop(rng: random.Random, names: list[str]) -> list[Step]:
    steps, t = [], 2.0
    for _ in range(4):
        steps.append(Step("kill", (rng.choice(names),), round(t, 2), round(rng.uniform(1.0, 2.5), 2)))
        t += steps[-1].duration_s + rng.uniform(1.0, 2.0)
    return steps


def pause_past_detector(rng: random.Random, names: list[str]) -> list[Step]:
    return [Step("pause", (rng.choice(names),), 3.0, 5.0)]


def partition_minority(rng: random.Random, names: list[str]) -> list[Step]:
    minority = tuple(sorted(rng.sample(names, (len(names) - 1) // 2)))
    rest = tuple(n for n in names if n not in minority)
    return [Step("partition-minority", minority, 3.0, 5.0, (minority, rest))]


def partition_coordinator(rng: random.Random, names: list[str]) -> list[Step]:
    # the isolated node keeps taking client requests (clients reach every node) but reaches no replica
    node = rng.choice(names)
    rest = tuple(n for n in names if n != node)
    return [Step("partition-isolate", (node,), 3.0, 5.0, ((node,), rest))]


def rolling(rng: random.Random, names: list[str]) -> list[Step]:
    return [Step("restart", (n,), 2.0 + 3.0 * i, 0.0) for i, n in enumerate(sorted(names))]


def add_under_load(rng: random.Random, names: list[str]) -> list[Step]:
    return [Step("add", ("n4",), 3.0, 0.0), Step("add", ("n5",), 8.0, 0.0)]


def join_after_missed_writes(rng: random.Random, names: list[str]) -> list[Step]:
    # with 3 nodes and N=3 a dead replica has no fallback, so no hint: it misses the writes it was
    # down for. Two joins then take keys away from the two nodes that have them.
    return [Step("kill", ("n1",), 1.5, 4.0), Step("add", ("n4",), 7.0, 0.0), Step("add", ("n5",), 9.0, 0.0),
            Step("add", ("n6",), 11.0, 0.0)]


TEST_WORKLOAD = _wl(duration_s=14.0, max_ops=6000, clients=10, keys=20, blind_keys=4)

SCENARIOS: dict[str, Scenario] = {
    s.name: s for s in [
        Scenario("kill-one-during-writes", schedule=kill_one_during_writes, workload=TEST_WORKLOAD),
        Scenario("kill-restart-loop", schedule=kill_restart_loop, workload=replace(TEST_WORKLOAD, duration_s=16.0)),
        Scenario("pause-past-detector", schedule=pause_past_detector, workload=TEST_WORKLOAD),
        Scenario("partition-minority", nodes=5, schedule=partition_minority, workload=TEST_WORKLOAD),
        Scenario("partition-coordinator", schedule=partition_coordinator, workload=TEST_WORKLOAD),
        Scenario("rolling-restart", schedule=rolling, workload=TEST_WORKLOAD),
        Scenario("add-node-under-load", schedule=add_under_load, workload=TEST_WORKLOAD),
        Scenario("join-after-missed-writes", schedule=join_after_missed_writes, workload=TEST_WORKLOAD),
        Scenario("drop-writes-proof", drop_writes=True, workload=replace(TEST_WORKLOAD, duration_s=4.0)),
    ]
}


def soak(minutes: float, nodes: int = 5) -> Scenario:
    """scripts/chaos: every fault kind, one after another, on a larger cluster for longer."""
    duration = max(20.0, 60.0 * minutes)
    faults = ("kill", "kill", "pause", "stop", "restart", "partition-isolate", "partition-minority",
              "partition-minority", "partition-bridge", "partition-oneway", "add")
    return Scenario(
        f"soak-{minutes:g}min-{nodes}nodes", nodes=nodes, faults=faults,
        workload=_wl(duration_s=duration, max_ops=int(400 * duration), clients=16, keys=60, blind_keys=8),
        warmup_s=3.0, cooldown_s=4.0, fault_s=(3.0, 8.0), gap_s=(2.0, 5.0), profile="test",
    )

"""The node process: assembles storage, the transport bridge, gossip, the coordinator and the
gRPC server under one trio nursery, and shuts them down in order (drain, close, join)."""
from __future__ import annotations

import json
from dataclasses import replace
import logging
import os
import random
import secrets
import time
from pathlib import Path
from typing import Any, Sequence

import grpc
import trio

from kvstore._proto import admin_pb2, kv_pb2
from kvstore.config import NodeConfig
from kvstore.core import ring as ringmod
from kvstore.core import wire
from kvstore.core.membership import NodeState, Status, allocation_ring, token_clash, token_digest
from kvstore.core.ring import Ring
from kvstore.core.hlc import pack, physical_ms
from kvstore.core.records import decode_record, encode_record, siblings_from_reply
from kvstore.core.wire import PurgeOp, ReadOp, RecordOp, ReplicaOp, WriteOp
from kvstore.certs import CertError
from kvstore.errors import InvalidArgument, KvError, PermissionDenied, ResourceExhausted, Unavailable
from kvstore.node.api import FORWARDED_HEADER, Api
from kvstore.node.auth import NodeSecurity, load_security
from kvstore.node.bridge import Transport, open_transport
from kvstore.node.coordinator import Coordinator
from kvstore.node.elastic import Elastic
from kvstore.node.fastpath import SharedClock
from kvstore.node.express import ROUTE_VIEW_INTERVAL_S, RouteView
from kvstore.node.repair import Repair
from kvstore.node import listing, logs
from kvstore.node.gossip import Gossip
from kvstore.node.health import Health
from kvstore.node.keys import Keys
from kvstore.node.limits import Admission
from kvstore.node.local import LocalStore
from kvstore.node.metrics import Metrics, MetricsServer, metrics_address
from kvstore.node.peers import Peer, channel_options
from kvstore.node.server import Sessions, make_server
from kvstore.node.status import code_of, message_of, number_of
from kvstore.storage.base import Engine, FsyncPolicy

log = logging.getLogger(__name__)

IDENTITY_FILE = "node.json"
VERSION = "0.1.0"
IDENTITY_FORMAT = 1
RESTART_LEARN_S = 5.0  # a restarting member waits this long at most to hear its seeds before serving
CLOCK_LEASE_MS = 2_000  # see Node._keep_clock_lease
TOKEN_SETTLE_ROUNDS = 5  # gossip rounds a joiner waits, its tokens seen by all, for any other joiner's


def load_identity(data_dir: Path, wanted_id: str) -> dict[str, Any]:
    """The node id (and tokens once allocated) stored in the data dir; created on first start."""
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(data_dir, 0o700)
    path = data_dir / IDENTITY_FILE
    if path.exists():
        ident = json.loads(path.read_text())
        if ident.get("format") != IDENTITY_FORMAT:
            raise SystemExit(f"{path}: unknown identity format {ident.get('format')!r}")
        if wanted_id and ident["node_id"] != wanted_id:
            raise SystemExit(
                f"data dir {data_dir} belongs to node {ident['node_id']!r}, not {wanted_id!r}"
            )
        return ident
    ident = {"format": IDENTITY_FORMAT, "node_id": wanted_id or "n-" + secrets.token_hex(4), "tokens": []}
    save_identity(data_dir, ident)
    return ident


def lock_data_dir(data_dir: Path) -> int:
    """Hold an exclusive lock on the data dir for the life of the process: two nodes sharing one
    database would corrupt each other's versions."""
    import fcntl

    fd = os.open(data_dir / "LOCK", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SystemExit(f"data dir {data_dir} is in use by another kvstore node") from None
    return fd


def save_identity(data_dir: Path, ident: dict[str, Any]) -> None:
    tmp = data_dir / (IDENTITY_FILE + ".tmp")
    tmp.write_text(json.dumps(ident))
    os.chmod(tmp, 0o600)
    os.replace(tmp, data_dir / IDENTITY_FILE)


async def open_engine(config: NodeConfig) -> Engine:
    if config.storage == "memory":
        from kvstore.storage.memory import MemoryEngine

        return MemoryEngine()
    from kvstore.storage.sqlite import SqliteEngine

    return await SqliteEngine.open(
        config.data_dir / "kv.db", fsync=FsyncPolicy(config.fsync), fsync_interval_s=config.fsync_interval_s,
        record_cache_bytes=config.storage_cache_bytes,
    )


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


class Node:
    """One running node. Create with `await Node.start(config, nursery)` or run `serve(config)`."""

    def __init__(self, config: NodeConfig, transport: Transport, engine: Engine, ident: dict[str, Any],
                 keys: Keys, security: NodeSecurity | None = None) -> None:
        self.config = config
        self.security = security or NodeSecurity(None, None)
        self.sessions = Sessions()  # open client sessions, ended at stop (touched on the transport loop)
        self.keys = keys
        self.transport = transport
        self.engine = engine
        self.ident = ident
        self.node_id: str = ident["node_id"]
        self.store = LocalStore(engine, self.node_id, config.limits, keys.sealer, config.test_drop_writes)
        if config.test_drop_writes:
            log.warning("TEST MODE: this node acknowledges writes without storing them")
        self.rewrap_progress: dict[str, Any] = {}
        self.store.members = lambda: set(self.gossip.table) if self.gossip else set()
        self.store.observe_hlc = lambda hlc: self.clock.observe(hlc, self.now_ms())
        self.key_count = 0
        # trio and the transport loop both stamp. Both the clock and the version counters start
        # above the lease saved before any restart, so a clock set back meanwhile cannot make
        # this node reuse a timestamp or a dot it has already given out (_keep_clock_lease).
        lease = int(ident.get("clock_lease_ms", 0))
        self.clock = SharedClock(pack(lease, 0))
        self.store.raise_counter_floor(lease + 1)
        self.coordinator = Coordinator(self)
        self.route_view: RouteView | None = None  # for the transport loop's batches (express.py)
        self.elastic = Elastic(self)
        self.repairer = Repair(self)
        self.api = Api(self)
        self.admission = Admission(config)       # counters live on the transport loop
        self.peers: dict[str, Peer] = {}          # by address
        self.hint_counts: dict[str, int] = {}
        self.address = ""
        self.gossip: Gossip | None = None
        self.background: trio.Nursery = None  # type: ignore[assignment]
        self.stopping = trio.Event()
        self.serving = False  # True once ready: the api answers reads and writes only then
        self.stopped = trio.Event()
        self._server: Any = None
        self.rng = random.Random(secrets.randbits(64))
        self.health = Health()
        self.metrics = Metrics(self)
        self.metrics_server = MetricsServer(self.metrics.registry)

    # ---- the ClusterView the coordinator needs -----------------------------------------

    def ring(self) -> Ring:
        assert self.gossip is not None
        return self.gossip.ring()

    def is_up(self, node_id: str) -> bool:
        assert self.gossip is not None
        if not self.gossip.is_up(node_id):
            return False
        state = self.gossip.table.get(node_id)
        return state is None or self.peer_for_address(state.address).reachable or node_id == self.node_id

    def peer(self, node_id: str) -> Peer:
        assert self.gossip is not None
        state = self.gossip.table.get(node_id)
        if state is None:
            raise Unavailable(f"node {node_id} is not a member")
        return self.peer_for_address(state.address)

    def peer_for_address(self, address: str) -> Peer:
        peer = self.peers.get(address)
        if peer is None:
            peer = Peer(address, address, self.transport, self.config.limits.max_message_bytes,
                        self.security.channel_credentials())
            self.peers[address] = peer
            for _ in range(2):
                self.background.start_soon(peer.run_sender, self.config.replica_timeout_s)
        return peer

    @staticmethod
    def now_ms() -> int:
        return int(time.time() * 1000)

    # ---- lifecycle ----------------------------------------------------------------------

    async def _start_server(self) -> str:
        node, limit, listen, security = self, self.config.limits.max_message_bytes, self.config.listen, self.security

        async def start() -> tuple[Any, int]:
            server = make_server(node, channel_options(limit), security.interceptors())
            await node.health.set(False)  # until the node is ready
            port = security.add_port(server, listen)
            if port == 0:
                raise OSError(f"cannot listen on {listen}")
            await server.start()
            return server, port

        self._server, port = await self.transport.run(start)
        # also stopped when the node is cancelled rather than drained (stop is idempotent)
        self.transport.add_cleanup(self._server.stop, 0)
        host = self.config.listen.rpartition(":")[0]
        return self.config.advertise or f"{host}:{port}"

    async def _gossip_call(self, address: str, kind: str, body: Any, timeout_s: float) -> Any:
        return await self.peer_for_address(address).call(kind, body, timeout_s)

    async def _take_tokens(self) -> bool:
        """Learn the cluster from seeds (if any) and take tokens balanced against its ring.
        Returns True when this node must bootstrap (stream its ranges) before it is normal."""
        assert self.gossip is not None
        tokens = tuple(self.ident.get("tokens") or ())
        boot = self.ident.get("bootstrap")
        resuming = bool(boot) and not boot.get("done")
        if (not tokens or resuming) and self.config.seeds:
            await self._learn_cluster()
        elif self.config.seeds:
            # a restart: learn the ring before serving, so that no request meets a ring of one;
            # bounded and never fatal (after a whole-cluster stop the seeds may be down too)
            with trio.move_on_after(RESTART_LEARN_S):
                await self._learn_cluster(whole=True)
        if not tokens:
            joining_existing = len(self.gossip.table) > 1
            if joining_existing:
                await self._await_lower_joiners()
            tokens = ringmod.allocate_tokens(
                allocation_ring(self.gossip.table, self.node_id) if joining_existing else None,
                self.config.tokens_per_node,
                self.rng,
            )
            self.ident["tokens"] = list(tokens)
            if joining_existing:
                self.ident["bootstrap"] = {"done": False, "cursors": {}}
            self.save_identity()
        self.gossip.set_me(replace(self.gossip.me, tokens=tokens))
        boot = self.ident.get("bootstrap")
        return bool(boot) and not boot.get("done")

    async def _await_lower_joiners(self) -> None:
        """Before picking tokens: while a member with a lower id is joining and has not picked
        yet, wait (bounded) for its tokens, so that this node picks against them."""
        assert self.gossip is not None
        with trio.move_on_after(10):
            while any(s.node_id < self.node_id and s.status is Status.JOINING and not s.tokens
                      for s in self.gossip.table.values()):
                await self.gossip.round()
                await trio.sleep(self.gossip.interval_s)

    async def _repick_clashing_tokens(self) -> None:
        """Before streaming, once every member has this node's tokens and gossip has had a few
        rounds to bring in any other joiner's (as Cassandra waits out its ring delay): if a node
        with a lower id joined at the same moment and, balancing against the same ring, took the
        same tokens, this node picks again against a ring that holds the other's, and looks again."""
        assert self.gossip is not None
        for _ in range(5):
            await trio.sleep(TOKEN_SETTLE_ROUNDS * self.config.gossip_interval_s)
            other = token_clash(self.gossip.table, self.node_id) or await self._clash_in_views()
            if other is None:
                return
            tokens = ringmod.allocate_tokens(allocation_ring(self.gossip.table, self.node_id),
                                             self.config.tokens_per_node, self.rng)
            log.warning("joining: %s took the same tokens at the same time; taking others", other)
            self.ident["tokens"] = list(tokens)
            self.ident["bootstrap"] = {"done": False, "cursors": {}}  # other ranges: stream afresh
            self.save_identity()
            self.gossip.set_me(replace(self.gossip.me, tokens=tokens))
            await self.elastic.wait_seen(Status.JOINING, tokens=tokens)

    async def _clash_in_views(self) -> str | None:
        """A lower id holding this node's very tokens in some live member's view (a member that
        heard from both joiners before this node heard from the other)."""
        assert self.gossip is not None
        mine = token_digest(self.gossip.me.tokens)
        for _, view in await self.elastic.member_views():
            try:
                for m in view["members"]:
                    if (m["node_id"] < self.node_id and m["status"] in ("joining", "normal", "leaving")
                            and m.get("token_digest") == mine):
                        return str(m["node_id"])
            except (KeyError, TypeError):
                continue  # no answer, or a malformed one: a miss here only skips this look
        return None

    async def _learn_cluster(self, whole: bool = False) -> None:
        """Gossip with the seeds until a normal member is known (bounded). With `whole` (a
        restart, about to serve), go on until a round brings no member the table lacks and no
        candidate waits for verification: a restarted node that served once it had heard its
        seed coordinated on a ring of two while the pings admitting the others were slow, and
        acknowledged writes on nodes that do not replicate the key (lost writes in a soak)."""
        assert self.gossip is not None
        with trio.move_on_after(30):
            while not any(s.node_id != self.node_id and s.status == Status.NORMAL
                          for s in self.gossip.table.values()):
                await self.gossip.round()
                await trio.sleep(self.gossip.interval_s)
        if len(self.gossip.table) == 1:
            raise SystemExit(f"could not reach any seed of {', '.join(self.config.seeds)} in 30 s")
        while whole:
            known = set(self.gossip.table)
            await self.gossip.round()
            if not self.gossip.candidates and set(self.gossip.table) == known:
                return
            await trio.sleep(self.gossip.interval_s)

    def save_identity(self) -> None:
        save_identity(self.config.data_dir, self.ident)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await self._run(task_status)
        finally:
            await self.metrics_server.aclose()

    async def _run(self, task_status: Any) -> None:
        async with trio.open_nursery() as nursery:
            self.background = nursery
            self.address = await self._start_server()
            metrics_at = metrics_address(self.config.metrics_listen, self.config.listen)
            if metrics_at is not None:
                self.metrics_server.start(metrics_at)
            # a generation above every earlier one of this node, even if the clock went back
            # meanwhile: peers ignore a state whose generation is not newer than what they hold
            generation = max(self.now_ms(), int(self.ident.get("generation", 0)) + 1)
            self.ident["generation"] = generation
            self.save_identity()
            me = NodeState(self.node_id, self.address, generation, 0, Status.JOINING, (), self.config.zone, {})
            self.gossip = Gossip(me, self.config.seeds, self.config.gossip_interval_s,
                                 self._gossip_call, self.rng, self.config.phi_threshold)
            self.hint_counts = await self.engine.hint_counts()
            must_bootstrap = await self._take_tokens()
            nursery.start_soon(self.gossip.run)
            nursery.start_soon(self._stop_when_removed)
            nursery.start_soon(self._keep_clock_lease)
            nursery.start_soon(self._publish_load)
            nursery.start_soon(self._publish_routes)
            nursery.start_soon(self._replay_hints_loop)
            nursery.start_soon(self._purge_loop)
            nursery.start_soon(self.repairer.run_periodically)
            nursery.start_soon(self.keys.watch, self.config.kms_check_interval_s)
            if must_bootstrap:  # joining a cluster that may hold data: stream our ranges first
                log.info("joining: waiting for the cluster to see this node, then streaming its ranges")
                with self.elastic.join_scope:  # an operator's abort-join cancels it
                    await self.elastic.wait_seen(Status.JOINING, tokens=self.gossip.me.tokens)
                    await self._repick_clashing_tokens()
                    await self.elastic.bootstrap()
            if self.elastic.join_scope.cancelled_caught:
                await self.elastic.finish_abort()  # LEFT, identity reset; then stop like a decommission
                task_status.started(self)
            else:
                self.gossip.set_status(Status.NORMAL)
                await self.transport.run(self.health.set, True)
                self.serving = True
                log.info("node %s serving on %s (%d tokens), %s", self.node_id, self.address,
                         len(self.gossip.me.tokens), self.security.describe())
                task_status.started(self)
            await self.stopping.wait()
            await self._drain()
            nursery.cancel_scope.cancel()
        await self._close()

    async def _keep_clock_lease(self) -> None:
        """Every CLOCK_LEASE_MS / 2, save a time CLOCK_LEASE_MS past both the wall clock and
        the HLC (which may run ahead of it, following a peer's): what this node stamps until the
        next save stays below it, and a restart starts its clock and counters above it, even if
        the wall clock went back in between. A short lease: a restart moves the HLC at most that
        far ahead of the wall clock. (A peer's HLC followed in the last half lease before a crash
        may still lie beyond it.)"""
        while True:
            lease = max(self.now_ms(), physical_ms(self.clock.last)) + CLOCK_LEASE_MS
            self.ident["clock_lease_ms"] = lease
            try:
                self.save_identity()  # a few hundred bytes, as at startup
            except OSError as exc:  # e.g. a full disk: the node serves on, the restart guard is older
                log.warning("could not save the clock lease: %s", exc)
            await trio.sleep(CLOCK_LEASE_MS / 2000)

    async def _publish_load(self) -> None:
        """Gossip this node's load (keys stored) as application state, for `kvstore status`."""
        assert self.gossip is not None
        while True:
            self.key_count = await self.engine.count()
            self.gossip.set_me(replace(self.gossip.me, app={"keys": self.key_count, "version": VERSION}))
            await trio.sleep(max(10 * self.config.gossip_interval_s, 2.0))

    async def _publish_routes(self) -> None:
        """Keep `route_view` (what the transport loop coordinates by) current: at once when gossip
        changes membership or a member's status, and every ROUTE_VIEW_INTERVAL_S for the failure
        detector, whose verdicts change with time alone."""
        assert self.gossip is not None
        self.gossip.on_change = self._refresh_routes
        while True:
            self._refresh_routes()
            await trio.sleep(ROUTE_VIEW_INTERVAL_S)

    def _refresh_routes(self) -> None:
        """None while the node must leave every batch to trio (not serving, stopping, ranges moving)."""
        self.route_view = None if self.stopping.is_set() else RouteView.of(self)

    async def _stop_when_removed(self) -> None:
        assert self.gossip is not None
        await self.gossip.removed_self.wait()
        self.request_stop()

    def request_stop(self) -> None:
        self.stopping.set()
        self.route_view = None  # from now on every batch goes through trio's path

    async def _drain(self) -> None:
        server, grace = self._server, self.config.shutdown_grace_s
        if server is not None:
            with trio.move_on_after(1):
                await self.transport.run(self.health.set, False)
            await trio.sleep(self.config.drain_notice_s)  # health checkers take the node out first
            async def stop() -> None:
                self.health.end_watches()
                self.sessions.end()
                await server.stop(grace)

            with trio.move_on_after(grace + 1):
                await self.transport.run(stop)

    async def _close(self) -> None:
        with trio.CancelScope(shield=True):
            for peer in list(self.peers.values()):
                with trio.move_on_after(2):
                    await peer.aclose()
            await self.engine.aclose()

    # ---- replica side ---------------------------------------------------------------------

    async def handle_batch(self, batch_id: int, ops: Sequence[ReplicaOp | InvalidArgument]) -> bytes:
        """A replica batch the transport loop could not serve by itself (kvstore/node/fastpath.py):
        hints, purges, read-repair writes, mixed batches, and ops that did not decode."""
        results: list[tuple[int, Any]] = [(0, None)] * len(ops)
        writes = [(i, op) for i, op in enumerate(ops) if isinstance(op, (RecordOp, WriteOp))]
        reads = [(i, op) for i, op in enumerate(ops) if isinstance(op, ReadOp)]
        purges = [(op.key, op.dots) for op in ops if isinstance(op, PurgeOp)]
        if purges:
            await self.store.purge_many(purges)
        for i, op in enumerate(ops):
            if isinstance(op, KvError):
                results[i] = (number_of(code_of(op)), message_of(op))
        accepted = []
        for i, op in writes:
            if op.hint_for:
                held = self.hint_counts.get(op.hint_for, 0)
                if held >= self.config.hint_max_per_target:
                    if held == self.config.hint_max_per_target:
                        log.warning("hint store for %s is full (%d hints): refusing more", op.hint_for, held)
                    exc = ResourceExhausted(f"hints for {op.hint_for}: limit of {self.config.hint_max_per_target} reached")
                    results[i] = (number_of(code_of(exc)), message_of(exc))
                    self.hint_counts[op.hint_for] = held + 1
                    continue
                self.hint_counts[op.hint_for] = held + 1
            accepted.append((i, op))
        if accepted:
            merged = await self.store.merge_many(
                [(op.key, op if isinstance(op, RecordOp) else op.siblings) for _, op in accepted],
                [op.hint_for for _, op in accepted],
            )
            for (i, _), res in zip(accepted, merged):
                if isinstance(res, BaseException):
                    results[i] = (number_of(code_of(res)), message_of(res))
        if reads:
            # the stored bytes as they are: the reader decodes them (records.siblings_from_reply),
            # or, holding the same bytes itself, does not even do that
            stored = await self.store.read_raw_many([op.key for _, op in reads])
            for (i, _), raw in zip(reads, stored):
                results[i] = (0, raw)
        return wire.encode_reply(batch_id, results)

    async def handle_call(self, payload: bytes) -> bytes:
        try:
            kind, body = wire.decode_call(payload)
            reply = await self._dispatch_call(kind, body)
            return wire.packb([wire.WIRE_FORMAT, 0, reply])
        except KvError as exc:
            return wire.packb([wire.WIRE_FORMAT, number_of(code_of(exc)), message_of(exc)])

    async def _dispatch_call(self, kind: str, body: Any) -> Any:
        assert self.gossip is not None
        if kind == "gossip-syn":
            return self.gossip.handle_syn(body)
        if kind == "gossip-ack":
            self.gossip.handle_ack(body)
            return None
        if kind == "ping":
            return self.node_id
        if kind == "holds":
            if not isinstance(body, bytes):
                raise InvalidArgument("holds: body must be a key (bytes)")
            [sibs] = await self.store.read_many([body])
            hinted = 0
            for target in self.hint_counts:
                hinted += sum(1 for k, _ in await self.engine.hints_for(target, 1_000_000) if k == body)
            return [len(sibs) if isinstance(sibs, list) else -1, hinted]
        if kind == "status":
            return self.own_view()
        if kind == "stream-ranges":
            return await self.elastic.serve_stream(body)
        if kind == "rereplicate":
            return await self.elastic.rereplicate(body)
        if kind == "list-keys":
            return await listing.serve_page(self, body)
        if kind == "merkle-trees":
            return await self.repairer.serve_trees(body)
        if kind == "range-digests":
            return await self.repairer.serve_digests(body)
        raise InvalidArgument(f"call: unknown kind {kind[:32]!r}")

    # ---- hinted handoff ----------------------------------------------------------------

    async def _replay_hints_loop(self) -> None:
        while True:
            await trio.sleep(self.config.hint_replay_interval_s)
            try:
                await self.replay_hints()
            except KvError as exc:
                log.info("hint replay paused: %s", exc)

    async def replay_hints(self, everything: bool = False) -> int:
        """Send held hints to owners that are up; a hint is deleted only after its owner acks.
        Hints for owners that left or were removed go to the key's current replicas instead,
        and so do all hints when `everything` (a decommissioning node hands its hints on)."""
        assert self.gossip is not None
        self.hint_counts = {t: c for t, c in (await self.engine.hint_counts()).items() if c}
        replayed = 0
        for target, count in list(self.hint_counts.items()):
            state = self.gossip.table.get(target)
            departed = state is None or state.status in (Status.LEFT, Status.REMOVED)
            if departed or (everything and not self.is_up(target)):
                replayed += await self._reroute_hints(target)
                continue
            if target == self.node_id or not self.is_up(target):
                continue
            hints = await self.engine.hints_for(target, self.config.hint_replay_batch)
            if not hints:
                continue
            ops = []
            for key, record in hints:
                try:
                    ops.append(WriteOp(key, decode_record(record, key)))
                except KvError as exc:
                    log.error("dropping corrupt hint for %s: %s", target, exc)
            replies = await self.peer(target).replicate(ops, self.config.replica_timeout_s)
            acked = [(k, r) for (k, r), (code, _) in zip(hints, replies) if code == 0]
            deleted = await self.engine.delete_hints_if_unchanged(target, acked)
            replayed += deleted
            self.hint_counts[target] = count - deleted
            log.info("replayed %d hints to %s (%d left)", deleted, target, self.hint_counts[target])
        return replayed

    async def drop_hints(self, target: str) -> int:
        """Operator escape hatch for a handoff that cannot finish (Riak #1135): delete every hint
        held for `target`. Its replica then catches up by anti-entropy (`repair`), not by replay."""
        dropped = 0
        while True:
            hints = await self.engine.hints_for(target, self.config.hint_replay_batch)
            if not hints:
                break
            deleted = await self.engine.delete_hints_if_unchanged(target, hints)
            dropped += deleted
            if not deleted:  # all updated meanwhile (writes still arrive for it): stop here
                break
        self.hint_counts = {t: c for t, c in (await self.engine.hint_counts()).items() if c}
        log.warning("dropped %d hints held for %s (operator request); run repair to bring it up to date",
                    dropped, target)
        return dropped

    async def _reroute_hints(self, target: str) -> int:
        moved = 0
        while True:
            hints = await self.engine.hints_for(target, self.config.hint_replay_batch)
            if not hints:
                return moved
            ring, n = self.ring(), self.config.replication_factor
            per_node: dict[str, list[tuple[int, WriteOp]]] = {}
            for i, (key, record) in enumerate(hints):
                for node_id in ring.preference_list(key, n):
                    if node_id != self.node_id:
                        per_node.setdefault(node_id, []).append((i, WriteOp(key, decode_record(record, key))))
                    else:
                        await self.store.merge_many([(key, decode_record(record, key))])
            failed: set[int] = set()
            for node_id, ops in per_node.items():
                try:
                    replies = await self.peer(node_id).replicate([op for _, op in ops], self.config.replica_timeout_s)
                    failed.update(i for (i, _), (code, _) in zip(ops, replies) if code != 0)
                except KvError:
                    failed.update(i for i, _ in ops)
            done = [h for i, h in enumerate(hints) if i not in failed]
            deleted = await self.engine.delete_hints_if_unchanged(target, done)
            moved += deleted
            if deleted == 0:
                return moved  # nobody takes them now: try again next round

    # ---- tombstone GC ---------------------------------------------------------------------

    async def _purge_loop(self) -> None:
        while True:
            await trio.sleep(self.config.tombstone_purge_interval_s)
            try:
                await self.purge_tombstones()
            except KvError as exc:
                log.info("tombstone purge paused: %s", exc)

    async def purge_tombstones(self, page: int = 1000) -> int:
        """Delete tombstones older than the grace period that every replica holds identically.

        Only the first replica of a key's preference list does the work, and only when all N
        replicas answer with the very same tombstones: a replica that missed the delete would
        otherwise bring the value back (zombie data)."""
        n = self.config.replication_factor
        # purge only tombstones older than the grace period AND written before the last complete
        # repair of this node's ranges (Scylla #3560: otherwise a replica that missed the delete
        # can bring the value back)
        cutoff = min(self.now_ms() - int(self.config.tombstone_grace_s * 1000),
                     int(self.ident.get("repaired_at_ms", 0)))
        purged, after = 0, None
        while True:
            rows = await self.engine.scan(after, page)
            if not rows:
                return purged
            after = rows[-1][0]
            ring = self.ring()
            candidates: list[tuple[bytes, frozenset[tuple[str, int]], list[str]]] = []
            for key, raw in rows:
                try:
                    sibs = decode_record(raw, key)
                except KvError:
                    continue
                if not sibs or not all(s.tombstone and physical_ms(s.hlc) < cutoff for s in sibs):
                    continue
                pref = ring.preference_list(key, n)
                if pref and pref[0] == self.node_id and len(pref) == min(n, len(ring)):
                    candidates.append((key, frozenset(s.dot for s in sibs), pref))
            purged += await self._purge_candidates(candidates)

    async def _purge_candidates(self, candidates: list[tuple[bytes, frozenset[tuple[str, int]], list[str]]]) -> int:
        if not candidates:
            return 0
        agreed: dict[bytes, frozenset[tuple[str, int]]] = {k: d for k, d, _ in candidates}
        by_peer: dict[str, list[bytes]] = {}
        for key, _, pref in candidates:
            for node_id in pref:
                if node_id != self.node_id:
                    by_peer.setdefault(node_id, []).append(key)
        for node_id, keys in by_peer.items():
            try:
                replies = await self.peer(node_id).replicate([ReadOp(k) for k in keys], self.config.replica_timeout_s)
            except KvError:
                replies = [(14, None)] * len(keys)
            for key, (code, payload) in zip(keys, replies):
                ok = code == 0 and payload is not None
                if ok:
                    try:
                        theirs = siblings_from_reply(payload)
                        ok = all(s.tombstone for s in theirs) and {s.dot for s in theirs} == agreed.get(key)
                    except (ValueError, TypeError):
                        ok = False
                if not ok:
                    agreed.pop(key, None)
        if not agreed:
            return 0
        for node_id, keys in by_peer.items():
            ops = [PurgeOp(k, agreed[k]) for k in keys if k in agreed]
            if ops:
                try:
                    await self.peer(node_id).replicate(ops, self.config.replica_timeout_s)
                except KvError as exc:
                    log.info("purge on %s failed (it keeps its tombstones): %s", node_id, exc)
        return await self.store.purge_many(list(agreed.items()))

    # ---- encryption at rest: re-wrap --------------------------------------------------------

    async def rewrap(self, rate_per_s: float | None = None, page: int = 500) -> dict[str, Any]:
        """Re-wrap every stored envelope's DEK under the KEK's primary version, without touching
        the values (so an old KEK version can then be disabled). Rate-limited; progress is in
        `rewrap_progress` and the node's status."""
        rate = rate_per_s or self.config.rewrap_rate_per_s
        sealer = self.keys.sealer
        progress = self.rewrap_progress = {"running": True, "scanned": 0, "rewrapped": 0, "started_ms": self.now_ms()}

        def swaps_for(key: bytes, raw: bytes) -> dict[tuple[str, int], tuple[bytes, bytes]]:
            """dot -> (old envelope, re-wrapped envelope) for siblings not yet on the primary version."""
            swaps = {}
            for sib in decode_record(raw, key):
                if sib.value is not None:
                    new = sealer.rewrap(sib.value)
                    if new is not None:
                        swaps[sib.dot] = (sib.value, new)
            return swaps

        def updater(key: bytes, swaps: dict[tuple[str, int], tuple[bytes, bytes]]):
            def apply(old: bytes | None) -> bytes | None:
                if old is None:
                    return None
                current = decode_record(old, key)
                # swap only envelopes that are still exactly what was re-wrapped
                out = [replace(s, value=swaps[s.dot][1]) if s.dot in swaps and swaps[s.dot][0] == s.value else s
                       for s in current]
                return encode_record(out) if out != current else old
            return apply

        after = None
        try:
            while True:
                rows = await self.engine.scan(after, page)
                if not rows:
                    break
                after = rows[-1][0]
                work = []
                for key, raw in rows:
                    try:
                        swaps = swaps_for(key, raw)
                    except KvError as exc:
                        log.warning("rewrap skipped key %r: %s", key[:64], exc)
                        continue
                    if swaps:
                        work.append((key, updater(key, swaps)))
                if work:
                    await self.engine.update_many(work)
                progress["scanned"] += len(rows)
                progress["rewrapped"] += len(work)
                await trio.sleep(len(rows) / rate)
        finally:
            progress["running"] = False
            progress["finished_ms"] = self.now_ms()
        hints = await self._rewrap_hints()
        progress["hints_rewrapped"] = hints
        return dict(progress)

    async def _rewrap_hints(self) -> int:
        count = 0
        sealer = self.keys.sealer
        for target in list((await self.engine.hint_counts()).keys()):
            for key, raw in await self.engine.hints_for(target, 1 << 30):
                try:
                    sibs = decode_record(raw, key)
                    new = [replace(s, value=sealer.rewrap(s.value) or s.value) if s.value is not None else s for s in sibs]
                except KvError:
                    continue
                if new != sibs:
                    fresh = encode_record(new)
                    await self.engine.hint_update_many([(target, key, lambda old, raw=raw, fresh=fresh: fresh if old == raw else old)])
                    count += 1
        return count

    async def admin_command(self, name: str, args: bytes) -> bytes:
        try:
            params = wire.unpackb(args) if args else {}
        except KvError:
            raise InvalidArgument("args: not a msgpack map") from None
        if not isinstance(params, dict):
            raise InvalidArgument("args: must be a msgpack map")
        if name == "rewrap":
            rate = params.get("rate_per_s")
            if rate is not None and (not isinstance(rate, (int, float)) or rate <= 0):
                raise InvalidArgument("rate_per_s: must be a positive number")
            if params.get("background"):
                if self.rewrap_progress.get("running"):
                    raise InvalidArgument("rewrap: a re-wrap is already running (see status)")
                self.background.start_soon(self.rewrap, rate)
                return wire.packb({"started": True})
            return wire.packb(await self.rewrap(rate))
        if name == "kms-reload":
            self.keys.reload()
            return wire.packb({"ok": True})
        if name == "test-block-peers":
            # fault injection for tests without network namespaces: cut this node's outbound links
            # to the given addresses (tell both sides for a symmetric partition); [] heals
            if not self.config.test_hooks:
                raise PermissionDenied("test-block-peers: this node was not started with --test-hooks")
            addresses = params.get("addresses")
            if not isinstance(addresses, list) or not all(isinstance(a, str) for a in addresses):
                raise InvalidArgument("addresses: must be a list of host:port strings")
            for address, peer in self.peers.items():
                peer.blocked = address in addresses
            for address in addresses:
                self.peer_for_address(address).blocked = True
            return wire.packb({"blocked": sorted(a for a, p in self.peers.items() if p.blocked)})
        if name == "decommission":
            return wire.packb(await self.elastic.decommission())
        if name == "abort-join":
            return wire.packb(await self.elastic.abort_join())
        if name == "removenode":
            node_id = params.get("node_id")
            if not isinstance(node_id, str):
                raise InvalidArgument("node_id: required, a node id")
            return wire.packb(await self.elastic.removenode(node_id))
        if name == "repair":
            only = params.get("range")
            if only is not None:
                if not (isinstance(only, list) and len(only) == 2 and all(isinstance(t, int) for t in only)):
                    raise InvalidArgument("range: must be [start, end] tokens")
                only = (only[0], only[1])
            return wire.packb(await self.repairer.repair(only))
        if name == "cleanup":
            return wire.packb({"deleted": await self.elastic.cleanup()})
        if name == "purge-tombstones":
            return wire.packb({"purged": await self.purge_tombstones()})
        if name == "drop-hints":
            target = params.get("target")
            if not isinstance(target, str) or not target:
                raise InvalidArgument("target: required, the node id whose hints to drop")
            return wire.packb({"dropped": await self.drop_hints(target)})
        if name == "replay-hints":
            return wire.packb({"replayed": await self.replay_hints()})
        raise InvalidArgument(f"command: unknown command {name[:32]!r} (rewrap, kms-reload, decommission, abort-join, removenode, cleanup, repair, purge-tombstones, replay-hints, drop-hints)")

    # ---- public and admin responses ------------------------------------------------------

    async def forward(self, target: str, method: str, request: Any, deadline: float) -> Any:
        peer = self.peer(target)
        stub = await peer.stub("kv")
        timeout = max(deadline - trio.current_time(), 0.001)
        metadata = ((FORWARDED_HEADER, "1"), *logs.request_metadata())  # read here: call() runs on asyncio

        async def call() -> Any:
            return await getattr(stub, method)(request, timeout=timeout, metadata=metadata)

        try:
            return await self.transport.run(call)
        except grpc.aio.AioRpcError as exc:
            from kvstore.node.status import error_from

            raise error_from(exc.code(), f"forwarded to {target}: {exc.details()}") from None

    async def ring_response(self) -> kv_pb2.RingResponse:
        assert self.gossip is not None
        nodes = [
            kv_pb2.RingNode(node_id=s.node_id, address=s.address, zone=s.zone, tokens=list(s.tokens),
                            up=self.is_up(s.node_id))
            for s in self.gossip.table.values() if s.tokens and s.status in (Status.NORMAL, Status.LEAVING)
        ]
        digest = self.ring().digest()
        return kv_pb2.RingResponse(nodes=nodes, n=self.config.replication_factor, epoch=int(digest[:15], 16))

    def own_view(self) -> dict[str, Any]:
        assert self.gossip is not None
        ring = self.ring()
        share = ring.ownership() if len(ring) else {}
        return {
            "node_id": self.node_id,
            "address": self.address,
            "ring_digest": ring.digest(),
            "replication_factor": self.config.replication_factor,
            "warning": ring.warning_for(self.config.replication_factor) if len(ring) else "ring is empty",
            "members": [
                {
                    "node_id": s.node_id, "address": s.address, "zone": s.zone, "status": s.status.value,
                    "up": self.is_up(s.node_id), "tokens": len(s.tokens), "ownership": share.get(s.node_id, 0.0),
                    "token_digest": token_digest(s.tokens),
                    "phi": round(min(self.gossip.phi(s.node_id), 1e9), 2), "app": dict(s.app),
                    "generation": s.generation, "heartbeat": s.heartbeat,
                }
                for s in sorted(self.gossip.table.values(), key=lambda s: s.address)
            ],
            "hints": dict(self.hint_counts),
            "pid": os.getpid(),
            "cpu_s": time.process_time(),
            "rss_bytes": _rss_bytes(),
            "read_repairs": self.coordinator.repairs,
            "encryption": self.keys.describe(),
            "rewrap": dict(self.rewrap_progress),
            "stream": {k: v for k, v in self.elastic.progress.items() if k != "started"},
            "repair": dict(self.repairer.progress),
            "repaired_at_ms": self.ident.get("repaired_at_ms", 0),
            "metrics": self.metrics_server.address,
            "admission": self.admission.snapshot(),
        }

    async def status_response(self) -> admin_pb2.StatusResponse:
        return admin_pb2.StatusResponse(payload=wire.packb(self.own_view()))

    async def locate(self, key: bytes) -> admin_pb2.LocateResponse:
        self.config.limits.check_key(key)
        assert self.gossip is not None
        ring = self.ring()
        pref = ring.preference_list(key, self.config.replication_factor) if len(ring) else []
        replicas = []
        for state in sorted(self.gossip.table.values(), key=lambda s: s.node_id):
            if state.status not in (Status.NORMAL, Status.LEAVING, Status.JOINING):
                continue
            try:
                if state.node_id == self.node_id:
                    stored, _ = await self._dispatch_call("holds", key)
                else:
                    stored, _ = await self.peer(state.node_id).call("holds", key, self.config.replica_timeout_s)
            except KvError:
                stored = -1
            replicas.append(admin_pb2.Replica(
                node_id=state.node_id, address=state.address, primary=state.node_id in pref,
                stored=stored > 0, siblings=max(stored, 0),
            ))
        return admin_pb2.LocateResponse(token=ringmod.key_token(key), replicas=replicas)


async def serve(config: NodeConfig, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Run a node until request_stop() (or cancellation); everything is closed on return."""
    try:
        security = load_security(config)
    except CertError as exc:
        raise SystemExit(f"refusing to start: {exc}") from None
    ident = load_identity(config.data_dir, config.node_id)
    logs.node_id.set(ident["node_id"])  # every task of this node logs as it
    logs.set_process_node(ident["node_id"])
    keys = Keys.load(config)
    lock = lock_data_dir(config.data_dir)
    node: Node | None = None
    try:
        engine = await open_engine(config)
        try:
            async with open_transport() as transport:
                node = Node(config, transport, engine, ident, keys, security)
                await node.run(task_status=task_status)
        finally:
            with trio.CancelScope(shield=True):
                await engine.aclose()
    finally:
        os.close(lock)
        if node is not None:
            node.stopped.set()  # everything is closed and joined

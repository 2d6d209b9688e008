"""The chaos workload: concurrent trio clients reading, writing unique values, deleting and doing
read-modify-writes with contexts, every operation recorded in a History (cluster/history.py).

Belongs here: generating operations and classifying their outcomes. Not here: faults
(cluster/nemesis.py), judging the history (cluster/checker.py).

Every value is unique (`<run>:<worker>:<seq>`), so a lost or invented value is visible. Each
worker sends its operations to one node (worker i to node i mod the cluster's size; a client per
node, token_aware=False), so the history names the coordinator, a dead node's share of failures
shows in the availability, and a hung node stalls only the workers bound to it.
Keys are split: most are "causal" (only writes with a context, so the checker knows exactly what
each write superseded), a few are "blind" (writes and deletes without a context also happen), and
inserts write fresh keys once (nothing supersedes them: every acknowledged one must survive).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Sequence

import trio

from cluster.history import CAS, DELETE, FAIL, INFO, INVOKE, OK, READ, WRITE, History, Op
from kvstore.client import Client
from kvstore.tls import TlsMaterial
from kvstore.errors import InvalidArgument, KvError, PermissionDenied, StaleContext, Unauthenticated, Unavailable

#: errors after which a write certainly was not applied: the request was refused before any
#: replica stored it (a stale conditional put is checked inside the stamping transaction)
DEFINITE_WRITE_FAILURES = (InvalidArgument, StaleContext, PermissionDenied, Unauthenticated)


def never_sent(exc: KvError) -> bool:
    """The request provably never reached a node (the connection was refused), so not applied."""
    text = str(exc)
    return isinstance(exc, Unavailable) and ("failed to connect" in text.lower() or "connection refused" in text.lower())


def write_outcome(exc: KvError) -> str:
    """fail only when the error guarantees the write was not applied; otherwise info. Unavailable
    from a coordinator that missed its quorum still stored the write locally."""
    if isinstance(exc, DEFINITE_WRITE_FAILURES) or never_sent(exc):
        return FAIL
    return INFO


def read_outcome(exc: KvError) -> str:
    """A read that errs has no effect to be unsure about (read repair only spreads existing versions)."""
    return FAIL


@dataclass(frozen=True)
class WorkloadConfig:
    clients: int = 12                  # concurrent workers
    keys: int = 24                     # key space: small, so workers contend and siblings appear
    blind_keys: int = 4                # of those, keys that also get blind writes and deletes
    max_ops: int = 4000                # stop after this many operations ...
    duration_s: float = 20.0           # ... or this long, whichever comes first
    timeout_s: float = 3.0             # per request (the test profile's request timeout)
    think_s: float = 0.01              # pause between one worker's ops: keeps load moderate on 2 cores
    # operation mix (weights): plain read, read-modify-write, conditional rmw, delete-with-context,
    # blind put or delete (on blind keys), insert (a put to a fresh key: nothing may ever supersede it)
    read: float = 0.3
    rmw: float = 0.3
    cas: float = 0.1
    delete: float = 0.08
    blind: float = 0.1
    insert: float = 0.12
    # consistency levels (weights)
    levels: tuple[tuple[str, float], ...] = (("quorum", 0.8), ("all", 0.1), ("one", 0.1))
    key_prefix: str = "k"

    def validate(self) -> "WorkloadConfig":
        if self.clients < 1 or self.keys < 1 or self.max_ops < 0 or self.duration_s <= 0:
            raise ValueError("clients, keys >= 1; max_ops >= 0; duration_s > 0")
        if not 0 <= self.blind_keys <= self.keys:
            raise ValueError(f"blind_keys: {self.blind_keys} is not in 0..{self.keys}")
        return self

    def key(self, i: int) -> bytes:
        return f"{self.key_prefix}{i:03d}".encode()

    def all_keys(self) -> list[bytes]:
        return [self.key(i) for i in range(self.keys)]

    def is_blind(self, key: bytes) -> bool:
        return int(key[len(self.key_prefix):]) < self.blind_keys


@dataclass
class Workload:
    """Runs workers against whatever nodes `addresses()` names (it may grow as nodes are added)."""

    config: WorkloadConfig
    history: History
    addresses: Callable[[], Sequence[str]]
    seed: int
    run_id: str = "r"
    clock: Callable[[], float] = field(default=trio.current_time)
    t0: float = 0.0
    _ids: int = 0
    _clients: dict[str, Client] = field(default_factory=dict)
    tls: TlsMaterial | None = None   # the cluster's client certificate (LocalCluster.tls()); None: plaintext
    stopping: bool = False
    ops_started: int = 0

    def now(self) -> float:
        return self.clock() - self.t0

    def client(self, address: str) -> Client:
        c = self._clients.get(address)
        if c is None:
            c = self._clients[address] = Client([address], token_aware=False, timeout_s=self.config.timeout_s,
                                                retries=1, tls=self.tls)
        return c

    def close(self) -> None:
        for c in self._clients.values():
            c.close()
        self._clients.clear()

    def _next_id(self) -> int:
        self._ids += 1
        return self._ids

    async def run(self) -> None:
        """All workers until max_ops or duration_s (each in-flight op then finishes within its timeout)."""
        cfg = self.config.validate()
        if not self.t0:
            self.t0 = self.clock()
        deadline = self.clock() + cfg.duration_s
        try:
            # a hard bound: in-flight ops get their timeout and a little more, then are cut (info)
            with trio.move_on_at(deadline + 2 * cfg.timeout_s + 2):
                async with trio.open_nursery() as nursery:
                    for w in range(cfg.clients):
                        nursery.start_soon(self._worker, w, random.Random(f"{self.seed}:{w}"), deadline)
        finally:
            self.close()

    def stop(self) -> None:
        self.stopping = True

    def _more(self, deadline: float) -> bool:
        return not self.stopping and self.ops_started < self.config.max_ops and self.clock() < deadline

    async def _worker(self, process: int, rng: random.Random, deadline: float) -> None:
        cfg = self.config
        seq = 0
        kinds = ("read", "rmw", "cas", "delete", "blind", "insert")
        weights = (cfg.read, cfg.rmw, cfg.cas, cfg.delete, cfg.blind, cfg.insert)
        levels, level_w = zip(*cfg.levels)
        while self._more(deadline):
            addresses = list(self.addresses())
            if not addresses:
                await trio.sleep(0.1)
                continue
            node = addresses[process % len(addresses)]  # bound to a node (as in Jepsen): a hung one stalls only its workers
            kind = rng.choices(kinds, weights)[0]
            key = cfg.key(rng.randrange(cfg.keys))
            if kind == "blind" and not cfg.is_blind(key):
                kind = "rmw"
            level = rng.choices(levels, level_w)[0]
            seq += 1
            value = f"{self.run_id}:{process}:{seq}".encode()
            kv = self.client(node)
            if kind == "read":
                await self._read(kv, process, node, key, level)
            elif kind == "insert":
                await self._write(kv, process, node, f"i{self.run_id}:{process}:{seq}".encode(), value, level,
                                  WRITE, None)
            elif kind == "blind":
                if rng.random() < 0.75:
                    await self._write(kv, process, node, key, value, level, WRITE, None)
                else:
                    await self._write(kv, process, node, key, None, level, DELETE, None)
            else:
                got = await self._read(kv, process, node, key, "quorum")
                if got is not None:
                    f = {"rmw": WRITE, "cas": CAS, "delete": DELETE}[kind]
                    await self._write(kv, process, node, key, None if f == DELETE else value, level, f, got)
            if cfg.think_s:
                await trio.sleep(rng.uniform(0, 2 * cfg.think_s))

    async def _read(self, kv: Client, process: int, node: str, key: bytes,
                    level: str) -> tuple[int, bytes, list[bytes]] | None:
        """A recorded read; returns (op id, context, values) when it succeeded."""
        self.ops_started += 1
        op_id = self._next_id()
        h = self.history
        h.record(Op(op_id, INVOKE, READ, key, self.now(), process, node, level))
        try:
            versions = await kv.get(key, r=level)
        except KvError as exc:
            h.record(Op(op_id, read_outcome(exc), READ, key, self.now(), process, node, level,
                        error=f"{type(exc).__name__}: {exc}"))
            return None
        except BaseException:
            h.record(Op(op_id, INFO, READ, key, self.now(), process, node, level, error="cancelled"))
            raise
        values = [s.value for s in versions.siblings]
        h.record(Op(op_id, OK, READ, key, self.now(), process, node, level, values=values))
        return op_id, versions.context, values

    async def _write(self, kv: Client, process: int, node: str, key: bytes, value: bytes | None, level: str,
                     f: str, read: tuple[int, bytes, list[bytes]] | None) -> None:
        """A recorded put (value) or delete (value None); with `read`, under that read's context."""
        self.ops_started += 1
        op_id = self._next_id()
        h = self.history
        ctx_from, context, supersedes = read if read is not None else (None, b"", [])
        common = dict(process=process, node=node, level=level, value=value, blind=read is None,
                      context_from=ctx_from, supersedes=list(supersedes))
        h.record(Op(op_id, INVOKE, f, key, self.now(), **common))  # type: ignore[arg-type]
        try:
            if f == DELETE:
                await kv.delete(key, context=context, w=level)
            else:
                assert value is not None
                await kv.put(key, value, context=context, w=level, conditional=f == CAS)
        except KvError as exc:
            outcome = write_outcome(exc)
            h.record(Op(op_id, outcome, f, key, self.now(), process, node, level,
                        error=f"{type(exc).__name__}: {exc}"))
            return
        except BaseException:
            h.record(Op(op_id, INFO, f, key, self.now(), process, node, level, error="cancelled"))
            raise
        h.record(Op(op_id, OK, f, key, self.now(), process, node, level))


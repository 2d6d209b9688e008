"""The nemesis: faults on a LocalCluster following a seeded schedule, each recorded as a window
(FaultEvent start and end) in the History.

Belongs here: fault kinds, schedules (pure, from a random.Random) and applying and healing them.
Faults: kill (SIGKILL, healed by a restart), pause (SIGSTOP past the failure detector, healed by
SIGCONT), stop (SIGTERM, healed by a restart), restart (graceful, in place), add (a node joins),
and partitions: isolate one node, cut a minority off, a bridge (two halves that both still see
one node), and a one-way cut. A cut is outbound (a symmetric cut tells both sides). On a cluster
with network="netns" a cut is a blackhole route in the sender's namespace (cluster/netns.py), so
the kernel drops the traffic; on loopback clusters it goes through the nodes' `test-block-peers`
hook (nodes started with --test-hooks). Clients can still reach every node, as in Jepsen: only
node-to-node traffic is cut.

One fault is active at a time; the same seed and node count give the same schedule.
"""
from __future__ import annotations

import logging
import random
import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

import grpc
import msgpack
import trio

from cluster.history import FaultEvent, History
from cluster.launcher import STATUS_TIMEOUT_S, ClusterError, LocalCluster, status_of
from kvstore._proto import admin_pb2, admin_pb2_grpc
from kvstore.tls import channel

log = logging.getLogger(__name__)

PROCESS_FAULTS = ("kill", "pause", "stop", "restart")
PARTITIONS = ("partition-isolate", "partition-minority", "partition-bridge", "partition-oneway")
ALL_FAULTS = PROCESS_FAULTS + PARTITIONS + ("add",)
#: faults after which the other nodes' failure detectors should mark the targets down
DETECTABLE = ("kill", "stop", "pause", "partition-isolate", "partition-minority")

COMMAND_TIMEOUT_S = 2.0    # one test-block-peers call; a live node answers in milliseconds
CONVERGE_WAIT_S = 15.0     # after a restart or heal: gossip in the test profile agrees within a few seconds


@dataclass(frozen=True)
class Step:
    """One fault: `kind` on `targets` (node names) from `at_s` for `duration_s` (run time)."""

    kind: str
    targets: tuple[str, ...]
    at_s: float
    duration_s: float
    # partitions: the groups that cannot talk to each other (names); one-way: [senders, receivers]
    groups: tuple[tuple[str, ...], ...] = ()

    def describe(self) -> str:
        cut = " | ".join(",".join(g) for g in self.groups)
        return (f"{self.at_s:6.1f}s +{self.duration_s:4.1f}s {self.kind} {','.join(self.targets)}"
                + (f" [{cut}]" if cut else ""))


def make_step(rng: random.Random, kind: str, names: Sequence[str], at_s: float, duration_s: float,
              new_name: str = "") -> Step:
    """A step of `kind` on nodes drawn from `names` (`new_name` for add)."""
    names = sorted(names)
    if kind == "add":
        return Step(kind, (new_name,), at_s, duration_s)
    if kind in PROCESS_FAULTS or kind == "partition-isolate":
        node = rng.choice(names)
        groups = ((node,), tuple(n for n in names if n != node)) if kind == "partition-isolate" else ()
        return Step(kind, (node,), at_s, duration_s, groups)
    if kind == "partition-minority":
        size = rng.randint(1, max(1, (len(names) - 1) // 2))
        minority = tuple(sorted(rng.sample(names, size)))
        return Step(kind, minority, at_s, duration_s, (minority, tuple(n for n in names if n not in minority)))
    if kind == "partition-bridge":
        # both halves see the bridge, not each other (Jepsen's bridge): a non-transitive partition
        shuffled = rng.sample(names, len(names))
        bridge, rest = shuffled[0], shuffled[1:]
        half = max(1, len(rest) // 2)
        a, b = tuple(sorted(rest[:half])), tuple(sorted(rest[half:]))
        return Step(kind, (bridge,), at_s, duration_s, (a, b))
    if kind == "partition-oneway":
        node = rng.choice(names)
        # the node's messages are lost, the others' still reach it
        return Step(kind, (node,), at_s, duration_s, ((node,), tuple(n for n in names if n != node)))
    raise ValueError(f"fault kind: {kind!r} is not one of {', '.join(ALL_FAULTS)}")


def make_schedule(rng: random.Random, kinds: Sequence[str], names: Sequence[str], *, start_s: float,
                  end_s: float, fault_s: tuple[float, float] = (2.0, 4.0), gap_s: tuple[float, float] = (1.0, 2.0),
                  max_steps: int = 1000, max_nodes: int = 9) -> list[Step]:
    """Faults one after another from start_s until the next would not end before end_s."""
    steps: list[Step] = []
    names = list(names)
    t = start_s
    while len(steps) < max_steps:
        kind = rng.choice(list(kinds))
        if kind == "add" and len(names) >= max_nodes:
            kind = rng.choice([k for k in kinds if k != "add"] or ["pause"])
        duration = rng.uniform(*fault_s)
        if t + duration > end_s:
            break
        new_name = f"n{1 + max(int(n[1:]) for n in names)}" if kind == "add" else ""
        steps.append(make_step(rng, kind, names, round(t, 2), round(duration, 2), new_name))
        if new_name:
            names.append(new_name)
        t += duration + rng.uniform(*gap_s)
    return steps


def rolling_restart(names: Sequence[str], start_s: float, each_s: float = 3.0) -> list[Step]:
    return [Step("restart", (n,), start_s + i * each_s, 0.0) for i, n in enumerate(sorted(names))]


def cuts(step: Step) -> dict[str, set[str]]:
    """For a partition step: node name -> the names it must not send to."""
    out: dict[str, set[str]] = {}
    if step.kind == "partition-oneway":
        (src,), others = step.groups
        out[src] = set(others)
        return out
    a, b = step.groups
    for x in a:
        out.setdefault(x, set()).update(b)
    for y in b:
        out.setdefault(y, set()).update(a)
    return out


_ERROR_LINE = re.compile(r"^[\s|+-]*((?:[\w.]+\.)?\w+(?:Error|Exception|Exit)\b:?.*)$")


def crash_reason(log_tail: str, most: int = 3) -> str:
    """The distinct exception lines at the end of a node's log (innermost first as printed)."""
    seen: list[str] = []
    for line in log_tail.rpartition("--- launcher")[2].splitlines():  # this start's lines only
        m = _ERROR_LINE.match(line)
        if m and not m.group(1).startswith(("ExceptionGroup", "BaseExceptionGroup")):
            text = m.group(1).strip()
            if text not in seen:
                seen.append(text)
    return "; ".join(seen[:most]) or "exited without an exception in its log"


#: channel options for harness calls: a private subchannel, quick reconnects
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1), ("grpc.initial_reconnect_backoff_ms", 100),
                   ("grpc.max_reconnect_backoff_ms", 1000)]


def admin_command(address: str, name: str, args: dict[str, object], timeout_s: float = COMMAND_TIMEOUT_S,
                  credentials: grpc.ChannelCredentials | None = None) -> bytes:
    """Admin.Command on the node at `address` (blocking; raises grpc.RpcError). `credentials`:
    LocalCluster.credentials() (the admin certificate) when the cluster runs TLS."""
    with channel(address, CHANNEL_OPTIONS, credentials) as ch:
        req = admin_pb2.CommandRequest(name=name, args=msgpack.packb(args))
        return admin_pb2_grpc.AdminStub(ch).Command(req, timeout=timeout_s).payload


@dataclass
class Nemesis:
    cluster: LocalCluster
    history: History
    now: Callable[[], float]                 # run time in seconds
    notes: list[str] = field(default_factory=list)
    _ids: int = 0
    _blocked: set[str] = field(default_factory=set)     # names with links cut
    _down: dict[str, str] = field(default_factory=dict)  # name -> "killed" | "stopped" | "paused"
    _crashed: set[str] = field(default_factory=set)
    _seen_alive: set[str] = field(default_factory=set)
    _timings: list[str] = field(default_factory=list)   # what healing the current step took
    _lock: trio.Lock = field(default_factory=trio.Lock)   # one launcher call at a time (threads share its records)

    def _note(self, text: str) -> None:
        log.warning("nemesis: %s", text)
        self.notes.append(f"{self.now():.1f}s {text}")
        self.history.fault(FaultEvent(0, "note", "note", self.now(), detail=text))

    def _addr(self, name: str) -> str:
        return self.cluster.node(name).address

    async def _command(self, name: str, command: str, args: dict[str, object], attempts: int = 3) -> bool:
        """An admin command on one node (retried). Its own channel, not from grpc's shared
        subchannel pool: a shared one may still be in reconnect backoff from before the node
        restarted, and fails at once with the old "connection refused"."""
        address = self._addr(name)
        for attempt in range(attempts):
            try:
                await trio.to_thread.run_sync(admin_command, address, command, args, COMMAND_TIMEOUT_S,
                                              self.cluster.credentials())
                return True
            except grpc.RpcError as exc:
                if attempt == attempts - 1:
                    self._note(f"{command} on {name}: {exc.code().name}: {exc.details()}")
                    return False
                await trio.sleep(0.2 * (attempt + 1))
        return False

    async def run(self, schedule: Sequence[Step]) -> None:
        for step in schedule:
            wait = step.at_s - self.now()
            if wait > 0:
                await trio.sleep(wait)
            await self.apply(step)

    async def apply(self, step: Step) -> None:
        """Open the fault's window, keep it for its duration, heal it, close the window."""
        self._ids += 1
        wid = self._ids
        targets = list(step.targets)
        self.history.fault(FaultEvent(wid, "start", step.kind, self.now(), targets, step.describe()))
        log.info("nemesis: %s", step.describe())
        self._timings = []
        try:
            await self._start(step)
            if step.duration_s:
                until = trio.current_time() + step.duration_s
                if step.kind in DETECTABLE:
                    with trio.move_on_at(until):
                        await self._detect(step)
                await trio.sleep_until(until)
            self.history.fault(FaultEvent(wid, "heal", step.kind, self.now(), targets))
            await self._end(step)
        finally:
            self.history.fault(FaultEvent(wid, "end", step.kind, self.now(), targets, ", ".join(self._timings)))

    async def _detect(self, step: Step) -> None:
        """Until every other running node sees the targets down (timed: the failure detector at
        work); cancelled at the end of the fault, which leaves "not seen down" in the timings."""
        t0, seen = trio.current_time(), False
        try:
            while True:
                observers = [n for n in self.cluster.names() if n not in step.targets and n not in self._down]
                views = []
                for name in observers:
                    try:
                        views.append(await trio.to_thread.run_sync(status_of, self._addr(name), STATUS_TIMEOUT_S,
                                                                   self.cluster.credentials()))
                    except grpc.RpcError:
                        continue
                ups = [{m["node_id"] for m in v["members"] if m["up"]} for v in views]
                if ups and all(not (up & set(step.targets)) for up in ups):
                    seen = True
                    return
                await trio.sleep(0.1)
        finally:
            self._timings.append(f"seen down after {trio.current_time() - t0:.1f}s" if seen else
                                 f"not seen down in {trio.current_time() - t0:.1f}s")

    async def _thread(self, what: str, fn: Callable[..., object], *args: object) -> bool:
        t = trio.current_time()
        try:
            async with self._lock:
                await trio.to_thread.run_sync(fn, *args)
            return True
        except ClusterError as exc:
            self._note(f"{what}: {exc}".splitlines()[0][:300])
            return False
        finally:
            self._timings.append(f"{what} {trio.current_time() - t:.1f}s")

    async def watch(self, interval_s: float = 0.3) -> None:
        """Until cancelled: record a `crash` for every node that exits without a fault causing it
        (its log's last lines in the detail). A crashed node stays down until heal_all."""
        while True:
            await trio.sleep(interval_s)
            async with self._lock:
                dead = []
                for n in self.cluster.names():
                    if n in self._down:
                        continue
                    if self.cluster.alive(n):
                        self._seen_alive.add(n)
                    elif n in self._seen_alive:  # a node being added is not alive yet: no crash
                        dead.append(n)
            for name in dead:
                self._crashed.add(name)
                self._down[name] = "crashed"
                why = crash_reason(self.cluster.logs(name, 120))
                self.history.fault(FaultEvent(0, "crash", "crash", self.now(), [name],
                                              f"{name} exited, no fault made it: {why[:300]} "
                                              f"(see {self.cluster.log_path(name)})"))
                log.warning("nemesis: %s crashed: %s", name, why)

    async def _start(self, step: Step) -> None:
        kind, c = step.kind, self.cluster
        if kind in ("kill", "stop", "pause"):
            name = step.targets[0]
            if name in self._down or name not in c.names() or not c.alive(name):
                self._note(f"{kind} {name}: not running, skipped")
                return
            self._down[name] = {"kill": "killed", "stop": "stopped", "pause": "paused"}[kind]  # before: no false crash
            if not await self._thread(f"{kind} {name}", {"kill": c.kill, "stop": c.stop, "pause": c.pause}[kind], name):
                if c.alive(name) and self._down.get(name) != "paused":
                    del self._down[name]
        elif kind == "restart":
            name = step.targets[0]
            if name in c.names() and name not in self._down:
                self._down[name] = "restarting"
                await self._revive(name)
                await self.converge()
        elif kind == "add":
            await self._thread("add", lambda: c.add_node(wait=False))
            await self.converge()
        elif kind in PARTITIONS:
            await self.block(cuts(step))
        else:
            raise ValueError(f"fault kind: {kind!r}")

    async def _end(self, step: Step) -> None:
        if step.kind in ("kill", "stop", "pause"):
            await self._revive(step.targets[0])
            await self.converge()
        elif step.kind in PARTITIONS:
            await self.block({})

    async def _revive(self, name: str) -> None:
        """Resume or (re)start the node; it leaves `_down` only once it runs again."""
        state = self._down.get(name)
        c = self.cluster
        if state == "paused":
            await self._thread(f"resume {name}", c.resume, name)
        elif state is not None or (name in c.names() and not c.alive(name)):
            await self._thread(f"restart {name}", lambda: c.restart(name, wait=False))
        if c.alive(name):
            self._down.pop(name, None)
            self._crashed.discard(name)
        else:
            self._down[name] = "crashed"

    async def block(self, cut: dict[str, set[str]]) -> None:
        """Cut exactly these outbound links (name -> names) and heal every other."""
        names = set(self.cluster.names())
        net = self.cluster.net
        if net is not None:  # routes live in the namespaces, across restarts of their nodes
            for name in sorted(names):
                hosts = [self.cluster.node(t).host for t in cut.get(name, set()) if t in names]
                try:
                    await trio.to_thread.run_sync(net.cut, name, hosts)
                except Exception as exc:  # noqa: BLE001 - noted; the run goes on and the checker judges
                    self._note(f"cut on {name}: {exc}")
            self._blocked = {n for n in names if cut.get(n)}
            return
        for name in sorted(names):
            targets = cut.get(name, set())
            if not targets and name not in self._blocked:
                continue
            if name in self._down or not self.cluster.alive(name):
                self._blocked.discard(name)  # a restarted node starts with no cuts
                continue
            addresses = sorted(self._addr(t) for t in targets if t in names)
            if not await self._command(name, "test-block-peers", {"addresses": addresses}):
                continue
            if targets:
                self._blocked.add(name)
            else:
                self._blocked.discard(name)

    async def converge(self, timeout_s: float = CONVERGE_WAIT_S) -> bool:
        """Wait (bounded) until the running nodes agree; a note, not an error, when they do not."""
        t = trio.current_time()
        try:
            async with self._lock:
                await trio.to_thread.run_sync(self.cluster.wait_converged, timeout_s)
            return True
        except ClusterError as exc:
            self._note(f"no convergence within {timeout_s:.0f} s: {str(exc)[:300]}")
            return False
        finally:
            self._timings.append(f"agreement {trio.current_time() - t:.1f}s")

    async def heal_all(self) -> None:
        """Whatever is still faulty: heal every cut, resume or restart every node, wait for agreement."""
        self._blocked |= set(self.cluster.names())  # also clear cuts left by an interrupted step
        for name in list(self._down):
            await self._revive(name)
        for name in self.cluster.names():
            if not self.cluster.alive(name):
                await self._revive(name)
        await self.block({})
        await self.converge()

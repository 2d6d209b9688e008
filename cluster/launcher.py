"""Local clusters of `kvstore node` subprocesses on 127.0.0.1 (or each in its own network
namespace, network="netns", see cluster/netns.py), all state in one cluster dir.

Belongs here: starting, stopping, killing, pausing and inspecting node processes, the
`cluster.json` record, and the waits for readiness and convergence. Not here: faults other than
signals, workloads, histories and checkers (their own modules in cluster/).

Layout of a cluster dir (paths are absolute, so any process can manage a cluster another started):

    <dir>/cluster.json       format 1: settings and one record per node (name, node id, host,
                             port, data dir, pid, profile, storage, extra args, state)
    <dir>/kms/               root.key and keyring with the cluster KEK every node seals under
                             (kvstore.kms.setup; absent with encryption="none")
    <dir>/certs/             the cluster CA (ca.crt, ca.key), one node certificate per node
                             (<name>.crt/.key), `admin` (client: read, write, admin) for clients
                             and tools, and `harness` (a node certificate, for the chaos harness's
                             raw replica reads); absent with insecure=True (plaintext)
    <dir>/env                `export KVSTORE_ADDRESS=... KVSTORE_CLUSTER_DIR=...` for the kvstore CLI
    <dir>/<name>/data        the node's --data-dir (kept across restarts)
    <dir>/<name>/node.log    the node's stdout and stderr, appended on every start
    <dir>/<name>/ready       written by the node (--ready-file) once it serves

Nodes are started with subprocess.Popen running `python -m kvstore.cli.main node`, never by
forking this process (it may have used grpc). They run in their own session, so a Ctrl-C aimed
at a test run reaches the test, whose `with LocalCluster(...)` then stops every node.

Methods block. From trio, run the ones that wait for nodes (up, restart, add_node, stop, down,
wait_converged) in a thread: `await trio.to_thread.run_sync(cluster.up, 3)`. kill, pause, resume,
status and logs return within a few seconds and may be called directly (unless another call holds
the cluster lock: one operation at a time per cluster dir, across processes).
"""
from __future__ import annotations

import atexit
import collections
import contextlib
import fcntl
import json
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import grpc
import msgpack

from cluster.netns import Network
from cluster.netns import available as netns_available
from kvstore import certs
from kvstore._proto import admin_pb2, admin_pb2_grpc
from kvstore.kms.local import ROOT_KEY_ENV
from kvstore.tls import ADMIN_CERT_NAME, CLUSTER_CERTS_DIR, TlsFiles, TlsMaterial, channel

CLUSTER_FORMAT = 1
CLUSTER_FILE = "cluster.json"
HOST = "127.0.0.1"  # loopback clusters bind nothing else; netns clusters use their own 10.x subnet
REPO_ROOT = Path(__file__).resolve().parent.parent

START_TIMEOUT_S = 40.0     # a joiner waits up to 30 s for a seed (kvstore/node/node.py) before it gives up
CONVERGE_TIMEOUT_S = 30.0  # gossip marks a node up within a few rounds; 30 s means something is wrong
STOP_TIMEOUT_S = 10.0      # SIGTERM drains for shutdown_grace_s (5 s in lan/local) before closing
KILL_TIMEOUT_S = 5.0       # after SIGKILL only the kernel is left to wait for
POLL_S = 0.05              # readiness poll: short enough that waits add little to start-up time
STATUS_TIMEOUT_S = 1.0     # one Status call; a live node answers in milliseconds
LOCK_TIMEOUT_S = 120.0     # another launcher's up() of many nodes may hold the cluster lock this long

#: flags the launcher sets itself; extra_args may not repeat them
_OWN_FLAGS = ("--node-id", "--listen", "--advertise", "--data-dir", "--ready-file", "--seeds", "--profile",
              "--storage", "--encryption", "--kms-keyring", "--kms-root-key-file", "--kms-key",
              "--tls-ca", "--tls-cert", "--tls-key", "--insecure")
HARNESS_CERT_NAME = "harness"  # a node certificate for tools that read replicas directly (cluster/chaos.py)


class ClusterError(Exception):
    """A cluster operation could not be done; the message names the node and its log."""


class ClusterRunning(ClusterError):
    """up() on a cluster dir whose nodes are already running (down() first, or up(reuse=True))."""


class NodeFailed(ClusterError):
    """A node exited, or did not become ready or converge in time. See its node.log."""


@dataclass
class NodeRecord:
    """One node as recorded in cluster.json. `state` is what the launcher last did to it:
    running, paused, stopped or killed; whether the process is alive is checked, never assumed."""

    name: str
    node_id: str
    port: int
    data_dir: str
    log: str
    pid: int | None = None
    profile: str = "local"
    storage: str = "sqlite"
    extra_args: list[str] = field(default_factory=list)
    state: str = "stopped"
    host: str = HOST

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def status_of(address: str, timeout_s: float = STATUS_TIMEOUT_S,
              credentials: grpc.ChannelCredentials | None = None) -> dict[str, Any]:
    """The node's own view (node_id, address, ring_digest, members, ...) via an Admin.Status call.
    `credentials`: LocalCluster.credentials() for a cluster with TLS."""
    with channel(address, (), credentials) as ch:
        resp = admin_pb2_grpc.AdminStub(ch).Status(admin_pb2.StatusRequest(), timeout=timeout_s)
    return msgpack.unpackb(resp.payload, raw=False)


def port_is_free(port: int) -> bool:
    """True when nothing listens on 127.0.0.1:port. grpc servers bind with SO_REUSEPORT, so a
    second node on a taken port would start and silently share it: this check must come first."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers are fine
        try:
            s.bind((HOST, port))
            s.listen(1)
        except OSError:
            return False
    return True


def free_base_port(span: int = 16, rng: "random.Random | None" = None) -> int:
    """A random base port in 20000-45000 with `span` free ports above it, so concurrent runs and
    leftovers of other tests do not collide."""
    rng = rng or random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 45000 - span)
        if all(port_is_free(p) for p in range(base, base + span)):
            return base
    raise RuntimeError("no free port range in 20000-45000")


def tail(path: Path, lines: int) -> str:
    """The last `lines` lines of a file ("" when it does not exist)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 256 * 1024))
            data = f.read()
    except FileNotFoundError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:]) if lines > 0 else ""


def processes_under(root: Path | str) -> list[int]:
    """Pids of live processes with an argument inside `root` (a scan of /proc): nodes of the
    cluster there, whoever started them."""
    prefix = str(Path(root).resolve()).encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a == prefix or a.startswith(prefix + b"/") for a in args):
            pids.append(int(entry.name))
    return pids


_entered: "weakref.WeakSet[LocalCluster]" = weakref.WeakSet()


@atexit.register
def _kill_entered_clusters() -> None:
    """Last resort for clusters used as context managers whose `with` never exited (os._exit
    aside): the interpreter is going away, so their nodes would otherwise outlive it."""
    for cluster in list(_entered):
        cluster._kill_all()
        if cluster.net is not None:
            cluster.net.teardown()


class LocalCluster:
    """Node subprocesses on 127.0.0.1 ports base_port, base_port+1, ..., state under `root`
    (with network="netns", node i listens on 10.a.b.(i+2) in its own namespace instead).

    `with LocalCluster(tmp_path, base_port=27000, profile="test") as c: c.up(3)` stops every
    node on exit, also when the body raises. `LocalCluster.open(root)` manages a cluster that
    another process (scripts/cluster) started.
    """

    def __init__(
        self,
        root: Path | str,
        base_port: int = 7000,
        profile: str = "local",
        storage: str = "sqlite",
        extra_args: Sequence[str] = (),
        *,
        encryption: str = "kms",
        network: str = "loopback",
        insecure: bool = False,
        start_timeout_s: float = START_TIMEOUT_S,
        converge_timeout_s: float = CONVERGE_TIMEOUT_S,
        stop_timeout_s: float = STOP_TIMEOUT_S,
        python: str = sys.executable,
    ) -> None:
        if encryption not in ("kms", "none"):
            raise ValueError(f"encryption: {encryption!r} is not kms (seal values under the cluster KEK) or none")
        if not 1024 <= base_port <= 65535:
            raise ValueError(f"base_port: {base_port} is not in 1024..65535")
        if network not in ("loopback", "netns"):
            raise ValueError(f"network: {network!r} is not loopback (127.0.0.1) or netns (a namespace per node)")
        self.net: Network | None = None
        if network == "netns":
            ok, why = netns_available()
            if not ok:
                raise ClusterError(f"network: netns is not possible here: {why}")
            self.net = Network(base_port)
        for arg in extra_args:
            if arg.split("=", 1)[0] in _OWN_FLAGS:
                raise ValueError(f"extra_args: {arg} is set by the launcher (use its own parameter)")
        self.root = Path(root).resolve()
        self.base_port = base_port
        self.profile = profile
        self.storage = storage
        self.extra_args = list(extra_args)
        self.encryption = encryption
        self.network = network
        self.insecure = insecure  # plaintext without authentication; default: mTLS with certs in root/certs
        self._credentials: dict[str, grpc.ChannelCredentials] = {}
        self._materials: dict[str, TlsMaterial] = {}
        self.start_timeout_s = start_timeout_s
        self.converge_timeout_s = converge_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.python = python
        self.nodes: list[NodeRecord] = []
        self._children: dict[int, subprocess.Popen[bytes]] = {}  # pid -> our child, polled to reap it
        self._lock = threading.RLock()
        self._lock_depth = 0
        self._load()

    @classmethod
    def open(cls, root: Path | str, **kwargs: Any) -> "LocalCluster":
        """The cluster recorded in root/cluster.json, with its recorded settings."""
        path = Path(root).resolve() / CLUSTER_FILE
        if not path.exists():
            raise ClusterError(f"no cluster in {path.parent} (no {CLUSTER_FILE}): start one with up first")
        doc = cls._read(path)
        settings = {k: doc[k] for k in ("base_port", "profile", "storage", "extra_args", "encryption", "network",
                                        "insecure")
                    if k in doc}
        return cls(root, **{**settings, **kwargs})

    # ---- cluster.json --------------------------------------------------------------------

    @property
    def _path(self) -> Path:
        return self.root / CLUSTER_FILE

    @staticmethod
    def _read(path: Path) -> dict[str, Any]:
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ClusterError(f"{path}: unreadable ({exc}); remove the cluster dir to start afresh") from None
        if doc.get("format") != CLUSTER_FORMAT:
            raise ClusterError(f"{path}: format {doc.get('format')!r}, this launcher reads format {CLUSTER_FORMAT}")
        return doc

    def _load(self) -> None:
        if self._path.exists():
            self.nodes = [NodeRecord(**n) for n in self._read(self._path)["nodes"]]

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the cluster lock (threads of this object, and any other launcher or
        scripts/cluster on the same dir) and work on the records as they are on disk."""
        with self._lock:
            if self._lock_depth:  # already ours, further up this thread's stack
                yield
                return
            self.root.mkdir(parents=True, exist_ok=True)
            with open(self.root / ".lock", "a") as lock:
                deadline = time.monotonic() + LOCK_TIMEOUT_S
                while True:
                    try:
                        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() >= deadline:
                            raise ClusterError(f"another launcher has held {self.root / '.lock'} for "
                                               f"{LOCK_TIMEOUT_S:.0f} s: is a scripts/cluster command hanging?") from None
                        time.sleep(POLL_S)
                self._lock_depth += 1
                try:
                    self._load()
                    yield
                finally:
                    self._lock_depth -= 1
                    fcntl.flock(lock, fcntl.LOCK_UN)

    def _save(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        doc = {"format": CLUSTER_FORMAT, "base_port": self.base_port, "profile": self.profile,
               "storage": self.storage, "extra_args": self.extra_args, "encryption": self.encryption,
               "network": self.network, "insecure": self.insecure, "nodes": [asdict(n) for n in self.nodes]}
        tmp = self._path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
        os.replace(tmp, self._path)

    # ---- processes -----------------------------------------------------------------------

    def _reap(self) -> None:
        for pid, proc in list(self._children.items()):
            if proc.poll() is not None:
                del self._children[pid]

    def _proc_state(self, rec: NodeRecord) -> str | None:
        """"running" or "paused" when rec.pid is still this node's process, else None.

        Our own child is alive until we reap it: its pid cannot be reused before that, its
        command line is still ours until it has exec'd, and after SIGKILL its main thread shows
        as a zombie while the other threads still exit. Any other pid may have been reused by
        the kernel: it is our node only if its command line has our data dir, and a zombie
        (someone else's to reap) is dead."""
        self._reap()
        if rec.pid is None:
            return None
        child = rec.pid in self._children
        try:
            args = [] if child else Path(f"/proc/{rec.pid}/cmdline").read_bytes().split(b"\0")
            stat = Path(f"/proc/{rec.pid}/stat").read_text()
        except OSError:
            return None
        if not child and rec.data_dir.encode() not in args:
            return None
        state = stat.rpartition(")")[2].split()[0]
        if state in ("T", "t"):
            return "paused"
        return "running" if child or state not in ("Z", "X", "x") else None

    def _alive(self, rec: NodeRecord) -> bool:
        return self._proc_state(rec) is not None

    def _signal(self, rec: NodeRecord, sig: int) -> bool:
        """Send sig if rec is still our node; False when it was already gone."""
        if not self._alive(rec):
            return False
        assert rec.pid is not None
        try:
            os.kill(rec.pid, sig)
        except ProcessLookupError:
            return False
        return True

    def _wait_gone(self, recs: list[NodeRecord], timeout_s: float) -> list[NodeRecord]:
        """Wait until every node in recs has exited; returns the ones still alive at the timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = [r for r in recs if self._alive(r)]
            if not left or time.monotonic() >= deadline:
                return left
            time.sleep(POLL_S)

    def _terminate(self, recs: list[NodeRecord]) -> None:
        """SIGTERM (and SIGCONT, in case they are paused), then SIGKILL whoever outlives stop_timeout_s."""
        sent = [r for r in recs if self._signal(r, signal.SIGTERM)]
        for r in sent:
            self._signal(r, signal.SIGCONT)
        stubborn = self._wait_gone(sent, self.stop_timeout_s)
        for r in stubborn:
            self._signal(r, signal.SIGKILL)
        still = self._wait_gone(stubborn, KILL_TIMEOUT_S)
        for r in sent:
            if r not in still:
                r.state, r.pid = ("killed" if r in stubborn else "stopped"), None
        self._save()
        if still:
            raise ClusterError("still alive after SIGKILL: " + ", ".join(f"{r.name} (pid {r.pid})" for r in still))

    def _kill_all(self) -> None:
        """SIGKILL every node still alive and wait for them: the backstop that runs whatever
        happened before it (an exception, Ctrl-C, interpreter exit)."""
        killed = [r for r in self.nodes if self._signal(r, signal.SIGKILL)]
        self._wait_gone(killed, KILL_TIMEOUT_S)
        for r in killed:
            if not self._alive(r):
                r.state, r.pid = "killed", None
        if killed:
            self._save()

    def _encryption_args(self) -> list[str]:
        """Flags for sealing at rest: every node of the cluster gets the same keys, provisioned
        once under root/kms (root key file and keyring with the cluster KEK)."""
        if self.encryption == "none":
            return ["--encryption", "none"]
        from kvstore.kms.setup import provision

        return ["--encryption", "kms", *provision(self.root / "kms").node_args()]

    # ---- TLS -------------------------------------------------------------------------------

    @property
    def certs_dir(self) -> Path:
        return self.root / CLUSTER_CERTS_DIR

    def _security_args(self, rec: NodeRecord) -> list[str]:
        """--insecure, or the node's TLS flags: the cluster CA, the admin and harness
        certificates and this node's certificate are made on first need and kept."""
        if self.insecure:
            return ["--insecure"]
        d = self.certs_dir
        if not (d / f"{certs.CA_NAME}.crt").exists():
            certs.init_ca(d, common_name=f"kvstore local cluster CA ({self.root.name})", force=True)
        for name, kind, roles in [(ADMIN_CERT_NAME, "client", certs.ROLES), (HARNESS_CERT_NAME, "node", ()),
                                  (rec.name, "node", ())]:
            try:  # kept while the CA still vouches for it
                certs.check_issued(d / f"{name}.crt", d / f"{certs.CA_NAME}.crt", name)
            except certs.CertError:
                hosts = list(dict.fromkeys([rec.host if name == rec.name else HOST, HOST, "localhost"]))
                certs.issue(d, name, kind, roles=roles, hosts=hosts if kind == "node" else (), force=True)
        files = TlsFiles.from_dir(d, rec.name)
        return ["--tls-ca", files.ca_file, "--tls-cert", files.cert_file, "--tls-key", files.key_file]

    def tls(self, name: str = ADMIN_CERT_NAME) -> TlsMaterial | None:
        """Certificate NAME of this cluster (admin: a client with every role; harness: a node
        certificate) for Client(tls=...); None when the cluster is insecure."""
        if self.insecure:
            return None
        if name not in self._materials:
            if not (self.certs_dir / f"{name}.crt").exists():
                raise ClusterError(f"no certificate {name!r} in {self.certs_dir}: up the cluster first")
            self._materials[name] = TlsFiles.from_dir(self.certs_dir, name).load()
        return self._materials[name]

    def credentials(self, name: str = ADMIN_CERT_NAME) -> grpc.ChannelCredentials | None:
        """Channel credentials of certificate NAME (see tls()) for status_of and other raw calls."""
        material = self.tls(name)
        if material is None:
            return None
        if name not in self._credentials:
            self._credentials[name] = material.channel_credentials()
        return self._credentials[name]

    def write_env_file(self) -> Path:
        """root/env: `. <root>/env` points the kvstore CLI at this cluster (addresses, certificates)."""
        lines = [f"export KVSTORE_ADDRESS={','.join(self.addresses())}"]
        lines.append("unset KVSTORE_CLUSTER_DIR" if self.insecure else f"export KVSTORE_CLUSTER_DIR={shlex.quote(str(self.root))}")
        path = self.root / "env"
        path.write_text("\n".join(lines) + "\n")
        return path

    def _spawn(self, rec: NodeRecord, seeds: Sequence[str]) -> None:
        prefix: list[str] = []
        if self.net is not None:
            self.net.ensure_node(rec.name, rec.host)
            prefix = self.net.exec_prefix(rec.name)
        elif not port_is_free(rec.port):
            raise ClusterError(f"{rec.name}: port {rec.port} on {HOST} is taken by another process: "
                               f"choose another base port, or stop whatever listens there")
        node_dir = self.root / rec.name
        node_dir.mkdir(parents=True, exist_ok=True)
        ready = node_dir / "ready"
        ready.unlink(missing_ok=True)
        cmd = [*prefix, self.python, "-m", "kvstore.cli.main", "node", "--node-id", rec.node_id,
               "--listen", rec.address, "--data-dir", rec.data_dir, "--profile", rec.profile,
               "--storage", rec.storage, "--ready-file", str(ready), *self._encryption_args(),
               *self._security_args(rec)]
        if seeds:
            cmd += ["--seeds", ",".join(seeds)]
        cmd += rec.extra_args
        # the root key comes from its file; a node given the key in its environment too refuses to start
        env = {k: v for k, v in os.environ.items() if k != ROOT_KEY_ENV}
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
        with open(rec.log, "ab") as log:
            log.write(f"--- launcher {time.strftime('%Y-%m-%d %H:%M:%S')}: {shlex.join(cmd)}\n".encode())
            log.flush()
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    cwd=self.root, env=env, start_new_session=True)
        self._children[proc.pid] = proc
        rec.pid, rec.state = proc.pid, "running"
        self._save()

    def _wait_ready(self, rec: NodeRecord) -> dict[str, Any]:
        """Until the node has written its ready file and answers Status as itself."""
        ready = self.root / rec.name / "ready"
        pid, last_error = rec.pid, "no call made yet"
        proc = self._children.get(pid) if pid else None
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None or not self._alive(rec):
                code = proc.returncode if proc is not None else None
                rec.state, rec.pid = "stopped", None
                self._save()
                raise NodeFailed(f"{rec.name} (pid {pid}) exited{f' with code {code}' if code is not None else ''} "
                                 f"before serving on {rec.address}; last lines of {rec.log}:\n"
                                 + tail(Path(rec.log), 20))
            if ready.exists() and ready.read_text().strip() == rec.address:
                try:
                    view = status_of(rec.address, credentials=self.credentials())
                except grpc.RpcError as exc:
                    last_error = f"{exc.code().name}: {exc.details()}"
                else:
                    if view.get("node_id") == rec.node_id:
                        return view
                    last_error = f"answered as {view.get('node_id')!r}, not {rec.node_id!r}"
            time.sleep(POLL_S)
        wrote = "wrote its ready file" if ready.exists() else "never wrote its ready file"
        raise NodeFailed(f"{rec.name} (pid {pid}, {rec.address}) not ready after {self.start_timeout_s:.0f} s: "
                         f"it {wrote}; last Status call: {last_error}; last lines of {rec.log}:\n"
                         + tail(Path(rec.log), 20))

    def _start(self, rec: NodeRecord, seeds: Sequence[str]) -> None:
        self._spawn(rec, seeds)
        self._wait_ready(rec)

    # ---- lookups ---------------------------------------------------------------------------

    def node(self, name: str) -> NodeRecord:
        for rec in self.nodes:
            if rec.name == name:
                return rec
        known = ", ".join(r.name for r in self.nodes) or "none"
        raise ClusterError(f"no node named {name!r} in the cluster at {self.root} (nodes: {known})")

    def names(self) -> list[str]:
        return [r.name for r in self.nodes]

    def addresses(self, live_only: bool = False) -> list[str]:
        return [r.address for r in self.nodes if not live_only or self._proc_state(r) == "running"]

    def alive(self, name: str) -> bool:
        return self._alive(self.node(name))

    def pid(self, name: str) -> int | None:
        """The node's pid while its process is alive, else None."""
        rec = self.node(name)
        return rec.pid if self._alive(rec) else None

    def log_path(self, name: str) -> Path:
        return Path(self.node(name).log)

    def logs(self, name: str, lines: int = 50) -> str:
        return tail(self.log_path(name), lines)

    def _running(self, exclude: str = "") -> list[NodeRecord]:
        return [r for r in self.nodes if r.name != exclude and self._proc_state(r) == "running"]

    # ---- whole cluster -----------------------------------------------------------------------

    def up(self, n: int, *, reuse: bool = False, wait: bool = True) -> list[str]:
        """Start nodes n1..nN one at a time (each joins through the ones already up and takes
        tokens balanced against the ring it learned), then wait until they agree. Recorded
        nodes that are dead are restarted with their data; returns the addresses."""
        if n < 1:
            raise ValueError(f"n: {n} nodes asked for, need at least 1")
        with self._locked():
            live = [r for r in self.nodes if self._alive(r)]
            if live and not reuse:
                raise ClusterRunning(
                    f"cluster at {self.root} is already running ("
                    + ", ".join(f"{r.name} pid {r.pid}" for r in live)
                    + "): down it first, or reuse it (up(reuse=True), scripts/cluster up --reuse)")
            if len(self.nodes) > n:
                raise ClusterError(f"cluster at {self.root} has {len(self.nodes)} nodes recorded, more than "
                                   f"the {n} asked for: up {len(self.nodes)}, or down it and remove the dir")
            paused = {r.name for r in live if self._proc_state(r) == "paused"}
            for rec in self.nodes:
                if not self._alive(rec):
                    self._start(rec, [r.address for r in self._running()])
            while len(self.nodes) < n:
                self._add()
            if wait:
                self.wait_converged(names=[r.name for r in self.nodes if r.name not in paused])
            return self.addresses()

    def down(self) -> None:
        """SIGTERM every node and wait; SIGKILL those still alive after stop_timeout_s."""
        with self._locked():
            try:
                self._terminate(list(self.nodes))
            finally:
                self._kill_all()  # whatever happened above (even Ctrl-C), nothing outlives down()
                self._reap()
                if self.net is not None:
                    self.net.teardown()

    def status(self) -> list[dict[str, Any]]:
        """Per node: name, node_id, pid, alive, paused, state, address, log and, when it answers,
        its own view of the cluster (`view`) or the error of the Status call (`error`)."""
        if self._lock.acquire(blocking=False):  # else a thread of ours is changing the records
            try:
                if not self._lock_depth:
                    self._load()  # what other launchers did since
            finally:
                self._lock.release()
        out = []
        for rec in list(self.nodes):
            state = self._proc_state(rec)
            row: dict[str, Any] = {"name": rec.name, "node_id": rec.node_id, "pid": rec.pid if state else None,
                                   "alive": state is not None, "paused": state == "paused",
                                   "state": state or ("killed" if rec.state == "killed" else "stopped"),
                                   "address": rec.address, "log": rec.log}
            if state == "running":
                try:
                    row["view"] = status_of(rec.address, credentials=self.credentials())
                except grpc.RpcError as exc:
                    row["error"] = f"{exc.code().name}: {exc.details()}"
            out.append(row)
        return out

    def _convergence_problems(self, live: list[NodeRecord]) -> tuple[list[str], dict[str, dict[str, Any]]]:
        problems, views = [], {}
        want = {r.node_id for r in live}
        for rec in live:
            try:
                views[rec.name] = view = status_of(rec.address, credentials=self.credentials())
            except grpc.RpcError as exc:
                problems.append(f"{rec.name} ({rec.address}) does not answer Status ({exc.code().name}); see {rec.log}")
                continue
            up = {m["node_id"] for m in view["members"] if m["up"] and m["status"] == "normal"}
            if want - up:
                seen = ", ".join(f"{m['node_id']}={'up' if m['up'] else 'down'}/{m['status']}" for m in view["members"])
                problems.append(f"{rec.name} does not see {', '.join(sorted(want - up))} up and normal "
                                f"(it sees {seen}); see {rec.log}")
        digests = collections.Counter(v["ring_digest"] for v in views.values())
        if len(digests) > 1:
            common = digests.most_common(1)[0][0]
            for name, view in views.items():
                if view["ring_digest"] != common:
                    problems.append(f"{name} has ring digest {view['ring_digest'][:12]}, the others "
                                    f"{common[:12]}; see {self.node(name).log}")
        return problems, views

    def wait_converged(self, timeout_s: float | None = None,
                       names: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
        """Until each of `names` (default: every running node) sees all of them up with status
        normal, and all report the same ring digest; returns each one's view. Fails at once
        when one of them is not running (exited or paused)."""
        timeout_s = self.converge_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        while True:
            members = self._running() if names is None else [self.node(n) for n in names]
            for rec in members:
                state = self._proc_state(rec)
                if state != "running":
                    raise NodeFailed(f"{rec.name} is {state or 'not running any more'} while waiting for the "
                                     f"cluster to agree; last lines of {rec.log}:\n" + tail(Path(rec.log), 20))
            problems, views = self._convergence_problems(members)
            if not problems:
                return views
            if time.monotonic() >= deadline:
                raise NodeFailed(f"cluster at {self.root} did not converge within {timeout_s:.0f} s: "
                                 + "; ".join(problems))
            time.sleep(POLL_S * 2)

    # ---- one node ------------------------------------------------------------------------------

    def _add(self) -> NodeRecord:
        index = 1 + max((int(r.name[1:]) for r in self.nodes if r.name[1:].isdigit()), default=0)
        port = max((r.port + 1 for r in self.nodes), default=self.base_port)
        if port > 65535:
            raise ClusterError(f"no port left above {self.base_port} for node n{index}")
        name = f"n{index}"
        host = self.net.host_of(index - 1) if self.net is not None else HOST
        rec = NodeRecord(name=name, node_id=name, host=host, port=port, data_dir=str(self.root / name / "data"),
                         log=str(self.root / name / "node.log"), profile=self.profile, storage=self.storage,
                         extra_args=list(self.extra_args))
        seeds = [r.address for r in self._running()]
        if self.nodes and not seeds:
            raise ClusterError(f"cluster at {self.root} has no running node for {name} to join through: up it first")
        self.nodes.append(rec)
        self._save()
        self._start(rec, seeds)
        return rec

    def add_node(self, *, wait: bool = True) -> str:
        """Start one more node that joins through the running ones; returns its name."""
        with self._locked():
            expect = [r.name for r in self._running()]
            rec = self._add()
            if wait:
                self.wait_converged(names=[*expect, rec.name])
            return rec.name

    def kill(self, name: str) -> None:
        """SIGKILL: no drain, no goodbye. Returns once the process is gone."""
        with self._locked():
            rec = self.node(name)
            self._signal(rec, signal.SIGKILL)
            if self._wait_gone([rec], KILL_TIMEOUT_S):
                raise ClusterError(f"{name} (pid {rec.pid}) is still alive {KILL_TIMEOUT_S:.0f} s after SIGKILL")
            rec.state, rec.pid = "killed", None
            self._save()

    def stop(self, name: str) -> None:
        """SIGTERM and wait for the node to drain and exit (SIGKILL after stop_timeout_s)."""
        with self._locked():
            self._terminate([self.node(name)])

    def pause(self, name: str) -> None:
        """SIGSTOP: the process stays, but answers nothing until resume()."""
        with self._locked():
            rec = self.node(name)
            if not self._signal(rec, signal.SIGSTOP):
                raise ClusterError(f"{name} is not running, so it cannot be paused")
            deadline = time.monotonic() + KILL_TIMEOUT_S
            while self._proc_state(rec) == "running" and time.monotonic() < deadline:
                time.sleep(0.01)
            rec.state = "paused"
            self._save()

    def resume(self, name: str) -> None:
        """SIGCONT a paused node."""
        with self._locked():
            rec = self.node(name)
            if not self._signal(rec, signal.SIGCONT):
                raise ClusterError(f"{name} is not running, so it cannot be resumed")
            rec.state = "running"
            self._save()

    def restart(self, name: str, *, wait: bool = True) -> None:
        """Stop the node if it runs, start it again on its data dir (same node id and tokens),
        joining through the other running nodes; wait until the cluster agrees again."""
        with self._locked():
            rec = self.node(name)
            if self._alive(rec):
                self._terminate([rec])
            others = self._running(exclude=name)
            self._start(rec, [r.address for r in others])
            if wait:
                self.wait_converged(names=[*(r.name for r in others), name])

    # ---- context manager ---------------------------------------------------------------------

    def __enter__(self) -> "LocalCluster":
        _entered.add(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self.down()
        finally:
            _entered.discard(self)

    def __repr__(self) -> str:
        return f"LocalCluster({str(self.root)!r}, {len(self.nodes)} nodes)"

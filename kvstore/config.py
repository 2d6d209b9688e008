"""Node configuration: one frozen dataclass, profiles as deltas from one base, TOML loading.

Every field carries its unit in its name and a comment on why its default is what it is;
`validate()` rejects bad values and bad combinations with a message naming the field.
"""
from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvstore.core.limits import Limits


@dataclass(frozen=True)
class NodeConfig:
    data_dir: Path = Path("data")
    listen: str = "127.0.0.1:7000"       # host:port the gRPC server binds (port 0 = any free port)
    advertise: str = ""                  # host:port peers and clients should dial; "" = listen
    node_id: str = ""                    # "" = read from or create in the data dir (stable forever)
    zone: str = ""                       # failure domain; replicas spread over distinct zones first
    seeds: tuple[str, ...] = ()          # host:port of nodes to learn the cluster from
    storage: str = "sqlite"              # "sqlite" (durable) or "memory" (tests, scratch)
    fsync: str = "always"                # always | batch | never: see kvstore/storage/base.py
    fsync_interval_s: float = 0.05       # with fsync=batch: the power-failure loss window
    storage_cache_bytes: int = 32 << 20  # sqlite: the writer's copy of recent records (0 = off); RSS per node
    replication_factor: int = 3          # N: Dynamo/Riak/Cassandra default, survives one loss at QUORUM
    tokens_per_node: int = 64            # vnodes; balanced allocation keeps 64 within a few % of even
    request_timeout_s: float = 5.0       # default deadline of a client request without one
    replica_timeout_s: float = 2.0       # a replica batch not answered by then counts as no ack
    join_settle_s: float = 2.0           # a joiner waits this long after its first pass before the
                                         # catch-up pass: writes routed just before the cluster saw
                                         # it land on the sources within a replica timeout
    gossip_interval_s: float = 1.0       # Cassandra/memberlist LAN default
    phi_threshold: float = 8.0           # Cassandra's default: ~1e-8 chance a live node is accused
    hint_max_per_target: int = 100_000   # a cap, so an outage cannot fill the disk (Scylla #8863)
    hint_replay_interval_s: float = 1.0  # how often to check for owners that are back
    hint_replay_batch: int = 256         # hints per replay batch: bounded replay rate
    read_repair: bool = True             # repair stale replicas seen by reads, in the background
    read_repair_chance: float = 0.1      # share of reads that ask all N replicas, not just R
    tombstone_grace_s: float = 10 * 86400.0  # Cassandra gc_grace_seconds default
    tombstone_purge_interval_s: float = 3600.0  # how often to look for purgeable tombstones
    shutdown_grace_s: float = 5.0        # SIGTERM: how long in-flight requests may finish
    encryption: str = "kms"              # "kms": seal every value at rest; "none": plaintext (benchmarks)
    kms_keyring: str = ""                # keyring file, outside the data dir (`kvstore kms init`)
    kms_root_key_file: str = ""          # 0600 root key file; "" = $KVSTORE_ROOT_KEY
    kms_key: str = "alias/kvstore"       # the cluster's KEK (id or alias), shared by every node
    kms_check_interval_s: float = 60.0   # how soon key state changes (disable, rotate) take effect
    anti_entropy_interval_s: float = 3600.0  # Merkle repair with every other replica, hourly
    stream_rate_bytes_per_s: float = 50e6  # join/decommission/removenode streams: leave room for requests
    rewrap_rate_per_s: float = 5000.0    # re-wrap job: records per second, so it never starves requests
    metrics_listen: str = "auto"         # Prometheus /metrics over HTTP: "auto" = 127.0.0.1 at the gRPC
                                         # listen port + 1000 (loopback: counts and addresses are not for
                                         # the world), "off", or an explicit host:port
    log_format: str = "text"             # "text", or "json": one object per line for log shippers
    drain_notice_s: float = 1.0          # on stop: health answers NOT_SERVING this long before the port
                                         # closes, so checkers polling every second take the node out first
    tls_ca_file: str = ""                # the cluster CA (PEM): peers and clients need certificates it signed
    tls_cert_file: str = ""              # this node's certificate (`kvstore certs issue --kind node`)
    tls_key_file: str = ""               # its private key, mode 0600
    auth_tokens_file: str = ""           # bearer tokens -> identity and roles (TOML, 0600); needs TLS
    insecure: bool = False               # serve plaintext with no authentication when no tls_* file is
                                         # set; must be said explicitly (the test profile does)
    # overload (kvstore/node/limits.py): beyond these budgets a request is refused at once with
    # RESOURCE_EXHAUSTED instead of queueing, so latency stays bounded and callers back off
    max_concurrent_requests: int = 1024  # client RPCs in flight per node: ~5 ms each at 4k ops/s is ~20
                                         # busy; 1024 leaves room for slow quorums, not for a backlog
    max_concurrent_requests_per_connection: int = 256  # one client connection cannot take the node
    max_inflight_request_bytes: int = 256 << 20  # request bytes being served: bounds memory (4 max batches)
    max_concurrent_internal_calls: int = 256  # Internal.Call from peers (gossip, repair, streaming)
    max_replica_batches_in_flight: int = 256  # replica batches handled at once; more wait (backpressure)
    max_stream_batches_in_flight: int = 8  # per replica stream; a peer sends at most 2 (peers.MAX_IN_FLIGHT)
    max_session_batches_in_flight: int = 16  # per client session stream; more are not read (backpressure)
    coordinate_on_loop: bool = True      # the common session batch skips trio (kvstore/node/express.py)
    admin_command_timeout_s: float = 3600.0  # default deadline of an admin command sent without one
    test_hooks: bool = False             # enables fault-injection admin calls; never in production
    test_drop_writes: bool = False       # a deliberately broken node: acks writes it never stores
                                         # (proves the chaos checker catches lost writes)
    limits: Limits = field(default_factory=Limits)

    @property
    def tls_enabled(self) -> bool:
        """TLS settings win: with them a node serves mTLS even when insecure is also set."""
        return bool(self.tls_ca_file or self.tls_cert_file or self.tls_key_file)

    @property
    def advertise_address(self) -> str:
        return self.advertise or self.listen

    def replace(self, **changes: Any) -> "NodeConfig":
        return dataclasses.replace(self, **changes)

    def validate(self) -> "NodeConfig":
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        need(self.storage in ("sqlite", "memory"), f"storage: {self.storage!r} is not sqlite or memory")
        need(self.fsync in ("always", "batch", "never"), f"fsync: {self.fsync!r} is not always, batch or never")
        need(self.fsync_interval_s > 0, "fsync_interval_s: must be > 0")
        need(isinstance(self.storage_cache_bytes, int) and self.storage_cache_bytes >= 0,
             f"storage_cache_bytes: {self.storage_cache_bytes!r} must be an integer >= 0")
        need(1 <= self.replication_factor <= 16, "replication_factor: must be in 1..16")
        need(1 <= self.tokens_per_node <= 1024, "tokens_per_node: must be in 1..1024")
        need(self.request_timeout_s > 0, "request_timeout_s: must be > 0")
        need(0 < self.replica_timeout_s <= self.request_timeout_s,
             "replica_timeout_s: must be > 0 and <= request_timeout_s")
        need(self.join_settle_s >= 0, "join_settle_s: must be >= 0")
        need(self.gossip_interval_s > 0, "gossip_interval_s: must be > 0")
        need(self.phi_threshold > 0, "phi_threshold: must be > 0")
        need(self.hint_max_per_target >= 0, "hint_max_per_target: must be >= 0")
        need(self.tombstone_grace_s >= 0, "tombstone_grace_s: must be >= 0")
        need(self.encryption in ("kms", "none"), f"encryption: {self.encryption!r} is not kms or none")
        need(0.0 <= self.read_repair_chance <= 1.0, "read_repair_chance: must be in 0..1")
        need(self.kms_check_interval_s > 0, "kms_check_interval_s: must be > 0")
        need(self.rewrap_rate_per_s > 0, "rewrap_rate_per_s: must be > 0")
        need(self.anti_entropy_interval_s > 0, "anti_entropy_interval_s: must be > 0")
        need(self.stream_rate_bytes_per_s > 0, "stream_rate_bytes_per_s: must be > 0")
        for name in ("max_concurrent_requests", "max_concurrent_requests_per_connection",
                     "max_inflight_request_bytes", "max_concurrent_internal_calls",
                     "max_replica_batches_in_flight", "max_stream_batches_in_flight",
                     "max_session_batches_in_flight"):
            value = getattr(self, name)
            need(isinstance(value, int) and value >= 1, f"{name}: {value!r} must be an integer >= 1")
        need(self.max_concurrent_requests_per_connection <= self.max_concurrent_requests,
             "max_concurrent_requests_per_connection: must be <= max_concurrent_requests")
        need(self.admin_command_timeout_s > 0, "admin_command_timeout_s: must be > 0")
        need(self.tombstone_purge_interval_s > 0, "tombstone_purge_interval_s: must be > 0")
        need(self.log_format in ("text", "json"), f"log_format: {self.log_format!r} is not text or json")
        need(self.drain_notice_s >= 0, "drain_notice_s: must be >= 0")
        metrics_addrs = [] if self.metrics_listen in ("auto", "off") else [("metrics_listen", self.metrics_listen)]
        for name, addr in [("listen", self.listen)] + [("seeds", s) for s in self.seeds] + metrics_addrs:
            host, sep, port = addr.rpartition(":")
            need(bool(sep and host and port.isdigit()), f"{name}: {addr!r} is not host:port")
        listen_port = int(self.listen.rpartition(":")[2])
        need(self.metrics_listen != "auto" or listen_port + 1000 <= 65535,
             f"metrics_listen: auto would use port {listen_port + 1000} (listen port + 1000), above 65535: "
             "give a host:port or off")
        tls = {"tls_ca_file": self.tls_ca_file, "tls_cert_file": self.tls_cert_file, "tls_key_file": self.tls_key_file}
        missing = [name for name, path in tls.items() if not path]
        need(not self.tls_enabled or not missing,
             f"{(missing or [''])[0]}: required with TLS (set all of {', '.join(tls)})")
        need(self.tls_enabled or self.insecure,
             "tls_cert_file: no TLS settings: set tls_ca_file, tls_cert_file and tls_key_file (see `kvstore "
             "certs`), or insecure = true to serve plaintext without authentication")
        need(not self.auth_tokens_file or self.tls_enabled,
             "auth_tokens_file: bearer tokens need TLS (tls_* settings): in plaintext anyone on the path reads them")
        self.limits.validate()
        return self


BASE = NodeConfig()

#: Profiles are deltas from BASE, each with the reason for the change.
PROFILES: dict[str, dict[str, Any]] = {
    "lan": {},
    # a laptop cluster: react to kills within seconds, replay hints quickly
    "local": {"gossip_interval_s": 0.2, "hint_replay_interval_s": 0.2, "fsync": "batch", "kms_check_interval_s": 2.0,
              "drain_notice_s": 0.2},
    # tests: fast everything, and nothing waits long for a dead peer
    "test": {
        "gossip_interval_s": 0.1,
        "hint_replay_interval_s": 0.1,
        # in-process test clusters share one interpreter (one GIL) on a busy 2-core machine
        "replica_timeout_s": 3.0,
        "request_timeout_s": 6.0,
        # in-process clusters join many nodes per test; their in-flight writes are short
        "join_settle_s": 0.3,
        "fsync": "never",
        "shutdown_grace_s": 2.0,
        "kms_check_interval_s": 0.2,
        # many nodes per process and per machine: a test that wants metrics asks for them
        "metrics_listen": "off",
        "drain_notice_s": 0.0,
        # in-process test nodes talk plaintext unless a test gives them tls_* files
        "insecure": True,
    },
}


def profile(name: str, **overrides: Any) -> NodeConfig:
    if name not in PROFILES:
        raise ValueError(f"profile: {name!r} is not one of {', '.join(PROFILES)}")
    return BASE.replace(**{**PROFILES[name], **overrides})


def _coerce(name: str, value: Any) -> Any:
    kinds = {f.name: f.type for f in dataclasses.fields(NodeConfig)}
    if name not in kinds:
        raise ValueError(f"{name}: unknown setting")
    if name == "data_dir":
        return Path(value)
    if name == "seeds":
        return tuple(value.split(",")) if isinstance(value, str) else tuple(value)
    if name == "limits":
        return Limits(**value)
    return value


def load(path: Path | None = None, profile_name: str | None = None, **overrides: Any) -> NodeConfig:
    """Profile, then the TOML file's settings, then explicit overrides (command-line flags).
    An explicit profile_name wins over the file's `profile`; the default is "lan"."""
    settings: dict[str, Any] = {}
    file_profile = None
    if path is not None:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
        file_profile = doc.pop("profile", None)
        settings.update({k: _coerce(k, v) for k, v in doc.items()})
    settings.update({k: _coerce(k, v) for k, v in overrides.items() if v is not None})
    return profile(profile_name or file_profile or "lan", **settings).validate()

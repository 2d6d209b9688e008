"""The trio client: `kvstore.Client`.

Key operations are coalesced into batches (kvstore/client/coalesce.py) that travel on one
KV.Session stream per node (`_Session`: a request queue feeding grpcio, a reader thread handing
replies to trio), or as unary Batch* calls to a node without sessions. Other calls go through
grpcio's future API: each registers a done-callback that wakes the waiting trio task with
`run_sync_soon`, so no thread is spent per call and trio cancellation cancels the RPC. Requests
are routed to a live replica of the key (token-aware); idempotent calls (reads) are
retried on UNAVAILABLE with exponential backoff and jitter, and every call, writes included, is
retried the same way when a node refused it as overloaded (refused at admission: nothing was done).
"""
from __future__ import annotations

import queue
import random
import threading
import weakref
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Iterable, Mapping, Sequence

import grpc
import msgpack
import trio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvstore._proto import admin_pb2, admin_pb2_grpc, kv_pb2, kv_pb2_grpc
from kvstore.client.coalesce import MAX_BATCH_ITEMS, Coalescer
from kvstore.client.routing import Topology
from kvstore.core.quorum import Level
from kvstore.errors import DeadlineExceeded, KvError, NotFound, Overloaded, Unavailable
from kvstore.node.status import error_from
from kvstore.tls import TlsFiles, TlsMaterial, channel, client_credentials

DEFAULT_MAX_MESSAGE = 64 << 20  # batches of up to 512 items; the server enforces per-value limits

_BATCH_OF = {
    "Put": ("BatchPut", kv_pb2.BatchPutRequest),
    "Get": ("BatchGet", kv_pb2.BatchGetRequest),
    "Delete": ("BatchDelete", kv_pb2.BatchDeleteRequest),
}
_SESSION_KIND = {"BatchPut": "put", "BatchGet": "get", "BatchDelete": "delete"}
_BATCH_REQUEST = {name: cls for name, cls in _BATCH_OF.values()}
#: how long past a batch's own timeout a session waits for its answer (the node answers by the
#: timeout itself, naming the acknowledgements it got; this only covers a reply that never comes)
SESSION_SLACK_S = 0.5
#: keys whose coordinator a client remembers until the next ring refresh: a lookup instead of a
#: hash and a ring search per call
ROUTE_CACHE_KEYS = 65536
LIST_PAGE = 1000  # a node's default key listing page (its max_batch_items)


@dataclass(frozen=True)
class KeyPage:
    """One page of a key listing: pass `cursor` as `start_after` for the next (b"": no more)."""

    keys: list[bytes]
    cursor: bytes
    missing_ranges: int   # token ranges with no replica up: their keys are not in this page
    total_ranges: int


@dataclass(frozen=True)
class Version:
    """One sibling of a key as returned by a read."""

    value: bytes
    hlc: int
    node_id: str
    expires_at_ms: int = 0


def latest(siblings: Sequence[Version]) -> Version:
    """Default resolver: the sibling with the highest hybrid logical clock wins."""
    return max(siblings, key=lambda v: (v.hlc, v.node_id))


@dataclass(frozen=True)
class Versions:
    """The result of a read: every concurrent sibling and one context that supersedes them all."""

    found: bool
    siblings: tuple[Version, ...]
    context: bytes

    def resolve(self, resolver: Callable[[Sequence[Version]], Version] = latest) -> bytes | None:
        return resolver(self.siblings).value if self.siblings else None

    @property
    def value(self) -> bytes | None:
        """The value after the default resolver (latest HLC wins); None when not found."""
        return self.resolve()


def _level(level: str | int | Level | None) -> kv_pb2.Level:
    """The request field for a level. Shared per spelling (a message is copied into the request
    that takes it, so the shared one is never changed)."""
    found = _LEVELS.get(level) if isinstance(level, (str, int, type(None))) else None
    if found is None:
        lv = Level.parse(level)
        found = kv_pb2.Level(named=int(lv.named), count=lv.count)
        if isinstance(level, (str, int, type(None))) and len(_LEVELS) < 256:
            _LEVELS[level] = found
    return found


_LEVELS: dict[str | int | None, kv_pb2.Level] = {}


def _versions(resp: kv_pb2.GetResponse) -> Versions:
    return Versions(
        resp.found,
        tuple(Version(s.value, s.hlc, s.node_id, s.expires_at_ms) for s in resp.siblings),
        resp.context,
    )


def _never_sent(exc: KvError) -> bool:
    """True when the request provably never reached a node (no connection, or a session the node
    ended before reading it), so even a write can be retried elsewhere without risking a duplicate."""
    if isinstance(exc, _NotSent):
        return True
    text = str(exc)
    return "failed to connect" in text or "Connection refused" in text


class _Conn:
    """One node's channel and stubs, and a health watch held open on it.

    grpcio's blocking channel polls for completions in a thread that lives only while some call
    on the channel is in flight; with coalescing, one batch at a time is, so every batch started
    a thread: 250-270 threads in 3 s of `kvstore bench` puts. A Health.Watch call held open (its
    replies are never read: it only has to stay in flight) keeps that thread for the channel's
    life: 3 threads, and 3.4 µs (9 %) less client CPU per put; ops/s did not change (paired
    windows). Nodes end their watches when they stop.
    """

    def __init__(self, address: str, max_message: int, credentials: grpc.ChannelCredentials | None) -> None:
        opts = [
            ("grpc.max_send_message_length", max_message),
            ("grpc.max_receive_message_length", max_message),
            # A restarted node is reachable again within ~1 s instead of gRPC's default backoff
            # (1 s growing to 120 s), during which every call to it fails fast as UNAVAILABLE.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1_000),
        ]
        self.max_message = max_message
        self.channel = channel(address, opts, credentials)
        self.kv = kv_pb2_grpc.KVStub(self.channel)
        self.admin = admin_pb2_grpc.AdminStub(self.channel)
        self.watch = health_pb2_grpc.HealthStub(self.channel).Watch(health_pb2.HealthCheckRequest(service=""))
        self.session: _Session | None = None
        self.sessions_served = True  # until the node answers UNIMPLEMENTED

    async def batch(self, method: str, items: Sequence[Any], timeout_s: float) -> Any:
        """One Batch* call of these items, on this node's session when it serves them."""
        if self.sessions_served:
            session = self.session
            if session is None or session.ended is not None or session.token is not trio.lowlevel.current_trio_token():
                if session is not None:
                    session.close()
                session = self.session = _Session(self.kv, self.max_message)
            try:
                return await session.call(_SESSION_KIND[method], items, timeout_s)
            except _NoSessions:
                self.sessions_served = False  # nothing was sent: the unary call below carries it
            except _TooLarge:
                pass  # the unary call below fails alone (RESOURCE_EXHAUSTED), as it always did
        request = _BATCH_REQUEST[method](items=items)
        return await _wait(getattr(self.kv, method).future(request, timeout=timeout_s))

    def close(self) -> None:
        if self.session is not None:
            self.session.close()
        self.channel.close()


class _NoSessions(Exception):
    """The node does not serve KV.Session (an older version): use the unary Batch* methods."""


class _TooLarge(Exception):
    """A batch over the message limit: sent as a unary call, where only it fails."""


class _NotSent(Unavailable):
    """The call provably never reached a node's application: safe to send elsewhere, writes too."""


_U32 = (1 << 32) - 1


class _Waiter:
    __slots__ = ("done", "response", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.response: kv_pb2.SessionResponse | None = None
        self.error: BaseException | None = None


class _Session:
    """A KV.Session stream to one node, carrying every batch this client sends it.

    One message each way per batch instead of a unary call: measured with bare grpc (70 KB
    batches, sync client, grpc.aio server) a round trip took half the time, and the node spent
    140-160 instead of 320-350 µs of CPU per batch. Requests go to grpcio's request-consuming
    thread through a queue; a reader thread hands each reply to trio with `run_sync_soon`. When
    the stream fails or the node ends it (it is stopping), the batches waiting on it fail with
    the stream's error and the next batch opens a new session.
    """

    def __init__(self, stub: kv_pb2_grpc.KVStub, max_message: int) -> None:
        self.token = trio.lowlevel.current_trio_token()
        self.max_message = max_message
        self.requests: queue.SimpleQueue = queue.SimpleQueue()
        self.pending: dict[int, _Waiter] = {}  # sent and not answered yet
        self.next_id = 1
        self.ended: BaseException | None = None
        self.replies = stub.Session(iter(self.requests.get, None))
        threading.Thread(target=self._read, name="kvstore-session", daemon=True).start()

    async def call(self, kind: str, items: Sequence[Any], timeout_s: float) -> Any:
        """The batch's response; raises _TooLarge (nothing sent) for a request over the message
        limit: on the session it would end the stream, and every batch in flight on it."""
        if self.ended is not None:
            raise self.ended
        rid = self.next_id
        request = kv_pb2.SessionRequest(id=rid, timeout_ms=min(max(1, round(timeout_s * 1000)), _U32))
        getattr(request, kind).items.extend(items)  # one copy of the items (a kwarg copied twice)
        if request.ByteSize() > self.max_message:
            raise _TooLarge()
        self.next_id += 1
        waiter = self.pending[rid] = _Waiter()
        self.requests.put(request)
        try:
            with trio.move_on_after(timeout_s + SESSION_SLACK_S):
                await waiter.done.wait()
        finally:
            self.pending.pop(rid, None)
        resp = waiter.response
        if resp is None:
            if waiter.error is not None:
                raise waiter.error
            raise DeadlineExceeded(f"no answer within {timeout_s:.3g}s")
        if resp.error.code:
            raise error_from(resp.error.code, resp.error.message)
        return getattr(resp, kind)

    def close(self) -> None:
        self.requests.put(None)  # ends the request iterator, so grpcio's consuming thread exits
        self.replies.cancel()

    # -- the reader thread and what it hands to trio --

    def _read(self) -> None:
        error: BaseException
        try:
            for reply in self.replies:
                self._post(self._answer, reply)
            # A node ends a session (status OK) only after answering every batch it read: those
            # still waiting were never read, so even writes may go to another node.
            error = _NotSent("the node ended the session before reading this batch (it is stopping)")
        except grpc.RpcError as exc:
            code = exc.code()
            error = _NoSessions() if code == grpc.StatusCode.UNIMPLEMENTED else \
                error_from(code, exc.details() or code.name)
        except Exception as exc:  # noqa: BLE001 - the session is over either way
            error = Unavailable(f"session failed: {exc}")
        self.requests.put(None)
        self._post(self._end, error)

    def _post(self, fn: Callable[[Any], None], arg: Any) -> None:
        try:
            self.token.run_sync_soon(fn, arg)
        except trio.RunFinishedError:
            pass

    def _answer(self, reply: kv_pb2.SessionResponse) -> None:
        waiter = self.pending.pop(reply.id, None)
        if waiter is not None:  # else its caller gave up (cancelled or timed out)
            waiter.response = reply
            waiter.done.set()

    def _end(self, error: BaseException) -> None:
        """The stream is over: the batches not answered on it fail with its error."""
        self.ended = error
        for waiter in self.pending.values():
            waiter.error = error
            waiter.done.set()
        self.pending.clear()


def _close_conns(conns: dict[str, _Conn]) -> None:
    for conn in conns.values():
        conn.close()
    conns.clear()


async def _wait(future: grpc.Future) -> Any:
    token = trio.lowlevel.current_trio_token()
    done = trio.Event()

    def wake(_: Any) -> None:
        try:
            token.run_sync_soon(done.set)
        except trio.RunFinishedError:
            pass

    future.add_done_callback(wake)
    try:
        await done.wait()
    except trio.Cancelled:
        future.cancel()
        raise
    try:
        return future.result()
    except grpc.RpcError as exc:
        code = exc.code()
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            raise DeadlineExceeded(exc.details() or "deadline exceeded") from None
        raise error_from(code, exc.details() or code.name) from None


class Client:
    """Trio client. `async with Client("127.0.0.1:7000") as kv: await kv.put(b"k", b"v")`."""

    def __init__(
        self,
        addresses: str | Sequence[str],
        *,
        timeout_s: float = 5.0,
        retries: int = 3,
        r: str | int | None = None,
        w: str | int | None = None,
        n: int = 0,
        token_aware: bool = True,
        coalesce: bool = True,
        ring_refresh_s: float = 5.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE,
        tls: TlsFiles | TlsMaterial | None = None,
        token: str | None = None,
    ) -> None:
        """`tls`: the cluster CA and this client's certificate and key (mTLS; None: plaintext).
        `token`: a bearer token from the nodes' tokens file (needs tls), whose identity and
        roles then replace the certificate's."""
        self.addresses = [a for a in (addresses.split(",") if isinstance(addresses, str) else addresses) if a]
        if not self.addresses:
            raise ValueError("addresses: at least one host:port is needed")
        self.timeout_s = timeout_s
        self.retries = retries
        self.default_r, self.default_w, self.n = r, w, n
        self.token_aware = token_aware
        self.coalesce = coalesce
        self._coalescers: dict[tuple[str, str], Coalescer] = {}
        self.ring_refresh_s = ring_refresh_s
        self.max_message_bytes = max_message_bytes
        self._conns: dict[str, _Conn] = {}
        self._topology: Topology | None = None
        self._topology_nodes: tuple[list, int] | None = None  # what it was built from
        self._topology_at = -1e9
        self._refreshing: trio.Event | None = None  # set when the refresh under way ends
        # this session's order of coordinators (address -> rank): see Topology.coordinator
        self._order: dict[str, int] = {}
        # key -> coordinator under the current topology and order (cleared when either changes)
        self._routes: dict[bytes, str] = {}
        self._rng = random.Random()
        self._options_memo: dict[tuple[int, bool], kv_pb2.Options] = {}
        self._credentials = client_credentials(tls, token)
        # a Client dropped without close() still ends its sessions (each holds two threads and a
        # stream on its node) once it is garbage
        self._finalizer = weakref.finalize(self, _close_conns, self._conns)

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        _close_conns(self._conns)

    def _conn(self, address: str) -> _Conn:
        conn = self._conns.get(address)
        if conn is None:
            conn = self._conns[address] = _Conn(address, self.max_message_bytes, self._credentials)
        return conn

    def _options(self, strict: bool) -> kv_pb2.Options:
        found = self._options_memo.get((self.n, strict))  # shared, like _level's
        if found is None:
            found = self._options_memo[(self.n, strict)] = kv_pb2.Options(n=self.n, strict=strict)
        return found

    def _common(self, level: str | int | Level | None, strict: bool, name: str = "w") -> dict[str, Any]:
        """The level and options fields of a request, leaving out what equals the defaults (an
        unset message field reads as its default on the node; building it cost a copy per call)."""
        kw: dict[str, Any] = {}
        if level is not None:
            kw[name] = _level(level)
        if self.n or strict:
            kw["options"] = self._options(strict)
        return kw

    # ---- routing -------------------------------------------------------------------------

    async def refresh_ring(self) -> Topology:
        last: KvError | None = None
        for address in self._rng.sample(self.addresses, len(self.addresses)):
            try:
                resp = await _wait(self._conn(address).kv.Ring.future(kv_pb2.RingRequest(), timeout=self.timeout_s))
            except KvError as exc:
                last = exc
                continue
            nodes = (sorted((n.node_id, n.address, n.zone, tuple(n.tokens), n.up) for n in resp.nodes), resp.n)
            if self._topology is None or nodes != self._topology_nodes:
                self._topology, self._topology_nodes = Topology.from_nodes(*nodes), nodes
                self._routes.clear()  # else the ring is the same: so are the routes found on it
            addresses = set(self._topology.addresses.values())
            if set(self._order) != addresses:
                # A random order of the nodes per client session, kept while they stay: every key
                # goes to its replica first in it, so concurrent calls coalesce into large
                # batches to few coordinators (batch 12 -> 64 was worth 2x), and sessions spread.
                kept = [a for a in sorted(self._order, key=self._order.__getitem__) if a in addresses]
                new = sorted(addresses - set(kept))
                self._rng.shuffle(new)
                self._order = {a: i for i, a in enumerate(kept + new)}
            self._topology_at = trio.current_time()
            return self._topology
        raise last or Unavailable("no node answered")

    async def _route(self, key: bytes, avoid: set[str]) -> str:
        if self.token_aware:
            if self._topology is None or trio.current_time() - self._topology_at > self.ring_refresh_s:
                await self._refresh_once()
            if self._topology is not None:
                if not avoid:
                    addr = self._routes.get(key)
                    if addr is not None:
                        return addr
                addr = self._topology.coordinator(key, self.n or None, avoid, self._order)
                if addr is not None:
                    if not avoid:
                        if len(self._routes) >= ROUTE_CACHE_KEYS:
                            self._routes.clear()
                        self._routes[key] = addr
                    return addr
        candidates = [a for a in self.addresses if a not in avoid] or self.addresses
        return self._rng.choice(candidates)

    async def _refresh_once(self) -> None:
        """Refresh the topology, once for every caller that finds it stale: the first refreshes,
        the others go on with the topology they have (or, with none yet, wait for that refresh).
        When each refreshed, every call in flight at expiry (or after an UNAVAILABLE, which
        expires it) sent its own Ring call: 64 at once every ring_refresh_s with 64 in flight."""
        if self._refreshing is not None:
            if self._topology is None:
                await self._refreshing.wait()
            return
        self._refreshing = trio.Event()
        try:
            await self.refresh_ring()
        except KvError:
            self._topology = None  # routed at random until a refresh succeeds
        finally:
            self._refreshing.set()
            self._refreshing = None

    async def _call(self, key: bytes, method: str, request: Any, timeout_s: float | None, idempotent: bool) -> Any:
        timeout = timeout_s or self.timeout_s
        deadline = trio.current_time() + timeout
        avoid: set[str] = set()
        attempt = 0
        while True:
            address = await self._route(key, avoid)
            remaining = deadline - trio.current_time()
            if remaining <= 0:
                raise DeadlineExceeded(f"{method}: no answer within {timeout:.1f}s")
            try:
                if self.coalesce and method in _BATCH_OF:
                    return await self._coalescer(address, method).submit(request, deadline)
                if method in _SESSION_KIND:
                    return await self._conn(address).batch(method, request.items, remaining)
                return await _wait(getattr(self._conn(address).kv, method).future(request, timeout=remaining))
            except (Unavailable, Overloaded) as exc:
                attempt += 1
                avoid.add(address)  # the next try goes to another replica of the key, if any
                if isinstance(exc, Unavailable):
                    self._topology_at = -1e9  # the ring may have changed: refresh before the next try
                backoff = min(0.05 * 2**attempt, 1.0) * self._rng.uniform(0.5, 1.5)
                retry_safe = idempotent or isinstance(exc, Overloaded) or _never_sent(exc)
                if not retry_safe or attempt > self.retries or trio.current_time() + backoff >= deadline:
                    raise
                await trio.sleep(backoff)

    def _coalescer(self, address: str, method: str) -> Coalescer:
        found = self._coalescers.get((address, method))
        if found is None:
            batch_method = _BATCH_OF[method][0]
            conn = self._conn(address)

            async def send(items: Sequence[Any], timeout_s: float) -> list[Any]:
                resp = await conn.batch(batch_method, items, timeout_s)
                return [r if st.code == 0 else error_from(st.code, st.message)
                        for r, st in zip(resp.results, resp.statuses)]

            found = self._coalescers[(address, method)] = Coalescer(send)
        return found

    def batching_stats(self) -> dict[str, float]:
        """Batches sent and mean items per batch (how well coalescing works for this workload)."""
        batches = sum(c.batches for c in self._coalescers.values())
        items = sum(c.items for c in self._coalescers.values())
        return {"batches": batches, "mean_batch": items / batches if batches else 0.0}

    # ---- single-key operations -------------------------------------------------------------

    async def put(
        self,
        key: bytes,
        value: bytes,
        *,
        context: bytes = b"",
        w: str | int | None = None,
        ttl_s: int = 0,
        conditional: bool = False,
        strict: bool = False,
        timeout_s: float | None = None,
    ) -> bytes:
        """Store `value`; returns a context that supersedes it. With `context` from a read, the
        write replaces what was read; `conditional=True` fails with StaleContext if it changed."""
        req = kv_pb2.PutRequest(key=key, value=value, **self._common(w or self.default_w, strict))
        if context:
            req.context = context
        if ttl_s:
            req.ttl_s = ttl_s
        if conditional:
            req.conditional = True
        return (await self._call(key, "Put", req, timeout_s, idempotent=False)).context

    async def get(self, key: bytes, *, r: str | int | None = None, strict: bool = False,
                  timeout_s: float | None = None) -> Versions:
        """Read every live sibling of `key` (found=False when there is none)."""
        req = kv_pb2.GetRequest(key=key, **self._common(r or self.default_r, strict, "r"))
        return _versions(await self._call(key, "Get", req, timeout_s, idempotent=True))

    async def get_value(self, key: bytes, **kw: Any) -> bytes:
        """The resolved value of `key`; raises NotFound when it has none."""
        versions = await self.get(key, **kw)
        if not versions.found:
            raise NotFound(f"key {key[:64]!r} not found")
        value = versions.value
        assert value is not None
        return value

    async def delete(self, key: bytes, *, context: bytes = b"", w: str | int | None = None,
                     strict: bool = False, timeout_s: float | None = None) -> bytes:
        """Delete `key` (a tombstone); with `context`, deletes exactly what was read."""
        req = kv_pb2.DeleteRequest(key=key, context=context, **self._common(w or self.default_w, strict))
        return (await self._call(key, "Delete", req, timeout_s, idempotent=False)).context

    # ---- batches ----------------------------------------------------------------------------

    async def _batch(self, keys: Sequence[bytes], method: str, items: list[Any], request_cls: Any,
                     timeout_s: float | None, idempotent: bool) -> list[Any | KvError]:
        """Group items by coordinator and send one batch to each; per-item errors in the result."""
        groups: dict[str, list[int]] = {}
        for i, key in enumerate(keys):
            groups.setdefault(await self._route(key, set()), []).append(i)
        out: list[Any | KvError] = [None] * len(items)

        async def send(idx: list[int]) -> None:
            try:
                resp = await self._call(keys[idx[0]], method, request_cls(items=[items[i] for i in idx]),
                                        timeout_s, idempotent)
            except KvError as exc:
                for i in idx:
                    out[i] = exc
                return
            for j, i in enumerate(idx):
                st = resp.statuses[j]
                out[i] = resp.results[j] if st.code == 0 else error_from(st.code, st.message)

        async with trio.open_nursery() as nursery:
            for idx in groups.values():
                for start in range(0, len(idx), MAX_BATCH_ITEMS):  # stay under the node's batch limit
                    nursery.start_soon(send, idx[start:start + MAX_BATCH_ITEMS])
        return out

    async def put_many(self, items: Mapping[bytes, bytes] | Iterable[tuple[bytes, bytes]], *,
                       w: str | int | None = None, timeout_s: float | None = None) -> list[bytes | KvError]:
        """Blind-write many keys; returns each key's new context or its error."""
        pairs = list(items.items() if isinstance(items, Mapping) else items)
        lv = _level(w or self.default_w)
        reqs = [kv_pb2.PutRequest(key=k, value=v, w=lv, options=self._options(False)) for k, v in pairs]
        res = await self._batch([k for k, _ in pairs], "BatchPut", reqs, kv_pb2.BatchPutRequest, timeout_s, False)
        return [r if isinstance(r, KvError) else r.context for r in res]

    async def get_many(self, keys: Sequence[bytes], *, r: str | int | None = None,
                       timeout_s: float | None = None) -> list[Versions | KvError]:
        lv = _level(r or self.default_r)
        reqs = [kv_pb2.GetRequest(key=k, r=lv, options=self._options(False)) for k in keys]
        res = await self._batch(list(keys), "BatchGet", reqs, kv_pb2.BatchGetRequest, timeout_s, True)
        return [r if isinstance(r, KvError) else _versions(r) for r in res]

    async def delete_many(self, keys: Sequence[bytes], *, w: str | int | None = None,
                          timeout_s: float | None = None) -> list[bytes | KvError]:
        lv = _level(w or self.default_w)
        reqs = [kv_pb2.DeleteRequest(key=k, w=lv, options=self._options(False)) for k in keys]
        res = await self._batch(list(keys), "BatchDelete", reqs, kv_pb2.BatchDeleteRequest, timeout_s, False)
        return [r if isinstance(r, KvError) else r.context for r in res]

    # ---- key listing ----------------------------------------------------------------------

    async def list_keys_page(self, *, prefix: bytes = b"", start_after: bytes = b"", limit: int = 0,
                             replicas: int = 0, timeout_s: float | None = None) -> KeyPage:
        """One page of live keys in byte order (see `list_keys`): at most `limit` (0: the node's
        default page), after `start_after`, starting with `prefix`. Any node coordinates it; a
        node that is down or overloaded is skipped for another."""
        request = kv_pb2.ListKeysRequest(prefix=prefix, start_after=start_after, limit=limit, replicas=replicas,
                                         options=kv_pb2.Options(n=self.n) if self.n else None)
        timeout = timeout_s or self.timeout_s
        deadline = trio.current_time() + timeout
        tried: list[str] = []
        attempt = 0
        while True:
            untried = [a for a in self.addresses if a not in tried] or self.addresses
            address = self._rng.choice(untried)
            try:
                resp = await _wait(self._conn(address).kv.ListKeys.future(
                    request, timeout=max(deadline - trio.current_time(), 0.001)))
                return KeyPage(list(resp.keys), resp.cursor, resp.missing_ranges, resp.total_ranges)
            except (Unavailable, Overloaded):
                attempt += 1
                tried.append(address)
                backoff = min(0.05 * 2**attempt, 1.0) * self._rng.uniform(0.5, 1.5)
                if attempt > self.retries or trio.current_time() + backoff >= deadline:
                    raise
                await trio.sleep(backoff)

    async def list_keys(self, *, prefix: bytes = b"", start_after: bytes = b"", limit: int = 0,
                        page_size: int = 0, replicas: int = 0, allow_partial: bool = False) -> AsyncIterator[bytes]:
        """Every live key (not deleted, not expired) in byte order, a page per call to the cluster;
        at most `limit` (0: all). `replicas`: how many replicas of each token range to ask (0 or
        1: one; more also finds keys that replica has not received yet, at that many times the
        work). When some range of the ring had no replica up, its keys are missing: after the
        others, this raises Unavailable saying how much is missing, unless `allow_partial`."""
        cursor, sent, missing, total = start_after, 0, 0, 0
        while True:
            want = page_size  # 0: the node's default page
            if limit and limit - sent < (page_size or LIST_PAGE):
                want = limit - sent
            page = await self.list_keys_page(prefix=prefix, start_after=cursor, limit=want, replicas=replicas)
            missing, total = max(missing, page.missing_ranges), page.total_ranges
            for key in page.keys:
                yield key
            sent += len(page.keys)
            cursor = page.cursor
            if not cursor or (limit and sent >= limit):
                break
        if missing and not allow_partial:
            raise Unavailable(f"key listing is partial: {missing} of {total} token ranges had no replica up, "
                              "and their keys are missing (list again once their nodes are back)")

    # ---- cluster information --------------------------------------------------------------

    async def status(self, address: str | None = None) -> dict[str, Any]:
        """The contacted node's view of the cluster (members, ownership, hints)."""
        conn = self._conn(address or self.addresses[0])
        resp = await _wait(conn.admin.Status.future(admin_pb2.StatusRequest(), timeout=self.timeout_s))
        return msgpack.unpackb(resp.payload, raw=False)

    async def command(self, name: str, args: dict[str, Any] | None = None, address: str | None = None,
                      timeout_s: float | None = None) -> bytes:
        """Run a maintenance command (rewrap, purge-tombstones, replay-hints, ...) on one node."""
        conn = self._conn(address or self.addresses[0])
        req = admin_pb2.CommandRequest(name=name, args=msgpack.packb(args or {}))
        return (await _wait(conn.admin.Command.future(req, timeout=timeout_s or self.timeout_s))).payload

    async def locate(self, key: bytes, address: str | None = None) -> admin_pb2.LocateResponse:
        """Which nodes are replicas of `key` and which actually store it."""
        conn = self._conn(address or self.addresses[0])
        return await _wait(conn.admin.Locate.future(admin_pb2.LocateRequest(key=key), timeout=self.timeout_s))

"""Who is calling a node and what they may do: the server side of mTLS and bearer tokens.

Belongs here: the method -> required role table, the bearer token table, the identity check of
each call and the gRPC server interceptor that runs it before any handler, and assembling a
node's security settings (server credentials, peer channel credentials) from its config.

Identities: the peer certificate (kvstore/certs.py: CN is the name, OU the kind and roles), or a
bearer token (`authorization: Bearer <token>`) from the node's tokens file, which then replaces
the certificate's identity for public and admin methods. A node certificate may do everything;
internal methods (replica streams, gossip) accept nothing else, whatever token comes with it.
The check runs before the request is even looked at, so a denial says nothing about any key.
"""
from __future__ import annotations

import hmac
import inspect
import logging
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Mapping, Sequence

import grpc

from kvstore.certs import CertError, Identity, check_name, identity_of_pem, parse_roles
from kvstore.config import NodeConfig
from kvstore.errors import KvError, PermissionDenied, Unauthenticated
from kvstore.node.status import code_of, message_of
from kvstore.node.watch import file_stamp
from kvstore.tls import TlsFiles, TlsMaterial

log = logging.getLogger(__name__)

NODE = "node"   # requirement: a node certificate
ANY = "any"     # requirement: any authenticated identity, no role (health checks)

#: Role each method needs. Methods of other services not listed need admin: a service added
#: later is closed until someone decides who may call it.
METHOD_ROLES: dict[str, str] = {
    "/kvstore.v1.KV/Get": "read",
    "/kvstore.v1.KV/BatchGet": "read",
    "/kvstore.v1.KV/Ring": "read",
    "/kvstore.v1.KV/ListKeys": "read",
    "/kvstore.v1.KV/Put": "write",
    "/kvstore.v1.KV/Delete": "write",
    "/kvstore.v1.KV/BatchPut": "write",
    "/kvstore.v1.KV/BatchDelete": "write",
    # each batch on a session is checked for the role of its Batch* method (node/server.py)
    "/kvstore.v1.KV/Session": ANY,
    "/kvstore.v1.Admin/Status": "read",
    "/kvstore.v1.Admin/Locate": "read",
    "/kvstore.v1.Admin/Command": "admin",
    "/kvstore.v1.Internal/Stream": NODE,
    "/kvstore.v1.Internal/Call": NODE,
}
SERVICE_ROLES: dict[str, str] = {
    "/kvstore.v1.Internal/": NODE,
    "/grpc.health.v1.Health/": ANY,
    "/grpc.reflection.v1alpha.ServerReflection/": "read",
    "/grpc.reflection.v1.ServerReflection/": "read",
}
DEFAULT_ROLE = "admin"
MIN_TOKEN_CHARS = 16      # shorter tokens are guessable; `kvstore certs token` makes 43-char ones
TOKEN_RECHECK_S = 1.0     # a changed tokens file takes effect within this (one stat() per second at most)
IDENTITY_CACHE = 1024     # parsed peer certificates kept (by PEM), so a call costs a dict lookup


def required_role(method: str) -> str:
    role = METHOD_ROLES.get(method)
    if role is not None:
        return role
    for prefix, role in SERVICE_ROLES.items():
        if method.startswith(prefix):
            return role
    return DEFAULT_ROLE


def _short(method: str) -> str:
    return method.rsplit(".", 1)[-1] if method.startswith("/kvstore.") else method


# ---- bearer tokens -------------------------------------------------------------------------------


class TokenTable:
    """token -> identity. Lookups compare against every entry with hmac.compare_digest."""

    def __init__(self, entries: Sequence[tuple[str, Identity]]) -> None:
        self._entries = [(token.encode(), ident) for token, ident in entries]

    def __len__(self) -> int:
        return len(self._entries)

    def current(self) -> "TokenTable":
        return self

    def lookup(self, token: str) -> Identity | None:
        presented = token.encode()
        found = None
        for known, ident in self._entries:  # no early exit: time does not depend on which matched
            if hmac.compare_digest(known, presented):
                found = ident
        return found

    @classmethod
    def load(cls, path: Path | str, field: str = "auth_tokens_file") -> "TokenTable":
        """A TOML file of [[tokens]] tables with token, name and roles; mode 0600.

            [[tokens]]
            token = "kYx...43 chars from `kvstore certs token`"
            name = "ci-reader"
            roles = ["read"]
        """
        path = Path(path)
        try:
            mode = path.stat().st_mode & 0o777
            with open(path, "rb") as f:
                doc = tomllib.load(f)
        except OSError as exc:
            raise CertError(f"{field}: {path}: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise CertError(f"{field}: {path} is not valid TOML: {exc}") from None
        if mode & 0o077:
            raise CertError(f"{field}: {path} has mode {mode:o}; a tokens file must be 0600 (chmod 600 {path})")
        rows = doc.get("tokens", [])
        if not isinstance(rows, list) or set(doc) - {"tokens"}:
            raise CertError(f"{field}: {path}: expected only [[tokens]] tables")
        entries: list[tuple[str, Identity]] = []
        seen: set[str] = set()
        for i, row in enumerate(rows):
            where = f"{field}: {path}: tokens[{i}]"
            if not isinstance(row, dict) or set(row) - {"token", "name", "roles"}:
                raise CertError(f"{where}: expected keys token, name, roles")
            token, name, roles = row.get("token"), row.get("name"), row.get("roles", [])
            if not isinstance(token, str) or len(token) < MIN_TOKEN_CHARS or not token.isascii() or " " in token:
                raise CertError(f"{where}.token: must be at least {MIN_TOKEN_CHARS} ASCII characters without spaces")
            if token in seen:
                raise CertError(f"{where}.token: the same token appears twice")
            seen.add(token)
            if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
                raise CertError(f"{where}.roles: must be a list of role names")
            try:
                entries.append((token, Identity("client", check_name(str(name)), parse_roles(roles))))
            except CertError as exc:
                raise CertError(f"{where}.{exc}") from None
        return cls(entries)


class TokenFile:
    """The tokens file, read again when it changes (looked at no more than every
    TOKEN_RECHECK_S), so tokens are added and revoked without restarting nodes. A changed file
    that does not load leaves the previous table in force, with an error in the log."""

    def __init__(self, path: Path | str, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = Path(path)
        self._clock = clock
        self._stamp = self._stat()
        self.table = TokenTable.load(self.path)
        self._checked = clock()

    def _stat(self) -> tuple[int, int, int] | None:
        return file_stamp(self.path)

    def __len__(self) -> int:
        return len(self.table)

    def current(self) -> TokenTable:
        now = self._clock()
        if now - self._checked >= TOKEN_RECHECK_S:
            self._checked = now
            stamp = self._stat()
            if stamp != self._stamp:
                self._stamp = stamp
                try:
                    self.table = TokenTable.load(self.path)
                    log.info("tokens file %s reloaded: %d tokens", self.path, len(self.table))
                except CertError as exc:
                    log.error("tokens file changed but does not load, keeping the previous %d tokens: %s",
                              len(self.table), exc)
        return self.table


# ---- the check ------------------------------------------------------------------------------------


class Authorizer:
    """Decides, per call, who the caller is and whether they may call the method."""

    def __init__(self, tokens: TokenTable | TokenFile | None = None) -> None:
        self.tokens = tokens
        self._identities: dict[bytes, Identity | None] = {}

    def _peer(self, auth_context: Mapping[str, Sequence[bytes]]) -> Identity:
        pems = auth_context.get("x509_pem_cert") or ()
        if not pems:
            raise Unauthenticated("no client certificate: this node requires one signed by the cluster CA")
        pem = pems[0]
        if pem not in self._identities:
            if len(self._identities) >= IDENTITY_CACHE:
                self._identities.clear()
            try:
                self._identities[pem] = identity_of_pem(pem)
            except CertError:
                self._identities[pem] = None
        ident = self._identities[pem]
        if ident is None:
            subject = b",".join(auth_context.get("x509_subject") or [b"?"]).decode(errors="replace")
            raise Unauthenticated(f"certificate {subject[:200]!r} names no kvstore node or client identity")
        return ident

    def _token(self, metadata: Sequence[tuple[str, Any]]) -> Identity | None:
        values = [v for k, v in metadata if k == "authorization"]
        if not values:
            return None
        value = values[0] if isinstance(values[0], str) else values[0].decode("latin-1")
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("authorization: expected 'Bearer <token>'")
        found = self.tokens.current().lookup(token.strip()) if self.tokens is not None else None
        if found is None:
            raise Unauthenticated("bearer token not recognized")
        return found

    def check(self, method: str, auth_context: Mapping[str, Sequence[bytes]],
              metadata: Sequence[tuple[str, Any]]) -> Identity:
        """The caller's identity when it may call `method`; else Unauthenticated (no or unknown
        identity) or PermissionDenied (known, but lacking the role)."""
        need = required_role(method)
        peer = self._peer(auth_context)
        if peer.is_node:
            return peer                      # nodes forward, replicate, gossip: everything
        if need == NODE:
            raise PermissionDenied(f"{_short(method)} is for cluster nodes only; client {peer.name!r} "
                                   "presented a client certificate")
        ident = self._token(metadata) or peer
        if need != ANY and need not in ident.roles:
            have = ", ".join(sorted(ident.roles)) or "none"
            raise PermissionDenied(f"client {ident.name!r} lacks the {need} role needed for "
                                   f"{_short(method)} (it has: {have})")
        return ident


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Runs Authorizer.check before every handler of the server, of every service."""

    def __init__(self, authorizer: Authorizer) -> None:
        self.authorizer = authorizer
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None  # unknown method: gRPC answers UNIMPLEMENTED
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is None or cached[0] is not handler:
            cached = self._wrapped[method] = (handler, self._wrap(method, handler))
        return cached[1]

    def _denial(self, method: str, context: Any) -> KvError | None:
        try:
            self.authorizer.check(method, context.auth_context(), context.invocation_metadata() or ())
        except KvError as exc:
            log.debug("denied %s to %s: %s", method, context.peer(), exc)
            return exc
        return None

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """The same handler behind the check, keeping its shape: coroutine or async generator
        handlers stay async; plain functions and generators stay synchronous, so the server
        still runs them in its thread pool (their context's abort() is synchronous there)."""
        kind = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
        name = next(k for k in kind if getattr(handler, k) is not None)
        inner = getattr(handler, name)
        denial = self._denial

        if inspect.isasyncgenfunction(inner):
            async def async_stream(request: Any, context: Any) -> Any:
                if (exc := denial(method, context)) is not None:
                    await context.abort(code_of(exc), message_of(exc))
                async for reply in inner(request, context):
                    yield reply
            behavior: Any = async_stream
        elif inspect.iscoroutinefunction(inner):
            async def async_single(request: Any, context: Any) -> Any:
                if (exc := denial(method, context)) is not None:
                    await context.abort(code_of(exc), message_of(exc))
                return await inner(request, context)
            behavior = async_single
        elif inspect.isgeneratorfunction(inner):
            def sync_stream(request: Any, context: Any) -> Any:
                if (exc := denial(method, context)) is not None:
                    context.abort(code_of(exc), message_of(exc))
                yield from inner(request, context)
            behavior = sync_stream
        else:
            def sync_single(request: Any, context: Any) -> Any:
                if (exc := denial(method, context)) is not None:
                    context.abort(code_of(exc), message_of(exc))
                return inner(request, context)
            behavior = sync_single
        factory = getattr(grpc, f"{name}_rpc_method_handler")
        return factory(behavior, request_deserializer=handler.request_deserializer,
                       response_serializer=handler.response_serializer)


# ---- a node's security settings ------------------------------------------------------------------


@dataclass(frozen=True)
class NodeSecurity:
    """What a node serves and dials with: TLS material (None: plaintext) and its authorizer."""

    tls: TlsMaterial | None
    authorizer: Authorizer | None

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [AuthInterceptor(self.authorizer)] if self.authorizer is not None else []

    def add_port(self, server: grpc.aio.Server, listen: str) -> int:
        if self.tls is None:
            return server.add_insecure_port(listen)
        return server.add_secure_port(listen, self.tls.server_credentials())

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        """For channels to other nodes: our node certificate, verified against the cluster CA."""
        return self.tls.channel_credentials() if self.tls is not None else None

    def describe(self) -> str:
        if self.tls is None:
            return "PLAINTEXT (insecure = true): no TLS, no authentication"
        tokens = len(self.authorizer.tokens) if self.authorizer and self.authorizer.tokens else 0
        return f"mTLS as node {self.tls.identity.name!r}, {tokens} bearer tokens"


TLS_FIELDS = ("tls_ca_file", "tls_cert_file", "tls_key_file")


def load_security(config: NodeConfig) -> NodeSecurity:
    """The node's security from its config; CertError (naming the setting) when files are wrong.
    A node refuses to start with a certificate that is not a node certificate of its CA."""
    if not config.tls_enabled:
        return NodeSecurity(None, None)
    tls = TlsFiles(config.tls_ca_file, config.tls_cert_file, config.tls_key_file).load(TLS_FIELDS)
    if not tls.identity.is_node:
        raise CertError(f"tls_cert_file: {config.tls_cert_file} is a {tls.identity.kind} certificate; a node "
                        f"needs one made with `kvstore certs issue --kind node`")
    tokens = TokenFile(config.auth_tokens_file) if config.auth_tokens_file else None
    return NodeSecurity(tls, Authorizer(tokens))

"""mTLS and authorization on real nodes: who may connect (certificates of the cluster CA only),
who may call what (node certificates for internal methods; read, write and admin roles for the
rest, from the client certificate or a bearer token), and that denials reveal nothing."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import grpc
import msgpack
import pytest
import trio

from kvstore import certs
from kvstore._proto import admin_pb2, admin_pb2_grpc, internal_pb2, internal_pb2_grpc, kv_pb2, kv_pb2_grpc
from kvstore.client import Client
from kvstore.core import wire
from kvstore.core.versions import Sibling
from kvstore.errors import PermissionDenied, Unauthenticated, Unavailable
from kvstore.node.node import Node
from kvstore.tls import TlsFiles, TlsMaterial, channel

WRITER_TOKEN = "w" * 20 + "-writer-token"
READER_TOKEN = "r" * 20 + "-reader-token"
ADMIN_COMMANDS = ["rewrap", "kms-reload", "decommission", "removenode", "cleanup", "repair",
                  "purge-tombstones", "replay-hints"]


class Pki:
    """A cluster CA with node and client certificates, and a second, unrelated CA."""

    def __init__(self, root: Path) -> None:
        self.dir, self.other = root / "pki", root / "other-pki"
        for d in (self.dir, self.other):
            certs.init_ca(d)
        for name in ("n1", "n2", "n3"):
            certs.issue(self.dir, name, "node")
        for name, roles in [("admin", certs.ROLES), ("writer", ("read", "write")), ("reader", ("read",)),
                            ("nobody", ())]:
            certs.issue(self.dir, name, "client", roles=roles)
        certs.issue(self.other, "n1", "node")
        certs.issue(self.other, "admin", "client", roles=certs.ROLES)
        self.tokens = root / "tokens.toml"
        self.tokens.write_text(f'[[tokens]]\ntoken = "{WRITER_TOKEN}"\nname = "tok-writer"\nroles = ["read", "write"]\n'
                               f'[[tokens]]\ntoken = "{READER_TOKEN}"\nname = "tok-reader"\nroles = ["read"]\n')
        self.tokens.chmod(0o600)

    def files(self, name: str, other_ca: bool = False) -> TlsFiles:
        return TlsFiles.from_dir(self.other if other_ca else self.dir, name)

    def tls(self, name: str, other_ca: bool = False) -> TlsMaterial:
        return self.files(name, other_ca).load()

    def node_settings(self, name: str, other_ca: bool = False) -> dict[str, Any]:
        f = self.files(name, other_ca)
        return {"tls_ca_file": f.ca_file, "tls_cert_file": f.cert_file, "tls_key_file": f.key_file,
                "auth_tokens_file": str(self.tokens)}


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


async def tls_node(nodes: Any, pki: Pki, name: str = "n1", **overrides: Any) -> Node:
    return await nodes.start(name, **pki.node_settings(name), **overrides)


async def kv_cli(*args: str) -> subprocess.CompletedProcess:
    return await trio.run_process([sys.executable, "-m", "kvstore.cli.main", *args], capture_stdout=True,
                                  capture_stderr=True, check=False)


async def blocking(fn: Callable[[], Any]) -> Any:
    """Run a blocking gRPC call (raw stubs, below the client library) off the trio thread."""
    return await trio.to_thread.run_sync(fn)


def raw_status(address: str, credentials: grpc.ChannelCredentials | None, metadata: tuple = ()) -> grpc.StatusCode:
    try:
        with channel(address, (), credentials) as ch:
            admin_pb2_grpc.AdminStub(ch).Status(admin_pb2.StatusRequest(), timeout=5, metadata=metadata)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_three_tls_nodes_replicate_and_serve_a_client_of_their_ca(nodes, pki: Pki) -> None:
    cluster = [await tls_node(nodes, pki, name) for name in ("n1", "n2", "n3")]
    await nodes.converged(cluster)
    async with Client([cluster[0].address], tls=pki.tls("admin")) as kv:
        await kv.put(b"k", b"over tls", w="all")  # every replica acked over node-to-node mTLS
    for node in cluster:  # and each one answers as coordinator with R=ALL
        async with Client([node.address], tls=pki.files("reader"), token_aware=False) as kv:
            assert (await kv.get(b"k", r="all")).value == b"over tls"


async def test_plaintext_client_and_client_of_another_ca_are_refused(nodes, pki: Pki) -> None:
    node = await tls_node(nodes, pki)
    async with Client([node.address], timeout_s=2, retries=0) as plain:
        with pytest.raises(Unavailable):
            await plain.get(b"k")
    async with Client([node.address], tls=pki.tls("admin", other_ca=True), timeout_s=2, retries=0) as stranger:
        with pytest.raises(Unavailable):
            await stranger.get(b"k")
    no_cert = grpc.ssl_channel_credentials(root_certificates=pki.tls("admin").ca)
    assert await blocking(lambda: raw_status(node.address, no_cert)) == grpc.StatusCode.UNAVAILABLE
    assert await blocking(lambda: raw_status(node.address, pki.tls("reader").channel_credentials())) \
        == grpc.StatusCode.OK


async def test_client_certificate_cannot_gossip_or_write_replicas(nodes, pki: Pki) -> None:
    node = await tls_node(nodes, pki)
    admin = pki.tls("admin").channel_credentials()
    forged = wire.encode_batch(1, [wire.WriteOp(b"forged", [Sibling("evil", 1, {}, b"x", 1)])])

    def internal_calls() -> list[tuple[grpc.StatusCode, str]]:
        out = []
        with channel(node.address, (), admin) as ch:
            stub = internal_pb2_grpc.InternalStub(ch)
            for call in (lambda: stub.Call(internal_pb2.Frame(payload=wire.encode_call("ping", None)), timeout=5),
                         lambda: list(stub.Stream(iter([internal_pb2.Frame(payload=forged)]), timeout=5))):
                try:
                    call()
                    out.append((grpc.StatusCode.OK, ""))
                except grpc.RpcError as exc:
                    out.append((exc.code(), exc.details()))
        return out

    results = await blocking(internal_calls)
    assert [code for code, _ in results] == [grpc.StatusCode.PERMISSION_DENIED] * 2
    assert all("for cluster nodes only" in details for _, details in results)
    [records] = await node.store.read_many([b"forged"])
    assert not records  # nothing was stored


async def test_node_of_another_ca_cannot_gossip_or_replicate(nodes, pki: Pki) -> None:
    node = await tls_node(nodes, pki)
    stranger = await nodes.start("n1x", seeds=(), **pki.node_settings("n1", other_ca=True))
    with pytest.raises(Unavailable):
        await stranger.gossip.exchange(node.address)
    with pytest.raises(Unavailable):
        await stranger.peer_for_address(node.address).replicate(
            [wire.WriteOp(b"forged", [Sibling("n1x", 1, {}, b"x", 1)])], 2.0)
    assert set(node.gossip.table) == {node.node_id}
    [records] = await node.store.read_many([b"forged"])
    assert not records
    # the other direction too: the node cannot reach the stranger
    with pytest.raises(Unavailable):
        await node.gossip.exchange(stranger.address)


async def test_read_only_identity_reads_but_cannot_write(nodes, pki: Pki) -> None:
    node = await tls_node(nodes, pki)
    async with Client([node.address], tls=pki.tls("writer")) as writer:
        await writer.put(b"k", b"v")
    async with Client([node.address], tls=pki.tls("reader")) as reader:
        assert (await reader.get(b"k")).value == b"v"
        assert (await reader.status())["node_id"] == node.node_id
        with pytest.raises(PermissionDenied, match="'reader' lacks the write role"):
            await reader.put(b"k", b"overwritten")
        with pytest.raises(PermissionDenied, match="lacks the write role"):
            await reader.delete(b"k")
        results = await reader.put_many({b"a": b"1", b"b": b"2"})
        assert all(isinstance(r, PermissionDenied) for r in results)
        assert (await reader.get(b"k")).value == b"v"


@pytest.mark.parametrize("command", ADMIN_COMMANDS)
async def test_admin_commands_are_denied_to_non_admins(nodes, pki: Pki, command: str) -> None:
    node = await tls_node(nodes, pki)
    async with Client([node.address], tls=pki.tls("writer")) as writer:
        with pytest.raises(PermissionDenied, match="lacks the admin role needed for Admin/Command"):
            await writer.command(command, {"node_id": "n2"})
    assert not node.stopping.is_set() and node.gossip.me.status.value == "normal"


async def test_admin_runs_admin_commands(nodes, pki: Pki) -> None:
    node = await tls_node(nodes, pki)
    async with Client([node.address], tls=pki.tls("admin")) as admin:
        assert msgpack.unpackb(await admin.command("replay-hints"), raw=False) == {"replayed": 0}


async def test_bearer_token_sets_identity_and_unknown_tokens_are_unauthenticated(nodes, pki: Pki) -> None:
    node = await tls_node(nodes, pki)
    async with Client([node.address], tls=pki.tls("nobody"), token=WRITER_TOKEN) as kv:
        await kv.put(b"k", b"by token")  # a certificate without roles, a token with write
    async with Client([node.address], tls=pki.tls("nobody"), token=READER_TOKEN) as kv:
        assert (await kv.get(b"k")).value == b"by token"
        with pytest.raises(PermissionDenied, match="'tok-reader' lacks the write role"):
            await kv.put(b"k", b"no")
    async with Client([node.address], tls=pki.tls("admin"), token="x" * 30) as kv:
        with pytest.raises(Unauthenticated, match="bearer token not recognized"):
            await kv.get(b"k")  # a bad token is refused even with an admin certificate
    nobody = pki.tls("nobody").channel_credentials()
    for header in (("authorization", "Basic dXNlcjpwdw=="), ("authorization", f"Bearer {WRITER_TOKEN}x")):
        code = await blocking(lambda: raw_status(node.address, nobody, (header,)))
        assert code == grpc.StatusCode.UNAUTHENTICATED


async def test_denied_reads_of_existing_and_missing_keys_look_the_same(nodes, pki: Pki) -> None:
    node = await tls_node(nodes, pki)
    async with Client([node.address], tls=pki.tls("admin")) as admin:
        await admin.put(b"exists", b"secret")
    for options in ({"tls": pki.tls("nobody")}, {"tls": pki.tls("nobody"), "token": "y" * 30}):
        async with Client([node.address], **options) as kv:
            errors = []
            for key in (b"exists", b"missing"):
                with pytest.raises((PermissionDenied, Unauthenticated)) as caught:
                    await kv.get(key)
                errors.append((type(caught.value), str(caught.value)))
                with pytest.raises((PermissionDenied, Unauthenticated)) as located:
                    await kv.locate(key)
                errors.append((type(located.value), str(located.value)))
            assert errors[0] == errors[2] and errors[1] == errors[3], errors
            assert b"exists".decode() not in errors[0][1] and "secret" not in errors[0][1]


def kv_raw_get(address: str, credentials: grpc.ChannelCredentials, key: bytes) -> tuple[grpc.StatusCode, str]:
    try:
        with channel(address, (), credentials) as ch:
            kv_pb2_grpc.KVStub(ch).Get(kv_pb2.GetRequest(key=key), timeout=5)
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


async def test_denial_comes_before_the_request_is_looked_at(nodes, pki: Pki) -> None:
    node = await tls_node(nodes, pki)
    nobody = pki.tls("nobody").channel_credentials()
    invalid = await blocking(lambda: kv_raw_get(node.address, nobody, b""))     # an invalid key
    valid = await blocking(lambda: kv_raw_get(node.address, nobody, b"k"))
    assert invalid == valid and invalid[0] == grpc.StatusCode.PERMISSION_DENIED


async def test_cli_uses_tls_flags_and_hints_at_them_when_missing(nodes, pki: Pki) -> None:
    node = await tls_node(nodes, pki)
    admin = pki.files("admin")
    flags = ["--address", node.address, "--tls-ca", admin.ca_file, "--tls-cert", admin.cert_file,
             "--tls-key", admin.key_file]
    assert (await kv_cli("put", "color", "blue", *flags)).returncode == 0
    got = await kv_cli("get", "color", *flags)
    assert (got.returncode, got.stdout) == (0, b"blue")
    reader = pki.files("reader")
    denied = await kv_cli("put", "color", "red", "--address", node.address, "--tls-ca", reader.ca_file,
                          "--tls-cert", reader.cert_file, "--tls-key", reader.key_file)
    assert denied.returncode == 8 and b"PermissionDenied" in denied.stderr
    plain = await kv_cli("get", "color", "--address", node.address, "--timeout", "2")
    assert plain.returncode == 3 and b"--cluster-dir" in plain.stderr
    half = await kv_cli("get", "color", "--address", node.address, "--tls-ca", admin.ca_file)
    assert half.returncode == 2 and b"--tls-cert: required with TLS" in half.stderr


async def test_kvstore_node_refuses_to_start_without_tls_or_with_a_client_certificate(pki: Pki, tmp_path: Path) -> None:
    base = ["node", "--data-dir", str(tmp_path / "d"), "--listen", "127.0.0.1:0", "--storage", "memory",
            "--encryption", "none", "--profile", "local"]
    plain = await kv_cli(*base)
    assert plain.returncode == 2 and b"no TLS settings" in plain.stderr and b"insecure" in plain.stderr
    client = pki.files("admin")
    wrong = await kv_cli(*base, "--tls-ca", client.ca_file, "--tls-cert", client.cert_file, "--tls-key", client.key_file)
    assert wrong.returncode == 1 and b"tls_cert_file" in wrong.stderr and b"is a client certificate" in wrong.stderr


async def test_a_token_added_with_kvstore_certs_token_works_without_a_restart(nodes, pki: Pki) -> None:
    node = await tls_node(nodes, pki)
    made = await kv_cli("certs", "token", "--name", "late", "--roles", "read,write", "--file", str(pki.tokens),
                        "--json")
    assert made.returncode == 0, made.stderr
    token = json.loads(made.stdout)["token"]
    assert pki.tokens.stat().st_mode & 0o777 == 0o600
    async with Client([node.address], tls=pki.tls("nobody"), token=token, retries=0) as kv:
        with trio.fail_after(5):
            while True:
                try:
                    await kv.put(b"k", b"late")
                    break
                except Unauthenticated:
                    await trio.sleep(0.2)
        assert (await kv.get(b"k")).value == b"late"


def test_the_check_guards_sync_async_unary_and_streaming_handlers_alike(pki: Pki) -> None:
    """Services others add (health, reflection) may be written either way; each stays guarded."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from kvstore.node.auth import AuthInterceptor, Authorizer

    async def async_unary(request: bytes, context: Any) -> bytes:
        return b"async"

    async def async_stream(request: bytes, context: Any) -> Any:
        yield b"async-stream"

    def sync_unary(request: bytes, context: Any) -> bytes:
        return b"sync"

    def sync_stream(request: bytes, context: Any) -> Any:
        yield b"sync-stream"

    async def main() -> list[tuple[str, str, str]]:
        # the pool is shut down from another thread while the loop runs: a worker may still be
        # handing a finished sync handler's reply to the loop, and would wait for it forever
        pool = ThreadPoolExecutor(2)
        try:
            server = grpc.aio.server(interceptors=[AuthInterceptor(Authorizer())], migration_thread_pool=pool)
            server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("kvstore.v1.Admin", {
                "Command": grpc.unary_unary_rpc_method_handler(async_unary),      # needs admin
                "Status": grpc.unary_stream_rpc_method_handler(async_stream),     # needs read
                "Locate": grpc.unary_unary_rpc_method_handler(sync_unary),        # needs read
            }), grpc.method_handlers_generic_handler("kvstore.v1.Internal", {
                "Call": grpc.unary_stream_rpc_method_handler(sync_stream),        # needs a node
            })])
            port = server.add_secure_port("127.0.0.1:0", pki.tls("n1").server_credentials())
            await server.start()
            out = []
            try:
                for who in ("admin", "nobody"):
                    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", pki.tls(who).channel_credentials()) as ch:
                        for path, streaming in [("/kvstore.v1.Admin/Command", False), ("/kvstore.v1.Admin/Status", True),
                                                ("/kvstore.v1.Admin/Locate", False), ("/kvstore.v1.Internal/Call", True)]:
                            try:
                                if streaming:
                                    got = b"".join([r async for r in ch.unary_stream(path)(b"", timeout=5)])
                                else:
                                    got = await ch.unary_unary(path)(b"", timeout=5)
                                out.append((who, path, got.decode()))
                            except grpc.aio.AioRpcError as exc:
                                out.append((who, path, exc.code().name))
            finally:
                await server.stop(0)
            return out
        finally:
            await asyncio.get_running_loop().run_in_executor(None, pool.shutdown)

    results = asyncio.run(main())
    assert results == [
        ("admin", "/kvstore.v1.Admin/Command", "async"),
        ("admin", "/kvstore.v1.Admin/Status", "async-stream"),
        ("admin", "/kvstore.v1.Admin/Locate", "sync"),
        ("admin", "/kvstore.v1.Internal/Call", "PERMISSION_DENIED"),
        ("nobody", "/kvstore.v1.Admin/Command", "PERMISSION_DENIED"),
        ("nobody", "/kvstore.v1.Admin/Status", "PERMISSION_DENIED"),
        ("nobody", "/kvstore.v1.Admin/Locate", "PERMISSION_DENIED"),
        ("nobody", "/kvstore.v1.Internal/Call", "PERMISSION_DENIED"),
    ]

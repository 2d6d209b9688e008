"""Certificates, bearer tokens, the per-method role table and the identity check, without a
network: kvstore/certs.py, kvstore/tls.py, kvstore/node/auth.py, TLS settings in the config."""
from __future__ import annotations

import argparse
import ipaddress
from pathlib import Path

import pytest
from cryptography import x509

from kvstore import certs, config
from kvstore._proto import admin_pb2, internal_pb2, kv_pb2
from kvstore.certs import CertError, Identity
from kvstore.cli import connect
from kvstore.errors import PermissionDenied, Unauthenticated
from kvstore.node.auth import (ANY, METHOD_ROLES, NODE, TOKEN_RECHECK_S, Authorizer, TokenFile, TokenTable,
                               load_security, required_role)
from kvstore.tls import TlsFiles

TOKEN = "t" * 24


@pytest.fixture
def ca(tmp_path: Path) -> Path:
    d = tmp_path / "pki"
    certs.init_ca(d)
    return d


def test_ca_and_issued_certificates_carry_kind_roles_and_hosts(ca: Path) -> None:
    assert (ca / "ca.key").stat().st_mode & 0o777 == 0o600
    assert ca.stat().st_mode & 0o777 == 0o700
    crt, key = certs.issue(ca, "n1", "node", hosts=["10.0.0.7", "db1.example"])
    assert key.stat().st_mode & 0o777 == 0o600
    cert = certs.load_cert(crt)
    assert certs.identity_of(cert) == Identity("node", "n1")
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.7")]
    assert san.get_values_for_type(x509.DNSName) == ["db1.example"]
    certs.issue(ca, "ops", "client", roles=["admin", "read"])
    assert certs.check_issued(ca / "ops.crt", ca / "ca.crt", "cert") == Identity("client", "ops",
                                                                                frozenset({"read", "admin"}))


def test_default_node_hosts_are_loopback(ca: Path) -> None:
    crt, _ = certs.issue(ca, "n1", "node")
    san = certs.load_cert(crt).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(v) for v in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]


@pytest.mark.parametrize("kwargs,message", [
    ({"name": "a/b", "kind": "node"}, "name: 'a/b' must be"),
    ({"name": "ca", "kind": "node"}, "name: 'ca' is the CA's own file name"),
    ({"name": "x", "kind": "robot"}, "kind: 'robot' is not node or client"),
    ({"name": "x", "kind": "client", "roles": ["read", "root"]}, "roles: root unknown"),
    ({"name": "x", "kind": "node", "roles": ["read"]}, "roles: node certificates carry no roles"),
    ({"name": "x", "kind": "client", "hosts": ["10.0.0.1"]}, "host: only node certificates"),
    ({"name": "x", "kind": "node", "hosts": ["bad host!"]}, "host: 'bad host!'"),
    ({"name": "x", "kind": "node", "days": 0}, "days: 0 must be >= 1"),
])
def test_issue_rejects_bad_input_naming_the_field(ca: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(CertError, match=message):
        certs.issue(ca, **kwargs)


def test_existing_files_are_kept_unless_forced(ca: Path) -> None:
    with pytest.raises(CertError, match="already has a cluster CA"):
        certs.init_ca(ca)
    crt, _ = certs.issue(ca, "n1", "node")
    before = crt.read_bytes()
    with pytest.raises(CertError, match="n1.crt exists"):
        certs.issue(ca, "n1", "node")
    certs.issue(ca, "n1", "node", force=True)
    assert crt.read_bytes() != before


def test_certificate_of_another_ca_and_loose_key_modes_are_refused(ca: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    certs.init_ca(other)
    certs.issue(other, "n1", "node")
    with pytest.raises(CertError, match="tls_cert_file: .* was not signed by the CA"):
        certs.check_issued(other / "n1.crt", ca / "ca.crt", "tls_cert_file")
    certs.issue(ca, "n1", "node")
    (ca / "n1.key").chmod(0o644)
    with pytest.raises(CertError, match="key_file: .* has mode 644; a private key must be 0600"):
        TlsFiles.from_dir(ca, "n1").load()


def test_a_certificate_without_the_kvstore_subject_names_no_identity(ca: Path) -> None:
    cert = certs.load_cert(ca / "ca.crt")  # CN and O, but no kind
    with pytest.raises(CertError, match="not a kvstore node or client certificate"):
        certs.identity_of(cert)


def _config(ca: Path, **changes: object) -> config.NodeConfig:
    files = TlsFiles.from_dir(ca, "n1")
    settings = {"tls_ca_file": files.ca_file, "tls_cert_file": files.cert_file, "tls_key_file": files.key_file}
    return config.BASE.replace(**{**settings, **changes})


def test_config_needs_tls_or_an_explicit_insecure(ca: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tls_cert_file: no TLS settings.*or insecure = true"):
        config.BASE.validate()
    assert config.BASE.replace(insecure=True).validate().tls_enabled is False
    assert config.profile("test").validate().insecure  # in-process test nodes
    with pytest.raises(ValueError, match="tls_key_file: required with TLS"):
        _config(ca, tls_key_file="").validate()
    with pytest.raises(ValueError, match="auth_tokens_file: bearer tokens need TLS"):
        config.BASE.replace(insecure=True, auth_tokens_file=str(tmp_path / "t")).validate()
    assert _config(ca, insecure=True).validate().tls_enabled  # TLS settings win


def test_a_node_refuses_a_client_certificate_as_its_own(ca: Path) -> None:
    certs.issue(ca, "n1", "client", roles=["read"])
    with pytest.raises(CertError, match="tls_cert_file: .* is a client certificate"):
        load_security(_config(ca).validate())


def _tokens(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "tokens.toml"
    path.write_text(text)
    path.chmod(mode)
    return path


def test_tokens_file_maps_tokens_to_identities(tmp_path: Path) -> None:
    table = TokenTable.load(_tokens(tmp_path, f'[[tokens]]\ntoken = "{TOKEN}"\nname = "ci"\nroles = ["read"]\n'))
    assert table.lookup(TOKEN) == Identity("client", "ci", frozenset({"read"}))
    assert table.lookup(TOKEN + "x") is None
    assert table.lookup(TOKEN[:-1]) is None


def test_tokens_file_changes_take_effect_and_a_broken_change_keeps_the_old_table(ca: Path, tmp_path: Path) -> None:
    now = [0.0]
    entry = '[[tokens]]\ntoken = "{}"\nname = "{}"\nroles = ["read"]\n'
    path = _tokens(tmp_path, entry.format(TOKEN, "old"))
    tokens = TokenFile(path, clock=lambda: now[0])
    auth = Authorizer(tokens)
    header = [("authorization", "Bearer " + "n" * 20)]
    path.write_text(entry.format("n" * 20, "new"))  # the old token revoked, a new one added
    assert tokens.current().lookup(TOKEN) is not None  # not looked at again yet
    now[0] += TOKEN_RECHECK_S
    assert tokens.current().lookup(TOKEN) is None
    assert auth.check("/kvstore.v1.KV/Get", _ctx(ca, "r", "client"), header).name == "new"
    path.write_text("not toml [")
    now[0] += TOKEN_RECHECK_S
    assert tokens.current().lookup("n" * 20) == Identity("client", "new", frozenset({"read"}))


@pytest.mark.parametrize("text,mode,message", [
    (f'[[tokens]]\ntoken = "{TOKEN}"\nname = "ci"\n', 0o644, "has mode 644; a tokens file must be 0600"),
    ('[[tokens]]\ntoken = "short"\nname = "ci"\n', 0o600, r"tokens\[0\].token: must be at least 16"),
    (f'[[tokens]]\ntoken = "{TOKEN}"\nname = "ci"\nroles = ["god"]\n', 0o600, r"tokens\[0\].roles: god unknown"),
    (f'[[tokens]]\ntoken = "{TOKEN}"\nname = "a b"\n', 0o600, r"tokens\[0\].name: 'a b'"),
    (f'[[tokens]]\ntoken = "{TOKEN}"\nname = "a"\n[[tokens]]\ntoken = "{TOKEN}"\nname = "b"\n', 0o600,
     r"tokens\[1\].token: the same token appears twice"),
    ("tokens = nope", 0o600, "is not valid TOML"),
])
def test_bad_tokens_files_are_refused_naming_the_entry(tmp_path: Path, text: str, mode: int, message: str) -> None:
    with pytest.raises(CertError, match=message):
        TokenTable.load(_tokens(tmp_path, text, mode))


def test_every_kvstore_method_has_a_deliberate_role() -> None:
    services = [kv_pb2.DESCRIPTOR.services_by_name["KV"], admin_pb2.DESCRIPTOR.services_by_name["Admin"],
                internal_pb2.DESCRIPTOR.services_by_name["Internal"]]
    methods = {f"/{s.full_name}/{m.name}" for s in services for m in s.methods}
    assert methods == set(METHOD_ROLES)
    assert required_role("/kvstore.v1.KV/Put") == "write" and required_role("/kvstore.v1.KV/Get") == "read"
    assert required_role("/kvstore.v1.Admin/Command") == "admin"
    assert required_role("/kvstore.v1.Internal/Stream") == NODE
    assert required_role("/grpc.health.v1.Health/Check") == ANY
    assert required_role("/some.new.Service/Method") == "admin"  # closed until decided


def _ctx(ca: Path, name: str, kind: str, roles: tuple[str, ...] = ()) -> dict[str, list[bytes]]:
    crt, _ = certs.issue(ca, name, kind, roles=roles, force=True)
    return {"x509_pem_cert": [crt.read_bytes()]}


def test_authorizer_decides_by_kind_role_and_token(ca: Path, tmp_path: Path) -> None:
    auth = Authorizer(TokenTable([(TOKEN, Identity("client", "tok", frozenset({"write"})))]))
    node, reader = _ctx(ca, "n1", "node"), _ctx(ca, "r", "client", ("read",))
    assert auth.check("/kvstore.v1.Internal/Stream", node, ()).name == "n1"
    assert auth.check("/kvstore.v1.Admin/Command", node, ()).is_node  # nodes may do everything
    assert auth.check("/kvstore.v1.KV/Get", reader, ()).name == "r"
    assert auth.check("/grpc.health.v1.Health/Check", _ctx(ca, "z", "client"), ()).name == "z"
    with pytest.raises(PermissionDenied, match="Internal/Stream is for cluster nodes only"):
        auth.check("/kvstore.v1.Internal/Stream", reader, [("authorization", f"Bearer {TOKEN}")])
    with pytest.raises(PermissionDenied, match="'r' lacks the write role needed for KV/Put \\(it has: read\\)"):
        auth.check("/kvstore.v1.KV/Put", reader, ())
    assert auth.check("/kvstore.v1.KV/Put", reader, [("authorization", f"Bearer {TOKEN}")]).name == "tok"
    with pytest.raises(PermissionDenied, match="'tok' lacks the read role"):  # the token replaces the cert
        auth.check("/kvstore.v1.KV/Get", reader, [("authorization", f"Bearer {TOKEN}")])
    with pytest.raises(Unauthenticated, match="bearer token not recognized"):
        auth.check("/kvstore.v1.KV/Get", reader, [("authorization", "Bearer nope")])
    with pytest.raises(Unauthenticated, match="expected 'Bearer <token>'"):
        auth.check("/kvstore.v1.KV/Get", reader, [("authorization", "Basic abc")])
    with pytest.raises(Unauthenticated, match="no client certificate"):
        auth.check("/kvstore.v1.KV/Get", {}, ())
    ca_pem = (ca / "ca.crt").read_bytes()
    with pytest.raises(Unauthenticated, match="names no kvstore node or client identity"):
        auth.check("/kvstore.v1.KV/Get", {"x509_pem_cert": [ca_pem], "x509_subject": [b"CN=x"]}, ())


def _args(**kw: object) -> argparse.Namespace:
    base = {"cluster_dir": None, "tls_ca": None, "tls_cert": None, "tls_key": None, "token": None}
    return argparse.Namespace(**{**base, **kw})


def test_cli_security_flags_resolve_cluster_dir_and_overrides(tmp_path: Path) -> None:
    assert connect.client_options(_args()) == {}
    with pytest.raises(CertError, match="--token: a bearer token needs TLS"):
        connect.client_options(_args(token=TOKEN))
    with pytest.raises(CertError, match="--tls-cert: required with TLS"):
        connect.tls_files(_args(tls_ca="ca.crt"))
    with pytest.raises(CertError, match="--cluster-dir: .* has no ca.crt"):
        connect.tls_files(_args(cluster_dir=tmp_path))
    d = tmp_path / "certs"
    certs.init_ca(d)
    certs.issue(d, "admin", "client", roles=certs.ROLES)
    certs.issue(d, "me", "client", roles=["read"])
    files = connect.tls_files(_args(cluster_dir=tmp_path, tls_cert=str(d / "me.crt"), tls_key=str(d / "me.key")))
    assert files == TlsFiles(str(d / "ca.crt"), str(d / "me.crt"), str(d / "me.key"))
    options = connect.client_options(_args(cluster_dir=tmp_path, token=TOKEN))
    assert options["tls"].identity.name == "admin" and options["token"] == TOKEN

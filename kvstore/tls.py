"""TLS material for gRPC: loading a CA, certificate and key from files (with errors naming the
field at fault) and turning them into channel and server credentials, for nodes and clients alike.

Making certificates and reading identities out of them is kvstore/certs.py; deciding what an
identity may do is kvstore/node/auth.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import grpc

from kvstore.certs import CA_NAME, CertError, Identity, check_issued, load_private_key

CLUSTER_CERTS_DIR = "certs"   # <cluster dir>/certs holds a local cluster's CA and certificates
ADMIN_CERT_NAME = "admin"     # the client certificate (read, write, admin) a local cluster makes


@dataclass(frozen=True)
class TlsFiles:
    """Where a node's or a client's TLS material is: the cluster CA, its own certificate and key."""

    ca_file: str
    cert_file: str
    key_file: str

    @classmethod
    def from_dir(cls, directory: Path | str, name: str) -> "TlsFiles":
        """ca.crt, NAME.crt and NAME.key in a directory made by `kvstore certs`."""
        d = Path(directory)
        return cls(str(d / f"{CA_NAME}.crt"), str(d / f"{name}.crt"), str(d / f"{name}.key"))

    @classmethod
    def for_cluster(cls, cluster_dir: Path | str, name: str = ADMIN_CERT_NAME) -> "TlsFiles":
        """A local cluster's (scripts/cluster, LocalCluster) certificate NAME, admin by default."""
        return cls.from_dir(Path(cluster_dir) / CLUSTER_CERTS_DIR, name)

    def load(self, fields: Sequence[str] = ("ca_file", "cert_file", "key_file")) -> "TlsMaterial":
        """Read and check the files: the CA signed the certificate, it is valid now, the key is
        0600. `fields` names the three settings in error messages (config keys or CLI flags)."""
        ca_field, cert_field, key_field = fields
        for field, path in zip(fields, (self.ca_file, self.cert_file, self.key_file)):
            if not path:
                raise CertError(f"{field}: required with TLS (set all of {', '.join(fields)})")
        identity = check_issued(self.cert_file, self.ca_file, cert_field, ca_field)
        load_private_key(self.key_file, key_field)  # mode 0600, parseable
        try:
            ca, cert, key = (Path(p).read_bytes() for p in (self.ca_file, self.cert_file, self.key_file))
        except OSError as exc:
            raise CertError(f"{exc.filename}: {exc.strerror}") from None
        return TlsMaterial(ca, cert, key, identity)


@dataclass(frozen=True)
class TlsMaterial:
    """Loaded PEM bytes and the identity the certificate carries."""

    ca: bytes
    cert: bytes
    key: bytes
    identity: Identity

    def channel_credentials(self, token: str | None = None) -> grpc.ChannelCredentials:
        """Credentials of an outbound channel: verify the server against the cluster CA, present
        our certificate, and (with a token) send `authorization: Bearer <token>` on every call."""
        creds = grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key,
                                             certificate_chain=self.cert)
        if token:
            creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(token))
        return creds

    def server_credentials(self) -> grpc.ServerCredentials:
        """Server credentials that require a client certificate signed by the cluster CA."""
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.ca,
                                           require_client_auth=True)


def client_credentials(tls: TlsFiles | TlsMaterial | None, token: str | None) -> grpc.ChannelCredentials | None:
    """A client's channel credentials (None: plaintext). A token needs TLS: over plaintext it
    would cross the network readable, and nodes accept tokens only over TLS anyway."""
    if token is not None and not token.strip():
        raise CertError("token: empty")
    if tls is None:
        if token:
            raise CertError("token: a bearer token needs TLS (pass tls=TlsFiles(ca, cert, key))")
        return None
    material = tls.load(("tls.ca_file", "tls.cert_file", "tls.key_file")) if isinstance(tls, TlsFiles) else tls
    return material.channel_credentials(token)


def channel(address: str, options: Sequence[tuple[str, Any]], credentials: grpc.ChannelCredentials | None) -> grpc.Channel:
    """A blocking-API channel: TLS when credentials are given, else plaintext."""
    if credentials is None:
        return grpc.insecure_channel(address, options=list(options))
    return grpc.secure_channel(address, credentials, options=list(options))


def aio_channel(address: str, options: Sequence[tuple[str, Any]],
                credentials: grpc.ChannelCredentials | None) -> grpc.aio.Channel:
    """A grpc.aio channel (create it on the loop that uses it): TLS when credentials are given."""
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=list(options))
    return grpc.aio.secure_channel(address, credentials, options=list(options))

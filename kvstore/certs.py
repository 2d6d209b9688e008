"""Certificates of a kvstore cluster: creating the cluster CA and the node and client certificates
it signs (`kvstore certs`), and reading back what a certificate says about its holder.

What a certificate says lives in its subject, so `openssl x509 -noout -subject` shows it:

    CN=<name>, O=kvstore, OU=node                               a node (may gossip and replicate)
    CN=<name>, O=kvstore, OU=client, OU=role:read, OU=role:...  a client with its roles

The kind is the OU that is exactly "node" or "client"; each role is an OU "role:<role>" with role
one of read, write, admin (independent: admin does not imply write). Only the cluster CA can put
these in a certificate the nodes accept. Node certificates carry subject alternative names for
the addresses peers and clients dial (IP addresses and DNS names) and both server and client
extended key usage; client certificates carry client usage only. Keys are ECDSA P-256 (every TLS
stack gRPC builds on supports it), written with mode 0600.
"""
from __future__ import annotations

import datetime
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ROLES = ("read", "write", "admin")
KINDS = ("node", "client")
ORGANIZATION = "kvstore"
ROLE_PREFIX = "role:"
CA_NAME = "ca"
CA_DAYS = 3650          # the CA outlives every certificate it signs; rotating it means re-issuing all
LEAF_DAYS = 365         # node and client certificates: a year, then `kvstore certs issue` again
DEFAULT_NODE_HOSTS = ("127.0.0.1", "localhost")  # a node certificate without --host serves loopback
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # names become file names
_CLOCK_SKEW = datetime.timedelta(minutes=5)  # valid from a little before now: peers' clocks differ


class CertError(ValueError):
    """A certificate or key cannot be made, found or used; the message names the file or field."""


@dataclass(frozen=True)
class Identity:
    """Who a certificate (or a bearer token) speaks for."""

    kind: str                      # "node" or "client"
    name: str
    roles: frozenset[str] = frozenset()

    @property
    def is_node(self) -> bool:
        return self.kind == "node"


def check_name(name: str) -> str:
    if not _NAME_RE.match(name or ""):
        raise CertError(f"name: {name!r} must be 1-64 letters, digits, '.', '_' or '-' (it names files)")
    return name


def parse_roles(text: str | Iterable[str]) -> frozenset[str]:
    """Roles from "read,write" or an iterable; unknown roles are an error naming them."""
    items = [r.strip() for r in (text.split(",") if isinstance(text, str) else text)]
    roles = frozenset(r for r in items if r)
    unknown = sorted(roles - set(ROLES))
    if unknown:
        raise CertError(f"roles: {', '.join(unknown)} unknown (roles are {', '.join(ROLES)})")
    return roles


def identity_of(cert: x509.Certificate) -> Identity:
    """The identity a certificate carries (see the module docstring); CertError when it has none."""
    subject = cert.subject
    names = [a.value for a in subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    units = [str(a.value) for a in subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)]
    kinds = [u for u in units if u in KINDS]
    if len(names) != 1 or len(kinds) != 1:
        raise CertError(f"certificate {subject.rfc4514_string()!r} is not a kvstore node or client certificate "
                        "(needs one CN and one OU of node or client)")
    roles = frozenset(u[len(ROLE_PREFIX):] for u in units if u.startswith(ROLE_PREFIX)) & set(ROLES)
    return Identity(kinds[0], str(names[0]), roles if kinds[0] == "client" else frozenset())


def identity_of_pem(pem: bytes) -> Identity:
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise CertError(f"not a PEM certificate: {exc}") from None
    return identity_of(cert)


# ---- files -------------------------------------------------------------------------------------


def _write_private(path: Path, data: bytes, overwrite: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise CertError(f"{path} exists: remove it first (or pass --force to replace it)") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)  # an existing file opened with O_TRUNC keeps its old mode otherwise


def _write_public(path: Path, data: bytes, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise CertError(f"{path} exists: remove it first (or pass --force to replace it)")
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def load_cert(path: Path | str, field: str = "certificate") -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes())
    except OSError as exc:
        raise CertError(f"{field}: {path}: {exc.strerror or exc}") from None
    except ValueError:
        raise CertError(f"{field}: {path} is not a PEM certificate") from None


def load_private_key(path: Path | str, field: str = "key") -> ec.EllipticCurvePrivateKey:
    """A PEM private key file that only its owner can read (mode 0600 or stricter)."""
    path = Path(path)
    try:
        mode = path.stat().st_mode & 0o777
        data = path.read_bytes()
    except OSError as exc:
        raise CertError(f"{field}: {path}: {exc.strerror or exc}") from None
    if mode & 0o077:
        raise CertError(f"{field}: {path} has mode {mode:o}; a private key must be 0600 (chmod 600 {path})")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise CertError(f"{field}: {path} is not an unencrypted PEM private key") from None
    return key  # type: ignore[return-value]


# ---- making certificates --------------------------------------------------------------------------


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def init_ca(directory: Path | str, *, days: int = CA_DAYS, force: bool = False,
            common_name: str = "kvstore cluster CA") -> tuple[Path, Path]:
    """Create the cluster CA (ca.crt, ca.key 0600) in `directory` (made 0700); returns the paths."""
    if days < 1:
        raise CertError(f"days: {days} must be >= 1")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    crt, key_path = d / f"{CA_NAME}.crt", d / f"{CA_NAME}.key"
    if not force and (crt.exists() or key_path.exists()):
        raise CertError(f"{crt} exists: this directory already has a cluster CA (--force replaces it, and "
                        "every certificate it signed stops working)")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW).not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private(key_path, _key_pem(key), overwrite=force)
    _write_public(crt, _cert_pem(cert), overwrite=force)
    return crt, key_path


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for host in hosts:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not re.match(r"^[A-Za-z0-9*]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$", host):
                raise CertError(f"host: {host!r} is neither an IP address nor a DNS name") from None
            entries.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(entries)


def issue(directory: Path | str, name: str, kind: str, *, roles: Iterable[str] = (),
          hosts: Sequence[str] = (), days: int = LEAF_DAYS, force: bool = False) -> tuple[Path, Path]:
    """Write NAME.crt and NAME.key (0600) in `directory`, signed by its ca.crt/ca.key."""
    check_name(name)
    if name == CA_NAME:
        raise CertError(f"name: {name!r} is the CA's own file name; choose another")
    if kind not in KINDS:
        raise CertError(f"kind: {kind!r} is not node or client")
    if days < 1:
        raise CertError(f"days: {days} must be >= 1")
    role_set = parse_roles(roles)
    if kind == "node" and role_set:
        raise CertError("roles: node certificates carry no roles (a node may do everything nodes do)")
    if kind == "client" and hosts:
        raise CertError("host: only node certificates name hosts (a client is identified by its name)")
    d = Path(directory)
    ca_cert = load_cert(d / f"{CA_NAME}.crt", "ca")
    ca_key = load_private_key(d / f"{CA_NAME}.key", "ca key")
    key = ec.generate_private_key(ec.SECP256R1())
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, name),
             x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
             x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, kind)]
    attrs += [x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ROLE_PREFIX + r)
              for r in ROLES if r in role_set]
    usage = [ExtendedKeyUsageOID.CLIENT_AUTH] + ([ExtendedKeyUsageOID.SERVER_AUTH] if kind == "node" else [])
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attrs)).issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW).not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), critical=False)
    )
    if kind == "node":
        builder = builder.add_extension(_san(list(hosts) or list(DEFAULT_NODE_HOSTS)), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    crt, key_path = d / f"{name}.crt", d / f"{name}.key"
    if not force and (crt.exists() or key_path.exists()):
        raise CertError(f"{crt} exists: remove it first (or pass --force to replace it)")
    _write_private(key_path, _key_pem(key), overwrite=force)
    _write_public(crt, _cert_pem(cert), overwrite=force)
    return crt, key_path


def check_issued(cert_path: Path | str, ca_path: Path | str, field: str, ca_field: str = "ca",
                 now: datetime.datetime | None = None) -> Identity:
    """The identity of the certificate at cert_path after checking the CA at ca_path signed it and
    that it is valid now: a node refuses to start with a certificate its peers would reject."""
    cert, ca = load_cert(cert_path, field), load_cert(ca_path, ca_field)
    try:
        cert.verify_directly_issued_by(ca)
    except (InvalidSignature, ValueError, TypeError) as exc:
        raise CertError(f"{field}: {cert_path} was not signed by the CA in {ca_path} ({type(exc).__name__})") from None
    now = now or _now()
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise CertError(f"{field}: {cert_path} is valid only from {cert.not_valid_before_utc:%Y-%m-%d %H:%M} "
                        f"to {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    return identity_of(cert)

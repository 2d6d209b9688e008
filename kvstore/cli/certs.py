"""`kvstore certs ...`: make the cluster CA, node and client certificates, and bearer tokens, and
show what a certificate says. The certificate scheme is described in kvstore/certs.py."""
from __future__ import annotations

import argparse
import json
import os
import secrets
from pathlib import Path
from typing import Any

from kvstore import certs
from kvstore.certs import CertError

ACTIONS = ["init", "issue", "token", "show"]


def add_parser(sub: Any) -> None:
    p = sub.add_parser("certs", help="cluster CA, node and client certificates, bearer tokens",
                       description="init: create the cluster CA in --dir. issue: a node or client certificate "
                                   "signed by it. token: a bearer token (appended to --file). show: a "
                                   "certificate's identity and validity.")
    p.add_argument("action", choices=ACTIONS)
    p.add_argument("file", nargs="?", type=Path, help="with show: the certificate file")
    p.add_argument("--dir", type=Path, default=os.environ.get("KVSTORE_CERTS_DIR"),
                   help="directory holding ca.crt/ca.key and the certificates (env KVSTORE_CERTS_DIR)")
    p.add_argument("--name", help="with issue and token: the identity (node name or client name)")
    p.add_argument("--kind", choices=list(certs.KINDS), help="with issue: node or client")
    p.add_argument("--roles", default="", help="with issue --kind client and token: e.g. read,write,admin")
    p.add_argument("--host", action="append", default=[],
                   help="with issue --kind node: an address peers and clients dial (IP or DNS name; repeat). "
                        f"Default: {', '.join(certs.DEFAULT_NODE_HOSTS)}")
    p.add_argument("--days", type=int, default=None,
                   help=f"validity (default {certs.CA_DAYS} for the CA, {certs.LEAF_DAYS} for certificates)")
    p.add_argument("--file", dest="tokens_file", type=Path, help="with token: the tokens file to append to")
    p.add_argument("--force", action="store_true", help="replace existing files")
    p.add_argument("--json", action="store_true")


def _out(args: argparse.Namespace, doc: dict[str, Any], text: str) -> None:
    print(json.dumps(doc, sort_keys=True) if args.json else text)


def _need(value: Any, flag: str, action: str) -> Any:
    if not value:
        raise CertError(f"{flag}: required with `kvstore certs {action}`")
    return value


def run(args: argparse.Namespace) -> int:
    """Exit 0 on success; CertError (a ValueError) propagates to main as a usage error."""
    if args.action == "init":
        crt, key = certs.init_ca(_need(args.dir, "--dir", "init"), days=args.days or certs.CA_DAYS, force=args.force)
        _out(args, {"ca": str(crt), "ca_key": str(key)},
             f"cluster CA: {crt} (key {key}, keep it offline once certificates are issued)")
        return 0
    if args.action == "issue":
        crt, key = certs.issue(_need(args.dir, "--dir", "issue"), _need(args.name, "--name", "issue"),
                               _need(args.kind, "--kind", "issue"), roles=certs.parse_roles(args.roles),
                               hosts=args.host, days=args.days or certs.LEAF_DAYS, force=args.force)
        ident = certs.identity_of(certs.load_cert(crt))
        _out(args, {"cert": str(crt), "key": str(key), "kind": ident.kind, "name": ident.name,
                    "roles": sorted(ident.roles)},
             f"{ident.kind} certificate {crt} (key {key})" + (f", roles {','.join(sorted(ident.roles)) or 'none'}"
                                                             if ident.kind == "client" else ""))
        return 0
    if args.action == "token":
        return _token(args)
    return _show(args)


def _token(args: argparse.Namespace) -> int:
    name = certs.check_name(_need(args.name, "--name", "token"))
    roles = sorted(certs.parse_roles(args.roles))
    token = secrets.token_urlsafe(32)
    if args.tokens_file is not None:
        path: Path = args.tokens_file
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a") as f:
            f.write(f'\n[[tokens]]\ntoken = "{token}"\nname = "{name}"\nroles = {json.dumps(roles)}\n')
        os.chmod(path, 0o600)
    _out(args, {"token": token, "name": name, "roles": roles},
         token if args.tokens_file is None else
         f"{token}\n(added to {args.tokens_file} for {name!r} with roles {','.join(roles) or 'none'}; "
         "nodes started with --auth-tokens-file on it pick it up within a second)")
    return 0


def _show(args: argparse.Namespace) -> int:
    path = _need(args.file, "file", "show")
    cert = certs.load_cert(path, "file")
    try:
        ident: certs.Identity | None = certs.identity_of(cert)
    except CertError:
        ident = None
    from cryptography import x509

    try:
        san = [str(n.value) for n in cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value]
    except x509.ExtensionNotFound:
        san = []
    doc = {"subject": cert.subject.rfc4514_string(), "issuer": cert.issuer.rfc4514_string(),
           "not_before": cert.not_valid_before_utc.isoformat(), "not_after": cert.not_valid_after_utc.isoformat(),
           "hosts": san, "kind": ident.kind if ident else None, "name": ident.name if ident else None,
           "roles": sorted(ident.roles) if ident else []}
    text = "\n".join(f"{k:<10} {', '.join(v) if isinstance(v, list) else v}" for k, v in doc.items())
    _out(args, doc, text)
    return 0


"""How client commands reach a cluster securely: the --cluster-dir, --tls-ca, --tls-cert, --tls-key
and --token flags (and their KVSTORE_* environment variables), turned into Client options.

A flag wins over its environment variable; --tls-* win over the files --cluster-dir
points at (<dir>/certs/ca.crt, admin.crt, admin.key, as `scripts/cluster up` makes them).
No TLS setting at all means plaintext, which a node started with TLS refuses.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from kvstore.certs import CertError
from kvstore.tls import TlsFiles

PLAINTEXT_HINT = ("(no TLS settings were given: if the cluster uses TLS, pass --cluster-dir DIR or "
                  "--tls-ca/--tls-cert/--tls-key, or set KVSTORE_CLUSTER_DIR)")


def add_args(p: argparse.ArgumentParser) -> None:
    env = os.environ.get
    p.add_argument("--cluster-dir", type=Path, default=env("KVSTORE_CLUSTER_DIR") or None,
                   help="a local cluster's dir (scripts/cluster): use its CA and admin client certificate "
                        "(env KVSTORE_CLUSTER_DIR)")
    p.add_argument("--tls-ca", default=env("KVSTORE_TLS_CA") or None,
                   help="cluster CA certificate (env KVSTORE_TLS_CA)")
    p.add_argument("--tls-cert", default=env("KVSTORE_TLS_CERT") or None,
                   help="client certificate, from `kvstore certs issue --kind client` (env KVSTORE_TLS_CERT)")
    p.add_argument("--tls-key", default=env("KVSTORE_TLS_KEY") or None,
                   help="its private key, mode 0600 (env KVSTORE_TLS_KEY)")
    p.add_argument("--token", default=env("KVSTORE_TOKEN") or None,
                   help="bearer token from the nodes' tokens file; prefer the env var KVSTORE_TOKEN "
                        "(command lines are visible to other users)")


def tls_files(args: argparse.Namespace) -> TlsFiles | None:
    base = TlsFiles.for_cluster(args.cluster_dir) if args.cluster_dir else None
    if base is not None and not Path(base.ca_file).exists():
        raise CertError(f"--cluster-dir: {args.cluster_dir} has no {Path(base.ca_file).name} in certs/ "
                        "(was the cluster started with --insecure?)")
    ca = args.tls_ca or (base.ca_file if base else None)
    cert = args.tls_cert or (base.cert_file if base else None)
    key = args.tls_key or (base.key_file if base else None)
    given = {"--tls-ca": ca, "--tls-cert": cert, "--tls-key": key}
    if not any(given.values()):
        return None
    missing = [flag for flag, value in given.items() if not value]
    if missing:
        raise CertError(f"{missing[0]}: required with TLS (give all of --tls-ca, --tls-cert, --tls-key, or --cluster-dir)")
    return TlsFiles(str(ca), str(cert), str(key))


def client_options(args: argparse.Namespace) -> dict[str, Any]:
    """Client(...) keyword arguments for the security flags; CertError names a bad flag."""
    tls = tls_files(args)
    if tls is not None:
        material = tls.load(("--tls-ca", "--tls-cert", "--tls-key"))  # errors name the flag, not the field
        return {"tls": material, "token": args.token}
    if args.token:
        raise CertError("--token: a bearer token needs TLS (--cluster-dir or --tls-ca/--tls-cert/--tls-key)")
    return {}

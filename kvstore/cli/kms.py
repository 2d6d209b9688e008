"""`kvstore kms ...`: manage the cluster's key-encryption keys in a keyring file, and start the
re-wrap of stored data keys on nodes. Nodes that use the keyring pick changes up within their
kms_check_interval_s."""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import msgpack

COMMANDS = ["init", "create-key", "list", "describe", "rotate", "rewrap", "disable", "enable",
            "disable-version", "enable-version", "schedule-deletion", "cancel-deletion"]


def add_parser(sub: Any) -> None:
    kms = sub.add_parser("kms", help="key-encryption keys: create, rotate, disable, rewrap ...")
    kms.add_argument("action", choices=COMMANDS)
    kms.add_argument("key", nargs="?", help="key id or alias (alias/NAME)")
    kms.add_argument("--keyring", type=Path, default=os.environ.get("KVSTORE_KEYRING"),
                     help="keyring file (env KVSTORE_KEYRING)")
    kms.add_argument("--root-key-file", type=Path, default=None,
                     help="0600 root key file (default: $KVSTORE_ROOT_KEY)")
    kms.add_argument("--alias", help="with create-key: an alias (alias/NAME)")
    kms.add_argument("--version", type=int, help="with disable-version/enable-version")
    kms.add_argument("--days", type=int, default=30, help="with schedule-deletion: 7..30")
    kms.add_argument("--address", "-a", default=os.environ.get("KVSTORE_ADDRESS", "127.0.0.1:7000"),
                     help="with rewrap: nodes to re-wrap (each rewrites its own records)")
    kms.add_argument("--rate", type=float, default=None, help="with rewrap: records per second per node")
    kms.add_argument("--json", action="store_true")
    from kvstore.cli import connect

    connect.add_args(kms)  # with rewrap: how to reach the nodes


def _meta(meta: Any) -> dict[str, Any]:
    doc = asdict(meta)
    return json.loads(json.dumps(doc, default=lambda o: getattr(o, "value", str(o))))


def run(args: argparse.Namespace) -> int:
    from kvstore.kms import LocalKms, load_root_key
    from kvstore.kms.setup import provision

    def out(doc: Any, text: str) -> None:
        print(json.dumps(doc, sort_keys=True) if args.json else text)

    if args.action == "rewrap":
        return _rewrap(args)
    if args.keyring is None:
        print("kvstore kms: --keyring (or KVSTORE_KEYRING) is required", file=sys.stderr)
        return 2
    if args.action == "init":
        if args.root_key_file is None:
            print("kvstore kms init: --root-key-file is required (it is created 0600 if missing)", file=sys.stderr)
            return 2
        if args.keyring.parent != args.root_key_file.parent:
            print("kvstore kms init: keep --keyring and --root-key-file in one directory", file=sys.stderr)
            return 2
        keys = provision(args.keyring.parent, args.key or "alias/kvstore")
        out({"keyring": str(keys.keyring), "root_key_file": str(keys.root_key_file), "alias": keys.alias},
            f"keyring {keys.keyring} holds {keys.alias}; start nodes with: {' '.join(keys.node_args())}")
        return 0
    kms = LocalKms.open(args.keyring, load_root_key(args.root_key_file))
    if args.action == "list":
        metas = kms.list_keys()
        out([_meta(m) for m in metas], "\n".join(
            f"{m.key_id}  {m.state.value:<16} primary v{m.primary_version}  {' '.join(m.aliases)}" for m in metas))
        return 0
    if args.action == "create-key":
        meta = kms.create_key(alias=args.alias)
        out(_meta(meta), f"created {meta.key_id} {' '.join(meta.aliases)}")
        return 0
    if not args.key:
        print(f"kvstore kms {args.action}: a key id or alias is required", file=sys.stderr)
        return 2
    key = kms.describe(args.key).key_id
    actions = {
        "describe": lambda: kms.describe(key),
        "rotate": lambda: kms.rotate(key),
        "disable": lambda: kms.disable(key),
        "enable": lambda: kms.enable(key),
        "disable-version": lambda: kms.disable_version(key, _need_version(args)),
        "enable-version": lambda: kms.enable_version(key, _need_version(args)),
        "schedule-deletion": lambda: kms.schedule_deletion(key, args.days),
        "cancel-deletion": lambda: kms.cancel_deletion(key),
    }
    meta = actions[args.action]()
    versions = ", ".join(f"v{v.version} {v.state.value}" for v in meta.versions)
    out(_meta(meta), f"{meta.key_id}  {meta.state.value}  primary v{meta.primary_version}  ({versions})")
    return 0


def _need_version(args: argparse.Namespace) -> int:
    if args.version is None:
        raise ValueError("--version is required")
    return args.version


def _rewrap(args: argparse.Namespace) -> int:
    from kvstore.cli import connect
    from kvstore.client import SyncClient

    params = {} if args.rate is None else {"rate_per_s": args.rate}
    reports = {}
    with SyncClient(args.address, timeout_s=3600, **connect.client_options(args)) as kv:
        for address in args.address.split(","):
            payload = kv.command("rewrap", params, address=address)
            reports[address] = msgpack.unpackb(payload, raw=False)
    if args.json:
        print(json.dumps(reports, sort_keys=True))
    else:
        for address, r in reports.items():
            print(f"{address}: scanned {r['scanned']} records, re-wrapped {r['rewrapped']}, hints {r['hints_rewrapped']}")
    return 0

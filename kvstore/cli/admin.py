"""Operator commands that change the cluster: decommission, abort-join, removenode, drop-hints,
cleanup, repair.
Destructive ones ask for confirmation (or --yes); long ones show a progress bar while waiting."""
from __future__ import annotations

import argparse
import json
import sys
import threading
from typing import Any, Callable

import msgpack

from kvstore.errors import KvError


def add_parsers(sub: Any, add_client_args: Callable[[argparse.ArgumentParser], None]) -> None:
    dec = sub.add_parser("decommission", help="stream the contacted node's data away, then remove it")
    dec.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    add_client_args(dec)
    abort = sub.add_parser("abort-join", help="roll back the contacted node's join: it stops streaming, leaves and stops")
    abort.add_argument("--yes", action="store_true")
    add_client_args(abort)
    drop = sub.add_parser("drop-hints", help="delete the hints the contacted node holds for TARGET (then repair it)")
    drop.add_argument("target", help="node id the hints are for")
    drop.add_argument("--yes", action="store_true")
    add_client_args(drop)
    rem = sub.add_parser("removenode", help="remove a dead node; survivors re-replicate its ranges")
    rem.add_argument("node_id")
    rem.add_argument("--yes", action="store_true")
    add_client_args(rem)
    clean = sub.add_parser("cleanup", help="delete data the contacted node no longer replicates")
    clean.add_argument("--yes", action="store_true")
    add_client_args(clean)
    rep = sub.add_parser("repair", help="Merkle anti-entropy: make the contacted node's replicas agree")
    rep.add_argument("--range", help="only this token range, as START:END")
    add_client_args(rep)


def _confirm(args: argparse.Namespace, question: str) -> bool:
    if args.yes:
        return True
    if not sys.stdin.isatty():
        print(f"kvstore {args.command}: {question} -- pass --yes to confirm non-interactively", file=sys.stderr)
        return False
    return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")


def _with_progress(kv: Any, address: str, run: Callable[[], bytes], show: bool) -> bytes:
    """Run a long admin command while a progress bar follows the node's stream progress."""
    if not show:
        return run()
    from tqdm import tqdm

    done = threading.Event()
    result: list[Any] = []

    def worker() -> None:
        try:
            result.append(run())
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            result.append(exc)
        finally:
            done.set()

    threading.Thread(target=worker, daemon=True).start()
    with tqdm(unit="key", file=sys.stderr) as bar:
        while not done.wait(0.5):
            try:
                p = kv.status(address).get("stream") or {}
            except KvError:
                continue
            if p.get("total_keys"):
                bar.total = p["total_keys"]
            bar.n = p.get("keys", 0)
            bar.set_postfix_str(f"{p.get('mb_per_s', 0):.1f} MB/s {p.get('state', '')}")
            bar.refresh()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


def run(args: argparse.Namespace) -> int:
    from kvstore.cli import connect
    from kvstore.client import SyncClient

    address = args.address.split(",")[0]
    with SyncClient(args.address, timeout_s=args.timeout, **connect.client_options(args)) as kv:
        if args.command == "decommission":
            if not _confirm(args, f"decommission the node at {address} (it streams its data away and leaves)?"):
                return 2
            name, params = "decommission", {}
        elif args.command == "abort-join":
            if not _confirm(args, f"abort the join of the node at {address} (it leaves and stops)?"):
                return 2
            name, params = "abort-join", {}
        elif args.command == "drop-hints":
            if not _confirm(args, f"drop every hint {address} holds for {args.target} (repair it afterwards)?"):
                return 2
            name, params = "drop-hints", {"target": args.target}
        elif args.command == "removenode":
            if not _confirm(args, f"remove node {args.node_id} for good (its id can never rejoin)?"):
                return 2
            name, params = "removenode", {"node_id": args.node_id}
        elif args.command == "cleanup":
            if not _confirm(args, f"delete every record {address} no longer replicates?"):
                return 2
            name, params = "cleanup", {}
        else:
            name, params = "repair", {}
            if args.range:
                start, _, end = args.range.partition(":")
                params = {"range": [int(start), int(end)]}
        payload = _with_progress(kv, address, lambda: kv.command(name, params, address=address, timeout_s=24 * 3600),
                                 show=sys.stderr.isatty() and not args.json)
    report = msgpack.unpackb(payload, raw=False)
    print(json.dumps(report, sort_keys=True, default=str) if args.json else _text(name, report))
    return 0


def _text(name: str, report: dict[str, Any]) -> str:
    if name == "decommission":
        return f"decommissioned: streamed {report.get('streamed', 0)} records; the node has left"
    if name == "abort-join":
        if not report.get("aborted"):
            return f"abort-join requested; the node had not left yet: {json.dumps(report, default=str)}"
        return f"join aborted after {report.get('keys', 0)} streamed records; the node has left and stopped"
    if name == "drop-hints":
        return f"dropped {report.get('dropped', 0)} hints; run `kvstore repair` on that node to bring it up to date"
    if name == "removenode":
        total = sum(v for v in report.get("streamed", {}).values() if isinstance(v, int))
        return f"removed {report['removed']}: survivors re-replicated {total} records"
    if name == "cleanup":
        return f"deleted {report.get('deleted', 0)} records this node no longer replicates"
    return json.dumps(report, sort_keys=True, default=str)

"""`kvstore` command: run a node, talk to a cluster, inspect it.

Exit codes scripts can rely on: 0 ok, 1 not found, 2 usage, 3 unavailable or timed out,
4 stale context (conditional put failed), 5 invalid argument, 6 resource exhausted,
7 data loss, 8 not authenticated or not permitted, 9 any other error.
"""
from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from kvstore import errors

EXIT_CODES: dict[type[errors.KvError], int] = {
    errors.NotFound: 1,
    errors.Unavailable: 3,
    errors.DeadlineExceeded: 3,
    errors.StaleContext: 4,
    errors.InvalidArgument: 5,
    errors.ResourceExhausted: 6,
    errors.DataLoss: 7,
    errors.Unauthenticated: 8,
    errors.PermissionDenied: 8,
}
EXIT_OTHER = 9
DEFAULT_ADDRESS = "127.0.0.1:7000"


def _add_client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", "-a", default=os.environ.get("KVSTORE_ADDRESS", DEFAULT_ADDRESS),
                   help="host:port[,host:port...] of nodes to contact (env KVSTORE_ADDRESS)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per request")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    from kvstore.cli import connect

    connect.add_args(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvstore", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    node = sub.add_parser("node", help="run a node")
    node.add_argument("--config", type=Path, help="TOML file of NodeConfig settings")
    node.add_argument("--profile", choices=["lan", "local", "test"], default=None)
    node.add_argument("--data-dir", type=Path)
    node.add_argument("--listen", help="host:port to bind (port 0: any free port)")
    node.add_argument("--advertise", help="host:port peers and clients should dial")
    node.add_argument("--node-id")
    node.add_argument("--zone")
    node.add_argument("--seeds", help="host:port,... of cluster members to join through")
    node.add_argument("--storage", choices=["sqlite", "memory"])
    node.add_argument("--fsync", choices=["always", "batch", "never"])
    node.add_argument("--replication-factor", type=int)
    node.add_argument("--encryption", choices=["kms", "none"], help="seal values at rest (default kms)")
    node.add_argument("--kms-keyring", help="keyring file, outside the data dir (kvstore kms init)")
    node.add_argument("--kms-root-key-file", help="0600 root key file (default: $KVSTORE_ROOT_KEY)")
    node.add_argument("--kms-key", help="the cluster KEK, id or alias (default alias/kvstore)")
    node.add_argument("--tls-ca", help="cluster CA certificate: peers and clients need certificates it signed")
    node.add_argument("--tls-cert", help="this node's certificate (kvstore certs issue --kind node)")
    node.add_argument("--tls-key", help="its private key (mode 0600)")
    node.add_argument("--auth-tokens-file", help="bearer tokens file (kvstore certs token --file)")
    node.add_argument("--insecure", action="store_true", default=None,
                      help="serve plaintext without authentication when no --tls-* is given")
    node.add_argument("--test-hooks", action="store_true", default=None, help=argparse.SUPPRESS)
    node.add_argument("--test-drop-writes", action="store_true", default=None, help=argparse.SUPPRESS)
    node.add_argument("--log-level", default="INFO")
    node.add_argument("--log-format", choices=["text", "json"], help="json: one object per line (default text)")
    node.add_argument("--metrics-listen",
                      help="Prometheus metrics: host:port, off, or auto (127.0.0.1 at listen port + 1000)")
    node.add_argument("--ready-file", type=Path, help="write the advertised address here once serving")

    put = sub.add_parser("put", help="store a value")
    put.add_argument("key")
    src = put.add_mutually_exclusive_group()
    src.add_argument("value", nargs="?", help="the value (omit to read stdin)")
    src.add_argument("--file", type=Path, help="read the value from a file")
    put.add_argument("--w", default=None, help="one | quorum | all | N")
    put.add_argument("--ttl", type=int, default=0, help="seconds until the value expires")
    put.add_argument("--context", default="", help="hex context from a previous get")
    put.add_argument("--if-current", action="store_true",
                     help="fail (exit 4) unless --context is still current")
    _add_client_args(put)

    get = sub.add_parser("get", help="read a value")
    get.add_argument("key")
    get.add_argument("--r", default=None, help="one | quorum | all | N")
    get.add_argument("--siblings", action="store_true", help="print every sibling, not the resolved value")
    _add_client_args(get)

    delete = sub.add_parser("delete", help="delete a key")
    delete.add_argument("key")
    delete.add_argument("--w", default=None)
    delete.add_argument("--context", default="")
    _add_client_args(delete)

    status = sub.add_parser("status", help="cluster members as a node sees them")
    status.add_argument("--all", action="store_true", help="every node's own view")
    _add_client_args(status)

    ring = sub.add_parser("ring", help="tokens and ownership")
    ring.add_argument("--png", type=Path, metavar="FILE", help="draw the ring as a PNG picture")
    ring.add_argument("--svg", type=Path, metavar="FILE", help="draw the ring as an SVG picture")
    ring.add_argument("--key", default="", help="with --png/--svg: mark this key's token and replicas")
    _add_client_args(ring)

    bench = sub.add_parser("bench", help="load generator: ops/s and latency percentiles")
    bench.add_argument("--duration", type=float, default=10.0, help="seconds")
    bench.add_argument("--ops", type=int, default=0, help="stop after this many ops (0: duration only)")
    bench.add_argument("--concurrency", type=int, default=64, help="requests in flight")
    bench.add_argument("--mix", default="put=50,get=50", help="e.g. put=50,get=45,delete=5")
    bench.add_argument("--value-size", type=int, default=1024, help="bytes")
    bench.add_argument("--keys", type=int, default=10_000, help="key space size")
    bench.add_argument("--dist", choices=["uniform", "zipf"], default="uniform")
    bench.add_argument("--r", default="quorum")
    bench.add_argument("--w", default="quorum")
    bench.add_argument("--no-prefill", action="store_true")
    bench.add_argument("--seed", type=int, default=1)
    _add_client_args(bench)

    from kvstore.cli import admin as admin_cli
    from kvstore.cli import certs as certs_cli
    from kvstore.cli import kms as kms_cli

    kms_cli.add_parser(sub)
    certs_cli.add_parser(sub)
    admin_cli.add_parsers(sub, _add_client_args)

    keys = sub.add_parser("keys", help="list keys in byte order (a page per request; see --limit)")
    keys.add_argument("--prefix", default="", help="only keys starting with this")
    keys.add_argument("--after", default="", help="only keys after this one (resume a listing)")
    keys.add_argument("--limit", type=int, default=0, help="at most this many keys (0: all)")
    keys.add_argument("--replicas", type=int, default=0,
                      help="replicas asked per token range (default 1; more also finds writes a replica missed)")
    keys.add_argument("--allow-partial", action="store_true",
                      help="exit 0 even when ranges with no replica up were left out")
    _add_client_args(keys)

    locate = sub.add_parser("locate", help="which nodes replicate and store a key")
    locate.add_argument("key")
    _add_client_args(locate)
    return parser


def _value_json(value: bytes) -> dict[str, str]:
    try:
        return {"value": value.decode("utf-8")}
    except UnicodeDecodeError:
        return {"value_b64": base64.b64encode(value).decode()}


def _print_json(doc: Any) -> None:
    print(json.dumps(doc, indent=None, sort_keys=True))


def run_client_command(args: argparse.Namespace) -> int:
    from kvstore.cli import connect
    from kvstore.client import SyncClient

    key = args.key.encode() if hasattr(args, "key") else b""
    with SyncClient(args.address, timeout_s=args.timeout, **connect.client_options(args)) as kv:
        if args.command == "put":
            if args.file is not None:
                value = args.file.read_bytes()
            elif args.value is not None:
                value = args.value.encode()
            else:
                value = sys.stdin.buffer.read()
            ctx = kv.put(key, value, context=bytes.fromhex(args.context), w=args.w, ttl_s=args.ttl,
                         conditional=args.if_current)
            if args.json:
                _print_json({"ok": True, "context": ctx.hex()})
            return 0
        if args.command == "get":
            versions = kv.get(key, r=args.r)
            if args.json:
                _print_json({
                    "found": versions.found, "context": versions.context.hex(),
                    **(_value_json(versions.value) if versions.found else {}),
                    "siblings": [{**_value_json(s.value), "hlc": s.hlc, "node_id": s.node_id}
                                 for s in versions.siblings],
                })
                return 0 if versions.found else 1
            if not versions.found:
                print(f"not found: {args.key}", file=sys.stderr)
                return 1
            values = [s.value for s in versions.siblings] if args.siblings else [versions.value]
            for v in values:
                sys.stdout.buffer.write(v + (b"\n" if sys.stdout.isatty() or args.siblings else b""))
            return 0
        if args.command == "delete":
            kv.delete(key, context=bytes.fromhex(args.context), w=args.w)
            if args.json:
                _print_json({"ok": True})
            return 0
        if args.command == "status":
            return _status(kv, args)
        if args.command == "ring":
            topo = kv.refresh_ring()
            for fmt, out in (("png", args.png), ("svg", args.svg)):
                if out:
                    from kvstore.cli.ringplot import draw_ring

                    try:
                        draw_ring(topo.ring, out, fmt, key=key or None, n=topo.n)
                    except (RuntimeError, OSError) as exc:  # matplotlib missing, unwritable path
                        print(f"kvstore ring: {exc}", file=sys.stderr)
                        return 2
            own = topo.ring.ownership()
            rows = [{"node_id": nid, "address": topo.addresses[nid], "up": nid in topo.up,
                     "tokens": len(topo.ring.nodes[nid].tokens), "ownership": own.get(nid, 0.0)}
                    for nid in sorted(topo.addresses)]
            if args.json:
                _print_json({"n": topo.n, "digest": topo.ring.digest(), "nodes": rows})
            else:
                for r in rows:
                    print(f"{r['node_id']:<14} {r['address']:<22} {'up' if r['up'] else 'DOWN':<5} "
                          f"{r['tokens']:>4} tokens  {100 * r['ownership']:6.2f}%")
            return 0
        if args.command == "keys":
            return _keys(kv, args)
        if args.command == "locate":
            loc = kv.locate(key)
            reps = [{"node_id": r.node_id, "address": r.address, "primary": r.primary, "stored": r.stored,
                     "siblings": r.siblings} for r in loc.replicas]
            if args.json:
                _print_json({"token": loc.token, "replicas": reps})
            else:
                print(f"token {loc.token:#018x}")
                for r in reps:
                    print(f"  {r['node_id']:<14} {r['address']:<22} {'primary' if r['primary'] else '       '} "
                          f"{'stored' if r['stored'] else '-'}")
            return 0
    raise AssertionError(args.command)


def _keys(kv: Any, args: argparse.Namespace) -> int:
    """Prints keys as the pages arrive (one per line; --json: one object per key), so a large
    listing streams instead of gathering in memory; a partial listing ends with exit 3."""
    from kvstore.client.aio import LIST_PAGE

    if args.limit < 0:
        raise errors.InvalidArgument(f"--limit: {args.limit} is negative")
    cursor, printed, missing, total = args.after.encode(), 0, 0, 0
    while True:
        want = min(LIST_PAGE, args.limit - printed) if args.limit else 0
        page = kv.list_keys_page(prefix=args.prefix.encode(), start_after=cursor, limit=want, replicas=args.replicas)
        missing, total = max(missing, page.missing_ranges), page.total_ranges
        for k in page.keys:
            if args.json:
                try:
                    _print_json({"key": k.decode("utf-8")})
                except UnicodeDecodeError:
                    _print_json({"key_b64": base64.b64encode(k).decode()})
            else:
                sys.stdout.buffer.write(k + b"\n")
        sys.stdout.flush()
        printed += len(page.keys)
        cursor = page.cursor
        if not cursor or (args.limit and printed >= args.limit):
            break
    if missing:
        print(f"kvstore keys: partial: {missing} of {total} token ranges had no replica up; their keys are "
              "missing", file=sys.stderr)
        return 0 if args.allow_partial else EXIT_CODES[errors.Unavailable]
    return 0


def _status(kv: Any, args: argparse.Namespace) -> int:
    views = []
    if args.all:
        for m in kv.status()["members"]:
            try:
                views.append(kv.status(m["address"]))
            except errors.KvError as exc:
                views.append({"node_id": m["node_id"], "address": m["address"], "error": str(exc)})
    else:
        views.append(kv.status())
    if args.json:
        _print_json(views if args.all else views[0])
        return 0
    for view in views:
        if "error" in view:
            print(f"== {view['node_id']} ({view['address']}): unreachable: {view['error']}")
            continue
        print(f"== as seen by {view['node_id']} ({view['address']}), ring {view['ring_digest'][:12]}")
        if view.get("warning"):
            print(f"warning: {view['warning']}")
        print(f"{'':2} {'node':<14} {'address':<22} {'zone':<8} {'tokens':>6} {'owns':>7} {'keys':>9} "
              f"{'generation':>14} {'phi':>6}")
        for m in view["members"]:
            flag = ("U" if m["up"] else "D") + {"normal": "N", "joining": "J", "leaving": "L"}.get(m["status"], "?")
            keys = (m.get("app") or {}).get("keys", "?")
            print(f"{flag:2} {m['node_id']:<14} {m['address']:<22} {m['zone'] or '-':<8} {m['tokens']:>6} "
                  f"{100 * m['ownership']:6.2f}% {keys:>9} {m['generation']:>14} {m.get('phi', 0):>6.2f}")
        if view.get("hints"):
            print("hints held: " + ", ".join(f"{t}={c}" for t, c in view["hints"].items()))
    return 0


def run_node(args: argparse.Namespace) -> int:
    import signal

    import trio

    from kvstore.config import load
    from kvstore.node.node import serve
    from kvstore.runtime import tune_gc

    from kvstore.node import logs

    overrides = {
        "data_dir": args.data_dir, "listen": args.listen, "advertise": args.advertise, "node_id": args.node_id,
        "zone": args.zone, "seeds": args.seeds, "storage": args.storage, "fsync": args.fsync,
        "replication_factor": args.replication_factor, "test_hooks": args.test_hooks,
        "test_drop_writes": args.test_drop_writes,
        "encryption": args.encryption, "kms_keyring": args.kms_keyring,
        "kms_root_key_file": args.kms_root_key_file, "kms_key": args.kms_key,
        "log_format": args.log_format, "metrics_listen": args.metrics_listen,
        "tls_ca_file": args.tls_ca, "tls_cert_file": args.tls_cert, "tls_key_file": args.tls_key,
        "auth_tokens_file": args.auth_tokens_file, "insecure": args.insecure,
    }
    try:
        config = load(args.config, args.profile, **overrides)
        logs.configure(args.log_level, config.log_format)
    except (ValueError, OSError) as exc:
        print(f"kvstore node: {exc}", file=sys.stderr)
        return 2

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            node = await nursery.start(serve, config)
            tune_gc()  # after startup: what exists now is frozen (kvstore/runtime.py)
            if args.ready_file:
                tmp = args.ready_file.with_suffix(".tmp")
                tmp.write_text(node.address)
                os.replace(tmp, args.ready_file)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for sig in signals:
                    logging.getLogger("kvstore").info("signal %s: draining and stopping", sig)
                    node.request_stop()
                    break

    try:
        trio.run(main)
    except BaseExceptionGroup as group:  # a refusal to start (SystemExit) raised inside the nursery
        match, rest = group.split(SystemExit)
        if match is None or rest is not None:
            raise
        exc = match.exceptions[0]
        while isinstance(exc, BaseExceptionGroup):
            exc = exc.exceptions[0]
        print(f"kvstore node: {exc}", file=sys.stderr)
        return 1
    except SystemExit as exc:
        print(f"kvstore node: {exc}", file=sys.stderr)
        return 1
    return 0


def run_bench_command(args: argparse.Namespace) -> int:
    import trio

    from kvstore.bench import BenchConfig, dumps, format_report, run_bench
    from kvstore.runtime import tune_gc
    from kvstore.cli import connect

    mix = {"put": 0.0, "get": 0.0, "delete": 0.0}
    for part in args.mix.split(","):
        name, _, pct = part.partition("=")
        if name not in mix or not pct.replace(".", "").isdigit():
            print(f"kvstore bench: --mix: {part!r} is not put|get|delete=PERCENT", file=sys.stderr)
            return 2
        mix[name] = float(pct)
    total = sum(mix.values()) or 1.0
    try:
        cfg = BenchConfig(
            tuple(args.address.split(",")), args.duration, args.ops, args.concurrency,
            mix["put"] / total, mix["get"] / total, mix["delete"] / total, args.value_size, args.keys,
            args.dist, r=args.r, w=args.w, prefill=not args.no_prefill, seed=args.seed,
            progress=not args.json and sys.stderr.isatty(), **connect.client_options(args),
        ).validate()
    except ValueError as exc:
        print(f"kvstore bench: {exc}", file=sys.stderr)
        return 2
    tune_gc()  # the load generator is a long-running process too (kvstore/runtime.py)
    report = trio.run(run_bench, cfg)
    print(dumps(report) if args.json else format_report(report))
    return 0


def _error(args: argparse.Namespace, exc: errors.KvError) -> int:
    hint = ""
    if isinstance(exc, errors.Unavailable) and not getattr(args, "tls_ca", None) and not getattr(args, "cluster_dir", None):
        from kvstore.cli.connect import PLAINTEXT_HINT

        hint = " " + PLAINTEXT_HINT
    print(f"kvstore {args.command}: {type(exc).__name__}: {exc}{hint}", file=sys.stderr)
    return EXIT_CODES.get(type(exc), EXIT_OTHER)


def main(argv: list[str] | None = None) -> int:
    from kvstore.certs import CertError

    args = build_parser().parse_args(argv)
    if args.command == "node":
        return run_node(args)
    if args.command == "certs":
        from kvstore.cli import certs as certs_cli

        try:
            return certs_cli.run(args)
        except (CertError, OSError) as exc:
            print(f"kvstore certs {args.action}: {exc}", file=sys.stderr)
            return 2
    try:
        return _run_client_side(args)
    except CertError as exc:  # a bad TLS flag or file: a usage error
        print(f"kvstore {args.command}: {exc}", file=sys.stderr)
        return 2


def _run_client_side(args: argparse.Namespace) -> int:
    from kvstore.certs import CertError

    if args.command == "bench":
        return run_bench_command(args)
    if args.command in ("decommission", "abort-join", "drop-hints", "removenode", "cleanup", "repair"):
        from kvstore.cli import admin as admin_cli

        try:
            return admin_cli.run(args)
        except errors.KvError as exc:
            return _error(args, exc)
    if args.command == "kms":
        from kvstore.cli import kms as kms_cli

        try:
            return kms_cli.run(args)
        except errors.KvError as exc:
            print(f"kvstore kms {args.action}: {exc}", file=sys.stderr)
            return EXIT_CODES.get(type(exc), EXIT_OTHER)
        except ValueError as exc:
            print(f"kvstore kms {args.action}: {exc}", file=sys.stderr)
            return 2
    try:
        return run_client_command(args)
    except errors.KvError as exc:
        return _error(args, exc)
    except CertError:
        raise
    except ValueError as exc:  # e.g. a bad --context hex
        print(f"kvstore {args.command}: {exc}", file=sys.stderr)
        return 5


if __name__ == "__main__":
    sys.exit(main())

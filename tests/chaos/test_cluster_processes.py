"""What users do with real node processes: restart and kill -9 without losing acknowledged data,
replicate across a cluster, survive a dead node with hints, detect failures, and keep every byte
on disk sealed. Each test starts its own cluster of subprocesses and tears it down."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from cluster.launcher import LocalCluster
from kvstore.client import Client
from cluster.launcher import free_base_port

pytestmark = pytest.mark.slow


def make_cluster(tmp_path: Path, **kw: Any) -> LocalCluster:
    return LocalCluster(tmp_path / "cluster", base_port=free_base_port(), profile="test", **kw)


async def cli(*args: str) -> subprocess.CompletedProcess:
    return await trio.run_process([sys.executable, "-m", "kvstore.cli.main", *args],
                                  capture_stdout=True, capture_stderr=True, check=False)


async def all_readable(addresses: list[str], expected: dict[bytes, bytes], tls: Any, r: str = "quorum") -> list[bytes]:
    """Keys whose value is not `expected` when read through `addresses` (empty = all good)."""
    async with Client(addresses, tls=tls) as kv:
        keys = list(expected)
        bad = []
        for start in range(0, len(keys), 500):
            chunk = keys[start:start + 500]
            for key, got in zip(chunk, await kv.get_many(chunk, r=r)):
                if isinstance(got, Exception) or got.value != expected[key]:
                    bad.append(key)
        return bad


@pytest.mark.parametrize("fsync", ["always", "batch"])
async def test_single_node_keeps_1000_keys_across_sigterm_and_kill_9(tmp_path: Path, fsync: str) -> None:
    with make_cluster(tmp_path, extra_args=("--fsync", fsync)) as c:
        await trio.to_thread.run_sync(c.up, 1)
        addr = c.addresses()
        expected = {}
        for i in range(20):  # through the CLI
            key, value = f"cli-{i}", f"value-{i}"
            assert (await cli("put", key, value, "--address", addr[0], "--cluster-dir", str(c.root))).returncode == 0
            expected[key.encode()] = value.encode()
        async with Client(addr, tls=c.tls()) as kv:  # and the client
            batch = {b"lib-%d" % i: b"v-%d" % i for i in range(980)}
            assert all(isinstance(r, bytes) for r in await kv.put_many(batch))
            expected.update(batch)
        await trio.to_thread.run_sync(c.stop, "n1")   # SIGTERM: drain and close
        await trio.to_thread.run_sync(c.restart, "n1")
        assert await all_readable(c.addresses(), expected, c.tls()) == []
        async with Client(c.addresses(), tls=c.tls()) as kv:
            more = {b"after-%d" % i: b"x" for i in range(200)}
            await kv.put_many(more)
            expected.update(more)
        c.kill("n1")                                   # kill -9 right after acknowledged writes
        await trio.to_thread.run_sync(c.restart, "n1")
        assert await all_readable(c.addresses(), expected, c.tls()) == []
        got = await cli("get", "cli-3", "--address", c.addresses()[0], "--cluster-dir", str(c.root))
        assert got.stdout == b"value-3"


async def test_three_nodes_replicate_2000_keys_and_survive_a_dead_node(tmp_path: Path) -> None:
    with make_cluster(tmp_path) as c:
        await trio.to_thread.run_sync(c.up, 3)
        addrs = c.addresses()
        expected = {b"key-%05d" % i: b"value-%05d" % i for i in range(2000)}
        async with Client(addrs, tls=c.tls()) as kv:
            results = await kv.put_many(list(expected.items()), w="quorum")
            failures = [r for r in results if not isinstance(r, bytes)]
            assert failures == [], f"{len(failures)} failed, first: {failures[:2]}"
        for address in addrs:  # readable with R=QUORUM through every node as coordinator
            async with Client([address], token_aware=False, tls=c.tls()) as one:
                sample = dict(list(expected.items())[::10])
                for key, got in zip(sample, await one.get_many(list(sample), r="quorum")):
                    assert got.value == sample[key]
        async with Client(addrs, tls=c.tls()) as kv:  # every key is stored on exactly N=3 nodes
            for key in list(expected)[::20]:
                loc = await kv.locate(key)
                assert sum(r.stored for r in loc.replicas) == 3

        c.kill("n3")
        live = c.addresses(live_only=True)
        during = {b"outage-%04d" % i: b"o-%04d" % i for i in range(300)}
        async with Client(live, timeout_s=10, tls=c.tls()) as kv:
            results = await kv.put_many(list(during.items()), w="quorum")
            assert all(isinstance(r, bytes) for r in results), results[:3]
            assert await all_readable(live, {**dict(list(expected.items())[:200]), **during}, c.tls()) == []
        await trio.to_thread.run_sync(c.restart, "n3")
        n3 = c.node("n3").address

        async def n3_holds_all() -> bool:
            async with Client(c.addresses(), tls=c.tls()) as kv:
                for key in during:
                    loc = await kv.locate(key, address=n3)
                    if not any(r.stored for r in loc.replicas if r.address == n3):
                        return False
            return True

        with trio.fail_after(30):
            while not await n3_holds_all():
                await trio.sleep(0.5)


async def test_failure_detection_marks_a_killed_node_down_and_back_up(tmp_path: Path) -> None:
    with make_cluster(tmp_path) as c:
        await trio.to_thread.run_sync(c.up, 5)
        live = ["n1", "n2", "n3", "n4"]

        def seen(up: bool) -> bool:
            for name in live:
                view = c.status()[[s["name"] for s in c.status()].index(name)].get("view") or {}
                members = {m["node_id"]: m["up"] for m in view.get("members", [])}
                if members.get("n5") is not up:
                    return False
            return True

        c.kill("n5")
        t0 = time.monotonic()
        with trio.fail_after(20):
            while not seen(False):
                await trio.sleep(0.1)
        down_s = time.monotonic() - t0
        await trio.to_thread.run_sync(c.restart, "n5")
        t1 = time.monotonic()
        with trio.fail_after(20):
            while not seen(True):
                await trio.sleep(0.1)
        print(f"down after {down_s:.2f}s, up {time.monotonic() - t1:.2f}s after restart returned")
        digests = {s["view"]["ring_digest"] for s in c.status() if s.get("view")}
        assert len(digests) == 1


async def test_no_plaintext_on_disk_after_kill_9_mid_write_and_hint_replay(tmp_path: Path) -> None:
    sentinel = b"SENTINEL-3f9a-never-on-disk"
    with make_cluster(tmp_path) as c:
        await trio.to_thread.run_sync(c.up, 3)
        async with Client(c.addresses(), timeout_s=10, tls=c.tls()) as kv:
            async def write(start: int) -> None:
                for i in range(start, start + 2500, 250):
                    pending = [(b"s-%05d" % j, sentinel + b"-%05d" % j) for j in range(i, i + 250)]
                    for _ in range(20):  # a write cut off by the kill is unacknowledged: write it again
                        results = await kv.put_many(pending)
                        pending = [item for item, r in zip(pending, results) if not isinstance(r, bytes)]
                        if not pending:
                            break
                        await trio.sleep(0.2)
                    assert pending == []

            async with trio.open_nursery() as nursery:
                for start in range(0, 10_000, 2500):
                    nursery.start_soon(write, start)
                await trio.sleep(0.3)
                c.kill("n2")                          # mid-write
        await trio.to_thread.run_sync(c.restart, "n2")
        expected = {b"s-%05d" % j: sentinel + b"-%05d" % j for j in range(10_000)}
        assert await all_readable(c.addresses(), expected, c.tls()) == []

        # rotate the cluster KEK, re-wrap every node's data keys, retire the old version
        kms = ["--keyring", str(c.root / "kms" / "keyring"), "--root-key-file", str(c.root / "kms" / "root.key")]
        addrs = ",".join(c.addresses())
        for step in (["rotate", "alias/kvstore"], ["rewrap", "--address", addrs, "--cluster-dir", str(c.root)],
                     ["disable-version", "alias/kvstore", "--version", "1"]):
            done = await cli("kms", *step, *kms)
            assert done.returncode == 0, done.stderr
        await trio.sleep(0.5)  # nodes notice keyring changes within kms_check_interval_s
        assert await all_readable(c.addresses(), expected, c.tls()) == []
        # crypto-shredding: a disabled KEK refuses reads; enabling it restores them
        assert (await cli("kms", "disable", "alias/kvstore", *kms)).returncode == 0
        await trio.sleep(0.5)
        refused = await cli("get", "s-00001", "--address", addrs, "--cluster-dir", str(c.root))
        assert refused.returncode == 8 and b"Disabled" in refused.stderr, refused.stderr
        assert (await cli("kms", "enable", "alias/kvstore", *kms)).returncode == 0
        await trio.sleep(0.5)
        assert await all_readable(c.addresses(), expected, c.tls()) == []
        await trio.to_thread.run_sync(c.down)         # every byte is in files now
    leaks = [p for p in (tmp_path / "cluster").rglob("*") if p.is_file() and b"SENTINEL" in p.read_bytes()]
    assert leaks == []

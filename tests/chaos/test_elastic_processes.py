"""Elastic membership with real node processes under a continuous write load: two joins, a
decommission and a removenode, each followed by the placement check from every node's storage
(through `locate`, which asks each node whether it stores the key) and a read of every
acknowledged write. Then divergence made behind the cluster's back is healed by `kvstore repair`."""
from __future__ import annotations

import sys
from typing import Any
from pathlib import Path

import msgpack
import pytest
import trio

from cluster.launcher import LocalCluster
from kvstore.client import Client
from kvstore.errors import KvError
from cluster.launcher import free_base_port

pytestmark = [pytest.mark.slow, pytest.mark.chaos]


class Load:
    def __init__(self, addresses: list[str], tls: Any) -> None:
        self.addresses, self.acked, self.stop, self.i = addresses, {}, trio.Event(), 0
        self.tls = tls

    async def run(self) -> None:
        async with Client(self.addresses, timeout_s=10, tls=self.tls) as kv:
            while not self.stop.is_set():
                batch = [(b"load-%07d" % (self.i + j), b"l%d" % (self.i + j)) for j in range(100)]
                self.i += 100
                for (k, v), r in zip(batch, await kv.put_many(batch)):
                    if isinstance(r, bytes):
                        self.acked[k] = v
                await trio.sleep(0.02)


async def check(c: LocalCluster, acked: dict[bytes, bytes], names: list[str], sample_every: int = 25) -> None:
    live = [c.node(name).address for name in names]
    async with Client(live, timeout_s=20, tls=c.tls()) as kv:
        for address in live:
            await kv.command("cleanup", {}, address=address, timeout_s=120)
        keys = list(acked)
        lost = []
        for start in range(0, len(keys), 500):
            chunk = keys[start:start + 500]
            for k, got in zip(chunk, await kv.get_many(chunk)):
                if isinstance(got, KvError) or got.value != acked[k]:
                    lost.append(k)
        assert lost == [], f"{len(lost)} acknowledged writes lost, e.g. {lost[:3]}"
        misplaced = []
        for key in keys[::sample_every]:
            loc = await kv.locate(key)
            stored = sorted(r.node_id for r in loc.replicas if r.stored)
            primary = sorted(r.node_id for r in loc.replicas if r.primary)
            if stored != primary or len(stored) != 3:
                misplaced.append((key, stored, primary))
        assert misplaced == [], f"{len(misplaced)} misplaced, e.g. {misplaced[:2]}"


async def test_grow_and_shrink_under_load_then_repair(tmp_path: Path) -> None:
    with LocalCluster(tmp_path / "c", base_port=free_base_port(), profile="test") as c:
        await trio.to_thread.run_sync(c.up, 3)
        async with Client(c.addresses(), timeout_s=20, tls=c.tls()) as kv:
            base = {b"base-%06d" % i: b"b%d" % i for i in range(20_000)}
            items = list(base.items())
            for i in range(0, len(items), 2000):
                assert all(isinstance(r, bytes) for r in await kv.put_many(items[i:i + 2000]))
        load = Load(c.addresses(), c.tls())
        async with trio.open_nursery() as nursery:
            nursery.start_soon(load.run)
            await trio.to_thread.run_sync(c.add_node)
            await trio.to_thread.run_sync(c.add_node)
            load.stop.set()
        await check(c, {**base, **load.acked}, ["n1", "n2", "n3", "n4", "n5"])

        # shrink: decommission n5 and remove a killed n4, still under load
        load2 = Load([c.node(name).address for name in ("n1", "n2", "n3")], c.tls())
        async with trio.open_nursery() as nursery:
            nursery.start_soon(load2.run)
            async with Client(c.addresses(), timeout_s=120, tls=c.tls()) as kv:
                report = msgpack.unpackb(await kv.command("decommission", {}, address=c.node("n5").address,
                                                          timeout_s=120))
                assert report["streamed"] > 0
            c.kill("n4")
            await trio.sleep(2.0)  # failure detector marks n4 down
            async with Client([c.node("n1").address], timeout_s=120, tls=c.tls()) as kv:
                report = msgpack.unpackb(await kv.command("removenode", {"node_id": "n4"}, timeout_s=120))
                assert report["removed"] == "n4"
            load2.stop.set()
        await check(c, {**base, **load.acked, **load2.acked}, ["n1", "n2", "n3"])

        # divergence: delete records straight from one stopped replica's database, then repair
        victim = "n2"
        await trio.to_thread.run_sync(c.stop, victim)
        db = Path(c.node(victim).data_dir) / "kv.db"
        doomed = [b"base-%06d" % i for i in range(0, 20_000, 97)]
        proc = await trio.run_process(
            [sys.executable, "-c", "import sqlite3,sys; d=sqlite3.connect(sys.argv[1]);"
             "n=d.executemany('DELETE FROM data WHERE key=?', [(bytes.fromhex(h),) for h in sys.argv[2:]]).rowcount;"
             "d.commit(); print(n)", str(db), *[k.hex() for k in doomed]], capture_stdout=True)
        assert int(proc.stdout) > 0
        await trio.to_thread.run_sync(lambda: c.restart(victim, wait=False))
        await trio.to_thread.run_sync(lambda: c.wait_converged(30, ["n1", "n2", "n3"]))
        async with Client(c.addresses(), timeout_s=120, tls=c.tls()) as kv:
            address = c.node(victim).address
            report = msgpack.unpackb(await kv.command("repair", {}, address=address, timeout_s=120))
            assert report["state"] == "done" and report["keys_pulled"] > 0
            for key in doomed:
                loc = await kv.locate(key, address=address)
                holders = [r.node_id for r in loc.replicas if r.stored]
                primaries = [r.node_id for r in loc.replicas if r.primary]
                assert sorted(holders) == sorted(primaries), key

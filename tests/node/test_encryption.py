"""Encryption at rest on real nodes: nothing in plaintext on disk, tampering is DATA_LOSS,
rotation + re-wrap, and crypto-shredding by disabling the KEK."""
from __future__ import annotations

from pathlib import Path

import msgpack
import pytest

from kvstore.errors import DataLoss, PermissionDenied
from kvstore.kms import LocalKms, load_root_key
from tests.node.conftest import eventually

SENTINEL = b"SENTINEL-7c1f-plaintext-must-never-reach-disk"


def files_containing(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


async def test_no_plaintext_value_reaches_any_file_including_hints(nodes) -> None:
    cluster = await nodes.cluster(4, storage="sqlite", fsync="always")
    async with nodes.client(*cluster) as kv:
        await kv.put_many([(b"k-%d" % i, SENTINEL + b"-%d" % i) for i in range(300)])
        await nodes.stop(cluster[3])
        await eventually(lambda: _down(cluster[:3], cluster[3].node_id), what="node 4 down")
        await kv.put_many([(b"h-%d" % i, SENTINEL + b"-h%d" % i) for i in range(300)])
        assert (await kv.get(b"k-7")).value == SENTINEL + b"-7"
    async def hinted() -> bool:  # hints land after the quorum answered: wait for them
        total = 0
        for n in cluster[:3]:
            total += sum((await n.engine.hint_counts()).values())
        return total > 0

    await eventually(hinted, what="the outage to produce hints to check")
    for n in cluster[:3]:
        await nodes.stop(n)  # checkpoint the WAL too: every byte is in files now
    assert files_containing(nodes.root, SENTINEL) == []
    assert files_containing(nodes.root, b"SENTINEL") == []


async def _down(nodes_list, node_id) -> bool:
    return all(not n.is_up(node_id) for n in nodes_list)


async def test_tampered_envelope_is_data_loss_and_other_keys_still_serve(nodes) -> None:
    node = await nodes.start(storage="sqlite")
    async with nodes.client(node) as kv:
        await kv.put(b"victim", b"secret value")
        await kv.put(b"bystander", b"fine")

        def flip(raw: bytes | None) -> bytes:
            doc = msgpack.unpackb(raw)
            envelope = bytearray(doc[1][0][5])
            envelope[-5] ^= 0x01  # one bit inside the ciphertext
            doc[1][0][5] = bytes(envelope)
            return msgpack.packb(doc)

        await node.engine.update_many([(b"victim", flip)])
        with pytest.raises(DataLoss, match="victim"):
            await kv.get(b"victim")
        assert (await kv.get(b"bystander")).value == b"fine"
        await kv.put(b"after", b"still writes")


def open_kms(nodes) -> LocalKms:
    return LocalKms.open(nodes.keys.keyring, load_root_key(nodes.keys.root_key_file, environ={}))


async def test_rotate_rewrap_then_disable_old_version_keeps_everything_readable(nodes) -> None:
    cluster = await nodes.cluster(3, storage="sqlite")
    keys = [b"r-%d" % i for i in range(200)]
    async with nodes.client(*cluster) as kv:
        await kv.put_many([(k, k + b"-value") for k in keys], w="all")
        kms = open_kms(nodes)
        key_id = kms.describe("alias/kvstore").key_id
        kms.rotate(key_id)
        for n in cluster:
            n.keys.reload()
        reports = [msgpack.unpackb(await kv.command("rewrap", {}, address=n.address)) for n in cluster]
        assert sum(r["rewrapped"] for r in reports) == 3 * len(keys)
        kms.disable_version(key_id, 1)
        for n in cluster:
            n.keys.reload()
        got = await kv.get_many(keys, r="all")
        assert [g.value for g in got] == [k + b"-value" for k in keys]
        again = [msgpack.unpackb(await kv.command("rewrap", {}, address=n.address)) for n in cluster]
        assert sum(r["rewrapped"] for r in again) == 0  # already on the primary version


async def test_disabling_the_kek_shreds_reads_until_enabled(nodes) -> None:
    node = await nodes.start(storage="sqlite")
    async with nodes.client(node) as kv:
        await kv.put(b"k", b"v")
        kms = open_kms(nodes)
        key_id = kms.describe("alias/kvstore").key_id
        kms.disable(key_id)
        node.keys.reload()
        with pytest.raises(PermissionDenied, match=key_id):
            await kv.get(b"k")
        kms.enable(key_id)
        node.keys.reload()
        assert (await kv.get(b"k")).value == b"v"


async def test_keyring_changes_reach_running_nodes_without_a_restart(nodes) -> None:
    node = await nodes.start()
    async with nodes.client(node) as kv:
        await kv.put(b"k", b"v")
        kms = open_kms(nodes)
        kms.disable(kms.describe("alias/kvstore").key_id)

        async def refused() -> bool:
            try:
                await kv.get(b"k")
                return False
            except PermissionDenied:
                return True

        await eventually(refused, what="the node to notice the disabled key")

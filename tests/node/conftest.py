"""Fixtures for node tests: real nodes with real gRPC on 127.0.0.1 (port 0), in this process."""
from __future__ import annotations

from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import pytest
import trio

from kvstore.client import Client
from kvstore.config import NodeConfig, profile
from kvstore.kms.setup import ClusterKeys, provision
from kvstore.node.node import Node, serve


class Nodes:
    """Starts nodes in the test's nursery and stops them at the end."""

    def __init__(self, nursery: trio.Nursery, root: Path) -> None:
        self.nursery = nursery
        self.root = root
        self.nodes: list[Node] = []
        self.count = 0
        self.keys: ClusterKeys | None = None  # one cluster KEK shared by every node

    def config(self, name: str, **overrides: Any) -> NodeConfig:
        if self.keys is None:
            self.keys = provision(self.root / "keys")
        base = {"data_dir": self.root / name, "listen": "127.0.0.1:0", "storage": "memory", "node_id": name,
                "kms_keyring": str(self.keys.keyring), "kms_root_key_file": str(self.keys.root_key_file)}
        base.update(overrides)
        return profile("test", **base).validate()

    async def start(self, name: str | None = None, seeds: tuple[str, ...] | None = None, **overrides: Any) -> Node:
        self.count += 1
        name = name or f"n{self.count}"
        if seeds is None:
            seeds = tuple(n.address for n in self.nodes if not n.stopping.is_set())
        node: Node = await self.nursery.start(serve, self.config(name, seeds=seeds, **overrides))
        self.nodes.append(node)
        return node

    async def stop(self, node: Node) -> None:
        node.request_stop()
        with trio.fail_after(10):
            await node.stopped.wait()

    async def cluster(self, n: int, **overrides: Any) -> list[Node]:
        started = [await self.start(**overrides) for _ in range(n)]
        await self.converged(started)
        return started

    async def converged(self, nodes: list[Node], timeout_s: float = 10) -> None:
        """Wait until every node sees every other as up with the same ring."""
        with trio.fail_after(timeout_s):
            while True:
                digests = {n.ring().digest() for n in nodes}
                all_up = all(a.is_up(b.node_id) for a in nodes for b in nodes)
                if len(digests) == 1 and all_up and len(nodes[0].ring()) == len(nodes):
                    return
                await trio.sleep(0.05)

    def client(self, *nodes: Node, **options: Any) -> Client:
        return Client([n.address for n in (nodes or self.nodes)], **options)


@pytest.fixture
async def nodes(tmp_path: Path) -> AsyncIterator[Nodes]:
    async with trio.open_nursery() as nursery:
        harness = Nodes(nursery, tmp_path)
        yield harness
        for node in harness.nodes:
            node.request_stop()


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 10, what: str = "condition") -> None:
    """Poll an async predicate until it holds (bounded)."""
    with trio.move_on_after(timeout_s):
        while not await check():
            await trio.sleep(0.05)
        return
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")

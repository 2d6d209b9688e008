"""Clusters with a network namespace per node (cluster/netns.py): nodes get their own addresses,
a cut route is a real partition the failure detector sees, healing brings the node back, and
`down` leaves no namespace or link behind. Needs root and `ip netns`; skipped elsewhere (the
chaos scenarios then partition through the nodes' test hook instead)."""
from __future__ import annotations

import ipaddress
from pathlib import Path
import pytest
import trio

from cluster.launcher import LocalCluster, free_base_port
from cluster.netns import Network, available
from kvstore.client import Client
from tests.chaos.test_launcher import eventually, sees_up, views

CAN, WHY = available()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not CAN, reason=f"netns: {WHY}")]


def up_views(c: LocalCluster) -> dict[str, set[str]]:
    return {name: sees_up(view) for name, view in views(c).items()}


async def test_partition_by_route_is_seen_and_healed(tmp_path: Path) -> None:
    base = free_base_port()
    net = Network(base)
    with LocalCluster(tmp_path / "c", base_port=base, profile="test", network="netns") as c:
        addresses = await trio.to_thread.run_sync(c.up, 3)
        hosts = [a.rsplit(":", 1)[0] for a in addresses]
        assert all(ipaddress.ip_address(h) in net.subnet for h in hosts) and len(set(hosts)) == 3
        assert sorted(net.namespaces()) == sorted(net.namespace(n) for n in c.names())
        async with Client(addresses, tls=c.tls()) as kv:
            await kv.put(b"before", b"v", w="all")

        # isolate n1 both ways: the others mark it down; n1 marks them down
        others = ["n2", "n3"]
        net.cut("n1", [c.node(n).host for n in others])
        for n in others:
            net.cut(n, [c.node("n1").host])
        await eventually(lambda: all("n1" not in up_views(c).get(n, {"n1"}) for n in others),
                         "n2 and n3 see n1 down")
        await eventually(lambda: up_views(c).get("n1") == {"n1"}, "n1 sees only itself")
        # clients in the root namespace still reach every node, as in Jepsen
        async with Client([c.node("n2").address], token_aware=False, tls=c.tls()) as kv:
            await kv.put(b"during", b"v", w="quorum")

        for n in c.names():
            net.cut(n, [])
        assert all(net.cuts(n) == [] for n in c.names())
        await eventually(lambda: all(v == {"n1", "n2", "n3"} for v in up_views(c).values()), "healed")
        async with Client([c.node("n1").address], token_aware=False, tls=c.tls()) as kv:
            assert (await kv.get(b"before", r="all")).value == b"v"
            assert (await kv.get(b"during", r="all")).value == b"v"
    assert net.namespaces() == []


def test_cuts_replace_earlier_cuts(tmp_path: Path) -> None:
    net = Network(free_base_port())
    try:
        net.ensure_node("n1", net.host_of(0))
        net.cut("n1", [net.host_of(1), net.host_of(2)])
        assert sorted(net.cuts("n1")) == sorted([net.host_of(1), net.host_of(2)])
        net.cut("n1", [net.host_of(2)])
        assert net.cuts("n1") == [net.host_of(2)]
    finally:
        net.teardown()
    assert net.namespaces() == []


def test_addresses_are_distinct_per_cluster_and_index() -> None:
    a, b = Network(20000), Network(20001)
    assert a.subnet != b.subnet
    assert a.host_of(0) != a.host_of(1)
    with pytest.raises(ValueError, match="index"):
        a.host_of(250)

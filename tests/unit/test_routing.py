"""Client routing (pure): which coordinator a key's call goes to."""
from __future__ import annotations

import random
from collections import Counter

from kvstore.client.routing import Topology


def topology(count: int, up: set[str] | None = None, n: int = 3) -> Topology:
    rng = random.Random(count)
    nodes = [(f"n{i}", f"10.0.0.{i}:7000", "", tuple(rng.randrange(2**64) for _ in range(16)),
              up is None or f"n{i}" in up) for i in range(count)]
    return Topology.from_nodes(nodes, n)


KEYS = [b"key-%d" % i for i in range(2000)]


def test_on_three_nodes_with_n_3_every_key_goes_to_the_session_first_node() -> None:
    topo = topology(3)
    order = {"10.0.0.2:7000": 0, "10.0.0.0:7000": 1, "10.0.0.1:7000": 2}
    assert {topo.coordinator(k, order=order) for k in KEYS} == {"10.0.0.2:7000"}


def test_on_five_nodes_each_key_goes_to_its_replica_earliest_in_the_session_order() -> None:
    topo = topology(5)
    order = {f"10.0.0.{i}:7000": rank for rank, i in enumerate([3, 1, 4, 0, 2])}
    chosen = Counter()
    for key in KEYS:
        replicas = [topo.addresses[node] for node in topo.ring.preference_list(key, 3)]
        addr = topo.coordinator(key, order=order)
        assert addr == min(replicas, key=order.__getitem__)
        chosen[addr] += 1
    # the first node coordinates every key it replicates (about 3/5), the second most of the rest:
    # calls concentrate on few coordinators instead of spreading over every primary
    first, second = chosen["10.0.0.3:7000"], chosen["10.0.0.1:7000"]
    assert first == sum("n3" in topo.ring.preference_list(k, 3) for k in KEYS)
    assert first + second >= 0.85 * len(KEYS)


def test_down_and_avoided_replicas_are_skipped_and_none_is_left_when_no_replica_is_usable() -> None:
    topo = topology(3, up={"n0", "n1"})
    order = {"10.0.0.2:7000": 0, "10.0.0.1:7000": 1, "10.0.0.0:7000": 2}
    assert {topo.coordinator(k, order=order) for k in KEYS} == {"10.0.0.1:7000"}  # n2 is down
    assert {topo.coordinator(k, avoid={"10.0.0.1:7000"}, order=order) for k in KEYS} == {"10.0.0.0:7000"}
    assert topo.coordinator(b"k", avoid={"10.0.0.0:7000", "10.0.0.1:7000"}, order=order) is None


def test_without_a_session_order_the_first_live_replica_in_preference_order_coordinates() -> None:
    topo = topology(5)
    for key in KEYS[:200]:
        assert topo.coordinator(key) == topo.addresses[topo.ring.preference_list(key, 3)[0]]
    assert Topology.from_nodes([], 3).coordinator(b"k") is None

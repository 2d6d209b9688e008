"""Gossip rounds on a node (kvstore/node/gossip.py) against in-memory peers on trio's mock clock:
peers that stop answering (a partition drops their packets, so only the call's deadline ends an
exchange) must not starve the peers still on this side of heartbeats (found by the netns
partition test: both survivors marked each other down for a moment)."""
from __future__ import annotations

import random
from typing import Any

import trio
import trio.testing

from kvstore.core.membership import NodeState
from kvstore.errors import Unavailable
from kvstore.node.gossip import Gossip

INTERVAL_S = 0.1


async def test_a_silent_peer_does_not_make_the_others_flap(autojump_clock) -> None:
    names = ["a", "b", "c", "d", "e"]
    gossips: dict[str, Gossip] = {}
    hung: set[str] = set()

    def call_for(src: str):
        async def call(address: str, kind: str, body: Any, timeout_s: float) -> Any:
            if address in hung or src in hung:
                await trio.sleep(timeout_s)  # packets vanish: only the deadline ends the call
                raise Unavailable(f"{address}: deadline exceeded")
            await trio.sleep(0.001)
            target = gossips[address]
            if kind == "ping":  # new members are admitted once their address answers as them
                return target.me.node_id
            return target.handle_syn(body) if kind == "gossip-syn" else target.handle_ack(body)
        return call

    for i, name in enumerate(names):
        me = NodeState(name, name, generation=1, tokens=(i * 1000 + 1,))
        gossips[name] = Gossip(me, seeds=("a",), interval_s=INTERVAL_S, call=call_for(name),
                               rng=random.Random(i), phi_threshold=8.0)

    async with trio.open_nursery() as nursery:
        for g in gossips.values():
            nursery.start_soon(g.run)
        with trio.fail_after(30):
            while not all(g.is_up(o) for g in gossips.values() for o in names):
                await trio.sleep(INTERVAL_S)
        await trio.sleep(5)  # the detectors learn the heartbeat rhythm

        hung.update({"c", "d", "e"})  # a partition leaves a and b on their own side
        flaps = 0
        for _ in range(100):  # 10 s of rounds
            await trio.sleep(INTERVAL_S)
            flaps += (not gossips["a"].is_up("b")) + (not gossips["b"].is_up("a"))
        assert flaps == 0, f"a and b marked each other down {flaps} times while c, d and e were silent"
        assert not any(gossips[x].is_up(y) for x in "ab" for y in "cde")
        nursery.cancel_scope.cancel()

"""Client coalescing: concurrent calls share batches, errors stay per item, nobody hangs."""
from __future__ import annotations

import pytest
import trio
import trio.testing

from kvstore.client.coalesce import Coalescer
from kvstore.errors import DeadlineExceeded, InvalidArgument, Unavailable


class FakeDestination:
    def __init__(self, delay_s: float = 0.01, fail: bool = False) -> None:
        self.batches: list[list[int]] = []
        self.delay_s = delay_s
        self.fail = fail

    async def send(self, items, timeout_s):
        self.batches.append(list(items))
        await trio.sleep(self.delay_s)
        if self.fail:
            raise Unavailable("down")
        return [InvalidArgument(f"bad {i}") if i < 0 else i * 10 for i in items]


async def test_concurrent_calls_coalesce_and_each_gets_its_own_result(autojump_clock) -> None:
    dest = FakeDestination()
    c = Coalescer(dest.send, size_of=lambda _: 1)
    results = {}

    async def call(i: int) -> None:
        results[i] = await c.submit(i, trio.current_time() + 5)

    async with trio.open_nursery() as nursery:
        for i in range(100):
            nursery.start_soon(call, i)
    assert results == {i: i * 10 for i in range(100)}
    assert len(dest.batches) <= 3  # first call alone, then everything that queued meanwhile
    assert sorted(x for b in dest.batches for x in b) == list(range(100))


async def test_item_error_is_raised_only_for_that_item(autojump_clock) -> None:
    c = Coalescer(FakeDestination().send, size_of=lambda _: 1)
    outcomes = {}

    async def call(i: int) -> None:
        try:
            outcomes[i] = await c.submit(i, trio.current_time() + 5)
        except InvalidArgument as exc:
            outcomes[i] = str(exc)

    async with trio.open_nursery() as nursery:
        for i in (-1, 2, 3):
            nursery.start_soon(call, i)
    assert outcomes == {-1: "bad -1", 2: 20, 3: 30}


async def test_batch_failure_reaches_every_caller(autojump_clock) -> None:
    c = Coalescer(FakeDestination(fail=True).send, size_of=lambda _: 1)
    errors = []

    async def call(i: int) -> None:
        with pytest.raises(Unavailable):
            await c.submit(i, trio.current_time() + 5)
        errors.append(i)

    async with trio.open_nursery() as nursery:
        for i in range(5):
            nursery.start_soon(call, i)
    assert sorted(errors) == list(range(5))


async def test_a_cancelled_leader_does_not_strand_the_others(autojump_clock) -> None:
    dest = FakeDestination(delay_s=1.0)
    c = Coalescer(dest.send, size_of=lambda _: 1)
    finished = []

    async def follower(i: int) -> None:
        try:
            finished.append(await c.submit(i, trio.current_time() + 10))
        except Unavailable:
            finished.append("retry")

    async with trio.open_nursery() as nursery:
        with trio.move_on_after(0.5):  # the leader's own caller gives up mid-flight
            async with trio.open_nursery() as inner:
                inner.start_soon(c.submit, 1, trio.current_time() + 10)
                await trio.testing.wait_all_tasks_blocked()
                for i in range(2, 5):
                    nursery.start_soon(follower, i)
                await trio.sleep_forever()
    assert len(finished) == 3


async def test_batches_respect_the_byte_cap(autojump_clock) -> None:
    dest = FakeDestination()
    c = Coalescer(dest.send, max_bytes=3, size_of=lambda _: 1)
    async with trio.open_nursery() as nursery:
        for i in range(10):
            nursery.start_soon(c.submit, i, trio.current_time() + 5)
    assert max(len(b) for b in dest.batches) <= 3


async def test_callers_woken_by_a_returning_batch_all_ride_the_next_one(autojump_clock) -> None:
    """64 callers, each making calls back to back: every batch carries all 64. (Without letting
    the woken callers queue first, the first of them led a batch alone or with half of them, and
    batches alternated around 32, each op waiting a round trip more.)"""
    dest = FakeDestination()
    c = Coalescer(dest.send, size_of=lambda _: 1)

    async def caller(i: int) -> None:
        for n in range(5):
            assert await c.submit(i, trio.current_time() + 5) == i * 10

    async with trio.open_nursery() as nursery:
        for i in range(64):
            nursery.start_soon(caller, i)
    assert [len(b) for b in dest.batches] == [64] * 5


async def test_a_lone_call_is_sent_without_waiting(autojump_clock) -> None:
    dest = FakeDestination(delay_s=0.01)
    c = Coalescer(dest.send, size_of=lambda _: 1)
    started = trio.current_time()
    assert await c.submit(7, started + 5) == 70
    assert trio.current_time() - started == pytest.approx(0.01)  # the round trip only: no timer


async def test_a_leader_cancelled_while_gathering_hands_the_lead_on(autojump_clock) -> None:
    dest = FakeDestination()
    c = Coalescer(dest.send, size_of=lambda _: 1)
    results = []

    async def follower() -> None:
        results.append(await c.submit(2, trio.current_time() + 5))

    async with trio.open_nursery() as nursery:
        with trio.CancelScope() as leader_scope:
            leader_scope.cancel()  # cancelled at its first checkpoint: while it gathers callers
            nursery.start_soon(follower)
            with pytest.raises(trio.Cancelled):
                await c.submit(1, trio.current_time() + 5)
    assert results == [20]
    assert [b for b in dest.batches] == [[2]]


class HangingDestination:
    """Answers nothing; gives up at the batch's timeout, as a gRPC deadline does."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    async def send(self, items, timeout_s):
        self.batches.append(list(items))
        await trio.sleep(timeout_s)
        raise DeadlineExceeded("deadline exceeded")


async def _when_each_times_out(calls: list[tuple[str, float, float]]) -> tuple[dict[str, float], list]:
    """Run (name, start delay, timeout) calls against a hung destination; when each call ended
    with DeadlineExceeded (seconds from the start), and the batches that were sent."""
    dest = HangingDestination()
    c = Coalescer(dest.send, size_of=lambda _: 1)
    start = trio.current_time()
    ended: dict[str, float] = {}

    async def call(name: str, delay: float, timeout: float) -> None:
        await trio.sleep(delay)
        with pytest.raises(DeadlineExceeded):
            await c.submit(name, trio.current_time() + timeout)
        ended[name] = trio.current_time() - start

    async with trio.open_nursery() as nursery:
        for args in calls:
            nursery.start_soon(call, *args)
    return ended, dest.batches


async def test_no_call_outwaits_its_deadline_behind_a_hung_batch(autojump_clock) -> None:
    """A short timeout queued behind calls with long ones ends at its own deadline (it gets a
    cancel scope); a call whose deadline is the latest ends by it too (through the batches)."""
    ended, batches = await _when_each_times_out([
        ("long", 0, 5.0),     # leads, then hangs in flight until t=5
        ("short", 0.1, 0.5),  # queued behind it: deadline t=0.6
        ("later", 0.2, 5.0),  # queued too: deadline t=5.2
    ])
    assert ended == pytest.approx({"long": 5.0, "short": 0.6, "later": 5.2}, abs=0.01)
    assert batches == [["long"], ["later"]]


async def test_a_later_longer_call_does_not_stretch_the_batch_of_an_earlier_one(autojump_clock) -> None:
    """"mid" queues behind a hung batch with the latest deadline so far (no cancel scope of its
    own); "long" queues after it with a far later one. They must not share a batch, or mid would
    wait for long's deadline."""
    ended, batches = await _when_each_times_out([
        ("first", 0, 5.0),    # leads, hangs until t=5
        ("mid", 0.1, 5.5),    # deadline t=5.6
        ("long", 0.2, 60.0),  # deadline t=60.2
    ])
    assert ended == pytest.approx({"first": 5.0, "mid": 5.6, "long": 60.2}, abs=0.01)
    assert batches == [["first"], ["mid"], ["long"]]

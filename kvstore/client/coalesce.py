"""Client-side coalescing: concurrent single-key calls to one coordinator travel as one batch RPC.

No timer: whenever no batch to a destination is in flight, the caller that finds it idle lets
the callers that are already runnable queue up (a few scheduler passes), sends everything queued
(up to a cap) and, when that batch returns, hands the lead to the next waiting caller. Under load
batches grow by themselves; alone, a call goes out at once. This is the lever
DESIGN.md measured (batch 1 -> 12 was worth 6x): RPC count, not bytes, is the cost.
"""
from __future__ import annotations

from typing import Any, Awaitable, Callable, Sequence

import trio

from kvstore.errors import DeadlineExceeded, KvError, Unavailable

#: send(items, timeout_s) -> one result or KvError per item, in order
SendFn = Callable[[Sequence[Any], float], Awaitable[list[Any]]]

MAX_BATCH_ITEMS = 512
MAX_BATCH_BYTES = 4 << 20   # a few large values fill a batch: keep one message well under limits
SETTLE_PASSES = 8           # scheduler passes a leader waits at most while callers keep arriving
MIN_DEADLINE_SPREAD_S = 0.05  # deadlines one batch may span: this, or the share below of the
DEADLINE_SPREAD_SHARE = 0.2   # first call's time left, whichever is more (see _lead)


class _Slot:
    __slots__ = ("item", "deadline", "result", "error", "finished", "wake")

    def __init__(self, item: Any, deadline: float) -> None:
        self.item = item
        self.deadline = deadline
        self.result: Any = None
        self.error: KvError | None = None
        self.finished = False
        self.wake = trio.Event()

    def finish(self, result: Any = None, error: KvError | None = None) -> None:
        if not self.finished:
            self.result, self.error, self.finished = result, error, True
            self.wake.set()


class Coalescer:
    """One destination's queue (one per coordinator address and operation kind)."""

    def __init__(self, send: SendFn, max_items: int = MAX_BATCH_ITEMS, max_bytes: int = MAX_BATCH_BYTES,
                 size_of: Callable[[Any], int] = lambda item: item.ByteSize()) -> None:
        self.send = send
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.size_of = size_of
        self.queue: list[_Slot] = []
        self.busy = False
        # the latest deadline of any call queued or in flight (see submit); -inf when idle
        self.horizon = float("-inf")
        self.batches = 0
        self.items = 0

    async def submit(self, item: Any, deadline: float) -> Any:
        slot = _Slot(item, deadline)
        # Every call queued or in flight ahead of this one ends by its own deadline (a batch's
        # timeout is the latest of its calls'). So a call whose deadline is no earlier than all
        # of theirs, the usual case, cannot outwait it by more than the deadline spread a batch
        # may have (_lead) and needs no cancel scope: one per call was a quarter of the client's
        # CPU. An earlier deadline (a shorter timeout than the calls ahead) gets one.
        guarded = deadline < self.horizon
        self.horizon = max(self.horizon, deadline)
        self.queue.append(slot)
        try:
            if guarded:
                with trio.move_on_at(deadline):
                    await self._until_finished(slot)
            else:
                await self._until_finished(slot)
        finally:
            if slot in self.queue:
                self.queue.remove(slot)
            if not self.busy and self.queue:
                self.queue[0].wake.set()  # leaving unled: someone still queued must lead
        if not slot.finished:
            raise DeadlineExceeded("no answer before the deadline")
        if slot.error is not None:
            raise slot.error
        return slot.result

    async def _until_finished(self, slot: _Slot) -> None:
        while not slot.finished:
            if not self.busy and self.queue:
                await self._lead()
                continue
            await slot.wake.wait()
            slot.wake = trio.Event()

    async def _settle(self) -> None:
        """Let every caller that is already runnable reach the queue before the leader takes it.

        When a batch returns, all of its callers wake at once and most submit their next call at
        once; without this the first of them led a batch of the callers queued before it, and the
        rest waited a whole round trip for the next one: with 64 calls in flight, batches of 32
        alternating. Trio runs a scheduling batch in FIFO or reverse order, so one checkpoint can
        run the leader first; two always let the others run, and then it waits on while the queue
        still grows (bounded). Not a timer: an idle client's call waits two scheduler passes."""
        await trio.lowlevel.checkpoint()
        for _ in range(SETTLE_PASSES):
            queued = len(self.queue)
            await trio.lowlevel.checkpoint()
            if len(self.queue) == queued or len(self.queue) >= self.max_items:
                return

    async def _lead(self) -> None:
        self.busy = True
        try:
            await self._settle()
        except BaseException:
            self.busy = False  # cancelled while gathering: submit() hands the lead on
            raise
        taken, size, latest = 0, 0, 0.0
        while taken < min(len(self.queue), self.max_items):
            slot = self.queue[taken]
            if not taken:
                # A batch's timeout is the latest deadline in it, so it takes no call whose
                # deadline is far past the first one's: an unguarded call (see submit) is held
                # at most this spread past its own deadline. Under uniform timeouts the spread is
                # one round trip, far below it.
                latest = slot.deadline + max(MIN_DEADLINE_SPREAD_S, DEADLINE_SPREAD_SHARE
                                             * (slot.deadline - trio.current_time()))
            elif slot.deadline > latest:
                break
            size += self.size_of(slot.item)
            if taken and size > self.max_bytes:
                break
            taken += 1
        batch, self.queue = self.queue[:taken], self.queue[taken:]
        try:
            timeout = max(s.deadline for s in batch) - trio.current_time()
            results = await self.send([s.item for s in batch], max(timeout, 0.001))
            for slot, result in zip(batch, results):
                if isinstance(result, KvError):
                    slot.finish(error=result)
                else:
                    slot.finish(result)
            self.batches += 1
            self.items += len(batch)
        except KvError as exc:
            for slot in batch:
                slot.finish(error=exc)
        finally:
            for slot in batch:  # the leader was cancelled mid-flight: nobody may wait forever
                slot.finish(error=Unavailable("the batch carrying this call was cancelled"))
            self.busy = False
            if self.queue:
                self.queue[0].wake.set()  # the next waiting caller leads
            else:
                self.horizon = float("-inf")  # nothing queued or in flight

"""The bridge between the node's trio main loop and the grpc.aio transport thread (DESIGN.md §2).

What belongs here: moving one call at a time between the two event loops, cancellation in both
directions, and starting and stopping the transport thread. Nothing about kvstore's protocols.

grpcio has no trio support, so the node runs ``trio.run`` on the main thread and one transport
thread runs an asyncio loop that owns the grpc.aio server and every outbound channel. grpc.aio
objects must be created and awaited on that loop only, so even building a server or channel goes
through ``await transport.run(make_it)``.

Outbound, trio -> asyncio (``Transport.run``): the trio task hands a coroutine function to the loop
with ``loop.call_soon_threadsafe`` and parks in ``wait_task_rescheduled``; the asyncio task's done
callback wakes it with ``TrioToken.run_sync_soon``. If the trio task is cancelled, the asyncio task
is cancelled and the trio task waits for it to finish (trio's rule: a cancelled operation either
completed or had no effect, and never outlives its caller). A result that wins the race against
the cancellation is returned; trio raises ``Cancelled`` at the caller's next checkpoint.

Inbound, asyncio -> trio (``Transport.to_trio``, e.g. from a grpc.aio servicer): the asyncio task
asks trio, with ``run_sync_soon``, to spawn the work in the nursery run by ``Transport.serve`` and
awaits an asyncio future that trio completes with ``loop.call_soon_threadsafe``. If the asyncio task
is cancelled (the client cancelled the RPC or its deadline passed) the trio work's cancel scope is
cancelled; the asyncio task does not wait for it (asyncio's rule), but ``serve`` and ``aclose`` do.

Each call crosses threads exactly once each way; no thread is created per call, and neither thread
ever blocks waiting for the other.
"""
from __future__ import annotations

import asyncio
import logging
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import outcome
import trio

from kvstore.errors import Unavailable

logger = logging.getLogger(__name__)

#: The GIL switch interval of a process that runs a Transport (Python's default is 5 ms). Every
#: crossing between the trio thread, the transport thread and the storage threads needs the GIL;
#: when another thread is running Python, the default makes the crossing wait up to 5 ms, several
#: times per request. Measured on 3 nodes, 2 cores, 64 puts or gets in flight: put p99 73-82 ->
#: 43 ms, get p99 ~100 -> 38-47 ms, more ops/s; CPU per op about the same.
SWITCH_INTERVAL_S = 0.0005

#: How long aclose() lets the registered cleanups (server.stop(grace), channel.close()) run beyond
#: the grace period before giving up on them, so a wedged cleanup cannot hang node shutdown.
CLEANUP_SLACK_S = 1.0

AsyncFn = Callable[..., Awaitable[Any]]


class TransportClosed(Unavailable):
    """The transport is shut down (or not serving yet): the call was not run, or was cut short.

    Raised on whichever side asked. Travels as UNAVAILABLE: another node, or this one after a
    restart, can take the request.
    """


class _OutboundCall:
    """One trio -> asyncio call. ``finished`` is touched only on the loop thread."""

    __slots__ = ("async_fn", "args", "trio_task", "task", "finished", "raise_cancel")

    def __init__(self, async_fn: AsyncFn, args: tuple, trio_task: trio.lowlevel.Task | None):
        self.async_fn = async_fn
        self.args = args
        self.trio_task = trio_task  # None for run_nowait: nobody waits
        self.task: asyncio.Task | None = None
        self.finished = False
        # Set on the trio thread when trio delivers a cancellation to the waiting task.
        self.raise_cancel: Callable[[], Any] | None = None


class _InboundCall:
    """One asyncio -> trio call. ``scope`` and ``cancel_requested`` are touched only on trio."""

    __slots__ = ("async_fn", "args", "future", "scope", "cancel_requested")

    def __init__(self, async_fn: AsyncFn, args: tuple, future: asyncio.Future):
        self.async_fn = async_fn
        self.args = args
        self.future = future
        self.scope: trio.CancelScope | None = None
        self.cancel_requested = False


class Transport:
    """Owns one thread running an asyncio event loop; grpc.aio servers and channels live there."""

    loop: asyncio.AbstractEventLoop

    def __init__(self) -> None:
        # Use Transport.start(); the constructor only sets fields.
        self._token = trio.lowlevel.current_trio_token()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._thread_main, name="kvstore-transport", daemon=True
        )
        self._loop_started = trio.Event()
        self._thread_done = trio.Event()
        self._closed = trio.Event()  # aclose() finished
        self._inbound_drained = trio.Event()
        self._serve_stop = trio.Event()
        self._stop_requested: asyncio.Event | None = None  # created on the loop
        self._cleanups: list[tuple[AsyncFn, tuple]] = []
        self._nursery: trio.Nursery | None = None
        self._inbound: set[_InboundCall] = set()  # trio thread only
        self._outbound: set[_OutboundCall] = set()  # loop thread only
        self._accepting_inbound = True  # read from the loop thread, written on trio
        self._accepting_outbound = True  # trio thread only
        self._loop_stopping = False  # loop thread only
        self._closing = False

    # ----------------------------------------------------------------- lifecycle (trio side)

    @classmethod
    async def start(cls) -> Transport:
        """Start the transport thread and its loop; returns once the loop is running."""
        # Process-wide, and only ever lowered: the Transport is the node's, and its thread
        # crossings are the node's latency (see SWITCH_INTERVAL_S).
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_S))
        transport = cls()
        transport._thread.start()
        # Shielded: the loop starts at once, and a cancelled start() must not strand the thread.
        with trio.CancelScope(shield=True):
            await transport._loop_started.wait()
        if transport._thread_done.is_set():
            transport._thread.join()
            raise TransportClosed("the transport loop failed to start (see the log)")
        return transport

    async def serve(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run the nursery that to_trio() work is spawned into, until aclose() or cancellation."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await self._serve_stop.wait()
        finally:
            self._nursery = None
            self._accepting_inbound = False

    def add_cleanup(self, async_fn: AsyncFn, *args: Any) -> None:
        """Have aclose() run ``await async_fn(*args)`` on the loop, last registered first.

        Register ``server.stop(grace)`` and ``channel.close()`` here: a grpc.aio object that is
        garbage collected after the loop has closed tries to shut itself down on the dead loop.
        """
        self._cleanups.append((async_fn, args))

    async def aclose(self, grace_s: float = 5.0) -> None:
        """Stop the transport: drain inbound work for up to grace_s, run cleanups, stop the thread.

        Idempotent; a concurrent second call waits for the first. Always bounded in time: inbound
        work still running after the grace is cancelled (its asyncio callers get TransportClosed),
        and cleanups get grace_s + CLEANUP_SLACK_S.
        """
        if self._closing:
            with trio.CancelScope(shield=True):
                await self._closed.wait()
            return
        self._closing = True
        # Shielded because every step below is bounded, and stopping half way (a cancelled
        # caller) would leave the thread running.
        with trio.CancelScope(shield=True):
            try:
                await self._drain_inbound(grace_s)
                self._serve_stop.set()

                # In-flight inbound work is over, so nothing of ours needs the loop any more.
                self._accepting_outbound = False
                with trio.move_on_after(max(grace_s, 0.0) + CLEANUP_SLACK_S) as deadline:
                    while self._cleanups:
                        async_fn, args = self._cleanups.pop()
                        try:
                            await self._run(async_fn, args)
                        except Exception:
                            logger.exception("transport cleanup %r failed", async_fn)
                if deadline.cancelled_caught:
                    logger.warning("transport cleanups timed out; skipped %r", self._cleanups)

                # FIFO: every call scheduled before this one starts before the loop stops, and
                # the loop's shutdown then cancels it, which completes its trio caller.
                self.loop.call_soon_threadsafe(self._request_stop)
                await self._thread_done.wait()
                # The thread has sent its last message and is returning: join takes microseconds.
                self._thread.join()
            finally:
                self._closed.set()

    async def _drain_inbound(self, grace_s: float) -> None:
        self._accepting_inbound = False
        if not self._inbound:
            return
        with trio.move_on_after(grace_s):
            await self._inbound_drained.wait()
        for call in list(self._inbound):
            self._cancel_inbound(call)
        # Cancelled trio work finishes promptly; waiting for it means nothing is left to touch
        # the loop after the loop is gone.
        await self._inbound_drained.wait()

    # ----------------------------------------------------------------- trio -> asyncio

    async def run(self, async_fn: AsyncFn, *args: Any) -> Any:
        """From trio: run ``await async_fn(*args)`` as a loop task; return or raise its result."""
        # Still open while aclose() drains inbound work: that work may need outbound calls.
        if not self._accepting_outbound:
            raise TransportClosed("transport is closed: cannot run %r on its loop" % (async_fn,))
        return await self._run(async_fn, args)

    def run_nowait(self, async_fn: AsyncFn, *args: Any) -> None:
        """From trio: start ``async_fn(*args)`` on the loop, return at once; errors are logged."""
        if not self._accepting_outbound:
            raise TransportClosed("transport is closed: cannot run %r on its loop" % (async_fn,))
        self.loop.call_soon_threadsafe(self._start_outbound, _OutboundCall(async_fn, args, None))

    async def _run(self, async_fn: AsyncFn, args: tuple) -> Any:
        call = _OutboundCall(async_fn, args, trio.lowlevel.current_task())
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            self.loop.call_soon_threadsafe(self._start_outbound, call)
        except RuntimeError as exc:  # the loop is closed
            raise TransportClosed("transport loop is closed") from exc

        def abort(raise_cancel: Callable[[], Any]) -> trio.lowlevel.Abort:
            call.raise_cancel = raise_cancel
            try:
                self.loop.call_soon_threadsafe(self._cancel_outbound, call)
            except RuntimeError:
                pass  # the loop is gone; its shutdown already completed or will complete the call
            # FAILED: keep waiting until the asyncio task has really finished, so the outcome is
            # known (it may have completed after all) and nothing outlives the caller.
            return trio.lowlevel.Abort.FAILED

        return await trio.lowlevel.wait_task_rescheduled(abort)

    def _wake_outbound(self, call: _OutboundCall, result: outcome.Outcome) -> None:
        # Trio thread: turn asyncio's CancelledError into what the trio caller should see.
        if isinstance(result, outcome.Error) and isinstance(result.error, asyncio.CancelledError):
            if call.raise_cancel is not None:
                # Our cancellation took effect: trio's own Cancelled (or KeyboardInterrupt).
                result = outcome.capture(call.raise_cancel)
            else:
                stopped = "transport loop stopped while running %r" % (call.async_fn,)
                result = outcome.Error(TransportClosed(stopped))
        trio.lowlevel.reschedule(call.trio_task, result)

    # Loop thread from here to the end of this section.

    def _start_outbound(self, call: _OutboundCall) -> None:
        if self._loop_stopping:
            self._finish_outbound(call, outcome.Error(TransportClosed("transport loop stopping")))
            return

        # A real coroutine that creates the user's awaitable on the loop: grpc call objects are
        # awaitables bound to the loop they were made on, and a coroutine cancelled before its
        # first step never creates the user's awaitable (no "never awaited" warning).
        async def invoke() -> Any:
            return await call.async_fn(*call.args)

        call.task = self.loop.create_task(invoke())
        self._outbound.add(call)  # asyncio keeps only weak references to tasks
        call.task.add_done_callback(lambda task: self._outbound_task_done(call, task))

    def _cancel_outbound(self, call: _OutboundCall) -> None:
        if call.task is not None:
            call.task.cancel()

    def _outbound_task_done(self, call: _OutboundCall, task: asyncio.Task) -> None:
        self._outbound.discard(call)
        if task.cancelled():
            result: outcome.Outcome = outcome.Error(asyncio.CancelledError())
        elif (exc := task.exception()) is not None:
            result = outcome.Error(exc)
        else:
            result = outcome.Value(task.result())
        self._finish_outbound(call, result)

    def _finish_outbound(self, call: _OutboundCall, result: outcome.Outcome) -> None:
        if call.finished:
            return
        call.finished = True
        if call.trio_task is None:
            if isinstance(result, outcome.Error) and not isinstance(
                result.error, asyncio.CancelledError | TransportClosed
            ):
                logger.error("run_nowait(%r) failed", call.async_fn, exc_info=result.error)
            return
        try:
            self._token.run_sync_soon(self._wake_outbound, call, result)
        except trio.RunFinishedError:
            pass  # unreachable while the task waits; nobody is left to tell

    # ----------------------------------------------------------------- asyncio -> trio

    def to_trio_nowait(self, fn: Callable[..., Any], *args: Any) -> None:
        """From the loop (or any thread): run the plain function `fn(*args)` on trio soon, in order
        with every other call handed to trio, without waiting for it. Dropped once trio is gone."""
        try:
            self._token.run_sync_soon(fn, *args)
        except trio.RunFinishedError:
            pass

    async def to_trio(self, async_fn: AsyncFn, *args: Any) -> Any:
        """From the loop: ``await async_fn(*args)`` as a trio task in serve()'s nursery.

        Returns its result or raises its exception. Cancelling the calling asyncio task cancels
        the trio work. Raises TransportClosed at once when the trio side is not serving.
        """
        if not self._accepting_inbound:
            raise TransportClosed("transport is not serving: the node is shutting down")
        future = self.loop.create_future()
        call = _InboundCall(async_fn, args, future)
        try:
            self._token.run_sync_soon(self._spawn_inbound, call)
        except trio.RunFinishedError as exc:
            raise TransportClosed("the node's trio loop has exited") from exc
        future.add_done_callback(lambda fut: self._inbound_future_done(call, fut))
        return await future

    def _inbound_future_done(self, call: _InboundCall, future: asyncio.Future) -> None:
        # A cancelled future means its awaiting task was cancelled (RPC cancelled or past its
        # deadline, or the loop shutting down): pass the cancellation on to trio.
        if future.cancelled():
            try:
                self._token.run_sync_soon(self._cancel_inbound, call)
            except trio.RunFinishedError:
                pass

    def _settle_inbound(self, call: _InboundCall, result: outcome.Outcome) -> None:
        # Loop thread. The future may already be cancelled: the caller gave up while the result
        # was on its way, and asyncio says a cancelled caller sees CancelledError, so drop it.
        future = call.future
        if future.done():
            return
        if isinstance(result, outcome.Value):
            future.set_result(result.value)
            return
        try:
            future.set_exception(result.error)
        except TypeError:  # asyncio refuses StopIteration; the waiter must still be woken
            future.set_exception(RuntimeError("trio work raised %r" % (result.error,)))

    # Trio thread from here to the end of this section (run_sync_soon callbacks must not raise).

    def _spawn_inbound(self, call: _InboundCall) -> None:
        if self._accepting_inbound and self._nursery is not None:
            try:
                self._nursery.start_soon(
                    self._inbound_task, call, name="to_trio(%r)" % (call.async_fn,)
                )
                self._inbound.add(call)
                return
            except RuntimeError:  # nursery closed to new arrivals
                pass
        refused = TransportClosed("transport is not serving: the node is shutting down")
        self._send_inbound_result(call, outcome.Error(refused))

    def _cancel_inbound(self, call: _InboundCall) -> None:
        call.cancel_requested = True
        if call.scope is not None:
            call.scope.cancel()

    async def _inbound_task(self, call: _InboundCall) -> None:
        result: outcome.Outcome | None = None
        try:
            with trio.CancelScope() as scope:
                call.scope = scope
                if call.cancel_requested:  # cancelled before it started
                    scope.cancel()
                try:
                    result = outcome.Value(await call.async_fn(*call.args))
                except Exception as exc:  # not BaseException: trio's Cancelled must propagate
                    result = outcome.Error(exc)
        finally:
            self._inbound.discard(call)
            if not self._inbound and not self._accepting_inbound:
                self._inbound_drained.set()
            if result is None:
                # Cancelled: by the asyncio caller (it no longer waits and drops this), or by
                # shutdown (the caller must hear of it rather than hang).
                result = outcome.Error(
                    TransportClosed("transport shut down while %r was running" % (call.async_fn,))
                )
            self._send_inbound_result(call, result)

    def _send_inbound_result(self, call: _InboundCall, result: outcome.Outcome) -> None:
        try:
            self.loop.call_soon_threadsafe(self._settle_inbound, call, result)
        except RuntimeError:
            pass  # the loop is closed; its shutdown cancelled the waiting asyncio task

    # ----------------------------------------------------------------- the transport thread

    def _request_stop(self) -> None:
        assert self._stop_requested is not None
        self._stop_requested.set()

    def _thread_main(self) -> None:
        loop = self.loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._loop_main())
        except BaseException:
            logger.exception("transport loop crashed")
        finally:
            try:
                loop.run_until_complete(self._cancel_all_tasks())
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
            except BaseException:
                logger.exception("transport loop shutdown failed")
            finally:
                # Anything still unfinished (only after a crash) must not leave trio waiting.
                died = TransportClosed("transport loop died")
                for call in list(self._outbound):
                    self._finish_outbound(call, outcome.Error(died))
                loop.close()
                asyncio.set_event_loop(None)
                # thread_done first: start() checks it as soon as loop_started wakes it.
                for event in (self._thread_done, self._loop_started):
                    try:
                        self._token.run_sync_soon(event.set)
                    except trio.RunFinishedError:
                        pass

    async def _loop_main(self) -> None:
        self._stop_requested = asyncio.Event()
        self._token.run_sync_soon(self._loop_started.set)
        await self._stop_requested.wait()

    async def _cancel_all_tasks(self) -> None:
        # Calls that are still running are cut short: their trio callers get TransportClosed.
        self._loop_stopping = True
        current = asyncio.current_task()
        tasks = [task for task in asyncio.all_tasks() if task is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@asynccontextmanager
async def open_transport(grace_s: float = 5.0) -> AsyncIterator[Transport]:
    """Start a Transport, serve inbound work in a nursery, and aclose it on exit."""
    transport = await Transport.start()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(transport.serve)
            try:
                yield transport
            finally:
                # Shielded: shutdown must finish even when the body was cancelled; aclose bounds
                # its own duration.
                with trio.CancelScope(shield=True):
                    await transport.aclose(grace_s)
    finally:
        with trio.CancelScope(shield=True):
            await transport.aclose(grace_s)

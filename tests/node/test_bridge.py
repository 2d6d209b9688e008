"""Tests of the trio <-> grpc.aio bridge (kvstore/node/bridge.py): both directions, real gRPC on
loopback, cancellation both ways, errors, shutdown and thread hygiene."""
from __future__ import annotations

import asyncio
import random
import threading
import time

import grpc
import pytest
import trio
import trio.testing

from kvstore.errors import NotFound
from kvstore.node.bridge import Transport, TransportClosed, open_transport

SERVICE = "kvstore.test.Bridge"


@pytest.fixture
async def transport():
    async with open_transport(grace_s=1.0) as transport:
        yield transport


def on_trio_thread() -> bool:
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        return False
    return True


async def start_grpc(transport: Transport, work, *, grace_s: float = 0.5):
    """A grpc.aio server whose one method does `work(request)` in trio, and a channel to it.

    Both live on the transport loop and are closed by the transport's cleanups. Returns the
    multi-callable: await it on the loop, via transport.run.
    """

    async def handler(request: bytes, context) -> bytes:
        return await transport.to_trio(work, request)

    async def make_server():
        server = grpc.aio.server()
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    SERVICE, {"Work": grpc.unary_unary_rpc_method_handler(handler)}
                ),
            )
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = await transport.run(make_server)
    transport.add_cleanup(server.stop, grace_s)

    async def make_channel():
        return grpc.aio.insecure_channel(f"127.0.0.1:{port}")

    channel = await transport.run(make_channel)
    transport.add_cleanup(channel.close)  # runs before server.stop: cleanups are LIFO
    return channel.unary_unary(f"/{SERVICE}/Work")


# ------------------------------------------------------------------------------- round trips


async def test_run_returns_the_asyncio_result(transport):
    async def double(x):
        await asyncio.sleep(0)
        assert asyncio.get_running_loop() is transport.loop
        assert threading.current_thread().name == "kvstore-transport"
        return x * 2

    assert await transport.run(double, 21) == 42


async def test_to_trio_returns_the_trio_result(transport):
    async def triple(x):
        await trio.sleep(0)
        assert on_trio_thread()
        return x * 3

    async def from_asyncio():
        assert not on_trio_thread()
        return await transport.to_trio(triple, 14)

    assert await transport.run(from_asyncio) == 42


async def test_500_concurrent_calls_each_way_get_their_own_results(transport):
    async def echo_asyncio(i):
        await asyncio.sleep(0)
        return i

    results = {}

    async def call(i):
        results[i] = await transport.run(echo_asyncio, i)

    async with trio.open_nursery() as nursery:
        for i in range(500):
            nursery.start_soon(call, i)
    assert results == {i: i for i in range(500)}

    async def echo_trio(i):
        await trio.sleep(0)
        return -i

    async def fan_out():
        return await asyncio.gather(*(transport.to_trio(echo_trio, i) for i in range(500)))

    assert await transport.run(fan_out) == [-i for i in range(500)]


async def test_run_nowait_runs_on_the_loop(transport):
    done = trio.Event()
    token = trio.lowlevel.current_trio_token()

    async def notify():
        await asyncio.sleep(0)
        token.run_sync_soon(done.set)

    transport.run_nowait(notify)
    with trio.fail_after(5):
        await done.wait()


async def test_200_concurrent_rpcs_through_a_real_grpc_server(transport):
    async def reverse(request: bytes) -> bytes:
        await trio.sleep(0)
        assert on_trio_thread()
        return request[::-1]

    work = await start_grpc(transport, reverse)

    async def rpc(request: bytes) -> bytes:
        return await work(request, timeout=10)

    results = {}

    async def call(i):
        results[i] = await transport.run(rpc, b"req-%d" % i)

    with trio.fail_after(8):
        async with trio.open_nursery() as nursery:
            for i in range(200):
                nursery.start_soon(call, i)
    assert results == {i: (b"req-%d" % i)[::-1] for i in range(200)}


# ------------------------------------------------------------------------------- cancellation


async def test_trio_timeout_cancels_the_asyncio_task(transport):
    seen = []

    async def sleep_forever():
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            seen.append("asyncio CancelledError")
            raise

    with trio.fail_after(5):
        with trio.move_on_after(0.05) as scope:
            await transport.run(sleep_forever)
    assert scope.cancelled_caught
    # run() waits for the asyncio task to finish, so its cancellation is already observed.
    assert seen == ["asyncio CancelledError"]


async def test_cancel_before_the_asyncio_task_starts_never_runs_it(transport):
    ran = []

    async def record():
        ran.append(True)

    # Block the loop so that starting the task and cancelling it queue up behind the sleep: the
    # cancel then reaches the task before its first step.
    transport.loop.call_soon_threadsafe(time.sleep, 0.1)
    with trio.fail_after(5):
        with trio.move_on_after(0.01) as scope:
            await transport.run(record)
    assert scope.cancelled_caught
    assert ran == []


async def test_result_that_beats_the_cancellation_is_returned(transport):
    token = trio.lowlevel.current_trio_token()
    with trio.fail_after(5), trio.CancelScope() as scope:

        async def finishes_anyway():
            token.run_sync_soon(scope.cancel)
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                return "finished anyway"

        assert await transport.run(finishes_anyway) == "finished anyway"
        # trio's rule: the completed operation's result is kept, Cancelled comes next checkpoint.
        await trio.lowlevel.checkpoint()
        pytest.fail("the cancelled scope must raise at the next checkpoint")
    assert scope.cancelled_caught


async def test_cancelled_asyncio_caller_cancels_the_trio_work(transport):
    trio_cancelled = trio.Event()
    started_on_loop: asyncio.Event | None = None

    async def trio_work():
        transport.loop.call_soon_threadsafe(started_on_loop.set)
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            trio_cancelled.set()
            raise

    async def caller():
        nonlocal started_on_loop
        started_on_loop = asyncio.Event()
        task = asyncio.ensure_future(transport.to_trio(trio_work))
        await started_on_loop.wait()
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            return "asyncio caller cancelled"
        return "not cancelled"

    with trio.fail_after(5):
        assert await transport.run(caller) == "asyncio caller cancelled"
        await trio_cancelled.wait()


async def test_asyncio_cancel_that_arrives_before_the_trio_work_starts_still_cancels_it(
    transport,
):
    trio_cancelled = trio.Event()

    async def trio_work():
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            trio_cancelled.set()
            raise

    async def caller():
        task = asyncio.ensure_future(transport.to_trio(trio_work))
        await asyncio.sleep(0)  # the request to spawn is sent; trio has most likely not run it
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            return "cancelled"

    with trio.fail_after(5):
        assert await transport.run(caller) == "cancelled"
        await trio_cancelled.wait()


async def test_rpc_deadline_cancels_the_trio_work(transport):
    trio_cancelled = trio.Event()

    async def slow(request: bytes) -> bytes:
        try:
            await trio.sleep(30)
        except trio.Cancelled:
            trio_cancelled.set()
            raise
        return request

    work = await start_grpc(transport, slow)

    async def rpc():
        return await work(b"x", timeout=0.2)

    with trio.fail_after(5):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await transport.run(rpc)
        await trio_cancelled.wait()
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


#: Checkpoints of random delay on each side in the race tests: enough that some calls finish
#: first and some are cancelled first.
STEPS = 8


async def test_trio_cancellations_racing_results_complete_every_call_once(transport):
    # Each call is cancelled from trio at a random moment relative to the asyncio work finishing.
    # trio.lowlevel.reschedule would crash the run on a double completion, and a lost completion
    # hangs (fail_after); a value reaches trio exactly when the asyncio work returned.
    rng = random.Random(7)
    asyncio_returned: set[int] = set()
    trio_got: dict[int, str] = {}

    async def work(i, steps):
        for _ in range(steps):
            await asyncio.sleep(0)
        asyncio_returned.add(i)
        return i

    async def call(i, steps, scope):
        with scope:
            assert await transport.run(work, i, steps) == i
            trio_got[i] = "value"
            return
        trio_got[i] = "cancelled"

    async def cancel_later(scope, checkpoints):
        for _ in range(checkpoints):
            await trio.sleep(0)
        scope.cancel()

    with trio.fail_after(8):
        async with trio.open_nursery() as nursery:
            for i in range(300):
                scope = trio.CancelScope()
                nursery.start_soon(call, i, rng.randrange(STEPS), scope)
                nursery.start_soon(cancel_later, scope, rng.randrange(STEPS))
    assert len(trio_got) == 300
    assert {i for i, got in trio_got.items() if got == "value"} == asyncio_returned


async def test_asyncio_cancellations_racing_results_complete_every_call_once(transport):
    # The inbound mirror: asyncio callers cancelled at random moments while trio finishes.
    rng = random.Random(11)
    trio_returned: set[int] = set()

    async def work(i, steps):
        for _ in range(steps):
            await trio.sleep(0)
        trio_returned.add(i)
        return i

    async def one_caller(i):
        task = asyncio.ensure_future(transport.to_trio(work, i, rng.randrange(STEPS)))
        for _ in range(rng.randrange(STEPS)):
            await asyncio.sleep(0)
        task.cancel()
        try:
            return await task
        except asyncio.CancelledError:
            return "cancelled"

    async def callers():
        return await asyncio.gather(*(one_caller(i) for i in range(300)))

    with trio.fail_after(8):
        results = await transport.run(callers)
        while transport._inbound:  # the cancelled trio work winds down after its caller left
            await trio.sleep(0)
    got_values = {r for r in results if r != "cancelled"}
    # A value reaches asyncio only when trio produced it (it may be dropped if the caller was
    # cancelled first: asyncio's rule is that a cancelled caller sees CancelledError).
    assert got_values <= trio_returned
    assert all(r == i or r == "cancelled" for i, r in enumerate(results))


# ------------------------------------------------------------------------------- errors


async def test_asyncio_error_arrives_in_trio_with_its_type(transport):
    async def fail():
        await asyncio.sleep(0)
        raise ValueError("bad on asyncio")

    with pytest.raises(ValueError, match="bad on asyncio"):
        await transport.run(fail)

    async def not_found():
        raise NotFound("no such key")

    with pytest.raises(NotFound, match="no such key"):
        await transport.run(not_found)


async def test_trio_error_arrives_in_asyncio_with_its_type(transport):
    async def fail():
        await trio.sleep(0)
        raise ValueError("bad on trio")

    async def caller():
        try:
            await transport.to_trio(fail)
        except ValueError as exc:
            return "asyncio caught ValueError: %s" % exc
        return "nothing raised"

    assert await transport.run(caller) == "asyncio caught ValueError: bad on trio"
    # Uncaught, it crosses back to trio still a ValueError.
    with pytest.raises(ValueError, match="bad on trio"):
        await transport.run(transport.to_trio, fail)


# ------------------------------------------------------------------------------- shutdown


async def test_shutdown_while_busy_returns_promptly_and_fails_the_callers():
    transport = await Transport.start()
    started = 0
    all_started = trio.Event()

    async def long_work():
        nonlocal started
        started += 1
        if started == 50:
            all_started.set()
        await trio.sleep_forever()

    async def fifty_callers():
        return await asyncio.gather(
            *(transport.to_trio(long_work) for _ in range(50)), return_exceptions=True
        )

    inbound_results = []
    outbound_errors = []

    async def call_in():
        inbound_results.extend(await transport.run(fifty_callers))

    async def wait_forever():
        await asyncio.Event().wait()

    async def call_out():
        try:
            await transport.run(wait_forever)
        except TransportClosed as exc:
            outbound_errors.append(exc)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(transport.serve)
            nursery.start_soon(call_in)
            nursery.start_soon(call_out)
            await all_started.wait()
            t0 = trio.current_time()
            await transport.aclose(grace_s=0.1)
            elapsed = trio.current_time() - t0
    # Grace is 0.1 s and nothing was registered to clean up: far below the 5 s default grace.
    assert elapsed < 2.0
    assert len(inbound_results) == 50
    assert all(isinstance(r, TransportClosed) for r in inbound_results)
    assert len(outbound_errors) == 1
    with pytest.raises(TransportClosed):
        await transport.run(asyncio.sleep, 0)
    await transport.aclose()  # idempotent


async def test_shutdown_lets_inbound_work_finish_within_grace_and_refuses_new_work():
    with trio.fail_after(5):
        await _finish_within_grace_and_refuse_new_work()


async def _finish_within_grace_and_refuse_new_work():
    async with open_transport(grace_s=5.0) as transport:
        release = trio.Event()
        work_started = trio.Event()

        async def work():
            work_started.set()
            await release.wait()
            return "finished in grace"

        result = []

        async def call_in():
            result.append(await transport.run(transport.to_trio, work))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(call_in)
            await work_started.wait()
            nursery.start_soon(transport.aclose)
            await trio.testing.wait_all_tasks_blocked()  # aclose now waits on the work

            async def late_caller():
                try:
                    await transport.to_trio(trio.sleep, 0)
                except TransportClosed as exc:
                    return exc
                return None

            # Outbound calls still work during the grace, and new inbound work is refused.
            assert isinstance(await transport.run(late_caller), TransportClosed)
            release.set()
        assert result == ["finished in grace"]


async def test_cleanups_run_on_the_loop_in_reverse_order():
    order = []

    def cleanup(name):
        async def run():
            assert threading.current_thread().name == "kvstore-transport"
            order.append(name)

        return run

    async with open_transport(grace_s=0.5) as transport:
        transport.add_cleanup(cleanup("server"))
        transport.add_cleanup(cleanup("channel"))
    assert order == ["channel", "server"]


async def test_to_trio_is_refused_at_once_when_nothing_serves():
    transport = await Transport.start()
    try:
        with pytest.raises(TransportClosed, match="not serving"):
            await transport.run(transport.to_trio, trio.sleep, 0)
    finally:
        await transport.aclose()


async def test_aclose_leaves_no_threads_of_ours():
    before = {t.ident for t in threading.enumerate()}
    async with open_transport(grace_s=0.5) as transport:
        work = await start_grpc(transport, _echo)

        async def rpc():
            return await work(b"ping", timeout=5)

        assert await transport.run(rpc) == b"ping"
        thread = transport._thread
        assert thread.is_alive()
    assert not thread.is_alive()
    # grpc.aio starts one process-wide poller thread ("Thread-N (_poll_wrapper)") with its first
    # server or channel. It outlives server.stop() and channel.close(): grpc joins it only when
    # the last grpc.aio object is garbage collected. It is grpc's, not ours, so it is excluded.
    new = [
        t.name
        for t in threading.enumerate()
        if t.ident not in before and not t.name.endswith("(_poll_wrapper)")
    ]
    assert new == []


async def _echo(request: bytes) -> bytes:
    await trio.sleep(0)
    return request

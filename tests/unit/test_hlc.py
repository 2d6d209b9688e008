"""The hybrid logical clock: strictly increasing, following what it receives, within reason."""
from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from kvstore.core.hlc import MAX_DRIFT_MS, HybridClock, pack, physical_ms

WALL = 1_800_000_000_000


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 2_000), st.integers(0, 1 << 20)), max_size=200))
def test_timestamps_strictly_increase_whatever_the_wall_clock_and_messages_do(steps) -> None:
    clock, last = HybridClock(), -1
    for receive, wall_step_back, remote_offset in steps:
        wall = WALL - wall_step_back  # the wall clock may go backwards
        ts = clock.observe(pack(WALL, 0) + remote_offset, wall) if receive else clock.now(wall)
        assert ts > last
        last = ts


def test_events_after_a_receipt_order_after_it_even_with_a_slow_wall_clock() -> None:
    clock = HybridClock()
    remote = pack(WALL + 30_000, 7)  # the sender's clock runs 30 s ahead of ours
    clock.observe(remote, WALL)
    assert clock.now(WALL) > remote
    assert physical_ms(clock.now(WALL)) == WALL + 30_000  # stays with the sender, not ahead of it


def test_a_timestamp_too_far_in_the_future_is_not_followed() -> None:
    clock = HybridClock()
    for forged in (pack(WALL + MAX_DRIFT_MS + 1, 0), (1 << 64) - 1):
        ts = clock.observe(forged, WALL)
        assert physical_ms(ts) == WALL and ts < (1 << 64)
    assert clock.ignored == 2
    assert physical_ms(clock.observe(pack(WALL + MAX_DRIFT_MS, 0), WALL)) == WALL + MAX_DRIFT_MS

"""Phi-accrual failure detector: synthetic arrival series against what the formulas promise."""
from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.core.failure import DetectorConfig, PhiAccrualDetector, phi_of

PEER = "n1"


def fed(times: list[float], config: DetectorConfig | None = None, generation: int = 0) -> PhiAccrualDetector:
    detector = PhiAccrualDetector(config or DetectorConfig())
    for t in times:
        detector.heartbeat(PEER, t, generation)
    return detector


def regular(count: int, interval_s: float = 1.0, start_s: float = 0.0) -> list[float]:
    return [start_s + i * interval_s for i in range(count)]


def crossing_time(detector: PhiAccrualDetector, after_s: float, step_s: float = 0.01, limit_s: float = 120.0) -> float:
    """Seconds after `after_s` at which the peer first counts as down."""
    elapsed = 0.0
    while detector.is_available(PEER, after_s + elapsed):
        elapsed += step_s
        assert elapsed < limit_s, "phi never crossed the threshold"
    return elapsed


def phi_threshold_y(threshold: float) -> float:
    """Standard deviations past the mean at which phi_of reaches `threshold` (bisection)."""
    lo, hi = 0.0, 40.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if phi_of(mid, 0.0, 1.0) < threshold else (lo, mid)
    return lo


def test_regular_heartbeats_keep_phi_low() -> None:
    detector = fed(regular(200))
    last = 199.0
    for elapsed in (0.0, 0.5, 1.0, 1.5, 2.0):
        assert detector.phi(PEER, last + elapsed) < 0.5
    assert detector.is_available(PEER, last + 3.0)


def test_phi_rises_monotonically_and_crosses_after_the_expected_time() -> None:
    config = DetectorConfig()
    detector = fed(regular(200), config)
    last = 199.0
    phis = [detector.phi(PEER, last + k * 0.05) for k in range(400)]
    assert all(b >= a for a, b in zip(phis, phis[1:]))
    assert phis[-1] > phis[100] > phis[0]
    # perfectly regular: std is the floor, so down at mean + pause + y(8) * min_std
    expected = 1.0 + config.acceptable_pause_s + phi_threshold_y(8.0) * config.min_std_deviation_s
    assert crossing_time(detector, last) == pytest.approx(expected, abs=0.02)
    assert 4.0 < expected < 5.0


def test_phi_grows_without_bound_and_stays_finite() -> None:
    detector = fed(regular(50))
    assert 100 < detector.phi(PEER, 49.0 + 60.0) < math.inf
    assert detector.phi(PEER, 49.0 + 1e9) < math.inf


@pytest.mark.parametrize("pause_s", [3.0, 0.0])
def test_gaussian_jitter_gives_no_false_down_in_10000_intervals(pause_s: float) -> None:
    # 20% Gaussian jitter on a 1 s interval; phi peaks just before each arrival (it only grows
    # between arrivals), so checking there covers the whole series
    rng = random.Random(5677)
    detector = PhiAccrualDetector(DetectorConfig(acceptable_pause_s=pause_s))
    now = 0.0
    detector.heartbeat(PEER, now)
    worst = 0.0
    for _ in range(10_000):
        interval = max(0.05, rng.gauss(1.0, 0.2))
        worst = max(worst, detector.phi(PEER, now + interval - 1e-9))
        now += interval
        detector.heartbeat(PEER, now)
    assert worst < 8.0


def test_a_pause_below_the_acceptable_pause_does_not_mark_down() -> None:
    config = DetectorConfig(acceptable_pause_s=3.0)
    detector = fed(regular(300), config)
    last = 299.0
    gc_pause = 2.5
    assert detector.is_available(PEER, last + 1.0 + gc_pause)
    detector.heartbeat(PEER, last + 1.0 + gc_pause)
    assert detector.is_available(PEER, last + 1.0 + gc_pause + 1.0)


def test_a_pause_well_beyond_the_acceptable_pause_marks_down() -> None:
    detector = fed(regular(300), DetectorConfig(acceptable_pause_s=3.0))
    assert not detector.is_available(PEER, 299.0 + 1.0 + 5.0)


def test_the_bootstrap_estimate_applies_until_min_samples_real_intervals() -> None:
    config = DetectorConfig(min_samples=5, bootstrap_interval_s=1.0)
    detector = fed([0.0, 0.2, 0.4, 0.6], config)      # 3 intervals of 0.2 s
    assert detector.sample_count(PEER) == 3
    assert detector.estimate(PEER) == (1.0, 0.25)        # bootstrap: interval, std a quarter of it
    detector.heartbeat(PEER, 0.8)
    detector.heartbeat(PEER, 1.0)
    mean, std = detector.estimate(PEER)                  # 5 real intervals: the data speaks
    assert mean == pytest.approx(0.2)
    assert std == config.min_std_deviation_s             # zero spread, floored


def test_the_window_keeps_only_the_last_max_samples() -> None:
    config = DetectorConfig(max_samples=10, min_samples=2)
    times = regular(11, 2.0) + regular(10, 1.0, start_s=21.0)
    detector = fed(times, config)
    assert detector.sample_count(PEER) == 10
    assert detector.estimate(PEER)[0] == pytest.approx(1.0)


def test_long_series_statistics_do_not_drift() -> None:
    config = DetectorConfig(max_samples=100)
    rng = random.Random(1)
    now, detector = 0.0, PhiAccrualDetector(config)
    intervals = []
    for _ in range(20_000):
        interval = 1000.0 + rng.random()
        intervals.append(interval)
        now += interval
        detector.heartbeat(PEER, now)
    window = intervals[-100:]
    mean = sum(window) / 100
    std = math.sqrt(sum((x - mean) ** 2 for x in window) / 100)
    got_mean, got_std = detector.estimate(PEER)
    assert got_mean == pytest.approx(mean, rel=1e-9)
    assert got_std == pytest.approx(max(std, config.min_std_deviation_s), rel=1e-3)


def test_a_brand_new_peer_is_neither_instantly_down_nor_forever_up() -> None:
    config = DetectorConfig(bootstrap_interval_s=1.0, acceptable_pause_s=3.0)
    detector = fed([100.0], config)                       # first sighting, no intervals yet
    assert detector.is_available(PEER, 100.0)
    assert detector.is_available(PEER, 104.0)
    expected = 1.0 + 3.0 + phi_threshold_y(8.0) * 0.25
    assert crossing_time(detector, 100.0) == pytest.approx(expected, abs=0.02)
    assert not detector.is_available(PEER, 100.0 + 60.0)


def test_unknown_and_removed_peers_are_not_available() -> None:
    detector = fed(regular(10))
    assert detector.phi("stranger", 5.0) == math.inf
    assert not detector.is_available("stranger", 5.0)
    assert PEER in detector and len(detector) == 1
    detector.remove(PEER)
    assert PEER not in detector
    assert not detector.is_available(PEER, 9.5)
    detector.remove(PEER)                                 # removing twice is harmless


def test_a_new_generation_starts_a_fresh_history() -> None:
    detector = fed(regular(100), generation=1)
    assert detector.sample_count(PEER) == 99
    detector.heartbeat(PEER, 99.0 + 30.0, generation=2)  # restarted after 30 s
    assert detector.sample_count(PEER) == 0               # the restart gap is not a sample
    assert detector.is_available(PEER, 129.5)
    detector.heartbeat(PEER, 200.0, generation=1)         # stale news of the old process
    assert detector.last_arrival(PEER) == 129.0


def test_arrivals_at_the_same_instant_or_earlier_are_not_samples() -> None:
    detector = fed([0.0, 1.0, 1.0, 0.5, 2.0])
    assert detector.sample_count(PEER) == 2
    assert detector.last_arrival(PEER) == 2.0


def test_for_interval_scales_the_defaults() -> None:
    config = DetectorConfig.for_interval(0.1)
    assert (config.bootstrap_interval_s, config.min_std_deviation_s, config.acceptable_pause_s) == \
        pytest.approx((0.1, 0.01, 0.3))
    assert DetectorConfig.for_interval(0.1, threshold=12.0).threshold == 12.0


@pytest.mark.parametrize("field, value", [
    ("threshold", 0.0), ("max_samples", 1), ("min_samples", 0), ("min_samples", 2000),
    ("bootstrap_interval_s", 0.0), ("min_std_deviation_s", 0.0), ("acceptable_pause_s", -1.0),
])
def test_config_validation_names_the_field(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        DetectorConfig(**{field: value}).validate()
    with pytest.raises(ValueError, match=field):
        PhiAccrualDetector(DetectorConfig(**{field: value}))


@settings(max_examples=200, deadline=None)
@given(st.floats(0, 1e6), st.floats(0, 1e6), st.floats(0.001, 1e3), st.floats(1e-6, 1e3))
def test_phi_of_is_finite_nonnegative_and_monotonic(a: float, b: float, mean: float, std: float) -> None:
    lo, hi = sorted((a, b))
    p_lo, p_hi = phi_of(lo, mean, std), phi_of(hi, mean, std)
    assert 0.0 <= p_lo <= p_hi < math.inf

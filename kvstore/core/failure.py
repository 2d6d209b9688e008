"""Phi-accrual failure detection (pure): per peer, the history of heartbeat arrival times and the
suspicion level phi that the peer is down. Belongs here: the statistics only. The node feeds it the
times at which it learned of a peer's heartbeat increase; time is an argument (`now_s`), never read.

Formulation: Hayashibara et al.'s phi with the normal distribution, as Akka does (not Cassandra's
exponential one). phi = -log10(P(a heartbeat arrives later than `elapsed`)), where the arrival
interval is modelled as Normal(mean + acceptable_pause, max(std, min_std_deviation)).

Why normal rather than exponential: the exponential model ignores how regular a peer is and at
phi 8 waits ~18 mean intervals before accusing anyone; the normal model accuses a regular peer in
a few intervals while a jittery one gets proportionally more slack, and the two floors below keep it
from flapping under load (Scylla #5677, Consul #1212), which is the exponential model's one merit:
- `min_std_deviation_s`: a peer that was perfectly regular would otherwise have std ~0, and one late
  heartbeat would take phi to infinity;
- `acceptable_pause_s`: a fixed allowance (GC pause, busy event loop, a lost gossip message) added
  to the mean, so one long pause below it never accuses anybody.

The logistic approximation of the normal CDF (Bowling et al. 2009, used by Akka) is evaluated in
log space, so phi stays finite and monotonic for any elapsed time (no exp overflow, no log10(0)).
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Iterator

_LN10 = math.log(10.0)
# Exact window sums are recomputed after this many incremental updates, so float drift from
# adding and subtracting millions of samples never grows (the window itself is at most 1000 long).
_RESUM_EVERY = 4096


@dataclass(frozen=True)
class DetectorConfig:
    """Tuning of the detector; times in seconds. Defaults assume a 1 s gossip interval (Akka's
    cluster defaults); `for_interval` scales them to another one."""

    threshold: float = 8.0               # phi at which a peer is down: ~1e-8 chance a live peer is accused
    max_samples: int = 1000              # window of inter-arrival times (Akka, Cassandra): adapts in minutes
    min_samples: int = 5                 # until this many real intervals, use the bootstrap estimate
    bootstrap_interval_s: float = 1.0    # expected interval of a peer with no history (= gossip interval)
    min_std_deviation_s: float = 0.1     # Akka: floor so a very regular peer is not accused on one late beat
    acceptable_pause_s: float = 3.0      # Akka: pause tolerated on top of the mean (GC, busy loop, lost message)

    @classmethod
    def for_interval(cls, interval_s: float, **overrides: Any) -> "DetectorConfig":
        """Defaults scaled to a gossip interval: bootstrap = interval, min std = interval/10,
        acceptable pause = 3 intervals (the ratios of Akka's 1 s defaults)."""
        base = cls(bootstrap_interval_s=interval_s, min_std_deviation_s=interval_s / 10,
                   acceptable_pause_s=3 * interval_s)
        return replace(base, **overrides).validate()

    def validate(self) -> "DetectorConfig":
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        need(self.threshold > 0, "threshold: must be > 0")
        need(self.max_samples >= 2, "max_samples: must be >= 2")
        need(1 <= self.min_samples <= self.max_samples, "min_samples: must be in 1..max_samples")
        need(self.bootstrap_interval_s > 0, "bootstrap_interval_s: must be > 0")
        need(self.min_std_deviation_s > 0, "min_std_deviation_s: must be > 0")
        need(self.acceptable_pause_s >= 0, "acceptable_pause_s: must be >= 0")
        return self


def phi_of(elapsed_s: float, mean_s: float, std_s: float) -> float:
    """Suspicion that an arrival expected as Normal(mean, std) has not come after `elapsed_s`:
    -log10(P(later)), with P from the logistic approximation of the normal CDF."""
    y = (elapsed_s - mean_s) / std_s
    z = y * (1.5976 + 0.070566 * y * y)   # P(later) = 1 / (1 + e^z)
    # phi = log10(1 + e^z), a softplus, written so that neither branch can overflow
    softplus = z + math.log1p(math.exp(-z)) if z > 0 else math.log1p(math.exp(z))
    return softplus / _LN10


@dataclass
class _History:
    generation: int
    last_arrival_s: float
    intervals: deque[float]
    total: float = 0.0
    total_sq: float = 0.0
    updates: int = 0

    def add(self, interval_s: float) -> None:
        if len(self.intervals) == self.intervals.maxlen:
            old = self.intervals[0]
            self.total -= old
            self.total_sq -= old * old
        self.intervals.append(interval_s)
        self.total += interval_s
        self.total_sq += interval_s * interval_s
        self.updates += 1
        if self.updates % _RESUM_EVERY == 0:
            self.total = math.fsum(self.intervals)
            self.total_sq = math.fsum(x * x for x in self.intervals)

    def mean_std(self) -> tuple[float, float]:
        n = len(self.intervals)
        mean = self.total / n
        return mean, math.sqrt(max(0.0, self.total_sq / n - mean * mean))


@dataclass
class PhiAccrualDetector:
    """Per-peer arrival histories and their phi. Unknown peers (never heard of, or removed) have no
    evidence of life: phi is infinite and they are not available."""

    config: DetectorConfig = field(default_factory=DetectorConfig)
    _peers: dict[str, _History] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.config.validate()

    def heartbeat(self, node_id: str, now_s: float, generation: int = 0) -> None:
        """Record that a heartbeat increase of `node_id` (of process `generation`) was learned now.

        The first arrival starts the clock with the bootstrap estimate. A new generation is a new
        process: its history starts over, and the restart gap never enters the window. An older
        generation is stale news, not a sign of life, and is ignored; so is a second arrival at the
        same instant (it carries no timing information).
        """
        history = self._peers.get(node_id)
        if history is None or generation > history.generation:
            self._peers[node_id] = _History(generation, now_s, deque(maxlen=self.config.max_samples))
            return
        if generation < history.generation:
            return
        interval = now_s - history.last_arrival_s
        if interval <= 0:
            return
        history.add(interval)
        history.last_arrival_s = now_s

    def estimate(self, node_id: str) -> tuple[float, float] | None:
        """(mean, std) of the arrival interval used for phi, floors applied; None when unknown."""
        history = self._peers.get(node_id)
        if history is None:
            return None
        cfg = self.config
        if len(history.intervals) < cfg.min_samples:
            # Akka's first-heartbeat estimate: expected interval, std a quarter of it
            mean, std = cfg.bootstrap_interval_s, cfg.bootstrap_interval_s / 4
        else:
            mean, std = history.mean_std()
        return mean, max(std, cfg.min_std_deviation_s)

    def phi(self, node_id: str, now_s: float) -> float:
        history = self._peers.get(node_id)
        if history is None:
            return math.inf
        mean, std = self.estimate(node_id)  # type: ignore[misc]
        elapsed = max(0.0, now_s - history.last_arrival_s)
        return phi_of(elapsed, mean + self.config.acceptable_pause_s, std)

    def is_available(self, node_id: str, now_s: float) -> bool:
        return self.phi(node_id, now_s) < self.config.threshold

    def last_arrival(self, node_id: str) -> float | None:
        history = self._peers.get(node_id)
        return None if history is None else history.last_arrival_s

    def sample_count(self, node_id: str) -> int:
        history = self._peers.get(node_id)
        return 0 if history is None else len(history.intervals)

    def remove(self, node_id: str) -> None:
        """Forget a peer (it was removed or left): it becomes unknown, hence not available."""
        self._peers.pop(node_id, None)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._peers

    def __iter__(self) -> Iterator[str]:
        return iter(self._peers)

    def __len__(self) -> int:
        return len(self._peers)

"""Chaos scenarios against real node processes: a recorded workload under one kind of fault, then
heal, read everything back and check the history (cluster/chaos.py). Each run is seeded: the seed
is printed, and KVSTORE_CHAOS_SEED=<seed> replays the same fault schedule and workload choices
(`scripts/chaos --scenario NAME --seed SEED` does the same outside pytest)."""
from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import trio

from cluster.chaos import SCENARIOS, run_scenario
from cluster.checker import CheckResult, completed_ops, quorum_or_stronger
from cluster.history import OK, WRITE, History
from cluster.launcher import processes_under

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

RUN_LIMIT_S = 90.0  # a scenario takes ~20 s; this only stops a hung run


def seed() -> int:
    return int(os.environ.get("KVSTORE_CHAOS_SEED") or random.SystemRandom().randrange(1, 2**31))


async def run(name: str, tmp_path: Path) -> tuple[CheckResult, History, str]:
    s = seed()
    print(f"scenario {name} seed {s}: replay with KVSTORE_CHAOS_SEED={s} or scripts/chaos --scenario {name} --seed {s}")
    with trio.fail_after(RUN_LIMIT_S):
        result, history, report = await run_scenario(SCENARIOS[name], tmp_path / "run", s)
    print(report)
    assert processes_under(tmp_path / "run") == [], "the run left node processes behind"
    return result, history, report


def window(history: History, fault: str) -> tuple[float, float]:
    """When the fault was in force: from its start until its healing began."""
    start = next(e for e in history.faults if e.type == "start" and e.fault == fault)
    heal = next(e for e in history.faults if e.type == "heal" and e.id == start.id)
    return start.time, heal.time


def assert_valid(result: CheckResult, report: str) -> None:
    assert result.valid, report
    assert result.stats["acked_strong_expected"] > 0, "no acknowledged write was left to check\n" + report
    # the final phase ran whole: repair and tombstone GC on every node (a delete must hold after GC)
    skipped = [w.detail for w in result.warnings if w.kind == "incomplete-final-state"
               and w.detail.startswith(("repair on", "purge-tombstones on"))]
    assert skipped == [], report


async def test_kill_one_of_three_during_writes(tmp_path: Path) -> None:
    result, history, report = await run("kill-one-during-writes", tmp_path)
    assert_valid(result, report)
    [w] = result.windows
    assert w.fault == "kill" and w.ok > 0, report  # the other two kept serving


async def test_kill_and_restart_in_a_loop(tmp_path: Path) -> None:
    result, history, report = await run("kill-restart-loop", tmp_path)
    assert_valid(result, report)
    assert len(result.windows) == 4


async def test_pause_a_node_past_the_failure_detector(tmp_path: Path) -> None:
    result, history, report = await run("pause-past-detector", tmp_path)
    assert_valid(result, report)


async def test_partition_a_minority_and_heal(tmp_path: Path) -> None:
    result, history, report = await run("partition-minority", tmp_path)
    assert_valid(result, report)


async def test_partition_the_coordinator_away_from_its_replicas(tmp_path: Path) -> None:
    result, history, report = await run("partition-coordinator", tmp_path)
    assert_valid(result, report)
    # the cut is real: no write coordinated by the isolated node reached a quorum while it lasted
    start, healing = window(history, "partition-isolate")
    isolated = history.meta["addresses"][next(e for e in history.faults if e.type == "start").targets[0]]
    acked = [o for o in completed_ops(history.ops)
             if o.f == WRITE and o.node == isolated and o.outcome == OK and quorum_or_stronger(o.level, 3)
             and start + 0.5 < o.invoke_time and o.complete_time is not None and o.complete_time < healing]
    assert acked == [], report


async def test_rolling_restart(tmp_path: Path) -> None:
    result, history, report = await run("rolling-restart", tmp_path)
    assert_valid(result, report)
    assert sorted(t for w in result.windows for t in w.targets) == ["n1", "n2", "n3"]


async def test_add_nodes_under_load(tmp_path: Path) -> None:
    result, history, report = await run("add-node-under-load", tmp_path)
    assert_valid(result, report)
    assert sorted(history.meta["addresses"]) == ["n1", "n2", "n3", "n4", "n5"]


async def test_nodes_added_after_a_replica_missed_writes_take_them_over(tmp_path: Path) -> None:
    """Found by the soak (scripts/chaos --minutes 5 --seed 1): a write acked by two of three replicas,
    then joins that moved the key away from both, left it only on nodes no longer asked."""
    result, history, report = await run("join-after-missed-writes", tmp_path)
    assert_valid(result, report)


async def test_checker_catches_a_cluster_that_drops_acknowledged_writes(tmp_path: Path) -> None:
    """The proof the harness can fail: every node acks writes it never stores (--test-drop-writes)."""
    result, history, report = await run("drop-writes-proof", tmp_path)
    assert not result.valid, report
    assert result.counts().get("lost-write", 0) > 0, report
    assert result.stats["acked_strong_writes"] > 0

"""Gossip membership simulated over a fake network: convergence, dissemination speed, partitions,
loss, failure detection of a crashed node, and removal. Seeded: every scenario replays exactly."""
from __future__ import annotations

import math

import pytest

from kvstore.core.membership import IllegalTransition, Status
from kvstore.core.simulation import NotConverged, Simulation, convergence_target


def detection_bound(n: int) -> int:
    """Rounds for every node to hold a crashed peer down: news of its last heartbeats still spreads
    for ~log2(n) rounds, then phi needs mean + acceptable pause (3) + ~5 std deviations."""
    return int(2 * math.log2(n)) + 12


def test_50_nodes_converge_from_a_seeds_only_start() -> None:
    sim = Simulation(50, seed=1)
    assert not sim.converged()
    rounds = sim.run_until_converged(30)
    assert rounds <= 15
    views = sim.views()
    assert all(view is not None and len(view) == 50 for view in views)
    assert len({sim.ring_digest(i) for i in range(50)}) == 1


@pytest.mark.parametrize("seed", range(5))
def test_a_status_change_reaches_all_200_nodes_within_2_log2_n_plus_3_rounds(seed: int) -> None:
    # dissemination only: heartbeats would make every exchange carry ~n states, slowing the test
    # without changing how one state spreads
    sim = Simulation(200, seed=seed, full_view=True, heartbeats=False)
    assert sim.converged()
    sim.set_status(123, Status.LEAVING)
    assert not sim.converged()
    assert sim.run_until_converged(int(convergence_target(200))) <= convergence_target(200)
    assert all(view["n0123"].status is Status.LEAVING for view in sim.views() if view is not None)


def test_a_status_change_spreads_in_time_also_with_heartbeats_and_message_delay() -> None:
    sim = Simulation(50, seed=2, full_view=True, delay_rounds=1)
    sim.run(5)
    sim.set_status(7, Status.LEAVING)
    # each message takes a round, so one exchange takes up to three
    assert sim.run_until_converged(int(3 * convergence_target(50))) <= 3 * convergence_target(50)


def test_a_partition_diverges_and_converges_after_healing() -> None:
    sim = Simulation(40, seed=3)
    sim.run_until_converged(30)
    sim.partition([range(20), range(20, 40)])
    sim.set_status(5, Status.LEAVING)
    sim.set_status(25, Status.LEAVING)
    sim.run(25)
    views = sim.views()
    assert views[30] is not None and views[30]["n0005"].status is Status.NORMAL   # never crossed
    assert views[10] is not None and views[10]["n0025"].status is Status.NORMAL
    assert not sim.converged()
    assert 30 in sim.observers_seeing_down(5)            # each side holds the other down
    sim.heal()
    assert sim.run_until_converged(20) <= 20
    sim.run(15)
    assert sim.observers_seeing_down(5) == []           # and up again


def test_convergence_survives_10_percent_message_loss() -> None:
    sim = Simulation(50, seed=4, loss=0.1)
    assert sim.run_until_converged(40) <= 40
    sim.set_status(9, Status.LEAVING)
    assert sim.run_until_converged(int(convergence_target(50)) * 2) <= 2 * convergence_target(50)
    assert sim.messages_lost > 0.05 * sim.messages_sent


def test_a_crashed_node_is_marked_down_everywhere_and_up_again_after_restart() -> None:
    n = 40
    sim = Simulation(n, seed=5)
    sim.run_until_converged(30)
    sim.run(20)                                       # let the detectors learn the arrival rate
    assert all(sim.observers_seeing_down(i) == [] for i in range(n))   # no false suspicion
    sim.crash(11)
    assert sim.run_until(lambda: len(sim.observers_seeing_down(11)) == n - 1,
                         detection_bound(n), "every node holds n0011 down") <= detection_bound(n)
    assert all(sim.observers_seeing_down(i) == [] for i in range(n) if i != 11)
    assert sim.converged()                            # down is local: its state and tokens stay
    sim.restart(11)
    assert sim.run_until(lambda: sim.observers_seeing_down(11) == [], 10, "n0011 up again") <= 10
    assert sim.run_until_converged(15) <= 15
    assert all(view["n0011"].generation > 1 and view["n0011"].status is Status.NORMAL
               for view in sim.views() if view is not None)


def test_a_removed_node_never_comes_back() -> None:
    sim = Simulation(30, seed=6)
    sim.run_until_converged(30)
    sim.partition([[29]])                             # n0029 keeps the old, live state of n0007
    sim.crash(7)
    sim.remove(7, by=0)

    def removal_known_outside_29() -> bool:
        return all(view["n0007"].status is Status.REMOVED
                   for i, view in enumerate(sim.views()) if view is not None and i != 29)

    sim.run_until(removal_known_outside_29, 20, "the removal spreads")
    assert sim.views()[29]["n0007"].status is Status.NORMAL   # type: ignore[index]
    sim.heal()                                        # its stale gossip must not resurrect n0007
    sim.restart(7)                                    # nor may n0007 itself, in a new generation
    sim.run_until(lambda: 7 in sim.halted(), 10, "n0007 learns it was removed")
    assert sim.halted() == {7: "removed"}
    sim.run(30)
    assert sim.converged()
    for view in sim.views():
        if view is not None:
            assert view["n0007"].status is Status.REMOVED and view["n0007"].generation == 1
    assert "n0007" not in sim.nodes[0].detector      # type: ignore[operator]


def test_the_same_seed_replays_the_same_run() -> None:
    def run(seed: int) -> tuple:
        sim = Simulation(30, seed=seed, loss=0.05)
        rounds = sim.run_until_converged(40)
        return rounds, sim.messages_sent, sim.messages_lost, [sorted(v.items()) for v in sim.views() if v]

    assert run(8) == run(8)
    assert run(8) != run(9)


def test_illegal_local_transitions_are_refused_in_the_simulation_too() -> None:
    sim = Simulation(3, seed=0)
    with pytest.raises(IllegalTransition):
        sim.set_status(0, Status.JOINING)


def test_run_until_converged_says_when_it_gives_up() -> None:
    sim = Simulation(20, seed=0)
    sim.partition([range(10)])
    with pytest.raises(NotConverged, match="within 10 rounds"):
        sim.run_until_converged(10)


def test_scenario_arguments_are_validated() -> None:
    for kwargs in ({"loss": 1.0}, {"delay_rounds": -1}):
        with pytest.raises(ValueError):
            Simulation(3, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="running"):
        Simulation(3).restart(1)

"""cluster/checker.py on hand-built histories (no processes: fast), plus the pure parts the chaos
runs rely on: outcome classification, the history file format, and seeded fault schedules."""
from __future__ import annotations

import random
from pathlib import Path

import pytest

from cluster.checker import check, completed_ops, format_report, quorum_or_stronger
from cluster.history import (AFTER_READS, ANTI_ENTROPY, CAS, DELETE, FAIL, INFO, INVOKE, OK, READ, SETTLED, WRITE,
                             FaultEvent, FinalRead, History, Op, ReplicaState)
from cluster.nemesis import ALL_FAULTS, Step, crash_reason, cuts, make_schedule
from cluster.workload import write_outcome
from kvstore.errors import DeadlineExceeded, InvalidArgument, StaleContext, Unavailable

A, B, C = "127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"


class H:
    """A tiny history builder: ops get ids in order; times are given explicitly."""

    def __init__(self) -> None:
        self.h = History(meta={"scenario": "unit", "seed": 1, "replication_factor": 3,
                               "addresses": {"n1": A, "n2": B, "n3": C}})
        self.next_id = 0

    def op(self, f: str, key: bytes, t0: float, t1: float | None, outcome: str = OK, *, value: bytes | None = None,
           values: list[bytes] | None = None, level: str = "quorum", node: str = A, blind: bool = False,
           supersedes: list[bytes] = (), context_from: int | None = None, error: str = "") -> int:  # type: ignore[assignment]
        self.next_id += 1
        i = self.next_id
        self.h.record(Op(i, INVOKE, f, key, t0, node=node, level=level, value=value, blind=blind,
                         supersedes=list(supersedes), context_from=context_from))
        if t1 is not None:
            self.h.record(Op(i, outcome, f, key, t1, node=node, level=level, values=values if outcome == OK else None,
                             error=error))
        return i

    def write(self, key: bytes, value: bytes, t0: float, t1: float | None = None, outcome: str = OK, **kw) -> int:
        return self.op(WRITE, key, t0, t0 + 0.1 if t1 is None else t1, outcome, value=value, **kw)

    def read(self, key: bytes, values: list[bytes], t0: float, t1: float | None = None, **kw) -> int:
        return self.op(READ, key, t0, t0 + 0.1 if t1 is None else t1, OK, values=values, **kw)

    def final(self, key: bytes, values: list[bytes], nodes: tuple[str, ...] = (A, B, C), rnd: int = 0) -> None:
        for node in nodes:
            self.h.final.reads.append(FinalRead(key, node, rnd, True, list(values)))


def kinds(h: H) -> list[str]:
    return sorted(v.kind for v in check(h.h).violations)


# ---- (a) acknowledged writes survive ---------------------------------------------------------------


def test_acknowledged_write_in_the_final_state_is_valid() -> None:
    h = H()
    h.write(b"k", b"v1", 1.0)
    h.read(b"k", [b"v1"], 2.0)
    h.final(b"k", [b"v1"])

    result = check(h.h)

    assert result.valid, result.violations
    assert result.stats["acked_strong_writes"] == 1 and result.stats["acked_strong_expected"] == 1


def test_acknowledged_quorum_write_missing_after_healing_is_lost() -> None:
    h = H()
    h.write(b"k", b"v1", 1.0)
    h.final(b"k", [])

    result = check(h.h)

    assert not result.valid
    assert [v.kind for v in result.violations] == ["lost-write"]
    assert "v1" in str(result.violations[0]) and "W=quorum" in str(result.violations[0])


@pytest.mark.parametrize("level, lost_is_violation", [("quorum", True), ("all", True), ("2", True), ("one", False),
                                                      ("1", False)])
def test_only_writes_acknowledged_at_quorum_or_more_must_survive(level: str, lost_is_violation: bool) -> None:
    h = H()
    h.write(b"k", b"v1", 1.0, level=level)
    h.final(b"k", [])

    result = check(h.h)

    assert result.valid is not lost_is_violation
    if not lost_is_violation:
        assert [w.kind for w in result.warnings] == ["lost-weak-write"]


def test_write_superseded_by_an_acknowledged_write_with_its_context_may_be_gone() -> None:
    h = H()
    h.write(b"k", b"v1", 1.0)
    r = h.read(b"k", [b"v1"], 2.0)
    h.write(b"k", b"v2", 3.0, supersedes=[b"v1"], context_from=r)
    h.final(b"k", [b"v2"])

    result = check(h.h)

    assert result.valid, result.violations
    assert result.stats["acked_strong_superseded"] == 1


def test_write_whose_superseding_write_failed_must_still_be_there() -> None:
    h = H()
    h.write(b"k", b"v1", 1.0)
    h.write(b"k", b"v2", 3.0, outcome=FAIL, supersedes=[b"v1"], error="InvalidArgument: value too large")
    h.final(b"k", [])

    assert kinds(h) == ["lost-write"]


def test_write_superseded_by_a_write_of_unknown_outcome_may_be_gone_or_present() -> None:
    for final in ([b"v2"], [b"v1"], [b"v1", b"v2"]):
        h = H()
        h.write(b"k", b"v1", 1.0)
        h.write(b"k", b"v2", 3.0, outcome=INFO, supersedes=[b"v1"], error="DeadlineExceeded")
        h.final(b"k", final)
        assert check(h.h).valid, final


def test_context_write_supersedes_only_what_its_read_returned() -> None:
    h = H()
    h.write(b"k", b"v1", 1.0)
    h.write(b"k", b"v2", 1.5)                       # concurrent: the read below did not see it
    h.write(b"k", b"v3", 3.0, supersedes=[b"v1"])
    h.final(b"k", [b"v3"])

    result = check(h.h)

    assert [v.kind for v in result.violations] == ["lost-write"]
    assert "v2" in result.violations[0].detail


def test_blind_write_may_supersede_writes_that_began_before_it_ended() -> None:
    h = H()
    h.write(b"k", b"v1", 1.0, 1.2)
    h.write(b"k", b"b1", 2.0, 2.2, blind=True)
    h.final(b"k", [b"b1"])
    assert check(h.h).valid

    h = H()
    h.write(b"k", b"b1", 0.5, 0.6, blind=True)     # over before v1 began: cannot have superseded it
    h.write(b"k", b"v1", 1.0, 1.2)
    h.final(b"k", [b"b1"])
    assert kinds(h) == ["lost-write"]


def test_blind_write_of_unknown_outcome_may_land_after_it_timed_out() -> None:
    h = H()
    h.write(b"k", b"b1", 0.5, 0.6, outcome=INFO, blind=True, error="Unavailable: w: got 1 of 2")
    h.write(b"k", b"v1", 1.0, 1.2)
    h.final(b"k", [b"b1"])
    assert check(h.h).valid


def test_blind_op_of_unknown_outcome_does_not_excuse_losses_long_after_it() -> None:
    # its coordinator stamped it within its deadlines: a write acknowledged 99 s later is not covered
    h = H()
    h.op(DELETE, b"k", 1.0, 1.5, INFO, blind=True, error="DeadlineExceeded")
    h.write(b"k", b"late", 100.0)
    h.read(b"k", [b"late"], 101.0)
    h.final(b"k", [])
    assert kinds(h) == ["lost-write"]


def test_acknowledged_write_on_a_key_no_final_read_covered_is_not_valid() -> None:
    h = H()
    h.write(b"k1", b"v1", 1.0)
    h.write(b"k2", b"v2", 1.0)
    h.final(b"k1", [b"v1"])  # k2 was never read back
    assert kinds(h) == ["unverified-write"]
    nothing = H()
    nothing.write(b"k", b"v", 1.0)  # no final phase at all
    assert kinds(nothing) == ["unverified-write"]


def test_insert_to_a_fresh_key_must_survive() -> None:
    h = H()
    h.write(b"fresh", b"v1", 1.0, blind=True)
    h.final(b"fresh", [])
    assert kinds(h) == ["lost-write"]


def test_write_never_completed_counts_as_unknown() -> None:
    h = H()
    h.op(WRITE, b"k", 1.0, None, value=b"v1")
    h.final(b"k", [])

    [op] = completed_ops(h.h.ops)

    assert op.outcome == INFO and op.complete_time is None
    assert check(h.h).valid


# ---- (b) phantoms and impossible reads --------------------------------------------------------------


def test_read_of_a_value_never_written_is_a_phantom() -> None:
    h = H()
    h.write(b"k", b"v1", 1.0)
    h.read(b"k", [b"v1", b"ghost"], 2.0)
    h.final(b"k", [b"v1"])

    result = check(h.h)

    assert [v.kind for v in result.violations] == ["phantom"]
    assert "ghost" in result.violations[0].detail


def test_value_of_another_key_is_a_phantom_and_says_whose() -> None:
    h = H()
    h.write(b"k1", b"v1", 1.0)
    h.read(b"k2", [b"v1"], 2.0)
    h.final(b"k1", [b"v1"])

    result = check(h.h)

    assert [v.kind for v in result.violations] == ["phantom"]
    assert "written to key k1" in result.violations[0].detail


def test_phantom_in_the_final_state_is_caught() -> None:
    h = H()
    h.final(b"k", [b"ghost"])
    assert kinds(h) == ["phantom"]


def test_value_of_a_write_that_certainly_failed_must_never_be_read() -> None:
    h = H()
    h.op(CAS, b"k", 1.0, 1.1, FAIL, value=b"v1", error="StaleContext")
    h.read(b"k", [b"v1"], 2.0)
    h.final(b"k", [])

    assert kinds(h) == ["failed-write-visible"]


def test_read_that_ended_before_the_write_began_is_impossible() -> None:
    h = H()
    h.read(b"k", [b"v1"], 1.0, 1.1)
    h.write(b"k", b"v1", 2.0)
    h.final(b"k", [b"v1"])
    assert kinds(h) == ["read-before-write"]


def test_concurrent_read_may_see_a_write_in_flight() -> None:
    h = H()
    h.write(b"k", b"v1", 1.0, 3.0)
    h.read(b"k", [b"v1"], 1.5, 1.6)
    h.final(b"k", [b"v1"])
    assert check(h.h).valid


# ---- (c) superseded values stay gone ----------------------------------------------------------------


def test_value_deleted_by_an_acknowledged_delete_must_not_come_back() -> None:
    h = H()
    h.write(b"k", b"v1", 1.0)
    r = h.read(b"k", [b"v1"], 2.0)
    h.op(DELETE, b"k", 3.0, 3.1, OK, supersedes=[b"v1"], context_from=r)
    h.final(b"k", [b"v1"])

    result = check(h.h)

    assert [v.kind for v in result.violations] == ["resurrected"]


def test_value_superseded_by_an_acknowledged_put_must_not_come_back() -> None:
    h = H()
    h.write(b"k", b"v1", 1.0)
    h.write(b"k", b"v2", 3.0, supersedes=[b"v1"])
    h.final(b"k", [b"v1", b"v2"])
    assert kinds(h) == ["superseded-visible"]


def test_delete_of_unknown_outcome_may_or_may_not_have_happened() -> None:
    h = H()
    h.write(b"k", b"v1", 1.0)
    h.op(DELETE, b"k", 3.0, 3.1, INFO, supersedes=[b"v1"], error="DeadlineExceeded")
    h.final(b"k", [b"v1"])
    assert check(h.h).valid


def test_write_concurrent_with_a_delete_survives_it() -> None:
    h = H()
    h.write(b"k", b"v1", 1.0)
    h.op(DELETE, b"k", 3.0, 3.1, OK, supersedes=[b"v1"])
    h.write(b"k", b"v2", 3.05)
    h.final(b"k", [])
    result = check(h.h)
    assert [v.kind for v in result.violations] == ["lost-write"] and "v2" in result.violations[0].detail


# ---- (d) convergence --------------------------------------------------------------------------------


def test_coordinators_that_disagree_after_healing_are_divergent() -> None:
    h = H()
    h.write(b"k", b"v1", 1.0)
    h.final(b"k", [b"v1"], nodes=(A, B))
    h.final(b"k", [], nodes=(C,))
    assert kinds(h) == ["divergent-reads"]


def test_only_the_last_round_of_final_reads_counts() -> None:
    h = H()
    h.write(b"k", b"v1", 1.0)
    h.final(b"k", [], nodes=(C,), rnd=0)
    h.final(b"k", [b"v1"], rnd=1)
    assert check(h.h).valid


def test_final_read_that_failed_is_a_violation() -> None:
    h = H()
    h.write(b"k", b"v1", 1.0)
    h.final(b"k", [b"v1"], nodes=(A, B))
    h.h.final.reads.append(FinalRead(b"k", C, 0, False, error="Unavailable: r: got 2 of 3"))

    result = check(h.h)

    assert [v.kind for v in result.violations] == ["final-read-failed"]
    assert C in result.violations[0].detail


def test_key_no_coordinator_could_read_is_not_reported_lost_but_failed() -> None:
    h = H()
    h.write(b"k", b"v1", 1.0)
    for node in (A, B, C):
        h.h.final.reads.append(FinalRead(b"k", node, 0, False, error="Unavailable"))
    assert kinds(h) == ["final-read-failed"]


def _replica(key: bytes, node: str, dots: list[tuple[str, int, bool]], phase: str, primary: bool = True) -> ReplicaState:
    return ReplicaState(key, node, "", primary, phase, True, dots)


def test_primary_replicas_must_agree_after_anti_entropy_and_after_reads_but_may_differ_before() -> None:
    h = H()
    h.write(b"k", b"v1", 1.0)
    h.final(b"k", [b"v1"])
    h.h.final.replicas += [
        _replica(b"k", "n1", [("n1", 1, False)], SETTLED),
        _replica(b"k", "n2", [], SETTLED),
        _replica(b"k", "n1", [("n1", 1, False)], ANTI_ENTROPY),
        _replica(b"k", "n2", [("n1", 1, False)], ANTI_ENTROPY),
        _replica(b"k", "n1", [("n1", 1, False)], AFTER_READS),
        _replica(b"k", "n2", [("n1", 1, False)], AFTER_READS),
        _replica(b"k", "n4", [], AFTER_READS, primary=False),  # a bystander does not count
    ]

    result = check(h.h)

    assert result.valid
    assert [w.kind for w in result.warnings] == ["diverged-after-settling"]
    assert result.stats["converged"] == {SETTLED: (0, 1), ANTI_ENTROPY: (1, 1), AFTER_READS: (1, 1)}

    h.h.final.replicas.append(_replica(b"k", "n3", [("n1", 1, False), ("n3", 2, True)], ANTI_ENTROPY))
    assert kinds(h) == ["divergent-after-anti-entropy"]
    h.h.final.replicas.append(_replica(b"k", "n3", [], AFTER_READS))
    assert kinds(h) == ["divergent-after-anti-entropy", "divergent-replicas"]


def test_node_that_crashed_without_a_fault_is_a_violation() -> None:
    h = H()
    h.h.fault(FaultEvent(0, "crash", "crash", 4.0, ["n3"], "n3 exited: InvalidStateError"))
    result = check(h.h)
    assert [v.kind for v in result.violations] == ["node-crashed"] and "InvalidStateError" in str(result.violations[0])


# ---- (e) availability -------------------------------------------------------------------------------


def test_availability_per_fault_window_and_through_unaffected_nodes() -> None:
    h = H()
    h.read(b"k", [], 0.5, node=A)                               # before the fault
    h.h.fault(FaultEvent(1, "start", "kill", 1.0, ["n3"]))
    h.read(b"k", [], 1.5, node=A)
    h.op(READ, b"k", 1.6, 1.7, FAIL, node=C, error="Unavailable: failed to connect")
    h.write(b"k", b"v1", 1.8, node=B, outcome=INFO, error="Unavailable: w: got 1 of 2")
    h.h.fault(FaultEvent(1, "end", "kill", 2.0, ["n3"]))
    h.read(b"k", [], 2.5, node=C)
    h.final(b"k", [b"v1"])

    result = check(h.h)

    [w] = result.windows
    assert (w.fault, w.ops, w.ok, w.fail, w.info) == ("kill", 3, 1, 1, 1)
    assert (w.ops_elsewhere, w.ok_elsewhere) == (2, 1)
    assert (result.baseline.ops, result.baseline.ok) == (2, 2)
    report = format_report(result, h.h)
    assert "#1 kill n3" in report and "33.3%" in report and "50.0%" in report


def test_report_names_the_verdict_and_each_violation() -> None:
    h = H()
    h.write(b"k", b"v1", 1.0)
    h.final(b"k", [])
    report = format_report(check(h.h), h.h)
    assert report.splitlines()[0] == "chaos check: unit seed 1: INVALID (1 violations: lost-write 1)"
    assert "lost-write: key k: write #1 of v1 ok at W=quorum" in report


# ---- pure helpers the runs rely on ------------------------------------------------------------------


def test_history_round_trips_through_json_lines(tmp_path: Path) -> None:
    h = H()
    h.write(b"k", b"\x00\xffbinary", 1.0)
    r = h.read(b"k", [b"\x00\xffbinary"], 2.0)
    h.op(DELETE, b"k", 3.0, None, supersedes=[b"\x00\xffbinary"], context_from=r)
    h.h.fault(FaultEvent(1, "start", "partition-isolate", 0.5, ["n1"], "detail"))
    h.final(b"k", [])
    h.h.final.replicas.append(_replica(b"k", "n1", [("n1", 1, True)], AFTER_READS))
    h.h.final.notes.append("a note")

    loaded = History.load(h.h.save(tmp_path / "h.jsonl"))

    assert loaded.ops == h.h.ops and loaded.faults == h.h.faults and loaded.final == h.h.final
    assert loaded.meta["seed"] == 1
    assert check(loaded).counts() == check(h.h).counts()


def test_history_of_another_format_is_refused(tmp_path: Path) -> None:
    (tmp_path / "h.jsonl").write_text('{"kind": "meta", "format": 99}\n')
    with pytest.raises(ValueError, match="format 99"):
        History.load(tmp_path / "h.jsonl")


@pytest.mark.parametrize("exc, outcome", [
    (InvalidArgument("value: too large"), FAIL),
    (StaleContext("the context is no longer current"), FAIL),
    (Unavailable("failed to connect to all addresses; last error: Connection refused"), FAIL),
    (Unavailable("w: got 1 of 2 acknowledgements needed (acked by n1)"), INFO),
    (Unavailable("forwarded to n2: UNAVAILABLE"), INFO),
    (DeadlineExceeded("deadline exceeded"), INFO),
])
def test_write_errors_are_fail_only_when_the_write_certainly_did_not_happen(exc: Exception, outcome: str) -> None:
    assert write_outcome(exc) == outcome  # type: ignore[arg-type]


def test_quorum_levels() -> None:
    assert [quorum_or_stronger(x, 3) for x in ("quorum", "ALL", "one", "2", "1", "3", "")] == [
        True, True, False, True, False, True, True]


def test_schedule_is_a_function_of_the_seed_and_fits_its_bounds() -> None:
    names = ["n1", "n2", "n3", "n4", "n5"]
    one = make_schedule(random.Random(7), ALL_FAULTS, names, start_s=2.0, end_s=60.0)
    two = make_schedule(random.Random(7), ALL_FAULTS, names, start_s=2.0, end_s=60.0)
    other = make_schedule(random.Random(8), ALL_FAULTS, names, start_s=2.0, end_s=60.0)

    assert one == two and one != other
    assert one and all(2.0 <= s.at_s and s.at_s + s.duration_s <= 60.0 for s in one)
    assert all(a.at_s + a.duration_s < b.at_s for a, b in zip(one, one[1:]))  # one fault at a time
    adds = [s.targets[0] for s in one if s.kind == "add"]
    assert adds == [f"n{6 + i}" for i in range(len(adds))]


def test_partition_cuts_are_symmetric_except_one_way() -> None:
    minority = Step("partition-minority", ("n1",), 0, 1, (("n1",), ("n2", "n3")))
    assert cuts(minority) == {"n1": {"n2", "n3"}, "n2": {"n1"}, "n3": {"n1"}}
    bridge = Step("partition-bridge", ("n3",), 0, 1, (("n1", "n2"), ("n4", "n5")))
    assert cuts(bridge)["n1"] == {"n4", "n5"} and "n3" not in cuts(bridge)
    oneway = Step("partition-oneway", ("n2",), 0, 1, (("n2",), ("n1", "n3")))
    assert cuts(oneway) == {"n2": {"n1", "n3"}}


def test_crash_reason_takes_the_exceptions_of_the_last_start_only() -> None:
    log = ("--- launcher x\nValueError: old crash\n--- launcher y\nINFO serving\n"
           "    | asyncio.exceptions.InvalidStateError: RPC already finished.\nRuntimeError: Event loop is closed\n")
    assert crash_reason(log) == "asyncio.exceptions.InvalidStateError: RPC already finished.; RuntimeError: Event loop is closed"
    assert crash_reason("--- launcher\nINFO fine\n") == "exited without an exception in its log"

"""The consistency checker: pure functions from a History (ops, fault windows, final state) to a
CheckResult, and a short text report of it.

What it checks (DESIGN.md section 10; modelled on Jepsen's checkers and etcd's robustness tests):

  lost-write          a write acknowledged at W >= QUORUM is in no final read, though no later
                      operation can have superseded it. A write with context C supersedes exactly
                      the values the read that produced C returned; a blind write (no context)
                      supersedes whatever its coordinator held, so it may have superseded any value
                      whose write began before the blind write ended (for a blind write of unknown
                      outcome: before EFFECT_WINDOW_S after it began, not for the rest of the run).
  unverified-write    a write acknowledged at W >= QUORUM that must survive, on a key no final read
                      covered: unchecked is not valid.
  phantom             a read returned a value no write of that key ever carried.
  failed-write-visible  a read returned the value of a write that certainly failed.
  read-before-write   a read returned a value before the write carrying it began.
  resurrected         a value superseded by an acknowledged delete (with a context covering it) is
                      back in the final state; `superseded-visible` the same after an acknowledged put.
  final-read-failed   a key could not be read with R=ALL through some coordinator after healing.
  divergent-reads     R=ALL reads of a key through different coordinators disagree after healing.
  divergent-after-anti-entropy  a key's primary replicas hold different versions after an
                      anti-entropy repair ran on every node (before any final read);
  divergent-replicas  the same after the final reads (read repair) too.
  node-crashed        a node exited though no fault made it (the nemesis watchdog saw it).

Writes acknowledged at W=ONE that are lost, and replicas that still differ after settling (hints
replayed) but before any repair, are reported as warnings: the store promises neither.

Nothing here does I/O; tests/chaos/test_checker.py feeds it hand-built histories.
"""
from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable

from cluster.history import (AFTER_READS, ANTI_ENTROPY, CAS, DELETE, FAIL, INFO, INVOKE, OK, PHASES, READ, SETTLED,
                             WRITE, History, Op, show)

VIOLATION_KINDS = ("node-crashed", "lost-write", "unverified-write", "phantom", "failed-write-visible", "read-before-write", "resurrected",
                   "superseded-visible", "final-read-failed", "divergent-reads", "divergent-after-anti-entropy",
                   "divergent-replicas")
EFFECT_WINDOW_S = 30.0  # an op of unknown outcome took effect within this of its start (deadlines are
                        # 3-6 s; a paused coordinator resumes within the longest pause fault, 8 s)
WARNING_KINDS = ("lost-weak-write", "diverged-after-settling", "incomplete-final-state", "nemesis-note")


@dataclass
class Completed:
    """An operation with its outcome: the invoke and its completion (info when there was none)."""

    id: int
    f: str
    key: bytes
    outcome: str
    invoke_time: float
    complete_time: float | None       # None: never completed (the run ended first)
    process: int = 0
    node: str = ""
    level: str = ""
    value: bytes | None = None
    blind: bool = False
    context_from: int | None = None
    supersedes: list[bytes] = field(default_factory=list)
    values: list[bytes] | None = None
    error: str = ""

    def effect_end(self, window_s: float) -> float:
        """When the op's effect is known to be over: its completion; for an op of unknown
        outcome, `window_s` after it began (a coordinator stamps a write within its deadlines, and
        what a stamp supersedes is fixed then, however late its replicas or hints land)."""
        if self.outcome == INFO or self.complete_time is None:
            return self.invoke_time + window_s
        return self.complete_time

    def describe(self) -> str:
        what = f"{self.f} #{self.id}"
        if self.value is not None:
            what += f" of {show(self.value)}"
        at = f" at {'R' if self.f == READ else 'W'}={self.level}" if self.level else ""
        via = f" via {self.node}" if self.node else ""
        done = f"{self.complete_time:.2f}s" if self.complete_time is not None else "never"
        err = f" ({self.error[:80]})" if self.error and self.outcome != OK else ""
        return f"{what} {self.outcome}{at}{via}, invoked {self.invoke_time:.2f}s, done {done}{err}"


@dataclass
class Violation:
    kind: str
    key: bytes
    detail: str
    op_ids: list[int] = field(default_factory=list)

    def __str__(self) -> str:
        where = f"key {show(self.key)}: " if self.key else ""
        return f"{self.kind}: {where}{self.detail}"


@dataclass
class Window:
    """Availability while one fault was active: ops invoked in [start, end)."""

    id: int
    fault: str
    targets: list[str]
    start: float
    end: float
    ops: int = 0
    ok: int = 0
    fail: int = 0
    info: int = 0
    ops_elsewhere: int = 0            # ops sent to nodes the fault did not target
    ok_elsewhere: int = 0
    healing: str = ""                 # what healing took (the nemesis's end detail)
    back_after_s: float | None = None  # from the window's end to the first success via a target node
    tried_after: bool = False         # whether any op went to a target node after the window

    @property
    def availability(self) -> float | None:
        return self.ok / self.ops if self.ops else None

    @property
    def availability_elsewhere(self) -> float | None:
        return self.ok_elsewhere / self.ops_elsewhere if self.ops_elsewhere else None


@dataclass
class CheckResult:
    valid: bool
    violations: list[Violation]
    warnings: list[Violation]
    stats: dict[str, Any]
    windows: list[Window]
    baseline: Window                  # ops outside every fault window

    def counts(self) -> dict[str, int]:
        return dict(Counter(v.kind for v in self.violations))


# ---- pairing ------------------------------------------------------------------------------------


def completed_ops(ops: Iterable[Op]) -> list[Completed]:
    """Pair each invoke with its completion; an invoke never completed counts as info."""
    invokes: dict[int, Op] = {}
    done: dict[int, Op] = {}
    for op in ops:
        if op.type == INVOKE:
            invokes[op.id] = op
        else:
            done[op.id] = op
    out = []
    for op_id, inv in invokes.items():
        end = done.get(op_id)
        out.append(Completed(
            id=op_id, f=inv.f, key=inv.key, outcome=end.type if end else INFO,
            invoke_time=inv.time, complete_time=end.time if end else None, process=inv.process,
            node=inv.node, level=inv.level, value=inv.value, blind=inv.blind, context_from=inv.context_from,
            supersedes=list(inv.supersedes), values=end.values if end is not None and end.type == OK else None,
            error=end.error if end else "no completion recorded",
        ))
    out.sort(key=lambda c: (c.invoke_time, c.id))
    return out


def quorum_or_stronger(level: str, n: int) -> bool:
    """Whether an acknowledgement at this W level promises the write survives one lost replica."""
    level = (level or "quorum").lower()
    if level in ("quorum", "all"):
        return True
    if level == "one":
        return False
    try:
        return int(level) >= n // 2 + 1
    except ValueError:
        return False


# ---- the check ------------------------------------------------------------------------------------


def check(history: History, *, n: int | None = None, effect_window_s: float | None = None) -> CheckResult:
    n = n or int(history.meta.get("replication_factor", 3))
    window_s = effect_window_s or float(history.meta.get("effect_window_s", EFFECT_WINDOW_S))
    ops = completed_ops(history.ops)
    violations: list[Violation] = []
    warnings: list[Violation] = []

    writes = [o for o in ops if o.f in (WRITE, CAS) and o.value is not None]
    mutations = [o for o in ops if o.f in (WRITE, CAS, DELETE)]
    reads = [o for o in ops if o.f == READ and o.outcome == OK]
    by_value: dict[bytes, Completed] = {}
    for w in writes:
        by_value.setdefault(w.value, w)  # type: ignore[arg-type]

    final_values, final_errors = _final_values(history)

    # (b) phantoms, and values of writes that certainly failed or had not begun
    def judge_read(key: bytes, values: Iterable[bytes], where: str, done_at: float | None, ids: list[int]) -> None:
        for v in values:
            w = by_value.get(v)
            if w is None or w.key != key:
                elsewhere = f" (a value written to key {show(w.key)})" if w is not None else ""
                violations.append(Violation("phantom", key, f"{where} returned {show(v)}, never written to this key"
                                            + elsewhere, ids))
            elif w.outcome == FAIL:
                violations.append(Violation("failed-write-visible", key,
                                            f"{where} returned {show(v)} from {w.describe()}", ids + [w.id]))
            elif done_at is not None and done_at < w.invoke_time:
                violations.append(Violation("read-before-write", key,
                                            f"{where} returned {show(v)} at {done_at:.2f}s, before {w.describe()}",
                                            ids + [w.id]))

    for r in reads:
        judge_read(r.key, r.values or [], r.describe(), r.complete_time, [r.id])
    for key, by_node in final_values.items():
        judge_read(key, sorted(set().union(*by_node.values())), "final read", None, [])

    # what each mutation superseded: definitely (acknowledged, with a context) or possibly
    definite: dict[bytes, dict[bytes, Completed]] = defaultdict(dict)
    possible: dict[bytes, dict[bytes, Completed]] = defaultdict(dict)
    blind_by_key: dict[bytes, list[Completed]] = defaultdict(list)
    for m in mutations:
        if m.outcome == FAIL:
            continue
        if m.blind:
            blind_by_key[m.key].append(m)
            continue
        for v in m.supersedes:
            (definite if m.outcome == OK else possible)[m.key].setdefault(v, m)

    def superseded_by(w: Completed) -> Completed | None:
        assert w.value is not None
        hit = definite[w.key].get(w.value) or possible[w.key].get(w.value)
        if hit is not None:
            return hit
        for b in blind_by_key.get(w.key, ()):
            if b.id != w.id and w.invoke_time < b.effect_end(window_s):
                return b
        return None

    # (a) acknowledged writes are readable after healing; (c) superseded values stay gone
    after_repair: dict[bytes, list[Any]] = defaultdict(list)
    for rs in history.final.replicas:
        if rs.phase == AFTER_READS:
            after_repair[rs.key].append(rs)
    checked = expected = superseded = weak_checked = 0
    unchecked: set[bytes] = set()
    unread_strong: dict[bytes, Completed] = {}
    for w in writes:
        key, v = w.key, w.value
        assert v is not None
        verifiable = bool(final_values.get(key))
        present = any(v in vals for vals in final_values.get(key, {}).values())
        sup = definite[key].get(v)
        if sup is not None and present and sup.id != w.id:
            kind = "resurrected" if sup.f == DELETE else "superseded-visible"
            violations.append(Violation(kind, key, f"{show(v)} from {w.describe()} is in the final state, though "
                                        f"{sup.describe()} superseded it", [w.id, sup.id]))
        if w.outcome != OK:
            continue
        strong = quorum_or_stronger(w.level, n)
        if strong:
            checked += 1
        else:
            weak_checked += 1
        if superseded_by(w) is not None:
            superseded += strong
            continue
        expected += strong
        if not verifiable:
            if key not in final_errors:
                unchecked.add(key)
                if strong:
                    unread_strong.setdefault(key, w)
            continue  # else reported as final-read-failed below
        if not present:
            holders = _holders(after_repair, key, v)
            (violations if strong else warnings).append(Violation(
                "lost-write" if strong else "lost-weak-write", key,
                f"{w.describe()} is in no final read and nothing superseded it{holders}", [w.id]))

    # (d) convergence
    for key, errs in sorted(final_errors.items()):
        shown = "; ".join(f"{node}: {err[:120]}" for node, err in sorted(errs.items()))
        violations.append(Violation("final-read-failed", key, f"R=ALL read failed through {shown}"))
    for key, by_node in sorted(final_values.items()):
        if len({vals for vals in by_node.values()}) > 1:
            shown = "; ".join(f"{node}: {sorted(map(show, vals))}" for node, vals in sorted(by_node.items()))
            violations.append(Violation("divergent-reads", key, f"R=ALL reads disagree: {shown}"))
    converged = _replica_convergence(history, violations, warnings)

    for ev in history.faults:
        if ev.type == "crash":
            violations.append(Violation("node-crashed", b"", f"at {ev.time:.1f}s: {ev.detail}"))
        elif ev.type == "note":
            warnings.append(Violation("nemesis-note", b"", f"at {ev.time:.1f}s: {ev.detail}"))

    # an acknowledged write nobody could check is not a pass: a run that reads nothing back
    # after healing (or skips a key) must not come out valid
    for key, w in sorted(unread_strong.items()):
        violations.append(Violation("unverified-write", key, f"{w.describe()} must survive, but its key was "
                                    "never read after healing", [w.id]))
    if not history.final.reads:
        warnings.append(Violation("incomplete-final-state", b"", "no final reads: lost writes were not checked"))
    if unchecked and history.final.reads:
        warnings.append(Violation("incomplete-final-state", b"", f"{len(unchecked)} written keys were never read "
                                  f"after healing: {', '.join(sorted(map(show, unchecked))[:10])}"))
    for note in history.final.notes:
        warnings.append(Violation("incomplete-final-state", b"", note))

    windows, baseline = availability(history, ops)
    stats = {
        "ops": len(ops),
        "by_f": {f: dict(Counter(o.outcome for o in ops if o.f == f)) for f in (READ, WRITE, CAS, DELETE)},
        "acked_strong_writes": checked,
        "acked_strong_expected": expected,
        "acked_strong_superseded": superseded,
        "acked_weak_writes": weak_checked,
        "keys_final": len(final_values),
        "converged": converged,  # phase -> (keys whose primaries agree, keys)
    }
    return CheckResult(not violations, violations, warnings, stats, windows, baseline)


def _final_values(history: History) -> tuple[dict[bytes, dict[str, frozenset[bytes]]], dict[bytes, dict[str, str]]]:
    """Per key, from each coordinator's last round of final reads: the values of the reads that
    succeeded, and the errors of those that failed."""
    last_round: dict[tuple[bytes, str], int] = {}
    for rd in history.final.reads:
        last_round[(rd.key, rd.node)] = max(rd.round, last_round.get((rd.key, rd.node), -1))
    values: dict[bytes, dict[str, frozenset[bytes]]] = defaultdict(dict)
    errors: dict[bytes, dict[str, str]] = defaultdict(dict)
    for rd in history.final.reads:
        if rd.round != last_round[(rd.key, rd.node)]:
            continue
        if rd.ok:
            values[rd.key][rd.node] = frozenset(rd.values)
        else:
            errors[rd.key][rd.node] = rd.error or "failed"
    return dict(values), dict(errors)


def _holders(after: dict[bytes, list[Any]], key: bytes, value: bytes) -> str:
    states = after.get(key, [])
    if not states:
        return ""
    holding = sorted(rs.node_id for rs in states if value in rs.values)
    dots = "; ".join(f"{rs.node_id}{'*' if rs.primary else ''}: {len(rs.dots)} versions" for rs in states)
    return f"; replicas (* primary): {dots}" + (f"; named by {', '.join(holding)}" if holding else "")


def _replica_convergence(history: History, violations: list[Violation],
                         warnings: list[Violation]) -> dict[str, tuple[int, int]]:
    """Per phase: (keys whose primary replicas all answered with the same versions, keys)."""
    by_phase: dict[str, dict[bytes, list[Any]]] = defaultdict(lambda: defaultdict(list))
    for rs in history.final.replicas:
        if rs.primary:
            by_phase[rs.phase][rs.key].append(rs)
    kind = {SETTLED: "diverged-after-settling", ANTI_ENTROPY: "divergent-after-anti-entropy",
            AFTER_READS: "divergent-replicas"}
    out = {}
    for phase in PHASES:
        good = 0
        for key, states in sorted(by_phase[phase].items()):
            broken = [rs for rs in states if not rs.ok]
            distinct = {tuple(sorted(rs.dots)) for rs in states if rs.ok}
            if not broken and len(distinct) <= 1:
                good += 1
                continue
            shown = "; ".join(f"{rs.node_id}: " + (rs.error if not rs.ok else
                              ",".join(f"{d[0]}:{d[1]}{'(del)' if d[2] else ''}" for d in sorted(rs.dots)))
                              for rs in sorted(states, key=lambda r: r.node_id))
            (warnings if phase == SETTLED else violations).append(
                Violation(kind[phase], key, f"primary replicas differ ({phase}): {shown}"))
        if by_phase[phase]:
            out[phase] = (good, len(by_phase[phase]))
    return out


# ---- (e) availability ---------------------------------------------------------------------------


def availability(history: History, ops: list[Completed] | None = None) -> tuple[list[Window], Window]:
    """Share of operations that succeeded while each fault window was open, and outside them all."""
    ops = completed_ops(history.ops) if ops is None else ops
    addresses: dict[str, str] = history.meta.get("addresses", {})
    starts = {ev.id: ev for ev in history.faults if ev.type == "start"}
    ends = {ev.id: ev for ev in history.faults if ev.type == "end"}
    horizon = max((o.invoke_time for o in ops), default=0.0) + 1e-9
    windows = []
    for wid, st in sorted(starts.items(), key=lambda kv: kv[1].time):
        end = ends[wid].time if wid in ends else horizon
        windows.append(Window(wid, st.fault, list(st.targets), st.time, max(end, st.time),
                              healing=ends[wid].detail if wid in ends else "never healed"))
    baseline = Window(0, "none", [], 0.0, horizon)
    for w in windows:  # clients that keep failing after the node is back (reconnect backoff, stale views)
        targeted = {addresses.get(t, t) for t in w.targets}
        upto = min((x.start for x in windows if x.start >= w.end), default=math.inf)  # the next fault
        after = [o for o in ops if o.node in targeted and w.end <= o.invoke_time < upto]
        first_ok = min((o.invoke_time for o in after if o.outcome == OK), default=None)
        w.back_after_s = None if first_ok is None else first_ok - w.end
        w.tried_after = bool(after)
    for o in ops:
        inside = [w for w in windows if w.start <= o.invoke_time < w.end]
        for w in inside or [baseline]:
            w.ops += 1
            w.ok += o.outcome == OK
            w.fail += o.outcome == FAIL
            w.info += o.outcome == INFO
            targeted = {addresses.get(t, t) for t in w.targets}
            if not o.node or o.node not in targeted:
                w.ops_elsewhere += 1
                w.ok_elsewhere += o.outcome == OK
    return windows, baseline


# ---- report ---------------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "   -" if x is None else f"{100 * x:5.1f}%"


def format_report(result: CheckResult, history: History | None = None, max_items: int = 20) -> str:
    meta = history.meta if history is not None else {}
    lines = []
    head = f"chaos check: {meta.get('scenario', '?')} seed {meta.get('seed', '?')}"
    verdict = "VALID" if result.valid else f"INVALID ({len(result.violations)} violations: " + ", ".join(
        f"{k} {c}" for k, c in sorted(result.counts().items())) + ")"
    lines.append(f"{head}: {verdict}")
    s = result.stats
    lines.append(f"ops: {s['ops']}  " + "  ".join(
        f"{f} " + "/".join(f"{s['by_f'][f].get(o, 0)}" for o in (OK, FAIL, INFO))
        for f in (READ, WRITE, CAS, DELETE)) + "  (ok/fail/info)")
    lines.append(f"acknowledged writes at W>=QUORUM: {s['acked_strong_writes']} ({s['acked_strong_expected']} must "
                 f"survive, {s['acked_strong_superseded']} superseded); at W=ONE: {s['acked_weak_writes']}")
    line = f"final state: {s['keys_final']} keys read with R=ALL through every node"
    if s["converged"]:
        line += "; primary replicas identical: " + ", ".join(
            f"{good}/{total} {phase}" for phase, (good, total) in s["converged"].items())
    if "tombstones_purged" in meta:
        line += f"; tombstones purged after the repair (then read): {meta['tombstones_purged']}"
    lines.append(line)
    lines.append("availability (ops invoked while the fault was active that succeeded):")
    lines.append(f"  {'window':<30} {'from':>7} {'to':>7} {'ops':>6} {'ok':>6} {'via others':>10} {'back':>6}  healing took")
    rows = [result.baseline] + result.windows
    for w in rows:
        name = "no fault" if w is result.baseline else f"#{w.id} {w.fault} {','.join(w.targets)}"
        back = "" if w is result.baseline else (f"{w.back_after_s:.1f}s" if w.back_after_s is not None
                                                else "never" if w.tried_after else "-")
        lines.append(f"  {name[:30]:<30} {w.start:6.1f}s {w.end:6.1f}s {w.ops:>6} {_pct(w.availability):>6} "
                     f"{_pct(w.availability_elsewhere):>10} {back:>6}  {w.healing}".rstrip())
    lines.append("  (via others: ops sent to nodes the fault did not target; back: from the window's end to the "
                 "first success through a targeted node before the next fault; -: none tried)")
    by_fault: dict[str, list[Window]] = defaultdict(list)
    for w in result.windows:
        by_fault[w.fault].append(w)
    if by_fault:
        summary = []
        for fault, ws in sorted(by_fault.items()):
            total, ok = sum(w.ops for w in ws), sum(w.ok for w in ws)
            summary.append(f"{fault} {_pct(ok / total if total else None).strip()} of {total}")
        lines.append("  per fault: " + "; ".join(summary))
    for title, items in (("violations", result.violations), ("warnings", result.warnings)):
        if not items:
            continue
        by_kind = Counter(v.kind for v in items)
        lines.append(f"{title}: " + ", ".join(f"{k} {c}" for k, c in sorted(by_kind.items())))
        for v in items[:max_items]:
            lines.append(f"  {v}")
        if len(items) > max_items:
            lines.append(f"  ... and {len(items) - max_items} more")
    return "\n".join(lines)

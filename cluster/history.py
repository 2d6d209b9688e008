"""Histories of chaos runs: every client operation (invoke, then ok / fail / info), every fault
window, and the final state read after healing; saved and loaded as JSON lines.

Belongs here: the records and their file format. Not here: producing them (cluster/workload.py,
cluster/nemesis.py, cluster/chaos.py) or judging them (cluster/checker.py).

Outcomes follow Jepsen: `ok` the operation happened, `fail` it certainly did not, `info` unknown
(a timeout, or an error after which a write may have been applied). An invoke without a
completion is read as info. Times are monotonic seconds since the run began.

File format 1, one JSON document per line, each with "kind":
    meta     {"format": 1, "scenario", "seed", "nodes", ...}     first line
    op       one Op event (bytes fields as hex)
    fault    one FaultEvent (a nemesis window's start or end)
    read     one FinalRead (a key read with R=ALL through one coordinator after healing)
    replica  one ReplicaState (a key's raw record on one node after healing)
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Iterator

HISTORY_FORMAT = 1

INVOKE, OK, FAIL, INFO = "invoke", "ok", "fail", "info"
OUTCOMES = (OK, FAIL, INFO)
READ, WRITE, CAS, DELETE = "read", "write", "cas", "delete"  # Op.f


@dataclass
class Op:
    """One event of one client operation: its invoke, or its completion (same id)."""

    id: int
    type: str                          # invoke | ok | fail | info
    f: str                             # read | write | cas | delete
    key: bytes
    time: float
    process: int = 0                   # the workload worker
    node: str = ""                     # coordinator address the request went to ("" = routed by the client)
    level: str = ""                    # r for reads, w for writes: one | quorum | all | N
    value: bytes | None = None         # write, cas: the (unique) value written
    blind: bool = False                # write, delete without a context: supersedes whatever the coordinator holds
    context_from: int | None = None    # id of the read whose context this write carries
    supersedes: list[bytes] = field(default_factory=list)  # values that read returned (what the context covers)
    values: list[bytes] | None = None  # read ok: the sibling values seen (empty: not found)
    error: str = ""                    # fail, info: the error


@dataclass
class FaultEvent:
    """A nemesis window opens (start), begins healing (heal) and closes (end), paired by id; or the
    nemesis notes something (note) or sees a node exit that no fault made exit (crash)."""

    id: int
    type: str                          # start | heal | end | note | crash
    fault: str                         # kill | pause | stop | restart | add | partition-... | heal
    time: float
    targets: list[str] = field(default_factory=list)   # node names
    detail: str = ""


@dataclass
class FinalRead:
    """A key read with R=ALL through one coordinator, after healing (round 0, 1, ...)."""

    key: bytes
    node: str                          # coordinator address
    round: int
    ok: bool
    values: list[bytes] = field(default_factory=list)
    error: str = ""


#: when replica states are taken: after healing and settling (hints replayed); then after an
#: anti-entropy repair run on every node; then after the final R=ALL reads (read repair)
SETTLED, ANTI_ENTROPY, AFTER_READS = "settled", "anti-entropy", "after-reads"
PHASES = (SETTLED, ANTI_ENTROPY, AFTER_READS)


@dataclass
class ReplicaState:
    """A key's record as one node stores it (its local copy, no coordinator involved)."""

    key: bytes
    node_id: str
    address: str
    primary: bool                      # in the key's preference list
    phase: str                         # settled | anti-entropy | after-reads (see PHASES)
    ok: bool = True
    dots: list[tuple[str, int, bool]] = field(default_factory=list)  # (node, counter, tombstone), sorted
    values: list[bytes] = field(default_factory=list)  # live siblings' values, where final reads named them
    error: str = ""


@dataclass
class FinalState:
    reads: list[FinalRead] = field(default_factory=list)
    replicas: list[ReplicaState] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)     # what could not be collected, and why


@dataclass
class History:
    meta: dict[str, Any] = field(default_factory=dict)
    ops: list[Op] = field(default_factory=list)
    faults: list[FaultEvent] = field(default_factory=list)
    final: FinalState = field(default_factory=FinalState)

    # ---- recording -----------------------------------------------------------------------

    def record(self, op: Op) -> Op:
        self.ops.append(op)
        return op

    def fault(self, event: FaultEvent) -> FaultEvent:
        self.faults.append(event)
        return event

    # ---- file format -----------------------------------------------------------------------

    def lines(self) -> Iterator[str]:
        yield _dumps({"kind": "meta", **self.meta, "format": HISTORY_FORMAT})
        for op in self.ops:
            yield _dumps({"kind": "op", **_encode(op)})
        for ev in self.faults:
            yield _dumps({"kind": "fault", **_encode(ev)})
        for rd in self.final.reads:
            yield _dumps({"kind": "read", **_encode(rd)})
        for rs in self.final.replicas:
            yield _dumps({"kind": "replica", **_encode(rs)})
        for note in self.final.notes:
            yield _dumps({"kind": "note", "text": note})

    def save(self, path: Path | str) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        with open(tmp, "w") as f:
            for line in self.lines():
                f.write(line + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def from_lines(cls, lines: Iterable[str]) -> "History":
        h = cls()
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            doc = json.loads(line)
            kind = doc.pop("kind", None)
            if kind == "meta":
                if doc.get("format") != HISTORY_FORMAT:
                    raise ValueError(f"line {n}: history format {doc.get('format')!r}, this reads {HISTORY_FORMAT}")
                h.meta = doc
            elif kind == "op":
                h.ops.append(_decode(Op, doc))
            elif kind == "fault":
                h.faults.append(_decode(FaultEvent, doc))
            elif kind == "read":
                h.final.reads.append(_decode(FinalRead, doc))
            elif kind == "replica":
                rs = _decode(ReplicaState, doc)
                rs.dots = [tuple(d) for d in rs.dots]  # type: ignore[misc]
                h.final.replicas.append(rs)
            elif kind == "note":
                h.final.notes.append(doc["text"])
            else:
                raise ValueError(f"line {n}: unknown kind {kind!r}")
        return h

    @classmethod
    def load(cls, path: Path | str) -> "History":
        with open(path) as f:
            return cls.from_lines(f)


# bytes travel as hex: values are opaque, and a phantom may be any bytes at all
_BYTES_FIELDS = {"key", "value"}
_BYTES_LIST_FIELDS = {"supersedes", "values"}


def _encode(obj: Any) -> dict[str, Any]:
    doc = asdict(obj)
    for name in _BYTES_FIELDS & doc.keys():
        if doc[name] is not None:
            doc[name] = doc[name].hex()
    for name in _BYTES_LIST_FIELDS & doc.keys():
        if doc[name] is not None:
            doc[name] = [v.hex() for v in doc[name]]
    if isinstance(obj, Op):  # keep lines short: drop fields at their defaults
        for f in fields(Op):
            if f.name not in ("id", "type", "f", "key", "time") and doc[f.name] in (None, "", [], False, 0):
                del doc[f.name]
    return doc


def _decode(cls: Any, doc: dict[str, Any]) -> Any:
    for name in _BYTES_FIELDS & doc.keys():
        if doc[name] is not None:
            doc[name] = bytes.fromhex(doc[name])
    for name in _BYTES_LIST_FIELDS & doc.keys():
        if doc[name] is not None:
            doc[name] = [bytes.fromhex(v) for v in doc[name]]
    return cls(**doc)


def _dumps(doc: dict[str, Any]) -> str:
    return json.dumps(doc, separators=(",", ":"), sort_keys=False)


def show(value: bytes | None) -> str:
    """A value as a report shows it: text when it is printable ASCII, else hex."""
    if value is None:
        return "<none>"
    try:
        text = value.decode("ascii")
    except UnicodeDecodeError:
        return "0x" + value.hex()
    return text if text.isprintable() else "0x" + value.hex()

"""Consistency checkers for histories recorded by the fault tests: pure functions, no I/O.

A history is what concurrent clients saw: for each operation, when it was invoked, when (and
whether) it completed, and what it returned. Three checkers:

- check_linearizable / check_registers: is there a total order of the operations, consistent
  with real time (an operation that completed before another was invoked comes first), in which
  every operation behaves as on one sequential register? The search is Wing & Gong's, with
  Lowe's just-in-time linearization and memoization of (linearized set, state) pairs (the same
  algorithm as porcupine and Knossos' "wgl"). Linearizability is local (Herlihy & Wing), so
  registers are checked one key at a time: the sum of small searches instead of one huge one.
- check_set: every acknowledged insert is present exactly once, nothing appears twice, nothing
  appears that was never attempted or that was definitely refused.
- check_read_your_writes: a client's stale read with min_index = its last write's index sees
  that write (or a later write of its own), never an earlier value.

Outcomes. An operation completes "ok" (it took effect, and returned what it returned), "fail"
(it definitely did not take effect: refused before the log, or an SQL error) or "info"
(unknown: a timeout or a lost connection; a write may take effect at any time after its
invocation, or never). An info operation's response time is infinity. Failed operations and
info reads have no effect and are dropped before the search.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

INFINITY = float("inf")

# -------------------------------------------------------------------------- operations


@dataclass(frozen=True)
class Op:
    """One completed (or abandoned) operation.

    f: "read", "write" or "cas" for registers (or a workload's own names).
    value: read -> the value read (None: no row); write -> the value written;
           cas -> [expected, new].
    ok: for cas, True (rowcount 1) or False (rowcount 0); None when unknown.
    complete: time of the response; None for an unknown outcome ("info": infinity).
    """

    id: int
    process: Any
    f: str
    key: Any
    value: Any
    invoke: float
    complete: float | None
    ok: bool | None = None

    @property
    def unknown(self) -> bool:
        return self.complete is None

    def describe(self) -> str:
        end = "?" if self.complete is None else f"{self.complete:.6f}"
        if self.f == "cas":
            exp, new = self.value
            res = {True: "ok", False: "failed", None: "unknown"}[self.ok]
            what = f"cas({exp!r}->{new!r}) {res}"
        elif self.f == "read":
            what = f"read -> {self.value!r}"
        else:
            what = f"{self.f}({self.value!r})"
        return f"#{self.id} p={self.process} key={self.key!r} {what} [{self.invoke:.6f}, {end}]"


def ops_from_events(events: Iterable[dict[str, Any]]) -> tuple[list[Op], list[dict[str, Any]]]:
    """Pair a Jepsen-style event list into Ops.

    Events are maps with "process", "type" ("invoke", "ok", "fail", "info"), "f", "key",
    "value" and "time"; a completion follows its invocation on the same process (a process
    runs one operation at a time). Returns (ops, failed): ops hold the "ok" and "info" ones
    (info: complete=None); failed lists the "fail" completions (kept for the set checker).
    For a completed cas the completion's value is True/False (success); for a read it is the
    value read. Events of process "nemesis" and of other types are ignored.
    """
    open_: dict[Any, dict[str, Any]] = {}
    ops: list[Op] = []
    failed: list[dict[str, Any]] = []
    for ev in events:
        t = ev.get("type")
        p = ev.get("process")
        if p == "nemesis":
            continue
        if t == "invoke":
            if p in open_:
                raise ValueError(f"process {p!r} invoked {ev!r} while {open_[p]!r} is open")
            open_[p] = ev
            continue
        if t not in ("ok", "fail", "info"):
            continue
        inv = open_.pop(p, None)
        if inv is None:
            raise ValueError(f"completion without an invocation: {ev!r}")
        if t == "fail":
            failed.append({**inv, "type": "fail", "complete": ev.get("time"), "error": ev.get("error")})
            continue
        f = inv["f"]
        if t == "info":
            ops.append(Op(len(ops), p, f, inv.get("key"), inv.get("value"), inv["time"], None, None))
        elif f == "cas":
            ops.append(Op(len(ops), p, f, inv.get("key"), inv.get("value"), inv["time"], ev["time"], bool(ev.get("value"))))
        elif f == "read":
            ops.append(Op(len(ops), p, f, inv.get("key"), ev.get("value"), inv["time"], ev["time"]))
        else:
            ops.append(Op(len(ops), p, f, inv.get("key"), inv.get("value"), inv["time"], ev["time"]))
    for p, inv in open_.items():  # invoked, never completed (the run ended): unknown
        ops.append(Op(len(ops), p, inv["f"], inv.get("key"), inv.get("value"), inv["time"], None, None))
    return ops, failed


# -------------------------------------------------------------------------- models


class RegisterModel:
    """A register holding one value; None is the initial "no row" value.

    step(state, op) -> (legal, next_state). Deterministic even for unknown operations: an
    unknown cas that takes effect succeeds exactly when state == expected (a cas that did not
    take effect at all is the same as one linearized after everything else)."""

    init: Any = None

    def step(self, state: Any, op: Op) -> tuple[bool, Any]:
        if op.f == "read":
            return op.value == state, state
        if op.f == "write":
            return True, op.value
        if op.f == "cas":
            expected, new = op.value
            if op.ok is None:
                return True, (new if state == expected else state)
            if op.ok:
                return state == expected, new
            return state != expected, state
        raise ValueError(f"register model: unknown operation {op.f!r}")

    @staticmethod
    def equivalence_class(op: Op) -> Any:
        """Unknown operations with equal classes are interchangeable once both are invoked."""
        return (op.f, json.dumps(op.value, sort_keys=True, default=repr))


# -------------------------------------------------------------------------- the search


@dataclass
class Result:
    """Outcome of a linearizability check of one history (one key)."""

    valid: bool | None  # None: the search gave up (step budget) - inconclusive
    key: Any = None
    ops: int = 0
    unknown_ops: int = 0
    steps: int = 0
    cache_size: int = 0
    # On a violation: the longest linearizable prefix found, the state it leaves, and the
    # operations that could not be placed next (the first whose response time had come).
    longest_prefix: list[Op] = field(default_factory=list)
    final_state: Any = None
    stuck: list[Op] = field(default_factory=list)

    def explain(self, max_prefix: int = 12) -> str:
        if self.valid:
            return f"key {self.key!r}: linearizable ({self.ops} ops, {self.steps} steps)"
        if self.valid is None:
            return f"key {self.key!r}: INCONCLUSIVE after {self.steps} steps ({self.ops} ops, {self.unknown_ops} unknown)"
        lines = [f"key {self.key!r}: NOT linearizable ({self.ops} ops, {self.unknown_ops} unknown)",
                 f"  longest linearizable prefix ({len(self.longest_prefix)} ops), last {max_prefix}:"]
        lines += ["    " + op.describe() for op in self.longest_prefix[-max_prefix:]]
        lines.append(f"  leaves the register at {self.final_state!r}; none of these can come next:")
        lines += ["    " + op.describe() for op in self.stuck]
        return "\n".join(lines)


class _Entry:
    """A call or return event in Lowe's doubly linked list."""

    __slots__ = ("op", "is_call", "match", "prev", "next", "time", "pos")

    def __init__(self, op: Op, is_call: bool, time: float, pos: int):
        self.op = op
        self.is_call = is_call
        self.time = time
        self.pos = pos  # tie-breaker: stable order
        self.match: _Entry | None = None
        self.prev: _Entry | None = None
        self.next: _Entry | None = None


def _build_list(ops: list[Op]) -> _Entry:
    events: list[tuple[float, int, int, _Entry]] = []
    for i, op in enumerate(ops):
        call = _Entry(op, True, op.invoke, i)
        ret = _Entry(op, False, INFINITY if op.complete is None else op.complete, i)
        call.match = ret
        # At equal times calls sort before returns: such operations count as concurrent,
        # which can only hide a violation, never invent one.
        events.append((op.invoke, 0, i, call))
        events.append((ret.time, 1, i, ret))
    events.sort(key=lambda e: (e[0], e[1], e[2]))
    head = _Entry(None, False, -INFINITY, -1)  # type: ignore[arg-type]
    prev = head
    for *_, e in events:
        prev.next = e
        e.prev = prev
        prev = e
    return head


def _lift(e: _Entry) -> None:
    """Remove a call and its return from the list (they keep their own links: dancing links)."""
    e.prev.next = e.next
    if e.next is not None:
        e.next.prev = e.prev
    r = e.match
    r.prev.next = r.next
    if r.next is not None:
        r.next.prev = r.prev


def _unlift(e: _Entry) -> None:
    """Undo _lift(e); lifts are undone in the reverse order they were made."""
    r = e.match
    r.prev.next = r
    if r.next is not None:
        r.next.prev = r
    e.prev.next = e
    if e.next is not None:
        e.next.prev = e


def check_linearizable(ops: list[Op], model: Any = None, *, key: Any = None,
                       max_steps: int = 5_000_000) -> Result:
    """Wing & Gong / Lowe (just-in-time linearization) with memoization.

    The list holds call and return events in time order. Scan from the front: at a call, try
    to linearize its operation now (legal in the model, and (linearized set, state) not seen
    before); if so, lift its call and return out of the list, push, and restart at the front.
    At a return whose operation is not yet linearized, every way to place the operations before
    it failed: pop the last linearized operation, restore its state and try the next candidate
    after it. An empty stack then means no linearization exists.

    Unknown operations return at infinity, after every real return: the history is linearizable
    once every *known* operation is linearized (the unknown ones left over are placed at the
    end, which is the same as never taking effect).

    Memo key: (linearized set, state). Unknown operations of one class (same f and value) are
    interchangeable once invoked, so the set records only how many of each class are
    linearized (the earliest-invoked ones, canonically): 2^k subsets of k unknown writes of one
    value become k+1 counts.
    """
    model = model or RegisterModel()
    ops = [op for op in ops if not (op.unknown and op.f == "read")]
    res = Result(valid=True, key=key, ops=len(ops), unknown_ops=sum(op.unknown for op in ops))
    if not ops:
        return res
    # Bit positions: known ops by index; unknown ops canonically per class, by invoke time.
    classes: dict[Any, list[int]] = {}
    cls_of: dict[int, Any] = {}
    for i, op in sorted(enumerate(ops), key=lambda t: t[1].invoke):
        if op.unknown:
            c = model.equivalence_class(op)
            classes.setdefault(c, []).append(i)
            cls_of[i] = c
    head = _build_list(ops)
    index_of = {id(op): i for i, op in enumerate(ops)}
    known_left = sum(not op.unknown for op in ops)
    counts: dict[Any, int] = dict.fromkeys(classes, 0)

    state = model.init
    mask = 0
    cache: set[tuple[int, Any]] = set()
    stack: list[tuple[_Entry, Any, int]] = []  # (call entry, state before, bit set)
    entry = head.next
    steps = 0
    best: list[Op] = []
    best_state = model.init
    stuck: list[Op] = []

    while True:
        if known_left == 0:
            res.valid = True
            break
        steps += 1
        if steps > max_steps:
            res.valid = None
            break
        if entry is not None and entry.is_call:
            op = entry.op
            i = index_of[id(op)]
            legal, new_state = model.step(state, op)
            if legal:
                if op.unknown:
                    c = cls_of[i]
                    bit = 1 << classes[c][counts[c]]
                else:
                    bit = 1 << i
                new_mask = mask | bit
                memo = (new_mask, new_state)
                if memo not in cache:
                    cache.add(memo)
                    stack.append((entry, state, bit))
                    if op.unknown:
                        counts[cls_of[i]] += 1
                    else:
                        known_left -= 1
                    state, mask = new_state, new_mask
                    _lift(entry)
                    if len(stack) > len(best):
                        best = [e.op for e, _, _ in stack]
                        best_state = state
                        stuck = []
                    entry = head.next
                    continue
            entry = entry.next
            continue
        # A return (of an operation not yet linearized), or the end: backtrack.
        if entry is not None and entry.time == INFINITY:
            # Only unknown returns remain ahead, so every known op is linearized (unreachable
            # in practice: known_left reaches 0 first). Kept for safety.
            res.valid = True
            break
        if len(stack) == len(best) and not stuck:
            stuck = _candidates(head)
        if not stack:
            res.valid = False
            break
        call, state, bit = stack.pop()
        mask &= ~bit
        if call.op.unknown:
            counts[cls_of[index_of[id(call.op)]]] -= 1
        else:
            known_left += 1
        _unlift(call)
        entry = call.next
    res.steps = steps
    res.cache_size = len(cache)
    if res.valid is False:
        res.longest_prefix = best
        res.final_state = best_state
        res.stuck = stuck
    return res


def _candidates(head: _Entry) -> list[Op]:
    """The operations that could come next: calls before the first remaining return, plus
    the operation of that return (the one whose deadline forced the backtrack)."""
    out: list[Op] = []
    e = head.next
    while e is not None and e.is_call:
        out.append(e.op)
        e = e.next
    if e is not None and e.op not in out:
        out.append(e.op)
    return out


def check_registers(ops: Iterable[Op], *, max_steps: int = 5_000_000) -> dict[Any, Result]:
    """check_linearizable per key (linearizability is a local property)."""
    by_key: dict[Any, list[Op]] = {}
    for op in ops:
        if op.f in ("read", "write", "cas"):
            by_key.setdefault(_hashable(op.key), []).append(op)
    return {k: check_linearizable(v, key=k, max_steps=max_steps) for k, v in by_key.items()}


def _hashable(k: Any) -> Any:
    return tuple(k) if isinstance(k, list) else k


# -------------------------------------------------------------------------- sets


@dataclass
class SetResult:
    valid: bool
    acknowledged: int = 0
    unknown: int = 0
    failed: int = 0
    present: int = 0
    lost: list[Any] = field(default_factory=list)  # acknowledged, missing
    duplicated: dict[Any, int] = field(default_factory=dict)  # value -> count > 1
    unexpected: list[Any] = field(default_factory=list)  # never attempted
    resurrected: list[Any] = field(default_factory=list)  # definitely failed, yet present
    recovered: int = 0  # unknown adds that turned out applied

    def explain(self) -> str:
        head = (f"set: {self.acknowledged} acknowledged, {self.unknown} unknown ({self.recovered} applied), "
                f"{self.failed} failed, {self.present} present")
        if self.valid:
            return head + ": OK"
        parts = [head + ": INVALID"]
        if self.lost:
            parts.append(f"  lost (acknowledged, missing): {sorted(self.lost)[:50]}")
        if self.duplicated:
            parts.append(f"  duplicated (value: count): {dict(list(sorted(self.duplicated.items()))[:50])}")
        if self.unexpected:
            parts.append(f"  never attempted, yet present: {sorted(self.unexpected)[:50]}")
        if self.resurrected:
            parts.append(f"  reported not applied, yet present: {sorted(self.resurrected)[:50]}")
        return "\n".join(parts)


def check_set(acknowledged: Iterable[Any], unknown: Iterable[Any], failed: Iterable[Any],
              final_counts: dict[Any, int]) -> SetResult:
    """final_counts: value -> how many rows hold it, read after healing (a table without a
    UNIQUE constraint, so a duplicate apply shows as a count of 2)."""
    ack, unk, fail = set(acknowledged), set(unknown), set(failed)
    r = SetResult(valid=True, acknowledged=len(ack), unknown=len(unk), failed=len(fail),
                  present=sum(1 for c in final_counts.values() if c > 0))
    r.lost = [v for v in ack if final_counts.get(v, 0) == 0]
    r.duplicated = {v: c for v, c in final_counts.items() if c > 1}
    r.unexpected = [v for v in final_counts if v not in ack and v not in unk and v not in fail]
    r.resurrected = [v for v in fail if final_counts.get(v, 0) > 0]
    r.recovered = sum(1 for v in unk if final_counts.get(v, 0) > 0)
    r.valid = not (r.lost or r.duplicated or r.unexpected or r.resurrected)
    return r


# -------------------------------------------------------------------------- read your writes


@dataclass
class RYWResult:
    valid: bool
    reads: int = 0
    violations: list[str] = field(default_factory=list)

    def explain(self) -> str:
        if self.valid:
            return f"read-your-writes: {self.reads} stale reads OK"
        return f"read-your-writes: {len(self.violations)} of {self.reads} stale reads INVALID:\n" + "\n".join(
            "  " + v for v in self.violations[:20])


def check_read_your_writes(events: Iterable[dict[str, Any]]) -> RYWResult:
    """Each process owns one key and writes increasing integers to it, then reads it with
    consistency="stale" and min_index = the index of its last acknowledged write.

    Events (in the process's own order), each with "process":
      {"f": "write", "type": "ok"|"info"|"fail", "value": v, "index": i}
      {"f": "read",  "type": "ok", "value": v, "min_index": m, "index": i}
    A read must return a value >= the last acknowledged write's value, <= the largest value
    attempted so far, and from a snapshot index >= min_index. (A lower serial cannot apply
    after a higher one: the session table refuses stale serials, and log order follows
    proposal order for one sequential client.)"""
    acked: dict[Any, int] = {}
    attempted: dict[Any, int] = {}
    r = RYWResult(valid=True)
    for ev in events:
        p = ev["process"]
        if ev["f"] == "write":
            if ev["type"] in ("ok", "info"):
                attempted[p] = max(attempted.get(p, 0), ev["value"])
            if ev["type"] == "ok":
                acked[p] = max(acked.get(p, 0), ev["value"])
        elif ev["f"] == "read" and ev["type"] == "ok":
            r.reads += 1
            v = ev["value"] if ev["value"] is not None else 0
            lo, hi = acked.get(p, 0), attempted.get(p, 0)
            if not lo <= v <= hi:
                r.violations.append(f"process {p}: stale read (min_index {ev.get('min_index')}, served at index "
                                    f"{ev.get('index')} by {ev.get('node')}) saw {v}, expected {lo}..{hi}")
            elif ev.get("index") is not None and ev.get("min_index") is not None and ev["index"] < ev["min_index"]:
                r.violations.append(f"process {p}: stale read served at index {ev['index']} < min_index {ev['min_index']}")
    r.valid = not r.violations
    return r


Checker = Callable[[list[Op]], Result]

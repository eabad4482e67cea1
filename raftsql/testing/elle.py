"""A transactional consistency checker for list-append histories, after Jepsen's Elle (Kingsbury
and Alvaro, "Elle: Inferring Isolation Anomalies from Experimental Observations", VLDB 2020).
Pure: no I/O.

The workload: keys hold lists; a transaction is a list of micro-operations, each
("append", key, value), appending a value unique to that key, or ("r", key, list), reading
the whole list. Because every value is appended once and a list only grows, reads reveal the
order in which appends took effect (the version order of each key) and which transaction wrote
each version. From that the checker builds Adya's dependency graph between committed
transactions:

- ww (write-write): T1 appended the element right before T2's in a key's version order;
- wr (write-read): T2 read a list whose last element T1 appended;
- rw (read-write, an anti-dependency): T1 read a list that T2's append extends next;
- rt (real time, optional): T1 completed before T2 was invoked (strict serializability).

and looks for cycles, named by the weakest edges they need, plus the anomalies that need no
cycle:

| anomaly | what it is |
|---|---|
| G0 | a cycle of ww edges only (dirty write) |
| G1a | a committed transaction read a value a failed (aborted) transaction appended |
| G1b | a committed transaction read a value that was not its writer's last append to that key |
| G1c | a cycle of ww and wr edges, with at least one wr (circular information flow) |
| G-single | a cycle with exactly one rw edge (read skew; Adya's G2 with one anti-dependency) |
| G2 | a cycle with two or more rw edges (write skew) |
| X-realtime | cycle X only closes with real-time edges: serializable, not strictly |
| incompatible-order | two reads of a key that are not prefixes of one another |
| duplicate-elements | a value twice in one read |
| garbage-read | a value nobody appended |
| internal | a transaction's read disagrees with its own earlier reads and appends |

Outcomes: "ok" committed; "fail" definitely did not commit (its appends must never be seen);
"info" unknown (its reads are unknown; its appends count as committed once anyone saw one).
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

WW, WR, RW, RT = "ww", "wr", "rw", "rt"
CYCLE_ANOMALIES = ("G0", "G1c", "G-single", "G2")
ANOMALIES = (
    "G0", "G1a", "G1b", "G1c", "G-single", "G2",
    "G0-realtime", "G1c-realtime", "G-single-realtime", "G2-realtime",
    "incompatible-order", "duplicate-elements", "garbage-read", "internal",
)


@dataclass
class Txn:
    """One transaction of the history. ops: [("append", k, v) | ("r", k, list | None)];
    type: "ok" | "fail" | "info"; invoke / complete: times (complete None if unknown)."""

    id: int
    type: str
    ops: list[tuple[str, Any, Any]]
    process: Any = None
    invoke: float = 0.0
    complete: float | None = None

    def describe(self) -> str:
        def show(v: Any) -> str:
            if isinstance(v, list) and len(v) > 4:
                return f"[..{len(v) - 3} more, {', '.join(map(str, v[-3:]))}]"
            return str(v)

        ops = " ".join(f"{f}({k},{v})" if f == "append" else f"r({k})={show(v)}"
                       for f, k, v in self.ops)
        return f"T{self.id}[{self.type} p={self.process}] {ops}"


@dataclass
class Result:
    valid: bool
    anomalies: dict[str, list[str]] = field(default_factory=dict)
    txns: int = 0
    committed: int = 0
    edges: dict[str, int] = field(default_factory=dict)

    @property
    def counts(self) -> dict[str, int]:
        return {name: len(found) for name, found in self.anomalies.items() if found}

    def explain(self, limit: int = 3) -> str:
        if self.valid:
            return (f"no anomalies among {self.txns} transactions ({self.committed} committed); "
                    f"edges {self.edges}")
        lines = [f"ANOMALIES {self.counts} among {self.txns} transactions ({self.committed} committed)"]
        for name in ANOMALIES:
            for found in self.anomalies.get(name, [])[:limit]:
                lines.append(f"  {name}: {found}")
        return "\n".join(lines)


def check(txns: Iterable[Txn], *, realtime: bool = False) -> Result:
    """Check a list-append history; see the module docstring."""
    txns = list(txns)
    by_id = {t.id: t for t in txns}
    found: dict[str, list[str]] = defaultdict(list)

    # Who appended what. Values are unique per key; a duplicate append is a harness bug.
    writer: dict[tuple[Any, Any], int] = {}
    appends_of: dict[tuple[int, Any], list[Any]] = defaultdict(list)  # (txn, key) -> values
    for t in txns:
        for f, k, v in t.ops:
            if f == "append":
                if (k, v) in writer:
                    raise ValueError(f"value {v!r} appended twice to key {k!r}")
                writer[(k, v)] = t.id
                appends_of[(t.id, k)].append(v)

    # Reads of committed transactions: their lists, checked one by one.
    reads: list[tuple[int, Any, list]] = []
    for t in txns:
        if t.type != "ok":
            continue
        own: dict[Any, list] = defaultdict(list)
        seen: dict[Any, list] = {}
        for f, k, v in t.ops:
            if f == "append":
                own[k].append(v)
                continue
            if v is None:
                continue
            lst = list(v)
            if len(set(lst)) != len(lst):
                found["duplicate-elements"].append(f"{t.describe()}: key {k!r} read {lst}")
            for x in lst:
                w = writer.get((k, x))
                if w is None:
                    found["garbage-read"].append(f"{t.describe()}: key {k!r} holds {x!r}, never appended")
                elif w != t.id and by_id[w].type == "fail":
                    found["G1a"].append(f"{t.describe()} read {x!r} of key {k!r}, appended by failed {by_id[w].describe()}")
            # Its own appends so far must be the tail, in order; and a later read of a key
            # must extend an earlier one (no writes in between can be lost).
            mine = own.get(k, [])
            if mine and lst[-len(mine):] != mine:
                found["internal"].append(f"{t.describe()}: read {lst} of key {k!r} after appending {mine}")
            before = seen.get(k)
            if before is not None and lst[:len(before)] != before:
                found["internal"].append(f"{t.describe()}: read {lst} of key {k!r} after reading {before}")
            seen[k] = lst
            ext = lst[:len(lst) - len(mine)] if mine and lst[-len(mine):] == mine else lst
            reads.append((t.id, k, ext))
            if ext:
                w = writer.get((k, ext[-1]))
                if w is not None and w != t.id:
                    vals = appends_of[(w, k)]
                    if vals and vals[-1] != ext[-1]:
                        found["G1b"].append(
                            f"{t.describe()} read {ext[-1]!r} of key {k!r}, an intermediate "
                            f"append of {by_id[w].describe()}")

    # Version order per key: the longest read; every other read must be a prefix of it.
    order: dict[Any, list] = {}
    for _tid, k, lst in reads:
        cur = order.get(k)
        if cur is None or len(lst) > len(cur):
            order[k] = lst
    for tid, k, lst in reads:
        longest = order[k]
        if longest[:len(lst)] != lst:
            found["incompatible-order"].append(
                f"key {k!r}: {by_id[tid].describe()} read {lst}, not a prefix of {longest}")

    # Committed transactions: ok ones, and info ones whose appends someone saw.
    observed = {writer[(k, x)] for k, lst in order.items() for x in lst if (k, x) in writer}
    nodes = {t.id for t in txns if t.type == "ok" or (t.type == "info" and t.id in observed)}

    edges: dict[int, dict[int, set[str]]] = defaultdict(lambda: defaultdict(set))

    def edge(a: int | None, b: int | None, kind: str) -> None:
        if a is not None and b is not None and a != b and a in nodes and b in nodes:
            edges[a][b].add(kind)

    for k, lst in order.items():
        ws = [writer.get((k, x)) for x in lst]
        for a, b in zip(ws, ws[1:], strict=False):
            edge(a, b, WW)
    for tid, k, lst in reads:
        longest = order[k]
        if longest[:len(lst)] != lst:
            continue  # reported; its place in the order is unknown
        if lst:
            edge(writer.get((k, lst[-1])), tid, WR)
        if len(lst) < len(longest):
            edge(tid, writer.get((k, longest[len(lst)])), RW)
    if realtime:
        _realtime_edges([by_id[n] for n in nodes], edge)

    counts: dict[str, int] = defaultdict(int)
    for outs in edges.values():
        for kinds in outs.values():
            for kind in kinds:
                counts[kind] += 1
    for name, cycle in _cycles(edges, nodes):
        found[name].append(" ".join(
            f"{by_id[a].describe()} -{'/'.join(sorted(k))}->" for a, k in cycle) + f" T{cycle[0][0]}")
    return Result(valid=not any(found.values()), anomalies=dict(found), txns=len(txns),
                  committed=len(nodes), edges=dict(counts))


def _realtime_edges(txns: list[Txn], edge) -> None:
    """T1 -> T2 when T1 completed before T2 was invoked, transitively reduced: when T2 starts,
    edges come from the frontier of transactions completed so far that no later completed
    transaction already follows."""
    events = []
    for t in txns:
        events.append((t.invoke, 1, t.id))
        if t.complete is not None:
            events.append((t.complete, 0, t.id))
    events.sort(key=lambda e: (e[0], e[1]))
    frontier: set[int] = set()
    preds: dict[int, set[int]] = {}
    for _, kind, tid in events:
        if kind == 1:
            preds[tid] = set(frontier)
            for p in frontier:
                edge(p, tid, RT)
        else:
            frontier -= preds.get(tid, set())
            frontier.add(tid)


def _sccs(nodes: Iterable[int], succ) -> list[list[int]]:
    """Tarjan's strongly connected components (iterative)."""
    index: dict[int, int] = {}
    low: dict[int, int] = {}
    on: set[int] = set()
    stack: list[int] = []
    out: list[list[int]] = []
    counter = 0
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(succ(root)))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            advanced = False
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(succ(w))))
                    advanced = True
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(comp)
    return out


def _path(edges, start: int, goal: int, allowed: set[str], within: set[int]) -> list | None:
    """A shortest path start -> goal using only edges with a kind in `allowed`, as
    [(node, kinds), ...] ending at goal's predecessor; None if there is none."""
    prev: dict[int, tuple[int, frozenset]] = {}
    q = deque([start])
    seen = {start}
    while q:
        v = q.popleft()
        for w, kinds in edges.get(v, {}).items():
            use = kinds & allowed
            if not use or w not in within:
                continue
            if w == goal:
                path = [(v, frozenset(use))]
                while v != start:
                    p, k = prev[v]
                    path.append((p, k))
                    v = p
                return path[::-1]
            if w not in seen:
                seen.add(w)
                prev[w] = (v, frozenset(use))
                q.append(w)
    return None


def _cycles(edges, nodes: set[int]):
    """Yield (anomaly name, cycle) for each strongly connected component: the weakest cycle
    it holds without real-time edges, and, where it needs them, with them."""
    data = {WW, WR, RW}

    def succ_of(kinds):
        def succ(v):
            return [w for w, k in edges.get(v, {}).items() if k & kinds]
        return succ

    def classify(comp: list[int], allowed: set[str]):
        within = set(comp)
        for name, kinds in (("G0", {WW}), ("G1c", {WW, WR})):
            for v in comp:
                cyc = _path(edges, v, v, kinds | (allowed - data), within)
                if cyc:
                    return name, cyc
        # One anti-dependency: an rw edge a -> b closed by a path b -> a without rw.
        for a in comp:
            for b, kinds in edges.get(a, {}).items():
                if RW in kinds and b in within:
                    back = _path(edges, b, a, (allowed - {RW}), within)
                    if back is not None:
                        return "G-single", [(a, frozenset({RW}))] + back
        for v in comp:
            cyc = _path(edges, v, v, allowed, within)
            if cyc:
                return "G2", cyc
        return None

    reported: set[frozenset] = set()
    for comp in _sccs(sorted(nodes), succ_of(data)):
        got = classify(comp, data)
        if got:
            reported.add(frozenset(comp))
            yield got
    with_rt = data | {RT}
    for comp in _sccs(sorted(nodes), succ_of(with_rt)):
        if frozenset(comp) in reported:
            continue
        got = classify(comp, with_rt)
        if got and any(RT in k for _, k in got[1]):
            yield got[0] + "-realtime", got[1]


def from_events(events: Iterable[dict[str, Any]]) -> list[Txn]:
    """Transactions from Jepsen-style events ({"process", "type", "value": [[f, k, v], ...],
    "time"}): an invocation and its completion on the same process. An invocation never
    completed is "info"."""
    open_: dict[Any, dict[str, Any]] = {}
    out: list[Txn] = []
    for ev in events:
        p, t = ev.get("process"), ev.get("type")
        if t == "invoke":
            open_[p] = ev
            continue
        if t not in ("ok", "fail", "info"):
            continue
        inv = open_.pop(p, None)
        if inv is None:
            continue
        ops = ev["value"] if t == "ok" else inv["value"]
        out.append(Txn(id=len(out), type=t, ops=[tuple(op) for op in ops], process=p,
                       invoke=inv["time"], complete=ev["time"] if t == "ok" else None))
    for p, inv in open_.items():
        out.append(Txn(id=len(out), type="info", ops=[tuple(op) for op in inv["value"]],
                       process=p, invoke=inv["time"]))
    return out

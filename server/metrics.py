"""A node's counters and histograms (README, "Monitoring"; server/DESIGN.md, "Metrics").

Cheap, always on, and free of any dependency: the parts that observe something (the log store's
sync, the state machine's apply, the node's writes and leader changes, the listener's refusals,
snapshots) call into the objects below, one lock and a few additions per observation. Nothing
here reads a clock by itself or touches the network. server/metrics_http.py turns them, together
with what the node reports at that moment (Node.status(), the transport), into Prometheus text
format when something scrapes `--metrics-listen`; `raftsql status` shows the same figures.

They are per process: a node process runs one node.
"""

from __future__ import annotations

import bisect
import threading
from typing import Any

# Seconds: from 50 us (an fsync on a fast disk) to 10 s (a stalled disk or a huge batch).
LATENCY_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                   0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
# Seconds: snapshots copy or install a whole database.
SNAPSHOT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class Counter:
    """A count that only goes up."""

    def __init__(self, name: str, doc: str):
        self.name, self.doc = name, doc
        self._lock = threading.Lock()
        self.value = 0

    def inc(self, n: int = 1) -> None:
        with self._lock:
            self.value += n


class LabeledCounter:
    """Counters by one label value (say, the reason of a refusal)."""

    def __init__(self, name: str, doc: str, label: str):
        self.name, self.doc, self.label = name, doc, label
        self._lock = threading.Lock()
        self._values: dict[str, int] = {}

    def inc(self, value: str, n: int = 1) -> None:
        with self._lock:
            self._values[value] = self._values.get(value, 0) + n

    def values(self) -> dict[str, int]:
        with self._lock:
            return dict(self._values)


class Histogram:
    """Observations in fixed buckets (upper bounds, seconds), with their sum and count."""

    def __init__(self, name: str, doc: str, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.name, self.doc = name, doc
        self.buckets = tuple(buckets)
        self._lock = threading.Lock()
        self._counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self._sum = 0.0

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.buckets, value)
        with self._lock:
            self._counts[i] += 1
            self._sum += value

    def snapshot(self) -> tuple[list[tuple[float, int]], float, int]:
        """([(upper bound, cumulative count), ..., (inf, total)], sum, count)."""
        with self._lock:
            counts, total = list(self._counts), self._sum
        out, running = [], 0
        for bound, c in zip((*self.buckets, float("inf")), counts, strict=True):
            running += c
            out.append((bound, running))
        return out, total, running

    def summary(self) -> dict[str, Any]:
        """count, mean and the bucket bounds holding the 50th and 99th percentile (an upper
        bound on each: the histogram does not keep the values)."""
        cumulative, total, count = self.snapshot()

        def bound(q: float) -> float | None:
            if not count:
                return None
            for b, c in cumulative:
                if c >= q * count:
                    return b
            return None

        # Past the top bucket the bound is +Inf, which JSON cannot carry: None, and the top
        # bucket's bound as "above" (`raftsql status` shows ">bound").
        p50, p99 = bound(0.5), bound(0.99)
        out = {"count": count, "mean_s": total / count if count else None,
               "p50_le_s": None if p50 == float("inf") else p50,
               "p99_le_s": None if p99 == float("inf") else p99}
        if p99 == float("inf"):
            out["p99_above_s"] = self.buckets[-1]
        return out


# What the node's parts observe.
FSYNC = Histogram("raftsql_fsync_seconds",
                  "One log sync: writing the buffered records and fsyncing them (group commit).")
APPLY = Histogram("raftsql_apply_seconds",
                  "Applying one batch of committed entries to SQLite (one transaction).")
APPLIED_ENTRIES = Counter("raftsql_applied_entries_total", "Entries applied to SQLite.")
WRITES = Histogram("raftsql_write_seconds",
                   "On the leader: a write from its request to its result (propose, replicate, "
                   "fsync, commit, apply).")
EARLY_ACKS = Counter("raftsql_early_acks_total",
                     "On the leader: durability='leader' writes answered once its own disk held "
                     "them, before their quorum (the rest of such writes waited for it: the "
                     "max_unreplicated_writes window was full).")
PROPOSALS = Counter("raftsql_proposals_total",
                    "Entries this node proposed as leader (writes, membership changes, admin "
                    "records).")
LEADER_CHANGES = Counter("raftsql_leader_changes_seen_total",
                         "Times this node saw a new leader (itself included).")
FOREIGN_PEERS = Counter("raftsql_foreign_peer_refusals_total",
                        "Connections between this node and a node that holds another cluster's "
                        "data (another cluster id), refused at the hello, either side.")
REFUSALS = LabeledCounter("raftsql_client_refusals_total",
                          "Client connections or requests refused: permission (the certificate's "
                          "role), revoked (a revoked certificate, at its hello or open "
                          "connection), connection_limit (max_client_connections).", "reason")
SNAPSHOT_TAKE = Histogram("raftsql_snapshot_take_seconds",
                          "Taking one snapshot: copying the database and fsyncing the copy.",
                          SNAPSHOT_BUCKETS)
SNAPSHOT_INSTALL = Histogram("raftsql_snapshot_install_seconds",
                             "Installing one snapshot received from the leader.", SNAPSHOT_BUCKETS)

HISTOGRAMS = (WRITES, FSYNC, APPLY, SNAPSHOT_TAKE, SNAPSHOT_INSTALL)
COUNTERS = (PROPOSALS, LEADER_CHANGES, APPLIED_ENTRIES, FOREIGN_PEERS)


def leader_changed(old: str | None, new: str | None) -> None:
    """The node's view of the leader went from `old` to `new`."""
    if new is not None and new != old:
        LEADER_CHANGES.inc()


def summary() -> dict[str, Any]:
    """The counters and histograms as plain values (for the status request)."""
    out: dict[str, Any] = {c.name: c.value for c in COUNTERS}
    out[REFUSALS.name] = REFUSALS.values()
    for h in HISTOGRAMS:
        out[h.name] = h.summary()
    return out


def figures(node: Any, status: dict[str, Any]) -> dict[str, Any]:
    """Everything `raftsql status` shows besides the Raft state: summary() plus what the node
    holds now (log size, client connections, revocations, each follower's lag on a leader).
    `status` is node.status() taken just before."""
    out = summary()
    transport = getattr(node, "transport", None)
    out["client_connections"] = transport.client_connections if transport is not None else 0
    out["log_bytes"] = node.store.disk_bytes()
    out["log_entries"] = status["last_index"] - status["snapshot_index"]
    out["revoked_certificates"] = len(node.sm.records.revoked)
    lag: dict[str, int] = {}
    if status.get("role") == "leader":
        for peer, p in (status.get("progress") or {}).items():
            lag[peer] = max(0, status["last_index"] - p["match"])
    out["peer_lag_entries"] = lag
    return out

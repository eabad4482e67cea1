"""An opt-in trace of where a write's time goes: each node records, per log index, when the
entry passed each stage of the write path; benchmarks/breakdown.py joins the records of every
node with the client's own and prints the time between stages.

Times are `time.monotonic_ns()`: CLOCK_MONOTONIC, one clock for every process on a machine,
so the records of the nodes of a local cluster can be compared directly.

Stages, in the order a write passes them (L: leader, F: follower):
    recv      L  the client's request frame was read
    propose   L  the entry is in the leader's log (index known)
    send      L  the appends carrying it were written to the followers' sockets (or queued)
    recv      F  an append carrying it was stepped into the follower's core
    persist   L/F its fsync returned
    ack       F  the follower's acknowledgement was written (after its fsync)
    ack:<id>  L  the acknowledgement from follower <id> was stepped into the leader's core
    commit    L/F the entry was handed to the apply thread (committed and durable here)
    apply     L/F SQLite applied it (its transaction committed)
    reply     L  the response was written to the client's socket

A node records only when started with `trace = true` (RAFTSQL_TRACE=1); otherwise no call
site does more than test one attribute for None. The records are a bounded ring (the newest
`capacity`), fetched with the "trace" request.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Iterable
from typing import Any

_now = time.monotonic_ns

DEFAULT_CAPACITY = 200_000

# Set by the thread that read a client's request, read where its entry gets an index.
_local = threading.local()


class Trace:
    def __init__(self, capacity: int = DEFAULT_CAPACITY):
        self._records: collections.deque[tuple[int, str, int]] = collections.deque(maxlen=capacity)

    def mark(self, index: int, stage: str, t: int | None = None) -> None:
        self._records.append((index, stage, _now() if t is None else t))

    def mark_entries(self, entries: Iterable[Any], stage: str) -> None:
        t = _now()
        add = self._records.append
        for e in entries:
            add((e.index, stage, t))

    def mark_acks(self, msgs: Iterable[Any]) -> None:
        """A follower's append acknowledgements, keyed by the index they acknowledge."""
        t = _now()
        for m in msgs:
            if getattr(m.type, "name", "") == "APPEND_RESP" and not m.reject:
                self._records.append((m.index, "ack", t))

    def records(self) -> list[tuple[int, str, int]]:
        return list(self._records)

    # The client request being served by this thread (see module docstring).
    @staticmethod
    def request_received() -> None:
        _local.recv = _now()
        _local.index = None

    def proposed(self, index: int) -> None:
        """The request this thread serves became the entry at index."""
        t = getattr(_local, "recv", None)
        add = self._records.append
        if t is not None:
            add((index, "recv", t))
        add((index, "propose", _now()))
        _local.index = index

    def replied(self) -> None:
        """The response to this thread's request was written (marked if it was a write)."""
        index = getattr(_local, "index", None)
        if index is not None:
            self._records.append((index, "reply", _now()))
            _local.index = None

"""Applying committed entries, and the clients waiting for them (server/DESIGN.md, "Node
runtime").

- Waiters: the writes proposed here and the reads waiting for a ReadIndex, each with the
  client thread blocked on it; finished with a result, or failed when leadership moves.
- Applier: the apply thread. The Ready driver hands it committed entries (enqueue, which never
  blocks); it applies them in log order, one SQLite transaction per turn, and answers their
  waiters. Every entry is applied here, never in a thread that drives Raft: a small entry can
  do heavy work (a recursive CTE, a 400 MB zeroblob, a DROP of millions of rows), and
  heartbeats, votes, appends and fsyncs must keep flowing meanwhile.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from raftsql.command import Command
from raftsql.protocol import ErrorKind, RequestError
from raftsql.raft.types import ConfChange, Entry, EntryType
from raftsql.server.membership import member_change
from raftsql.server.statemachine import StateMachine

log = logging.getLogger("raftsql.node")


class Waiter:
    """One client request blocked until its entry is applied (or its read index confirmed)."""

    __slots__ = ("term", "event", "result", "error", "data", "cmd")

    def __init__(self, term: int):
        self.term = term
        self.event = threading.Event()
        self.result: Any = None
        self.error: RequestError | None = None
        # The proposed bytes and the Command they encode: applying our own entry skips the
        # decode (Command(...) == Command.decode(encode()), tests/unit/test_command.py).
        self.data: bytes | None = None
        self.cmd: Command | None = None

    def finish(self, result: Any = None, error: RequestError | None = None) -> None:
        self.result, self.error = result, error
        self.event.set()


class Waiters:
    """The node's waiting requests. Every method is called with the node's lock held (`lock`
    is that lock); a waiter's event is set once, with a result or a RequestError."""

    def __init__(self, lock: threading.Lock):
        self.lock = lock
        self.proposals: dict[int, Waiter] = {}  # log index -> the write proposed there
        self.reads: dict[bytes, Waiter] = {}  # ReadIndex context -> the read waiting for it

    def fail(self, kind: ErrorKind, message: str, leader: tuple[str | None, str | None],
             proposals_unknown: bool, keep_upto: int = 0) -> None:
        """Fail every waiting request: writes (but those up to keep_upto: committed, so the
        apply thread answers them) with OUTCOME_UNKNOWN if proposals_unknown, else `kind`;
        reads with NOT_LEADER (for OUTCOME_UNKNOWN) or `kind`."""
        ld, addr = leader
        kept = {i: w for i, w in self.proposals.items() if i <= keep_upto}
        for i, w in self.proposals.items():
            if i not in kept:
                w.finish(error=RequestError(
                    ErrorKind.OUTCOME_UNKNOWN if proposals_unknown else kind, message, ld, addr))
        self.proposals = kept
        self.fail_reads(ErrorKind.NOT_LEADER if kind == ErrorKind.OUTCOME_UNKNOWN else kind,
                        message, leader)

    def fail_reads(self, kind: ErrorKind, message: str, leader: tuple[str | None, str | None]) -> None:
        for w in self.reads.values():
            w.finish(error=RequestError(kind, message, *leader))
        self.reads.clear()


class Applier:
    """Applies committed entries to the state machine in log order and answers their waiters.

    enqueue() is called by the Ready driver; run() is the apply thread. on_conf_change(cc)
    runs for each membership change, in log order, before the batch holding it is applied;
    on_applied(nbytes) after each batch (snapshots)."""

    def __init__(self, sm: Callable[[], StateMachine], waiters: Waiters,
                 on_conf_change: Callable[[ConfChange], None],
                 on_applied: Callable[[int], None], applied_index: int, trace: Any = None):
        self._sm = sm
        self._waiters = waiters
        self._on_conf_change = on_conf_change
        self._on_applied = on_applied
        self._trace = trace
        # The apply thread's queue of committed batches. _cv guards _queue and _applying;
        # queued_to (under the node lock) is the last index handed over.
        self._queue: collections.deque[list[Entry]] = collections.deque()
        self._cv = threading.Condition(threading.Lock())
        self._applying = False
        self._stopping = False
        self.queued_to = applied_index
        # When the batch being applied began (None: idle); read without a lock by the node's
        # busy-disk check (Node._disk_busy).
        self.busy_since: float | None = None

    def enqueue(self, entries: list[Entry]) -> None:
        """Hand committed entries (in log order, after those handed before) to the apply
        thread."""
        with self._waiters.lock:
            self.queued_to = entries[-1].index
        with self._cv:
            self._queue.append(entries)
            if not self._applying:
                self._cv.notify()

    def run(self) -> None:
        """The apply thread: applies everything queued, in one SQLite transaction per turn.
        Raises what apply raises (the node stops)."""
        cv = self._cv
        queue = self._queue
        while True:
            with cv:
                self._applying = False
                cv.notify_all()  # drain()
                while not queue and not self._stopping:
                    cv.wait(0.5)
                if self._stopping:
                    return  # what is queued is in the log: replayed after a restart
                entries = queue.popleft()
                while queue:
                    entries = entries + queue.popleft()
                self._applying = True
            self.busy_since = time.monotonic()
            try:
                self._apply(entries)
            finally:
                self.busy_since = None
            self._on_applied(max(1, sum(len(e.data) for e in entries)))

    def drain(self) -> None:
        """Wait until everything queued is applied (before a snapshot replaces the database)."""
        with self._cv:
            while (self._queue or self._applying) and not self._stopping:
                self._cv.wait(0.5)

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()

    def _apply(self, entries: list[Entry]) -> None:
        batch: list[tuple[int, Any]] = []
        proposals = self._waiters.proposals
        for e in entries:
            if e.type == EntryType.CONF_CHANGE:
                cc = ConfChange.decode(e.data)
                self._on_conf_change(cc)  # the address book (fsynced) and transport peers
                # The state machine keeps the address book too, so snapshots carry it.
                batch.append((e.index, member_change(cc)))
            else:
                w = proposals.get(e.index)  # atomic; an entry we proposed carries its Command
                if w is not None and w.data is e.data and w.cmd is not None:
                    batch.append((e.index, w.cmd))
                else:
                    batch.append((e.index, e.data))
        results = self._sm().apply_many(batch)
        if self._trace is not None:
            self._trace.mark_entries(entries, "apply")
        with self._waiters.lock:
            proposals = self._waiters.proposals
            for e, res in zip(entries, results, strict=True):
                w = proposals.pop(e.index, None)
                if w is None:
                    continue
                if e.term == w.term:
                    w.finish(result=res)
                else:
                    # Another leader's entry took this index: ours can never commit.
                    w.finish(error=RequestError(
                        ErrorKind.NOT_LEADER,
                        "leadership changed before the write committed; it was not applied"))

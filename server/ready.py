"""The Ready driver: carries out what the Raft core asks for, in the order its contract demands
(raftsql/raft/types.py, Ready). One class drives every core: a node's (server/node.py, with its
log store, its TLS transport and SQLite) and each of the simulator's (raftsql/sim, with
in-memory disks and a seeded network), so the code that persists, sends, installs and applies
is the code the simulator checks under seeded faults.

What differs between the two is handed in:

    storage     append(entries), set_hard_state(hs), sync(): the durable log
    send        hand messages to the network (a SNAPSHOT message goes with its file)
    install     replace the state machine (and the log store's contents) with a snapshot the
                core accepted; called before the Ready's entries are persisted
    apply       hand committed entries to the state machine, in log order
    done        after a Ready: its read states and soft state (what waits on them)
    call        how to call into the core: under the node's lock; the simulator checks its
                invariants after every call

A Ready is carried out in two halves, so the simulator can let virtual time pass during the
fsync (and crash in between): begin() takes a Ready, sends the messages that may leave at once
(the leader's appends: dissertation 10.2.1), installs its snapshot, buffers its entries and
hard state, and hands over the committed entries that are already durable here; finish()
syncs (if the Ready must be durable), then sends the messages that promise something about
our disk (votes, append acknowledgements), hands over the rest of the committed entries and
advances the core. A node calls one after the other (run_once).

Committed entries that were durable in this node's log before the Ready (every one below the
Ready's first new entry) are handed to `apply` in begin(), before the fsync: they are on a
majority of disks including ours, so applying them while the next batch is being fsynced
changes nothing a crash could expose. On a leader under load this is most of them: the entry
that just committed is applied while the entries proposed meanwhile are fsynced. A committed
entry that arrives in the same Ready (a follower learns an entry and its commit together) waits
for the fsync, as the core's ordering contract says.

`bugs` switches off one of the driver's own rules, for the simulator's mutation runs (each
must be caught): "ack_before_sync" sends the persisted messages before the sync,
"apply_before_sync" applies every committed entry before the sync, "skip_sync" never syncs.

`trace` (optional, raftsql/trace.py) records when each entry was sent, persisted, acknowledged
and handed to apply.

`early` (optional, EarlyAcks) answers writes proposed at durability "leader" once the leader's
own fsync of their entry is done, before a majority holds it, as long as at most `window` such
answers are outstanding (answered, not yet known committed); past that a write waits for its
quorum like any other. A leader that crashes or is deposed can therefore lose at most `window`
writes it acknowledged early, and none it acknowledged at quorum (see server/DESIGN.md,
"Leader durability"). The driver bug "early_ack_unbounded" ignores the window.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from raftsql.raft.core import Raft
from raftsql.raft.types import Entry, HardState, Message, Ready, Role, SnapshotMeta

DRIVER_BUGS = {
    "ack_before_sync": "send votes and append acknowledgements before the fsync",
    "apply_before_sync": "apply committed entries before the fsync of the same Ready",
    "skip_sync": "never fsync (a crash loses what was acknowledged)",
    "early_ack_unbounded": "answer every leader-durability write early, ignoring the window",
}


class EarlyAcks:
    """The leader's early answers to writes at durability "leader" (see the module text).

    expect(index, term, token) right after proposing such a write (token: what on_ack gets);
    the driver calls persisted(entries) after the fsync that made entries durable here,
    committed(index) when it hands committed entries to apply, and reset() when this node
    stops leading. on_ack(index, term, token) answers one write early. Thread-safe: expect()
    comes from client threads, the rest from the thread driving the core."""

    def __init__(self, window: int, on_ack: Callable[[int, int, Any], None],
                 bugs: frozenset[str] = frozenset()):
        if window < 0:
            raise ValueError("the early-acknowledgement window cannot be negative")
        self.window = window
        self._on_ack = on_ack
        self._unbounded = "early_ack_unbounded" in bugs
        self._lock = threading.Lock()
        self._expected: dict[int, tuple[int, Any]] = {}  # index -> (term, token)
        self._outstanding: collections.deque[int] = collections.deque()  # answered early
        self._committed = 0

    def expect(self, index: int, term: int, token: Any) -> None:
        with self._lock:
            if index > self._committed:
                self._expected[index] = (term, token)

    def persisted(self, entries: list[Entry]) -> None:
        acks = []
        with self._lock:
            if not self._expected:
                return
            for e in entries:
                want = self._expected.pop(e.index, None)
                if want is None or want[0] != e.term or e.index <= self._committed:
                    continue
                if len(self._outstanding) >= self.window and not self._unbounded:
                    continue  # answered by apply, at quorum
                self._outstanding.append(e.index)
                acks.append((e.index, e.term, want[1]))
        for index, term, token in acks:
            self._on_ack(index, term, token)

    def committed(self, index: int) -> None:
        with self._lock:
            if index <= self._committed:
                return
            self._committed = index
            out = self._outstanding
            while out and out[0] <= index:
                out.popleft()
            if self._expected:
                for i in [i for i in self._expected if i <= index]:
                    del self._expected[i]

    def reset(self) -> None:
        with self._lock:
            self._expected.clear()
            self._outstanding.clear()


class DurableLog(Protocol):
    def append(self, entries: list[Entry]) -> None: ...
    def set_hard_state(self, hs: HardState) -> None: ...
    def sync(self) -> None: ...


def _direct(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


class ReadyDriver:
    def __init__(
        self,
        core: Raft,
        storage: DurableLog,
        *,
        send: Callable[[list[Message]], None],
        install: Callable[[SnapshotMeta], None],
        apply: Callable[[list[Entry]], None],
        done: Callable[[Ready], None] | None = None,
        call: Callable[..., Any] = _direct,
        bugs: frozenset[str] = frozenset(),
        trace: Any = None,
        early: EarlyAcks | None = None,
    ):
        unknown = set(bugs) - set(DRIVER_BUGS)
        if unknown:
            raise ValueError(f"unknown driver bugs: {sorted(unknown)}")
        self.core = core
        self.storage = storage
        self._send = send
        self._install = install
        self._apply = apply
        self._done = done
        self._call = call
        self._bugs = bugs
        self.trace = trace
        self.early = early
        self.last_sync_s = 0.0  # how long the last fsync took (the node's busy-disk check)
        self._early = 0  # committed entries of the outstanding Ready handed over by begin()

    def _take(self) -> Ready | None:
        return self.core.ready() if self.core.has_ready() else None

    def begin(self) -> Ready | None:
        """Take the next Ready (None if the core has none) and do its first half: messages
        that may leave before the disk write, the snapshot install, the buffered writes, and
        the committed entries that were already durable here."""
        rd = self._call(self._take)
        if rd is None:
            return None
        tr = self.trace
        if rd.messages:
            self._send(rd.messages)
            if tr is not None and rd.entries:
                tr.mark_entries(rd.entries, "send")
        if rd.snapshot is not None:
            self._install(rd.snapshot)
        if rd.entries:
            self.storage.append(rd.entries)
        if rd.hard_state is not None:
            self.storage.set_hard_state(rd.hard_state)
        if "ack_before_sync" in self._bugs and rd.persisted_messages:
            self._send(rd.persisted_messages)
            rd.persisted_messages = []
        committed = rd.committed_entries
        if committed:
            if "apply_before_sync" in self._bugs:
                durable = len(committed)
            elif rd.entries:
                first_new = rd.entries[0].index
                durable = 0
                while durable < len(committed) and committed[durable].index < first_new:
                    durable += 1
            else:
                durable = len(committed)
            if durable:
                early = committed if durable == len(committed) else committed[:durable]
                if tr is not None:
                    tr.mark_entries(early, "commit")
                self._apply(early)
                if self.early is not None:
                    self.early.committed(early[-1].index)
        self._early = durable if committed else 0  # finish() hands over the rest
        return rd

    def finish(self, rd: Ready) -> None:
        """The second half: make the Ready durable, send what depended on that, hand the
        remaining committed entries over, report, advance the core."""
        tr = self.trace
        if rd.must_sync and "skip_sync" not in self._bugs:
            started = time.monotonic()
            self.storage.sync()
            self.last_sync_s = time.monotonic() - started
            if tr is not None and rd.entries:
                tr.mark_entries(rd.entries, "persist")
        if rd.persisted_messages:
            self._send(rd.persisted_messages)
            if tr is not None:
                tr.mark_acks(rd.persisted_messages)
        early = self.early
        if early is not None:
            if rd.soft_state is not None and rd.soft_state.role != Role.LEADER:
                early.reset()  # before this Ready's entries: they may overwrite ours
            elif rd.entries:
                early.persisted(rd.entries)
        if len(rd.committed_entries) > self._early:
            rest = rd.committed_entries[self._early:] if self._early else rd.committed_entries
            if tr is not None:
                tr.mark_entries(rest, "commit")
            self._apply(rest)
            if early is not None:
                early.committed(rest[-1].index)
        if self._done is not None:
            self._done(rd)
        self._call(self.core.advance, rd)

    def send_early(self) -> bool:
        """Send the heartbeats and heartbeat responses the core has ready (Raft.take_messages),
        without the rest of a Ready: while another call carries one out (its fsync may take
        long), or instead of driving one from a thread that must not wait for a disk. True if
        anything was sent."""
        msgs = self._call(self.core.take_messages)
        if msgs:
            self._send(msgs)  # heartbeats carry no entries: nothing for the trace
        return bool(msgs)

    def run_once(self) -> bool:
        """One whole Ready; False if the core had none."""
        rd = self.begin()
        if rd is None:
            return False
        self.finish(rd)
        return True

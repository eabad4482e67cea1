"""The durable-log interfaces that the server's log store and the simulator's disks both implement.

Two views of one log, as in etcd's raft (`Storage` for stable entries; the core keeps the
not-yet-persisted ones itself, its `unstable`):

- LogReader is all the core ever calls: read durable entries back by index, for a lagging
  follower, for committed entries to apply, or for a test. It is a plain method call (the
  store does the I/O), so the core stays a pure state machine that happens to be handed an
  object it may ask for bytes.
- LogStorage is what the driving code (server/node.py, raftsql/sim) calls, by the Ready
  contract in types.py. Writes are buffered until sync(); a crash loses every write since the
  last sync() (the simulator models exactly that).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from raftsql.raft.types import Entry, EntryType, HardState, SnapshotMeta


@dataclass(frozen=True, slots=True)
class StoredLog:
    """What the core keeps in memory about the durable log found at boot, without its data:
    the term of every entry after the snapshot (run-length: the first index of each run of
    equal terms), and the membership changes (tiny, rare, and needed to recompute the
    configuration). Entry data stays on disk until asked for."""

    last_index: int
    term_runs: tuple[tuple[int, int], ...] = ()  # (first index, term), ascending first index
    conf_changes: tuple[Entry, ...] = ()  # every CONF_CHANGE entry after the snapshot, in order

    @classmethod
    def of(cls, snapshot: SnapshotMeta, entries: Sequence[Entry]) -> StoredLog:
        """The summary of a log held as a list (the simulator's disk, tests)."""
        runs: list[tuple[int, int]] = []
        for e in entries:
            if not runs or runs[-1][1] != e.term:
                runs.append((e.index, e.term))
        confs = tuple(e for e in entries if e.type == EntryType.CONF_CHANGE)
        return cls(snapshot.index + len(entries), tuple(runs), confs)


def limit_size(entries: list[Entry], max_bytes: int | None) -> list[Entry]:
    """The longest prefix whose Entry.size() total is at most max_bytes, but at least one entry:
    the one rule for every byte cap (appends, committed entries, reads from a store)."""
    if max_bytes is None or len(entries) <= 1:
        return entries
    total = 0
    for n, e in enumerate(entries):
        total += e.size()
        if total > max_bytes and n > 0:
            return entries[:n]
    return entries


class LogReader(Protocol):
    """The core's only way to the disk (etcd's Storage.Entries)."""

    def read_entries(self, lo: int, hi: int, max_bytes: int | None = None) -> list[Entry]:
        """Durable entries [lo, hi), contiguous, capped by limit_size(max_bytes). The core asks
        only for entries it was told are durable (boot, or advance()) and has not compacted or
        truncated since, so they are on disk. Raises if the data cannot be read back intact
        (the server's LogCorruptError): the caller must stop, not guess."""
        ...


class LogStorage(LogReader, Protocol):
    def initial_state(self) -> tuple[HardState, SnapshotMeta, StoredLog]:
        """The state found on open, without entry data: hard state, compacted prefix, and the
        StoredLog (terms and membership changes) of every entry after snapshot.index."""
        ...

    def load(self) -> tuple[HardState, SnapshotMeta, list[Entry]]:
        """Like initial_state() but with every entry after snapshot.index read back, in index
        order. For tests and tools: a node boots from initial_state()."""
        ...

    def append(self, entries: Sequence[Entry]) -> None:
        """Append contiguous entries. If entries[0].index <= last index, first drop every entry
        from entries[0].index on (a conflicting suffix). Buffered until sync()."""
        ...

    def set_hard_state(self, hs: HardState) -> None:
        """Record term, vote and commit. Buffered until sync()."""
        ...

    def sync(self) -> None:
        """Make every earlier append and set_hard_state durable (one fsync: group commit)."""
        ...

    def compact(self, meta: SnapshotMeta) -> None:
        """Forget entries up to and including meta.index; they now live in a snapshot."""
        ...

    def install(self, meta: SnapshotMeta) -> None:
        """A snapshot from the leader replaced the state machine: drop every entry and resume
        after meta.index (Ready.snapshot). Durable at the next sync(); the state machine's copy
        of the snapshot must be durable first, so a crash in between restarts from either the
        old log or the new snapshot, never from a mix."""
        ...

    def close(self) -> None: ...

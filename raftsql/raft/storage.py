"""The durable-log interface that the server's log store and the simulator's disks both implement.

The core never calls this: the code that drives the core (server/node.py, raftsql/sim) does, by
the Ready contract in types.py. Writes are buffered until sync(); a crash loses every write since
the last sync() (the simulator models exactly that).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from raftsql.raft.types import Entry, HardState, SnapshotMeta


class LogStorage(Protocol):
    def load(self) -> tuple[HardState, SnapshotMeta, list[Entry]]:
        """The state found on open: hard state, compacted prefix, and every entry after
        snapshot.index, contiguous and in index order."""
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

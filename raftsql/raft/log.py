"""The core's view of the replicated log: a compacted prefix (snapshot) plus in-memory entries.

The core holds every entry after the snapshot in memory; the driving code persists the suffix
that Ready hands it and reports back through advance() how far the log is durable (`stable`).
"""

from __future__ import annotations

from collections.abc import Sequence

from raftsql.raft.types import Entry, SnapshotMeta


class LogInvariantError(AssertionError):
    """Raised when an operation would break a Raft log invariant (a bug, never an input error)."""


class RaftLog:
    # Invariants: snapshot.index <= applied <= committed <= last_index();
    #             entries[i].index == snapshot.index + 1 + i;
    #             stable <= last_index() (the durable prefix, as acknowledged by advance()).
    __slots__ = ("snapshot", "entries", "committed", "applied", "stable", "dirty_from")

    def __init__(self, snapshot: SnapshotMeta, entries: Sequence[Entry], committed: int):
        self.snapshot = snapshot
        self.entries: list[Entry] = list(entries)
        for i, e in enumerate(self.entries):
            if e.index != snapshot.index + 1 + i:
                raise LogInvariantError(f"log not contiguous at {e.index}")
        # A persisted commit index can exceed the persisted log only if the store lost entries.
        self.committed = min(max(committed, snapshot.index), self.last_index())
        self.applied = snapshot.index
        self.stable = self.last_index()  # everything we were handed at boot is on disk
        # Lowest index whose entry changed since the simulator last looked (its checker
        # re-verifies from here); harmless elsewhere.
        self.dirty_from = snapshot.index + 1

    # -- queries -----------------------------------------------------------------------------

    def first_index(self) -> int:
        return self.snapshot.index + 1

    def last_index(self) -> int:
        return self.snapshot.index + len(self.entries)

    def last_term(self) -> int:
        return self.entries[-1].term if self.entries else self.snapshot.term

    def term(self, index: int) -> int | None:
        """Term of the entry at index; None if compacted away or beyond the end."""
        if index == self.snapshot.index:
            return self.snapshot.term
        off = index - self.snapshot.index - 1
        if 0 <= off < len(self.entries):
            return self.entries[off].term
        return None

    def match_term(self, index: int, term: int) -> bool:
        return self.term(index) == term

    def entry(self, index: int) -> Entry:
        return self.entries[index - self.snapshot.index - 1]

    def slice(self, lo: int, hi: int, max_bytes: int | None = None) -> list[Entry]:
        """Entries [lo, hi). With max_bytes, stop before exceeding it (but return at least one)."""
        off = self.snapshot.index + 1
        if lo < off:
            raise LogInvariantError(f"slice from {lo} reaches into the compacted prefix ({off - 1})")
        out = self.entries[lo - off : hi - off]
        if max_bytes is not None and len(out) > 1:
            total = 0
            for n, e in enumerate(out):
                total += e.size()
                if total > max_bytes and n > 0:
                    return out[:n]
        return out

    def is_up_to_date(self, last_index: int, last_term: int) -> bool:
        """Election restriction (5.4.1): is a log ending at (last_index, last_term) at least as
        up to date as ours? Compare last terms first, then lengths."""
        my_term = self.last_term()
        return last_term > my_term or (last_term == my_term and last_index >= self.last_index())

    def first_index_of_term(self, index: int) -> int:
        """The first index of the run of entries sharing the term of `index` (for fast backtracking)."""
        t = self.term(index)
        i = index
        while i - 1 > self.snapshot.index and self.term(i - 1) == t:
            i -= 1
        return i

    def last_index_of_term(self, term: int, at_most: int) -> int | None:
        """The last index <= at_most whose entry has exactly `term`, if any."""
        i = min(at_most, self.last_index())
        while i > self.snapshot.index:
            t = self.term(i)
            if t == term:
                return i
            if t is not None and t < term:
                return None  # terms only grow along a log: no earlier entry can have it
            i -= 1
        return None

    # -- mutation ----------------------------------------------------------------------------

    def append(self, entries: Sequence[Entry]) -> None:
        """Append contiguous entries, first dropping any suffix from entries[0].index on."""
        if not entries:
            return
        first = entries[0].index
        if first <= self.committed:
            raise LogInvariantError(
                f"refusing to overwrite committed entry {first} (committed={self.committed})"
            )
        if first > self.last_index() + 1:
            raise LogInvariantError(f"gap: appending {first} after {self.last_index()}")
        if first <= self.last_index():
            del self.entries[first - self.snapshot.index - 1 :]
            if self.stable >= first:
                self.stable = first - 1
        self.dirty_from = min(self.dirty_from, first)
        self.entries.extend(entries)

    def find_conflict(self, entries: Sequence[Entry]) -> int:
        """Index of the first entry whose term differs from ours (or that we lack); 0 if none."""
        for e in entries:
            if self.term(e.index) != e.term:
                return e.index
        return 0

    def commit_to(self, index: int) -> bool:
        if index > self.committed:
            if index > self.last_index():
                raise LogInvariantError(f"commit {index} beyond last index {self.last_index()}")
            self.committed = index
            return True
        return False

    def stable_to(self, index: int, term: int) -> None:
        """The store acknowledged entries up to (index, term). Ignored if the log changed since."""
        if self.term(index) == term and index > self.stable:
            self.stable = index

    def unstable(self) -> list[Entry]:
        return self.slice(self.stable + 1, self.last_index() + 1)

    def compact(self, meta: SnapshotMeta) -> None:
        """Drop entries up to meta.index (already applied and captured in a snapshot)."""
        if meta.index <= self.snapshot.index:
            return
        if meta.index > self.applied:
            raise LogInvariantError(f"compacting {meta.index} beyond applied {self.applied}")
        del self.entries[: meta.index - self.snapshot.index]
        self.snapshot = meta

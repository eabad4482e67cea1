"""The core's view of the replicated log: a compacted prefix (snapshot), then the live entries.

Memory is bounded (DESIGN.md, "Bounded log memory"). For every live entry the core keeps only
its term (run-length encoded) and, for membership changes, the entry itself. Entry data lives
in one contiguous window `_mem` at the end of the log:

    snapshot.index | durable, evicted (read back  | durable, cached      | unstable (not yet
                   | through the LogReader)       | (<= cache_bytes)     | synced: never evicted)
                   ^ first_index()                ^ _mem_first           ^ stable + 1     ^ last

The driving code persists the unstable suffix that Ready hands it and reports back through
advance() how far the log is durable (`stable`). Only then may an entry's data be dropped from
memory, because only then can it be read back. Without a LogReader (scenario tests that build
a core from a list) nothing is ever evicted.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence

from raftsql.raft.storage import LogReader, StoredLog, limit_size
from raftsql.raft.types import Entry, EntryType, SnapshotMeta

DEFAULT_CACHE_BYTES = 32 << 20
# What one cached entry costs in CPython besides its data: the Entry object, its bytes object's
# header, a boxed index and a list slot (measured with tracemalloc: about 130 bytes).
ENTRY_OVERHEAD = 128


def cost(e: Entry) -> int:
    """Bytes an entry is charged in the cache."""
    return len(e.data) + ENTRY_OVERHEAD


class LogInvariantError(AssertionError):
    """Raised when an operation would break a Raft log invariant (a bug, never an input error)."""


class RaftLog:
    # Invariants: snapshot.index <= applied <= committed <= last_index();
    #             stable <= last_index() (the durable prefix, as acknowledged by advance());
    #             first_index() <= _mem_first <= stable + 1 (every unstable entry is in memory),
    #             _mem[i].index == _mem_first + i and _mem ends at last_index();
    #             _cached == sum(cost(e) for e in _mem if e.index <= stable) <= cache_bytes
    #               whenever a LogReader is set (checked after every change of stable);
    #             _tfirst/_tterm: run-length terms of (snapshot.index, last_index()], _tfirst
    #               ascending, _tfirst[0] == first_index() when the log is not empty;
    #             _confs: the CONF_CHANGE entries of (snapshot.index, last_index()], in order.
    __slots__ = (
        "snapshot", "committed", "applied", "stable", "dirty_from", "failed",
        "storage", "cache_bytes", "_last", "_mem", "_mem_first", "_cached",
        "_tfirst", "_tterm", "_confs", "reads",
    )

    def __init__(
        self,
        snapshot: SnapshotMeta,
        entries: Sequence[Entry] | StoredLog,
        committed: int,
        storage: LogReader | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ):
        if cache_bytes < 0:
            raise ValueError("cache_bytes must be >= 0")
        self.snapshot = snapshot
        self.storage = storage
        self.cache_bytes = cache_bytes
        # The first error the LogReader raised. The core re-raises it from ready()/has_ready():
        # a core whose step failed half way must not go on (the driving code stops the node).
        self.failed: BaseException | None = None
        self.reads = 0  # entries read back through the LogReader (tests and stats)
        self._tfirst: list[int] = []
        self._tterm: list[int] = []
        if isinstance(entries, StoredLog):
            if storage is None and entries.last_index > snapshot.index:
                raise ValueError("a StoredLog needs a LogReader to read its entries")
            self._last = entries.last_index
            if self._last < snapshot.index:
                raise LogInvariantError(f"stored log ends at {self._last}, before the snapshot")
            prev = snapshot.index
            for first, term in entries.term_runs:
                if first <= prev or first > self._last:
                    raise LogInvariantError(f"bad term run at {first}")
                self._tfirst.append(first)
                self._tterm.append(term)
                prev = first
            if self._last > snapshot.index and self._tfirst[:1] != [snapshot.index + 1]:
                raise LogInvariantError("stored term runs do not start after the snapshot")
            self._confs = [e for e in entries.conf_changes if snapshot.index < e.index <= self._last]
            self._mem: list[Entry] = []
        else:
            self._mem = list(entries)
            for i, e in enumerate(self._mem):
                if e.index != snapshot.index + 1 + i:
                    raise LogInvariantError(f"log not contiguous at {e.index}")
            self._last = snapshot.index + len(self._mem)
            self._add_terms(self._mem)
            self._confs = [e for e in self._mem if e.type == EntryType.CONF_CHANGE]
        self._mem_first = self._last + 1 - len(self._mem)
        # A persisted commit index can exceed the persisted log only if the store lost entries.
        self.committed = min(max(committed, snapshot.index), self._last)
        self.applied = snapshot.index
        self.stable = self._last  # everything we were handed at boot is on disk
        self._cached = sum(cost(e) for e in self._mem)
        self._evict()
        # Lowest index whose entry changed since the simulator last looked (its checker
        # re-verifies from here); harmless elsewhere.
        self.dirty_from = snapshot.index + 1

    # -- queries -----------------------------------------------------------------------------

    def first_index(self) -> int:
        return self.snapshot.index + 1

    def last_index(self) -> int:
        return self._last

    def last_term(self) -> int:
        return self._tterm[-1] if self._tterm else self.snapshot.term

    def term(self, index: int) -> int | None:
        """Term of the entry at index; None if compacted away or beyond the end. From memory:
        the core asks this on nearly every message."""
        snap = self.snapshot.index
        if index <= snap:
            return self.snapshot.term if index == snap else None
        if index > self._last:
            return None
        tfirst = self._tfirst
        if index >= tfirst[-1]:
            return self._tterm[-1]
        return self._tterm[bisect_right(tfirst, index) - 1]

    def match_term(self, index: int, term: int) -> bool:
        return self.term(index) == term

    def entry(self, index: int) -> Entry:
        if index >= self._mem_first:
            return self._mem[index - self._mem_first]
        if index <= self.snapshot.index:
            raise LogInvariantError(f"entry {index} is compacted (snapshot at {self.snapshot.index})")
        return self._read(index, index + 1, None)[0]

    def slice(self, lo: int, hi: int, max_bytes: int | None = None) -> list[Entry]:
        """Entries [lo, hi). With max_bytes, stop before exceeding it (but return at least one)."""
        off = self.snapshot.index + 1
        if lo < off:
            raise LogInvariantError(f"slice from {lo} reaches into the compacted prefix ({off - 1})")
        hi = min(hi, self._last + 1)
        if lo >= hi:
            return []
        mf = self._mem_first
        if lo >= mf:
            return limit_size(self._mem[lo - mf : hi - mf], max_bytes)
        out = self._read(lo, min(hi, mf), max_bytes)
        if hi <= mf or out[-1].index < mf - 1:
            return out  # all from the store, or the byte cap stopped it there
        return limit_size(out + self._mem[: hi - mf], max_bytes)

    @property
    def entries(self) -> list[Entry]:
        """Every live entry, read back where evicted. For tests and checkers, not the hot path."""
        return self.slice(self.first_index(), self._last + 1)

    def conf_changes(self, upto: int) -> list[Entry]:
        """The CONF_CHANGE entries at or below upto, in log order (kept in memory)."""
        return [e for e in self._confs if e.index <= upto]

    def cached_bytes(self) -> int:
        """Bytes charged for durable entries held in memory (at most cache_bytes with a reader)."""
        return self._cached

    def resident_bytes(self) -> int:
        """Bytes charged for every entry held in memory, unstable ones included."""
        return sum(cost(e) for e in self._mem)

    def is_up_to_date(self, last_index: int, last_term: int) -> bool:
        """Election restriction (5.4.1): is a log ending at (last_index, last_term) at least as
        up to date as ours? Compare last terms first, then lengths."""
        my_term = self.last_term()
        return last_term > my_term or (last_term == my_term and last_index >= self._last)

    def first_index_of_term(self, index: int) -> int:
        """The first index of the run of entries sharing the term of `index` (for fast backtracking)."""
        if index <= self.snapshot.index:
            return index
        if index > self._last:
            return min(index, self._last + 1)
        r = bisect_right(self._tfirst, index) - 1
        return self._tfirst[r]

    def last_index_of_term(self, term: int, at_most: int) -> int | None:
        """The last index <= at_most whose entry has exactly `term`, if any."""
        i = min(at_most, self._last)
        if i <= self.snapshot.index:
            return None
        r = bisect_right(self._tfirst, i) - 1
        while r >= 0:
            t = self._tterm[r]
            if t == term:
                return i
            if t < term:
                return None  # terms only grow along a log: no earlier entry can have it
            i = self._tfirst[r] - 1
            r -= 1
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
        if first > self._last + 1:
            raise LogInvariantError(f"gap: appending {first} after {self._last}")
        if first <= self._last:
            self._truncate(first)
        self.dirty_from = min(self.dirty_from, first)
        self._mem.extend(entries)
        self._last = entries[-1].index
        self._add_terms(entries)
        self._confs.extend(e for e in entries if e.type == EntryType.CONF_CHANGE)

    def _truncate(self, first: int) -> None:
        """Drop every entry from first on (all after `committed`, so none is ever needed again)."""
        mf = self._mem_first
        if first >= mf:
            removed = self._mem[first - mf :]
            del self._mem[first - mf :]
        else:
            removed = self._mem
            self._mem = []
            self._mem_first = first
        self._cached -= sum(cost(e) for e in removed if e.index <= self.stable)
        if self.stable >= first:
            self.stable = first - 1
        r = bisect_right(self._tfirst, first - 1)
        del self._tfirst[r:]
        del self._tterm[r:]
        while self._confs and self._confs[-1].index >= first:
            self._confs.pop()
        self._last = first - 1

    def _add_terms(self, entries: Sequence[Entry]) -> None:
        tfirst, tterm = self._tfirst, self._tterm
        for e in entries:
            if not tterm or tterm[-1] != e.term:
                tfirst.append(e.index)
                tterm.append(e.term)

    def find_conflict(self, entries: Sequence[Entry]) -> int:
        """Index of the first entry whose term differs from ours (or that we lack); 0 if none."""
        for e in entries:
            if self.term(e.index) != e.term:
                return e.index
        return 0

    def commit_to(self, index: int) -> bool:
        if index > self.committed:
            if index > self._last:
                raise LogInvariantError(f"commit {index} beyond last index {self._last}")
            self.committed = index
            return True
        return False

    def stable_to(self, index: int, term: int) -> None:
        """The store acknowledged entries up to (index, term). Ignored if the log changed since."""
        if self.term(index) == term and index > self.stable:
            mf = self._mem_first
            self._cached += sum(cost(e) for e in self._mem[self.stable + 1 - mf : index + 1 - mf])
            self.stable = index
            self._evict()

    def unstable(self) -> list[Entry]:
        return self._mem[self.stable + 1 - self._mem_first :]

    def compact(self, meta: SnapshotMeta) -> None:
        """Drop entries up to meta.index (already applied and captured in a snapshot)."""
        if meta.index <= self.snapshot.index:
            return
        if meta.index > self.applied:
            raise LogInvariantError(f"compacting {meta.index} beyond applied {self.applied}")
        drop = meta.index - self._mem_first + 1
        if drop > 0:
            gone = self._mem[:drop]
            del self._mem[:drop]
            self._cached -= sum(cost(e) for e in gone if e.index <= self.stable)
            self._mem_first = meta.index + 1
        r = bisect_right(self._tfirst, meta.index)
        if r > 0:
            # The run holding meta.index + 1 now starts there (or there is no entry left).
            term_next = self.term(meta.index + 1)
            del self._tfirst[:r]
            del self._tterm[:r]
            if term_next is not None and (not self._tfirst or self._tfirst[0] != meta.index + 1):
                self._tfirst.insert(0, meta.index + 1)
                self._tterm.insert(0, term_next)
        self._confs = [e for e in self._confs if e.index > meta.index]
        self.snapshot = meta

    def restore(self, meta: SnapshotMeta) -> None:
        """InstallSnapshot (§7): the snapshot replaces the whole log; it resumes at meta.index + 1."""
        self.snapshot = meta
        self._last = meta.index
        self._mem = []
        self._mem_first = meta.index + 1
        self._cached = 0
        self._tfirst = []
        self._tterm = []
        self._confs = []
        self.committed = self.applied = self.stable = meta.index
        self.dirty_from = meta.index + 1

    # -- the cache ---------------------------------------------------------------------------

    def _evict(self) -> None:
        """Keep at most cache_bytes of durable entries in memory, dropping the oldest first. It
        drops down to 3/4 of the bound, so the list is cut once per quarter of the cache, not
        on every append (a cut moves every pointer left in the list)."""
        if self.storage is None or self._cached <= self.cache_bytes:
            return
        target = self.cache_bytes * 3 // 4
        mem, stable, cached = self._mem, self.stable, self._cached
        n = 0
        while n < len(mem) and cached > target and mem[n].index <= stable:
            cached -= cost(mem[n])
            n += 1
        del mem[:n]
        self._mem_first += n
        self._cached = cached

    def _read(self, lo: int, hi: int, max_bytes: int | None) -> list[Entry]:
        """Evicted entries [lo, hi) from the LogReader, checked against the terms we know."""
        if self.failed is not None:
            raise self.failed
        if self.storage is None:
            raise LogInvariantError(f"entries [{lo}, {hi}) are not in memory and there is no store")
        try:
            out = self.storage.read_entries(lo, hi, max_bytes)
            if not out or out[0].index != lo or len(out) > hi - lo:
                raise LogInvariantError(f"store returned {len(out)} entries for [{lo}, {hi})")
            for i, e in enumerate(out, lo):
                if e.index != i or e.term != self.term(i):
                    raise LogInvariantError(
                        f"store returned {e.index}:{e.term} for index {i} of term {self.term(i)}"
                    )
        except BaseException as e:
            self.failed = e
            raise
        self.reads += len(out)
        return out

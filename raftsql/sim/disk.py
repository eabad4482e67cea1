"""An in-memory disk implementing the LogStorage protocol, with crash semantics: writes are
buffered until sync(); a crash keeps only a random prefix of the unsynced writes (as a real
append-only file may), never anything out of order. The core reads evicted entries back from
it (read_entries) exactly as it does from the server's log store."""

from __future__ import annotations

import random
from collections.abc import Sequence

from raftsql.raft.storage import StoredLog, limit_size
from raftsql.raft.types import Entry, HardState, SnapshotMeta


class MemDisk:
    def __init__(self) -> None:
        self.hard_state = HardState()
        self.snapshot = SnapshotMeta()
        self.entries: list[Entry] = []
        self._pending: list[tuple[str, object]] = []
        self.syncs = 0
        self.reads = 0  # entries handed out by read_entries

    # LogStorage ---------------------------------------------------------------------------
    def initial_state(self) -> tuple[HardState, SnapshotMeta, StoredLog]:
        return self.hard_state, self.snapshot, StoredLog.of(self.snapshot, self.entries)

    def load(self) -> tuple[HardState, SnapshotMeta, list[Entry]]:
        return self.hard_state, self.snapshot, list(self.entries)

    def read_entries(self, lo: int, hi: int, max_bytes: int | None = None) -> list[Entry]:
        # Only synced state is readable: the core never asks for an entry it was not told is
        # durable, and a read that reached into the unsynced writes would hide that bug.
        base = self.snapshot.index + 1
        if lo < base or hi > base + len(self.entries) or lo >= hi:
            raise LookupError(
                f"read [{lo}, {hi}) outside the durable log [{base}, {base + len(self.entries)})"
            )
        out = limit_size(self.entries[lo - base : hi - base], max_bytes)
        self.reads += len(out)
        return out

    def append(self, entries: Sequence[Entry]) -> None:
        if entries:
            self._pending.append(("append", tuple(entries)))

    def set_hard_state(self, hs: HardState) -> None:
        self._pending.append(("hs", hs))

    def sync(self) -> None:
        for op in self._pending:
            self._apply(op)
        self._pending.clear()
        self.syncs += 1

    def compact(self, meta: SnapshotMeta) -> None:
        self._pending.append(("compact", meta))

    def install(self, meta: SnapshotMeta) -> None:
        self._pending.append(("install", meta))

    def close(self) -> None:
        pass

    # crash model --------------------------------------------------------------------------
    def crash(self, rng: random.Random) -> int:
        """Lose unsynced writes: a random prefix of them survives. Returns how many were lost."""
        keep = rng.randint(0, len(self._pending)) if self._pending else 0
        for op in self._pending[:keep]:
            self._apply(op)
        lost = len(self._pending) - keep
        self._pending.clear()
        return lost

    def wipe(self) -> None:
        self.__init__()

    def _apply(self, op: tuple[str, object]) -> None:
        kind, val = op
        if kind == "append":
            entries: tuple[Entry, ...] = val  # type: ignore[assignment]
            first = entries[0].index
            keep = first - self.snapshot.index - 1
            del self.entries[max(keep, 0) :]
            self.entries.extend(entries)
        elif kind == "hs":
            self.hard_state = val  # type: ignore[assignment]
        elif kind == "compact":
            meta: SnapshotMeta = val  # type: ignore[assignment]
            del self.entries[: meta.index - self.snapshot.index]
            self.snapshot = meta
        elif kind == "install":
            self.entries = []
            self.snapshot = val  # type: ignore[assignment]

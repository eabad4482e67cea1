"""A synchronous in-memory cluster for scenario tests: every step is explicit.

Unlike the seeded Simulation, nothing happens by chance here: the test ticks nodes, chooses
which messages are delivered or dropped, and crashes nodes (losing unsynced writes). Modelled on
etcd's raft `network` test helper and hashicorp/raft's testing.go.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable

from raftsql.raft.core import Config, Raft
from raftsql.raft.log import DEFAULT_CACHE_BYTES
from raftsql.raft.types import Entry, Message, MsgType, ReadState, Role
from raftsql.sim.disk import MemDisk


class SyncNet:
    def __init__(
        self, ids: Iterable[str], seed: int = 0, log_cache_bytes: int = DEFAULT_CACHE_BYTES, **config_kw
    ):
        self.ids = list(ids)
        self.log_cache_bytes = log_cache_bytes  # each core reads evicted entries from its disk
        self.config_kw = {"election_ticks": 10, "heartbeat_ticks": 1, **config_kw}
        self.config_kw.setdefault("voters", tuple(self.ids))
        self.rng = random.Random(seed)
        self.disks = {i: MemDisk() for i in self.ids}
        self.cores: dict[str, Raft | None] = {}
        self.applied: dict[str, list[Entry]] = {}
        self.installed: dict[str, list] = {}  # snapshots each node installed (Ready.snapshot)
        self.read_states: dict[str, list[ReadState]] = {i: [] for i in self.ids}
        self.queue: list[Message] = []
        self.dropped: set[tuple[str, str]] = set()
        self.filter: Callable[[Message], bool] | None = None  # return False to drop a message
        self.log_lines: list[str] = []
        for i in self.ids:
            self.start(i)

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self, nid: str) -> Raft:
        disk = self.disks[nid]
        hs, snap, stored = disk.initial_state()
        cfg = Config(id=nid, logger=self.log_lines.append, **self.config_kw)
        core = Raft(
            cfg, random.Random(self.rng.getrandbits(32)), hs, snap, stored,
            storage=disk, log_cache_bytes=self.log_cache_bytes,
        )
        self.cores[nid] = core
        self.applied[nid] = []
        return core

    def crash(self, nid: str, keep_unsynced: int = 0) -> None:
        """Crash nid. Unsynced writes are lost (in this harness every Ready is synced at once,
        so this only matters for tests that stop in the middle of a Ready)."""
        self.disks[nid].crash(random.Random(keep_unsynced))
        self.cores[nid] = None
        self.queue = [m for m in self.queue if m.to != nid]

    def __getitem__(self, nid: str) -> Raft:
        core = self.cores[nid]
        assert core is not None, f"{nid} is down"
        return core

    # -- network control ------------------------------------------------------------------------
    def isolate(self, nid: str) -> None:
        for o in self.ids:
            if o != nid:
                self.dropped |= {(nid, o), (o, nid)}

    def cut(self, a: str, b: str) -> None:
        self.dropped |= {(a, b), (b, a)}

    def heal(self) -> None:
        self.dropped = set()
        self.filter = None

    # -- driving ---------------------------------------------------------------------------------
    def process(self, nid: str) -> None:
        """Carry out every Ready of nid by the contract: send early messages, persist and
        sync, send the rest, apply, advance."""
        core = self.cores[nid]
        while core is not None and core.has_ready():
            rd = core.ready()
            self._post(rd.messages)
            disk = self.disks[nid]
            if rd.snapshot is not None:
                # The state machine becomes the snapshot: record what it covers.
                disk.install(rd.snapshot)
                self.installed.setdefault(nid, []).append(rd.snapshot)
            if rd.entries:
                disk.append(rd.entries)
            if rd.hard_state is not None:
                disk.set_hard_state(rd.hard_state)
            if rd.must_sync:
                disk.sync()
            self._post(rd.persisted_messages)
            self.applied[nid].extend(rd.committed_entries)
            self.read_states[nid].extend(rd.read_states)
            core.advance(rd)

    def _post(self, msgs: list[Message]) -> None:
        for m in msgs:
            if (m.sender, m.to) in self.dropped:
                continue
            if self.filter is not None and not self.filter(m):
                continue
            self.queue.append(m)

    def deliver(self, max_rounds: int = 10_000) -> int:
        """Process all nodes, then deliver queued messages (and their consequences) until the
        network is quiet. Returns the number of messages delivered."""
        n = 0
        for nid in self.ids:
            self.process(nid)
        for _ in range(max_rounds):
            if not self.queue:
                return n
            batch, self.queue = self.queue, []
            for m in batch:
                core = self.cores.get(m.to)
                if core is None or (m.sender, m.to) in self.dropped:
                    continue
                core.step(m)
                n += 1
                self.process(m.to)
        raise AssertionError("network did not settle")

    def take(self, nid: str | None = None, mtype: MsgType | None = None) -> list[Message]:
        """Remove and return queued messages (all, or those from nid / of a type)."""
        out, keep = [], []
        for m in self.queue:
            if (nid is None or m.sender == nid) and (mtype is None or m.type == mtype):
                out.append(m)
            else:
                keep.append(m)
        self.queue = keep
        return out

    def tick(self, nid: str, times: int = 1) -> None:
        for _ in range(times):
            self[nid].tick()
        self.process(nid)

    def tick_all(self, times: int = 1) -> None:
        for _ in range(times):
            for nid in self.ids:
                if self.cores[nid] is not None:
                    self.cores[nid].tick()
            self.deliver()

    def elect(self, nid: str) -> Raft:
        """Make nid campaign now and deliver until quiet; asserts it won."""
        self[nid].campaign()
        self.deliver()
        assert self[nid].role == Role.LEADER, f"{nid} did not win: {self[nid].status()}"
        return self[nid]

    def propose(self, nid: str, data: bytes) -> int:
        idx = self[nid].propose(data)
        self.deliver()
        return idx

    def leader(self) -> str | None:
        leaders = [i for i in self.ids if self.cores[i] is not None and self.cores[i].role == Role.LEADER]
        return max(leaders, key=lambda i: self.cores[i].term) if leaders else None

    def compact(self, nid: str, index: int):
        """nid snapshots its state machine at index and compacts its log and disk."""
        meta = self[nid].compact(index)
        self.disks[nid].compact(meta)
        self.disks[nid].sync()
        return meta

    def log_of(self, nid: str) -> list[tuple[int, int, bytes]]:
        return [(e.index, e.term, e.data) for e in self[nid].log.entries]

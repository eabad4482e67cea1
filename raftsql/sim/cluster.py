"""A seeded, single-threaded cluster simulator that owns time, the network and the disks.

One seed = one run: the seed picks the fault mix (drops, duplicates, reordering, delays,
partitions, crashes that lose unsynced writes, clock skew, membership changes, leadership
transfers), then a liveness phase heals everything. Safety invariants are checked after every
step of virtual time; the first violation ends the run with the trace's tail.
"""

from __future__ import annotations

import heapq
import random
from collections import deque
from dataclasses import dataclass, field

from raftsql.raft.core import Config, Raft
from raftsql.raft.log import LogInvariantError
from raftsql.raft.types import (
    ConfChange,
    ConfChangeType,
    EntryType,
    Message,
    NotLeader,
    ProposalDropped,
    Ready,
    Role,
)
from raftsql.sim.disk import MemDisk

TICK_UNITS = 10  # virtual time units per tick at normal clock speed
ELECTION_TICKS = 10
FAULT_UNITS = 4000  # length of the faulty phase
LIVENESS_TICKS = 300
READ_TIMEOUT = 100 * TICK_UNITS  # a client abandons a read (its message may have been dropped)  # once faults stop, the cluster must converge within this many ticks


class Violation(Exception):
    def __init__(self, invariant: str, detail: str):
        super().__init__(f"{invariant}: {detail}")
        self.invariant = invariant
        self.detail = detail


@dataclass
class FaultMix:
    drop: float
    duplicate: float
    max_latency: int
    crash_rate: float  # per unit of time, per cluster
    crash_in_sync: float  # chance a node loses power while an fsync is in flight
    partition_rate: float
    skew: bool
    membership: bool
    transfers: bool
    propose_rate: float
    read_rate: float

    @classmethod
    def from_rng(cls, rng: random.Random) -> FaultMix:
        return cls(
            drop=rng.choice([0.0, 0.02, 0.1, 0.25]),
            duplicate=rng.choice([0.0, 0.02, 0.1]),
            max_latency=rng.choice([2, 5, 15, 40]),
            crash_rate=rng.choice([0.0, 0.0005, 0.002, 0.005]),
            crash_in_sync=rng.choice([0.0, 0.0, 0.01, 0.05]),
            partition_rate=rng.choice([0.0, 0.001, 0.004]),
            skew=rng.random() < 0.4,
            membership=rng.random() < 0.4,
            transfers=rng.random() < 0.4,
            propose_rate=rng.choice([0.02, 0.1, 0.3]),
            read_rate=rng.choice([0.01, 0.05, 0.2]),
        )


@dataclass
class Proposal:
    value: bytes
    node: str
    index: int
    term: int


@dataclass
class Read:
    node: str
    context: bytes
    required: int  # highest index of a write acknowledged before the read began
    started: int  # virtual time; a client gives up after READ_TIMEOUT
    index: int = -1  # read index, once known


@dataclass
class SimNode:
    id: str
    disk: MemDisk = field(default_factory=MemDisk)
    core: Raft | None = None
    tick_period: int = TICK_UNITS
    next_tick: int = 0
    pending: Ready | None = None
    disk_done_at: int = 0
    applied: list[tuple[int, bytes]] = field(default_factory=list)
    restarts: int = 0
    last_role: tuple[int, Role] | None = None
    checked_commit: int = 0

    @property
    def alive(self) -> bool:
        return self.core is not None


class Simulation:
    def __init__(self, seed: int, nodes: int = 3, mutations: frozenset[str] = frozenset()):
        self.seed = seed
        self.rng = random.Random(seed)
        self.mutations = mutations
        self.mix = FaultMix.from_rng(self.rng)
        self.initial_voters = tuple(f"n{i + 1}" for i in range(nodes))
        spares = (f"n{nodes + 1}",) if self.mix.membership else ()
        self.nodes = {nid: SimNode(nid) for nid in self.initial_voters + spares}
        self.now = 0
        self.faulty = True
        self._net: list[tuple[int, int, Message]] = []
        self._seq = 0
        self.blocked: set[tuple[str, str]] = set()
        self.partition_until = 0
        self.trace: deque[str] = deque(maxlen=80)
        # Ground truth gathered from every node, checked against on every step.
        self.leaders: dict[int, str] = {}  # term -> leader (Election Safety)
        self.entry_ids: dict[tuple[int, int], tuple[bytes, int, int]] = {}  # (index, term) -> (data, type, prev_term)
        self.committed: dict[int, tuple[int, bytes]] = {}  # index -> (term, data)
        self.leader_logs: dict[str, tuple[int, int]] = {}  # node -> (term, last index seen as leader)
        self.proposals: dict[str, list[Proposal]] = {n: [] for n in self.nodes}
        self.acked: dict[bytes, int] = {}
        self.max_acked = 0
        self.reads: dict[bytes, Read] = {}
        self.counter = 0
        self.stats = {"acked": 0, "reads": 0, "crashes": 0, "partitions": 0, "elections": 0, "transfers": 0, "conf_changes": 0}
        for nid in self.initial_voters:
            self._start(nid)
        for nid in spares:
            self._start(nid)

    # ---------------------------------------------------------------- node lifecycle

    def _log(self, text: str) -> None:
        self.trace.append(f"t={self.now} {text}")

    def _start(self, nid: str) -> None:
        node = self.nodes[nid]
        hs, snap, entries = node.disk.load()
        cfg = Config(
            id=nid,
            voters=self.initial_voters,
            election_ticks=ELECTION_TICKS,
            heartbeat_ticks=1,
            max_inflight=8,
            max_append_bytes=256,
            mutations=self.mutations,
            logger=self._log,
        )
        node_rng = random.Random(self.rng.getrandbits(64))
        node.core = Raft(cfg, node_rng, hs, snap, entries, applied=0)
        node.applied = []
        node.pending = None
        node.checked_commit = snap.index
        node.last_role = None
        node.next_tick = self.now + self.rng.randrange(node.tick_period)

    def _crash(self, nid: str) -> None:
        node = self.nodes[nid]
        if not node.alive:
            return
        lost = node.disk.crash(self.rng)
        self._log(f"CRASH {nid} (lost {lost} unsynced writes)")
        node.core = None
        node.pending = None
        node.restarts += 1
        self.proposals[nid] = []
        for ctx in [c for c, r in self.reads.items() if r.node == nid]:
            del self.reads[ctx]
        self.leader_logs.pop(nid, None)
        self.stats["crashes"] += 1

    # ---------------------------------------------------------------- network

    def _send(self, msgs: list[Message]) -> None:
        for m in msgs:
            if self.faulty and self.rng.random() < self.mix.drop:
                continue
            copies = 2 if self.faulty and self.rng.random() < self.mix.duplicate else 1
            for _ in range(copies):
                lat = 1 + self.rng.randrange(self.mix.max_latency if self.faulty else 3)
                self._seq += 1
                heapq.heappush(self._net, (self.now + lat, self._seq, m))

    def _deliver_due(self) -> None:
        while self._net and self._net[0][0] <= self.now:
            _, _, m = heapq.heappop(self._net)
            node = self.nodes.get(m.to)
            if node is None or not node.alive or (m.sender, m.to) in self.blocked:
                continue
            try:
                node.core.step(m)
            except LogInvariantError as e:
                raise Violation("Core invariant", str(e)) from None

    # ---------------------------------------------------------------- Ready loop

    def _start_ready(self, node: SimNode) -> None:
        core = node.core
        if node.pending is not None or not core.has_ready():
            return
        rd = core.ready()
        node.pending = rd
        self._send(rd.messages)  # may leave before the disk write
        if rd.entries:
            node.disk.append(rd.entries)
        if rd.hard_state is not None:
            node.disk.set_hard_state(rd.hard_state)
        if rd.must_sync:
            node.disk_done_at = self.now + 1 + self.rng.randrange(3)
        else:
            self._finish_ready(node)

    def _finish_ready(self, node: SimNode) -> None:
        rd, core = node.pending, node.core
        if rd.must_sync:
            node.disk.sync()
        self._send(rd.persisted_messages)
        for e in rd.committed_entries:
            self._apply(node, e.index, e.term, e.data)
        for rs in rd.read_states:
            r = self.reads.get(rs.context)
            if r is not None and r.node == node.id:
                r.index = rs.index
        node.pending = None
        core.advance(rd)
        self._serve_reads(node)

    def _apply(self, node: SimNode, index: int, term: int, data: bytes) -> None:
        want = self.committed.get(index)
        if want is not None and want != (term, data):
            raise Violation(
                "State Machine Safety", f"{node.id} applied {index}:{term}:{data!r}, others {want}"
            )
        node.applied.append((index, data))
        # A proposal is acknowledged when the node it was proposed to applies it.
        still = []
        for p in self.proposals[node.id]:
            if p.index == index:
                if p.term == term and p.value == data:
                    self.acked[p.value] = index
                    self.max_acked = max(self.max_acked, index)
                    self.stats["acked"] += 1
                    self._log(f"ACK {data!r} at {index} via {node.id}")
            else:
                still.append(p)
        self.proposals[node.id] = still

    def _expire_reads(self) -> None:
        for ctx in [c for c, r in self.reads.items() if self.now - r.started > READ_TIMEOUT]:
            del self.reads[ctx]

    def _serve_reads(self, node: SimNode) -> None:
        applied = node.core.log.applied
        for ctx, r in list(self.reads.items()):
            if r.node == node.id and 0 <= r.index <= applied:
                del self.reads[ctx]
                self.stats["reads"] += 1
                if r.index < r.required:
                    raise Violation(
                        "Linearizable read",
                        f"read {ctx!r} on {node.id} at index {r.index} misses a write acknowledged "
                        f"at {r.required} before the read began",
                    )

    # ---------------------------------------------------------------- clients and faults

    def _leader_nodes(self) -> list[SimNode]:
        return [n for n in self.nodes.values() if n.alive and n.core.role == Role.LEADER]

    def _client(self) -> None:
        alive = [n for n in self.nodes.values() if n.alive]
        if not alive:
            return
        if self.rng.random() < self.mix.propose_rate:
            leaders = self._leader_nodes()
            node = self.rng.choice(leaders if leaders and self.rng.random() < 0.9 else alive)
            self.counter += 1
            value = f"v{self.counter}".encode()
            try:
                idx = node.core.propose(value)
                self.proposals[node.id].append(Proposal(value, node.id, idx, node.core.term))
            except (NotLeader, ProposalDropped):
                pass
        if self.rng.random() < self.mix.read_rate:
            node = self.rng.choice(alive)
            self.counter += 1
            ctx = f"r{self.counter}".encode()
            try:
                node.core.read_index(ctx)
                self.reads[ctx] = Read(node.id, ctx, self.max_acked, self.now)
            except NotLeader:
                pass

    def _faults(self) -> None:
        rng, mix = self.rng, self.mix
        ids = list(self.nodes)
        if rng.random() < mix.crash_rate:
            victim = rng.choice(ids)
            if self.nodes[victim].alive:
                self._crash(victim)
        for n in self.nodes.values():
            if not n.alive and rng.random() < 0.01:
                self._log(f"RESTART {n.id}")
                self._start(n.id)
        if self.blocked and self.now >= self.partition_until:
            self._log("HEAL")
            self.blocked = set()
        if not self.blocked and rng.random() < mix.partition_rate:
            self._partition()
        if mix.skew and rng.random() < 0.001:
            n = self.nodes[rng.choice(ids)]
            n.tick_period = rng.choice([5, 7, 10, 13, 20])
            self._log(f"SKEW {n.id} tick every {n.tick_period}")
        leaders = self._leader_nodes()
        if mix.transfers and leaders and rng.random() < 0.002:
            ld = rng.choice(leaders)
            target = rng.choice(sorted(ld.core.voters))
            try:
                ld.core.transfer_leadership(target)
                self.stats["transfers"] += 1
            except (NotLeader, ValueError):
                pass
        if mix.membership and leaders and rng.random() < 0.002:
            self._membership(rng.choice(leaders))

    def _partition(self) -> None:
        rng = self.rng
        ids = list(self.nodes)
        kind = rng.choice(["halves", "isolate_leader", "bridge", "one_way"])
        blocked: set[tuple[str, str]] = set()
        if kind == "halves":
            rng.shuffle(ids)
            cut = rng.randint(1, len(ids) - 1)
            a, b = ids[:cut], ids[cut:]
            blocked = {(x, y) for x in a for y in b} | {(y, x) for x in a for y in b}
        elif kind == "isolate_leader":
            leaders = self._leader_nodes()
            victim = leaders[0].id if leaders else rng.choice(ids)
            blocked = {(victim, y) for y in ids if y != victim} | {(y, victim) for y in ids if y != victim}
        elif kind == "bridge":
            rng.shuffle(ids)
            _bridge, rest = ids[0], ids[1:]
            half = len(rest) // 2
            a, b = rest[:half], rest[half:]
            blocked = {(x, y) for x in a for y in b} | {(y, x) for x in a for y in b}
        else:
            x = rng.choice(ids)
            blocked = {(x, y) for y in ids if y != x} if rng.random() < 0.5 else {(y, x) for y in ids if y != x}
        self.blocked = blocked
        self.partition_until = self.now + rng.randrange(200, 2000)
        self.stats["partitions"] += 1
        self._log(f"PARTITION {kind} {sorted(blocked)}")

    def _membership(self, leader: SimNode) -> None:
        core = leader.core
        members = core.voters | core.learners
        spares = [n for n in self.nodes if n not in members]
        options: list[ConfChange] = []
        for s in spares:
            options.append(ConfChange(ConfChangeType.ADD_LEARNER, s))
        for lr in core.learners:
            options.append(ConfChange(ConfChangeType.PROMOTE, lr))
        if len(core.voters) > len(self.initial_voters):
            for v in core.voters:
                options.append(ConfChange(ConfChangeType.REMOVE, v))
        if not options:
            return
        cc = self.rng.choice(options)
        try:
            core.propose(cc.encode(), EntryType.CONF_CHANGE)
            self.stats["conf_changes"] += 1
            self._log(f"CONF {leader.id} proposes {cc.type.name} {cc.node_id}")
        except (NotLeader, ProposalDropped, ValueError):
            pass

    # ---------------------------------------------------------------- invariants

    def _check(self) -> None:
        for node in self.nodes.values():
            if not node.alive:
                continue
            core = node.core
            log = core.log
            # Election Safety: at most one leader per term.
            if core.role == Role.LEADER:
                prev = self.leaders.setdefault(core.term, node.id)
                if prev != node.id:
                    raise Violation("Election Safety", f"{prev} and {node.id} both lead term {core.term}")
                role_key = (core.term, Role.LEADER)
                if node.last_role != role_key:
                    self.stats["elections"] += 1
                    # Leader Completeness: a new leader holds every committed entry.
                    for idx, (term, _data) in self.committed.items():
                        if log.term(idx) != term and idx > log.snapshot.index:
                            raise Violation(
                                "Leader Completeness",
                                f"{node.id} leads term {core.term} without committed entry {idx}:{term}",
                            )
                    # Whatever changed in this step happened before or as it took over.
                    self.leader_logs[node.id] = (core.term, log.dirty_from - 1)
                # Leader Append-Only: a leader never overwrites or deletes entries of its own log.
                lterm, llast = self.leader_logs.get(node.id, (core.term, 0))
                if lterm == core.term and log.dirty_from <= llast:
                    raise Violation(
                        "Leader Append-Only",
                        f"{node.id} (leader, term {core.term}) rewrote its log from {log.dirty_from}",
                    )
                self.leader_logs[node.id] = (core.term, log.last_index())
            node.last_role = (core.term, core.role)
            # Log Matching: (index, term) identifies an entry and, by induction, its whole prefix.
            start = max(log.dirty_from, log.first_index())
            for idx in range(start, log.last_index() + 1):
                e = log.entry(idx)
                prev_term = log.term(idx - 1) or 0
                ident = (e.data, int(e.type), prev_term)
                seen = self.entry_ids.setdefault((idx, e.term), ident)
                if seen != ident:
                    raise Violation(
                        "Log Matching",
                        f"{node.id} holds {idx}:{e.term} {ident!r}; another node {seen!r}",
                    )
            log.dirty_from = log.last_index() + 1
            # Committed entries never change (State Machine Safety at the log level).
            if log.committed < node.checked_commit:
                node.checked_commit = log.committed  # restarted with an older persisted commit
            for idx in range(max(node.checked_commit + 1, log.first_index()), log.committed + 1):
                e = log.entry(idx)
                want = self.committed.setdefault(idx, (e.term, e.data))
                if want != (e.term, e.data):
                    raise Violation(
                        "State Machine Safety",
                        f"{node.id} committed {idx}:{e.term}, but {idx}:{want[0]} was committed before",
                    )
            node.checked_commit = log.committed
        # No acknowledged proposal is lost: it sits in the committed log at its index.
        # (Checked where it can change: committed entries are immutable above.)

    # ---------------------------------------------------------------- main loop

    def _step(self) -> None:
        if self.faulty:
            self._faults()
        self._deliver_due()
        for node in self.nodes.values():
            if node.alive and node.pending is not None and node.disk_done_at <= self.now:
                if self.faulty and node.pending.must_sync and self.rng.random() < self.mix.crash_in_sync:
                    self._crash(node.id)  # power lost mid-fsync: only a prefix may survive
                    continue
                self._finish_ready(node)
        for node in self.nodes.values():
            if node.alive and self.now >= node.next_tick:
                node.next_tick = self.now + node.tick_period
                node.core.tick()
        if self.faulty:
            self._client()
        self._expire_reads()
        for node in self.nodes.values():
            if node.alive:
                self._start_ready(node)
        self._check()
        self.now += 1

    def run(self) -> dict:
        while self.now < FAULT_UNITS:
            self._step()
        self._heal()
        self._liveness()
        return self.stats

    def _heal(self) -> None:
        self.faulty = False
        self.blocked = set()
        self._log("FAULTS STOP")
        for n in self.nodes.values():
            n.tick_period = TICK_UNITS
            if not n.alive:
                self._start(n.id)

    def _liveness(self) -> None:
        deadline = self.now + LIVENESS_TICKS * TICK_UNITS
        marker = b"liveness-marker"
        marker_at: tuple[str, int] | None = None
        while self.now < deadline:
            self._step()
            leaders = self._leader_nodes()
            if not leaders:
                continue
            ld = max(leaders, key=lambda n: n.core.term)
            if marker_at is None or self.nodes[marker_at[0]].core.role != Role.LEADER:
                try:
                    idx = ld.core.propose(marker)
                    marker_at = (ld.id, idx)
                    self.proposals[ld.id].append(Proposal(marker, ld.id, idx, ld.core.term))
                except (NotLeader, ProposalDropped):
                    continue
            if marker in self.acked:
                members = ld.core.voters | ld.core.learners
                last = ld.core.log.last_index()
                done = all(
                    self.nodes[m].alive
                    and self.nodes[m].core.log.last_index() == last
                    and self.nodes[m].core.log.applied >= self.acked[marker]
                    for m in members
                )
                if done and not self.reads:
                    self._final_checks(ld)
                    return
        leaders = [(n.id, n.core.term) for n in self._leader_nodes()]
        raise Violation(
            "Liveness",
            f"not converged {LIVENESS_TICKS} ticks after faults stopped (leaders={leaders}, "
            f"marker acked={marker in self.acked}, pending reads={len(self.reads)})",
        )

    def _final_checks(self, leader: SimNode) -> None:
        # Every acknowledged write is in every member's applied state, at its index.
        for m in leader.core.voters | leader.core.learners:
            applied = dict(self.nodes[m].applied)
            for value, idx in self.acked.items():
                if applied.get(idx) != value:
                    raise Violation(
                        "Acknowledged write lost",
                        f"{value!r} acknowledged at {idx}, but {m} applied {applied.get(idx)!r}",
                    )

"""A seeded, single-threaded cluster simulator that owns time, the network and the disks.

One seed = one run: the seed draws its cluster, its core configuration and its fault mix
(schedule.py: swarm testing, targeted patterns, leader fuzz), then a liveness phase heals
everything. Safety invariants are checked after every step of virtual time (here) and right
after every call into a core (invariants.py, the moment a belief forms); the first violation
ends the run with the trace's tail. A message budget turns a storm into a liveness violation.

Snapshots. Each node's state machine is the list of (index, data) it applied. Compacting at
index i writes the state machine's prefix up to i as a durable snapshot file (node.snapshots)
*before* the log store's compact/install is queued, as the server must; a crash may then lose
the log store's half, and a restart loads the snapshot file that matches the log store's
meta (the newer file is ignored, as etcd does), so it resumes from the old log or from the new
snapshot, never from a mix. The transport carries the leader's snapshot file with a SNAPSHOT
message (out of band, as the real one streams the file) and reports its fate back to the
leader through report_snapshot, or sometimes never (the leader's timeout must cover it).

Bounded log memory. Every core reads its log through its MemDisk (the LogReader protocol) and
keeps a log cache of a few entries at most (often none), drawn per seed from a stream of its
own, so every seed replays exactly as it did with unbounded memory while nearly every entry
a follower needs, a node applies or the checker inspects is read back from the disk.
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
    MsgType,
    NotLeader,
    ProposalDropped,
    Ready,
    Role,
    SnapshotMeta,
)
from raftsql.server.ready import DRIVER_BUGS, EarlyAcks, ReadyDriver
from raftsql.sim.disk import MemDisk
from raftsql.sim.invariants import Invariants
from raftsql.sim.schedule import Schedule, Swarm

TICK_UNITS = 10  # virtual time units per tick at normal clock speed
# Raft(log_cache_bytes=...) choices: an entry here costs about 135 bytes (log.ENTRY_OVERHEAD
# plus a few bytes of data), so these keep at most 0, 1, 2 or 4 durable entries in memory.
CACHE_BYTES = (0, 150, 300, 600)
ELECTION_TICKS = 10
FAULT_UNITS = 4000  # length of the faulty phase
LIVENESS_TICKS = 300  # once faults stop, the cluster must converge within this many ticks
READ_TIMEOUT = 100 * TICK_UNITS  # a client abandons a read (its message may have been dropped)
# Budgets: a run that exceeds one is a liveness violation, never a run that does not end (a
# message storm once grew one seed's in-flight queue to 160,000 messages and 1 GB).
MAX_IN_FLIGHT = 20_000  # messages on the simulated network at once
MAX_MESSAGES = 2_000_000  # messages sent in one seed

# Broken snapshot paths in the simulated driving code (not in the core), switched on only by
# tests to show that the invariants catch them (tests/raft/test_sim.py).
SIM_BUGS: dict[str, str] = {
    "install_keeps_state": "on Ready.snapshot keep the old state machine instead of loading the snapshot",
    "snapshot_short_by_one": "the transport ships the leader's state machine at meta.index - 1",
    "snapshot_of_current_state": "the transport ships the leader's current state machine, not the one at meta.index",
    "snapshot_file_after_log": "fsync the state machine's snapshot file only after the log store's compact/install",
    # The Ready driver's own rules (server/ready.py, the node's driver, which the simulator runs).
    **DRIVER_BUGS,
}


class Violation(Exception):
    def __init__(self, invariant: str, detail: str):
        super().__init__(f"{invariant}: {detail}")
        self.invariant = invariant
        self.detail = detail


FaultMix = Swarm  # the per-seed draw (schedule.py); the old name, for callers


@dataclass
class SnapshotMix:
    """The snapshot part of the fault schedule. Drawn from its own random stream, so a run
    without snapshots (--no-snapshots) replays the schedules from before they existed."""

    every: int  # a node compacts when applied - snapshot.index reaches a threshold in [1, 2*every]
    max_window: int  # entries kept after the snapshot: 0 half the time, else up to this many
    anytime: float  # chance per step and node to compact whatever it can, threshold or not
    report_loss: float  # chance the transport never reports a snapshot's fate to the leader
    timeout_ticks: int  # Config.snapshot_timeout_ticks: the leader's fallback for a lost report

    @classmethod
    def from_rng(cls, rng: random.Random) -> SnapshotMix:
        return cls(
            every=rng.choice([2, 5, 15, 40]),
            max_window=rng.choice([0, 2, 8, 30]),
            anytime=rng.choice([0.0, 0.0005, 0.003]),
            report_loss=rng.choice([0.0, 0.1, 0.5, 1.0]),
            timeout_ticks=rng.choice([20, 50, 100]),
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
    driver: ReadyDriver | None = None  # the node's Ready driver (server/ready.py) around core
    pending: Ready | None = None
    disk_done_at: int = 0
    applied: list[tuple[int, bytes]] = field(default_factory=list)
    restarts: int = 0
    ticks: int = 0  # ticks of this node's clock since the run began (CheckQuorum's window)
    last_role: tuple[int, Role] | None = None
    checked_commit: int = 0
    # Durable: the state machine's snapshot files, index -> applied prefix up to index. Only
    # the one matching the log store's meta is loaded on restart.
    snapshots: dict[int, tuple[tuple[int, bytes], ...]] = field(default_factory=dict)
    # Volatile: snapshot data that arrived with SNAPSHOT messages since the last ready().
    inbox: dict[tuple[int, int], tuple[tuple[int, bytes], ...]] = field(default_factory=dict)
    installing: dict[tuple[int, int], tuple[tuple[int, bytes], ...]] = field(default_factory=dict)
    compact_at: int = 0  # compact once applied - snapshot.index reaches this
    deferred: list[int] = field(default_factory=list)  # unsynced snapshot files (sim bug snapshot_file_after_log)
    early: EarlyAcks | None = None  # the node's early answers to durability "leader" writes

    @property
    def alive(self) -> bool:
        return self.core is not None


class Simulation:
    def __init__(
        self,
        seed: int,
        nodes: int | None = None,
        mutations: frozenset[str] = frozenset(),
        snapshots: bool = True,
        sim_bugs: frozenset[str] = frozenset(),
    ):
        unknown = set(sim_bugs) - set(SIM_BUGS)
        if unknown:
            raise ValueError(f"unknown simulator bugs: {sorted(unknown)}")
        self.seed = seed
        self.rng = random.Random(seed)
        self.mutations = mutations
        self.sim_bugs = sim_bugs
        # The seed's swarm draw: which faults are on and how hard, and the core's configuration.
        self.mix = Swarm.draw(seed, nodes)
        # Every snapshot decision draws from srng, never from rng (see SnapshotMix).
        self.srng = random.Random(f"snapshots/{seed}")
        self.snap: SnapshotMix | None = SnapshotMix.from_rng(self.srng) if snapshots else None
        # Its own stream too: the cache never changes what the core does, only where it reads.
        self.cache_bytes = random.Random(f"cache/{seed}").choice(CACHE_BYTES)
        self._snap_payload: dict[int, tuple[tuple, int]] = {}  # net seq -> (data, sender restarts)
        self._reports: list[tuple[int, int, str, int, str, bool]] = []  # (time, seq, leader, restarts, to, ok)
        self.conf_changes: dict[int, ConfChange] = {}  # committed CONF_CHANGE entries by index
        nv, nl = self.mix.voters, self.mix.learners
        self.initial_voters = tuple(f"n{i + 1}" for i in range(nv))
        self.initial_learners = tuple(f"n{i + 1}" for i in range(nv, nv + nl))
        spares = tuple(f"n{i + 1}" for i in range(nv + nl, nv + nl + self.mix.spares))
        self.nodes = {nid: SimNode(nid) for nid in self.initial_voters + self.initial_learners + spares}
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
        self.messages = 0
        self.schedule = Schedule(self)
        self.inv = Invariants(self, ELECTION_TICKS)
        self.stats = {"acked": 0, "reads": 0, "crashes": 0, "partitions": 0, "elections": 0, "transfers": 0, "conf_changes": 0}
        # Durability "leader" (server/ready.py, EarlyAcks): the seed draws the window (0: off)
        # and the share of writes that ask for it, from a stream of its own, so the schedule
        # of every seed is the same as without it. A write answered early may be lost with
        # its leader, at most `window` of them per term: the invariant "Leader durability
        # bound" counts them as their indices commit to something else.
        self._erng = random.Random(f"early/{seed}")
        self.early_window = self._erng.choice((0, 1, 2, 4))
        if self.early_window == 0 and "early_ack_unbounded" in sim_bugs:
            self.early_window = 1
        self.early_share = self._erng.choice((0.5, 1.0))
        self.early_acked: dict[int, list[tuple[int, bytes]]] = {}  # index -> [(term, value)]
        self.early_lost: dict[int, int] = {}  # term -> writes answered early, then lost
        self.stats.update(early_acked=0, early_lost=0)
        if self.snap is not None:
            self.stats.update(
                compactions=0, snapshots_sent=0, installs=0, learner_installs=0,
                snapshots_stale=0, snapshots_fast_forward=0, reports_ok=0,
                reports_failed=0, reports_lost=0, restarts_from_snapshot=0, crash_between=0,
            )
        for nid in self.nodes:
            self._start(nid)

    # ---------------------------------------------------------------- node lifecycle

    def _log(self, text: str) -> None:
        self.trace.append(f"t={self.now} {text}")

    def _start(self, nid: str) -> None:
        node = self.nodes[nid]
        hs, snap, stored = node.disk.initial_state()
        cfg = Config(
            id=nid,
            voters=self.initial_voters,
            learners=self.initial_learners,
            election_ticks=ELECTION_TICKS,
            heartbeat_ticks=1,
            max_inflight=self.mix.max_inflight,
            max_append_bytes=self.mix.max_append_bytes,
            pre_vote=self.mix.pre_vote,
            check_quorum=self.mix.check_quorum,
            mutations=self.mutations,
            logger=self._log,
        )
        if self.snap is not None:
            cfg.snapshot_timeout_ticks = self.snap.timeout_ticks
        # The state machine restarts from the snapshot file matching the log store's meta. A
        # newer file means a crash came between writing it and syncing the log store's
        # compact/install: it is ignored, and the old log (still on disk) covers its entries.
        if node.snapshots and max(node.snapshots) > snap.index:
            self.stats["crash_between"] += 1
        if snap.index:
            data = node.snapshots.get(snap.index)
            if data is None:
                raise Violation(
                    "Snapshot durability",
                    f"{nid} restarts from log store snapshot {snap.index} but has no state machine "
                    f"snapshot for it (files: {sorted(node.snapshots)})",
                )
            node.snapshots = {snap.index: data}
            node.applied = list(data)
            self.stats["restarts_from_snapshot"] += 1
        else:
            node.snapshots = {}
            node.applied = []
        node_rng = random.Random(self.rng.getrandbits(64))
        node.core = Raft(
            cfg, node_rng, hs, snap, stored, applied=snap.index,
            storage=node.disk, log_cache_bytes=self.cache_bytes,
        )
        node.early = (EarlyAcks(self.early_window,
                                lambda i, t, v, node=node: self._early_ack(node, i, t, v),
                                bugs=self.sim_bugs & DRIVER_BUGS.keys())
                      if self.early_window else None)
        node.driver = ReadyDriver(
            node.core, node.disk,
            early=node.early,
            send=self._send,
            install=lambda meta, node=node: self._install(node, meta, node.installing),
            apply=lambda entries, node=node: self._apply_entries(node, entries),
            done=lambda rd, node=node: self._read_states(node, rd),
            call=lambda fn, *args, node=node: self.call(node, fn, *args),
            bugs=self.sim_bugs & DRIVER_BUGS.keys(),
        )
        node.pending = None
        node.inbox = {}
        node.deferred = []
        if self.snap is not None:
            node.compact_at = self._draw_threshold()
        node.checked_commit = snap.index
        node.last_role = None
        node.next_tick = self.now + self.rng.randrange(node.tick_period)

    def _crash(self, nid: str) -> None:
        node = self.nodes[nid]
        if not node.alive:
            return
        lost = node.disk.crash(self.rng)
        for index in node.deferred:
            node.snapshots.pop(index, None)
        self._log(f"CRASH {nid} (lost {lost} unsynced writes)")
        node.core = None
        node.driver = None
        node.early = None
        node.pending = None
        node.restarts += 1
        self.proposals[nid] = []
        for ctx in [c for c, r in self.reads.items() if r.node == nid]:
            del self.reads[ctx]
        self.leader_logs.pop(nid, None)
        self.stats["crashes"] += 1

    # ---------------------------------------------------------------- network

    # ---------------------------------------------------------------- calls into a core

    def call(self, node: SimNode, fn, *args, read: bytes | None = None):
        """Call into node's core, then check the beliefs it formed (invariants.py)."""
        b = Invariants.before(node)
        try:
            return fn(*args)
        finally:
            if node.core is not None:
                self.inv.after(node, b, read=read)

    def propose(self, node: SimNode, value: bytes) -> None:
        """A client's write, proposed to node (the client learns its fate when node applies it)."""
        try:
            idx = self.call(node, node.core.propose, value)
            self.proposals[node.id].append(Proposal(value, node.id, idx, node.core.term))
            if node.early is not None and self._erng.random() < self.early_share:
                node.early.expect(idx, node.core.term, value)
        except (NotLeader, ProposalDropped):
            pass

    def read(self, node: SimNode, ctx: bytes) -> None:
        try:
            self.call(node, node.core.read_index, ctx, read=ctx)
            self.reads[ctx] = Read(node.id, ctx, self.max_acked, self.now)
        except NotLeader:
            pass

    def _tick(self, node: SimNode) -> None:
        node.ticks += 1
        self.call(node, node.core.tick)
        if node.core is not None:
            self.inv.ticked(node)

    # ---------------------------------------------------------------- network

    def _send(self, msgs: list[Message]) -> None:
        self.messages += len(msgs)
        if len(self._net) > MAX_IN_FLIGHT or self.messages > MAX_MESSAGES:
            raise Violation(
                "Liveness",
                f"message budget exceeded: {len(self._net)} messages in flight, {self.messages} sent "
                f"(budgets {MAX_IN_FLIGHT} / {MAX_MESSAGES})",
            )
        for m in msgs:
            if m.type in (MsgType.VOTE_RESP, MsgType.APPEND_RESP):
                self.inv.sent(m)
            if m.type == MsgType.SNAPSHOT:
                self._send_snapshot(m)
                continue
            if self.faulty and self.rng.random() < self.mix.drop:
                continue
            copies = 2 if self.faulty and self.rng.random() < self.mix.duplicate else 1
            for _ in range(copies):
                lat = 1 + self.rng.randrange(self.mix.max_latency if self.faulty else 3)
                self._seq += 1
                heapq.heappush(self._net, (self.now + lat, self._seq, m))

    def _deliver_due(self) -> None:
        while self._net and self._net[0][0] <= self.now:
            _, seq, m = heapq.heappop(self._net)
            node = self.nodes.get(m.to)
            payload = self._snap_payload.pop(seq, None) if m.type == MsgType.SNAPSHOT else None
            if node is None or not node.alive or (m.sender, m.to) in self.blocked:
                if payload is not None:
                    self._report(m, payload[1], ok=False)  # the stream broke off
                continue
            if payload is not None:
                # The data arrived first (the transport streams the file, then hands the core
                # the message); the node installs it when Ready.snapshot asks.
                node.inbox[(m.index, m.log_term)] = payload[0]
                log = node.core.log
                if m.term == node.core.term and m.index <= log.committed:
                    self.stats["snapshots_stale"] += 1
                elif m.term == node.core.term and log.match_term(m.index, m.log_term):
                    self.stats["snapshots_fast_forward"] += 1
            b = Invariants.before(node)
            try:
                node.core.step(m)
            except LogInvariantError as e:
                raise Violation("Core invariant", str(e)) from None
            self.inv.after(node, b, m)
            if payload is not None:
                self._report(m, payload[1], ok=True)
        while self._reports and self._reports[0][0] <= self.now:
            _, _, leader, restarts, to, ok = heapq.heappop(self._reports)
            node = self.nodes[leader]
            if node.alive and node.restarts == restarts:
                node.core.report_snapshot(to, ok)

    # ---------------------------------------------------------------- snapshots

    def _send_snapshot(self, m: Message) -> None:
        """The transport streams the sender's snapshot file with the message, then tells the
        sender how it went (report_snapshot), or, sometimes, never does."""
        sender = self.nodes[m.sender]
        data = sender.snapshots.get(m.index)
        if data is None:
            raise Violation(
                "Snapshot durability",
                f"{m.sender} sends snapshot {m.index} but has no state machine snapshot for it",
            )
        if "snapshot_short_by_one" in self.sim_bugs:
            data = data[:-1]
        if "snapshot_of_current_state" in self.sim_bugs:
            data = tuple(sender.applied)
        self.stats["snapshots_sent"] += 1
        srng = self.srng
        lat = 1 + srng.randrange(self.mix.max_latency if self.faulty else 3) + len(data) // 100
        self._seq += 1
        if self.faulty and srng.random() < self.mix.drop:
            self._log(f"SNAPSHOT {m.index} {m.sender}->{m.to} lost")
            self._report(m, sender.restarts, ok=False, delay=lat)
            return
        self._snap_payload[self._seq] = (data, sender.restarts)
        heapq.heappush(self._net, (self.now + lat, self._seq, m))

    def _report(self, m: Message, restarts: int, ok: bool, delay: int = 0) -> None:
        if self.faulty and self.srng.random() < self.snap.report_loss:
            self.stats["reports_lost"] += 1
            return
        self.stats["reports_ok" if ok else "reports_failed"] += 1
        self._seq += 1
        when = self.now + delay + 1 + self.srng.randrange(3)
        heapq.heappush(self._reports, (when, self._seq, m.sender, restarts, m.to, ok))

    def _draw_threshold(self) -> int:
        return self.srng.randint(1, 2 * self.snap.every)

    def _compactions(self) -> None:
        """The fault schedule's log compaction: a node snapshots its state machine when it has
        applied enough since the last snapshot (or, rarely, at any moment), keeping a random
        trailing window of entries (often none, so lagging followers need InstallSnapshot)."""
        srng, anytime = self.srng, self.snap.anytime
        for node in self.nodes.values():
            if not node.alive:
                continue
            log = node.core.log
            since = log.applied - log.snapshot.index
            if since < node.compact_at and not (anytime and since > 0 and srng.random() < anytime):
                continue
            window = 0 if srng.random() < 0.5 else srng.randint(0, self.snap.max_window)
            # Entries the checker has not recorded as committed yet stay in the log for a step.
            upto = min(log.applied, log.stable, node.checked_commit, len(node.applied)) - window
            if upto <= log.snapshot.index:
                continue
            node.compact_at = self._draw_threshold()
            meta = node.core.compact(upto)
            data = tuple(node.applied[:upto])
            self._check_snapshot(node.id, meta, data, "compacted to")
            self._write_snapshot_file(node, meta.index, data)
            node.disk.compact(meta)
            self.stats["compactions"] += 1
            self._log(f"COMPACT {node.id} to {meta.index} (window {window}, last {log.last_index()})")

    def _write_snapshot_file(self, node: SimNode, index: int, data: tuple) -> None:
        # Durable at once: the server fsyncs the file before it touches the log store.
        node.snapshots[index] = data
        if "snapshot_file_after_log" in self.sim_bugs:
            node.deferred.append(index)  # lost in a crash before the log store's next sync

    def _install(self, node: SimNode, meta: SnapshotMeta, inbox: dict) -> None:
        data = inbox.get((meta.index, meta.term))
        if data is None:
            raise Violation("Simulator", f"{node.id} must install snapshot {meta.index} it never received")
        self._check_snapshot(node.id, meta, data, "installed")
        self._write_snapshot_file(node, meta.index, data)
        if "install_keeps_state" not in self.sim_bugs:
            node.applied = list(data)
        node.disk.install(meta)
        # Clients waiting on entries the snapshot covers learn nothing about them.
        self.proposals[node.id] = [p for p in self.proposals[node.id] if p.index > meta.index]
        self.stats["installs"] += 1
        if node.id in meta.learners or node.id not in self.initial_voters:
            self.stats["learner_installs"] += 1
        self._log(f"INSTALL {node.id} snapshot {meta.index}:{meta.term}")

    def _membership_at(self, index: int) -> tuple[set[str], set[str]]:
        """Ground truth: the membership after every committed change up to index."""
        voters, learners = set(self.initial_voters), set(self.initial_learners)
        for i in sorted(k for k in self.conf_changes if k <= index):
            cc = self.conf_changes[i]
            if cc.type == ConfChangeType.ADD_LEARNER:
                if cc.node_id not in voters:
                    learners.add(cc.node_id)
            elif cc.type == ConfChangeType.PROMOTE:
                learners.discard(cc.node_id)
                voters.add(cc.node_id)
            else:
                voters.discard(cc.node_id)
                learners.discard(cc.node_id)
        return voters, learners

    def _check_snapshot(self, nid: str, meta: SnapshotMeta, data: tuple, how: str) -> None:
        """State Machine Safety for snapshots: a snapshot at index i is exactly the committed
        prefix 1..i (as every node applied it), its term is the committed entry's term, and its
        membership is the one the committed log gives at i."""
        if len(data) != meta.index or any(d[0] != i for i, d in enumerate(data, 1)):
            raise Violation(
                "State Machine Safety",
                f"{nid} {how} snapshot {meta.index} whose data holds indexes "
                f"{data[0][0] if data else None}..{data[-1][0] if data else None} ({len(data)} entries)",
            )
        for idx, value in data:
            want = self.committed.get(idx)
            if want is None or want[1] != value:
                raise Violation(
                    "State Machine Safety",
                    f"{nid} {how} snapshot {meta.index} holding {idx}:{value!r}, but committed {want}",
                )
        if self.committed[meta.index][0] != meta.term:
            raise Violation(
                "State Machine Safety",
                f"{nid} {how} snapshot {meta.index} of term {meta.term}, but "
                f"{meta.index}:{self.committed[meta.index][0]} was committed",
            )
        voters, learners = self._membership_at(meta.index)
        if (set(meta.voters), set(meta.learners)) != (voters, learners):
            raise Violation(
                "Snapshot membership",
                f"{nid} {how} snapshot {meta.index} with voters {meta.voters} learners {meta.learners}, "
                f"but the committed log gives {sorted(voters)} / {sorted(learners)}",
            )

    # ---------------------------------------------------------------- Ready loop

    def _start_ready(self, node: SimNode) -> None:
        """The first half of a Ready, by the node's own driver (server/ready.py); the second
        half (after the fsync) when virtual time reaches disk_done_at."""
        if node.pending is not None or not node.core.has_ready():
            return
        # Snapshot data that arrived since the last Ready: what the core accepted is installed
        # now; the rest was ignored by the core.
        node.installing, node.inbox = node.inbox, {}
        durable = node.disk.snapshot.index
        rd = node.driver.begin()  # sends the messages that may leave now (SNAPSHOTs with data)
        node.installing = {}
        if rd is None or not node.alive:
            return
        # Snapshot files older than the log store's durable meta (before this Ready) are never
        # needed again: a restart loads that meta's file, and any SNAPSHOT the core sends from
        # now on is at its own meta, which is never older.
        if node.snapshots and min(node.snapshots) < durable:
            node.snapshots = {i: d for i, d in node.snapshots.items() if i >= durable}
        node.pending = rd
        if rd.must_sync:
            node.disk_done_at = self.now + self.schedule.fsync_delay(node)
        else:
            self._finish_ready(node)

    def _finish_ready(self, node: SimNode) -> None:
        rd = node.pending
        node.pending = None
        synced = node.disk.syncs
        node.driver.finish(rd)
        if node.disk.syncs != synced:
            node.deferred = []  # the snapshot files written before the sync are durable now
        if node.alive:
            self._serve_reads(node)

    def _apply_entries(self, node: SimNode, entries: list) -> None:
        # Apply after persist: SQLite's apply survives a crash that loses the log's unsynced
        # tail, so a node must apply only what its own log holds durably (or what a snapshot
        # covers); otherwise it restarts with its state machine ahead of its log.
        durable = node.disk.snapshot.index + len(node.disk.entries)
        for e in entries:
            if e.index > durable:
                raise Violation(
                    "Apply after persist",
                    f"{node.id} applies {e.index} but its durable log ends at {durable}",
                )
            self._apply(node, e.index, e.term, e.data)

    def _early_ack(self, node: SimNode, index: int, term: int, value: bytes) -> None:
        """node answered a durability "leader" write early (its disk holds it)."""
        base = node.disk.snapshot.index
        if index > base + len(node.disk.entries) or (
                index > base and node.disk.entries[index - base - 1].term != term):
            raise Violation("Leader durability bound",
                            f"{node.id} answered {index}:{term} early before its own disk held it")
        self.stats["early_acked"] += 1
        self._log(f"EARLY-ACK {value!r} at {index}:{term} via {node.id}")
        want = self.committed.get(index)
        if want is None:
            self.early_acked.setdefault(index, []).append((term, value))
        elif want != (term, value):  # committed already (a leader's slow disk), as something else
            self._early_loss(index, term, value)

    def _early_settled(self, index: int, term: int, data: bytes) -> None:
        """Index committed as (term, data): early answers for anything else there are lost."""
        for t, value in self.early_acked.pop(index, ()):
            if (t, value) != (term, data):
                self._early_loss(index, t, value)

    def _early_loss(self, index: int, term: int, value: bytes) -> None:
        lost = self.early_lost[term] = self.early_lost.get(term, 0) + 1
        self.stats["early_lost"] += 1
        self._log(f"EARLY-LOST {value!r} at {index}:{term}")
        if lost > self.early_window:
            raise Violation(
                "Leader durability bound",
                f"{lost} writes answered early in term {term} were lost (window "
                f"{self.early_window}); the last: {value!r} at {index}",
            )

    def _read_states(self, node: SimNode, rd: Ready) -> None:
        for rs in rd.read_states:
            r = self.reads.get(rs.context)
            if r is not None and r.node == node.id:
                r.index = rs.index

    def _apply(self, node: SimNode, index: int, term: int, data: bytes) -> None:
        want = self.committed.get(index)
        if want is not None and want != (term, data):
            raise Violation(
                "State Machine Safety", f"{node.id} applied {index}:{term}:{data!r}, others {want}"
            )
        # The state machine applies every index once, in order (from its snapshot on).
        if index != len(node.applied) + 1:
            raise Violation(
                "State Machine Safety",
                f"{node.id} applied {index} after {node.applied[-1][0] if node.applied else 0}",
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
        # The state machine's own applied index: core.log.applied already counts a snapshot the
        # core accepted but the state machine has not installed yet.
        applied = len(node.applied)
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
                want = self.committed.get(idx)
                if want is None:
                    want = self.committed[idx] = (e.term, e.data)
                    if self.early_acked:
                        self._early_settled(idx, e.term, e.data)
                if e.type == EntryType.CONF_CHANGE and idx not in self.conf_changes:
                    self.conf_changes[idx] = ConfChange.decode(e.data)
                if want != (e.term, e.data):
                    raise Violation(
                        "State Machine Safety",
                        f"{node.id} committed {idx}:{e.term}, but {idx}:{want[0]} was committed before",
                    )
            node.checked_commit = log.committed
            # A compacted prefix stands for committed entries: its last one is the committed one.
            snap = log.snapshot
            if snap.index and self.committed.get(snap.index, (snap.term,))[0] != snap.term:
                raise Violation(
                    "Log Matching",
                    f"{node.id} holds snapshot {snap.index}:{snap.term}, but "
                    f"{snap.index}:{self.committed[snap.index][0]} was committed",
                )
        # No acknowledged proposal is lost: it sits in the committed log at its index.
        # (Checked where it can change: committed entries are immutable above.)

    # ---------------------------------------------------------------- main loop

    def _step(self) -> None:
        if self.faulty:
            self.schedule.step()
        if self.snap is not None:
            self._compactions()
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
                self._tick(node)
        if self.faulty:
            self.schedule.client()
        self._expire_reads()
        for node in self.nodes.values():
            if node.alive:
                if node.pending is not None:
                    # Its fsync is in flight: heartbeats and their responses leave now, as
                    # the node's driving threads send them (ReadyDriver.send_early).
                    node.driver.send_early()
                else:
                    self._start_ready(node)
        self._check()
        self.now += 1

    def run(self) -> dict:
        while self.now < FAULT_UNITS:
            self._step()
        self._heal()
        self._liveness()
        # Entries the cores read back from their disks (evicted from their log caches).
        self.stats["disk_reads"] = sum(n.disk.reads for n in self.nodes.values())
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
                    idx = self.call(ld, ld.core.propose, marker)
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
                    and len(self.nodes[m].applied) >= self.acked[marker]
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
        # Early answers at indices no leader ever committed: lost too.
        for index in sorted(self.early_acked):
            for term, value in self.early_acked.pop(index):
                self._early_loss(index, term, value)
        # Every acknowledged write is in every member's applied state, at its index.
        for m in sorted(leader.core.voters | leader.core.learners):
            applied = dict(self.nodes[m].applied)
            for value, idx in self.acked.items():
                if applied.get(idx) != value:
                    raise Violation(
                        "Acknowledged write lost",
                        f"{value!r} acknowledged at {idx}, but {m} applied {applied.get(idx)!r}",
                    )

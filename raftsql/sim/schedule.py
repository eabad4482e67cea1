"""The simulator's fault schedule: swarm testing, targeted patterns, and leader fuzzing.

Swarm testing (Groce et al., 2012; TigerBeetle's VOPR, FoundationDB's simulator): each seed
draws *which* fault kinds are on and how hard, instead of every seed running a little of
everything. Some seeds are calm, some are storms, and a fault kind that masks another (drops
hide duplicates, crashes hide slow disks) is off in half of them. The seed also draws the
core's own configuration: 3 to 5 voters, initial learners, PreVote and CheckQuorum on or off,
flow-control limits.

On top of the random faults come targeted patterns, states that random faults rarely build:
- a leader replicates to a minority, then dies (uncommitted tails that disagree, Figure 8);
- a partition heals straight into another one with a different majority;
- elections in a new leader's first moments and right after a membership change;
- leadership transfers that keep leaders changing while followers hold uncommitted tails.

And the leader's legal choices are fuzzed, not only the network (FoundationDB's BUGGIFY):
a follower's next index moves back (as after a lost append), an append carries one entry
where it could carry many.

Every decision here draws from the simulation's `rng`; the core configuration draws from a
stream of its own, so the configuration of a seed does not depend on the fault code.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

from raftsql.raft.types import ConfChange, ConfChangeType, EntryType, NotLeader, ProposalDropped

if TYPE_CHECKING:
    from raftsql.sim.cluster import SimNode, Simulation

MAX_UNCOMMITTED = 64  # clients stop proposing to a node with this many uncommitted entries


def _on(rng: random.Random, p: float = 0.5) -> bool:
    return rng.random() < p


@dataclass
class Swarm:
    """One seed's draw: the cluster, the core's configuration, and each fault kind's intensity
    (0 or False: that kind is off in this seed)."""

    # The cluster and the core's configuration.
    voters: int
    learners: int  # initial learners (Config.learners)
    spares: int  # nodes outside the cluster that membership changes may add
    pre_vote: bool
    check_quorum: bool
    max_inflight: int
    max_append_bytes: int
    # The network.
    drop: float
    duplicate: float
    max_latency: int
    # Nodes and disks.
    crash_rate: float  # per unit of time, per cluster
    crash_in_sync: float  # chance a node loses power while an fsync is in flight
    slow_disk: int  # extra units an fsync may take on a slow node (0: 1-3 units everywhere)
    skew: bool
    # Partitions.
    partition_rate: float
    rolling: float  # chance a partition heals straight into another with a different majority
    # Operations.
    membership: float  # per unit: the leader proposes a membership change
    transfers: float  # per unit: the leader transfers leadership
    propose_rate: float
    read_rate: float
    # Targeted patterns.
    minority_leader: float  # per unit: cut the leader off with a minority, feed it, kill it
    churn_after_conf: float  # chance a membership change is followed at once by an election
    conf_on_election: float  # chance a new leader is asked for a membership change at once
    new_leader_dies: float  # chance a new leader gets the minority_leader treatment at once
    # Leader fuzz: legal choices of the leader.
    next_back: float  # per unit and leader: move a follower's next index back
    short_batch: float  # per unit and leader: appends carry one entry

    @classmethod
    def draw(cls, seed: int, nodes: int | None = None) -> Swarm:
        """The core's configuration from its own stream, then the faults from the same one
        (the simulation's `rng` stays for the schedule's moment-to-moment decisions)."""
        rng = random.Random(f"swarm/{seed}")
        voters = nodes if nodes is not None else rng.choice((3, 3, 4, 5))
        membership = rng.choice((0.0, 0.0, 0.002, 0.01))
        return cls(
            voters=voters,
            learners=1 if _on(rng, 0.2) else 0,
            spares=1 if membership else 0,
            pre_vote=_on(rng, 0.7),
            check_quorum=_on(rng, 0.7),
            max_inflight=rng.choice((1, 2, 8, 8)),
            max_append_bytes=rng.choice((1, 64, 256, 256)),
            drop=rng.choice((0.02, 0.1, 0.25)) if _on(rng) else 0.0,
            duplicate=rng.choice((0.02, 0.1)) if _on(rng) else 0.0,
            max_latency=rng.choice((2, 5, 15, 40)),
            crash_rate=rng.choice((0.0005, 0.002, 0.005)) if _on(rng) else 0.0,
            crash_in_sync=rng.choice((0.01, 0.05)) if _on(rng, 0.3) else 0.0,
            slow_disk=rng.choice((5, 20, 60)) if _on(rng, 0.4) else 0,
            skew=_on(rng, 0.4),
            partition_rate=rng.choice((0.001, 0.004, 0.01)) if _on(rng) else 0.0,
            rolling=rng.choice((0.3, 0.8)) if _on(rng) else 0.0,
            membership=membership,
            transfers=rng.choice((0.002, 0.01, 0.03)) if _on(rng) else 0.0,
            propose_rate=rng.choice((0.02, 0.1, 0.3)),
            read_rate=rng.choice((0.01, 0.05, 0.2)),
            minority_leader=rng.choice((0.002, 0.006)) if _on(rng) else 0.0,
            churn_after_conf=rng.choice((0.3, 1.0)) if _on(rng) else 0.0,
            conf_on_election=rng.choice((0.5, 1.0)) if _on(rng) else 0.0,
            new_leader_dies=rng.choice((0.2, 0.5)) if _on(rng, 0.3) else 0.0,
            next_back=rng.choice((0.02, 0.1)) if _on(rng) else 0.0,
            short_batch=rng.choice((0.2, 0.7)) if _on(rng, 0.4) else 0.0,
        )

    def describe(self) -> str:
        """The seed's draw on one line, for a violation report."""
        on = [f"{k}={v}" for k, v in self.__dict__.items() if v not in (0, 0.0, False)]
        off = [k for k, v in self.__dict__.items() if v in (0, 0.0, False)]
        return " ".join(on) + (f" | off: {' '.join(off)}" if off else "")


class Schedule:
    """The faulty phase's decisions, one call of step() per unit of virtual time."""

    def __init__(self, sim: Simulation):
        self.sim = sim
        self.swarm: Swarm = sim.mix
        self.crash_at: list[tuple[int, str, int]] = []  # (time, node, restarts): a planned death
        self.seen_leader: dict[str, int] = {}  # node -> the last term the schedule saw it lead
        self.slow: set[str] = set()  # nodes whose disks are slow in this seed
        self.held: set[str] = set()  # crashed nodes the schedule must not restart (tests)
        rng = random.Random(f"disks/{sim.seed}")
        if self.swarm.slow_disk:
            ids = sorted(sim.nodes)
            self.slow = set(rng.sample(ids, rng.randint(1, len(ids))))

    # ------------------------------------------------------------ disks

    def fsync_delay(self, node: SimNode) -> int:
        extra = self.swarm.slow_disk if node.id in self.slow and self.sim.faulty else 0
        return 1 + self.sim.rng.randrange(3 + extra)

    # ------------------------------------------------------------ one unit

    def step(self) -> None:
        sim, rng, sw = self.sim, self.sim.rng, self.swarm
        ids = list(sim.nodes)
        if sw.crash_rate and rng.random() < sw.crash_rate:
            victim = rng.choice(ids)
            if sim.nodes[victim].alive:
                sim._crash(victim)
        while self.crash_at and self.crash_at[0][0] <= sim.now:
            _, nid, restarts = self.crash_at.pop(0)
            if sim.nodes[nid].alive and sim.nodes[nid].restarts == restarts:
                sim._crash(nid)
        for n in sim.nodes.values():
            if not n.alive and rng.random() < 0.01 and n.id not in self.held:
                sim._log(f"RESTART {n.id}")
                sim._start(n.id)
        if sim.blocked and sim.now >= sim.partition_until:
            if sw.rolling and rng.random() < sw.rolling:
                self._shift_partition()
            else:
                sim._log("HEAL")
                sim.blocked = set()
        if not sim.blocked and sw.partition_rate and rng.random() < sw.partition_rate:
            self._partition()
        if sw.skew and rng.random() < 0.001:
            n = sim.nodes[rng.choice(ids)]
            n.tick_period = rng.choice([5, 7, 10, 13, 20])
            sim._log(f"SKEW {n.id} tick every {n.tick_period}")
        leaders = sim._leader_nodes()
        for ld in leaders:
            if self.seen_leader.get(ld.id) != ld.core.term:
                self.seen_leader[ld.id] = ld.core.term
                # A new leader's first moments: a membership change before its term commits.
                if sw.membership and sw.conf_on_election and rng.random() < sw.conf_on_election:
                    self.membership(ld)
                # Figure 8's chain: each new leader appends to itself alone, then dies, so the
                # cluster fills with uncommitted tails of different terms.
                if sw.new_leader_dies and not sim.blocked and rng.random() < sw.new_leader_dies:
                    self._minority_leader(ld)
                # A new leader may start any follower's next index anywhere after its match:
                # from far back, short appends match a prefix of a follower's log while that
                # follower still holds a stale suffix after it.
                if sw.next_back:
                    core = ld.core
                    for p in sorted(core.progress):
                        pr = core.progress[p]
                        if p != core.id and pr.state != 2 and pr.next > pr.match + 1 and rng.random() < 0.5:
                            self._move_next_back(core, pr)
        if sw.transfers and leaders and rng.random() < sw.transfers:
            self.transfer(rng.choice(leaders))
        if sw.membership and leaders and rng.random() < sw.membership:
            self.membership(rng.choice(leaders))
        if sw.minority_leader and leaders and not sim.blocked and rng.random() < sw.minority_leader:
            self._minority_leader(rng.choice(leaders))
        self._fuzz_leaders(leaders)

    # ------------------------------------------------------------ leader fuzz

    def _fuzz_leaders(self, leaders: list[SimNode]) -> None:
        """Legal choices of the leader that the network alone rarely forces: a follower's next
        index moves back (as when an append was lost), an append carries a single entry."""
        sw, rng = self.swarm, self.sim.rng
        for ld in leaders:
            core = ld.core
            if sw.short_batch:
                core.cfg.max_append_bytes = 1 if rng.random() < sw.short_batch else sw.max_append_bytes
            if not sw.next_back:
                continue
            # Most often while probing (the leader is looking for where the logs match, and
            # the follower may hold a stale suffix), now and then while replicating.
            for p in sorted(core.progress):
                pr = core.progress[p]
                if p == core.id or pr.state == 2 or pr.next <= pr.match + 1:  # 2: snapshot
                    continue
                if rng.random() < (4 * sw.next_back if pr.state == 0 else sw.next_back / 4):
                    self._move_next_back(core, pr)

    def _move_next_back(self, core, pr) -> None:
        lo = max(pr.match + 1, core.log.first_index())
        if lo < pr.next:
            pr.become_probe()
            pr.next = self.sim.rng.randint(lo, pr.next)

    # ------------------------------------------------------------ partitions

    def _cut(self, a: list[str], b: list[str]) -> set[tuple[str, str]]:
        return {(x, y) for x in a for y in b} | {(y, x) for x in a for y in b}

    def _partition(self) -> None:
        sim, rng = self.sim, self.sim.rng
        ids = list(sim.nodes)
        kind = rng.choice(["halves", "isolate_leader", "bridge", "one_way"])
        if kind == "halves":
            rng.shuffle(ids)
            cut = rng.randint(1, len(ids) - 1)
            blocked = self._cut(ids[:cut], ids[cut:])
        elif kind == "isolate_leader":
            leaders = sim._leader_nodes()
            victim = leaders[0].id if leaders else rng.choice(ids)
            blocked = self._cut([victim], [y for y in ids if y != victim])
        elif kind == "bridge":
            rng.shuffle(ids)
            rest = ids[1:]
            half = len(rest) // 2
            blocked = self._cut(rest[:half], rest[half:])
        else:
            x = rng.choice(ids)
            blocked = {(x, y) for y in ids if y != x} if rng.random() < 0.5 else {(y, x) for y in ids if y != x}
        self._set_partition(kind, blocked, rng.randrange(200, 2000))

    def _set_partition(self, kind: str, blocked: set[tuple[str, str]], duration: int) -> None:
        sim = self.sim
        sim.blocked = blocked
        sim.partition_until = sim.now + duration
        sim.stats["partitions"] += 1
        sim._log(f"PARTITION {kind} {sorted(blocked)}")

    def _shift_partition(self) -> None:
        """Heal into a different majority: some of the old minority joins nodes of the old
        majority, which leaves others behind (a leader elected on one side meets followers
        that hold another side's uncommitted tail)."""
        sim, rng = self.sim, self.sim.rng
        ids = sorted(sim.nodes)
        reach: dict[str, set[str]] = {i: {j for j in ids if (i, j) not in sim.blocked} for i in ids}
        biggest = max(ids, key=lambda i: (len(reach[i]), i))
        old_major = sorted(reach[biggest])
        old_minor = [i for i in ids if i not in old_major]
        rng.shuffle(old_major)
        rng.shuffle(old_minor)
        size = len(ids) // 2 + 1
        take_minor = old_minor[: max(1, min(len(old_minor), size - 1))]
        new_major = take_minor + old_major[: size - len(take_minor)]
        left = [i for i in ids if i not in new_major]
        if not left:
            sim.blocked = set()
            return
        self._set_partition("shift", self._cut(new_major, left), rng.randrange(100, 1000))

    # ------------------------------------------------------------ targeted patterns

    def _minority_leader(self, leader: SimNode) -> None:
        """A leader replicates to a minority, then dies: cut it off with at most a minority of
        the cluster, feed it proposals, and crash it soon after (it restarts later, holding an
        uncommitted tail that the rest of the cluster has overwritten or never saw)."""
        sim, rng = self.sim, self.sim.rng
        ids = sorted(sim.nodes)
        voters = sorted(leader.core.voters - {leader.id})
        minority = rng.sample(voters, rng.randint(0, max(0, len(leader.core.voters) // 2 - 1)))
        side = [leader.id, *minority]
        rest = [i for i in ids if i not in side]
        self._set_partition("minority_leader", self._cut(side, rest), rng.randrange(50, 600))
        for _ in range(rng.randint(1, 6)):
            sim.counter += 1
            sim.propose(leader, f"v{sim.counter}".encode())
        if rng.random() < 0.8:
            self.crash_at.append((sim.now + rng.randrange(1, 40), leader.id, leader.restarts))
            self.crash_at.sort()

    # ------------------------------------------------------------ operations

    def transfer(self, leader: SimNode) -> None:
        sim = self.sim
        target = sim.rng.choice(sorted(leader.core.voters))
        try:
            sim.call(leader, leader.core.transfer_leadership, target)
            sim.stats["transfers"] += 1
        except (NotLeader, ValueError):
            pass

    def membership(self, leader: SimNode) -> None:
        sim, rng = self.sim, self.sim.rng
        core = leader.core
        members = core.voters | core.learners
        spares = [n for n in sim.nodes if n not in members]
        options: list[ConfChange] = []
        for s in spares:
            options.append(ConfChange(ConfChangeType.ADD_LEARNER, s))
        # Sorted: set order depends on PYTHONHASHSEED, and a seed must replay in any process.
        for lr in sorted(core.learners):
            options.append(ConfChange(ConfChangeType.PROMOTE, lr))
        if len(core.voters) > len(sim.initial_voters):
            for v in sorted(core.voters):
                options.append(ConfChange(ConfChangeType.REMOVE, v))
        if not options:
            return
        cc = rng.choice(options)
        try:
            index = sim.call(leader, core.propose, cc.encode(), EntryType.CONF_CHANGE)
        except (NotLeader, ProposalDropped, ValueError):
            return
        sim.inv.proposed(leader, index, EntryType.CONF_CHANGE)
        sim.stats["conf_changes"] += 1
        sim._log(f"CONF {leader.id} proposes {cc.type.name} {cc.node_id}")
        sw = self.swarm
        if sw.churn_after_conf and rng.random() < sw.churn_after_conf:
            # An election while the change is uncommitted: the leader dies or hands over.
            if rng.random() < 0.5:
                self.crash_at.append((sim.now + rng.randrange(1, 30), leader.id, leader.restarts))
                self.crash_at.sort()
            else:
                self.transfer(leader)

    def client(self) -> None:
        sim, rng, sw = self.sim, self.sim.rng, self.swarm
        alive = [n for n in sim.nodes.values() if n.alive]
        if not alive:
            return
        if rng.random() < sw.propose_rate:
            leaders = sim._leader_nodes()
            node = rng.choice(leaders if leaders and rng.random() < 0.9 else alive)
            sim.counter += 1
            # A client backs off from a node whose uncommitted tail is long (a leader cut off
            # from its majority without CheckQuorum would otherwise take thousands of writes,
            # and catching followers up one entry per round trip outlasts the liveness phase).
            if node.core.log.last_index() - node.core.log.committed < MAX_UNCOMMITTED:
                sim.propose(node, f"v{sim.counter}".encode())
        if rng.random() < sw.read_rate:
            node = rng.choice(alive)
            sim.counter += 1
            sim.read(node, f"r{sim.counter}".encode())


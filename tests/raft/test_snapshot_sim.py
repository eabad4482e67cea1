"""The simulator's snapshot machinery, step by step: a node's state machine snapshot file and
its log store's compaction are two writes, and a crash between them must restart the node from
one consistent side (the old log or the new snapshot), never from a mix."""

from __future__ import annotations

import random

import pytest

from raftsql.raft.types import MsgType, Role
from raftsql.sim.cluster import Simulation, Violation


class KeepFirst(random.Random):
    """A crash that keeps exactly `keep` of the unsynced writes."""

    def __init__(self, keep: int):
        super().__init__(0)
        self.keep = keep

    def randint(self, a: int, b: int) -> int:
        return min(max(a, self.keep), b)


def quiet_sim(seed: int = 3) -> Simulation:
    """A simulation whose fault schedule is switched off: the test makes every fault."""
    sim = Simulation(seed, nodes=3)
    sim.mix.drop = sim.mix.duplicate = 0.0
    sim.mix.crash_rate = sim.mix.crash_in_sync = sim.mix.partition_rate = 0.0
    sim.mix.skew = False
    sim.mix.membership = sim.mix.transfers = sim.mix.minority_leader = sim.mix.new_leader_dies = 0.0
    sim.mix.next_back = sim.mix.short_batch = sim.mix.rolling = 0.0
    sim.schedule.slow = set()
    sim.mix.propose_rate, sim.mix.read_rate = 0.3, 0.0
    sim.snap.anytime = 0.0
    for n in sim.nodes.values():
        n.compact_at = 1 << 30  # only the test compacts
    return sim


def run_until(sim: Simulation, cond, limit: int = 3000) -> None:
    for _ in range(limit):
        sim._step()
        if cond():
            return
    raise AssertionError("condition never held")


def follower_with_applied(sim: Simulation, n: int):
    run_until(sim, lambda: any(
        x.alive and x.core.role == Role.FOLLOWER and len(x.applied) >= n and x.pending is None
        for x in sim.nodes.values()
    ))
    return next(
        x for x in sim.nodes.values()
        if x.alive and x.core.role == Role.FOLLOWER and len(x.applied) >= n and x.pending is None
    )


def compact_now(sim: Simulation, node) -> int:
    node.compact_at = 0
    sim.snap.max_window = 0
    before = sim.stats["compactions"]
    while sim.stats["compactions"] == before:
        sim._compactions()
    node.compact_at = 1 << 30
    return node.core.log.snapshot.index


@pytest.mark.parametrize("keep_compaction", [False, True])
def test_crash_between_snapshot_file_and_log_store_restarts_from_one_side(keep_compaction):
    sim = quiet_sim()
    node = follower_with_applied(sim, 8)
    old_applied = list(node.applied)
    index = compact_now(sim, node)
    assert index > 0 and node.snapshots[index] == tuple(old_applied[:index])
    assert node.disk.snapshot.index == 0  # the log store's compaction is not synced yet
    pending = len(node.disk._pending)
    assert pending >= 1
    node.disk.crash(KeepFirst(pending if keep_compaction else pending - 1))
    node.core = None
    sim._start(node.id)
    log = node.core.log
    if keep_compaction:
        assert log.snapshot.index == index
        assert node.applied == old_applied[:index]  # the state machine is the snapshot
        assert sim.stats["crash_between"] == 0
    else:
        assert log.snapshot.index == 0  # the newer file is ignored: the old log covers it
        assert node.applied == []
        assert sim.stats["crash_between"] == 1
    assert list(node.snapshots) == ([index] if keep_compaction else [])
    # Either way the node replays its committed log from there and catches up safely.
    run_until(sim, lambda: len(node.applied) >= len(old_applied) + 3)
    assert node.applied[: len(old_applied)] == old_applied


def test_lagging_follower_installs_leader_snapshot_and_its_state_machine_matches():
    sim = quiet_sim()
    run_until(sim, lambda: any(n.alive and n.core.role == Role.LEADER for n in sim.nodes.values()))
    leader = sim._leader_nodes()[0]
    victim = next(n for n in sim.nodes.values() if n.id != leader.id and n.id in sim.initial_voters)
    sim._crash(victim.id)
    sim.schedule.held.add(victim.id)  # down until the test restarts it
    # Every live member holds the leader's log before it compacts, so only the victim lags
    # behind the snapshot (a learner still waiting for acks in flight would get one too).
    run_until(sim, lambda: len(leader.applied) >= 30 and leader.pending is None and all(
        pr.match == leader.core.log.last_index()
        for nid, pr in leader.core.progress.items() if nid != victim.id
    ))
    index = compact_now(sim, leader)
    assert index >= 30
    sent = []
    real_send = sim._send_snapshot
    sim._send_snapshot = lambda m: (sent.append(m), real_send(m))[1]
    sim._start(victim.id)
    run_until(sim, lambda: sim.stats["installs"] >= 1 and victim.pending is None)
    assert [m.to for m in sent if m.type == MsgType.SNAPSHOT] == [victim.id]
    assert victim.core.log.snapshot.index == index
    assert victim.applied[:index] == leader.applied[:index]
    assert victim.snapshots[index] == tuple(leader.applied[:index])
    run_until(sim, lambda: len(victim.applied) > index + 2)
    assert victim.applied == leader.applied[: len(victim.applied)]


def test_installed_snapshot_that_differs_from_the_committed_prefix_is_a_violation():
    sim = quiet_sim()
    node = follower_with_applied(sim, 5)
    index = compact_now(sim, node)
    meta = node.core.log.snapshot
    data = list(node.snapshots[index])
    data[1] = (2, b"forged")
    with pytest.raises(Violation) as e:
        sim._check_snapshot(node.id, meta, tuple(data), "installed")
    assert e.value.invariant == "State Machine Safety"

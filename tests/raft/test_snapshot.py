"""Log compaction and InstallSnapshot (§7, diss. 5) on SyncNet, step by step."""

from __future__ import annotations

import pytest

from raftsql.raft.types import (
    ConfChange,
    ConfChangeType,
    EntryType,
    Message,
    MsgType,
    SnapshotMeta,
)
from raftsql.sim.net import SyncNet

IDS3 = ("n1", "n2", "n3")


def settle(net: SyncNet, leader: str) -> None:
    net.tick(leader)
    net.deliver()


def lagging_cluster(writes: int = 20) -> SyncNet:
    """n3 is down while n1 commits `writes` entries and compacts them all away."""
    net = SyncNet(IDS3)
    net.elect("n1")
    settle(net, "n1")
    net.crash("n3")
    for i in range(writes):
        net.propose("n1", f"w{i}".encode())
    settle(net, "n1")
    applied = net["n1"].log.applied
    meta = net.compact("n1", applied)
    assert meta.index == applied and net["n1"].log.snapshot == meta
    assert net["n1"].log.entries == []
    return net


def test_compact_records_term_and_membership_and_forgets_entries():
    net = SyncNet(("n1", "n2", "n3", "n4"), voters=IDS3)
    net.elect("n1")
    net["n1"].propose(ConfChange(ConfChangeType.ADD_LEARNER, "n4").encode(), EntryType.CONF_CHANGE)
    net.deliver()
    net.propose("n1", b"after")
    settle(net, "n1")
    idx = net["n1"].log.applied
    meta = net.compact("n1", idx - 1)
    assert meta == SnapshotMeta(idx - 1, net["n1"].term, IDS3, ("n4",))
    assert net["n1"].log.first_index() == idx
    # The membership survives a restart from the compacted disk.
    net.crash("n1")
    core = net.start("n1")
    assert (core.voters, core.learners) == (set(IDS3), {"n4"})
    assert core.log.snapshot == meta


def test_compact_refuses_beyond_applied():
    net = SyncNet(IDS3)
    net.elect("n1")
    with pytest.raises(ValueError):
        net["n1"].compact(net["n1"].log.applied + 1)


def test_lagging_follower_gets_snapshot_then_entries_after_it():
    net = lagging_cluster()
    meta = net["n1"].log.snapshot
    net.start("n3")
    sent: list[Message] = []
    net.filter = lambda m: sent.append(m) or True
    settle(net, "n1")
    net.propose("n1", b"after snapshot")
    settle(net, "n1")
    snaps = [m for m in sent if m.type == MsgType.SNAPSHOT]
    assert len(snaps) == 1 and snaps[0].to == "n3" and snaps[0].index == meta.index
    assert net.installed["n3"] == [meta]
    assert net["n3"].log.snapshot == meta
    assert net["n3"].log.applied == net["n1"].log.applied
    assert [e.data for e in net.applied["n3"]][-1] == b"after snapshot"
    # Entries before the snapshot never reach n3 one by one: it got them as the snapshot.
    assert not [e for e in net.applied["n3"] if e.data.startswith(b"w")]
    assert net["n1"].progress["n3"].match == net["n1"].log.last_index()
    # The installed snapshot is on n3's disk: a restart resumes from it.
    net.crash("n3")
    core = net.start("n3")
    assert core.log.snapshot == meta


def test_leader_sends_no_appends_while_snapshot_pending_and_resends_after_failure():
    net = lagging_cluster()
    net.start("n3")
    net.filter = lambda m: m.type != MsgType.SNAPSHOT  # the snapshot is lost on the way
    settle(net, "n1")
    pr = net["n1"].progress["n3"]
    assert pr.pending_snapshot == net["n1"].log.snapshot.index
    net.filter = None
    sent: list[Message] = []
    net.filter = lambda m: sent.append(m) or True
    settle(net, "n1")
    assert not [m for m in sent if m.to == "n3" and m.type in (MsgType.APPEND, MsgType.SNAPSHOT)]
    net["n1"].report_snapshot("n3", ok=False)
    settle(net, "n1")
    assert [m.type for m in sent if m.to == "n3" and m.type == MsgType.SNAPSHOT] == [MsgType.SNAPSHOT]
    assert net["n3"].log.applied == net["n1"].log.applied


def test_unreported_snapshot_is_resent_after_the_timeout():
    net = lagging_cluster()
    net.start("n3")
    net.filter = lambda m: m.type != MsgType.SNAPSHOT
    settle(net, "n1")
    net.filter = None
    timeout = net["n1"].cfg.snapshot_timeout_ticks
    net.tick_all(timeout - 1)
    assert not net.installed.get("n3")  # still waiting for a report that never comes
    net.tick_all(2)
    settle(net, "n1")
    assert net["n1"].leader == "n1"
    assert net["n3"].log.applied == net["n1"].log.applied
    assert net.installed["n3"]


def test_follower_that_already_has_the_entry_keeps_its_log():
    """A snapshot whose last entry the follower already holds only advances its commit."""
    net = SyncNet(IDS3)
    net.elect("n1")
    for i in range(5):
        net.propose("n1", f"w{i}".encode())
    settle(net, "n1")
    before = net.log_of("n2")
    snap = SnapshotMeta(3, net["n1"].term, IDS3)
    m = Message(MsgType.SNAPSHOT, "n2", "n1", net["n1"].term, log_term=snap.term, index=snap.index,
                context=snap.membership_context())
    net["n2"].step(m)
    net.process("n2")
    assert net.log_of("n2") == before
    assert "n2" not in net.installed


def test_stale_snapshot_below_commit_is_answered_with_commit_index():
    net = SyncNet(IDS3)
    net.elect("n1")
    for i in range(5):
        net.propose("n1", f"w{i}".encode())
    settle(net, "n1")
    committed = net["n2"].log.committed
    snap = SnapshotMeta(2, 1, IDS3)
    net["n2"].step(Message(MsgType.SNAPSHOT, "n2", "n1", net["n1"].term, log_term=1, index=2,
                           context=snap.membership_context()))
    net.process("n2")
    resp = [m for m in net.take("n2") if m.type == MsgType.APPEND_RESP]
    assert resp and resp[-1].index == committed and not resp[-1].reject


def test_malformed_snapshot_membership_is_ignored():
    net = SyncNet(IDS3)
    net.elect("n1")
    settle(net, "n1")
    before = net["n2"].status()
    net["n2"].step(Message(MsgType.SNAPSHOT, "n2", "n1", net["n1"].term, log_term=1, index=99, context=b"\xc1"))
    net.process("n2")
    assert net["n2"].status()["last_index"] == before["last_index"]
    assert "n2" not in net.installed


def test_follower_discards_conflicting_log_when_installing():
    """A follower holding a divergent uncommitted suffix throws its whole log away (§7)."""
    net = SyncNet(IDS3)
    net.elect("n3")
    net.filter = lambda m: not (m.sender == "n3" and m.type == MsgType.APPEND)
    for i in range(3):
        net["n3"].propose(f"stray{i}".encode())  # only on n3's disk: never committed
    net.deliver()
    stray = net.log_of("n3")
    net.crash("n3")
    net.heal()
    for _ in range(3):
        net.tick_all(10)
        if net.leader() in ("n1", "n2"):
            break
    lead = net.leader()
    assert lead in ("n1", "n2")
    for i in range(10):
        net.propose(lead, f"w{i}".encode())
    settle(net, lead)
    net.compact(lead, net[lead].log.applied)
    net.start("n3")
    assert net.log_of("n3") == stray
    settle(net, lead)
    settle(net, lead)
    assert net.installed["n3"] == [net[lead].log.snapshot]
    assert not set(net.log_of("n3")) & set(stray)
    assert net["n3"].log.applied == net[lead].log.applied


def test_new_learner_catches_up_from_snapshot_and_is_promoted():
    net = SyncNet(("n1", "n2", "n3", "n4"), voters=IDS3)
    net.elect("n1")
    for i in range(10):
        net.propose("n1", f"w{i}".encode())
    settle(net, "n1")
    net.compact("n1", net["n1"].log.applied)
    net["n1"].propose(ConfChange(ConfChangeType.ADD_LEARNER, "n4").encode(), EntryType.CONF_CHANGE)
    net.deliver()
    settle(net, "n1")
    assert net.installed["n4"][0].index == net["n1"].log.snapshot.index
    assert net["n4"].learners == {"n4"}
    idx = net["n1"].propose(ConfChange(ConfChangeType.PROMOTE, "n4").encode(), EntryType.CONF_CHANGE)
    net.deliver()
    settle(net, "n1")
    assert net["n4"].log.applied >= idx and "n4" in net["n4"].voters

"""Scenario scripts for the Raft core on SyncNet: the test owns every tick and every message.

Figure 8 of the paper step by step, then the dissertation's rules that need a cluster: PreVote,
leader stickiness, CheckQuorum, ReadIndex, leadership transfer, learners and membership
changes, and restarts from the in-memory disk.
"""

from __future__ import annotations

import pytest

from raftsql.raft.types import (
    ConfChange,
    ConfChangeType,
    EntryType,
    Message,
    MsgType,
    ProposalDropped,
    ReadState,
    Role,
)
from raftsql.sim.net import SyncNet

IDS3 = ("n1", "n2", "n3")
IDS5 = ("n1", "n2", "n3", "n4", "n5")
E = 10  # SyncNet's election_ticks


# --------------------------------------------------------------------------- helpers


def settle(net: SyncNet, leader: str) -> None:
    """One heartbeat round from the leader, so every follower also knows the commit index."""
    net.tick(leader)
    net.deliver()


def exchange(net: SyncNet, m: Message) -> None:
    """Deliver one message and carry its answers straight back (one round trip, nothing else)."""
    net[m.to].step(m)
    net.process(m.to)
    for resp in net.take(m.to):
        net[resp.to].step(resp)
        net.process(resp.to)


def drop(mtype: MsgType, *, sender: str | None = None, to: tuple[str, ...] | None = None):
    """A SyncNet filter that drops messages of one type (from one sender, to some nodes)."""

    def keep(m: Message) -> bool:
        hit = m.type == mtype and (sender is None or m.sender == sender) and (to is None or m.to in to)
        return not hit

    return keep


def conf(cc_type: ConfChangeType, nid: str) -> bytes:
    return ConfChange(cc_type, nid).encode()


def entry_terms(net: SyncNet, nid: str) -> list[tuple[int, int]]:
    return [(i, t) for i, t, _ in net.log_of(nid)]


# =========================================================================== Figure 8 (§5.4.2)

S = ("s1", "s2", "s3", "s4", "s5")


def figure8_through_c() -> SyncNet:
    """Steps (a)-(c) of Figure 8. Every leader appends a no-op when elected; the scenario uses
    those no-ops as the paper's entries: index 1 (term 1) is committed everywhere, the paper's
    "entry 2 of term 2" is s1's no-op of term 2, and s5's "entry 2 of term 3" is its own no-op.
    max_append_bytes=1 makes every append carry one entry, so filters can pick entries.
    CheckQuorum is off: its lease would make followers ignore the very elections the figure
    is about (and no test here ticks for time to pass)."""
    net = SyncNet(S, max_append_bytes=1, check_quorum=False)
    # Prefix: s2 leads term 1 and commits its no-op (index 1) on every server.
    net.elect("s2")
    settle(net, "s2")
    assert all(entry_terms(net, i) == [(1, 1)] and net[i].log.committed == 1 for i in S)

    # (a) s1 is elected for term 2; its entry at index 2 (its no-op) reaches only s2.
    net.filter = lambda m: not (m.sender == "s1" and m.type == MsgType.APPEND and m.to != "s2")
    net.elect("s1")
    assert net["s1"].term == 2
    assert entry_terms(net, "s1") == entry_terms(net, "s2") == [(1, 1), (2, 2)]
    assert all(entry_terms(net, i) == [(1, 1)] for i in ("s3", "s4", "s5"))
    assert net["s1"].log.committed == 1

    # (b) s1 crashes. s5 is elected for term 3 with votes from s3, s4 and itself (s2's log is
    # more up to date and refuses), and appends a different entry at index 2, which it sends
    # to no one.
    net.crash("s1")
    net.filter = drop(MsgType.APPEND, sender="s5")
    net.elect("s5")
    assert net["s5"].term == 3
    assert [net[i].vote for i in ("s3", "s4", "s5")] == ["s5"] * 3
    assert net["s2"].vote is None
    assert entry_terms(net, "s5") == [(1, 1), (2, 3)]

    # (c) s5 crashes; s1 restarts. Its first try only teaches it term 3 (s3 and s4 already
    # voted in term 3); it is then elected for term 4, with its own no-op at index 3.
    net.crash("s5")
    net.start("s1")
    assert (net["s1"].term, entry_terms(net, "s1")) == (2, [(1, 1), (2, 2)])

    # s1 replicates its term-2 entry at index 2 and nothing else. The paper sends it to s3
    # (s2 already has it); here s2 could only acknowledge index 2 by accepting s1's no-op of
    # term 4 too (that is step (e)), so s1 sends it to s3 and s4 and gets both acks: s1 then
    # KNOWS a majority (s1, s3, s4) holds index 2. s3 and s4 lack index 2, so s1's first probe
    # (prev_index 2) fails their consistency check and s1 backs up to send index 2 alone.
    def only_index_2_to_s3_s4(m: Message) -> bool:
        if m.sender != "s1" or m.type != MsgType.APPEND:
            return True
        if m.to not in ("s3", "s4"):
            return False
        receiver_lacks_2 = net[m.to].log.last_index() < 2
        return m.index == 1 or (m.index == 2 and receiver_lacks_2)

    net.filter = only_index_2_to_s3_s4
    net["s1"].campaign()
    net.deliver()
    assert (net["s1"].role, net["s1"].term) == (Role.FOLLOWER, 3)
    net.elect("s1")
    assert net["s1"].term == 4
    assert entry_terms(net, "s1") == [(1, 1), (2, 2), (3, 4)]
    for i in ("s2", "s3", "s4"):
        assert entry_terms(net, i) == [(1, 1), (2, 2)]
    return net


def test_figure8_c_leader_does_not_commit_previous_term_entry_by_counting_replicas():
    net = figure8_through_c()
    s1 = net["s1"]
    # s1 has acknowledgements for index 2 from s3 and s4: with itself, 3 of 5 ...
    assert {p: s1.progress[p].match for p in ("s3", "s4")} == {"s3": 2, "s4": 2}
    assert s1.progress["s1"].match == 3
    # ... yet index 2 is of term 2, not 4: counting replicas must not commit it.
    assert s1.log.committed == 1
    assert [e.index for e in net.applied["s1"]] == [1]


def test_figure8_d_uncommitted_entry_is_overwritten_by_s5():
    net = figure8_through_c()
    # (d) s1 crashes. s5 restarts and is elected for term 5 with votes from s2, s3 and s4
    # (their last term, 2, is older than s5's 3). Its first try only teaches it term 4.
    net.crash("s1")
    net.start("s5")
    net.filter = None
    net["s5"].campaign()
    net.deliver()
    assert (net["s5"].role, net["s5"].term) == (Role.FOLLOWER, 4)
    net.elect("s5")
    assert net["s5"].term == 5
    assert sorted(i for i in ("s2", "s3", "s4") if net[i].vote == "s5") == ["s2", "s3", "s4"]
    # s5 overwrites index 2 with its own term-3 entry on s2, s3 and s4 ...
    settle(net, "s5")
    for i in ("s2", "s3", "s4", "s5"):
        assert entry_terms(net, i) == [(1, 1), (2, 3), (3, 5)]
        assert net[i].log.committed == 3
    # ... and on s1 once it is back: the entry that "a majority held" is gone everywhere.
    net.start("s1")
    settle(net, "s5")
    assert entry_terms(net, "s1") == [(1, 1), (2, 3), (3, 5)]


def test_figure8_e_entry_of_leaders_term_on_majority_commits_and_is_never_overwritten():
    net = figure8_through_c()
    # (e) Instead, s1 first replicates an entry of its own term (its no-op at index 3) to s2
    # and s3; s4 and s5 hear nothing more from it.
    net.filter = lambda m: not (m.sender == "s1" and m.to in ("s4", "s5"))
    settle(net, "s1")
    for i in ("s1", "s2", "s3"):
        assert entry_terms(net, i) == [(1, 1), (2, 2), (3, 4)]
    # Index 3 (term 4) is on a majority: it commits, and index 2 (term 2) with it.
    assert net["s1"].log.committed == 3
    assert [(e.index, e.term) for e in net.applied["s1"]] == [(1, 1), (2, 2), (3, 4)]

    # s1 crashes now. s5 can no longer be elected: s1, s2 and s3 have a newer last term.
    net.crash("s1")
    net.start("s5")
    net.filter = None
    for _ in range(20 * E):
        net.tick_all()
        assert net["s5"].role != Role.LEADER
        if net.leader() is not None:
            break
    leader = net.leader()
    assert leader in ("s2", "s3")
    settle(net, leader)
    net.start("s1")
    settle(net, leader)
    # Index 2 keeps its term-2 entry on every server; s5's conflicting entry was the one erased.
    for i in S:
        assert entry_terms(net, i)[:3] == [(1, 1), (2, 2), (3, 4)]
        assert net[i].log.committed >= 3


# =========================================================================== diss. 9.6 PreVote


@pytest.mark.parametrize("ids", [IDS3, IDS5])
def test_partitioned_node_rejoins_without_disrupting_the_cluster(ids):
    """diss. 9.6: a node cut off from everyone keeps failing pre-vote rounds without raising its
    term; when it rejoins, the leader and every term are unchanged and it simply catches up."""
    net = SyncNet(ids)
    net.elect("n1")
    x = ids[-1]
    net.isolate(x)
    for _ in range(10 * E):
        net.tick_all()
    assert net[x].term == 1
    assert net[x].role in (Role.FOLLOWER, Role.PRE_CANDIDATE)
    assert any(line == f"{x} became pre-candidate at term 1" for line in net.log_lines)
    net.propose("n1", b"while away")
    net.heal()
    for _ in range(3 * E):
        net.tick_all()
    assert net.leader() == "n1"
    assert {i: net[i].term for i in ids} == {i: 1 for i in ids}
    assert (net[x].role, net[x].leader) == (Role.FOLLOWER, "n1")
    assert net.log_of(x) == net.log_of("n1")


def test_without_pre_vote_a_rejoining_node_disrupts_the_leader():
    """The same story with PreVote off: the isolated node's term grows, and when it comes back
    its higher term deposes the healthy leader (what PreVote prevents)."""
    net = SyncNet(IDS3, pre_vote=False)
    net.elect("n1")
    net.isolate("n3")
    for _ in range(10 * E):
        net.tick_all()
    term = net["n3"].term
    assert term > 1
    net.heal()
    net.tick_all()  # n1's heartbeat is answered with n3's term
    assert (net["n1"].role, net["n1"].term) == (Role.FOLLOWER, term)


# =========================================================================== leader stickiness


@pytest.mark.parametrize("pre_vote", [True, False])
@pytest.mark.parametrize("ids", [IDS3, IDS5])
def test_node_that_cannot_hear_the_leader_does_not_depose_it(ids, pre_vote):
    """The seed document's "one question" (diss. 4.2.3): a server that cannot hear the leader,
    while everyone else can, must not depose it. Followers that heard from the leader within
    election_ticks ignore its (pre)vote requests; with PreVote it never even raises its term."""
    net = SyncNet(ids, pre_vote=pre_vote)
    net.elect("n1")
    x = ids[-1]
    net.cut("n1", x)
    for _ in range(20 * E):
        net.tick_all()
        assert net.leader() == "n1"
        assert all(net[i].term == 1 and net[i].leader == "n1" for i in ids if i != x)
    if pre_vote:
        assert net[x].term == 1
    else:
        assert net[x].term > 1  # it did campaign; nobody listened
    idx = net.propose("n1", b"still serving")
    assert net["n1"].log.committed == idx


def test_without_check_quorum_a_node_that_cannot_hear_the_leader_deposes_it():
    """Without the lease (CheckQuorum off), the same cut makes x win an election: the rule the
    previous test checks is what keeps the healthy leader."""
    net = SyncNet(IDS3, check_quorum=False)
    net.elect("n1")
    net.cut("n1", "n3")
    for _ in range(5 * E):
        net.tick_all()
        if net["n1"].role != Role.LEADER:
            break
    assert net["n1"].role == Role.FOLLOWER and net["n1"].term > 1
    assert net.leader() == "n3"


# =========================================================================== diss. 6.2 CheckQuorum


def test_isolated_leader_steps_down_within_two_election_timeouts():
    net = SyncNet(IDS3)
    net.elect("n1")
    net.isolate("n1")
    for _ in range(2 * E):
        net.tick_all()
    assert (net["n1"].role, net["n1"].term) == (Role.FOLLOWER, 1)
    assert net["n1"].leader is None
    # The majority side elects a leader of its own meanwhile.
    for _ in range(3 * E):
        net.tick_all()
    assert net.leader() in ("n2", "n3")


def test_isolated_leader_without_check_quorum_keeps_leading():
    net = SyncNet(IDS3, check_quorum=False)
    net.elect("n1")
    net.isolate("n1")
    for _ in range(5 * E):
        net.tick_all()
    assert (net["n1"].role, net["n1"].term) == (Role.LEADER, 1)


def test_stale_leader_learns_the_new_term_from_followers_and_steps_down():
    """§5.1: a leader cut off (and not stepping down by itself) learns the new term from the
    first answer it gets, and the new leader is not disturbed."""
    net = SyncNet(IDS3, check_quorum=False)
    net.elect("n1")
    net.isolate("n1")
    for _ in range(5 * E):
        net.tick_all()
    new = net.leader()
    term = net[new].term
    assert new in ("n2", "n3") and term > 1
    assert (net["n1"].role, net["n1"].term) == (Role.LEADER, 1)
    net.heal()
    net.tick("n1")  # its heartbeat of term 1 is answered with the current term
    net.deliver()
    assert (net["n1"].role, net["n1"].term) == (Role.FOLLOWER, term)
    assert (net[new].role, net[new].term) == (Role.LEADER, term)


# =========================================================================== diss. 6.4 ReadIndex


def test_leader_read_released_only_after_heartbeat_round_acked_by_majority():
    net = SyncNet(IDS5)
    net.elect("n1")
    settle(net, "n1")
    commit = net["n1"].log.committed
    net["n1"].read_index(b"r")
    net.process("n1")
    hbs = net.take("n1", MsgType.HEARTBEAT)
    assert sorted(m.to for m in hbs) == ["n2", "n3", "n4", "n5"]
    assert net.read_states["n1"] == []
    exchange(net, hbs[0])  # n1 + n2: 2 of 5
    assert net.read_states["n1"] == []
    exchange(net, hbs[1])  # n1 + n2 + n3: a majority
    assert net.read_states["n1"] == [ReadState(commit, b"r")]


def test_leader_read_not_confirmed_by_heartbeats_sent_before_it():
    net = SyncNet(IDS3)
    net.elect("n1")
    settle(net, "n1")
    net.tick("n1")
    earlier = net.take("n1", MsgType.HEARTBEAT)
    assert len(earlier) == 2
    net["n1"].read_index(b"r")
    net.process("n1")
    round_hbs = net.take("n1", MsgType.HEARTBEAT)
    for m in earlier:  # answers to heartbeats that left before the read prove nothing about it
        exchange(net, m)
    assert net.read_states["n1"] == []
    exchange(net, round_hbs[0])
    assert [rs.context for rs in net.read_states["n1"]] == [b"r"]


def test_one_heartbeat_round_serves_many_reads():
    net = SyncNet(IDS3)
    net.elect("n1")
    settle(net, "n1")
    for c in (b"a", b"b", b"c"):
        net["n1"].read_index(c)
    net.process("n1")
    hbs = [m for m in net.queue if m.type == MsgType.HEARTBEAT]
    assert sorted(m.to for m in hbs) == ["n2", "n3"]  # one round for the three reads
    net.deliver()
    commit = net["n1"].log.committed
    assert net.read_states["n1"] == [ReadState(commit, c) for c in (b"a", b"b", b"c")]


def test_new_leader_releases_reads_only_after_committing_an_entry_of_its_term():
    net = SyncNet(IDS3)
    net.elect("n2")
    net.propose("n2", b"earlier")
    # n2 hands leadership to n1 (term 2), but n1's no-op does not reach anyone yet.
    net.filter = drop(MsgType.APPEND, sender="n1")
    net["n2"].transfer_leadership("n1")
    net.deliver()
    assert (net["n1"].role, net["n1"].term) == (Role.LEADER, 2)
    noop = net["n1"].log.last_index()
    net["n1"].read_index(b"r")
    for _ in range(3):  # heartbeats are answered by everyone, yet nothing is released
        net.tick("n1")
        net.deliver()
    assert net["n1"].log.committed < noop
    assert net.read_states["n1"] == []
    net.heal()
    for _ in range(3):
        net.tick("n1")
        net.deliver()
    assert net["n1"].log.committed >= noop
    assert [(rs.index >= noop, rs.context) for rs in net.read_states["n1"]] == [(True, b"r")]


def test_follower_read_goes_through_the_leader():
    net = SyncNet(IDS3)
    net.elect("n1")
    net.propose("n1", b"x")
    settle(net, "n1")
    net["n2"].read_index(b"f")
    net.process("n2")
    fwd = [m for m in net.queue if m.sender == "n2"]
    assert [(m.type, m.to, m.context) for m in fwd] == [(MsgType.READ_INDEX, "n1", b"f")]
    net.deliver()
    assert net.read_states["n2"] == [ReadState(net["n1"].log.committed, b"f")]
    assert net.read_states["n1"] == []


@pytest.mark.parametrize("check_quorum", [True, False])
def test_isolated_leader_never_releases_a_read(check_quorum):
    """A leader cut off from the majority (deposed, whether it knows it yet or not) must never
    answer a read: the majority may have committed newer writes meanwhile."""
    net = SyncNet(IDS3, check_quorum=check_quorum)
    net.elect("n1")
    settle(net, "n1")
    net.isolate("n1")
    net["n1"].read_index(b"stale?")
    for _ in range(5 * E):
        net.tick_all()
    new = net.leader()
    assert new in ("n2", "n3")
    net.propose(new, b"newer write")
    for _ in range(2 * E):
        net.tick_all()
    assert net.read_states["n1"] == []
    net.heal()
    for _ in range(2 * E):
        net.tick_all()
    assert net.read_states["n1"] == []


# =========================================================================== diss. 3.10 transfer


def test_transfer_to_up_to_date_follower_sends_timeout_now_and_target_wins_next_term():
    net = SyncNet(IDS3)
    net.elect("n1")
    settle(net, "n1")
    sent: list[Message] = []
    net.filter = lambda m: sent.append(m) or True
    net["n1"].transfer_leadership("n2")
    net.deliver()
    assert [(m.sender, m.to, m.term) for m in sent if m.type == MsgType.TIMEOUT_NOW] == [("n1", "n2", 1)]
    votes = [m for m in sent if m.type == MsgType.VOTE]
    assert votes and all(m.context == b"transfer" and m.term == 2 for m in votes)
    assert (net["n2"].role, net["n2"].term) == (Role.LEADER, 2)
    assert (net["n1"].role, net["n1"].term, net["n1"].leader) == (Role.FOLLOWER, 2, "n2")


def test_transfer_brings_target_up_to_date_before_timeout_now():
    net = SyncNet(IDS3)
    net.elect("n1")
    net.filter = drop(MsgType.APPEND, sender="n1", to=("n3",))
    for i in range(3):
        net.propose("n1", b"v%d" % i)
    assert net["n3"].log.last_index() < net["n1"].log.last_index()
    target_last_at_timeout_now = []

    def watch(m: Message) -> bool:
        if m.type == MsgType.TIMEOUT_NOW:
            target_last_at_timeout_now.append(net["n3"].log.last_index())
        return True

    net.filter = watch
    last = net["n1"].log.last_index()
    net["n1"].transfer_leadership("n3")
    with pytest.raises(ProposalDropped):
        net["n1"].propose(b"during transfer")
    for _ in range(E):
        net.deliver()
        if net["n3"].role == Role.LEADER:
            break
        net.tick("n1")
    assert target_last_at_timeout_now == [last]
    assert (net["n3"].role, net["n3"].term) == (Role.LEADER, 2)


def test_transfer_aborted_after_election_ticks_if_target_unreachable():
    net = SyncNet(IDS3)
    net.elect("n1")
    settle(net, "n1")
    net.cut("n1", "n3")
    net["n1"].transfer_leadership("n3")
    for _ in range(E - 1):
        net.tick_all()
        with pytest.raises(ProposalDropped):
            net["n1"].propose(b"x")
    net.tick_all()
    assert net["n1"].lead_transferee is None
    idx = net.propose("n1", b"after abort")
    assert (net["n1"].role, net["n1"].term) == (Role.LEADER, 1)
    assert net["n1"].log.committed == idx


# =========================================================================== diss. 4.1 membership


def test_learner_receives_the_log_but_never_campaigns_nor_counts_for_commit():
    net = SyncNet(IDS3, voters=("n1", "n2"), learners=("n3",))
    net.elect("n1")
    idx = net.propose("n1", b"x")
    settle(net, "n1")
    assert net.log_of("n3") == net.log_of("n1")
    assert net["n3"].log.committed == idx
    # Its acknowledgement does not count: with n2 cut off nothing commits, though n3 has it.
    net.filter = drop(MsgType.APPEND, sender="n1", to=("n2",))
    idx2 = net.propose("n1", b"y")
    assert net["n3"].log.last_index() == idx2
    assert net["n1"].log.committed == idx
    # Left alone for a long time, it never campaigns.
    net.isolate("n3")
    net.take("n3")
    for _ in range(10 * E):
        net["n3"].tick()
        net.process("n3")
        assert net.take("n3") == []
    assert (net["n3"].role, net["n3"].term) == (Role.FOLLOWER, 1)
    net.heal()
    settle(net, "n1")
    assert net["n1"].log.committed == idx2


def test_learner_counts_neither_for_check_quorum_nor_for_read_confirmation():
    net = SyncNet(IDS3, voters=("n1", "n2"), learners=("n3",))
    net.elect("n1")
    settle(net, "n1")
    net.cut("n1", "n2")  # only the learner still answers n1
    net["n1"].read_index(b"r")
    for _ in range(2 * E):
        net.tick_all()
    assert net["n1"].role == Role.FOLLOWER
    assert net.read_states["n1"] == []


def test_add_learner_then_promote_then_remove():
    net = SyncNet(("n1", "n2", "n3", "n4"), voters=IDS3)
    net.elect("n1")
    settle(net, "n1")
    assert net.log_of("n4") == []

    net["n1"].propose(conf(ConfChangeType.ADD_LEARNER, "n4"), EntryType.CONF_CHANGE)
    net.deliver()
    settle(net, "n1")
    assert net.log_of("n4") == net.log_of("n1")
    for i in ("n1", "n2", "n3", "n4"):
        assert (net[i].voters, net[i].learners) == (set(IDS3), {"n4"})

    idx = net["n1"].propose(conf(ConfChangeType.PROMOTE, "n4"), EntryType.CONF_CHANGE)
    net.deliver()
    settle(net, "n1")
    assert net["n1"].log.committed == idx
    for i in ("n1", "n2", "n3", "n4"):
        assert (net[i].voters, net[i].learners) == ({"n1", "n2", "n3", "n4"}, set())
    # Four voters: a majority is now three, so n1 and n2 alone commit nothing.
    net.filter = drop(MsgType.APPEND, sender="n1", to=("n3", "n4"))
    blocked = net.propose("n1", b"needs three")
    assert net["n1"].log.committed < blocked
    net.heal()
    settle(net, "n1")
    assert net["n1"].log.committed == blocked

    idx = net["n1"].propose(conf(ConfChangeType.REMOVE, "n2"), EntryType.CONF_CHANGE)
    net.deliver()
    settle(net, "n1")
    assert net["n1"].log.committed == idx
    for i in ("n1", "n3", "n4"):
        assert (net[i].voters, net[i].learners) == ({"n1", "n3", "n4"}, set())
    assert "n2" not in net["n1"].progress
    # n2 is gone: n1, n3 and n4 commit without it.
    net.crash("n2")
    idx = net.propose("n1", b"without n2")
    assert net["n1"].log.committed == idx
    # The promoted learner is a full voter: it can take over leadership.
    net["n1"].transfer_leadership("n4")
    net.deliver()
    assert (net["n4"].role, net["n4"].term) == (Role.LEADER, 2)


def test_removing_an_unreachable_voter_lets_pending_entries_commit():
    """A configuration takes effect once appended (diss. 4.1): removing the dead half of a
    two-voter cluster makes the leader alone a majority, and what waited for n2 commits."""
    net = SyncNet(("n1", "n2"))
    net.elect("n1")
    settle(net, "n1")
    net.crash("n2")
    stuck = net.propose("n1", b"x")
    assert net["n1"].log.committed < stuck
    idx = net["n1"].propose(conf(ConfChangeType.REMOVE, "n2"), EntryType.CONF_CHANGE)
    net.deliver()
    assert net["n1"].voters == {"n1"}
    assert net["n1"].log.committed == idx
    assert [e.data for e in net.applied["n1"]][-2] == b"x"


def test_second_conf_change_while_one_is_uncommitted_is_dropped():
    net = SyncNet(("n1", "n2", "n3", "n4", "n5"), voters=IDS3)
    net.elect("n1")
    net.filter = drop(MsgType.APPEND, sender="n1")
    net["n1"].propose(conf(ConfChangeType.ADD_LEARNER, "n4"), EntryType.CONF_CHANGE)
    net.deliver()
    with pytest.raises(ProposalDropped):
        net["n1"].propose(conf(ConfChangeType.ADD_LEARNER, "n5"), EntryType.CONF_CHANGE)
    net["n1"].propose(b"normal entries are fine")
    net.heal()
    settle(net, "n1")
    net["n1"].propose(conf(ConfChangeType.ADD_LEARNER, "n5"), EntryType.CONF_CHANGE)
    net.deliver()
    assert net["n1"].learners == {"n4", "n5"}


def test_new_leader_cannot_change_membership_before_its_noop_commits():
    """diss. 4.1 (the single-server change bug): until an entry of its term commits, a new
    leader may not start a membership change."""
    net = SyncNet(("n1", "n2", "n3", "n4"), voters=IDS3)
    net.filter = drop(MsgType.APPEND, sender="n1")
    net.elect("n1")
    with pytest.raises(ProposalDropped):
        net["n1"].propose(conf(ConfChangeType.ADD_LEARNER, "n4"), EntryType.CONF_CHANGE)
    net["n1"].propose(b"normal entries are fine")
    net.heal()
    settle(net, "n1")
    assert net["n1"].log.committed == net["n1"].log.last_index()
    net["n1"].propose(conf(ConfChangeType.ADD_LEARNER, "n4"), EntryType.CONF_CHANGE)
    net.deliver()
    assert net["n1"].learners == {"n4"}


def test_leader_that_removes_itself_steps_down_once_the_change_commits():
    net = SyncNet(IDS3)
    net.elect("n1")
    settle(net, "n1")
    net.filter = drop(MsgType.APPEND, sender="n1")
    idx = net["n1"].propose(conf(ConfChangeType.REMOVE, "n1"), EntryType.CONF_CHANGE)
    net.deliver()
    # Appended, so in effect, but not committed: it keeps leading (and replicating) for now.
    assert net["n1"].voters == {"n2", "n3"}
    assert net["n1"].role == Role.LEADER
    net.heal()
    settle(net, "n1")
    assert net["n1"].log.committed == idx
    assert net["n1"].role == Role.FOLLOWER
    # The others carry on without it; it never campaigns again.
    mark = len(net.log_lines)
    for _ in range(5 * E):
        net.tick_all()
    assert net.leader() in ("n2", "n3")
    assert not [ln for ln in net.log_lines[mark:] if ln.startswith("n1 became")]


# =========================================================================== restarts


def test_restart_keeps_term_vote_and_log():
    net = SyncNet(IDS3)
    net.elect("n1")
    for i in range(3):
        net.propose("n1", b"v%d" % i)
    settle(net, "n1")
    before = (net["n2"].term, net["n2"].vote, net.log_of("n2"), net["n2"].log.committed)
    assert before[1] == "n1"
    net.crash("n2")
    net.start("n2")
    after = (net["n2"].term, net["n2"].vote, net.log_of("n2"), net["n2"].log.committed)
    assert after == before
    assert net["n2"].role == Role.FOLLOWER
    # Committed entries are handed out again for the (volatile) state machine to re-apply.
    net.process("n2")
    assert [e.data for e in net.applied["n2"]] == [b"", b"v0", b"v1", b"v2"]


def test_restart_keeps_membership_from_the_log():
    net = SyncNet(("n1", "n2", "n3", "n4"), voters=IDS3)
    net.elect("n1")
    settle(net, "n1")
    net["n1"].propose(conf(ConfChangeType.ADD_LEARNER, "n4"), EntryType.CONF_CHANGE)
    net.deliver()
    net.crash("n2")
    net.start("n2")
    assert (net["n2"].voters, net["n2"].learners) == (set(IDS3), {"n4"})


def test_vote_survives_a_restart():
    net = SyncNet(IDS3)
    net["n3"].step(Message(MsgType.VOTE, "n3", "n2", 5))
    net.process("n3")
    net.take()
    net.crash("n3")
    net.start("n3")
    assert (net["n3"].term, net["n3"].vote) == (5, "n2")
    net["n3"].step(Message(MsgType.VOTE, "n3", "n1", 5))
    net.process("n3")
    assert [(m.type, m.to, m.reject) for m in net.take("n3")] == [(MsgType.VOTE_RESP, "n1", True)]


class _LoseEverything:
    """A crash rng that keeps no unsynced write."""

    def randint(self, a: int, b: int) -> int:
        return a


def test_crash_loses_only_unsynced_writes():
    net = SyncNet(IDS3)
    net.elect("n1")
    settle(net, "n1")
    synced = (net.log_of("n2"), net.disks["n2"].hard_state)
    idx = net["n1"].propose(b"x")
    net.process("n1")
    (app,) = [m for m in net.take("n1", MsgType.APPEND) if m.to == "n2"]
    n2 = net["n2"]
    n2.step(app)
    rd = n2.ready()
    assert [e.index for e in rd.entries] == [idx]
    assert [m.type for m in rd.persisted_messages] == [MsgType.APPEND_RESP]
    net.disks["n2"].append(rd.entries)  # written, never synced: the ack is never sent
    net.disks["n2"].crash(_LoseEverything())
    net.start("n2")
    assert (net.log_of("n2"), net.disks["n2"].hard_state) == synced
    assert net["n1"].progress["n2"].match < idx
    # A synced write survives the same crash.
    n2 = net["n2"]
    n2.step(app)
    rd = n2.ready()
    net.disks["n2"].append(rd.entries)
    if rd.hard_state is not None:
        net.disks["n2"].set_hard_state(rd.hard_state)
    net.disks["n2"].sync()
    net.disks["n2"].crash(_LoseEverything())
    net.start("n2")
    assert net.log_of("n2")[-1] == (idx, 1, b"x")


def test_transfer_to_self_cancels_a_pending_transfer():
    from raftsql.raft.types import ProposalDropped
    from raftsql.sim.net import SyncNet

    net = SyncNet(["n1", "n2", "n3"])
    net.elect("n1")
    net.isolate("n3")  # the target cannot catch up, so the transfer stays pending
    net.propose("n1", b"x")
    net["n1"].transfer_leadership("n3")
    with pytest.raises(ProposalDropped):
        net["n1"].propose(b"blocked")
    net["n1"].transfer_leadership("n1")
    assert net["n1"].lead_transferee is None
    assert net.propose("n1", b"accepted again") > 0


# =========================================================================== re-seeding a node


def _reseed(net: SyncNet, nid: str) -> int:
    """What `raftsql node --reseed` does to nid's durable state: the log (and the state
    machine) are gone, term and vote are kept, and the core gets a vote barrier at the old
    last index. Returns the barrier."""
    from raftsql.raft.types import HardState
    from raftsql.sim.disk import MemDisk

    old = net[nid]
    barrier, term, vote = old.log.last_index(), old.term, old.vote
    net.crash(nid)
    disk = MemDisk()
    disk.set_hard_state(HardState(term, vote, 0))
    disk.sync()
    net.disks[nid] = disk
    net.start(nid).vote_barrier = barrier
    return barrier


@pytest.mark.parametrize("barrier", [True, False])
def test_a_reseeded_node_does_not_vote_until_it_holds_what_it_acknowledged(barrier):
    """n2 alone acknowledged an entry that n1 committed; then n2 loses its log and n1 dies.
    Without the barrier, n2 votes for n3 (whose log lacks the entry), and a committed entry is
    lost. With it, n2 refuses until a leader that has the entry (n1, back) brings it up to its
    old last index; then it votes again."""
    net = SyncNet(IDS3, check_quorum=False)
    net.elect("n1")
    settle(net, "n1")
    net.isolate("n3")
    committed = net.propose("n1", b"acked by n1 and n2 only")
    assert net["n1"].log.committed == committed
    committed_term = net["n1"].log.term(committed)
    b = _reseed(net, "n2")
    if not barrier:
        net["n2"].vote_barrier = 0
    net.crash("n1")
    net.heal()
    net.tick("n3", 3 * E)
    net.deliver()
    if not barrier:
        # The failure the barrier prevents: a leader without a committed entry.
        assert net["n3"].role == Role.LEADER
        assert net["n3"].log.term(committed) != committed_term
        return
    assert net["n3"].role != Role.LEADER and net["n2"].role != Role.LEADER
    net.start("n1")
    for _ in range(10):
        net.tick_all(E)
        net.deliver()
        if net.leader() is not None:
            break
    leader = net.leader()
    assert leader == "n1"  # n3 cannot win (n1's log is newer) and n2 may not campaign
    settle(net, leader)
    assert net["n2"].log.last_index() >= b
    assert net["n2"].log.committed >= committed
    # Caught up: n2 is an ordinary voter again and can be elected.
    net["n1"].transfer_leadership("n2")
    net.deliver()
    assert net["n2"].role == Role.LEADER


# ------------------------------------------------------------------ a long fsync (take_messages)


def test_heartbeats_and_their_responses_leave_while_a_ready_is_being_persisted():
    net = SyncNet(["a", "b", "c"])
    net.elect("a")
    net.propose("a", b"x")
    a, b = net["a"], net["b"]
    # b is in the middle of a Ready (its fsync is slow) when the next heartbeat comes.
    a.propose(b"y")
    net.process("a")
    app = [m for m in net.take("a") if m.to == "b" and m.type == MsgType.APPEND][0]
    b.step(app)
    rd = b.ready()  # outstanding: entries to persist, an append ack for after the fsync
    assert rd.entries and [m.type for m in rd.persisted_messages] == [MsgType.APPEND_RESP]
    a.tick()  # the leader's heartbeat timeout: heartbeats go out though a's own Ready waits
    hb = [m for m in a.take_messages() + (a.ready().messages if a.has_ready() else [])
          if m.type == MsgType.HEARTBEAT and m.to == "b"]
    assert hb
    b.step(hb[0])
    early = b.take_messages()
    assert [m.type for m in early] == [MsgType.HEARTBEAT_RESP]  # now, not after the fsync
    assert b.take_messages() == []
    net.disks["b"].append(rd.entries)
    net.disks["b"].sync()
    b.advance(rd)
    assert not b.has_ready() or all(m.type != MsgType.HEARTBEAT_RESP for m in b.ready().persisted_messages)


def test_a_heartbeat_response_waits_for_the_fsync_when_it_carries_a_new_term():
    net = SyncNet(["a", "b", "c"])
    net.elect("a")
    b = net["b"]
    term = b.term
    hb = Message(MsgType.HEARTBEAT, "c", "b", term + 1, commit=0)
    b.step(hb)  # a higher term: b's new term is in the next Ready's hard state
    rd = b.ready()
    assert rd.hard_state is not None and rd.hard_state.term == term + 1 and rd.must_sync
    assert [m.type for m in rd.persisted_messages] == [MsgType.HEARTBEAT_RESP]
    assert not any(m.type == MsgType.HEARTBEAT_RESP for m in rd.messages)
    b.step(Message(MsgType.HEARTBEAT, "c", "b", term + 1, commit=0))
    assert b.take_messages() == []  # term + 1 is not durable yet: after the fsync
    net.disks["b"].set_hard_state(rd.hard_state)
    net.disks["b"].sync()
    b.advance(rd)
    b.step(Message(MsgType.HEARTBEAT, "c", "b", term + 1, commit=0))
    rd2 = b.ready()
    assert [m.type for m in rd2.persisted_messages] == [MsgType.HEARTBEAT_RESP]  # the one before
    assert [m.type for m in rd2.messages] == [MsgType.HEARTBEAT_RESP]  # durable now: early

"""Tests named after the rules of the Raft paper (§ = extended paper, "diss." = Ongaro's
dissertation), in the style of etcd's raft_paper_test.go.

Most tests drive one core by hand: build it in a given state, step the exact messages a peer
would send, and look at what the next Ready asks for. Multi-node rules use SyncNet.
"""

from __future__ import annotations

import random

import pytest

from raftsql.raft.core import Config, Raft
from raftsql.raft.types import (
    Entry,
    EntryType,
    HardState,
    Message,
    MsgType,
    NotLeader,
    ReadState,
    Ready,
    Role,
)
from raftsql.sim.net import SyncNet

IDS3 = ("n1", "n2", "n3")
E = 10  # election_ticks used throughout


# --------------------------------------------------------------------------- helpers


def new_raft(
    nid: str = "n1",
    voters: tuple[str, ...] = IDS3,
    *,
    seed: int = 0,
    log: tuple[int, ...] = (),
    term: int = 0,
    vote: str | None = None,
    commit: int = 0,
    **cfg,
) -> Raft:
    """A core restarted from the given durable state; `log` lists the entries' terms."""
    cfg.setdefault("election_ticks", E)
    config = Config(id=nid, voters=tuple(voters), **cfg)
    entries = [Entry(t, i + 1) for i, t in enumerate(log)]
    return Raft(config, random.Random(seed), HardState(term, vote, commit), None, entries)


def msg(mtype: MsgType, frm: str, to: str, term: int, **kw) -> Message:
    return Message(mtype, to, frm, term, **kw)


def ready(r: Raft) -> Ready:
    """Take one Ready and acknowledge it (as if persisted, sent and applied)."""
    rd = r.ready()
    r.advance(rd)
    return rd


def drain(r: Raft) -> list[Message]:
    """Carry out every pending Ready; return all the messages they asked to send."""
    out: list[Message] = []
    while r.has_ready():
        rd = ready(r)
        out += rd.messages + rd.persisted_messages
    return out


def of_type(msgs: list[Message], mtype: MsgType) -> list[Message]:
    return [m for m in msgs if m.type == mtype]


def peers(r: Raft) -> list[str]:
    return sorted(r.voters - {r.id})


def make_candidate(r: Raft) -> None:
    """Make r a (real) candidate: a granted pre-vote round first if PreVote is on."""
    r.campaign()
    if r.role == Role.PRE_CANDIDATE:
        for p in peers(r):
            if r.role == Role.PRE_CANDIDATE:
                r.step(msg(MsgType.PRE_VOTE_RESP, p, r.id, r.term + 1))
    assert r.role in (Role.CANDIDATE, Role.LEADER)


def make_leader(r: Raft) -> list[Message]:
    """Elect r with granted votes; persist its no-op; return the messages it sent."""
    make_candidate(r)
    for p in peers(r):
        if r.role == Role.CANDIDATE:
            r.step(msg(MsgType.VOTE_RESP, p, r.id, r.term))
    assert r.role == Role.LEADER
    return drain(r)


def make_replicating_leader(r: Raft) -> None:
    """A leader whose followers all acknowledged its no-op (every Progress in replicate)."""
    make_leader(r)
    last = r.log.last_index()
    for p in peers(r):
        r.step(msg(MsgType.APPEND_RESP, p, r.id, r.term, index=last))
    drain(r)
    assert r.log.committed == last


def ticks_until_campaign(r: Raft, limit: int = 100) -> int:
    for n in range(1, limit + 1):
        r.tick()
        if r.role != Role.FOLLOWER:
            return n
    raise AssertionError("never campaigned")


def terms(r: Raft) -> list[int]:
    return [e.term for e in r.log.entries]


# =========================================================================== §5.1 terms


def test_start_as_follower():
    r = new_raft()
    assert (r.role, r.term, r.vote, r.leader) == (Role.FOLLOWER, 0, None, None)


def test_restart_as_follower_with_persisted_term_and_vote():
    r = new_raft(log=(1, 2), term=3, vote="n2", commit=1)
    assert (r.role, r.term, r.vote, r.leader) == (Role.FOLLOWER, 3, "n2", None)
    assert terms(r) == [1, 2] and r.log.committed == 1


def _in_role(role: Role) -> Raft:
    """A node at term 1 with a vote cast in term 1, in the given role."""
    if role == Role.FOLLOWER:
        r = new_raft(term=1, vote="n3")
    elif role == Role.CANDIDATE:
        r = new_raft(pre_vote=False)
        make_candidate(r)
    elif role == Role.PRE_CANDIDATE:
        r = new_raft(term=1, vote="n3")
        r.campaign()
    else:
        r = new_raft(pre_vote=False)
        make_leader(r)
    drain(r)
    assert r.role == role and r.term == 1 and r.vote is not None
    return r


@pytest.mark.parametrize("role", [Role.FOLLOWER, Role.PRE_CANDIDATE, Role.CANDIDATE, Role.LEADER])
def test_update_term_from_append_of_higher_term(role):
    """§5.1: if a message carries a higher term, adopt it and revert to follower; the vote
    belonged to the old term and is cleared. An AppendEntries names the new leader."""
    r = _in_role(role)
    r.step(msg(MsgType.APPEND, "n2", "n1", 2, index=0, log_term=0))
    assert (r.role, r.term, r.vote, r.leader) == (Role.FOLLOWER, 2, None, "n2")
    rd = ready(r)
    assert rd.hard_state is not None and (rd.hard_state.term, rd.hard_state.vote) == (2, None)


@pytest.mark.parametrize("role", [Role.FOLLOWER, Role.PRE_CANDIDATE, Role.CANDIDATE, Role.LEADER])
def test_update_term_from_response_of_higher_term(role):
    """§5.1 for a message that names no leader (a vote rejection from a later term)."""
    r = _in_role(role)
    r.step(msg(MsgType.VOTE_RESP, "n2", "n1", 5, reject=True))
    assert (r.role, r.term, r.vote, r.leader) == (Role.FOLLOWER, 5, None, None)


def test_follower_update_term_from_vote_request():
    """A vote request of a higher term moves an unleaded follower to that term, and its vote
    from the old term does not stop it from voting in the new one."""
    r = new_raft(term=1, vote="n3")
    r.step(msg(MsgType.VOTE, "n2", "n1", 2, index=0, log_term=0))
    assert (r.term, r.vote) == (2, "n2")
    resp = of_type(drain(r), MsgType.VOTE_RESP)
    assert [(m.to, m.term, m.reject) for m in resp] == [("n2", 2, False)]


@pytest.mark.parametrize(
    "mtype", [MsgType.APPEND, MsgType.HEARTBEAT, MsgType.VOTE, MsgType.PRE_VOTE, MsgType.VOTE_RESP]
)
def test_reject_stale_term_message(mtype):
    """§5.1: a request with a stale term is rejected: nothing about the receiver changes."""
    r = new_raft(log=(1,), term=2)
    stale = msg(
        mtype, "n2", "n1", 1, index=1, log_term=1, commit=1,
        entries=(Entry(1, 2, EntryType.NORMAL, b"stale"),),
    )
    r.step(stale)
    assert (r.role, r.term, r.vote, r.leader) == (Role.FOLLOWER, 2, None, None)
    assert terms(r) == [1] and r.log.committed == 0
    out = drain(r)
    # Nothing is granted or acknowledged to the stale sender.
    assert not [m for m in out if m.type in (MsgType.VOTE_RESP, MsgType.HEARTBEAT_RESP)]
    assert all(m.reject or m.term == 2 for m in out)
    assert not [m for m in out if m.type == MsgType.APPEND_RESP and m.index > 0]


@pytest.mark.parametrize("mtype", [MsgType.APPEND, MsgType.HEARTBEAT])
def test_stale_leader_gets_current_term_back(mtype):
    """A deposed leader's append/heartbeat is answered with our term (so it learns it is stale)."""
    r = new_raft(log=(1,), term=2)
    r.step(msg(mtype, "n2", "n1", 1, index=1, log_term=1))
    out = drain(r)
    assert [(m.type, m.to, m.term) for m in out] == [(MsgType.APPEND_RESP, "n2", 2)]


def test_stale_leader_steps_down_on_answer_with_higher_term():
    leader = new_raft("n1", pre_vote=False)
    make_replicating_leader(leader)
    assert leader.term == 1
    newer = new_raft("n2", log=(1,), term=2)  # has moved on to term 2 meanwhile
    leader.tick()
    hb = [m for m in drain(leader) if m.type == MsgType.HEARTBEAT and m.to == "n2"]
    assert len(hb) == 1
    newer.step(hb[0])
    (answer,) = drain(newer)
    leader.step(answer)
    assert (leader.role, leader.term, leader.leader) == (Role.FOLLOWER, 2, None)


# =========================================================================== §5.2 elections


def test_follower_refuses_proposals_and_names_the_leader():
    r = new_raft(log=(1,), term=1)
    with pytest.raises(NotLeader) as err:
        r.propose(b"x")
    assert err.value.leader is None
    r.step(msg(MsgType.HEARTBEAT, "n2", "n1", 1))
    with pytest.raises(NotLeader) as err:
        r.propose(b"x")
    assert err.value.leader == "n2"
    assert terms(r) == [1]


def test_leader_bcast_beat():
    """§5.2: the leader sends heartbeats to all followers every heartbeat_ticks."""
    r = new_raft(pre_vote=False, heartbeat_ticks=3)
    make_replicating_leader(r)
    for _ in range(2):
        r.tick()
        assert of_type(drain(r), MsgType.HEARTBEAT) == []
    r.tick()
    hbs = of_type(drain(r), MsgType.HEARTBEAT)
    assert sorted(m.to for m in hbs) == ["n2", "n3"]
    assert all(m.term == 1 and m.commit == r.log.committed for m in hbs)
    for _ in range(3):
        r.tick()
    assert len(of_type(drain(r), MsgType.HEARTBEAT)) == 2


def test_heartbeat_commit_is_capped_by_the_follower_match():
    """A heartbeat carries min(commit, follower's match): a follower must never be told to commit
    past what the leader knows it holds (its log may end in a stale suffix)."""
    r = new_raft(pre_vote=False)
    make_leader(r)
    r.step(msg(MsgType.APPEND_RESP, "n2", "n1", 1, index=1))
    drain(r)
    idx = r.propose(b"x")
    drain(r)
    r.step(msg(MsgType.APPEND_RESP, "n2", "n1", 1, index=idx))
    drain(r)
    assert r.log.committed == idx
    r.tick()
    hbs = {m.to: m.commit for m in of_type(drain(r), MsgType.HEARTBEAT)}
    assert hbs == {"n2": idx, "n3": 0}


@pytest.mark.parametrize("role", [Role.FOLLOWER, Role.CANDIDATE])
def test_nonleader_start_election(role):
    """§5.2: on election timeout a follower (or a candidate whose election timed out) increments
    its term, votes for itself and asks every other server for its vote, persisting term and
    vote before the requests go out."""
    r = new_raft(log=(1,), term=1, pre_vote=False)
    if role == Role.CANDIDATE:
        r.campaign()
        drain(r)
        assert (r.role, r.term) == (Role.CANDIDATE, 2)
    term = r.term
    for _ in range(r.randomized_timeout - 1):
        r.tick()
    assert r.term == term
    r.tick()
    assert (r.role, r.term, r.vote) == (Role.CANDIDATE, term + 1, "n1")
    rd = ready(r)
    assert rd.hard_state == HardState(term + 1, "n1", 0)
    assert rd.messages == []  # a candidate's requests depend on the persisted vote
    reqs = sorted(rd.persisted_messages, key=lambda m: m.to)
    assert [(m.type, m.to, m.term, m.index, m.log_term) for m in reqs] == [
        (MsgType.VOTE, "n2", term + 1, 1, 1),
        (MsgType.VOTE, "n3", term + 1, 1, 1),
    ]


def test_election_timeout_is_randomized_from_the_injected_rng():
    """§5.2: each node draws its election timeout from [election_ticks, 2 * election_ticks)
    with the injected rng only: different seeds spread out, the same seed repeats exactly,
    and the global random module plays no part."""
    drawn = {}
    for seed in range(40):
        random.seed(seed * 7919)  # must not matter
        n = ticks_until_campaign(new_raft(seed=seed, pre_vote=False))
        assert E <= n < 2 * E
        drawn[seed] = n
    assert len(set(drawn.values())) >= 5
    random.seed(12345)
    assert [ticks_until_campaign(new_raft(seed=s, pre_vote=False)) for s in range(40)] == list(
        drawn.values()
    )


def test_election_timeout_is_redrawn_for_each_election():
    r = new_raft(seed=3, pre_vote=False)
    seen = set()
    for _ in range(20):
        seen.add(ticks_until_campaign(r))
        r.step(msg(MsgType.HEARTBEAT, "n2", "n1", r.term))  # a leader appears: back to follower
        drain(r)
    assert all(E <= n < 2 * E for n in seen)
    assert len(seen) > 1


@pytest.mark.parametrize(
    "size,votes,want",
    [
        (1, {}, Role.LEADER),
        (3, {"n2": True}, Role.LEADER),
        (3, {"n2": True, "n3": True}, Role.LEADER),
        (3, {"n2": False}, Role.CANDIDATE),
        (3, {"n2": False, "n3": False}, Role.FOLLOWER),
        (5, {"n2": True, "n3": True}, Role.LEADER),
        (5, {"n2": True}, Role.CANDIDATE),
        (5, {"n2": True, "n3": False, "n4": False}, Role.CANDIDATE),
        (5, {"n2": False, "n3": False, "n4": False}, Role.FOLLOWER),
        (5, {"n2": True, "n3": False, "n4": False, "n5": False}, Role.FOLLOWER),
    ],
)
def test_leader_election_in_one_round_rpc(size, votes, want):
    """§5.2: a candidate wins with votes from a majority (itself included), returns to follower
    once a majority rejected it, and otherwise keeps waiting."""
    ids = tuple(f"n{i}" for i in range(1, size + 1))
    r = new_raft(voters=ids, pre_vote=False)
    r.campaign()
    for frm, granted in votes.items():
        r.step(msg(MsgType.VOTE_RESP, frm, "n1", 1, reject=not granted))
    assert (r.role, r.term) == (want, 1)


@pytest.mark.parametrize(
    "voted,candidate,granted",
    [
        (None, "n2", True),
        (None, "n3", True),
        ("n2", "n2", True),  # a repeated request (its answer was lost) is granted again
        ("n3", "n3", True),
        ("n2", "n3", False),
        ("n3", "n2", False),
    ],
)
def test_follower_vote(voted, candidate, granted):
    """§5.2: each server votes for at most one candidate in a term, first come first served."""
    r = new_raft(term=1, vote=voted)
    r.step(msg(MsgType.VOTE, candidate, "n1", 1, index=0, log_term=0))
    (resp,) = drain(r)
    assert (resp.type, resp.to, resp.term, resp.reject) == (MsgType.VOTE_RESP, candidate, 1, not granted)
    assert r.vote == (candidate if granted else voted)


def test_vote_is_persisted_before_it_is_sent():
    """§5.2/Figure 2: the vote is durable before the candidate hears of it: VOTE_RESP travels in
    persisted_messages, in the same Ready whose hard_state carries the vote."""
    r = new_raft(log=(1,), term=1)
    r.step(msg(MsgType.VOTE, "n2", "n1", 2, index=1, log_term=1))
    rd = ready(r)
    assert rd.hard_state == HardState(2, "n2", 0)
    assert [m.type for m in rd.messages] == []
    assert [(m.type, m.to, m.reject) for m in rd.persisted_messages] == [(MsgType.VOTE_RESP, "n2", False)]
    # ... and it holds: a second candidate in the same term is refused.
    r.step(msg(MsgType.VOTE, "n3", "n1", 2, index=1, log_term=1))
    assert [m.reject for m in drain(r)] == [True]


@pytest.mark.parametrize("mtype", [MsgType.APPEND, MsgType.HEARTBEAT])
@pytest.mark.parametrize("term", [1, 2])
def test_candidate_fallback(mtype, term):
    """§5.2: a candidate that receives AppendEntries from a leader whose term is at least its
    own recognizes that leader and returns to follower."""
    r = new_raft(pre_vote=False)
    r.campaign()
    assert (r.role, r.term) == (Role.CANDIDATE, 1)
    r.step(msg(mtype, "n2", "n1", term, index=0, log_term=0))
    assert (r.role, r.term, r.leader) == (Role.FOLLOWER, term, "n2")


def test_candidate_ignores_append_of_older_term():
    r = new_raft(pre_vote=False, term=2)
    r.campaign()
    r.step(msg(MsgType.APPEND, "n2", "n1", 2, index=0, log_term=0))
    assert (r.role, r.term) == (Role.CANDIDATE, 3)


def test_leader_appends_noop_at_election():
    """§8: a new leader appends a no-op of its term at once and sends it to every follower."""
    r = new_raft(log=(1, 1), term=1, pre_vote=False)
    out = make_leader(r)
    assert r.term == 2
    assert r.log.entries[-1] == Entry(2, 3, EntryType.NORMAL, b"")
    apps = sorted(of_type(out, MsgType.APPEND), key=lambda m: m.to)
    assert [(m.to, m.index, m.log_term, m.entries) for m in apps] == [
        (p, 2, 1, (Entry(2, 3, EntryType.NORMAL, b""),)) for p in ("n2", "n3")
    ]


# =========================================================================== §5.3 replication


def test_leader_start_replication():
    """§5.3: the leader appends the command to its log and sends AppendEntries with the previous
    index and term; these may leave before the leader's own write (diss. 10.2.1)."""
    r = new_raft(pre_vote=False)
    make_replicating_leader(r)
    li = r.log.last_index()
    idx = r.propose(b"x")
    assert idx == li + 1
    rd = ready(r)
    assert rd.entries == [Entry(1, idx, EntryType.NORMAL, b"x")]
    apps = sorted(of_type(rd.messages, MsgType.APPEND), key=lambda m: m.to)
    assert [(m.to, m.index, m.log_term, m.commit, m.entries) for m in apps] == [
        (p, li, 1, li, (Entry(1, idx, EntryType.NORMAL, b"x"),)) for p in ("n2", "n3")
    ]
    assert of_type(rd.persisted_messages, MsgType.APPEND) == []


def test_leader_commit_entry():
    """§5.3: an entry is committed once the leader replicated it on a majority; the leader then
    applies it and tells followers the new commit index in its next appends. Eagerly (the
    paper, etcd): empty appends at once."""
    r = new_raft(pre_vote=False, lazy_commit=False)
    make_replicating_leader(r)
    idx = r.propose(b"x")
    drain(r)
    assert r.log.committed == idx - 1
    r.step(msg(MsgType.APPEND_RESP, "n2", "n1", 1, index=idx))
    rd = ready(r)
    assert r.log.committed == idx
    assert [e.data for e in rd.committed_entries] == [b"x"]
    assert {m.to: m.commit for m in of_type(rd.messages, MsgType.APPEND)} == {"n2": idx, "n3": idx}


def test_lazy_commit_rides_on_the_next_append_or_tick():
    """lazy_commit (the default): no empty appends when the commit index advances; the next
    proposal's appends carry it, and without one the next tick sends it."""
    r = new_raft(pre_vote=False)
    make_replicating_leader(r)
    idx = r.propose(b"x")
    drain(r)
    r.step(msg(MsgType.APPEND_RESP, "n2", "n1", 1, index=idx))
    rd = ready(r)
    assert r.log.committed == idx
    assert [e.data for e in rd.committed_entries] == [b"x"]
    assert of_type(rd.messages, MsgType.APPEND) == []
    nxt = r.propose(b"y")
    rd = ready(r)
    apps = of_type(rd.messages, MsgType.APPEND)
    assert {m.to: (m.commit, [e.index for e in m.entries]) for m in apps} == {
        "n2": (idx, [nxt]), "n3": (idx, [nxt])}
    # Without a proposal: the tick sends it (n3 never acknowledged: it gets the entries again).
    r.step(msg(MsgType.APPEND_RESP, "n2", "n1", 1, index=nxt))
    rd = ready(r)
    assert r.log.committed == nxt and of_type(rd.messages, MsgType.APPEND) == []
    r.tick()
    rd = ready(r)
    assert {m.to: m.commit for m in of_type(rd.messages, MsgType.APPEND)} == {"n2": nxt, "n3": nxt}


@pytest.mark.parametrize(
    "size,acks,committed",
    [
        (1, set(), True),
        (3, set(), False),
        (3, {"n2"}, True),
        (3, {"n2", "n3"}, True),
        (5, set(), False),
        (5, {"n2"}, False),
        (5, {"n2", "n3"}, True),
        (5, {"n2", "n3", "n4"}, True),
    ],
)
def test_leader_acknowledged_commit(size, acks, committed):
    ids = tuple(f"n{i}" for i in range(1, size + 1))
    r = new_raft(voters=ids, pre_vote=False)
    make_leader(r)
    if size > 1:
        for p in ids[1:]:
            r.step(msg(MsgType.APPEND_RESP, p, "n1", 1, index=1))
        drain(r)
    idx = r.propose(b"x")
    drain(r)
    for p in sorted(acks):
        r.step(msg(MsgType.APPEND_RESP, p, "n1", 1, index=idx))
    drain(r)
    assert (r.log.committed == idx) is committed


def test_leader_commit_preceding_entries():
    """§5.3: committing an entry also commits all preceding entries, including those of earlier
    leaders (once the leader's own entry reaches a majority)."""
    r = new_raft(log=(1, 2, 2), term=2, pre_vote=False)
    make_leader(r)
    assert r.term == 3
    r.step(msg(MsgType.APPEND_RESP, "n2", "n1", 3, index=4))
    rd = ready(r)
    assert r.log.committed == 4
    assert [(e.index, e.term) for e in rd.committed_entries] == [(1, 1), (2, 2), (3, 2), (4, 3)]


def test_follower_commit_entry():
    """§5.3: once a follower learns an entry is committed, it applies it (in log order)."""
    r = new_raft(term=1)
    ents = (Entry(1, 1, EntryType.NORMAL, b"a"), Entry(1, 2, EntryType.NORMAL, b"b"))
    r.step(msg(MsgType.APPEND, "n2", "n1", 1, index=0, log_term=0, entries=ents, commit=1))
    rd = ready(r)
    assert r.log.committed == 1
    assert rd.committed_entries == [ents[0]]
    assert rd.hard_state == HardState(1, None, 1)
    r.step(msg(MsgType.APPEND, "n2", "n1", 1, index=2, log_term=1, commit=2))
    assert ready(r).committed_entries == [ents[1]]


def test_follower_commit_is_capped_by_what_the_append_proved():
    """The follower commits min(leader commit, last new entry): entries after the append may be
    a stale suffix that the leader has not checked yet."""
    r = new_raft(log=(1, 1, 1), term=2)
    r.step(msg(MsgType.APPEND, "n2", "n1", 2, index=1, log_term=1, commit=3))
    assert r.log.committed == 1


def test_follower_answers_append_below_its_commit_with_its_commit():
    """Committed entries match every later leader's log (§5.4): an old, delayed append below the
    commit index changes nothing and is answered with the commit index."""
    r = new_raft(log=(1, 1, 1), term=1, commit=3)
    r.step(msg(MsgType.APPEND, "n2", "n1", 1, index=1, log_term=1, entries=(Entry(1, 2),)))
    (resp,) = drain(r)
    assert (resp.reject, resp.index) == (False, 3)
    assert terms(r) == [1, 1, 1]


@pytest.mark.parametrize(
    "prev_index,prev_term,accepted",
    [
        (0, 0, True),
        (1, 1, True),
        (2, 2, True),
        (1, 2, False),  # term mismatch at prev_index
        (2, 1, False),
        (3, 2, False),  # prev_index beyond our log
        (3, 3, False),
    ],
)
def test_follower_check_append(prev_index, prev_term, accepted):
    """§5.3 consistency check: a follower refuses new entries unless its log holds an entry at
    prev_log_index whose term is prev_log_term."""
    r = new_raft(log=(1, 2), term=3)
    new = (Entry(3, prev_index + 1, EntryType.NORMAL, b"n"),)
    r.step(msg(MsgType.APPEND, "n2", "n1", 3, index=prev_index, log_term=prev_term, entries=new))
    (resp,) = drain(r)
    assert resp.type == MsgType.APPEND_RESP and resp.reject is (not accepted)
    if accepted:
        assert resp.index == prev_index + 1
        assert r.log.entry(prev_index + 1) == new[0]
    else:
        assert resp.index == prev_index
        assert terms(r) == [1, 2]


@pytest.mark.parametrize(
    "prev_index,prev_term,ents,want",
    [
        (2, 2, [3], [1, 2, 3]),
        (1, 1, [3, 4], [1, 3, 4]),  # conflict at 2: delete it and all that follow
        (0, 0, [1], [1, 2]),  # already present: nothing is truncated
        (0, 0, [1, 2], [1, 2]),
        (0, 0, [3], [3]),
        (2, 2, [], [1, 2]),  # heartbeat-like append changes nothing
    ],
)
def test_follower_append_entries(prev_index, prev_term, ents, want):
    """§5.3: if an existing entry conflicts with a new one (same index, different term), delete
    it and all that follow; append any new entries not already in the log."""
    r = new_raft(log=(1, 2), term=3)
    entries = tuple(Entry(t, prev_index + 1 + i) for i, t in enumerate(ents))
    r.step(msg(MsgType.APPEND, "n2", "n1", 3, index=prev_index, log_term=prev_term, entries=entries))
    assert terms(r) == want
    rd = ready(r)
    # Only the new suffix is handed out for persisting; the store truncates from its first index.
    new = [e for e in entries if e.index > 2 or e.term != [1, 2][e.index - 1]]
    assert rd.entries == new


@pytest.mark.parametrize(
    "prev_index,prev_term,hint,conflict_term",
    [
        (5, 3, 3, 2),  # term 2 at 5 conflicts: its run starts at 3
        (4, 3, 3, 2),
        (2, 2, 1, 1),  # term 1 at 2 conflicts: its run starts at 1
        (7, 3, 6, 0),  # we are shorter: our last index + 1, no term
        (6, 2, 6, 0),
    ],
)
def test_follower_rejection_carries_conflict_term_and_its_first_index(
    prev_index, prev_term, hint, conflict_term
):
    """§5.3 (end), fast backtracking: a rejection names the conflicting term and the first index
    we hold of it, or our last index + 1 when our log is simply shorter."""
    r = new_raft(log=(1, 1, 2, 2, 2), term=3)
    r.step(msg(MsgType.APPEND, "n2", "n1", 3, index=prev_index, log_term=prev_term))
    (resp,) = drain(r)
    assert (resp.reject, resp.index, resp.reject_hint, resp.log_term) == (
        True, prev_index, hint, conflict_term,
    )


@pytest.mark.parametrize(
    "hint,conflict_term,want_next",
    [
        (3, 2, 5),  # leader has term 2 up to index 4: resume right after it
        (3, 3, 3),  # leader has no entry of term 3: jump to the follower's first index of it
        (4, 0, 4),  # follower shorter: its last index + 1
        (1, 1, 2),  # follower holds term 1 from index 1: the leader's term 1 ends at 1
    ],
)
def test_leader_jumps_next_index_from_rejection(hint, conflict_term, want_next):
    """The leader moves next_index in one step: after its own last entry of the conflicting term
    if it has that term, else to the follower's hint."""
    # Leader log terms: 1, 2, 2, 2, 4, 4 (+ its no-op of term 5 at 7).
    r = new_raft(log=(1, 2, 2, 2, 4, 4), term=4, pre_vote=False)
    make_leader(r)
    assert r.term == 5 and r.log.last_index() == 7
    # Its first probe to n2 was at prev_index 6; n2 rejects it.
    r.step(msg(MsgType.APPEND_RESP, "n2", "n1", 5, index=6, reject=True,
               reject_hint=hint, log_term=conflict_term))
    probes = [m for m in of_type(drain(r), MsgType.APPEND) if m.to == "n2"]
    assert len(probes) == 1
    assert probes[0].index == want_next - 1
    assert probes[0].log_term == r.log.term(want_next - 1)


def _preload(net: SyncNet, nid: str, log_terms: list[int], term: int, commit: int = 0) -> None:
    """Restart nid from a disk that holds exactly this log and hard state."""
    disk = net.disks[nid]
    disk.entries = [Entry(t, i + 1, EntryType.NORMAL, b"%d@%d" % (i + 1, t)) for i, t in enumerate(log_terms)]
    disk.hard_state = HardState(term, None, commit)
    net.start(nid)


@pytest.mark.parametrize(
    "follower_log,max_rejects",
    [
        ([1] + [2] * 60, 1),  # a long suffix of a term the leader never had
        ([1], 1),  # a much shorter log
        ([1] + [3] * 30 + [2] * 30, 2),  # it has our term 3 prefix, then a divergent term 2 run
    ],
)
def test_fast_backtracking_needs_few_round_trips(follower_log, max_rejects):
    """§5.3: with the conflict term and its first index, the leader skips a whole term per round
    trip instead of one entry, so a 60-entry divergence costs at most a couple of rejections."""
    net = SyncNet(IDS3, pre_vote=False)
    leader_log = [1] + [3] * 60
    _preload(net, "n1", leader_log, term=3)
    _preload(net, "n2", follower_log, term=3)
    _preload(net, "n3", leader_log, term=3)
    rejections = []
    net.filter = lambda m: not (m.type == MsgType.APPEND_RESP and m.reject and rejections.append(m))
    net.elect("n1")
    assert len(rejections) <= max_rejects, rejections
    assert net.log_of("n2") == net.log_of("n1")
    assert [t for _, t, _ in net.log_of("n2")] == leader_log + [4]


@pytest.mark.parametrize(
    "follower_log",
    [
        [1, 1, 1, 4, 4, 5, 5, 6, 6],  # (a) of Figure 7: missing entries
        [1, 1, 1, 4],  # (b)
        [1, 1, 1, 4, 4, 5, 5, 6, 6, 6, 6],  # (c) extra entries of the leader's terms
        [1, 1, 1, 4, 4, 5, 5, 6, 6, 6, 7, 7],  # (d) extra uncommitted entries of term 7
        [1, 1, 1, 4, 4, 4, 4],  # (e)
        [1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3],  # (f)
    ],
)
def test_leader_sync_follower_log(follower_log):
    """§5.3 / Figure 7: whatever the follower's log, the leader makes it identical to its own."""
    net = SyncNet(IDS3, pre_vote=False)
    leader_log = [1, 1, 1, 4, 4, 5, 5, 6, 6, 6]
    _preload(net, "n1", leader_log, term=8)
    _preload(net, "n2", follower_log, term=8)
    _preload(net, "n3", leader_log, term=8)  # votes for n1 with n1 (always up to date)
    net.elect("n1")
    net.tick("n1")
    net.deliver()
    assert net.log_of("n2") == net.log_of("n1")
    assert net["n2"].log.committed == net["n1"].log.committed == len(leader_log) + 1


def test_commit_index_propagates_to_followers():
    """§5.3: the leader includes its commit index in appends and heartbeats; followers apply
    every committed entry, in order."""
    net = SyncNet(IDS3)
    net.elect("n1")
    for i in range(3):
        net.propose("n1", b"v%d" % i)
    net.tick("n1")
    net.deliver()
    last = net["n1"].log.last_index()
    assert net["n1"].log.committed == last
    for nid in IDS3:
        assert net[nid].log.committed == last
        assert [e.data for e in net.applied[nid]] == [b"", b"v0", b"v1", b"v2"]


def test_proposals_between_two_readies_share_one_append():
    """Batching: every proposal made since the last ready() goes out in ONE append per follower."""
    r = new_raft(pre_vote=False)
    make_replicating_leader(r)
    idxs = [r.propose(b"p%d" % i) for i in range(5)]
    rd = ready(r)
    apps = of_type(rd.messages, MsgType.APPEND)
    assert sorted(m.to for m in apps) == ["n2", "n3"]
    for m in apps:
        assert [e.index for e in m.entries] == idxs
    assert [e.index for e in rd.entries] == idxs


def test_max_append_bytes_caps_an_append():
    """Each append stops before exceeding max_append_bytes; the rest follow as acks arrive.
    (Eager commit: an ack that commits sends one append per follower, the commit's; lazily,
    the leader pipelines the rest at once, each append still under the cap.)"""
    size = Entry(1, 1, EntryType.NORMAL, b"dddd").size()  # 20
    r = new_raft(pre_vote=False, max_append_bytes=3 * size, lazy_commit=False)
    make_replicating_leader(r)
    for _ in range(7):
        r.propose(b"dddd")
    rd = ready(r)
    first = {m.to: m for m in of_type(rd.messages, MsgType.APPEND)}
    assert [e.index for e in first["n2"].entries] == [2, 3, 4]
    sent, pending = [], [first["n2"]]
    while pending:
        (m,) = pending
        sent.append([e.index for e in m.entries])
        assert sum(e.size() for e in m.entries) <= 3 * size
        r.step(msg(MsgType.APPEND_RESP, "n2", "n1", 1, index=m.entries[-1].index))
        pending = [x for x in of_type(drain(r), MsgType.APPEND) if x.to == "n2" and x.entries]
    assert sent == [[2, 3, 4], [5, 6, 7], [8]]
    r = new_raft(pre_vote=False, max_append_bytes=3 * size)
    make_replicating_leader(r)
    for _ in range(7):
        r.propose(b"dddd")
    rd = ready(r)
    first = [m for m in of_type(rd.messages, MsgType.APPEND) if m.to == "n2"]
    assert [[e.index for e in m.entries] for m in first] == [[2, 3, 4]]
    r.step(msg(MsgType.APPEND_RESP, "n2", "n1", 1, index=4))
    rest = [m for m in of_type(drain(r), MsgType.APPEND) if m.to == "n2" and m.entries]
    assert [[e.index for e in m.entries] for m in rest] == [[5, 6, 7], [8]]


def test_append_carries_one_entry_even_if_larger_than_the_cap():
    r = new_raft(pre_vote=False, max_append_bytes=1)
    make_replicating_leader(r)
    r.propose(b"x" * 100)
    r.propose(b"y")
    apps = of_type(ready(r).messages, MsgType.APPEND)
    assert [len(m.entries) for m in apps] == [1, 1]
    assert apps[0].entries[0].data == b"x" * 100


def test_max_inflight_caps_unanswered_appends():
    """Flow control: in replicate state at most max_inflight appends are unanswered per follower;
    each acknowledgement frees room for the next."""
    r = new_raft(pre_vote=False, max_inflight=2, max_append_bytes=1)
    make_replicating_leader(r)
    sent = []
    for i in range(4):
        r.propose(b"%d" % i)
        sent.append([m for m in of_type(drain(r), MsgType.APPEND) if m.to == "n2"])
    assert [len(s) for s in sent] == [1, 1, 0, 0]
    first = sent[0][0]
    r.step(msg(MsgType.APPEND_RESP, "n2", "n1", 1, index=first.entries[-1].index))
    more = [m for m in of_type(drain(r), MsgType.APPEND) if m.to == "n2"]
    assert [[e.index for e in m.entries] for m in more] == [[4]]


def test_probe_sends_one_append_until_answered():
    """A follower in probe state (just after election) gets one append per round trip."""
    r = new_raft(pre_vote=False)
    make_leader(r)
    r.propose(b"a")
    r.propose(b"b")
    assert [m for m in of_type(drain(r), MsgType.APPEND) if m.to == "n2"] == []
    r.step(msg(MsgType.APPEND_RESP, "n2", "n1", 1, index=1))
    apps = [m for m in of_type(drain(r), MsgType.APPEND) if m.to == "n2"]
    assert [[e.index for e in m.entries] for m in apps] == [[2, 3]]


# =========================================================================== §5.4 safety


@pytest.mark.parametrize(
    "cand_index,cand_term,granted",
    [
        # our log ends at (index 2, term 2)
        (2, 2, True),  # same last term, same length
        (3, 2, True),  # same last term, longer
        (1, 2, False),  # same last term, shorter
        (1, 3, True),  # newer last term wins whatever the length
        (5, 1, False),  # older last term loses whatever the length
        (2, 1, False),
    ],
)
def test_voter_election_restriction(cand_index, cand_term, granted):
    """§5.4.1: grant a vote only to a candidate whose log is at least as up to date as ours:
    compare last terms, then lengths."""
    r = new_raft(log=(1, 2), term=3)
    r.step(msg(MsgType.VOTE, "n2", "n1", 4, index=cand_index, log_term=cand_term))
    (resp,) = drain(r)
    assert (resp.type, resp.reject) == (MsgType.VOTE_RESP, not granted)
    assert r.vote == ("n2" if granted else None)


def test_pre_vote_obeys_election_restriction():
    r = new_raft(log=(1, 2), term=3)
    r.step(msg(MsgType.PRE_VOTE, "n2", "n1", 4, index=5, log_term=1))
    (resp,) = drain(r)
    assert (resp.type, resp.reject) == (MsgType.PRE_VOTE_RESP, True)


def test_leader_commits_only_entries_of_its_term_by_counting():
    """§5.4.2: a leader never commits an entry from a previous term by counting replicas; only
    once an entry of its own term is on a majority are the earlier ones committed with it."""
    r = new_raft(log=(1, 2), term=2, pre_vote=False)
    make_leader(r)
    assert r.term == 3 and r.log.last_index() == 3  # its no-op of term 3 at index 3
    for p in ("n2", "n3"):
        r.step(msg(MsgType.APPEND_RESP, p, "n1", 3, index=2))  # both hold index 2 of term 2
    rd = ready(r)
    assert r.log.committed == 0 and rd.committed_entries == []
    r.step(msg(MsgType.APPEND_RESP, "n2", "n1", 3, index=3))
    rd = ready(r)
    assert r.log.committed == 3
    assert [(e.index, e.term) for e in rd.committed_entries] == [(1, 1), (2, 2), (3, 3)]


def test_leader_counts_itself_only_once_its_entry_is_persisted():
    """diss. 10.2.1: the leader may send appends before its own write, but counts itself for
    commit only once advance() acknowledged that write."""
    r = new_raft(pre_vote=False)
    make_replicating_leader(r)
    idx = r.propose(b"x")
    rd = r.ready()  # appends sent, own write not yet done
    assert of_type(rd.messages, MsgType.APPEND)
    r.step(msg(MsgType.APPEND_RESP, "n2", "n1", 1, index=idx))
    assert r.log.committed == idx - 1
    r.advance(rd)
    assert r.log.committed == idx


# =========================================================================== diss. 9.6 PreVote


def test_pre_candidate_does_not_increase_term():
    """diss. 9.6: on timeout a node first asks for pre-votes for term + 1 without changing its
    own term or vote, so nothing needs persisting."""
    r = new_raft(log=(1,), term=1, vote="n2")
    drain(r)
    for _ in range(r.randomized_timeout):
        r.tick()
    assert (r.role, r.term, r.vote) == (Role.PRE_CANDIDATE, 1, "n2")
    rd = ready(r)
    assert rd.hard_state is None
    reqs = sorted(rd.messages + rd.persisted_messages, key=lambda m: m.to)
    assert [(m.type, m.to, m.term, m.index, m.log_term) for m in reqs] == [
        (MsgType.PRE_VOTE, "n2", 2, 1, 1),
        (MsgType.PRE_VOTE, "n3", 2, 1, 1),
    ]


def test_pre_candidate_becomes_candidate_with_majority_of_pre_votes():
    r = new_raft(log=(1,), term=1)
    r.campaign()
    assert r.role == Role.PRE_CANDIDATE
    r.step(msg(MsgType.PRE_VOTE_RESP, "n2", "n1", 2))
    assert (r.role, r.term, r.vote) == (Role.CANDIDATE, 2, "n1")
    votes = of_type(drain(r), MsgType.VOTE)
    assert sorted((m.to, m.term) for m in votes) == [("n2", 2), ("n3", 2)]


def test_pre_candidate_rejected_by_majority_stays_in_its_term():
    r = new_raft(log=(1,), term=1)
    r.campaign()
    r.step(msg(MsgType.PRE_VOTE_RESP, "n2", "n1", 1, reject=True))
    r.step(msg(MsgType.PRE_VOTE_RESP, "n3", "n1", 1, reject=True))
    assert (r.role, r.term) == (Role.FOLLOWER, 1)


def test_pre_vote_grant_changes_nothing_on_the_voter():
    r = new_raft(log=(1,), term=1, vote="n3")
    drain(r)
    r.step(msg(MsgType.PRE_VOTE, "n2", "n1", 2, index=1, log_term=1))
    rd = ready(r)
    assert rd.hard_state is None
    resp = rd.messages + rd.persisted_messages
    assert [(m.type, m.term, m.reject) for m in resp] == [(MsgType.PRE_VOTE_RESP, 2, False)]
    assert (r.term, r.vote) == (1, "n3")


# =========================================================================== diss. 4.2.3 / 6.2


@pytest.mark.parametrize("mtype", [MsgType.VOTE, MsgType.PRE_VOTE])
def test_follower_with_live_leader_ignores_vote_requests(mtype):
    """diss. 4.2.3: a follower that heard from its leader within election_ticks ignores (pre)vote
    requests, even of a higher term, so a server cut off from the leader cannot depose it."""
    r = new_raft(log=(1,), term=1)
    r.step(msg(MsgType.HEARTBEAT, "n2", "n1", 1))
    drain(r)
    for _ in range(E - 1):
        r.tick()
    r.step(msg(mtype, "n3", "n1", 2, index=5, log_term=1))
    assert drain(r) == []
    assert (r.term, r.vote, r.leader) == (1, None, "n2")
    r.tick()  # election_ticks without the leader: the lease is over
    r.step(msg(mtype, "n3", "n1", 2, index=5, log_term=1))
    resp = [m for m in drain(r) if m.to == "n3"]
    assert [(m.type, m.reject) for m in resp] == [(MsgType(mtype + 1), False)]


def test_leadership_transfer_vote_bypasses_the_lease():
    r = new_raft(log=(1,), term=1)
    r.step(msg(MsgType.HEARTBEAT, "n2", "n1", 1))
    drain(r)
    r.step(msg(MsgType.VOTE, "n3", "n1", 2, index=1, log_term=1, context=b"transfer"))
    assert (r.term, r.vote) == (2, "n3")
    assert [(m.type, m.reject) for m in drain(r)] == [(MsgType.VOTE_RESP, False)]


def test_leader_steps_down_without_quorum_activity():
    """diss. 6.2 CheckQuorum: a leader that heard from no majority during an election timeout
    steps down."""
    r = new_raft(pre_vote=False)
    make_replicating_leader(r)
    for _ in range(E):  # answers before the first check count for it
        r.tick()
    drain(r)
    assert r.role == Role.LEADER
    for _ in range(E - 1):
        r.tick()
        r.step(msg(MsgType.HEARTBEAT_RESP, "n2", "n1", 1))
    drain(r)
    r.tick()
    assert r.role == Role.LEADER  # n2 answered: with itself a majority of 3
    for _ in range(E):
        r.tick()
    assert (r.role, r.term) == (Role.FOLLOWER, 1)


# =========================================================================== diss. 6.4 ReadIndex


def test_read_index_without_known_leader_raises_not_leader():
    r = new_raft(log=(1,), term=1)
    with pytest.raises(NotLeader):
        r.read_index(b"r")


def test_single_voter_leader_serves_reads_without_a_round():
    r = new_raft(voters=("n1",))
    r.campaign()
    drain(r)  # the no-op commits once persisted
    assert r.role == Role.LEADER and r.log.committed == 1
    r.read_index(b"r")
    rd = ready(r)
    assert rd.read_states == [ReadState(1, b"r")]
    assert of_type(rd.messages, MsgType.HEARTBEAT) == []


def test_leader_read_index_is_its_commit_index_at_request_time():
    r = new_raft(pre_vote=False)
    make_replicating_leader(r)
    commit = r.log.committed
    r.read_index(b"r")
    hbs = of_type(drain(r), MsgType.HEARTBEAT)
    assert len(hbs) == 2 and len({m.context for m in hbs}) == 1 and hbs[0].context
    r.propose(b"later")  # a write after the read began does not move the read index
    drain(r)
    r.step(msg(MsgType.HEARTBEAT_RESP, "n2", "n1", 1, context=hbs[0].context))
    assert ready(r).read_states == [ReadState(commit, b"r")]

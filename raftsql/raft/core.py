"""The Raft consensus core: a pure state machine (no clock, socket, file or thread).

Time enters only through tick(), the network only through step(), randomness only from the
injected random.Random. Every rule of the Raft paper (§ = section of the extended paper,
"diss." = Ongaro's dissertation) lives in this file, next to a comment naming it.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from raftsql.raft.log import DEFAULT_CACHE_BYTES, LogInvariantError, RaftLog
from raftsql.raft.storage import LogReader, StoredLog
from raftsql.raft.types import (
    ConfChange,
    ConfChangeType,
    Entry,
    EntryType,
    HardState,
    Message,
    MsgType,
    NotLeader,
    ProposalDropped,
    ReadState,
    Ready,
    Role,
    SnapshotMeta,
    SoftState,
)

TRANSFER_CONTEXT = b"transfer"

# Each mutation switches off exactly one rule, so the simulator can show it catches the break.
MUTATIONS: dict[str, str] = {
    "commit_any_term": "count replicas of entries from earlier terms to commit (§5.4.2)",
    "no_election_restriction": "grant votes to candidates whose log is behind (§5.4.1)",
    "vote_before_persist": "answer a vote request before the vote is on disk (§5.2, Figure 2)",
    "double_vote": "grant a second vote in the same term (§5.2)",
    "no_consistency_check": "accept AppendEntries without matching prev_log_term (§5.3)",
    "no_truncate": "keep a conflicting suffix instead of deleting it (§5.3)",
    "read_no_confirm": "serve ReadIndex without a heartbeat round (diss. 6.4 step 3)",
    "read_before_term_commit": "serve ReadIndex before committing an entry of the term (diss. 6.4 step 1)",
    "leader_ack_unpersisted": "leader counts its own entries before they are on its disk (diss. 10.2.1)",
    "no_check_quorum": "a leader that lost its majority keeps leading (diss. 6.2)",
    "follower_commit_unverified": "a follower commits past the entries the append proved to match (§5.3)",
    "heartbeat_commit_unclamped": "heartbeats carry the leader's commit index, not min(commit, match)",
    "vote_by_length": "the election restriction compares log lengths, not last terms (§5.4.1)",
    "read_quorum_minus_one": "a read is confirmed by one acknowledgement fewer than a majority (diss. 6.4)",
    "conf_change_before_term_commit": "a new leader accepts a membership change before its term commits (diss. 4.1)",
    "conf_change_while_pending": "accept a membership change while the previous one is uncommitted (diss. 4.1)",
    "transfer_to_lagging": "send TimeoutNow before the transfer target holds the whole log (diss. 3.10)",
    "ack_before_persist": "a follower acknowledges entries before they are on its disk (Figure 2)",
    "append_on_every_ack": "answer every append acknowledgement with another append, even an empty one",
}


class _ProgressState:
    PROBE = 0  # send one append, wait for its answer (finding where logs match)
    REPLICATE = 1  # stream appends optimistically, up to max_inflight unanswered
    SNAPSHOT = 2  # a snapshot is on its way; no appends until it is acknowledged (diss. 5.4)


class Progress:
    """The leader's view of one follower (Figure 2's nextIndex/matchIndex plus flow control).
    Invariant: match < next."""

    __slots__ = (
        "match", "next", "state", "paused", "inflight", "recent_active", "acked_round",
        "pending_snapshot", "snapshot_elapsed",
    )

    def __init__(self, next_index: int):
        self.match = 0
        self.next = next_index
        self.state = _ProgressState.PROBE
        self.paused = False
        self.inflight: deque[int] = deque()  # last index of each unanswered append
        self.recent_active = False
        self.acked_round = 0  # highest ReadIndex heartbeat round this peer answered
        self.pending_snapshot = 0  # index of the snapshot being sent (state SNAPSHOT)
        self.snapshot_elapsed = 0  # ticks since it was sent

    def become_probe(self) -> None:
        if self.state == _ProgressState.SNAPSHOT:
            # Resume after the snapshot if it got there, else from what the peer has.
            self.next = max(self.match + 1, self.pending_snapshot + 1)
        self.state = _ProgressState.PROBE
        self.paused = False
        self.pending_snapshot = 0
        self.inflight.clear()

    def become_snapshot(self, index: int) -> None:
        self.state = _ProgressState.SNAPSHOT
        self.pending_snapshot = index
        self.snapshot_elapsed = 0
        self.paused = True
        self.inflight.clear()

    def become_replicate(self) -> None:
        self.state = _ProgressState.REPLICATE
        self.next = self.match + 1
        self.paused = False
        self.inflight.clear()

    def free_to(self, index: int) -> None:
        while self.inflight and self.inflight[0] <= index:
            self.inflight.popleft()


# The context of an append rejection from a re-seeded follower (see Raft.vote_barrier).
LOST_LOG = b"lost-log"


@dataclass
class Config:
    id: str
    voters: tuple[str, ...]
    learners: tuple[str, ...] = ()
    election_ticks: int = 10  # minimum election timeout; each node draws from [e, 2e)
    heartbeat_ticks: int = 1
    max_inflight: int = 64  # unanswered appends per follower in REPLICATE
    max_append_bytes: int = 1 << 20  # per APPEND message (at least one entry is always sent)
    # Per Ready's committed_entries (at least one entry): a restart with a long unapplied log
    # reads it back from the store a batch at a time, not all at once.
    max_committed_bytes: int = 16 << 20
    pre_vote: bool = True
    check_quorum: bool = True
    mutations: frozenset[str] = frozenset()
    logger: Callable[[str], None] | None = None
    # A snapshot neither reported (report_snapshot) nor acknowledged within this many ticks is
    # presumed lost and sent again. The driving code normally reports long before.
    snapshot_timeout_ticks: int = 200
    # A leader whose commit index advanced does not send empty appends at once to tell the
    # followers: the next append (every proposal sends one), the next heartbeat or, at the
    # latest, the next tick carries it. With one write at a time this halves the messages per
    # write (no empty append and no acknowledgement of it); followers apply one write later.
    lazy_commit: bool = True

    def __post_init__(self) -> None:
        unknown = set(self.mutations) - set(MUTATIONS)
        if unknown:
            raise ValueError(f"unknown mutations: {sorted(unknown)}")
        if self.heartbeat_ticks < 1 or self.election_ticks <= self.heartbeat_ticks:
            raise ValueError("need 1 <= heartbeat_ticks < election_ticks")


@dataclass
class _PendingRead:
    context: bytes
    index: int
    round: int
    requester: str  # our own id for local reads, else the follower that forwarded it


@dataclass
class _Votes:
    granted: set[str] = field(default_factory=set)
    rejected: set[str] = field(default_factory=set)


class Raft:
    def __init__(
        self,
        config: Config,
        rng: random.Random,
        hard_state: HardState | None = None,
        snapshot: SnapshotMeta | None = None,
        entries: list[Entry] | tuple[Entry, ...] | StoredLog = (),
        applied: int = 0,
        *,
        storage: LogReader | None = None,
        log_cache_bytes: int = DEFAULT_CACHE_BYTES,
    ):
        """`entries` is the durable log after the snapshot: either every entry (tests), or the
        StoredLog summary of it, whose data `storage` reads back when asked. With `storage`,
        at most `log_cache_bytes` of durable entries stay in memory (log.py)."""
        hs = hard_state or HardState()
        snap = snapshot or SnapshotMeta()
        self.cfg = config
        self.id = config.id
        self.rng = rng
        self._mut = config.mutations
        self._logger = config.logger or logging.getLogger("raftsql.raft").info
        self.log = RaftLog(snap, entries, max(hs.commit, applied), storage, log_cache_bytes)
        # Entries up to the state machine's applied index are never handed out again.
        self.log.applied = max(snap.index, min(applied, self.log.committed))
        self.term = hs.term
        self.vote = hs.vote
        self.role = Role.FOLLOWER
        self.leader: str | None = None
        self.voters: set[str] = set()
        self.learners: set[str] = set()
        self._recompute_config()

        self.progress: dict[str, Progress] = {}
        self._votes = _Votes()
        self.election_elapsed = 0  # ticks since we last heard from a leader (or became one)
        self.heartbeat_elapsed = 0
        self.randomized_timeout = self.cfg.election_ticks
        self.lead_transferee: str | None = None
        self._transfer_elapsed = 0
        self.pending_conf_index = 0  # the leader's last CONF_CHANGE entry (one change at a time)
        self._committed_in_term = False

        self._msgs: list[Message] = []  # may leave before persistence (the leader's appends)
        self._liveness_queued = False  # _msgs holds a heartbeat or heartbeat response
        self._msgs_after: list[Message] = []  # only after the Ready's entries/hard state are synced
        self._read_states: list[ReadState] = []
        self._pending_reads: list[_PendingRead] = []
        self._reads_awaiting_commit: list[tuple[bytes, str]] = []
        self._read_round = 0
        self._need_round = False
        self._need_bcast = False
        self._commit_unsent = False  # lazy_commit: the followers have not been sent the commit
        self._prev_hs = HardState(self.term, self.vote, self.log.committed)
        # (term, vote) as synced to disk: loaded from it, then each Ready's hard state once
        # advanced. A follower's heartbeat response may leave before a Ready's fsync only
        # while its current (term, vote) is this (_send).
        self._durable_tv = (self.term, self.vote)
        self._prev_ss = SoftState(None, Role.FOLLOWER)
        self._outstanding: Ready | None = None
        self._pending_install: SnapshotMeta | None = None  # received, not yet handed out
        self._applying_to = self.log.applied
        # A node re-seeded after losing its log (server: `raftsql node --reseed`) may have
        # acknowledged entries up to this index that it no longer holds. Until its log reaches
        # it again (from a leader, whose log holds every committed entry), it neither votes nor
        # campaigns: a committed entry it acknowledged is then still on a node of every
        # majority that could elect a leader. 0: no barrier.
        self.vote_barrier = 0
        self._become_follower(self.term, None)

    # ---------------------------------------------------------------- membership (diss. 4.1)

    def _recompute_config(self) -> None:
        """Membership = base (snapshot or configured) + every CONF_CHANGE in the log, applied in
        order: a configuration takes effect once appended, committed or not (diss. 4.1)."""
        voters, learners = self._config_at(self.log.last_index())
        self.voters, self.learners = voters, learners
        if self.role == Role.LEADER:
            for nid in voters | learners:
                if nid not in self.progress:
                    self.progress[nid] = Progress(self.log.last_index() + 1)
            for nid in list(self.progress):
                if nid not in voters and nid not in learners and nid != self.id:
                    del self.progress[nid]
            if self.lead_transferee and self.lead_transferee not in voters:
                self.lead_transferee = None

    def _promotable(self) -> bool:
        return self.id in self.voters and self.log.last_index() >= self.vote_barrier

    def _quorum(self) -> int:
        return len(self.voters) // 2 + 1

    def _peers(self) -> list[str]:
        return [n for n in sorted(self.voters | self.learners) if n != self.id]

    # ---------------------------------------------------------------- role changes

    def _reset(self, term: int) -> None:
        if term != self.term:
            if self._msgs_after:
                # Append acknowledgements of the term we leave, still waiting for the next
                # Ready's fsync, promise entries that this new term may truncate in that same
                # Ready (a new leader's conflicting append): the fsync would then make the
                # truncation durable, not the entries. Their leader is deposed for us; it
                # hears from us in the new term. (Found by a long simulator run: seeds 927
                # and 1518, tests/raft/test_sim.py.)
                self._msgs_after = [m for m in self._msgs_after
                                    if m.type != MsgType.APPEND_RESP or m.reject]
            self.term = term
            self.vote = None
        self.leader = None
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        # §5.2: randomized election timeouts, drawn per node from the injected rng.
        self.randomized_timeout = self.cfg.election_ticks + self.rng.randrange(self.cfg.election_ticks)
        self._votes = _Votes()
        self.lead_transferee = None
        self.progress = {}
        self._pending_reads = []
        self._reads_awaiting_commit = []
        self._need_round = False
        self._need_bcast = False
        self._commit_unsent = False
        self._committed_in_term = False

    def _become_follower(self, term: int, leader: str | None) -> None:
        was = (self.role, self.term)
        self._reset(term)
        self.role = Role.FOLLOWER
        self.leader = leader
        if was != (Role.FOLLOWER, term):
            self._logger(f"{self.id} became follower at term {term}")

    def _become_pre_candidate(self) -> None:
        # diss. 9.6: PreVote does not touch our term or vote, so a node that cannot win an
        # election (partitioned, or behind) never forces the cluster into a new term.
        self._reset(self.term)
        self.role = Role.PRE_CANDIDATE
        self._logger(f"{self.id} became pre-candidate at term {self.term}")

    def _become_candidate(self) -> None:
        self._reset(self.term + 1)
        self.role = Role.CANDIDATE
        self.vote = self.id  # §5.2: vote for self (persisted before the requests go out)
        self._logger(f"{self.id} became candidate at term {self.term}")

    def _become_leader(self) -> None:
        self._reset(self.term)
        self.role = Role.LEADER
        self.leader = self.id
        last = self.log.last_index()
        for nid in self.voters | self.learners:
            self.progress[nid] = Progress(last + 1)
        me = self.progress.setdefault(self.id, Progress(last + 1))
        me.match = self.log.stable if "leader_ack_unpersisted" not in self._mut else last
        me.next = last + 1
        me.become_replicate()
        me.next = last + 1
        # diss. 4.1 (the single-server bug): no membership change until an entry of this term
        # commits; the no-op below is that entry.
        self.pending_conf_index = last + 1
        if "conf_change_before_term_commit" in self._mut:
            self.pending_conf_index = max((e.index for e in self.log.conf_changes(last)), default=0)
        self._logger(f"{self.id} became leader at term {self.term}")
        # §8: a new leader commits a no-op at once, which also commits earlier-term entries.
        self._append_local([Entry(self.term, last + 1, EntryType.NORMAL, b"")])
        self._need_bcast = True

    # ---------------------------------------------------------------- public API

    def tick(self) -> None:
        """One logical tick of the node's clock."""
        if self.role == Role.LEADER:
            self._tick_leader()
        else:
            self._tick_election()

    def _tick_election(self) -> None:
        self.election_elapsed += 1
        if self._promotable() and self.election_elapsed >= self.randomized_timeout:
            self.election_elapsed = 0
            self._campaign(transfer=False)

    def _tick_leader(self) -> None:
        self.heartbeat_elapsed += 1
        self.election_elapsed += 1
        if self._commit_unsent:
            self._need_bcast = True  # sent at the next ready(); clears _commit_unsent
        for pr in self.progress.values():
            if pr.state == _ProgressState.SNAPSHOT:
                pr.snapshot_elapsed += 1
                if pr.snapshot_elapsed >= self.cfg.snapshot_timeout_ticks:
                    pr.become_probe()
                    pr.next = pr.match + 1
        if self.lead_transferee is not None:
            self._transfer_elapsed += 1
            if self._transfer_elapsed >= self.cfg.election_ticks:
                self._logger(f"{self.id} abandons leadership transfer to {self.lead_transferee}")
                self.lead_transferee = None
        if self.election_elapsed >= self.cfg.election_ticks:
            self.election_elapsed = 0
            # diss. 6.2 CheckQuorum: a leader that has not heard from a majority within an
            # election timeout steps down, so it stops serving clients that others abandoned.
            if self.cfg.check_quorum and "no_check_quorum" not in self._mut:
                active = sum(
                    1
                    for v in self.voters
                    if v == self.id or (v in self.progress and self.progress[v].recent_active)
                )
                for p in self.progress.values():
                    p.recent_active = False
                if active < self._quorum():
                    self._logger(f"{self.id} lost contact with a majority at term {self.term}")
                    self._become_follower(self.term, None)
                    return
        if self.heartbeat_elapsed >= self.cfg.heartbeat_ticks:
            self.heartbeat_elapsed = 0
            self._bcast_heartbeat()

    def campaign(self) -> None:
        """Start an election now (used by tests and single-node bootstrap)."""
        if self.role != Role.LEADER and self._promotable():
            self._campaign(transfer=False)

    def propose(self, data: bytes, entry_type: EntryType = EntryType.NORMAL) -> int:
        """Append a command to the leader's log; returns its index. It is committed once a
        Ready later hands it back in committed_entries."""
        if self.role != Role.LEADER:
            raise NotLeader(self.leader)
        if self.lead_transferee is not None:
            raise ProposalDropped(f"leadership transfer to {self.lead_transferee} in progress")
        if entry_type == EntryType.CONF_CHANGE:
            cc = ConfChange.decode(data)
            skip = "conf_change_while_pending" in self._mut and self._committed_in_term
            if self.pending_conf_index > self.log.committed and not skip:
                raise ProposalDropped("another membership change is not yet committed")
            if cc.type == ConfChangeType.REMOVE and cc.node_id not in self.voters | self.learners:
                raise ValueError(f"{cc.node_id} is not a member")
            if cc.type == ConfChangeType.PROMOTE and cc.node_id not in self.learners:
                raise ValueError(f"{cc.node_id} is not a learner")
            if cc.type == ConfChangeType.REMOVE and self.voters == {cc.node_id}:
                raise ValueError("cannot remove the last voter")
        index = self.log.last_index() + 1
        self._append_local([Entry(self.term, index, entry_type, data)])
        if entry_type == EntryType.CONF_CHANGE:
            self.pending_conf_index = index
        # Appends go out at the next ready(): proposals made in between share one message.
        self._need_bcast = True
        return index

    def read_index(self, context: bytes) -> None:
        """Ask for a linearizable read (diss. 6.4). A ReadState(index, context) comes back in a
        later Ready; serve the read once applied >= index. Raises NotLeader if no leader is known."""
        if self.role == Role.LEADER:
            self._leader_read(context, self.id)
        elif self.leader is not None:
            self._send(Message(MsgType.READ_INDEX, self.leader, self.id, self.term, context=context))
        else:
            raise NotLeader(None)

    def transfer_leadership(self, to: str) -> None:
        """Leadership transfer (diss. 3.10): bring `to` up to date, then send it TimeoutNow.
        Proposals are refused meanwhile; abandoned after an election timeout."""
        if self.role != Role.LEADER:
            raise NotLeader(self.leader)
        if to == self.id:
            # Transferring to ourselves cancels a transfer in progress (as etcd does).
            if self.lead_transferee is not None:
                self._logger(f"{self.id} cancels leadership transfer to {self.lead_transferee}")
                self.lead_transferee = None
            return
        if self.lead_transferee == to:
            return
        if to not in self.voters:
            raise ValueError(f"{to} is not a voter")
        self.lead_transferee = to
        self._transfer_elapsed = 0
        self._logger(f"{self.id} transfers leadership to {to} at term {self.term}")
        if self.progress[to].match == self.log.last_index() or "transfer_to_lagging" in self._mut:
            self._send(Message(MsgType.TIMEOUT_NOW, to, self.id, self.term))
        else:
            self._send_append(to, send_if_empty=True)

    def compact(self, index: int) -> SnapshotMeta:
        """The state machine has captured everything up to `index` (<= applied, and on disk in
        the log store): forget those entries. Returns the meta to store next to the snapshot,
        including the membership in effect at `index`. A lagging follower that still needs a
        forgotten entry gets the snapshot instead (InstallSnapshot, diss. 5.4)."""
        log = self.log
        if index <= log.snapshot.index:
            return log.snapshot
        if index > log.applied or index > log.stable:
            raise ValueError(
                f"cannot compact to {index}: applied {log.applied}, stable {log.stable}"
            )
        voters, learners = self._config_at(index)
        meta = SnapshotMeta(index, log.term(index) or 0, tuple(sorted(voters)), tuple(sorted(learners)))
        log.compact(meta)
        return meta

    def _config_at(self, index: int) -> tuple[set[str], set[str]]:
        snap = self.log.snapshot
        if snap.voters:
            voters, learners = set(snap.voters), set(snap.learners)
        else:
            voters, learners = set(self.cfg.voters), set(self.cfg.learners)
        for e in self.log.conf_changes(index):
            _apply_conf_change(voters, learners, ConfChange.decode(e.data))
        return voters, learners

    def report_snapshot(self, to: str, ok: bool) -> None:
        """The driving code finished sending a snapshot to `to`: ok=True if it was delivered
        (the follower's acknowledgement then resumes replication after it), False if the
        transfer failed (it will be sent again)."""
        pr = self.progress.get(to) if self.role == Role.LEADER else None
        if pr is None or pr.state != _ProgressState.SNAPSHOT:
            return
        if not ok:
            pr.pending_snapshot = 0
        pr.become_probe()
        pr.paused = True  # wait for the follower's answer (or the next heartbeat)

    def progress_of(self, nid: str) -> tuple[int, bool]:
        """A leader's view of follower nid: (match index, whether appends stream to it
        (REPLICATE) rather than probing or waiting for a snapshot). (0, False) if unknown."""
        pr = self.progress.get(nid)
        if pr is None:
            return 0, False
        return pr.match, pr.state == _ProgressState.REPLICATE

    def status(self) -> dict:
        return {
            "id": self.id,
            "role": self.role.name.lower(),
            "term": self.term,
            "leader": self.leader,
            "commit_index": self.log.committed,
            "applied_index": self.log.applied,
            "last_index": self.log.last_index(),
            "snapshot_index": self.log.snapshot.index,
            "voters": sorted(self.voters),
            "learners": sorted(self.learners),
            "progress": {
                k: {
                    "match": p.match,
                    "next": p.next,
                    "active": p.recent_active,
                    "state": ("probe", "replicate", "snapshot")[p.state],
                }
                for k, p in self.progress.items()
                if k != self.id
            },
        }

    # ---------------------------------------------------------------- Ready / advance

    def _flush(self) -> None:
        if self.role == Role.LEADER:
            if self._need_round:
                # One heartbeat round confirms leadership for every read queued since the last.
                self._need_round = False
                self._read_round += 1
                self._bcast_heartbeat()
            if self._need_bcast:
                self._need_bcast = False
                self._commit_unsent = False
                self._bcast_append()

    def has_ready(self) -> bool:
        if self.log.failed is not None:
            raise self.log.failed  # the store could not read an entry back: stop the node
        if self._outstanding is not None:
            return False
        self._flush()
        return bool(
            self._pending_install is not None
            or self._msgs
            or self._msgs_after
            or self._read_states
            or self.log.stable < self.log.last_index()
            or self.log.committed > self._applying_to
            or HardState(self.term, self.vote, self.log.committed) != self._prev_hs
            or SoftState(self.leader, self.role) != self._prev_ss
        )

    def ready(self) -> Ready:
        """What to do now (see Ready for the ordering contract). Call advance() before the next."""
        if self._outstanding is not None:
            raise RuntimeError("ready() called again before advance()")
        if self.log.failed is not None:
            raise self.log.failed
        self._flush()
        rd = Ready()
        if self._pending_install is not None:
            rd.snapshot, self._pending_install = self._pending_install, None
            rd.must_sync = True
        hs = HardState(self.term, self.vote, self.log.committed)
        if hs != self._prev_hs:
            rd.hard_state = hs
            rd.must_sync = rd.must_sync or (hs.term, hs.vote) != (self._prev_hs.term, self._prev_hs.vote)
            self._prev_hs = hs
        ss = SoftState(self.leader, self.role)
        if ss != self._prev_ss:
            rd.soft_state = ss
            self._prev_ss = ss
        rd.entries = self.log.unstable()
        rd.must_sync = rd.must_sync or bool(rd.entries)
        rd.messages, self._msgs = self._msgs, []
        self._liveness_queued = False
        rd.persisted_messages, self._msgs_after = self._msgs_after, []
        for name, mtype in (("vote_before_persist", MsgType.VOTE_RESP), ("ack_before_persist", MsgType.APPEND_RESP)):
            if name in self._mut:
                early = [m for m in rd.persisted_messages if m.type == mtype]
                rd.persisted_messages = [m for m in rd.persisted_messages if m.type != mtype]
                rd.messages.extend(early)
        if self.log.committed > self._applying_to:
            rd.committed_entries = self.log.slice(
                self._applying_to + 1, self.log.committed + 1, self.cfg.max_committed_bytes
            )
            self._applying_to = rd.committed_entries[-1].index
        rd.read_states, self._read_states = self._read_states, []
        self._outstanding = rd
        return rd

    def take_messages(self) -> list[Message]:
        """The heartbeats and heartbeat responses among the messages that may leave at once,
        for the driver to send now rather than with the next Ready, even while one is
        outstanding (its fsync may take long: a disk busy with a 400 MB apply): a slow disk
        must not look like a dead node. Appends stay for the next Ready (they batch there)."""
        if not self._liveness_queued:
            return []  # the common case, and O(1): nothing to scan for
        self._liveness_queued = False
        now = [m for m in self._msgs if m.type in _LIVENESS]
        self._msgs = [m for m in self._msgs if m.type not in _LIVENESS]
        return now

    def advance(self, rd: Ready) -> None:
        """The Ready was carried out: entries/hard state synced, messages sent, entries applied."""
        if rd is not self._outstanding:
            raise RuntimeError("advance() with a Ready that is not the outstanding one")
        self._outstanding = None
        if rd.hard_state is not None:
            self._durable_tv = (rd.hard_state.term, rd.hard_state.vote)
        if rd.entries:
            last = rd.entries[-1]
            self.log.stable_to(last.index, last.term)
            if self.role == Role.LEADER and self.id in self.progress:
                me = self.progress[self.id]
                if self.log.stable > me.match:
                    me.match = self.log.stable
                    if self._maybe_commit():
                        self._commit_advanced()
        if rd.committed_entries:
            self.log.applied = max(self.log.applied, rd.committed_entries[-1].index)

    # ---------------------------------------------------------------- step

    def step(self, m: Message) -> None:
        """Handle one message from a peer."""
        if m.term > self.term:
            if m.type in (MsgType.VOTE, MsgType.PRE_VOTE):
                # diss. 4.2.3 leader stickiness: while we hear from a live leader we ignore
                # vote requests, so a server that cannot hear the leader cannot depose it.
                in_lease = (
                    self.cfg.check_quorum
                    and self.leader is not None
                    and self.election_elapsed < self.cfg.election_ticks
                )
                if in_lease and m.context != TRANSFER_CONTEXT:
                    return
            if m.type == MsgType.PRE_VOTE or (m.type == MsgType.PRE_VOTE_RESP and not m.reject):
                pass  # pre-votes carry a future term and change nobody's term
            elif m.type in (MsgType.APPEND, MsgType.HEARTBEAT, MsgType.SNAPSHOT):
                self._become_follower(m.term, m.sender)
            else:
                self._become_follower(m.term, None)
        elif m.term < self.term:
            if m.type in (MsgType.APPEND, MsgType.HEARTBEAT, MsgType.SNAPSHOT):
                # A deposed leader (maybe cut off, maybe paused): tell it our term so it steps
                # down; with PreVote/CheckQuorum nobody else would ever raise its term.
                self._send(Message(MsgType.APPEND_RESP, m.sender, self.id, self.term))
            elif m.type == MsgType.PRE_VOTE:
                self._send(Message(MsgType.PRE_VOTE_RESP, m.sender, self.id, self.term, reject=True))
            return  # §5.1: a request with a stale term is rejected

        if m.type in (MsgType.VOTE, MsgType.PRE_VOTE):
            self._handle_vote_request(m)
        elif self.role == Role.LEADER:
            self._step_leader(m)
        elif self.role in (Role.CANDIDATE, Role.PRE_CANDIDATE):
            self._step_candidate(m)
        else:
            self._step_follower(m)

    def _handle_vote_request(self, m: Message) -> None:
        pre = m.type == MsgType.PRE_VOTE
        resp_type = MsgType.PRE_VOTE_RESP if pre else MsgType.VOTE_RESP
        # §5.2: at most one vote per term, first come first served.
        can_vote = (
            self.vote == m.sender
            or (self.vote is None and self.leader is None)
            or (pre and m.term > self.term)
            or "double_vote" in self._mut
        )
        # §5.4.1 election restriction: only a candidate whose log is at least as up to date.
        up_to_date = self.log.is_up_to_date(m.index, m.log_term) or (
            "no_election_restriction" in self._mut
        )
        if "vote_by_length" in self._mut:
            up_to_date = m.index >= self.log.last_index()
        if self.log.last_index() < self.vote_barrier:
            can_vote = False  # re-seeded and not caught up: see vote_barrier
        if can_vote and up_to_date:
            # A granted pre-vote answers with the candidate's future term (it changes nothing).
            self._send(Message(resp_type, m.sender, self.id, m.term))
            if not pre:
                self.election_elapsed = 0
                self.vote = m.sender
        else:
            self._send(Message(resp_type, m.sender, self.id, self.term, reject=True))

    def _step_follower(self, m: Message) -> None:
        t = m.type
        if t == MsgType.APPEND:
            self.election_elapsed = 0
            self.leader = m.sender
            self._handle_append(m)
        elif t == MsgType.HEARTBEAT:
            self.election_elapsed = 0
            self.leader = m.sender
            self._handle_heartbeat(m)
        elif t == MsgType.SNAPSHOT:
            self.election_elapsed = 0
            self.leader = m.sender
            self._handle_snapshot(m)
        elif t == MsgType.TIMEOUT_NOW:
            if self._promotable():
                self._logger(f"{self.id} got TimeoutNow from {m.sender} at term {self.term}")
                self._campaign(transfer=True)
        elif t == MsgType.READ_INDEX_RESP:
            if not m.reject:
                self._read_states.append(ReadState(m.index, m.context))

    def _step_candidate(self, m: Message) -> None:
        t = m.type
        if t in (MsgType.APPEND, MsgType.HEARTBEAT, MsgType.SNAPSHOT):
            # §5.2: a candidate that hears from a leader of its term steps down.
            self._become_follower(m.term, m.sender)
            self._step_follower(m)
            return
        want = MsgType.PRE_VOTE_RESP if self.role == Role.PRE_CANDIDATE else MsgType.VOTE_RESP
        if t != want:
            return
        if self.role == Role.PRE_CANDIDATE and not m.reject and m.term != self.term + 1:
            return  # an answer to an older pre-vote round
        (self._votes.rejected if m.reject else self._votes.granted).add(m.sender)
        granted = len(self._votes.granted & self.voters)
        rejected = len(self._votes.rejected & self.voters)
        if granted >= self._quorum():
            if self.role == Role.PRE_CANDIDATE:
                self._start_election(transfer=False)
            else:
                self._become_leader()
        elif rejected >= self._quorum() or granted + (len(self.voters) - granted - rejected) < self._quorum():
            self._become_follower(self.term, None)

    def _step_leader(self, m: Message) -> None:
        t = m.type
        pr = self.progress.get(m.sender)
        if t == MsgType.READ_INDEX:
            self._leader_read(m.context, m.sender)
            return
        if pr is None:
            return
        if t == MsgType.APPEND_RESP:
            pr.recent_active = True
            self._handle_append_resp(m, pr)
        elif t == MsgType.HEARTBEAT_RESP:
            pr.recent_active = True
            if m.context:
                pr.acked_round = max(pr.acked_round, int.from_bytes(m.context, "big"))
                self._release_reads()
            if pr.match < self.log.last_index():
                if pr.state == _ProgressState.REPLICATE and len(pr.inflight) >= self.cfg.max_inflight:
                    pr.inflight.popleft()  # a lost append must not stall the stream forever
                if pr.state != _ProgressState.SNAPSHOT:
                    pr.paused = False
                self._send_append(m.sender, send_if_empty=True)

    # ---------------------------------------------------------------- elections

    def _campaign(self, transfer: bool) -> None:
        if self.cfg.pre_vote and not transfer:
            self._become_pre_candidate()
            kind, term = MsgType.PRE_VOTE, self.term + 1
            self._votes.granted.add(self.id)
            if len(self._votes.granted & self.voters) >= self._quorum():
                self._start_election(transfer=False)
                return
            for v in sorted(self.voters):
                if v != self.id:
                    self._send(
                        Message(kind, v, self.id, term, log_term=self.log.last_term(), index=self.log.last_index())
                    )
        else:
            self._start_election(transfer)

    def _start_election(self, transfer: bool) -> None:
        self._become_candidate()
        self._votes.granted.add(self.id)
        if len(self._votes.granted & self.voters) >= self._quorum():
            self._become_leader()
            return
        ctx = TRANSFER_CONTEXT if transfer else b""
        for v in sorted(self.voters):
            if v != self.id:
                self._send(
                    Message(
                        MsgType.VOTE, v, self.id, self.term,
                        log_term=self.log.last_term(), index=self.log.last_index(), context=ctx,
                    )
                )

    # ---------------------------------------------------------------- replication (§5.3)

    def _append_local(self, entries: list[Entry]) -> None:
        self.log.append(entries)
        if any(e.type == EntryType.CONF_CHANGE for e in entries):
            self._recompute_config()
        if "leader_ack_unpersisted" in self._mut and self.id in self.progress:
            self.progress[self.id].match = self.log.last_index()
            self._maybe_commit()

    def _handle_append(self, m: Message) -> None:
        log = self.log
        if m.index < log.committed:
            # Everything up to our commit index already matches any leader's log (§5.4).
            self._send(Message(MsgType.APPEND_RESP, m.sender, self.id, self.term, index=log.committed))
            return
        matches = log.match_term(m.index, m.log_term) or (
            "no_consistency_check" in self._mut and m.index <= log.last_index()
        )
        if not matches:
            # Fast backtracking (§5.3, end): tell the leader the conflicting term and the first
            # index we hold of it, or our last index if we are simply shorter.
            if m.index > log.last_index():
                hint, conflict_term = log.last_index() + 1, 0
            else:
                conflict_term = log.term(m.index) or 0
                hint = log.first_index_of_term(m.index)
            self._send(
                Message(
                    MsgType.APPEND_RESP, m.sender, self.id, self.term,
                    index=m.index, reject=True, reject_hint=hint, log_term=conflict_term,
                    # Re-seeded: we may have acknowledged entries we no longer hold.
                    context=LOST_LOG if log.last_index() < self.vote_barrier else b"",
                )
            )
            return
        entries = m.entries
        conflict = log.find_conflict(entries)
        truncating = False
        if conflict:
            if "no_truncate" in self._mut:
                new = [e for e in entries if e.index > log.last_index()]
            else:
                # §5.3: delete the conflicting entry and all that follow it.
                if conflict <= log.committed:
                    raise LogInvariantError(
                        f"{self.id}: leader {m.sender} conflicts with committed entry {conflict}"
                    )
                new = list(entries[conflict - entries[0].index :])
                truncating = conflict <= log.last_index()
            if new:
                log.append(new)
                if truncating or any(e.type == EntryType.CONF_CHANGE for e in new):
                    self._recompute_config()
        last_new = m.index + len(entries)
        # Commit what the leader says is committed, but only as far as we know our log matches.
        log.commit_to(min(m.commit, last_new if "follower_commit_unverified" not in self._mut else log.last_index()))
        self._send(Message(MsgType.APPEND_RESP, m.sender, self.id, self.term, index=last_new))

    def _handle_snapshot(self, m: Message) -> None:
        """InstallSnapshot (§7, diss. 5.4.2). The driving code received the snapshot's data
        before stepping this message; we only decide whether to take it."""
        log = self.log
        try:
            meta = SnapshotMeta.from_message(m)
        except ValueError as e:
            self._logger(f"{self.id} ignores SNAPSHOT from {m.sender}: {e}")
            return
        if meta.index <= log.committed:
            # Nothing new in it: we already hold (committed) everything it covers.
            self._send(Message(MsgType.APPEND_RESP, m.sender, self.id, self.term, index=log.committed))
            return
        if log.match_term(meta.index, meta.term):
            # Our log already holds its last entry, so it holds everything before it (Log
            # Matching): keep the log (and anything after it), just learn the commit index.
            log.commit_to(meta.index)
            self._send(Message(MsgType.APPEND_RESP, m.sender, self.id, self.term, index=log.committed))
            return
        # §7: discard the whole log; the state machine is replaced by the snapshot.
        self._logger(f"{self.id} installs snapshot at {meta.index} (term {meta.term}) from {m.sender}")
        self.log.restore(meta)
        self._applying_to = meta.index
        self._pending_install = meta
        self._recompute_config()
        self._send(Message(MsgType.APPEND_RESP, m.sender, self.id, self.term, index=meta.index))

    def _handle_heartbeat(self, m: Message) -> None:
        # The leader sends commit = min(its commit, our match), so this never passes our log.
        self.log.commit_to(min(m.commit, self.log.last_index()))
        self._send(Message(MsgType.HEARTBEAT_RESP, m.sender, self.id, self.term, context=m.context))

    def _handle_append_resp(self, m: Message, pr: Progress) -> None:
        if m.reject and m.context == LOST_LOG and pr.match >= m.reject_hint:
            # The follower was re-seeded and no longer holds what it acknowledged: its match
            # goes back to what it holds (commit never goes back: it needed a majority anyway).
            pr.match = m.reject_hint - 1
            pr.become_probe()
            pr.next = m.reject_hint
            self._send_append(m.sender, send_if_empty=True)
            return
        if pr.state == _ProgressState.SNAPSHOT:
            if m.reject or m.index < pr.pending_snapshot:
                return  # answers something sent before the snapshot
            pr.become_probe()
        if m.reject:
            if pr.state == _ProgressState.REPLICATE:
                if m.index <= pr.match:
                    return  # stale
            elif m.index != pr.next - 1:
                return  # stale: answers an older probe
            nxt = m.reject_hint
            if m.log_term > 0:
                last_of_term = self.log.last_index_of_term(m.log_term, m.index)
                if last_of_term is not None:
                    nxt = last_of_term + 1
            pr.next = max(min(nxt, m.index), pr.match + 1)
            pr.become_probe()
            self._send_append(m.sender, send_if_empty=True)
            return
        updated = False
        if m.index > pr.match:
            pr.match = m.index
            updated = True
        if pr.next <= m.index:
            pr.next = m.index + 1
        if pr.state == _ProgressState.PROBE:
            pr.become_replicate()
        else:
            pr.free_to(m.index)
        if "append_on_every_ack" in self._mut:
            self._send_append(m.sender, send_if_empty=True)
        committed = updated and self._maybe_commit()
        if committed and not self.cfg.lazy_commit:
            self._need_bcast = True
        else:
            if committed:
                self._commit_unsent = True  # lazy_commit: see Config
            # (A commit may have removed the sender, or this leader: nothing more to send.)
            while self.role == Role.LEADER and m.sender in self.progress and self._send_append(
                    m.sender, send_if_empty=False):
                pass
        if m.sender == self.lead_transferee and pr.match == self.log.last_index():
            self._send(Message(MsgType.TIMEOUT_NOW, m.sender, self.id, self.term))

    def _send_append(self, to: str, send_if_empty: bool) -> bool:
        pr = self.progress[to]
        if pr.state == _ProgressState.PROBE and pr.paused:
            return False
        if pr.state == _ProgressState.REPLICATE and len(pr.inflight) >= self.cfg.max_inflight:
            return False
        if pr.state == _ProgressState.SNAPSHOT:
            return False
        prev = pr.next - 1
        prev_term = self.log.term(prev)
        if prev_term is None:
            # The follower needs entries we compacted away: send the snapshot instead
            # (InstallSnapshot, §7). The driving code attaches the data and reports back.
            snap = self.log.snapshot
            self._send(
                Message(
                    MsgType.SNAPSHOT, to, self.id, self.term,
                    log_term=snap.term, index=snap.index, commit=self.log.committed,
                    context=snap.membership_context(),
                )
            )
            pr.become_snapshot(snap.index)
            self._logger(f"{self.id} sends snapshot at {snap.index} to {to} (it needs {pr.next})")
            return False
        entries = self.log.slice(pr.next, self.log.last_index() + 1, self.cfg.max_append_bytes)
        if not entries and not send_if_empty:
            return False
        self._send(
            Message(
                MsgType.APPEND, to, self.id, self.term,
                log_term=prev_term, index=prev, entries=tuple(entries), commit=self.log.committed,
            )
        )
        if pr.state == _ProgressState.REPLICATE:
            if entries:
                pr.next = entries[-1].index + 1
                pr.inflight.append(entries[-1].index)
        else:
            pr.paused = True
        return bool(entries)

    def _commit_advanced(self) -> None:
        if self.cfg.lazy_commit:
            self._commit_unsent = True
        else:
            self._need_bcast = True

    def _bcast_append(self) -> None:
        for p in self._peers():
            if p in self.progress:
                self._send_append(p, send_if_empty=True)

    def _bcast_heartbeat(self) -> None:
        ctx = self._read_round.to_bytes(8, "big") if self._read_round else b""
        for p in self._peers():
            pr = self.progress.get(p)
            if pr is None:
                continue
            commit = min(pr.match, self.log.committed)
            if "heartbeat_commit_unclamped" in self._mut:
                commit = self.log.committed
            self._send(Message(MsgType.HEARTBEAT, p, self.id, self.term, commit=commit, context=ctx))

    def _maybe_commit(self) -> bool:
        """§5.3/§5.4.2: commit_index = the highest index replicated on a majority, but only by
        counting replicas of an entry from the leader's current term."""
        matches = sorted(
            (self.progress[v].match if v in self.progress else 0 for v in self.voters),
            reverse=True,
        )
        if not matches:
            return False
        n = matches[self._quorum() - 1]
        if n <= self.log.committed:
            return False
        if self.log.term(n) != self.term and "commit_any_term" not in self._mut:
            return False
        self.log.commit_to(n)
        if not self._committed_in_term and self.log.term(n) == self.term:
            self._committed_in_term = True
            for ctx, requester in self._reads_awaiting_commit:
                self._leader_read(ctx, requester)
            self._reads_awaiting_commit = []
        if self.id not in self.voters and self.log.committed >= self.pending_conf_index:
            # We committed our own removal: stop leading (diss. 4.2.2).
            self._logger(f"{self.id} removed from the cluster; stepping down at term {self.term}")
            self._become_follower(self.term, None)
        return True

    # ---------------------------------------------------------------- ReadIndex (diss. 6.4)

    def _leader_read(self, ctx: bytes, requester: str) -> None:
        # Step 1: the leader must have committed an entry of its term, so its commit index is
        # at least that of any earlier leader.
        if not self._committed_in_term and "read_before_term_commit" not in self._mut:
            self._reads_awaiting_commit.append((ctx, requester))
            return
        read = _PendingRead(ctx, self.log.committed, self._read_round + 1, requester)
        # Steps 2-3: record the commit index, then confirm we are still leader with one
        # heartbeat round that a majority answers.
        self._pending_reads.append(read)
        self._need_round = True
        if "read_no_confirm" in self._mut or self.voters == {self.id}:
            read.round = 0
        self._release_reads()

    def _release_reads(self) -> None:
        if not self._pending_reads:
            return
        rounds = sorted(
            (
                1 << 62 if v == self.id else (self.progress[v].acked_round if v in self.progress else 0)
                for v in self.voters
            ),
            reverse=True,
        )
        confirmed = rounds[self._quorum() - (2 if "read_quorum_minus_one" in self._mut else 1)]
        keep = []
        for r in self._pending_reads:
            if r.round <= confirmed:
                if r.requester == self.id:
                    self._read_states.append(ReadState(r.index, r.context))
                else:
                    self._send(
                        Message(MsgType.READ_INDEX_RESP, r.requester, self.id, self.term, index=r.index, context=r.context)
                    )
            else:
                keep.append(r)
        self._pending_reads = keep

    # ---------------------------------------------------------------- output

    def _send(self, m: Message) -> None:
        # Ready contract: a leader's appends, heartbeats and read answers depend on nothing
        # unsynced (its term was synced before it asked for votes; it counts its own entries
        # only once synced), so they may leave before the disk write (diss. 10.2.1).
        # Everything else (votes, append acks, a candidate's requests) waits for the fsync, but
        # a heartbeat response when our term and vote are durable.
        if self.role == Role.LEADER and m.type in (
            MsgType.APPEND,
            MsgType.SNAPSHOT,
            MsgType.HEARTBEAT,
            MsgType.TIMEOUT_NOW,
            MsgType.READ_INDEX_RESP,
        ):
            self._msgs.append(m)
            if m.type == MsgType.HEARTBEAT:
                self._liveness_queued = True
        elif m.type == MsgType.HEARTBEAT_RESP and (self.term, self.vote) == self._durable_tv:
            # It promises nothing about our log, only that we are at this term (and the vote
            # we cast in it), which a crash cannot take back: already on disk.
            self._msgs.append(m)
            self._liveness_queued = True
        else:
            self._msgs_after.append(m)


# What Raft.take_messages lets leave while a Ready is outstanding.
_LIVENESS = frozenset((MsgType.HEARTBEAT, MsgType.HEARTBEAT_RESP))


def _apply_conf_change(voters: set[str], learners: set[str], cc: ConfChange) -> None:
    if cc.type == ConfChangeType.ADD_LEARNER:
        if cc.node_id not in voters:
            learners.add(cc.node_id)
    elif cc.type == ConfChangeType.PROMOTE:
        learners.discard(cc.node_id)
        voters.add(cc.node_id)
    elif cc.type == ConfChangeType.REMOVE:
        voters.discard(cc.node_id)
        learners.discard(cc.node_id)

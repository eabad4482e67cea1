"""Typed values exchanged between the Raft core and the world around it.

Everything here is plain data: no I/O. raftsql/wire.py encodes Message and Entry with msgpack;
server/logstore.py persists Entry and HardState; the simulator passes them around in memory.
Node ids are short strings ("n1").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

import msgpack


class MsgType(IntEnum):
    """Every message kind the core sends or accepts. The numbers are on the wire: never renumber."""

    APPEND = 1  # AppendEntries: index=prev_log_index, log_term=prev_log_term, entries, commit
    APPEND_RESP = 2  # index=last matching index (accept) or rejected prev_index; reject_hint, log_term
    VOTE = 3  # RequestVote: index=last_log_index, log_term=last_log_term; context=b"transfer" to skip lease
    VOTE_RESP = 4  # reject=not granted
    PRE_VOTE = 5  # like VOTE, term = candidate's term + 1, receiver's term is not changed (dissertation 9.6)
    PRE_VOTE_RESP = 6
    HEARTBEAT = 7  # commit=min(commit, follower's match), context=read-round id (8-byte big endian) or b""
    HEARTBEAT_RESP = 8  # context echoed
    TIMEOUT_NOW = 9  # leadership transfer: campaign now, skipping PreVote and the lease
    READ_INDEX = 10  # follower -> leader: confirm a read index for context
    READ_INDEX_RESP = 11  # leader -> follower: index=read index (reject=True: leader cannot serve it)
    SNAPSHOT = 12  # InstallSnapshot: index/log_term = snapshot, context = membership


class EntryType(IntEnum):
    NORMAL = 0  # data is an opaque command (raftsql/command.py); empty data is a leader's no-op
    CONF_CHANGE = 1  # data is ConfChange.encode()


@dataclass(frozen=True, slots=True)
class Entry:
    term: int
    index: int
    type: EntryType = EntryType.NORMAL
    data: bytes = b""

    def size(self) -> int:
        """Approximate encoded size, used by the per-append byte cap."""
        return len(self.data) + 16


class ConfChangeType(IntEnum):
    ADD_LEARNER = 0  # add a non-voting member (or demote nothing: a learner that exists stays)
    PROMOTE = 1  # make an existing learner a voter (a new node must join as a learner first)
    REMOVE = 2  # remove a voter or learner


@dataclass(frozen=True, slots=True)
class ConfChange:
    """A single-server membership change (dissertation 4.1). context is opaque to the core
    (the server puts the new node's address there)."""

    type: ConfChangeType
    node_id: str
    context: bytes = b""

    def encode(self) -> bytes:
        return msgpack.packb([1, int(self.type), self.node_id, self.context], use_bin_type=True)

    @classmethod
    def decode(cls, data: bytes) -> ConfChange:
        try:
            version, kind, node_id, context = msgpack.unpackb(data, raw=False)
            if version != 1 or not isinstance(node_id, str) or not isinstance(context, bytes):
                raise ValueError("bad field")
            return cls(ConfChangeType(kind), node_id, context)
        except Exception as e:  # noqa: BLE001 - any decode failure is one clear error
            raise ValueError(f"malformed ConfChange entry: {e}") from None


@dataclass(frozen=True, slots=True)
class Message:
    """One flat message shape for every MsgType (as etcd's raftpb.Message): fields that a type
    does not use stay at their defaults."""

    type: MsgType
    to: str
    sender: str
    term: int
    log_term: int = 0
    index: int = 0
    entries: tuple[Entry, ...] = ()
    commit: int = 0
    reject: bool = False
    reject_hint: int = 0
    context: bytes = b""


@dataclass(frozen=True, slots=True)
class HardState:
    """What must be on disk before any message that depends on it is sent."""

    term: int = 0
    vote: str | None = None  # the candidate voted for in `term`
    commit: int = 0


@dataclass(frozen=True, slots=True)
class SnapshotMeta:
    """The compacted log prefix: entries up to `index` (whose term is `term`) live only in the
    state machine. `voters`/`learners` are the membership in effect at `index`; empty means
    "use the configured initial membership"."""

    index: int = 0
    term: int = 0
    voters: tuple[str, ...] = ()
    learners: tuple[str, ...] = ()

    # A SNAPSHOT message carries the meta in existing fields: index, log_term and, in context,
    # the membership (so the wire format stays one flat array for every message type).
    def membership_context(self) -> bytes:
        return msgpack.packb([1, list(self.voters), list(self.learners)], use_bin_type=True)

    @classmethod
    def from_message(cls, m: Message) -> SnapshotMeta:
        """The meta of a SNAPSHOT message; ValueError if its membership context is malformed."""
        try:
            version, voters, learners = msgpack.unpackb(m.context, raw=False)
            ok = (
                version == 1
                and isinstance(voters, list)
                and isinstance(learners, list)
                and all(isinstance(v, str) and v for v in voters + learners)
                and voters
            )
        except Exception:  # noqa: BLE001 - any decode failure is one clear error
            ok = False
        if not ok:
            raise ValueError("malformed snapshot membership in SNAPSHOT message")
        return cls(m.index, m.log_term, tuple(voters), tuple(learners))


class Role(IntEnum):
    FOLLOWER = 0
    PRE_CANDIDATE = 1
    CANDIDATE = 2
    LEADER = 3


@dataclass(frozen=True, slots=True)
class SoftState:
    """Volatile state worth showing: who leads and what we are. Not persisted."""

    leader: str | None
    role: Role


@dataclass(frozen=True, slots=True)
class ReadState:
    """A linearizable read may be served once applied >= index."""

    index: int
    context: bytes


@dataclass(slots=True)
class Ready:
    """What the core wants done. The ordering contract, in this order:

    1. `messages` may be sent at once, before or while persisting (the leader's appends and
       heartbeats: dissertation 10.2.1; the leader counts itself only once its own write is
       acknowledged through advance()).
    2. Install `snapshot` if not None (state machine and log store), then persist `entries` (if entries[0].index <= the store's last index, first truncate the
       store from that index) and `hard_state` (if not None), then fsync if `must_sync`.
    3. Only then send `persisted_messages` (votes, append acknowledgements, ...).
    4. Apply `committed_entries` in order; serve `read_states` once applied >= their index.
    5. Call advance(ready).
    """

    hard_state: HardState | None = None
    entries: list[Entry] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)
    persisted_messages: list[Message] = field(default_factory=list)
    committed_entries: list[Entry] = field(default_factory=list)
    read_states: list[ReadState] = field(default_factory=list)
    soft_state: SoftState | None = None
    # A snapshot received from the leader: before step 2, replace the state machine with it
    # and reset the log store to it (its entries are gone; the log resumes at index + 1).
    snapshot: SnapshotMeta | None = None

    # True when entries, term or vote changed. A change of commit alone is written but need not
    # be fsynced: after a crash the commit index is learned again from the leader (etcd does
    # the same), so it would only double the fsyncs of every write.
    must_sync: bool = False

    def empty(self) -> bool:
        return not (
            self.snapshot is not None
            or self.hard_state is not None
            or self.entries
            or self.messages
            or self.persisted_messages
            or self.committed_entries
            or self.read_states
            or self.soft_state is not None
        )


class RaftError(Exception):
    """Base class of errors the core raises to its caller."""


class NotLeader(RaftError):
    """Raised when a proposal or leader-only request reaches a node that is not the leader.
    `leader` is the id of the leader this node believes in, or None."""

    def __init__(self, leader: str | None):
        super().__init__(f"not the leader (leader hint: {leader})")
        self.leader = leader


class ProposalDropped(RaftError):
    """Raised when the leader refuses a proposal for now: a leadership transfer is in progress,
    or another membership change is still uncommitted. Safe to retry."""

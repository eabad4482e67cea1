"""Invariants checked at the moment a belief forms, not when damage shows later.

The end-of-step checks in cluster.py (Election Safety, Log Matching, State Machine Safety,
Leader Completeness, acknowledged writes) see a broken rule only once it has done harm: an
entry committed too early is caught only if a later leader overwrites it, which needs a second
election with the right logs. The checks here run right after every call into a core (step,
tick, propose, read_index, transfer, advance) and judge the decision just made against ground
truth that only the simulator has: every node's synced disk, every node's log, the time each
message was processed.

- Commit durability: when a leader advances its commit index to N, a majority of its voters
  hold entry N on their *synced* disks.
- Commit safety: and no voter lacking entry N could win an election, i.e. no such voter has a
  (synced) log at least as up to date as those of a majority of voters (Figure 8's danger).
- Follower commit: a follower's new commit index covers only entries equal to its leader's.
- Vote restriction: a granted vote (or pre-vote) is never for a candidate whose log is less up
  to date than the voter's; one vote per term, whatever crashes came between (checked on send).
- Vote and append durability: a vote leaves a node only once its synced hard state holds it,
  an append acknowledgement only once its synced log reaches the acknowledged index.
- Read confirmation: a released read was confirmed by acknowledgements from a majority that
  processed the leader's heartbeat after the read arrived; no leader of a higher term had been
  elected when it arrived; its index covers every index committed anywhere when it arrived.
- Membership: a leader appends a membership change only while no other change is uncommitted
  in its log and once an entry of its own term has committed.
- Transfer: TimeoutNow goes only to a target (still in the leader's term) holding the
  leader's whole log.
- CheckQuorum: with check_quorum on, a leader that has not heard from a majority of its voters
  in two election timeouts (of its own ticks) no longer leads.

Every check is sound for a correct core: it holds on every schedule, whatever the faults.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from raftsql.raft.types import EntryType, Message, MsgType, Role

if TYPE_CHECKING:
    from raftsql.sim.cluster import SimNode, Simulation


class Invariants:
    def __init__(self, sim: Simulation, election_ticks: int):
        self.sim = sim
        self.e = election_ticks
        self.votes: dict[tuple[str, int], str] = {}  # (voter, term) -> candidate granted
        self.elected: dict[int, tuple[str, int]] = {}  # term -> (leader, time first seen leading)
        self.max_commit = 0  # the highest commit index any node has reached
        # (leader, term, ctx) -> (time the read arrived, max_commit then)
        self.read_arrival: dict[tuple[str, int, bytes], tuple[int, int]] = {}
        # (follower, leader, term, ctx) -> when the follower first processed such a heartbeat
        self.hb_seen: dict[tuple[str, str, int, bytes], int] = {}
        # (leader, term) -> {voter: latest processing time of an acknowledgement it received}
        self.hb_acked: dict[tuple[str, int], dict[str, int]] = {}
        # (leader, term) -> {voter: the leader's tick count when a response last arrived}
        self.heard: dict[tuple[str, int], dict[str, int]] = {}
        self.lead_since: dict[tuple[str, int], int] = {}  # (leader, term) -> its tick count then
        self.lead_voters: dict[tuple[str, int], frozenset[str]] = {}  # the voters lead_since is for

    def fail(self, invariant: str, detail: str):
        from raftsql.sim.cluster import Violation

        raise Violation(invariant, detail)

    # ------------------------------------------------------------ around every call

    @staticmethod
    def before(node: SimNode) -> tuple:
        c = node.core
        log = c.log
        return (
            c.role, c.term, log.committed, len(c._msgs), len(c._msgs_after), len(c._read_states),
            log.last_term(), log.last_index(),
        )

    def after(self, node: SimNode, b: tuple, m: Message | None = None, read: bytes | None = None) -> None:
        c = node.core
        if c is None:
            return
        role, term, committed, nm, nma, nrs, last_term, last_index = b
        now = self.sim.now
        if c.role == Role.LEADER and (role != Role.LEADER or term != c.term):
            self.elected.setdefault(c.term, (node.id, now))
            self.lead_since[(node.id, c.term)] = node.ticks
        was_leader = role == Role.LEADER and c.role == Role.LEADER and term == c.term
        if m is not None:
            if was_leader and m.term == c.term:
                if m.type in (MsgType.APPEND_RESP, MsgType.HEARTBEAT_RESP) and m.sender in c.progress:
                    self.heard.setdefault((node.id, c.term), {})[m.sender] = node.ticks
                if m.type == MsgType.HEARTBEAT_RESP and m.context:
                    seen = self.hb_seen.get((m.sender, node.id, c.term, m.context))
                    if seen is not None:
                        acks = self.hb_acked.setdefault((node.id, c.term), {})
                        acks[m.sender] = max(acks.get(m.sender, -1), seen)
                elif m.type == MsgType.READ_INDEX:
                    self._arrived(node.id, c.term, m.context)
            elif m.type == MsgType.HEARTBEAT and c.term == m.term and c.leader == m.sender:
                self.hb_seen.setdefault((node.id, m.sender, m.term, m.context), now)
        if read is not None and was_leader:
            self._arrived(node.id, c.term, read)
        if c.log.committed > committed:
            if c.log.committed > self.max_commit:
                self.max_commit = c.log.committed
            if c.role == Role.LEADER:
                self._leader_commit(node)
            else:
                self._follower_commit(node, committed)
        msgs = c._msgs[nm:] + c._msgs_after[nma:] if len(c._msgs) > nm or len(c._msgs_after) > nma else ()
        for out in msgs:
            t = out.type
            if t in (MsgType.VOTE_RESP, MsgType.PRE_VOTE_RESP) and not out.reject and m is not None:
                if not (m.log_term > last_term or (m.log_term == last_term and m.index >= last_index)):
                    self.fail(
                        "Vote restriction",
                        f"{node.id} (log ends {last_index}:{last_term}) granted a {t.name} to "
                        f"{out.to} for term {out.term}, whose log ends {m.index}:{m.log_term}",
                    )
            elif t == MsgType.TIMEOUT_NOW:
                self._timeout_now(node, out)
            elif t == MsgType.READ_INDEX_RESP and not out.reject and c.role == Role.LEADER:
                self._released(node, out.context, out.index)
        if len(c._read_states) > nrs and c.role == Role.LEADER:
            for rs in c._read_states[nrs:]:
                self._released(node, rs.context, rs.index)

    # ------------------------------------------------------------ commits

    def _disk_last(self, nid: str) -> tuple[int, int]:
        disk = self.sim.nodes[nid].disk
        if disk.entries:
            e = disk.entries[-1]
            return e.term, e.index
        return disk.snapshot.term, disk.snapshot.index

    def _disk_holds(self, nid: str, index: int, term: int) -> bool:
        disk = self.sim.nodes[nid].disk
        snap = disk.snapshot
        if index <= snap.index:
            if index == snap.index:
                return snap.term == term
            return self.sim.committed.get(index, (term,))[0] == term
        off = index - snap.index - 1
        return off < len(disk.entries) and disk.entries[off].term == term

    def _leader_commit(self, node: SimNode) -> None:
        c = node.core
        n = c.log.committed
        t = c.log.term(n)
        voters = sorted(c.voters)
        quorum = len(voters) // 2 + 1
        holders = [v for v in voters if self._disk_holds(v, n, t)]
        if len(holders) < quorum:
            self.fail(
                "Commit durability",
                f"{node.id} (leader, term {c.term}) commits {n}:{t}, but only {holders} of voters "
                f"{voters} hold it on their synced disks",
            )
        lasts = {v: self._disk_last(v) for v in voters}
        for cand in voters:
            if cand in holders:
                continue
            ct, ci = lasts[cand]
            electors = [v for v in voters if ct > lasts[v][0] or (ct == lasts[v][0] and ci >= lasts[v][1])]
            if len(electors) >= quorum:
                self.fail(
                    "Commit safety",
                    f"{node.id} (leader, term {c.term}) commits {n}:{t}, but {cand}, whose synced "
                    f"log ends {ci}:{ct} without it, could be elected by {electors} (synced logs end "
                    + ", ".join(f"{v} {lasts[v][1]}:{lasts[v][0]}" for v in voters) + ")",
                )

    def _follower_commit(self, node: SimNode, old: int) -> None:
        c = node.core
        who = self.elected.get(c.term)
        if who is None:
            return
        leader = self.sim.nodes[who[0]]
        if leader.core is None or leader.core.term != c.term:
            return
        llog, log = leader.core.log, c.log
        for idx in range(max(old + 1, log.first_index()), log.committed + 1):
            mine, theirs = log.term(idx), llog.term(idx)
            if mine is not None and theirs is not None and mine != theirs:
                self.fail(
                    "Follower commit",
                    f"{node.id} (follower, term {c.term}) commits {idx}:{mine}, but its leader "
                    f"{leader.id} holds {idx}:{theirs}",
                )

    # ------------------------------------------------------------ reads

    def _arrived(self, leader: str, term: int, ctx: bytes) -> None:
        self.read_arrival.setdefault((leader, term, ctx), (self.sim.now, self.max_commit))

    def _released(self, node: SimNode, ctx: bytes, index: int) -> None:
        c = node.core
        arrival = self.read_arrival.get((node.id, c.term, ctx))
        if arrival is None:
            return
        t0, committed_then = arrival
        acks = self.hb_acked.get((node.id, c.term), {})
        voters = sorted(c.voters)
        confirmed = [v for v in voters if v == node.id or acks.get(v, -1) > t0]
        if len(confirmed) < len(voters) // 2 + 1:
            self.fail(
                "Read confirmation",
                f"{node.id} (leader, term {c.term}) released read {ctx!r} (arrived at t={t0}) "
                f"confirmed after its arrival only by {confirmed} of voters {voters}",
            )
        if index < committed_then:
            self.fail(
                "Read confirmation",
                f"{node.id} (leader, term {c.term}) released read {ctx!r} at index {index}, but "
                f"{committed_then} was committed when it arrived (t={t0})",
            )
        for term, (who, at) in self.elected.items():
            if term > c.term and at <= t0:
                self.fail(
                    "Read confirmation",
                    f"{node.id} (leader, term {c.term}) released read {ctx!r}, which arrived at "
                    f"t={t0}, after {who} was elected leader of term {term} (t={at})",
                )

    # ------------------------------------------------------------ membership, transfer, votes

    def proposed(self, node: SimNode, index: int, entry_type: EntryType) -> None:
        if entry_type != EntryType.CONF_CHANGE:
            return
        c = node.core
        log = c.log
        others = [e.index for e in log.conf_changes(index - 1) if e.index > log.committed]
        if others:
            self.fail(
                "Membership",
                f"{node.id} (leader, term {c.term}) appends a membership change at {index} while "
                f"{others} are uncommitted (commit index {log.committed})",
            )
        if log.committed < index and log.term(log.committed) != c.term:
            self.fail(
                "Membership",
                f"{node.id} (leader, term {c.term}) appends a membership change at {index} before "
                f"an entry of its term commits (commit {log.committed}:{log.term(log.committed)})",
            )

    def _timeout_now(self, node: SimNode, m: Message) -> None:
        target = self.sim.nodes.get(m.to)
        if target is None or target.core is None or target.core.term != m.term:
            return  # down, or in another term already: it ignores the message
        log = node.core.log
        last, lterm = log.last_index(), log.last_term()
        if not target.core.log.match_term(last, lterm):
            tl = target.core.log
            self.fail(
                "Transfer",
                f"{node.id} (leader, term {m.term}) sends TimeoutNow to {m.to}, whose log ends "
                f"{tl.last_index()}:{tl.last_term()}, before it holds {last}:{lterm}",
            )

    def sent(self, m: Message) -> None:
        """A message leaves the node: what it promises about the sender's disk must be on it."""
        if m.type == MsgType.VOTE_RESP and not m.reject:
            hs = self.sim.nodes[m.sender].disk.hard_state
            # A later term on disk keeps the promise too: the node never goes back to m.term.
            if hs.term < m.term or (hs.term == m.term and hs.vote != m.to):
                self.fail(
                    "Vote durability",
                    f"{m.sender} sends its vote for {m.to} in term {m.term}, but its synced hard "
                    f"state is term {hs.term} vote {hs.vote}",
                )
            prev = self.votes.setdefault((m.sender, m.term), m.to)
            if prev != m.to:
                self.fail(
                    "Election Safety",
                    f"{m.sender} granted its vote in term {m.term} to {prev} and then to {m.to}",
                )
        elif m.type == MsgType.APPEND_RESP and not m.reject and m.index:
            term, last = self._disk_last(m.sender)
            if last < m.index:
                self.fail(
                    "Append durability",
                    f"{m.sender} acknowledges entries up to {m.index} to {m.to} (term {m.term}), "
                    f"but its synced log ends at {last}:{term}",
                )

    # ------------------------------------------------------------ CheckQuorum

    def ticked(self, node: SimNode) -> None:
        c = node.core
        if c.role != Role.LEADER or not c.cfg.check_quorum:
            return
        key = (node.id, c.term)
        since = self.lead_since.get(key)
        t = node.ticks
        if since is None:
            return
        if self.lead_voters.get(key) != c.voters:
            # A new configuration counts from now: the last check used the old one.
            self.lead_voters[key] = frozenset(c.voters)
            self.lead_since[key] = since = t
        if t - since <= self.e + 1:
            return
        heard = self.heard.get((node.id, c.term), {})
        window = t - 2 * self.e - 1
        voters = sorted(c.voters)
        active = [v for v in voters if v == node.id or heard.get(v, -1) >= window]
        if len(active) < len(voters) // 2 + 1:
            self.fail(
                "CheckQuorum",
                f"{node.id} still leads term {c.term} after {2 * self.e + 1} of its ticks without "
                f"hearing from a majority of {voters} (heard from {active})",
            )

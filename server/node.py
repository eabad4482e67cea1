"""A raftsql node: drives the pure Raft core with real time, real disks and real sockets.

The node owns its parts, each with a narrow interface: the log store (server/logstore.py), the
Raft core, the Ready driver (server/ready.py), the state machine (server/statemachine.py),
snapshots (server/snapshot.py), membership (server/membership.py), the applier and the waiting
clients (server/applier.py), the transport (server/transport.py) and the client service
(server/clients.py).

Runtime (server/DESIGN.md, "Node runtime"): the thread that changes the core drives it. A
client thread that proposes, a peer connection's reader that steps a message, the ticker
that ticks: each then takes the driver role (if free) and carries out the Ready itself:
writes the messages on the peer sockets, appends and fsyncs, hands committed entries to the
apply thread. Whatever arrives meanwhile waits in the core and goes out with the next Ready
(group commit). A thread drives at most INLINE_ROUNDS Readies, then leaves the rest to the
ready thread, so that no client waits behind others' work and no reader stops reading.

Threads:
- ticker: calls core.tick() every tick_ms, then drives;
- ready: drives whenever work is left that no other thread took on (and snapshots/compaction);
- apply: applies every committed entry (server/applier.py); never drives Raft, so SQLite work
  of any length never holds up heartbeats, votes, appends or fsyncs;
- transport: per-connection readers (they step and drive) and per-peer senders, which write
  only what a direct write could not (server/transport.py);
- one thread per client connection (server/clients.py) calling execute()/status().

Every touch of the core happens under self._lock; the slow work (fsync, SQLite) never does.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import apsw

from raftsql.command import Command, CommandError, CommandKind, Many
from raftsql.protocol import NOT_READONLY, ErrorKind, RequestError
from raftsql.raft.core import Config, Raft
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
from raftsql.server import metrics, reseed
from raftsql.server.applier import Applier, Waiter, Waiters
from raftsql.server.clients import ClientService
from raftsql.server.config import NodeConfig
from raftsql.server.fileperms import secure_data_dir
from raftsql.server.logstore import LogStore
from raftsql.server.membership import Membership, check_node_id
from raftsql.server.ready import EarlyAcks, ReadyDriver
from raftsql.server.records import CLUSTER_OP
from raftsql.server.sandbox import THREAD_STACK_BYTES
from raftsql.server.snapshot import Snapshots
from raftsql.server.sqlerrors import MAX_RESULT_BYTES, damaged
from raftsql.server.statemachine import Result, SQLError, StateMachine
from raftsql.server.transactions import TxnGone, may_read, new_env
from raftsql.server.transport import Transport
from raftsql.sqltext import CANNOT_WRITE_KEYWORDS, first_keyword
from raftsql.trace import Trace

log = logging.getLogger("raftsql.node")

# Readies a client, reader or ticker thread drives before it leaves the rest to the ready thread.
INLINE_ROUNDS = 2
# A Ready's fsync or an apply batch this long means a busy disk: the ticker and the peer readers
# then leave every Ready to the ready thread (Node._disk_busy).
SLOW_DISK_S = 0.05


def _explain(e: BaseException, db_path: str) -> BaseException:
    """A raw SQLite corruption error on this node's own database (read at start, or by any
    internal statement) becomes DatabaseDamagedError, whose message says how to recover; a
    full disk (say during a log write, which names no file) says where and what to do."""
    if isinstance(e, apsw.CorruptError | apsw.NotADBError):
        return damaged(db_path, f"reading it failed: {type(e).__name__}: {e}", str(e))
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        where = e.filename or os.path.dirname(db_path)
        return OSError(e.errno, f"{e.strerror} in {where}: free space on that file system and "
                                "start the node again (its log and database are intact: an "
                                "entry that was not fully written is dropped at start)")
    return e


class Node:
    def __init__(self, cfg: NodeConfig):
        try:
            self._init(cfg)
        except Exception as e:  # noqa: BLE001 - re-raised, explained
            explained = _explain(e, os.path.join(cfg.data_dir, "db.sqlite"))
            if explained is e:
                raise
            raise explained from e

    def _init(self, cfg: NodeConfig) -> None:
        self.cfg = cfg
        check_node_id(cfg)  # another node's directory is refused before anything in it changes
        secure_data_dir(cfg.data_dir)  # dir 0700, files 0600, umask 077 (server/fileperms.py)
        self.store = LogStore(os.path.join(cfg.data_dir, "raft-log"))
        hs, snap, stored = self.store.initial_state()  # terms and conf changes, no entry data
        self.snapshots = Snapshots(
            cfg.data_dir, os.path.join(cfg.data_dir, "db.sqlite"), entries=cfg.snapshot_entries,
            max_bytes=cfg.snapshot_bytes, trailing=cfg.snapshot_trailing, node_id=cfg.id,
        )
        # Restores db.sqlite from the snapshot file if it is behind the log.
        self.sm: StateMachine = self.snapshots.open_state_machine(snap.index, self._new_state_machine)
        # Bootstrap voters and the address book (server/membership.py).
        pristine = (hs.term == 0 and hs.vote is None and snap.index == 0
                    and stored.last_index == 0 and self.sm.applied_index == 0)
        self.membership = Membership.open(cfg, self.sm.members(), stored.conf_changes,
                                          self.sm.applied_index, pristine=pristine)
        rcfg = Config(
            id=cfg.id,
            voters=cfg.voters(),
            election_ticks=cfg.election_ticks,
            heartbeat_ticks=cfg.heartbeat_ticks,
            logger=log.info,
        )
        # The core's randomness (election timeouts) comes from the OS, seeded once.
        self.core = Raft(rcfg, random.Random(os.urandom(16)), hs, snap, stored, applied=self.sm.applied_index,
                         storage=self.store, log_cache_bytes=cfg.log_cache_bytes)  # DESIGN.md, "Bounded log memory"
        # After `--reseed`: no vote until the log is back to where it was (server/reseed.py).
        self._vote_barrier = reseed.vote_barrier(cfg.data_dir)
        self.core.vote_barrier = self._vote_barrier
        if self._vote_barrier:
            log.warning("%s was re-seeded: it will not vote until its log reaches index %d",
                        cfg.id, self._vote_barrier)
        self._lock = threading.Lock()
        # The ready thread waits on _wake for work nobody else drives.
        self._wake = threading.Condition(self._lock)
        # Separate from _wake so that requests waiting for an election never take a
        # notification meant for the ready thread.
        self._leader_known = threading.Condition(self._lock)
        # stop() waits on _idle until no thread drives.
        self._idle = threading.Condition(self._lock)
        self._driving = False  # the driver role (under _lock): one thread drives at a time
        self._stopping = False
        self._stopped = threading.Event()
        self.trace = Trace() if cfg.trace else None  # raftsql/trace.py
        self._waiters = Waiters(self._lock)
        self._applier = Applier(lambda: self.sm, self._waiters, self._apply_conf_change,
                                self._applied, self.sm.applied_index, self.trace)
        self.early = EarlyAcks(cfg.max_unreplicated_writes, self._answer_early)
        self.driver = ReadyDriver(self.core, self.store, send=self._send, install=self._install,
                                  apply=self._applier.enqueue, done=self._after_ready,
                                  call=self._locked, trace=self.trace, early=self.early)
        # Snapshot work is due (under _lock): taking one, or compacting the log to one. The
        # driver role holder does it (the log store has one writer at a time).
        self._snapshot_work = False
        self._naming_next = 0.0  # when a leader may next propose the cluster's id
        self._leaderless_since: float | None = None  # since when no leader is known
        self._leaderless_hinted = 0.0  # when _leaderless_hint may speak again
        self._rng = random.SystemRandom()
        self._threads: list[threading.Thread] = []
        self._fatal: BaseException | None = None
        self.role = Role.FOLLOWER
        self.leader: str | None = None
        self.last_contact: dict[str, float] = {}
        self.clients = ClientService(self)
        self.transport: Transport | None = None  # set in start()
        self._broken_reads = cfg.hooks.broken_reads
        if self._broken_reads:
            log.warning("%s: test hook broken_reads: linearizable reads are NOT linearizable", cfg.id)
        if cfg.hooks.corrupt_snapshot_transfers:
            log.warning("%s: test hook corrupt_snapshot_transfers: the first %d snapshot "
                        "transfers send a damaged chunk", cfg.id, cfg.hooks.corrupt_snapshot_transfers)

    def _new_state_machine(self, path: str) -> StateMachine:
        return StateMachine(path, session_timeout_ms=self.cfg.session_timeout_ms,
                            query_timeout_s=self.cfg.query_timeout_s, on_admin=self._on_admin,
                            broken_txn_validation=self.cfg.hooks.broken_txn_validation)

    def _on_admin(self, sm: StateMachine, entries: list) -> None:
        """Audit records were applied (a revocation: close its connections; server/clients.py)."""
        clients = getattr(self, "clients", None)  # None while the first database opens
        if clients is not None:
            clients.on_admin(sm, entries)

    @property
    def addresses(self) -> dict[str, str]:
        """Where each node is (the membership's dial addresses; ours as advertised)."""
        return self.membership.addresses

    def database_path(self) -> str:
        return self.sm.path

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        # Every thread started from here on (apply, client service, transport) gets a stack
        # large enough for the deepest statement SQLite can be given (sandbox.prepare_bounded);
        # only the pages a thread touches are backed by memory.
        threading.stack_size(THREAD_STACK_BYTES)
        # Process-wide: a statement whose SQLite memory grows without bound fails with
        # SQLITE_NOMEM rather than getting the node killed (server/DESIGN.md, "Heap limit").
        apsw.hard_heap_limit(self.cfg.sqlite_heap_limit)
        with self._lock:
            members = set(self.core.voters) | set(self.core.learners)
        self.transport = Transport(
            self.cfg.id,
            self.cfg.listen,
            self.membership.dial_list(members),
            self.cfg.certs_dir,
            on_raft=self._on_raft,
            on_client=self.clients.serve,
            max_frame_size=self.cfg.max_frame_size,
            max_request_size=self.cfg.max_request_size,
            max_client_connections=self.cfg.max_client_connections,
            frame_timeout=self.cfg.frame_timeout_s,
            client_idle_timeout=self.cfg.client_idle_timeout_s,
            snapshot_sink=self.snapshots.receiver,
            advertise=self.addresses[self.cfg.id],
            on_peer_hello=self._on_peer_hello,
            corrupt_snapshot_transfers=self.cfg.hooks.corrupt_snapshot_transfers,
            snapshot_chunk_delay=self.cfg.hooks.snapshot_chunk_delay_s,
            is_revoked=lambda name, serial: self.sm.records.is_revoked(name, serial),
            cluster_id=lambda: self.sm.records.cluster_id,
        )
        self.transport.start()
        for name, target in (("ticker", self._ticker), ("ready", self._ready_loop), ("apply", self._apply_loop)):
            t = threading.Thread(target=target, name=f"{self.cfg.id}-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        self._kick()  # a restarted node may have committed entries to apply
        log.info("%s listening on %s:%s (peers: %s)", self.cfg.id, *self.cfg.listen, self.addresses)
        known = self.membership.book.get(self.cfg.id)
        if known is not None and known != self.addresses[self.cfg.id]:
            log.warning("%s: the cluster knows this node at %s, and it now listens at %s: each peer "
                        "switches once this node has dialed it, but clients and peers that start "
                        "later try %s first. Start it with --listen (or --advertise) %s to keep "
                        "its address", self.cfg.id, known, self.addresses[self.cfg.id], known, known)

    def stop(self, graceful: bool = True, timeout: float = 3.0) -> None:
        """Stop the node. A graceful stop of a leader first hands leadership to the most
        up-to-date voter, so clients see a pause of one round trip instead of an election."""
        if graceful:
            try:
                leader = self.hand_over_leadership(time.monotonic() + timeout, wait_for_name=True)
                if leader is not None:
                    log.info("%s handed leadership to %s before exiting", self.cfg.id, leader)
            except RequestError as e:
                log.warning("%s could not hand over leadership: %s", self.cfg.id, e.message)
        with self._lock:
            self._stopping = True
            self._wake.notify_all()
            self._leader_known.notify_all()
            self._fail_all(ErrorKind.UNAVAILABLE, "node is shutting down; the request was not applied", proposals_unknown=True)
            # A thread in the middle of a Ready finishes it (its fsync) before the store closes.
            limit = time.monotonic() + timeout
            while self._driving and time.monotonic() < limit:
                self._idle.wait(0.1)
        self._applier.stop()
        end = time.monotonic() + timeout  # one budget for all of them, not one each
        for t in self._threads:
            t.join(max(0.0, end - time.monotonic()))
        if self.transport is not None:
            self.transport.stop()
        self.snapshots.wait_idle(5.0)
        self.store.close()
        self.sm.close()
        self._stopped.set()

    def hand_over_leadership(self, deadline: float, wait_for_name: bool = False) -> str | None:
        """Transfer leadership to the most up-to-date voter and wait (at most until deadline,
        and about two election timeouts) until it leads; returns its id. None if this node is
        not the leader or the only voter. Raises UNAVAILABLE if it did not happen in time (the
        transfer is then cancelled, so this node accepts writes again). wait_for_name: also
        wait (up to 0.2 s) until the new leader's first append names it, so that requests
        arriving meanwhile are redirected to it, not into a backoff."""
        with self._lock:
            if self.core.role != Role.LEADER or len(self.core.voters) < 2:
                return None
            cands = [(p.match, nid) for nid, p in self.core.progress.items()
                     if nid != self.cfg.id and nid in self.core.voters]
            if not cands:
                return None
            target = max(cands)[1]
            try:
                self.core.transfer_leadership(target)
            except (NotLeader, ValueError) as e:
                raise RequestError(ErrorKind.UNAVAILABLE, f"cannot transfer leadership: {e}") from None
        self._drive()
        limit = min(deadline, time.monotonic() + 2 * self.cfg.election_ticks * self.cfg.tick_ms / 1000.0)
        while time.monotonic() < limit:
            with self._lock:
                if self.core.role != Role.LEADER:
                    if wait_for_name:
                        self._await_leader(min(limit, time.monotonic() + 0.2))
                    return self.core.leader or target
            time.sleep(0.005)
        with self._lock:
            if self.core.role == Role.LEADER:
                self.core.transfer_leadership(self.cfg.id)  # cancel: accept writes again
        self._drive()
        raise RequestError(ErrorKind.UNAVAILABLE, f"could not hand leadership to {target} in time; try again")

    def wait_stopped(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)

    # ---------------------------------------------------------------- inputs

    def _on_raft(self, msgs: list[Message]) -> None:
        """Messages from a peer (its connection's reader thread): step them, then drive."""
        now = time.monotonic()
        with self._lock:
            for m in msgs:
                self.last_contact[m.sender] = now
                if self.snapshots.accept(m):  # a SNAPSHOT only with its data received
                    self.core.step(m)
        if self.trace is not None:
            self._trace_received(msgs)
        self._drive(responsive=True)

    def _trace_received(self, msgs: list[Message]) -> None:
        for m in msgs:
            if m.type == MsgType.APPEND and m.entries:
                self.trace.mark_entries(m.entries, "recv")
            elif m.type == MsgType.APPEND_RESP and not m.reject:
                self.trace.mark(m.index, "ack:" + m.sender)

    def _on_peer_hello(self, nid: str, address: str) -> None:
        """A node (authenticated by its node certificate) dialed us and named its address. If
        we have no address for it, use that one, so we can answer it: a member added while we
        were down, whose change reached us only inside a snapshot, would otherwise never hear
        from us (and we could never catch up). Known addresses (and --peer overrides) stay.
        The dialer need not be a member in our (possibly stale) view: the leader that adds a
        node may itself be one we never saw added. A transport peer costs nothing until the
        core sends to it, and the core sends only to members."""
        if self.transport is None or nid in self.transport.peer_status():
            return
        log.info("%s: learned %s's address %s from its hello", self.cfg.id, nid, address)
        self.transport.add_peer(nid, self.membership.learned(nid, address))

    def _ticker(self) -> None:
        period = self.cfg.tick_ms / 1000.0
        nxt = time.monotonic()
        while not self._stopping:
            nxt += period
            delay = nxt - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                nxt = time.monotonic()  # we fell behind (machine overloaded): do not burst
            with self._lock:
                if self._stopping:
                    return
                self.core.tick()
                self._name_cluster()
                leader = self.core.leader
            self._drive(responsive=True)
            self._leaderless_hint(leader)

    def _leaderless_hint(self, leader: str | None) -> None:
        """No leader for 30 s (cfg.hooks.leaderless_hint_s) while peers are connected: say
        what usually causes it (at most every 5 minutes). A new node started with --peer instead of --join, or
        one whose id its peers never added, pre-votes forever and hears nothing back."""
        now = time.monotonic()
        if leader is not None:
            self._leaderless_since = None
            return
        if self._leaderless_since is None:
            self._leaderless_since = now
            return
        if now - self._leaderless_since < self.cfg.hooks.leaderless_hint_s or now < self._leaderless_hinted:
            return
        peers = self.transport.peer_status() if self.transport is not None else {}
        connected = sorted(p for p, st in peers.items() if st["connected"])
        if not connected:
            return
        self._leaderless_hinted = now + 300
        log.warning("%s: no leader for %.0f s although %s %s connected. If this node is new to a "
                    "running cluster, it must be added first: start it with --join DSN (a new "
                    "id cannot start with --peer), or add it with `raftsql cluster add`; if it "
                    "is a member, check that a majority of the voters is up",
                    self.cfg.id, now - self._leaderless_since, ", ".join(connected),
                    "is" if len(connected) == 1 else "are")

    def _name_cluster(self) -> None:
        """Called with the lock held, on every tick. A leader of a cluster that has no id yet
        (a new one, or one made before ids existed) proposes one: an ADMIN record with 16
        random bytes. The first applied wins on every node (server/records.py), so a second
        proposal (a leader change before the first applied) changes nothing. No one waits for
        it: if it is lost, the next try comes 2 s later."""
        if (self.core.role != Role.LEADER or self.sm.records.cluster_id is not None
                or time.monotonic() < self._naming_next):
            return
        self._naming_next = time.monotonic() + 2.0
        cmd = self._stamped((), "", 0, kind=CommandKind.ADMIN,
                            record={"op": CLUSTER_OP, "cluster_id": os.urandom(16).hex()})
        try:
            self.core.propose(cmd.encode())
        except (NotLeader, ProposalDropped):
            pass

    # ---------------------------------------------------------------- driving the core

    def _has_work(self) -> bool:
        """Called with the lock held."""
        return self._snapshot_work or self.core.has_ready()

    def _disk_busy(self) -> bool:
        """Is an fsync likely to take long now? The last one did, or the apply thread has been
        writing one batch for a while (a 400 MB entry: every node's log fsync then waits
        behind that data on the same disk, for seconds)."""
        if self.driver.last_sync_s > SLOW_DISK_S:
            return True
        since = self._applier.busy_since
        return since is not None and time.monotonic() - since > SLOW_DISK_S

    def _drive(self, rounds: int = INLINE_ROUNDS, responsive: bool = False) -> None:
        """Carry out what the core wants, in this thread, if no other thread is at it: at most
        `rounds` Readies, then the ready thread takes over what is left. Called without the
        lock by every thread that changed the core. A failure (a disk, a corrupt entry) stops
        the node."""
        lock = self._lock
        try:
            with lock:
                if self._stopping:
                    return
                if self._driving and not responsive:
                    return  # a client thread: the driving thread carries its proposal out
                early = self._driving
                if not early and responsive and self._disk_busy():
                    # A ticker or peer reader must not sit in a long fsync: heartbeats and
                    # their responses leave from here, the ready thread does the rest.
                    early = True
                    self._wake.notify()
                if not early:
                    if not self._has_work():
                        return
                    self._driving = True
            if early:
                # A ticker or peer reader while another thread carries out a Ready, maybe in a
                # long fsync (or the disk is busy): heartbeats and their responses leave now.
                self.driver.send_early()
                return
            n = 0
            while True:
                if self._snapshot_work:
                    self._snapshot_housekeeping()
                rd = self.driver.begin()
                if rd is not None:
                    self.driver.finish(rd)
                    if self._vote_barrier:
                        self._check_vote_barrier()
                n += 1
                with lock:
                    if self._stopping or not self._has_work():
                        self._driving = False
                        if self._stopping:
                            self._idle.notify_all()
                        return
                    if n >= rounds:
                        self._driving = False
                        self._wake.notify()  # more than our share: the ready thread goes on
                        return
        except BaseException as e:  # noqa: BLE001 - a failed disk or corrupt entry stops the node
            self._die(e, "Ready driver")

    @staticmethod
    def _answer_early(index: int, term: int, w: Waiter) -> None:
        """A durability="leader" write whose entry this leader's disk now holds (EarlyAcks):
        answered now. Its apply later finishes the waiter again, unseen."""
        metrics.EARLY_ACKS.inc()
        w.finish(result=Result(index=index, early_term=term))

    def _kick(self) -> None:
        """Let the ready thread drive (from a thread that must not: a sender, the applier)."""
        with self._lock:
            self._wake.notify()

    def _ready_loop(self) -> None:
        """Drives whatever no other thread did: the rest after a thread's INLINE_ROUNDS,
        snapshot work, a snapshot transfer's outcome."""
        lock = self._lock
        while True:
            with lock:
                while not self._stopping and (self._driving or not self._has_work()):
                    self._wake.wait(0.5)
                if self._stopping:
                    return
            self._drive(rounds=1 << 62)

    def _locked(self, fn: Any, *args: Any) -> Any:
        with self._lock:
            return fn(*args)

    def _send(self, msgs: list[Message]) -> None:
        """The driver's network: SNAPSHOT messages go with their file (the transport streams
        it), the rest are written on the peer sockets."""
        self.transport.send(self.snapshots.outgoing(msgs, self.transport.send_snapshot,
                                                    self._report_snapshot))

    def _install(self, meta: SnapshotMeta) -> None:
        """A snapshot from the leader replaces the database and the log (server/snapshot.py),
        once everything committed before it is applied."""
        self._applier.drain()
        self.sm = self.snapshots.install(meta, self.store, self.sm, self._new_state_machine)
        with self._lock:
            members = set(self.core.voters) | set(self.core.learners)
        # Membership changes inside the snapshot were never applied here one by one.
        self._update_transport(self.membership.adopt(self.sm.members(), members))

    def _after_ready(self, rd: Ready) -> None:
        if rd.soft_state is not None:
            self._on_soft_state(rd)
        if rd.read_states:
            with self._lock:
                found = [(self._waiters.reads.pop(rs.context, None), rs.index) for rs in rd.read_states]
            for w, index in found:
                if w is not None:
                    w.finish(result=index)

    def _snapshot_housekeeping(self) -> None:
        """With the driver role (the log store's writer): maybe start taking a snapshot,
        compact the log to a taken one."""
        with self._lock:
            self._snapshot_work = False
        self.snapshots.after_apply(self.sm.applied_index, self._compact_core, self.store,
                                   self._snapshot_taken)

    def _snapshot_taken(self) -> None:
        with self._lock:
            self._snapshot_work = True
            self._wake.notify()

    def _compact_core(self, index: int) -> SnapshotMeta | None:
        with self._lock:
            try:
                return self.core.compact(index)
            except ValueError as e:  # not yet stable: try again after the next batch
                log.debug("%s: compaction to %d deferred: %s", self.cfg.id, index, e)
                return None

    def _report_snapshot(self, to: str, ok: bool) -> None:
        with self._lock:
            self.core.report_snapshot(to, ok)
            self._wake.notify()

    def _check_vote_barrier(self) -> None:
        with self._lock:
            durable = self.core.log.stable
        if durable >= self._vote_barrier:
            reseed.lift(self.cfg.data_dir)
            with self._lock:
                self.core.vote_barrier = 0
            log.warning("%s: the re-seeded log reached index %d: voting again", self.cfg.id,
                        self._vote_barrier)
            self._vote_barrier = 0

    def _apply_loop(self) -> None:
        try:
            self._applier.run()
        except BaseException as e:  # noqa: BLE001 - a failed disk or corrupt entry stops the node
            self._die(e, "apply thread")

    def _applied(self, nbytes: int) -> None:
        """The apply thread finished a batch: if that makes snapshot work due, the ready thread
        does it (no wake-up otherwise)."""
        if self.snapshots.note_applied(nbytes, self.sm.applied_index):
            self._snapshot_taken()

    def _die(self, e: BaseException, where: str) -> None:
        self._fatal = e
        e = _explain(e, self.sm.path)
        log.critical("%s: fatal error in the %s, stopping: %s", self.cfg.id, where, e, exc_info=True)
        with self._lock:
            self._stopping = True
            self._fail_all(ErrorKind.UNAVAILABLE, f"node failed: {e}", proposals_unknown=True)
        os._exit(70)  # EX_SOFTWARE: never keep serving with a state we cannot trust

    def _apply_conf_change(self, cc: ConfChange) -> None:
        """A committed membership change, in log order (the applier, before applying it)."""
        change = self.membership.apply(cc)  # the address book, fsynced
        if change is not None:
            self._update_transport([change])
        if cc.node_id == self.cfg.id and cc.type == ConfChangeType.REMOVE:
            # The core's configuration holds every change in its log: a removal replayed by a
            # node that was added again later (its re-add is in the log too) is history.
            with self._lock:
                member = self.cfg.id in self.core.voters or self.cfg.id in self.core.learners
            if not member:
                log.warning("%s: this node was removed from the cluster; stop its process",
                            self.cfg.id)

    def _update_transport(self, changes: list[tuple[str, str, Any]]) -> None:
        if self.transport is None:
            return
        for what, nid, addr in changes:
            if what == "add":
                self.transport.add_peer(nid, addr)
            else:
                self.transport.remove_peer(nid)

    def _on_soft_state(self, rd: Ready) -> None:
        ss = rd.soft_state
        with self._lock:
            was_leader = self.role == Role.LEADER
            old_leader = self.leader
            self.role, self.leader = ss.role, ss.leader
            metrics.leader_changed(old_leader, ss.leader)
            if ss.leader is not None:
                self._leader_known.notify_all()
            if was_leader and ss.role != Role.LEADER:
                # Entries we proposed may or may not commit under the next leader. Those already
                # committed (queued for the apply thread) get their result from it.
                self._fail_all(ErrorKind.OUTCOME_UNKNOWN, "leadership was lost before the write was applied",
                               proposals_unknown=True, keep_upto=self._applier.queued_to)
            elif old_leader != ss.leader and self._waiters.reads:
                # Reads forwarded to a leader that is gone will never be answered.
                self._waiters.fail_reads(ErrorKind.NOT_LEADER, "the leader changed; retry the read",
                                         self._leader_hint())

    def _fail_all(self, kind: ErrorKind, message: str, proposals_unknown: bool, keep_upto: int = 0) -> None:
        """Called with the lock held: fail every waiting request (server/applier.py)."""
        self._waiters.fail(kind, message, self._leader_hint(), proposals_unknown, keep_upto)

    def _leader_hint(self) -> tuple[str | None, str | None]:
        ld = self.core.leader
        if ld is None or ld == self.cfg.id and self.core.role != Role.LEADER:
            return None, None
        return ld, self.addresses.get(ld)

    def _not_leader(self, leader: str | None = None) -> RequestError:
        ld = leader if leader is not None else self.core.leader
        return RequestError(ErrorKind.NOT_LEADER, f"{self.cfg.id} is not the leader", ld, self.addresses.get(ld) if ld else None)

    # ---------------------------------------------------------------- client API

    def execute(
        self,
        statements: list[tuple[str, Any]],
        *,
        client_id: str = "",
        serial: int = 0,
        consistency: str = "linearizable",
        min_index: int = 0,
        timeout_s: float | None = None,
        reads: set[str] | None = None,
        commit: tuple[int, tuple[str, ...], int] | None = None,
        chunk: int | None = None,
        whole: int = MAX_RESULT_BYTES,
        refuse_write: RequestError | None = None,
        durability: str = "quorum",
        min_term: int = 0,
    ):
        """Run statements (one, or an atomic batch). SQLite decides if they only read: a single
        read-only statement is served as a read at the requested consistency; anything else
        is replicated as one log entry. Returns a statemachine.Result (SQL errors inside it);
        raises RequestError when the request was not (or may not have been) served.

        reads: a transaction's read before its first write; the tables it read are added.
        commit: (read_index, read_set, last_ms) makes the entry a transaction's commit (TXN),
        applied only if the check passes (see DESIGN.md, "Serializable transactions").
        chunk: a read returns about this many bytes of rows, and the rest in Result.stream
        (the client fetches it); None: the whole result, up to `whole` bytes of rows.
        refuse_write: raised instead of proposing a write (the certificate may only read).
        durability: "leader" answers a write (outside a transaction, returning no rows) once
        the leader's disk holds it, within max_unreplicated_writes (DESIGN.md, "Leader
        durability"). min_term: a read waits for min_index while that term lasts (the client's
        own write answered at durability "leader")."""
        if self._stopping:
            ld, addr = self._leader_hint()
            if ld is not None and ld != self.cfg.id:
                # Stopping after handing leadership over: send the client to the new leader.
                raise RequestError(ErrorKind.NOT_LEADER, f"{self.cfg.id} is shutting down", ld, addr)
            raise RequestError(ErrorKind.UNAVAILABLE, "node is shutting down")
        timeout = min(timeout_s or self.cfg.request_timeout_s, self.cfg.request_timeout_s)
        deadline = time.monotonic() + timeout
        if not statements:
            raise RequestError(ErrorKind.BAD_REQUEST, "no statements")
        if consistency not in ("linearizable", "leader", "stale"):
            raise RequestError(ErrorKind.BAD_REQUEST, f"unknown consistency {consistency!r}")
        # A lagging follower must not answer "no such table" for a table a client just created:
        # a stale read first waits for its min_index, and a follower that finds an SQL error
        # defers to the leader (NOT_LEADER) instead of answering from older state.
        with self._lock:
            if consistency != "stale" and self._leader_unsure():
                self._await_leader(deadline)
            is_leader = self.core.role == Role.LEADER
        if consistency == "stale" and min_index > self.sm.applied_index:
            self._await_own_write(min_index, min_term, deadline)
        elif not is_leader and (consistency == "leader" or len(statements) != 1):
            raise self._not_leader()
        returns_rows: list[bool] = []
        try:
            # Read before validating: if the client's own write (answered at durability
            # "leader") was applied only while validate ran, validate may not have seen it, and
            # checking applied_index afterwards would wrongly take its error as final.
            applied_before = self.sm.applied_index
            try:
                readonly = self.sm.validate(statements, returns_rows)
            except SQLError:
                if not (min_term and min_index > applied_before):
                    raise
                # It may need the client's own write answered at durability "leader" (a table
                # it created): prepare again once that is applied, or its term is over.
                self._await_own_write(min_index, min_term, deadline)
                returns_rows.clear()
                readonly = self.sm.validate(statements, returns_rows)
        except SQLError as e:
            if serial and client_id:
                # A resend of a write this node already applied (its first attempt created
                # the table it now fails to prepare against): the stored result, as apply
                # would give for a duplicate.
                stored = self.sm.reads.stored_result(client_id, serial)
                if stored is not None:
                    return stored
            if not is_leader and consistency != "stale":
                raise self._not_leader() from None
            return Result(error=e.error, index=self.sm.applied_index)
        for (_, params), ro in zip(statements, readonly, strict=True):
            if ro and type(params) is Many:
                raise RequestError(
                    ErrorKind.BAD_REQUEST, "a many statement (executemany) can only execute DML statements"
                )
        if commit is None and len(statements) == 1 and readonly[0]:
            sql, params = statements[0]
            if consistency == "linearizable" and not self._broken_reads:
                self.wait_read_index(deadline)  # on a follower, through the leader
            elif consistency == "leader":
                with self._lock:
                    if self.core.role != Role.LEADER:
                        raise self._not_leader()
            if min_term and consistency != "stale" and min_index > self.sm.applied_index:
                self._await_own_write(min_index, min_term, deadline)
            return self._read(sql, params, reads, None, chunk, client_id, whole)
        if not is_leader:
            raise self._not_leader()
        if refuse_write is not None:
            raise refuse_write  # server/access.py: nothing was proposed
        early = (durability == "leader" and commit is None and self.early.window > 0
                 and not any(returns_rows))
        return self._write(statements, client_id, serial, deadline, commit, early=early)

    def _await_own_write(self, index: int, term: int, deadline: float) -> None:
        """Wait until `index` is applied here (a stale read's min_index, or the client's own
        write answered at durability "leader"). With `term` (that write's): only while this
        node's term is still that one; after a leader change the write may have been lost,
        and the read then shows whatever the new leader committed."""
        while self.sm.applied_index < index:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RequestError(ErrorKind.TIMEOUT, f"index {index} not applied on {self.cfg.id} in time")
            if term:
                with self._lock:
                    if self.core.term != term:
                        return
            if self.sm.wait_applied(index, min(left, 0.05 if term else left)):
                return

    def _read(self, sql, params, reads, start_index, chunk, client_id=None, whole=MAX_RESULT_BYTES):
        if chunk is None:
            return self.sm.query(sql, params, reads=reads, start_index=start_index,
                                 max_bytes=whole, client_id=client_id)
        # A row must fit in one response frame, with room for the envelope.
        return self.sm.stream_query(
            sql, params, reads=reads, start_index=start_index, first_bytes=chunk,
            max_row_bytes=self.cfg.max_frame_size - (64 << 10), client_id=client_id,
        )

    def _await_leader(self, deadline: float) -> None:
        """During an election, hold the request (at most about one election) until a leader is
        known, so the client is redirected the moment there is one instead of polling with
        backoff. Called with the lock held."""
        limit = min(deadline, time.monotonic() + 2 * self.cfg.election_ticks * self.cfg.tick_ms / 1000.0)
        while self._leader_unsure() and not self._stopping:
            remaining = limit - time.monotonic()
            if remaining <= 0:
                return
            # Woken when a leader is elected; contact with the old one shows up on the poll.
            self._leader_known.wait(min(remaining, self.cfg.tick_ms / 1000.0))

    def _await_transfer(self, deadline: float) -> None:
        """Called with the lock held: wait (at most an election timeout, the core's own limit
        for a transfer) until this node stops leading or gives up the transfer."""
        limit = min(deadline, time.monotonic() + self.cfg.election_ticks * self.cfg.tick_ms / 1000.0)
        while self.core.role == Role.LEADER and self.core.lead_transferee is not None and not self._stopping:
            remaining = limit - time.monotonic()
            if remaining <= 0:
                return
            self._leader_known.wait(min(remaining, self.cfg.tick_ms / 1000.0))

    def _leader_unsure(self) -> bool:
        """No leader known, or (on a follower) the believed leader has been silent for four
        heartbeat intervals: it is probably dead, and redirecting a client to it would only
        cost the client a failed connection and a backoff."""
        ld = self.core.leader
        if ld is None:
            return True
        if ld == self.cfg.id:
            return False
        silent = time.monotonic() - self.last_contact.get(ld, 0.0)
        return silent > 4 * self.cfg.heartbeat_ticks * self.cfg.tick_ms / 1000.0

    def wait_read_index(self, deadline: float) -> int:
        """ReadIndex (diss. 6.4): confirm with a quorum that the leader's commit index is
        current, then wait until this node has applied it. Works on followers too (the core
        forwards the request to the leader)."""
        ctx = uuid.uuid4().bytes
        with self._lock:
            try:
                self.core.read_index(ctx)
            except NotLeader:
                raise self._not_leader() from None
            w = Waiter(self.core.term)
            self._waiters.reads[ctx] = w
        self._drive()
        # A leader that does not confirm within two election timeouts is probably gone: give up
        # early so the client retries elsewhere instead of waiting out its whole deadline.
        limit = 2 * self.cfg.election_ticks * self.cfg.tick_ms / 1000.0
        if not w.event.wait(max(0.0, min(limit, deadline - time.monotonic()))):
            with self._lock:
                self._waiters.reads.pop(ctx, None)
            raise RequestError(ErrorKind.TIMEOUT, "leadership could not be confirmed in time (no quorum?)")
        if w.error is not None:
            raise w.error
        index = w.result
        if not self.sm.wait_applied(index, max(0.0, deadline - time.monotonic())):
            raise RequestError(ErrorKind.TIMEOUT, f"read index {index} not applied in time")
        return index

    def execute_in_transaction(self, statement: tuple[str, Any], txn: Any, *,
                               timeout_s: float | None = None, chunk: int | None = None,
                               whole: int = MAX_RESULT_BYTES,
                               refuse_write: RequestError | None = None, owner: str = ""):
        """One statement of a driver transaction (txn: a protocol.TxnState), run on the leader
        against its applied state plus the transaction's own earlier writes, never applied
        (server/transactions.py). Returns (Result, readonly, term, time_ms, txn id, lost, seed):
        the id of the leader's preview state (None while the transaction has no writes), lost
        if the statement rolled the whole transaction back (as SQLite's ON CONFLICT ROLLBACK),
        and the seed of random() in a preview (None for a read on a reader connection): with
        time_ms, the env the client's check echoes so the commit reproduces them.
        refuse_write: raised if the statement writes (previewed, then dropped: nothing applied).
        chunk, whole: as for execute() (a read before the transaction's first write).

        No ReadIndex: the statement reads the leader's applied state as it is. Whatever it saw
        is checked again by the commit entry at its place in the log, on every node, so a stale
        or deposed leader can only make the commit fail (DESIGN.md, "Serializable
        transactions"). The term pins the transaction to one leader: if leadership changed
        since its first statement, or the leader no longer holds its preview state, it fails
        with TXN_ABORTED (nothing was applied; retry the whole transaction), as it does when
        it was idle (last_ms, the leader time of its previous statement) too long. owner: the
        client's certificate, whose transactions share a quarter of the leader's bounds."""
        with self._lock:
            if self.core.role != Role.LEADER:
                raise self._not_leader()
            current = self.core.term
        if txn.term is not None and txn.term != current:
            raise RequestError(ErrorKind.TXN_ABORTED, f"leadership changed during the transaction (term {txn.term} -> {current}); nothing was applied, retry it")
        now_ms = max(int(time.time() * 1000), self.sm.last_time_ms)
        idle = self.sm.txn_idle_timeout_ms
        if txn.last_ms is not None and now_ms - txn.last_ms > idle:
            raise RequestError(ErrorKind.TXN_ABORTED, f"the transaction was idle for more than {idle} ms; nothing was applied, retry it")
        sql, params = statement
        if txn.base == 0 and type(params) is not Many and may_read(sql):
            # No writes yet: a read runs on a reader connection, concurrently with apply. One
            # that called random() or the clock (through a view: the text was checked) runs
            # again as a preview, whose env the commit can reproduce.
            result = self._read(sql, params, None, None, chunk, txn.client_id, whole)
            if result.volatile and result.error is None:
                if result.stream is not None:
                    result.stream.close()
            elif (result.error or {}).get("name") != NOT_READONLY:
                return result, True, current, now_ms, txn.id, False, None
        try:
            if txn.id is not None:
                state = self.sm.txn_get(txn.id, current)
            elif txn.base:
                raise TxnGone(None)
            else:
                state = self.sm.txn_begin(txn.client_id, current, owner)
            env = new_env(now_ms)
            result, readonly, lost = self.sm.txn_preview(state, statement, txn.base, env)
        except TxnGone:
            raise RequestError(ErrorKind.TXN_ABORTED, "this leader no longer holds the transaction's uncommitted writes (idle, dropped for room, or out of step); nothing was applied, retry it") from None
        if refuse_write is not None and not readonly:
            self.sm.txn_end(state.id)
            raise refuse_write
        return result, readonly, current, now_ms, None if lost else state.id, lost, env[0]

    def commit_transaction(self, statements: list[tuple[str, Any]], commit: Any, *,
                           client_id: str, serial: int, timeout_s: float | None = None):
        """A driver transaction's commit (commit: a checked protocol.Commit): one TXN entry
        holding every statement it ran with what the client saw, applied only if each
        statement does the same again at the entry's place in the log. Exactly once like any
        write. The statements are not validated first: they ran as previews, and one that now
        fails is the commit check's business (a serialization error), not a refusal."""
        if self._stopping:
            raise RequestError(ErrorKind.UNAVAILABLE, "node is shutting down")
        timeout = min(timeout_s or self.cfg.request_timeout_s, self.cfg.request_timeout_s)
        deadline = time.monotonic() + timeout
        with self._lock:
            if self._leader_unsure():
                self._await_leader(deadline)
            if self.core.role != Role.LEADER:
                raise self._not_leader()
        fields = {"kind": CommandKind.TXN, "last_ms": commit.last_ms, "checks": commit.checks,
                  "controls": commit.controls}
        if all(first_keyword(sql) in CANNOT_WRITE_KEYWORDS for sql, _ in statements):
            # Only reads: checked here at a ReadIndex, never logged (server/DESIGN.md,
            # "Read-only commits").
            self.sm.txn_end(commit.txn)
            self.wait_read_index(deadline)
            with self._lock:
                if self.core.role != Role.LEADER:
                    raise self._not_leader()
            try:
                cmd = self._stamped(statements, client_id, serial, **fields)
            except CommandError as e:
                raise RequestError(ErrorKind.BAD_REQUEST, str(e)) from None
            return self.sm.check_read_only(cmd)
        self.sm.txn_ending(commit.txn)
        try:
            # Its preview state is dropped (its live SQLite transaction rolled back) while the
            # entry is written and replicated, not by apply once it is committed.
            return self._write(statements, client_id, serial, deadline, fields,
                               proposed=lambda: self.sm.txn_end(commit.txn))
        finally:
            self.sm.txn_end(commit.txn)

    def _stamped(self, statements, client_id: str, serial: int, **fields: Any) -> Command:
        """A command as this leader proposes it: stamped with its time (never before the last
        applied entry's) and a fresh seed (server/DESIGN.md, "Determinism of SQL")."""
        return Command(client_id=client_id, serial=serial, statements=tuple(statements),
                       leader_time_ms=max(int(time.time() * 1000), self.sm.last_time_ms),
                       seed=self._rng.getrandbits(63), **fields)

    def _write(self, statements, client_id: str, serial: int, deadline: float, commit=None,
               record: dict[str, Any] | None = None, early: bool = False,
               proposed: Callable[[], None] | None = None):
        started = time.monotonic()
        txn: dict[str, Any] = {}
        if isinstance(commit, dict):
            txn = commit  # Command fields of a checked commit (commit_transaction)
        elif commit is not None:
            txn = {"kind": CommandKind.TXN, "read_index": commit[0], "read_set": commit[1], "last_ms": commit[2]}
        elif record is not None:
            txn = {"kind": CommandKind.ADMIN, "record": record}
        try:
            cmd = self._stamped(statements, client_id, serial, **txn)
            data = cmd.encode()
        except CommandError as e:
            raise RequestError(ErrorKind.BAD_REQUEST, str(e)) from None
        with self._lock:
            if self.core.role != Role.LEADER:
                raise self._not_leader()
            try:
                index = self.core.propose(data)
            except NotLeader as e:
                raise self._not_leader(e.leader) from None
            except ProposalDropped as e:
                if self.core.lead_transferee is not None:
                    # Leadership is being handed over (a graceful stop, or an admin removal):
                    # hold the write until the transfer ends, then send the client straight
                    # to the new leader instead of into a backoff.
                    self._await_transfer(deadline)
                    if self.core.role != Role.LEADER:
                        # The new leader is usually not known yet (its first append is on the
                        # way): wait for it, so the client gets a hint instead of a backoff.
                        self._await_leader(deadline)
                        raise self._not_leader() from None
                raise RequestError(ErrorKind.UNAVAILABLE, f"write not accepted now: {e}") from None
            w = self._track_proposal(index)
            w.data, w.cmd = data, cmd
            if early:
                self.early.expect(index, w.term, w)
        if self.trace is not None:
            self.trace.proposed(index)
        if proposed is not None:
            proposed()
        result = self._await_proposal(index, w, deadline, f"no result for log index {index} within the deadline")
        metrics.WRITES.observe(time.monotonic() - started)
        return result

    def propose_admin(self, record: dict[str, Any], deadline: float):
        """Propose an ADMIN command (raftsql/command.py: an administrator's record) on the
        leader and wait until it is applied; its Result. NOT_LEADER elsewhere."""
        with self._lock:
            if self.core.role != Role.LEADER:
                raise self._not_leader()
        return self._write((), "", 0, deadline, record=record)

    def _track_proposal(self, index: int) -> Waiter:
        """Called with the lock held, right after proposing at `index`."""
        w = Waiter(self.core.term)
        self._waiters.proposals[index] = w
        metrics.PROPOSALS.inc()
        return w

    def _await_proposal(self, index: int, w: Waiter, deadline: float, late: str):
        """Drive the proposal out (this thread appends, sends and fsyncs it unless another
        thread is at it), then wait for its result, or its error; OUTCOME_UNKNOWN (`late`)
        if it was not applied by the deadline."""
        self._drive()
        if not w.event.wait(max(0.0, deadline - time.monotonic())):
            with self._lock:
                self._waiters.proposals.pop(index, None)
            if not w.event.is_set():
                raise RequestError(ErrorKind.OUTCOME_UNKNOWN, late)
        if w.error is not None:
            raise w.error
        return w.result

    def propose_conf_change(self, cc: ConfChange, deadline: float) -> int:
        """Propose one membership change (leader only) and wait until it is applied; returns its
        index. Errors as for writes; a change the core refuses outright is BAD_REQUEST, one it
        refuses for now (another change uncommitted, a transfer) UNAVAILABLE."""
        with self._lock:
            if self.core.role != Role.LEADER:
                raise self._not_leader()
            try:
                index = self.core.propose(cc.encode(), EntryType.CONF_CHANGE)
            except NotLeader as e:
                raise self._not_leader(e.leader) from None
            except ProposalDropped as e:
                raise RequestError(ErrorKind.UNAVAILABLE, f"membership change not accepted now: {e}") from None
            except ValueError as e:
                raise RequestError(ErrorKind.BAD_REQUEST, str(e)) from None
            w = self._track_proposal(index)
        self._await_proposal(index, w, deadline, f"membership change at log index {index} not applied within the deadline")
        return index

    # ---------------------------------------------------------------- for admin requests

    def configuration(self) -> tuple[set[str], set[str]]:
        """(voters, learners) as this node sees them."""
        with self._lock:
            return set(self.core.voters), set(self.core.learners)

    def leader_view(self) -> tuple[set[str], set[str]]:
        """(voters, learners) as the leader sees them; NOT_LEADER elsewhere."""
        with self._lock:
            if self.core.role != Role.LEADER:
                raise self._not_leader()
            return set(self.core.voters), set(self.core.learners)

    def follower_progress(self, nid: str) -> tuple[int, int, bool]:
        """(match index, our last index, whether appends stream to it) for a member (leader)."""
        with self._lock:
            match, replicating = self.core.progress_of(nid)
            return match, self.core.log.last_index(), replicating

    def member_addresses(self) -> list[str]:
        """The advertised addresses of the current members (the first answer on every client
        connection names them, so a driver finds the cluster after its DSN hosts are gone)."""
        with self._lock:
            members = set(self.core.voters) | set(self.core.learners)
        return sorted(a for nid, a in self.addresses.items() if nid in members and a)

    def content_hash(self) -> tuple[int, str]:
        with self.sm._lock:  # the apply lock: index and hash describe the same state
            return self.sm.applied_index, self.sm.content_hash()

    def status(self) -> dict[str, Any]:
        with self._lock:
            st = self.core.status()
        now = time.monotonic()
        st["applied_index"] = self.sm.applied_index
        st["cluster_id"] = self.sm.records.cluster_id
        st["address"] = self.addresses[self.cfg.id]
        st["leader_address"] = self.addresses.get(st["leader"]) if st["leader"] else None
        st["members"] = {nid: self.addresses.get(nid) for nid in st["voters"] + st["learners"]}
        st["last_contact_s"] = {
            nid: round(now - t, 3) for nid, t in self.last_contact.items()
        }
        if self.transport is not None:
            st["peers"] = self.transport.peer_status()
        st["snapshot"] = self.snapshots.status()
        return st

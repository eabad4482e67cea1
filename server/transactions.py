"""Serializable transactions on the node (server/DESIGN.md, "Serializable transactions").

Two halves, both mixins of StateMachine (they run on its apply connection, under its lock):

- Previews (leader): the statements of an open transaction run against the applied state plus
  the transaction's own earlier writes. The transaction whose statement ran last stays *live*:
  its writes sit uncommitted in the apply connection, so its next statement costs what its first
  did. Anything else that needs the connection (apply, another transaction's statement, a hash)
  first *parks* it: the SQLite session extension records its changes as a changeset and the
  SQLite transaction is rolled back; resuming applies the changeset again (C speed, no SQL).
  A transaction whose changes a changeset cannot hold (a schema change, or a changeset that
  fails to apply) resumes by replaying its writes as SQL instead.
- Commit (every node): a TXN entry of command version 5 replays every statement the
  transaction ran at the entry's position and compares each outcome with what the client saw
  (raftsql/txncheck.py); any difference rolls the whole entry back with a serialization error.
  Version 2 entries (a table read set checked against sqlite_raftsql_tables, which records the
  last index that wrote each table) are still applied as before.
"""

from __future__ import annotations

import collections
import os
import random
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import apsw

from raftsql import txncheck
from raftsql.command import Command, CommandKind, Many
from raftsql.protocol import SERIALIZATION, TXN_TIMEOUT, ErrorKind, RequestError, Result, sql_error
from raftsql.server.sandbox import SCHEMA, Guard
from raftsql.server.sqlerrors import (
    MAX_RESULT_BYTES,
    SQLITE_ABORT,
    SQLITE_BUSY_SNAPSHOT,
    NodeProblem,
    StatementFailed,
)
from raftsql.sqltext import READ_KEYWORDS, first_keyword

if TYPE_CHECKING:
    from raftsql.server.statemachine import ApplyContext

# Idle transactions (no statement for this long, in leader time) cannot commit. Replicated
# behaviour: identical on every node (see DESIGN.md, "Serializable transactions").
DEFAULT_TXN_IDLE_TIMEOUT_MS = 60_000
# Open transactions with writes a leader keeps preview state for, and the bytes of their
# statements and changesets together. Past either, the least recently used one is dropped (its
# next statement fails with TXN_ABORTED: run it again).
MAX_OPEN_TRANSACTIONS = 1024
MAX_OPEN_TRANSACTION_BYTES = 256 << 20
OWNER_SHARE = 4  # one certificate may hold 1/OWNER_SHARE of either bound
# A live transaction's SQLite session stops recording past this much memory: the transaction
# is then parked without a changeset and rebuilt by replaying its statements. apsw deletes a
# session holding the GIL, about 50 ns per recorded row: a runaway preview's session (about 7
# million rows before the step limit) froze the leader's other threads for 0.24 s, an election.
# At 32 MiB the delete takes about 35 ms.
MAX_LIVE_SESSION_BYTES = 32 << 20
# A parked transaction whose writes are few and took little CPU keeps no changeset: it resumes
# by running them again as SQL. Taking a changeset at park and applying it at resume prepares
# SQLite's own statements each time, every step of them through the Python authorizer. Measured
# in one process (8 interleaved transactions of W point UPDATEs, CPU per statement, changeset
# against replay): W=3 139-156 against 98-99 µs, W=8 165 against 140, W=12 166 against 156,
# W=16 170 against 193. On a loaded leader a point write's preview takes about 50 µs of CPU, so
# a bank transfer's three writes sum to 110-160 µs. Past either bound (or with a write whose
# random() and 'now' cannot be reproduced) the transaction parks as a changeset, as before.
REPLAY_MAX_WRITES = 8
REPLAY_MAX_SECONDS = 300e-6
_SQL_TABLE_GET = "SELECT modified_index FROM sqlite_raftsql_tables WHERE name=?"
_SQL_ANY_TRIGGER = "SELECT 1 FROM sqlite_schema WHERE type='trigger' LIMIT 1"
_SAVEPOINT_SQL = {
    txncheck.SAVEPOINT: "SAVEPOINT raftsql_sp{}",
    txncheck.RELEASE: "RELEASE raftsql_sp{}",
    txncheck.ROLLBACK_TO: "ROLLBACK TO raftsql_sp{}",
}




def may_read(sql: str) -> bool:
    """Whether a statement can be a read by its first keyword and may run on a reader
    connection (a transaction without writes tries these there first; anything else goes
    straight to a preview). Not a statement that may use randomness or the clock: only a
    preview's can be reproduced by the commit (txncheck.may_be_nondeterministic)."""
    return first_keyword(sql) in READ_KEYWORDS and not txncheck.may_be_nondeterministic(sql)


# A preview's seed needs no secrecy (the client gets it back, and could choose its own: the
# commit check carries it), so a seeded generator serves it without a getrandom() call.
_seeds = random.Random(secrets.randbits(128))


def new_env(now_ms: int) -> tuple[int, int]:
    """A preview's randomness and clock: (seed, now_ms). The client gets both back and its
    commit check carries them, so the commit runs the statement with the same ones."""
    return _seeds.getrandbits(63), now_ms


class _TxnIds:
    """Unguessable transaction ids (the id alone lets a request reach a transaction's preview
    state): 128 random bits each, read from the OS 4 KiB at a time rather than one system call
    per transaction. Call under the state machine's lock."""

    def __init__(self) -> None:
        self._pool = b""
        self._pos = 0

    def next(self) -> str:
        if self._pos >= len(self._pool):
            self._pool, self._pos = os.urandom(4096), 0
        pos = self._pos
        self._pos = pos + 16
        return self._pool[pos:pos + 16].hex()


class TxnGone(Exception):
    """Raised when a transaction's preview state is not here (expired, dropped for room, never
    created on this node, or out of step with the client): the client runs it again."""


def modified_after(
    conn: apsw.Connection, guard: Guard, tag: str, names: Iterable[str], read_index: int
) -> dict[str, Any] | None:
    """The serialization error if a table of `names` (or, when names is not empty, the
    schema) was modified by an entry after read_index, as seen by conn's snapshot."""
    names = set(names)
    if not names:
        return None
    outer, guard.internal = guard.internal, True
    try:
        for name in sorted(names | {SCHEMA}):
            row = conn.execute(tag + _SQL_TABLE_GET, (name,)).fetchone()
            if row is not None and row[0] > read_index:
                what = "the schema" if name == SCHEMA else f"table {name}"
                return sql_error(
                    SQLITE_BUSY_SNAPSHOT,
                    SERIALIZATION,
                    f"serialization failure: {what} was modified at log index {row[0]}, "
                    f"after this transaction's snapshot at index {read_index}; nothing "
                    "was applied: run the transaction again",
                )
    finally:
        guard.internal = outer
    return None


def idle_error(idle_timeout_ms: int) -> dict[str, Any]:
    """A commit that came more than the idle timeout after its transaction's last statement."""
    return sql_error(SQLITE_ABORT, TXN_TIMEOUT, f"the transaction was idle for more than "
                     f"{idle_timeout_ms} ms; nothing was applied: run it again")


def txn_refusal(
    conn: apsw.Connection, guard: Guard, tag: str, index: int, cmd: Command, time_ms: int,
    idle_timeout_ms: int,
) -> Result | None:
    """For a TXN command (a transaction's commit): the error Result if it must not apply
    (idle too long, or a version 2 read set modified after its snapshot), else None. Runs in
    the apply transaction, so every node decides the same; the session row stores it."""
    if cmd.kind is not CommandKind.TXN:
        return None
    if cmd.last_ms and time_ms - cmd.last_ms > idle_timeout_ms:
        return Result(index=index, error=idle_error(idle_timeout_ms))
    conflict = modified_after(conn, guard, tag, cmd.read_set, cmd.read_index)
    return None if conflict is None else Result(index=index, error=conflict)


def serialization_error(i: int, sql: str, what: str) -> dict[str, Any]:
    text = " ".join(sql.split())
    if len(text) > 80:
        text = text[:77] + "..."
    err = sql_error(
        SQLITE_BUSY_SNAPSHOT,
        SERIALIZATION,
        f"serialization failure: statement {i} of the transaction ({text}) {what}; a write "
        "committed after it ran changed what it saw; nothing was applied: run the "
        "transaction again",
    )
    err["statement"] = i
    return err


def _cheap_to_replay(txn: PreviewTxn) -> bool:
    """Whether txn resumes by replaying its writes rather than from a changeset: few, fast,
    and each with the env it first ran with (so random() and 'now' give the same again)."""
    return (len(txn.writes) < REPLAY_MAX_WRITES and len(txn.costs) == len(txn.writes)
            and sum(txn.costs) < REPLAY_MAX_SECONDS and None not in txn.envs)


def _statement_size(sql: str, params: Any) -> int:
    if type(params) is Many:
        return len(sql) + 16 * sum(len(p) + 1 for p in params.sets)
    return len(sql) + 16 * (len(params) + 1)


# ---------------------------------------------------------------------------------------------
# Preview state


@dataclass(eq=False)
class PreviewTxn:
    """One open transaction's preview state on the leader. `writes` are its statements that
    changed something (in order, as the client's own list); its changes are either live in the
    apply connection, or in `changeset` (parked), or, when `replay` is set, rebuilt from
    `writes` on resume."""

    id: str
    client_id: str
    term: int
    owner: str = ""  # the certificate it came from ("" in-process): its share of the bounds
    writes: list[tuple[str, Any]] = field(default_factory=list)
    envs: list[tuple[int, int] | None] = field(default_factory=list)  # each write's (seed, now_ms)
    costs: list[float] = field(default_factory=list)  # CPU seconds each write's preview took (thread_time)
    changeset: bytes | None = None  # None with writes: rebuild them by replaying the SQL
    no_changeset: bool = False  # its changes cannot travel as a changeset (schema change, ...)
    last_rowid: int = 0  # last_insert_rowid() as the transaction left it
    start_rowid: int = 0  # and as it started (the client's last write's): a replay starts there
    last_used: float = 0.0
    writes_size: int = 0  # about the bytes of `writes`
    size: int = 0  # bytes of writes and changeset (for the node-wide bound)
    ending: bool = False  # its commit is being proposed: parking it keeps nothing
    # writes[i] -> the error it failed with: a statement that failed yet kept some of its
    # changes (INSERT OR FAIL, RAISE(FAIL) in a trigger). A replay expects that error again.
    failures: dict[int, str] = field(default_factory=dict)


class OpenTransactions:
    """The preview state of open transactions, by id and by client (a client runs one
    transaction at a time: a new one replaces its previous one), least recently used first.
    Bookkeeping only; the state machine does the SQLite work under its lock."""

    def __init__(self, max_open: int = MAX_OPEN_TRANSACTIONS,
                 max_bytes: int = MAX_OPEN_TRANSACTION_BYTES):
        self.max_open = max_open
        self.max_bytes = max_bytes
        # One certificate may hold a quarter of either bound: past its share, its own least
        # recently used transactions make room, not other clients' (a write client opening
        # 1,024 transactions used to push every other client's out).
        self.max_open_per_owner = max(1, max_open // OWNER_SHARE)
        self.max_bytes_per_owner = max(1, max_bytes // OWNER_SHARE)
        self._by_id: collections.OrderedDict[str, PreviewTxn] = collections.OrderedDict()
        self._by_client: dict[str, str] = {}
        self._owned: dict[str, list[int]] = {}  # owner -> [transactions, bytes]
        self.bytes = 0
        self.dropped_for_room = 0

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self):
        return iter(list(self._by_id.values()))

    def get(self, txn_id: str) -> PreviewTxn | None:
        txn = self._by_id.get(txn_id)
        if txn is not None:
            self._by_id.move_to_end(txn_id)
            txn.last_used = time.monotonic()
        return txn

    def previous(self, client_id: str) -> PreviewTxn | None:
        tid = self._by_client.get(client_id)
        return None if tid is None else self._by_id.get(tid)

    def add(self, txn: PreviewTxn) -> None:
        txn.last_used = time.monotonic()
        self._by_id[txn.id] = txn
        if txn.client_id:
            self._by_client[txn.client_id] = txn.id
        if txn.owner:
            self._owned.setdefault(txn.owner, [0, 0])[0] += 1

    def remove(self, txn: PreviewTxn) -> None:
        if self._by_id.pop(txn.id, None) is not None:
            self.bytes -= txn.size
            if self._by_client.get(txn.client_id) == txn.id:
                del self._by_client[txn.client_id]
            owned = self._owned.get(txn.owner) if txn.owner else None
            if owned is not None:
                owned[0] -= 1
                owned[1] -= txn.size
                if owned[0] <= 0:
                    del self._owned[txn.owner]

    def resize(self, txn: PreviewTxn, recount: bool = False) -> None:
        """Account for txn's writes and changeset; recount: its writes were cut short."""
        if recount:
            txn.writes_size = sum(_statement_size(s, p) for s, p in txn.writes)
        size = txn.writes_size + len(txn.changeset or b"")
        self.bytes += size - txn.size
        owned = self._owned.get(txn.owner) if txn.owner and txn.id in self._by_id else None
        if owned is not None:
            owned[1] += size - txn.size
        txn.size = size

    def victims(self, keep: PreviewTxn | None, idle_s: float) -> list[PreviewTxn]:
        """Transactions to drop now: idle past idle_s, then the least recently used while over
        a bound (never `keep`)."""
        out = []
        now = time.monotonic()
        owned = self._owned.get(keep.owner) if keep is not None and keep.owner else None
        if owned is not None and (owned[0] > self.max_open_per_owner
                                  or owned[1] > self.max_bytes_per_owner):
            # Over its certificate's share: that certificate's own make room first.
            mine_n = owned[0] - self.max_open_per_owner
            mine_b = owned[1] - self.max_bytes_per_owner
            for txn in self._by_id.values():
                if mine_n <= 0 and mine_b <= 0:
                    break
                if txn is keep or txn.owner != keep.owner:
                    continue
                out.append(txn)
                self.dropped_for_room += 1
                mine_n -= 1
                mine_b -= txn.size
        chosen = {id(t) for t in out}
        over_n = len(self._by_id) - len(out) - self.max_open
        over_b = self.bytes - sum(t.size for t in out) - self.max_bytes
        for txn in self._by_id.values():
            if id(txn) in chosen:
                continue
            if txn is keep:
                continue
            if now - txn.last_used > idle_s:
                out.append(txn)
            elif over_n > 0 or over_b > 0:
                out.append(txn)
                self.dropped_for_room += 1
            else:
                break
            over_n -= 1
            over_b -= txn.size
        return out


class TransactionPreviews:
    """The preview half (see the module docstring): a mixin of StateMachine."""

    _ctx: ApplyContext
    _conn: apsw.Connection
    _guard: Guard
    txn_idle_timeout_ms: int

    def _init_previews(self) -> None:
        self.open_txns = OpenTransactions()
        self._txn_ids = _TxnIds()
        self._live: PreviewTxn | None = None
        self._live_session: apsw.Session | None = None

    # -- lookup ---------------------------------------------------------------------------

    def txn_begin(self, client_id: str, term: int, owner: str = "") -> PreviewTxn:
        """New preview state for a client's transaction (replacing its previous one)."""
        with self._lock:
            self._check_open()
            old = self.open_txns.previous(client_id)
            if old is not None:
                self._drop_txn(old)
            txn = PreviewTxn(id=self._txn_ids.next(), client_id=client_id, term=term,
                             owner=owner)
            # As its commit entry will (StateMachine._apply_command): last_insert_rowid()
            # starts from what the client's previous write left.
            txn.last_rowid = txn.start_rowid = self.client_last_rowid(client_id)
            self.open_txns.add(txn)
            self._sweep(txn)
            return txn

    def txn_get(self, txn_id: str, term: int) -> PreviewTxn:
        """The preview state of an open transaction; TxnGone if there is none for this term."""
        with self._lock:
            self._check_open()
            txn = self.open_txns.get(txn_id)
            if txn is None or txn.term != term:
                if txn is not None:
                    self._drop_txn(txn)
                raise TxnGone(txn_id)
            self._sweep(txn)
            return txn

    def txn_end(self, txn_id: str | None) -> None:
        """Forget a transaction's preview state (it committed, or rolled back)."""
        if not txn_id:
            return
        with self._lock:
            txn = self.open_txns.get(txn_id)
            if txn is not None:
                self._drop_txn(txn)

    def txn_ending(self, txn_id: str | None) -> None:
        """Its commit is being proposed: the apply that parks it need not keep its changes
        (txn_end forgets it afterwards). No lock: a flag the apply thread reads under it."""
        txn = self.open_txns._by_id.get(txn_id) if txn_id else None
        if txn is not None:
            txn.ending = True

    def _sweep(self, keep: PreviewTxn | None) -> None:
        for txn in self.open_txns.victims(keep, self.txn_idle_timeout_ms / 1000.0):
            self._drop_txn(txn)

    def _drop_txn(self, txn: PreviewTxn) -> None:
        if self._live is txn:
            self._end_live(keep_changes=False)
        self.open_txns.remove(txn)

    # -- live / parked --------------------------------------------------------------------

    def _park(self) -> None:
        """Make the apply connection free: the live transaction's changes go into its changeset
        (or, if a changeset cannot hold them, it will be replayed) and are rolled back."""
        if self._live is not None:
            self._end_live(keep_changes=True)

    def _cap_live_session(self) -> None:
        """From the progress handler: the live session has grown past MAX_LIVE_SESSION_BYTES.
        It stops recording (it stays attached until the transaction is parked) and the
        transaction's changes will be rebuilt by replay."""
        session, txn = self._live_session, self._live
        if session is not None and txn is not None and session.enabled:
            session.enabled = False
            txn.no_changeset = True

    def _end_live(self, keep_changes: bool) -> None:
        txn, session = self._live, self._live_session
        self._live = self._live_session = None
        try:
            if keep_changes and txn is not None and not txn.ending:
                txn.changeset = None
                if not txn.no_changeset and session is not None and not _cheap_to_replay(txn):
                    guard = self._guard
                    outer, guard.internal = guard.internal, True  # it runs its own SAVEPOINT
                    try:
                        txn.changeset = session.changeset()
                    except apsw.Error:
                        txn.no_changeset = True
                    finally:
                        guard.internal = outer
                self.open_txns.resize(txn)
        finally:
            if session is not None:
                session.close()
            if txn is not None:
                txn.last_rowid = self._conn.last_insert_rowid()
            self._abandon()

    def _make_live(self, txn: PreviewTxn) -> dict[str, Any] | None:
        """Make txn's changes live in the apply connection. Returns an error map if its
        earlier writes cannot be rebuilt (one of them now fails: the transaction cannot
        commit), else None."""
        if self._live is txn:
            return None
        self._park()
        self._internal("BEGIN IMMEDIATE")
        session = apsw.Session(self._conn, "main")
        session.config(apsw.SQLITE_SESSION_OBJCONFIG_ROWID, 1)
        session.attach()
        self._live, self._live_session = txn, session
        if txn.changeset is not None:
            applied = self._apply_changeset(txn.changeset) if txn.changeset else True
            if applied is True:
                return None
            # Someone wrote a row this transaction wrote (applied is None): replaying its
            # statements on the newest state shows what its commit would do. A changeset that
            # cannot apply at all (applied is False: e.g. the shadow tables of a virtual
            # table): replay, now and from now on.
            self._end_live(keep_changes=False)
            txn.changeset = None
            txn.no_changeset = txn.no_changeset or applied is False
            self.open_txns.resize(txn)
            return self._make_live(txn)
        if not txn.writes:
            return None
        return self._replay(txn)

    def _apply_changeset(self, changeset: bytes) -> bool | None:
        """Apply a parked transaction's changeset: True if it applied cleanly, None if a row it
        changes was changed by someone else meanwhile (nothing applied), False if it cannot
        apply."""
        conflicts = []

        def conflict(reason: int, change: Any) -> int:
            conflicts.append(reason)
            return apsw.SQLITE_CHANGESET_ABORT

        conn, guard = self._conn, self._guard
        outer, guard.internal = guard.internal, True
        # The changeset holds what triggers did too: they must not fire again. Switching them
        # off expires every prepared statement, so only when the database has a trigger.
        triggers = bool(conn.execute(self._tag + _SQL_ANY_TRIGGER).fetchall())
        if triggers:
            conn.config(apsw.SQLITE_DBCONFIG_ENABLE_TRIGGER, 0)
        try:
            apsw.Changeset.apply(changeset, conn, conflict=conflict)
            return True
        except apsw.Error:
            return None if conflicts else False
        finally:
            if triggers:
                conn.config(apsw.SQLITE_DBCONFIG_ENABLE_TRIGGER, 1)
            guard.internal = outer

    def _replay(self, txn: PreviewTxn) -> dict[str, Any] | None:
        self._guard.in_txn = True
        self._conn.set_last_insert_rowid(txn.start_rowid)
        self._begin_preview()
        try:
            for i, (sql, params) in enumerate(txn.writes):
                env = txn.envs[i] if i < len(txn.envs) else None
                if env is not None:
                    # As it first ran (and as its commit will run it).
                    self._rand.seed, self._vfs.now_ms = env
                self._rand.stmt_no = 0 if env is not None else i
                self._rand.rng = None
                written: set[str] = set()
                self._guard.writes = written
                expected = txn.failures.get(i)
                try:
                    if type(params) is Many:
                        self._run_many(sql, params)
                    else:
                        self._run_statement(sql, params)
                except (StatementFailed, NodeProblem) as failed:
                    if (expected is not None and isinstance(failed, StatementFailed)
                            and failed.error.get("name") == expected
                            and self._conn.in_transaction):
                        continue  # fails as it did, keeping what it keeps
                    self._end_live(keep_changes=False)
                    return serialization_error(
                        i, sql, f"no longer succeeds ({failed.error.get('message')})"
                        if expected is None else f"no longer fails with {expected}")
                finally:
                    self._guard.writes = None
                if expected is not None:
                    self._end_live(keep_changes=False)
                    return serialization_error(i, sql, f"no longer fails with {expected}")
                if SCHEMA in written:
                    txn.no_changeset = True
        finally:
            self._end_preview()
        return None

    def _begin_preview(self, env: tuple[int, int] | None = None) -> None:
        if env is None:
            env = new_env(max(int(time.time() * 1000), self._time_ms))
        self._rand.seed, self._vfs.now_ms = env
        self._ctx.result_budget = MAX_RESULT_BYTES

    def _end_preview(self) -> None:
        self._vfs.now_ms = self._time_ms
        self._ctx.budget_on = False

    # -- one statement ----------------------------------------------------------------------

    def txn_preview(self, txn: PreviewTxn, statement: tuple[str, Any], base: int,
                    env: tuple[int, int] | None = None) -> tuple[Result, bool, bool]:
        """Run one statement of txn against the applied state plus its earlier writes (the
        first `base` of them: the client may have rolled back to a savepoint, or resent a
        statement whose answer it lost). Returns (Result, readonly, lost): lost means the
        statement rolled the whole transaction back (ON CONFLICT ROLLBACK, RAISE(ROLLBACK), an
        interrupted write), as in SQLite; its preview state is then gone. The writes only
        become real when the commit entry applies them. env: the (seed, now_ms) that random()
        and 'now' use (new_env); the client echoes it in the statement's check, so the commit
        runs the statement with the same ones. None: fresh ones nobody can reproduce."""
        sql, params = statement
        with self._lock:
            self._check_open()
            self._guard.in_txn = True
            if self.open_txns.get(txn.id) is not txn:
                raise TxnGone(txn.id)
            if base > len(txn.writes):
                self._drop_txn(txn)
                raise TxnGone(txn.id)
            if base < len(txn.writes):
                # Rolled back to a savepoint, or a resend: rebuild from the writes kept.
                if self._live is txn:
                    self._end_live(keep_changes=False)
                del txn.writes[base:]
                del txn.envs[base:]
                del txn.costs[base:]
                for i in [i for i in txn.failures if i >= base]:
                    del txn.failures[i]
                txn.changeset = None
                self.open_txns.resize(txn, recount=True)
            failed = self._make_live(txn)
            if failed is not None:
                self._drop_txn(txn)
                return Result(index=self._applied_index, error=failed), False, False
            self._conn.set_last_insert_rowid(txn.last_rowid)
            self._begin_preview(env)
            self._rand.stmt_no = 0 if env is not None else len(txn.writes)
            self._rand.rng = None
            self._ctx.readonly = False
            written: set[str] = set()
            self._guard.writes = written
            many = type(params) is Many
            started = time.thread_time()  # CPU, not waits for the GIL
            changes_before = self._conn.total_changes()
            try:
                result = self._run_many(sql, params) if many else self._run_statement(sql, params)
                readonly = self._ctx.readonly and not many
            except (StatementFailed, NodeProblem) as failed:
                result = Result(error=failed.error)
                readonly = False
                if not self._conn.in_transaction:
                    # The statement rolled back the whole transaction.
                    self._drop_txn(txn)
                    result.index = self._applied_index
                    return result, False, True
                if not many and self._conn.total_changes() != changes_before:
                    # It failed but kept the changes it made before failing (OR FAIL): SQLite
                    # counts a statement's changes unless it rolled them back. Its commit
                    # keeps them too (_run_checked). One of the transaction's writes from now
                    # on, on both sides: the client counts it too (its next statement's base),
                    # its reads then see the preview, and a replay expects the same error.
                    failed.error["kept_changes"] = True
                    txn.failures[len(txn.writes)] = failed.error.get("name")
                    txn.writes.append(statement)
                    txn.envs.append(env)
                    txn.costs.append(time.thread_time() - started)
                    txn.writes_size += _statement_size(sql, params)
                j = failed.error.get("set")
                if many and isinstance(j, int) and j > 0:
                    # sqlite3's executemany keeps the parameter sets before the failing one.
                    kept = Many(params.sets[:j])
                    txn.writes.append((sql, kept))
                    txn.envs.append(env)
                    txn.costs.append(time.thread_time() - started)
                    txn.writes_size += _statement_size(sql, kept)
            else:
                if not readonly:
                    txn.writes.append(statement)
                    txn.envs.append(env)
                    txn.costs.append(time.thread_time() - started)
                    txn.writes_size += _statement_size(sql, params)
            finally:
                self._guard.writes = None
                self._end_preview()
            if SCHEMA in written:
                txn.no_changeset = True
            txn.last_rowid = self._conn.last_insert_rowid()
            self.open_txns.resize(txn)
            result.index = self._applied_index
            return result, readonly, False


# ---------------------------------------------------------------------------------------------
# Commit: replaying a transaction with its checks


class CheckedTransactions:
    """The commit half (see the module docstring): a mixin of StateMachine."""

    _ctx: ApplyContext
    _conn: apsw.Connection
    _guard: Guard
    # Test hook (config.TestHooks.broken_txn_validation): apply every commit whatever its
    # statements give now. Exists so the fault tests can show that their checker catches it.
    broken_txn_validation = False

    def _execute_checked(self, index: int, cmd: Command) -> Result:
        """Apply a version 5 TXN entry: its statements in order with their controls, each
        checked against what the client saw. Any difference: nothing applies and the result is
        a serialization error naming the statement. Raises StatementFailed (with the result)
        if a statement rolled the whole SQLite transaction back."""
        statements, checks, controls = cmd.statements, cmd.checks, cmd.controls
        assert checks is not None
        self._guard.in_txn = True
        self._rand.seed = cmd.seed
        entry_ms = self._vfs.now_ms
        # A statement's own clock (its check's env) may not lie outside the time the
        # transaction can have been open: clamped, identically on every node.
        oldest_ms = entry_ms - self.txn_idle_timeout_ms * (len(statements) + 1)
        self._ctx.result_budget = MAX_RESULT_BYTES
        self._savepoint_entry()
        per: list[Result] = []
        written: set[str] = set()
        self._guard.writes = written
        c = 0
        conflict: dict[str, Any] | None = None
        try:
            for i, (sql, params) in enumerate(statements):
                while c < len(controls) and controls[c][0] == i:
                    _, op, depth = controls[c]
                    self._internal(_SAVEPOINT_SQL[op].format(depth))
                    c += 1
                check = checks[i]
                env = check[6] if check is not None and check[0] == txncheck.OK else None
                if env is not None:
                    self._rand.seed, self._rand.stmt_no = env[0], 0
                    self._vfs.now_ms = min(max(env[1], oldest_ms), entry_ms)
                else:
                    self._rand.seed, self._rand.stmt_no = cmd.seed, i
                    self._vfs.now_ms = entry_ms
                self._rand.rng = None
                try:
                    result, what = self._run_checked(sql, params, check)
                except (StatementFailed, NodeProblem) as failed:
                    failed.error["statement"] = i
                    if isinstance(failed, NodeProblem):
                        failed.index = index
                        raise
                    if check is None:
                        # A write nobody saw the outcome of (pipeline mode): the entry fails
                        # with its error, as a WRITE entry does.
                        conflict = failed.error
                    else:
                        # The client saw it succeed (say an INSERT whose key another client
                        # has taken since): that is a conflict like any other, to be retried.
                        conflict = serialization_error(
                            i, sql, f"succeeded and now fails ({failed.error.get('message')})")
                    break
                if what is not None:
                    conflict = serialization_error(i, sql, what)
                    break
                per.append(result)
            else:
                for _, op, depth in controls[c:]:
                    self._internal(_SAVEPOINT_SQL[op].format(depth))
        finally:
            self._guard.writes = None
            self._rand.seed = cmd.seed
            self._vfs.now_ms = entry_ms
        if conflict is not None:
            if not self._conn.in_transaction:
                raise StatementFailed(conflict)
            self._internal("ROLLBACK TO raftsql_entry")
            self._internal("RELEASE raftsql_entry")
            self._reload_statistics(written)
            return Result(index=index, error=conflict)
        self._internal("RELEASE raftsql_entry")
        self._touch_tables(written, index)
        last = per[-1] if per else Result()
        return Result(rowcount=last.rowcount, lastrowid=last.lastrowid, index=index,
                      results=per if len(per) != 1 else None)

    def check_read_only(self, cmd: Command) -> Result:
        """A transaction that only ran SELECT and VALUES statements, checked at this node's
        applied state (the caller has made it at least a ReadIndex) and never logged: the same
        checks a commit entry makes, inside a SQLite transaction that is then rolled back. Its
        place in the serial order is between the applied entry and the next (server/DESIGN.md,
        "Read-only commits"). cmd: a TXN Command with the transaction's statements, checks and
        controls, its last_ms, and the leader's time and seed as a commit entry would carry."""
        now_ms = cmd.leader_time_ms
        with self._lock:
            self._check_open()
            index = self._applied_index
            if cmd.last_ms and now_ms - cmd.last_ms > self.txn_idle_timeout_ms:
                return Result(index=index, error=idle_error(self.txn_idle_timeout_ms))
            self._park()
            # As a logged commit would, and as its reads saw: from the client's last write.
            self._conn.set_last_insert_rowid(self.client_last_rowid(cmd.client_id))
            self._internal("BEGIN")
            self._vfs.now_ms = now_ms
            try:
                result = self._execute_checked(index, cmd)
            except StatementFailed as failed:  # rolled the SQLite transaction back
                result = Result(index=index, error=failed.error)
            except NodeProblem as problem:
                raise RequestError(ErrorKind.UNAVAILABLE, "the transaction's reads could not be "
                                   f"checked on this node: {problem.error.get('message')}") from None
            finally:
                self._abandon()  # rolls back; the clock goes back to the applied entry's
            result.index = index
            return result

    def _run_checked(self, sql: str, params: Any, check: tuple | None) -> tuple[Result, str | None]:
        """Run one statement of a checked commit. Returns (its Result without rows, None) if
        it did what the client saw, else (_, what differs)."""
        many = type(params) is Many
        broken = self.broken_txn_validation
        if check is not None and check[0] == txncheck.FAILED:
            self._internal("SAVEPOINT raftsql_check")
            try:
                self._run_many(sql, params) if many else self._run_statement(sql, params)
            except StatementFailed as failed:
                if not self._conn.in_transaction:
                    return Result(), f"now fails with {failed.error.get('name')} and rolls back"
                name = failed.error.get("name")
                if name == check[1] or broken:
                    # As in the preview (and in SQLite): whatever the failed statement kept
                    # (OR FAIL keeps the rows changed before the failure) stays.
                    self._internal("RELEASE raftsql_check")
                    return Result(rowcount=-1), None
                self._internal("ROLLBACK TO raftsql_check")
                self._internal("RELEASE raftsql_check")
                return Result(), f"failed with {check[1]} and now fails with {name}"
            self._internal("RELEASE raftsql_check")
            if broken:
                return Result(rowcount=-1), None
            return Result(), f"failed with {check[1]} and now succeeds"
        if check is None:
            result = self._run_many(sql, params) if many else self._run_statement(sql, params)
            result.rows = []
            return result, None
        # A statement that succeeded and now fails raises StatementFailed: the commit fails
        # with a serialization error naming it (_execute_checked).
        if many:
            result = self._run_many(sql, params)
            result.rows = []
            if (check is not None and not broken and check[1] is not None
                    and result.rowcount != check[1]):
                return result, f"changed {check[1]} row(s) and now changes {result.rowcount}"
            return result, None
        _, rowcount, nrows, complete, digest, lastrowid = check[:6]
        state: dict[str, Any] = {"digest": None}
        ctx = self._ctx

        def sink(row: tuple) -> bool:
            d = state["digest"]
            if d is None:
                d = state["digest"] = txncheck.RowDigest([x[0] for x in ctx.description])
            d.add(row)
            # A read stops once it has shown what the client saw (and one more row, if the
            # client saw the end); a write runs to its end.
            return not ctx.readonly or d.rows < nrows + (1 if complete else 0)

        result = self._run_statement(sql, params, sink=sink)
        rows = state["digest"] or txncheck.RowDigest([x[0] for x in ctx.description])
        result.rows = []
        if broken:
            return result, None
        if rows.rows != nrows and (complete or rows.rows < nrows):
            return result, f"returned {nrows} row(s) and now returns {'more' if rows.rows > nrows else rows.rows}"
        if rows.digest() != digest:
            return result, "returns different rows now"
        if rowcount is not None and result.rowcount != rowcount:
            return result, f"changed {rowcount} row(s) and now changes {result.rowcount}"
        if lastrowid is not None and result.lastrowid != lastrowid:
            return result, f"inserted rowid {lastrowid} and now inserts {result.lastrowid}"
        return result, None

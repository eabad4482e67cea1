"""The replicated state machine: committed log entries applied to SQLite (apsw), deterministically,
with exactly-once sessions.

Every node applies the same entries in the same order, and each entry must leave every node's
database byte-for-byte equivalent and return the same Result. The jobs are split by seam:

- server/sandbox.py: what a statement may do (authorizer, pinned connection settings);
- server/determinism.py: time and randomness from the entry (EntryClock, EntryRandom);
- server/sqlerrors.py and raftsql/protocol.py: results and error values, and the line between a
  statement's failure (a value) and this node's (stop);
- server/reads.py: reads, streamed reads and validation on reader connections;
- server/transactions.py: previews of an open transaction's statements, and the commit-time
  serializability check;
- this module: applying entries with sessions and the applied index in one SQLite transaction.

See server/DESIGN.md, "The state machine", for the reasons behind each choice.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import apsw

from raftsql.command import INT64_MAX, Command, CommandError, CommandKind, Many
from raftsql.protocol import (
    MAX_ROWID,
    MULTIPLE_STATEMENTS,
    STALE_SERIAL,
    STEP_LIMIT,
    Result,
    sql_error,
)
from raftsql.server import metrics
from raftsql.server.costed import CostedFunctions
from raftsql.server.dbhash import content_hash
from raftsql.server.determinism import EntryClock, EntryRandom, as_int, ensure_utc
from raftsql.server.internal_tables import create_internal_tables
from raftsql.server.many import ManyStatements
from raftsql.server.reads import ReadCursor, Reads, stored_rowid
from raftsql.server.records import AuditEntry, MemberChange, Records
from raftsql.server.sandbox import (
    MAX_GENERATED_CHAIN,
    MAX_VALUE_BYTES,
    MAX_VIEW_CHAIN,
    PROGRESS_STEPS,
    SCHEMA,
    STAT_TABLES,
    Guard,
    StatementMemo,
    chain_depths,
    configure,
    prepare_bounded,
    quote_ident,
)
from raftsql.server.sqlerrors import (
    MAX_RESULT_BYTES,
    SQLITE_AUTH,
    SQLITE_CONSTRAINT,
    SQLITE_ERROR,
    SQLITE_INTERRUPT,
    VERIFY_INTERVAL_S,
    CorruptEntryError,
    DatabaseDamagedError,
    NodeProblem,
    SQLError,
    StateMachineError,
    StatementFailed,
    classify,
    code_name,
    common_error,
    damaged,
    find_damage,
    free_memory,
    max_rowid_error,
    result_too_big_error,
    value_size,
)
from raftsql.server.transactions import (
    DEFAULT_TXN_IDLE_TIMEOUT_MS,
    MAX_LIVE_SESSION_BYTES,
    CheckedTransactions,
    TransactionPreviews,
    TxnGone,
    txn_refusal,
)
from raftsql.sqltext import first_keyword, generated_column_reads, identifiers, skip_blank, tokens

__all__ = [
    "MAX_RESULT_BYTES", "SCHEMA", "AuditEntry", "CorruptEntryError", "DatabaseDamagedError", "MemberChange",
    "ReadCursor", "Result", "SQLError", "StateMachine", "StateMachineError", "TxnGone",
]

log = logging.getLogger(__name__)

DEFAULT_SESSION_TIMEOUT_MS = 6 * 3600 * 1000
# randomblob()'s bytes count against the step limit at this rate (StateMachine._randomblob).
BLOB_BYTES_PER_STEP = 8
DEFAULT_APPLY_VM_STEP_LIMIT = 100_000_000  # ~2 s of VM on a 2026 laptop core (~45M steps/s)
DEFAULT_QUERY_TIMEOUT_S = 10.0
SESSION_GC_INTERVAL_MS = 60_000
# Sessions expire by the session clock: leader time, except that one entry can move it forward
# by at most this much (and at most a quarter of the session timeout). A leader whose wall clock
# jumps ahead by hours therefore cannot expire every session at once (a resend across the jump
# would apply twice). The price: time with no entries at all does not count either.
SESSION_CLOCK_MAX_STEP_MS = 60_000

_vfs_ids = itertools.count(1)
_DML_KEYWORDS = frozenset({"INSERT", "UPDATE", "DELETE", "REPLACE"})

class ApplyContext:
    """What the apply callbacks (exec tracer, progress handler, update hook) read about the
    statement being applied. One per StateMachine, used under its lock."""

    __slots__ = (
        "budget_on", "progress_calls", "extra_steps", "max_progress_calls", "step_limit_hit", "traced",
        "description", "dml", "readonly", "abort", "max_rowid_table", "result_budget",
        "many_set", "many_total", "sql", "sql_pos",
    )

    def __init__(self, max_progress_calls: int):
        self.budget_on = False  # the step budget counts (a user statement is running)
        self.progress_calls = 0  # progress-handler calls of the running statement
        self.extra_steps = 0  # steps charged by C calls (charge_steps), short of PROGRESS_STEPS
        self.max_progress_calls = max_progress_calls  # its budget, in PROGRESS_STEPS units
        self.step_limit_hit = False
        self.traced = 0  # statements the exec tracer saw in one execute (more than 1: refused)
        self.description: tuple = ()
        self.dml = False  # the statement's first keyword is INSERT/UPDATE/DELETE/REPLACE
        self.readonly = False
        self.abort: dict[str, Any] | None = None  # the error that made the tracer stop it
        self.max_rowid_table: str | None = None  # a table given the reserved largest rowid
        self.result_budget = MAX_RESULT_BYTES  # what the entry's result may still hold
        self.many_set = 0  # executemany: the parameter set running
        self.many_total = 0  # executemany: changes so far
        self.sql = ""  # the text being executed
        self.sql_pos = 0  # where in it the statement the exec tracer sees next starts

    def new_budget(self) -> None:
        """A statement (or an executemany set) starts: its step budget is whole again."""
        self.progress_calls = 0
        self.extra_steps = 0


class _TransactionLost(Exception):
    """A failing statement rolled back the whole transaction (an interrupted write, ON CONFLICT
    ROLLBACK, RAISE(ROLLBACK)); apply_many redoes the batch with this entry's result forced."""

    def __init__(self, index: int, result: Result):
        self.index = index
        self.result = result


# What apply_many takes per entry: its data (a Command's bytes; b"" for a no-op), or what that
# data decodes to: the leader's own proposal as a Command, a membership change as a MemberChange.
Applicable = bytes | Command | MemberChange


def _check_generated_chain(table: str, reads: dict[str, set[str]]) -> None:
    """Fail the statement if a generated column of `table` lies on a chain of more than
    MAX_GENERATED_CHAIN generated columns (reads: what each one's definition names)."""
    if len(reads) <= MAX_GENERATED_CHAIN:
        return
    depth, _ = chain_depths({k: sorted(v) for k, v in reads.items()}, set())
    deepest = max(depth.values(), default=0)
    if deepest > MAX_GENERATED_CHAIN:
        name = min(k for k, v in depth.items() if v == deepest)
        raise StatementFailed(sql_error(
            SQLITE_ERROR, "SQLITE_ERROR",
            f"generated columns nested too deep: column {name} of table {table} reads through "
            f"a chain of {deepest} generated columns (at most {MAX_GENERATED_CHAIN}); SQLite "
            "codes them inside one another"))


class StateMachine(ManyStatements, TransactionPreviews, CheckedTransactions):
    """SQLite at `path` (a file; WAL, synchronous=NORMAL) driven by committed log entries.

    Threads: apply/apply_many/content_hash are serialized by an internal lock (one apply thread
    is expected); query and validate may run concurrently from other threads on their own
    connections. Settings that change replicated behaviour (session_timeout_ms,
    apply_vm_step_limit) must be identical on every node of a cluster.
    """

    def __init__(
        self,
        path: str,
        *,
        session_timeout_ms: int = DEFAULT_SESSION_TIMEOUT_MS,
        apply_vm_step_limit: int = DEFAULT_APPLY_VM_STEP_LIMIT,
        query_timeout_s: float = DEFAULT_QUERY_TIMEOUT_S,
        txn_idle_timeout_ms: int = DEFAULT_TXN_IDLE_TIMEOUT_MS,
        on_admin: Callable[[StateMachine, list[AuditEntry]], None] | None = None,
        broken_txn_validation: bool = False,
    ):
        if session_timeout_ms <= 0 or apply_vm_step_limit <= 0 or query_timeout_s <= 0:
            raise ValueError("timeouts and limits must be positive")
        if txn_idle_timeout_ms <= 0:
            raise ValueError("timeouts and limits must be positive")
        self.txn_idle_timeout_ms = txn_idle_timeout_ms
        self.broken_txn_validation = broken_txn_validation
        if broken_txn_validation:
            log.warning("test hook broken_txn_validation: transactions are NOT serializable")
        self._init_previews()
        ensure_utc()
        self.path = os.fspath(path)
        self.session_timeout_ms = session_timeout_ms
        self.apply_vm_step_limit = apply_vm_step_limit
        self.query_timeout_s = query_timeout_s
        self._gc_interval_ms = min(SESSION_GC_INTERVAL_MS, session_timeout_ms)
        # At least four entries are needed to expire a session, however far the clock jumps.
        self._session_step_ms = max(1, min(SESSION_CLOCK_MAX_STEP_MS, session_timeout_ms // 4))
        # What the apply callbacks read about the statement being applied, and its randomness.
        self._ctx = ApplyContext(-(-apply_vm_step_limit // PROGRESS_STEPS))
        self._rand = EntryRandom()
        self._costed = CostedFunctions(self.charge_steps)

        self._lock = threading.RLock()  # the write connection and the mirrors below
        self._applied_cond = threading.Condition(threading.Lock())
        self._closed = False

        # A secret tag starts every internal statement: apsw caches prepared statements by text
        # and the authorizer runs only at prepare time, so a user statement must never be able to
        # hit a cached statement that was authorized as internal (think "RELEASE raftsql_entry").
        self._tag = f"/* raftsql {os.urandom(8).hex()} */ "
        self._sql_meta = (
            "UPDATE sqlite_raftsql_meta SET applied_index=?, time_ms=?, gc_ms=?, session_ms=? WHERE id=1"
        )
        self._sql_session_get = (
            "SELECT serial, result, last_ms FROM sqlite_raftsql_sessions WHERE client_id=?"
        )
        self._sql_session_touch = "UPDATE sqlite_raftsql_sessions SET last_ms=? WHERE client_id=?"
        self._sql_session_put = (
            "INSERT INTO sqlite_raftsql_sessions(client_id, serial, result, last_ms) VALUES(?,?,?,?) "
            "ON CONFLICT(client_id) DO UPDATE SET serial=excluded.serial, "
            "result=excluded.result, last_ms=excluded.last_ms"
        )
        self._sql_session_gc = "DELETE FROM sqlite_raftsql_sessions WHERE last_ms < ?"
        self._sql_cookie = self._tag + "PRAGMA schema_version"
        self._sql_table_touch = (
            "INSERT INTO sqlite_raftsql_tables(name, modified_index) VALUES(?,?) "
            "ON CONFLICT(name) DO UPDATE SET modified_index=excluded.modified_index"
        )
        # Called (sm, records) after a batch with audit records committed, and (sm, []) once
        # open: the deny list may have changed (server/records.py, server/clients.py).
        self.on_admin = on_admin

        self._verified_at = -VERIFY_INTERVAL_S  # monotonic time of the last clean quick_check

        # The read side: reader connections, streamed reads, validation (server/reads.py).
        self.reads = Reads(self, self._tag, query_timeout_s)

        vfs_name = f"raftsql-clock-{os.getpid()}-{next(_vfs_ids)}"
        self._vfs = EntryClock(vfs_name, 0)
        self._guard = Guard(write=True)
        self._memo = StatementMemo()
        try:
            self._conn = apsw.Connection(
                self.path, flags=apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE, vfs=vfs_name
            )
        except apsw.Error as e:
            self._vfs.unregister()
            raise StateMachineError(f"cannot open {self.path}: {e}") from e
        try:
            self._open_write_connection()
        except (apsw.CorruptError, apsw.NotADBError) as e:
            self._conn.close()
            self._vfs.unregister()
            raise damaged(self.path, f"opening it failed: {type(e).__name__}: {e}", str(e)) from e
        except BaseException:
            self._conn.close()
            self._vfs.unregister()
            raise

    def _open_write_connection(self) -> None:
        conn = self._conn
        configure(conn, self._guard)
        mode = self._internal("PRAGMA journal_mode=WAL")
        if not mode or str(mode[0][0]).lower() != "wal":
            raise StateMachineError(f"cannot put {self.path} in WAL mode (got {mode})")
        self._internal("PRAGMA synchronous=NORMAL")
        # raftsql's tables are named sqlite_raftsql_*: SQLite reserves the sqlite_ prefix, so
        # users cannot create, drop, alter or index them, and listings, dumps and reflection
        # (sqlite3's iterdump and shell, SQLAlchemy) skip them. Creating one needs the writable
        # schema, for this block only (server/DESIGN.md, "raftsql's own tables").
        conn.config(apsw.SQLITE_DBCONFIG_DEFENSIVE, 0)
        conn.config(apsw.SQLITE_DBCONFIG_WRITABLE_SCHEMA, 1)
        try:
            create_internal_tables(self._internal)
        finally:
            conn.config(apsw.SQLITE_DBCONFIG_WRITABLE_SCHEMA, 0)
            conn.config(apsw.SQLITE_DBCONFIG_DEFENSIVE, 1)
        row = self._internal(
            "SELECT applied_index, time_ms, gc_ms, format, session_ms FROM sqlite_raftsql_meta"
        )[0]
        self._finish_open(row)
        self.records = Records(self._internal)  # membership, audit and revocation records
        if self.on_admin is not None:
            self.on_admin(self, [])

    def _finish_open(self, row: tuple) -> None:
        conn = self._conn
        self._session_ms = row[4]
        if row[3] != 2:
            raise StateMachineError(f"{self.path}: unknown raftsql format {row[3]}")
        self._applied_index, self._time_ms, self._gc_ms = row[0], row[1], row[2]
        self._vfs.now_ms = self._time_ms
        conn.create_scalar_function("random", self._rand.random, 0)
        conn.create_scalar_function("randomblob", self._randomblob, 1)
        self._costed.install(conn)  # LIKE, GLOB, instr(), replace(), trim() (server/costed.py)
        conn.set_progress_handler(self._progress, PROGRESS_STEPS)
        conn.set_update_hook(self._update_hook)
        conn.set_rollback_hook(self._on_rollback)  # SQLite's own (ON CONFLICT ROLLBACK, ...)
        self._cursor = conn.cursor()
        self._cursor.exec_trace = self._trace
        self._many_cursor = conn.cursor()
        self._many_cursor.exec_trace = self._trace_many
        self._fast_cursor = conn.cursor()
        self._many_texts = 0  # ManyStatements._fresh_text
        self._cookie_cursor = conn.cursor()
        self._shadow_cookie: int | None = None  # the schema cookie Guard.shadow was listed at
        # Guard.schema_epoch at the apply connection's last BEGIN, and whether SQLite has
        # discarded its schema since the last _schema_cookie (a rollback in a transaction that
        # changed the schema), which then reconnects the virtual tables.
        self._epoch_at_begin = 0
        self._schema_discarded = False
        self._fts34: frozenset[str] = frozenset()  # FTS3/4 tables (lower case), at that cookie

    # -- public state ---------------------------------------------------------------------

    @property
    def applied_index(self) -> int:
        """Index of the last entry applied (and committed to SQLite)."""
        return self._applied_index

    @property
    def last_time_ms(self) -> int:
        """The clock of the last applied entry. Entry time never goes backwards: an entry
        stamped earlier than this runs at this time (server/DESIGN.md, "Determinism of SQL")."""
        return self._time_ms

    def wake_waiters(self) -> None:
        """Wake every wait_applied() (this state machine was replaced: they time out)."""
        with self._applied_cond:
            self._applied_cond.notify_all()

    def wait_applied(self, index: int, timeout_s: float | None = None) -> bool:
        """Block until applied_index >= index; False if timeout_s passed first."""
        with self._applied_cond:
            return self._applied_cond.wait_for(lambda: self._applied_index >= index, timeout_s)

    # -- apply ----------------------------------------------------------------------------

    def apply(self, index: int, data: Applicable) -> Result | None:
        """Apply one committed entry. Returns None for a no-op (data == b"") or a replayed entry
        (index <= applied_index). Raises CorruptEntryError for data that is not a Command, and
        StateMachineError when the node cannot continue."""
        return self.apply_many([(index, data)])[0]

    def apply_many(self, entries: Iterable[tuple[int, Applicable]]) -> list[Result | None]:
        """apply() for consecutive (index, Applicable) entries, in one SQLite transaction (one
        commit)."""
        entries = list(entries)
        results: list[Result | None] = [None] * len(entries)
        with self._lock:
            self._check_open()
            self._park()
            todo: list[tuple[int, int, Command | None]] = []
            expected = self._applied_index
            for pos, (index, data) in enumerate(entries):
                if index <= expected:
                    continue  # replay after a restart: already in the database
                if index != expected + 1:
                    raise StateMachineError(
                        f"entry {index} does not follow applied index {expected}"
                    )
                cmd = None
                if isinstance(data, MemberChange | Command):
                    cmd = data  # a Command: the leader's own proposal, equal to decode(data)
                elif data:
                    try:
                        cmd = Command.decode(data)
                    except CommandError as e:
                        raise CorruptEntryError(f"entry {index}: {e}") from e
                todo.append((pos, index, cmd))
                expected = index
            if not todo:
                return results
            started = time.monotonic()
            forced: dict[int, Result] = {}
            retried_memory: set[int] = set()
            heap_limit: int | None = None
            try:
                while True:
                    try:
                        done = self._apply_batch(todo, forced)
                        break
                    except _TransactionLost as lost:
                        forced[lost.index] = lost.result
                    except NodeProblem as problem:
                        # The batch was rolled back. Is it this node or the statement?
                        if problem.memory and problem.index not in retried_memory:
                            retried_memory.add(problem.index)
                            free_memory(self._conn, problem)
                            if heap_limit is None:
                                # Again without the node's heap limit, which counts what every
                                # connection holds (reads too): the outcome must not depend on
                                # what else this node was doing (server/DESIGN.md, "Heap limit").
                                heap_limit = apsw.hard_heap_limit(0)
                            continue
                        if not problem.memory:
                            self._verify_database(problem)
                        # A healthy node, and the statement fails again: its own doing, so its
                        # error is the entry's result, as on every other node.
                        log.warning(
                            "entry %d: a statement failed with %s (%s); this node's database "
                            "checks clean, so the error is the entry's result",
                            problem.index, problem.error["name"], problem.error["message"],
                        )
                        forced[problem.index] = Result(index=problem.index, error=problem.error)
            finally:
                if heap_limit is not None:
                    apsw.hard_heap_limit(heap_limit)
            for pos, result in done:
                results[pos] = result
            audited = self.records.committed()
            metrics.APPLY.observe(time.monotonic() - started)
            metrics.APPLIED_ENTRIES.inc(len(todo))
        with self._applied_cond:
            self._applied_cond.notify_all()
        if audited and self.on_admin is not None:
            self.on_admin(self, audited)
        return results

    def _verify_database(self, problem: NodeProblem) -> None:
        """Raise DatabaseDamagedError unless this node's database passes SQLite's quick_check
        (a clean check is trusted for VERIFY_INTERVAL_S)."""
        now = time.monotonic()
        if now - self._verified_at < VERIFY_INTERVAL_S:
            return
        damage = find_damage(self._internal)
        if damage is not None:
            raise damaged(
                self.path,
                f"entry {problem.index} failed with {problem.error['name']} "
                f"({problem.error['message']})",
                damage,
            ) from problem.cause
        self._verified_at = now

    def _apply_batch(
        self, todo: list[tuple[int, int, Command | None]], forced: dict[int, Result]
    ) -> list[tuple[int, Result | None]]:
        applied, time_ms, gc_ms = self._applied_index, self._time_ms, self._gc_ms
        session_ms = self._session_ms
        done: list[tuple[int, Result | None]] = []
        self.records.pending.clear()
        self._internal("BEGIN IMMEDIATE")
        try:
            for pos, index, cmd in todo:
                if isinstance(cmd, MemberChange):
                    self.records.member(index, time_ms, cmd)
                    cmd = None
                if cmd is not None:
                    step = max(cmd.leader_time_ms - time_ms, 0)
                    time_ms += step
                    session_ms += min(step, self._session_step_ms)
                    if session_ms - gc_ms >= self._gc_interval_ms:
                        self._internal(self._sql_session_gc, (session_ms - self.session_timeout_ms,))
                        gc_ms = session_ms
                # Always the last internal DML before user statements: changes() then reads 1
                # on every node, restarted or not.
                self._internal(self._sql_meta, (index, time_ms, gc_ms, session_ms))
                applied = index
                if cmd is None:
                    done.append((pos, None))
                    continue
                self._vfs.now_ms = time_ms
                done.append(
                    (pos, self._apply_command(index, cmd, time_ms, session_ms, forced.get(index)))
                )
            self._internal("COMMIT")
        except (_TransactionLost, NodeProblem):
            self._abandon()
            self._reload_statistics()
            raise
        except StateMachineError:
            self._abandon()
            raise
        except apsw.Error as e:
            # One of raftsql's own statements failed (the meta row, a session row): never the
            # user's doing. Tell a damaged file from the rest of the machine.
            self._abandon()
            damage = find_damage(self._internal) if classify(e) == "suspect" else None
            if damage is not None:
                raise damaged(self.path, f"apply failed: {type(e).__name__}: {e}", damage) from e
            raise StateMachineError(
                f"apply failed on this node's machine: {type(e).__name__}: {e}. Fix the "
                "machine (disk space, permissions, file system) and restart the node: it "
                "re-applies the entry."
            ) from e
        except BaseException:
            self._abandon()
            raise
        self._applied_index, self._time_ms, self._gc_ms = applied, time_ms, gc_ms
        self._session_ms = session_ms
        self._vfs.now_ms = time_ms
        return done

    def _abandon(self) -> None:
        self._vfs.now_ms = self._time_ms
        self._ctx.budget_on = False
        if self._conn.in_transaction:
            try:
                self._internal("ROLLBACK")
            except apsw.Error as e:  # pragma: no cover - nothing more to do; the node stops
                log.error("rollback failed: %s", e)

    def client_last_rowid(self, client_id: str) -> int:
        """The last_insert_rowid() a client's next write starts from: what its previous write
        left (its session row), 0 without one. Call under the lock."""
        if not client_id:
            return 0
        rows = self._internal(self._sql_session_get, (client_id,))
        if not rows or rows[0][2] < self._session_ms - self.session_timeout_ms:
            return 0
        return stored_rowid(rows[0][1])

    def _schema_cookie(self) -> int:
        guard = self._guard
        outer, guard.internal = guard.internal, True
        try:
            cookie = self._cookie_cursor.execute(self._sql_cookie).fetchall()[0][0]
            # A rollback (of a savepoint too) in a transaction that changed the schema makes
            # SQLite discard its whole in-memory schema, virtual table connections and FTS5's
            # loaded config included, while the cookie comes back to the value it had: a
            # cookie alone missed that, and a later user prepare connected an rtree itself (its
            # own SELECTs then counted against SELECT_CAP on this node only), and an FTS5
            # 'rebuild' wrote another config cookie (outside-in divergence hunt, 2026-12-05).
            reset, self._schema_discarded = self._schema_discarded, False
            if cookie != self._shadow_cookie or reset:
                # The schema changed (or the connection is new, or its schema was discarded):
                # which tables are shadow tables (Guard.shadow). Listing them also connects
                # every virtual table, so no user prepare connects one afterwards.
                guard.shadow = frozenset(name.lower() for (name,) in self._conn.execute(
                    self._tag + "SELECT name FROM pragma_table_list WHERE schema='main' "
                    "AND type='shadow'"))
                self._fts34 = frozenset(name.lower() for (name,) in self._conn.execute(
                    self._tag + "SELECT name FROM sqlite_schema WHERE type='table' AND "
                    "sql LIKE 'CREATE VIRTUAL TABLE%' AND (sql LIKE '%USING fts3%' "
                    "OR sql LIKE '%USING fts4%')"))
                self._load_fts5_configs()
                self._shadow_cookie = cookie
            return cookie
        finally:
            guard.internal = outer

    def _internal(self, sql: str, params: Sequence[Any] | None = None) -> list[tuple]:
        guard = self._guard
        first = sql[:1]
        if first == "B" and sql.startswith("BEGIN"):
            self._epoch_at_begin = guard.schema_epoch
        elif first == "R" and sql.startswith("ROLLBACK"):
            self._on_rollback()  # (a savepoint's too)
        outer, guard.internal = guard.internal, True
        try:
            return self._conn.execute(self._tag + sql, params).fetchall()
        finally:
            guard.internal = outer

    def _apply_command(
        self, index: int, cmd: Command, time_ms: int, session_ms: int, forced: Result | None
    ) -> Result:
        self._conn.set_last_insert_rowid(0)
        if cmd.record is not None:  # an ADMIN command: an administrator's record
            return self.records.admin(index, time_ms, cmd.record)
        if cmd.dedup:
            rows = self._internal(self._sql_session_get, (cmd.client_id,))
            if rows and rows[0][2] >= session_ms - self.session_timeout_ms:
                serial, stored, _ = rows[0]
                if cmd.serial == serial:
                    self._internal(self._sql_session_touch, (session_ms, cmd.client_id))
                    result = Result.decode(stored)
                    result.duplicate = True
                    return result
                if cmd.serial < serial:
                    return Result(
                        index=index,
                        error=sql_error(
                            SQLITE_ERROR,
                            STALE_SERIAL,
                            f"stale serial {cmd.serial} < latest {serial} "
                            f"for client {cmd.client_id}",
                        ),
                    )
                # last_insert_rowid() carries over from the client's previous write, as on one
                # sqlite3 connection (a transaction's previews start from it too).
                self._conn.set_last_insert_rowid(stored_rowid(stored))
        if forced is not None:
            result = forced
        else:
            result = (txn_refusal(self._conn, self._guard, self._tag, index, cmd, time_ms,
                                  self.txn_idle_timeout_ms)
                      or self._execute(index, cmd))
        if cmd.dedup:
            self._internal(
                self._sql_session_put, (cmd.client_id, cmd.serial, result.encode(), session_ms)
            )
        return result

    def _execute(self, index: int, cmd: Command) -> Result:
        self._guard.in_txn = cmd.checks is not None
        if cmd.checks is not None:
            try:
                return self._execute_checked(index, cmd)
            except StatementFailed as failed:
                # The SQLite transaction is gone (ON CONFLICT ROLLBACK, an interrupted write):
                # apply_many redoes the batch with this entry's result forced.
                raise _TransactionLost(index, Result(index=index, error=failed.error)) from None
        conn = self._conn
        statements = cmd.statements
        self._rand.seed = cmd.seed
        self._ctx.result_budget = MAX_RESULT_BYTES
        self._savepoint_entry()
        per: list[Result] = []
        written: set[str] = set()
        self._guard.writes = written
        changes_before = conn.total_changes()
        try:
            for i, (sql, params) in enumerate(statements):
                self._rand.stmt_no = i
                self._rand.rng = None
                try:
                    if type(params) is Many:
                        per.append(self._run_many(sql, params))
                    else:
                        per.append(self._run_statement(sql, params))
                except (StatementFailed, NodeProblem) as failed:
                    if len(statements) != 1:
                        failed.error["statement"] = i
                    if isinstance(failed, NodeProblem):
                        failed.index = index
                    raise
        except StatementFailed as failed:
            self._guard.writes = None
            result = Result(index=index, error=failed.error)
            if not conn.in_transaction:
                raise _TransactionLost(index, result) from None
            if (failed.by_sqlite and len(statements) == 1 and cmd.kind == CommandKind.WRITE
                    and conn.total_changes() != changes_before):
                # One autocommit statement that SQLite failed but whose changes it kept (the
                # rows OR FAIL inserted before the conflict, the parameter sets of an
                # executemany before the failing one): applied, as sqlite3 commits them in
                # autocommit mode. The error is still the result. A batch (executescript)
                # stays all or nothing.
                self._internal("RELEASE raftsql_entry")
                self._touch_tables(written, index)
                failed.error["kept_changes"] = True
                return result
            self._internal("ROLLBACK TO raftsql_entry")
            self._internal("RELEASE raftsql_entry")
            self._reload_statistics(written)
            return result
        finally:
            self._guard.writes = None
        self._internal("RELEASE raftsql_entry")
        self._touch_tables(written, index)
        if len(per) == 1:
            result = per[0]
        else:
            last = per[-1] if per else Result()
            result = Result(
                columns=last.columns,
                decltypes=last.decltypes,
                rows=last.rows,
                rowcount=last.rowcount,
                lastrowid=last.lastrowid,
                results=per,
            )
        result.index = index
        return result

    def _touch_tables(self, written: set[str], index: int) -> None:
        """After an entry that kept its changes: the tables it wrote were last modified at
        `index` (sqlite_raftsql_tables), and if it wrote the planner's statistics they are
        loaded again, as a node that starts loads them (an edit by hand otherwise reached only
        restarted nodes' plans)."""
        for name in sorted(written):
            self._internal(self._sql_table_touch, (name, index))
        self._reload_statistics(written)

    def _reload_statistics(self, written: set[str] | None = None) -> None:
        """Load the planner's statistics again if `written` (None: whatever was written) may
        have changed them: after an entry that kept or rolled back such writes (an ANALYZE
        loads what it computed at once, and a rollback that changes no schema leaves that in
        the planner), and after a batch rolled back whole."""
        if (written is None or not written.isdisjoint(STAT_TABLES)) and self._internal(
                "SELECT 1 FROM sqlite_schema WHERE name = 'sqlite_stat1'"):
            # (Only when there are statistics: without sqlite_stat1, this would create it.)
            self._internal("ANALYZE sqlite_schema")

    def _savepoint_entry(self) -> None:
        """SAVEPOINT raftsql_entry, keeping last_insert_rowid(): FTS3/4 write their pending
        terms at a SAVEPOINT, and those inserts changed it, so the next entry of the same batch
        started from another rowid (0 where it carries the client's last one) than on a node
        that applied it in a batch of its own."""
        rowid = self._conn.last_insert_rowid()
        self._internal("SAVEPOINT raftsql_entry")
        self._conn.set_last_insert_rowid(rowid)

    def _run_statement(self, sql: str, params: Any, sink: Any = None) -> Result:
        """Run one user statement on the apply connection with every check. Its rows go into
        the Result (bounded by the entry's result budget), or, with `sink`, to sink(row),
        which returns False to stop reading (the statement is then abandoned)."""
        conn = self._conn
        self._guard.denied = None
        self._guard.sequence_written = False
        self._guard.defined = None
        self._guard.user_prepare = True
        self._ctx.traced = 0
        self._ctx.sql, self._ctx.sql_pos = sql, 0
        self._ctx.description = ()
        self._ctx.dml = False
        self._ctx.abort = None
        self._ctx.step_limit_hit = False
        self._ctx.max_rowid_table = None
        rows: list[list[Any]] = []
        if first_keyword(sql) == "CREATE":
            # Before it runs: SQLite resolves the new table's generated columns inside one
            # another already while creating it (200 of depth 900 took 59 s).
            names = [text for kind, text in itertools.islice(tokens(sql), 8) if kind == "name"]
            if names[:2] == ["create", "table"]:
                rest = names[5:] if names[2:5] == ["if", "not", "exists"] else names[2:]
                _check_generated_chain(rest[0] if rest else "?", generated_column_reads(sql))
        memo = self._memo
        key, cached = memo.start(self._guard, sql, self._schema_cookie())
        try:
            # Never from apsw's statement cache: SQLite does not reset a statement's VM step
            # counter between runs, and the progress handler's first call comes after what is
            # left of the last run's 1000-step period, so a cached run's step budget depended on
            # the node's history (a statement just under the step limit failed on the leader,
            # whose preview had run it, and succeeded on the followers). A fresh prepare costs
            # a few µs more (server/DESIGN.md, "Step limit").
            cursor = prepare_bounded(
                self._conn, self._guard, sql, lambda: self._cursor.execute(sql, params, can_cache=False))
            budget = self._ctx.result_budget
            stopped = False
            if sink is not None:
                for row in cursor:
                    if not sink(row):
                        stopped = True
                        break
            else:
                for row in cursor:
                    budget -= sum(map(value_size, row)) + 5
                    if budget < 0:
                        break
                    rows.append(list(row))
                else:
                    budget -= sum(4 * len(d[0]) + 4 * len(d[1] or "") + 10 for d in self._ctx.description)
        except Exception as e:  # noqa: BLE001 - mapped to a result or re-raised as fatal
            if not isinstance(e, apsw.Error):
                # A row Python could not take (RETURNING text that is not UTF-8): the statement
                # is still open, and releasing the entry's savepoint under it failed as the
                # machine's fault on every node.
                self._reset_apply_cursor()
            raise StatementFailed(self._statement_error(e), by_sqlite=self._by_sqlite(e)) from None
        finally:
            self._ctx.budget_on = False
            memo.finish(self._guard, key, self._ctx.description)
        if stopped:
            self._reset_apply_cursor()  # the sink has seen enough: abandon the rest
        elif budget < 0:
            self._reset_apply_cursor()
            raise StatementFailed(result_too_big_error())
        self._ctx.result_budget = budget
        if self._guard.sequence_written:
            self._check_sequences()
        if self._guard.defined:
            self._check_chains(self._guard.defined)
        if self._ctx.max_rowid_table is not None:
            raise StatementFailed(max_rowid_error(self._ctx.max_rowid_table))
        if self._fts34 and self._guard.writes and not self._fts34.isdisjoint(self._guard.writes):
            self._refuse_fts_automerge()
        desc = self._ctx.description
        return Result(
            columns=[d[0] for d in desc],
            decltypes=[d[1] for d in desc],
            rows=rows,
            rowcount=conn.changes() if self._ctx.dml else -1,
            lastrowid=conn.last_insert_rowid(),
        )

    def _load_fts5_configs(self) -> None:
        """Make each FTS5 table load its configuration on this connection now (a lookup of a
        word reads its structure record). Its 'rebuild' and 'delete-all' write the config
        cookie the connection holds: 0 on a connection that had not loaded it yet, so a
        restarted or snapshot-installed node wrote other bytes than the others (outside-in
        divergence hunt, 2026-12-05). Called with the guard off, when the schema cookie
        changes."""
        for (name,) in self._conn.execute(
                self._tag + "SELECT name FROM sqlite_schema WHERE type='table' AND "
                "sql LIKE 'CREATE VIRTUAL TABLE%' AND sql LIKE '%USING fts5%'").fetchall():
            try:
                q = quote_ident(name)
                self._conn.execute(f"{self._tag}SELECT rowid FROM {q} WHERE {q} MATCH "
                                   "'\"raftsqlwarm\"' LIMIT 1").fetchall()
            except apsw.Error:
                pass  # (an external content table without its table, say): nothing to load

    def _refuse_fts_automerge(self) -> None:
        """FTS3/4's 'automerge=N' merges segments at each SQLite COMMIT, by how much the
        transaction wrote, and nodes group entries into commits differently (a follower catching
        up commits many at once): their FTS indexes came out different (outside-in divergence
        hunt, 2026-12-05). A statement that leaves it on fails; it is set back to 0 first, so
        that what a transaction's preview keeps of it is what its commit keeps."""
        for name in sorted(self._fts34 & self._guard.writes):
            try:
                rows = self._internal(f"SELECT value FROM {quote_ident(name + '_stat')} WHERE id = 2")
            except apsw.SQLError:
                continue  # no %_stat table: automerge was never set
            if rows and rows[0][0]:
                self._internal(f"INSERT INTO {quote_ident(name)}({quote_ident(name)}) "
                               "VALUES ('automerge=0')")
                raise StatementFailed(sql_error(
                    SQLITE_ERROR, "SQLITE_ERROR",
                    f"FTS automerge is not supported (table {name}): it merges at each SQLite "
                    "commit, and nodes group entries into commits differently, so their indexes "
                    "would differ; run 'merge=X,Y' commands instead"))

    def _check_chains(self, defined: set[tuple[str, str]]) -> None:
        """Fail a statement that made a chain SQLite cannot bound by itself too long: views
        reading views (MAX_VIEW_CHAIN: past it, preparing any statement that reads the chain
        costs every node seconds), or, after an ALTER TABLE, generated columns reading
        generated columns (MAX_GENERATED_CHAIN: they are coded inside one another, past it the
        stack overflows; a CREATE TABLE is checked from its text before it runs).
        Which reads which is told from the schema's text alone (sqltext), the same on every
        node; a redefined view lengthens the chains above it, so every chain through a created
        view is checked."""
        views = {name for kind, name in defined if kind == "view"}
        if views:
            texts = {name.lower(): identifiers(sql or "") for name, sql in self._internal(
                "SELECT name, sql FROM sqlite_schema WHERE type = 'view'")}
            reads = {name: sorted(ids & texts.keys() - {name}) for name, ids in texts.items()}
            depth, through = chain_depths(reads, views)
            for name in sorted(depth):
                if depth[name] > MAX_VIEW_CHAIN and through[name]:
                    raise StatementFailed(sql_error(
                        SQLITE_ERROR, "SQLITE_ERROR",
                        f"views nested too deep: view {name} reads through a chain of "
                        f"{depth[name]} views (at most {MAX_VIEW_CHAIN}), which costs seconds "
                        "to prepare each statement that reads it"))
        for kind, table in sorted(defined):
            if kind == "altered":  # (a CREATE TABLE was checked from its text before it ran)
                rows = self._internal(
                    "SELECT sql FROM sqlite_schema WHERE type = 'table' AND lower(name) = ?", (table,))
                _check_generated_chain(table, generated_column_reads(rows[0][0] if rows else ""))

    def _check_sequences(self) -> None:
        rows = self._internal(
            "SELECT name FROM sqlite_sequence WHERE seq >= ? LIMIT 1", (INT64_MAX,)
        )
        if rows:
            raise StatementFailed(
                sql_error(
                    SQLITE_CONSTRAINT,
                    MAX_ROWID,
                    f"sqlite_sequence may not hold {INT64_MAX} (for table {rows[0][0]}): the "
                    "next AUTOINCREMENT insert would fail with SQLITE_FULL, which a node cannot "
                    "tell from its own disk being full",
                )
            )

    def _reset_apply_cursor(self) -> None:
        """Abandon the apply cursor's statement midway (a result over its limit): a fresh
        cursor, so the savepoint can be rolled back with nothing pending."""
        self._cursor = self._fresh_cursor(self._cursor, self._trace)

    def _fresh_cursor(self, cursor: apsw.Cursor, trace: Any = None) -> apsw.Cursor:
        """A new cursor for one whose statement is still open (abandoned midway)."""
        cursor.close(force=True)
        fresh = self._conn.cursor()
        if trace is not None:
            fresh.exec_trace = trace
        return fresh

    def _trace(self, cursor: apsw.Cursor, sql: str, bindings: Any) -> bool:
        """Exec tracer of the apply cursor: runs once per statement, before it steps."""
        ctx = self._ctx
        ctx.sql_pos += len(sql)  # apsw hands over the text piece by piece, each up to the next
        if not cursor.has_vdbe:
            return True  # only comments or ';'
        ctx.traced += 1
        if ctx.traced > 1 or skip_blank(ctx.sql, ctx.sql_pos, semicolons=False) < len(ctx.sql):
            # Anything but blanks and comments follows (a stray ';' too): refused before this
            # one steps, as sqlite3 does (this one used to run first, and a transaction's
            # preview kept its changes).
            ctx.abort = sql_error(
                SQLITE_ERROR, MULTIPLE_STATEMENTS, "You can only execute one statement at a time."
            )
            return False
        keyword = first_keyword(sql)
        if keyword == "VACUUM":
            self._ctx.abort = sql_error(
                SQLITE_AUTH, "SQLITE_AUTH", "not authorized: VACUUM is not allowed"
            )
            return False
        self._ctx.dml = keyword in _DML_KEYWORDS
        self._ctx.readonly = cursor.is_readonly
        memo = self._memo
        memo.capture(self._guard)
        self._guard.user_prepare = False
        self._guard.selects_left = None  # prepared: the flattening bound is done
        # Not from a cached statement: the schema may have changed under it (StatementMemo).
        desc = memo.description
        self._ctx.description = desc if desc is not None else cursor.get_description()
        self._ctx.new_budget()
        self._ctx.budget_on = True
        return True

    def _on_rollback(self) -> None:
        """Anything rolled back on the apply connection: if its transaction changed the schema,
        SQLite discarded its in-memory schema (see _schema_cookie)."""
        if self._guard.schema_epoch != self._epoch_at_begin:
            self._schema_discarded = True

    def _update_hook(self, op: int, db: str, table: str, rowid: int) -> None:
        # A table holding the largest rowid makes SQLite choose later rowids with its own PRNG,
        # which cannot be seeded per entry: the statement that stores it fails instead.
        if rowid == INT64_MAX and self._ctx.budget_on and op != apsw.SQLITE_DELETE:
            self._ctx.max_rowid_table = table

    def _randomblob(self, n: Any) -> bytes:
        """randomblob(N) of the entry, its bytes charged to the statement's step budget (one
        step per BLOB_BYTES_PER_STEP bytes, about their share of CPU): a few VM steps could call
        it for 100 MB each, and a loop of them held every node's apply for 42 s."""
        size = as_int(n)
        if 0 < size <= MAX_VALUE_BYTES:  # (else: 1 byte, or too big)
            self.charge_steps(size // BLOB_BYTES_PER_STEP)
        return self._rand.randomblob(n)

    def charge_steps(self, steps: int) -> None:
        """Count `steps` VM steps against the running user statement's step budget, for work a
        C call does between two VM steps, where the progress handler cannot see it
        (randomblob, server/costed.py). Nothing outside user statements. Raises the step
        limit's interrupt once the budget is spent, the same on every node."""
        ctx = self._ctx
        if not ctx.budget_on:
            return
        extra = ctx.extra_steps + steps
        ctx.progress_calls += extra // PROGRESS_STEPS
        ctx.extra_steps = extra % PROGRESS_STEPS
        if ctx.progress_calls > ctx.max_progress_calls:
            ctx.step_limit_hit = True
            raise apsw.InterruptError("interrupted")

    def _progress(self) -> bool:
        if not self._ctx.budget_on:
            return False
        session = self._live_session  # a transaction preview: bound what its delete costs
        if session is not None and session.memory_used > MAX_LIVE_SESSION_BYTES:
            self._cap_live_session()
        self._ctx.progress_calls += 1
        if self._ctx.progress_calls > self._ctx.max_progress_calls:
            self._ctx.step_limit_hit = True
            return True
        return False

    def _by_sqlite(self, e: BaseException) -> bool:
        """Did SQLite itself fail the statement (a constraint, a type or function error), so
        that what it kept of the statement is SQLite's doing? Not for raftsql's aborts (a
        second statement in the text, VACUUM, the step limit, a timeout), which stop a
        statement that had nothing wrong with it so far."""
        return (self._ctx.abort is None and not self._ctx.step_limit_hit and isinstance(e, apsw.Error)
                and not isinstance(e, (apsw.ExecTraceAbort, apsw.InterruptError)))

    def _statement_error(self, e: BaseException) -> dict[str, Any]:
        """The replicated error value for a failed user statement. Raises StateMachineError if
        the failure is about this node's machine (disk, locks), and NodeProblem if it may be
        about the node or the statement (apply_many finds out which)."""
        if isinstance(e, apsw.ExecTraceAbort) and self._ctx.abort is not None:
            return self._ctx.abort
        if isinstance(e, apsw.InterruptError) and self._ctx.step_limit_hit:
            return sql_error(
                SQLITE_INTERRUPT,
                STEP_LIMIT,
                f"statement exceeded the step limit ({self.apply_vm_step_limit} VM steps)",
            )
        err = common_error(e, self._guard)
        if err is not None:
            return err
        kind = classify(e)
        code = getattr(e, "extendedresult", None) or getattr(e, "result", None) or SQLITE_ERROR
        if kind in ("suspect", "memory"):
            name = "SQLITE_NOMEM" if kind == "memory" else code_name(code)
            raise NodeProblem(
                sql_error(code if kind != "memory" else apsw.SQLITE_NOMEM, name,
                       str(e.args[0]) if e.args else str(e) or type(e).__name__),
                kind == "memory",
                e,
            )
        raise StateMachineError(
            f"apply failed on this node's machine: {type(e).__name__}: {e} "
            f"({code_name(code)}). Fix the machine (disk space, permissions, file system) and "
            "restart the node: it re-applies the entry."
        ) from e

    # -- inspection -----------------------------------------------------------------------

    def validate(self, statements: Sequence[tuple[str, Any]],
                 returns_rows: list[bool] | None = None) -> list[bool]:
        """See Reads.validate: prepare without running; the read-only flag of each."""
        return self.reads.validate(statements, returns_rows)

    def query(self, sql: str, params: Any = (), **kw: Any) -> Result:
        """See Reads.query: one read, its whole result (bounded)."""
        return self.reads.query(sql, params, **kw)

    def open_query(self, sql: str, params: Any = (), **kw: Any) -> tuple[Result, ReadCursor | None]:
        """See Reads.open_query: one read's first chunk and a cursor for the rest."""
        return self.reads.open_query(sql, params, **kw)

    def stream_query(self, sql: str, params: Any = (), **kw: Any) -> Result:
        """See Reads.stream_query."""
        return self.reads.stream_query(sql, params, **kw)

    def content_hash(self) -> str:
        """sha256 over the schema (without root pages) and every table's rows in key order,
        including raftsql's own tables: equal on two nodes at the same applied index."""
        with self._lock:
            self._check_open()
            self._park()
            self._guard.internal = True
            try:
                return content_hash(self._conn, self._tag)
            finally:
                self._guard.internal = False

    def members(self) -> dict[str, str]:
        """The replicated address book: node id -> advertised host:port."""
        with self._lock:
            self._check_open()
            self._park()
            return dict(self._internal("SELECT node_id, address FROM sqlite_raftsql_members"))

    # -- lifecycle ------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StateMachineError("the state machine is closed")

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for txn in self.open_txns:
                self._drop_txn(txn)
            self.reads.close()
            self._conn.close()  # the last connection: checkpoints and removes the WAL
            self._costed.close()
            self._vfs.unregister()

    def __enter__(self) -> StateMachine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


"""connect() and Connection: settings, transactions, and the mapping of transport failures to
DB-API exceptions. The network work is _client.Client's (one per Connection: one client_id,
one serial sequence, one TLS connection at a time)."""

from __future__ import annotations

import contextlib
import os
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from raftsql import protocol, txncheck, wire
from raftsql.driver import _client, _sql
from raftsql.driver._conn import DSN
from raftsql.driver._cursor import Cursor
from raftsql.driver._exceptions import (
    DatabaseError,
    DataError,
    Error,
    IntegrityError,
    InterfaceError,
    InternalError,
    NotSupportedError,
    OperationalError,
    OutcomeUnknown,
    PermissionDenied,
    ProgrammingError,
    TransactionAborted,
    Unavailable,
    Warning,
    error_from_map,
)
from raftsql.driver._tls import client_context, default_paths

Statement = tuple[str, Any]

CONSISTENCY_LEVELS = ("linearizable", "leader", "stale")
DEFAULT_TIMEOUT = 10.0
# sqlite3 accepts timeout=0 (do not wait for locks). raftsql has no locks to wait for; its
# timeout is the budget to find the leader and retry, and a request needs at least one round
# trip: 0 (or less) gives it this much, so a healthy cluster answers and a failover fails fast.
MIN_TIMEOUT = 0.5
# sqlite3's SQLITE_LIMIT_* categories (getlimit/setlimit).
LIMITS = {
    "SQLITE_LIMIT_LENGTH": 0, "SQLITE_LIMIT_SQL_LENGTH": 1, "SQLITE_LIMIT_COLUMN": 2,
    "SQLITE_LIMIT_EXPR_DEPTH": 3, "SQLITE_LIMIT_COMPOUND_SELECT": 4, "SQLITE_LIMIT_VDBE_OP": 5,
    "SQLITE_LIMIT_FUNCTION_ARG": 6, "SQLITE_LIMIT_ATTACHED": 7,
    "SQLITE_LIMIT_LIKE_PATTERN_LENGTH": 8, "SQLITE_LIMIT_VARIABLE_NUMBER": 9,
    "SQLITE_LIMIT_TRIGGER_DEPTH": 10, "SQLITE_LIMIT_WORKER_THREADS": 11,
}
# autocommit's third value (Python 3.12's sqlite3 constant, the same -1): transactions are
# controlled by isolation_level, as in sqlite3 before 3.12. The default.
LEGACY_TRANSACTION_CONTROL = -1
_ISOLATION_LEVELS = ("", "DEFERRED", "IMMEDIATE", "EXCLUSIVE")
_DSN_PARAMS = frozenset({"certs", "cafile", "certfile", "keyfile", "timeout", "autocommit", "consistency",
                         "durability"})
DURABILITY_LEVELS = protocol.DURABILITY  # what a node accepts
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclass(eq=False)
class _Step:
    """One statement the open transaction ran, and what it saw: the commit replays it and
    applies the transaction only if it does the same again (raftsql/txncheck.py)."""

    sql: str
    params: Any
    error: str | None = None  # the SQL error name it failed with
    digest: txncheck.RowDigest | None = None  # its columns and the rows received so far
    complete: bool = True  # every row of its result was received
    rowcount: int | None = None
    lastrowid: int | None = None
    rowid_seen: bool = False  # the application looked at the rowid it inserted
    env: tuple[int, int] | None = None  # the leader's (seed, now_ms) for random() and 'now'

    def add_rows(self, rows: list) -> None:
        if self.digest is not None:
            self.digest.add_all(rows)

    def check(self) -> tuple:
        if self.error is not None:
            return txncheck.failed_check(self.error)
        return txncheck.ok_check(self.rowcount, self.digest, self.complete,
                                 self.lastrowid if self.rowid_seen else None, self.env)


@dataclass
class _Transaction:
    """The open transaction: implicit (opened by the transaction mode) or explicit (BEGIN or
    SAVEPOINT sent through execute). See driver/DESIGN.md, "Transactions"."""

    steps: list[_Step] = field(default_factory=list)  # every statement it ran, in order
    # Savepoint operations among the steps: (position in steps, txncheck op, depth).
    controls: list[tuple[int, int, int]] = field(default_factory=list)
    writes: list[Statement] = field(default_factory=list)  # the statements that changed something
    term: int | None = None  # the leader's term at the first statement run there
    leader: str | None = None  # "host:port" of that leader; later statements go only there
    txn_id: str | None = None  # the leader's preview state of its writes
    last_ms: int | None = None  # the leader's clock at the last statement (idle timeout)
    explicit: bool = False  # opened by BEGIN or SAVEPOINT through execute()
    # Legacy transaction control: begun by an INSERT/UPDATE/DELETE/REPLACE (even one that failed,
    # as sqlite3's implicit BEGIN stays open); from then on every statement joins it.
    begun: bool = False
    by_savepoint: bool = False  # opened by SAVEPOINT: RELEASE of the outermost one commits
    savepoints: list[tuple[str, int]] = field(default_factory=list)  # (name, len(writes))
    # An explicit transaction that failed (serialization, leader change, idle): every statement
    # raises this again until COMMIT (raises it too) or ROLLBACK ends the transaction.
    doomed: Error | None = None
    # Cursors whose lastrowid came from a statement of this transaction: (position in steps,
    # cursor); commit() gives them the rowid the committed entry assigned.
    rowid_cursors: list[tuple[int, Any]] = field(default_factory=list)
    # Pipeline mode (Connection.pipeline): writes not sent yet. They follow every step, and the
    # commit carries them unchecked (nobody saw their outcome); anything else sends them first.
    pending: list[Statement] = field(default_factory=list)
    # Statements and parameters of the reads before the first write, in bytes (about what they
    # take in the commit request): see _trim_reads_before_first_write.
    reads_size: int = 0
    # With autocommit=False: reads were dropped past the bounds, so this transaction can no
    # longer write (its commit could not check them): the error its first write raises.
    unchecked: str | None = None

    def record(self, statement: Statement, result: dict[str, Any]) -> _Step:
        """Add a statement's outcome to the steps (the result map as received)."""
        sql, params = statement
        err = result.get("error")
        if err:
            step = _Step(sql, params, error=str(err.get("name") or "SQLITE_ERROR"))
        else:
            columns, rows = result.get("columns"), result.get("rows")
            digest = None  # no columns and no rows (txncheck.EMPTY_DIGEST)
            if columns or rows:
                digest = txncheck.RowDigest(columns or [])
                digest.add_all(rows or [])
            rowcount = result.get("rowcount", -1)
            seed, now_ms = result.get("seed"), result.get("time_ms")
            env = (seed, now_ms) if type(seed) is int and type(now_ms) is int else None
            step = _Step(sql, params, digest=digest, complete=result.get("stream") is None,
                         rowcount=rowcount if isinstance(rowcount, int) else None,
                         lastrowid=result.get("lastrowid"), env=env)
        self.steps.append(step)
        return step


# The reads of an implicit transaction before its first write that its commit checks
# (driver/DESIGN.md, "Transactions"). Legacy mode: the latest ones only. sqlite3 runs such
# reads in no transaction; keeping every one let a connection that reads for hours and never
# commits grow without bound, and made its first write's commit too big to send.
MAX_READS_BEFORE_WRITE = 256
MAX_READS_BEFORE_WRITE_BYTES = 256 * 1024
# autocommit=False: sqlite3 runs every read inside the transaction, so none may go unchecked.
# Up to these bounds every one is kept (the commit request carries them: 4 MiB by default);
# past them the transaction refuses to write (_Transaction.unchecked).
MAX_READS_BEFORE_WRITE_PEP249 = 4096
MAX_READS_BEFORE_WRITE_BYTES_PEP249 = 2 << 20


def _trim_reads_before_first_write(txn: _Transaction, pep249: bool) -> None:
    """The read just recorded counts; the oldest go while over either bound (the newest
    always stays). O(1) per read: the size of what is kept is carried along. pep249: the
    larger bounds, and a transaction that drops a read is marked unchecked."""
    steps = txn.steps
    txn.reads_size += _step_size(steps[-1])
    most, most_bytes = ((MAX_READS_BEFORE_WRITE_PEP249, MAX_READS_BEFORE_WRITE_BYTES_PEP249)
                        if pep249 else (MAX_READS_BEFORE_WRITE, MAX_READS_BEFORE_WRITE_BYTES))
    if len(steps) <= most and txn.reads_size <= most_bytes:
        return
    if pep249 and txn.unchecked is None:
        txn.unchecked = (
            f"this transaction read more than {most} times or {most_bytes} bytes of statements "
            "and parameters before its first write, more than its commit can check, so it "
            "cannot write: nothing was sent. End the reads with commit() or rollback(), "
            "then write")
    while len(steps) > most or (txn.reads_size > most_bytes and len(steps) > 1):
        txn.reads_size -= _step_size(steps.pop(0))


def _step_size(step: _Step) -> int:
    return len(step.sql) + _params_size(step.params)


def _params_size(params: Any) -> int:
    """About what params take in a request (msgpack): strings and blobs by length."""
    values = params.values() if isinstance(params, dict) else params
    return sum(len(v) + 5 if isinstance(v, (str, bytes, bytearray, memoryview)) else 9
               for v in values or ())


def _empty_result(rowcount: int = -1) -> dict[str, Any]:
    return {"columns": [], "decltypes": [], "rows": [], "rowcount": rowcount, "lastrowid": None,
            "index": 0, "error": None, "duplicate": False, "results": None}


def _tuning_result(name: str, value: str | None) -> dict[str, Any]:
    """What sqlite3 answers to a tuning PRAGMA (_sql.tuning_pragma) on a file database:
    nothing, but the new busy_timeout and mmap_size, and optimize's column."""
    result = _empty_result()
    if name in ("busy_timeout", "mmap_size"):
        try:
            rows = [[int(value or "", 0)]]
        except ValueError:
            return result
        result["columns"], result["rows"] = ["timeout" if name == "busy_timeout" else name], rows
    elif name == "optimize":
        result["columns"] = ["optimize"]
    return result


def _batch_rowcount(result: dict[str, Any]) -> int:
    results = result.get("results")
    if not results:
        return int(result.get("rowcount", -1))
    counts = [r.get("rowcount", -1) for r in results]
    changed = [c for c in counts if c >= 0]
    return sum(changed) if changed else -1


class Connection:
    """A DB-API connection to a raftsql cluster (create it with connect())."""

    Warning = Warning
    Error = Error
    InterfaceError = InterfaceError
    DatabaseError = DatabaseError
    DataError = DataError
    OperationalError = OperationalError
    IntegrityError = IntegrityError
    InternalError = InternalError
    ProgrammingError = ProgrammingError
    NotSupportedError = NotSupportedError

    def __init__(self, client: _client.Client, *, autocommit: bool | int = LEGACY_TRANSACTION_CONTROL,
                 isolation_level: str | None = "", consistency: str = "linearizable",
                 detect_types: int = 0, durability: str = "quorum"):
        if not isinstance(detect_types, int):
            raise TypeError(f"'{type(detect_types).__name__}' object cannot be interpreted as an integer")
        self._client = client
        # As sqlite3's connect(detect_types=): PARSE_DECLTYPES | PARSE_COLNAMES pick converters.
        self._detect_types = int(detect_types)
        # Bumped by interrupt() (any thread, without the lock): results that arrived before it fail.
        self._interrupts = 0
        # Serializes everything that touches the connection's state (threadsafety 2).
        self._lock = threading.RLock()
        self._closed = False
        self._autocommit = _check_autocommit(autocommit)
        self._isolation_level = _check_isolation_level(isolation_level)
        self._consistency = "linearizable"
        self.consistency = consistency
        self._durability = "quorum"
        self.durability = durability
        self.row_factory = None
        # As sqlite3: what TEXT values become (str; bytes; or a callable given the UTF-8 bytes).
        # Applied when rows are fetched. With str, TEXT that is not valid UTF-8 raises
        # OperationalError("Could not decode to UTF-8 column ...").
        self.text_factory: Any = str
        self._txn = _Transaction()
        self._pipelines = 0  # open pipeline() blocks
        _client.after_fork(self, tier=1)

    def _forked(self) -> None:
        """In a child process that inherited this connection through fork() (its Client gets
        a new identity: driver/_client.py). A transaction open at the fork belongs to the
        parent, which may still commit it: in the child it is doomed (TransactionAborted at
        every statement and at commit, until rollback()), so the child cannot commit a copy
        of the parent's writes, nor commit later writes as if the earlier ones were there."""
        self._lock = threading.RLock()
        txn = self._txn
        if txn.explicit or txn.begun or txn.writes or txn.pending:
            self._txn = _Transaction(explicit=True, doomed=TransactionAborted(
                f"this connection's transaction was opened in process {os.getppid()} before "
                f"fork(); it stays with that process and nothing of it can be committed from "
                f"this one (process {os.getpid()}). Call rollback() and run it again here"))
        else:
            self._txn = _Transaction()

    # ------------------------------------------------------------------ attributes

    @property
    def autocommit(self) -> bool | int:
        """As in Python 3.12's sqlite3. LEGACY_TRANSACTION_CONTROL (-1, the default):
        isolation_level decides (None: autocommit; a string: a transaction opens before
        INSERT/UPDATE/DELETE/REPLACE, and other statements outside one run on their own).
        True: every statement is its own replicated write; isolation_level is ignored.
        False (PEP 249): every statement, DDL included, joins the transaction that commit()
        applies; isolation_level is ignored. Setting it to True commits a pending transaction
        first; switching between False and LEGACY_TRANSACTION_CONTROL keeps it open."""
        self._check_open()
        return self._autocommit

    @autocommit.setter
    def autocommit(self, value: bool | int) -> None:
        value = _check_autocommit(value)
        with self._lock:
            self._check_open()
            if value is True and self._autocommit is not True:
                self.commit()
            self._autocommit = value

    @property
    def isolation_level(self) -> str | None:
        """sqlite3's legacy transaction control, used while autocommit is
        LEGACY_TRANSACTION_CONTROL: None (autocommit: every statement is its own write unless
        BEGIN opened a transaction), or "" (the default), "DEFERRED", "IMMEDIATE", "EXCLUSIVE"
        (case-insensitive, reported upper case): an implicit transaction opens before
        INSERT/UPDATE/DELETE/REPLACE. All three modes are the same optimistic transaction (no
        locks; driver/DESIGN.md). Setting None commits pending work first, as sqlite3 does."""
        self._check_open()
        return self._isolation_level

    @isolation_level.setter
    def isolation_level(self, value: str | None) -> None:
        level = _check_isolation_level(value)
        with self._lock:
            self._check_open()
            if level is None and self._autocommit is not True:
                # Commit first (not after, as sqlite3 does): if it raises, e.g. Unavailable, the
                # writes are still pending and must not be bypassed by autocommitted statements.
                self.commit()
            self._isolation_level = level

    @isolation_level.deleter
    def isolation_level(self) -> None:
        raise AttributeError("cannot delete attribute")

    def _mode(self) -> str:
        """"auto" (autocommit=True, or legacy with isolation_level None), "legacy" (legacy with
        an isolation level) or "pep249" (autocommit=False)."""
        if self._autocommit is True:
            return "auto"
        if self._autocommit is False:
            return "pep249"
        return "auto" if self._isolation_level is None else "legacy"

    @property
    def consistency(self) -> str:
        """Read consistency of reads outside a transaction: "linearizable" (the default; the
        leader confirms it still leads), "leader" (served by the leader without confirmation)
        or "stale" (any node, at least as recent as this connection's last_index)."""
        return self._consistency

    @consistency.setter
    def consistency(self, value: str) -> None:
        if value not in CONSISTENCY_LEVELS:
            raise ProgrammingError(f"consistency must be one of {', '.join(CONSISTENCY_LEVELS)}")
        self._consistency = value

    @property
    def durability(self) -> str:
        """When a write outside a transaction is answered: "quorum" (the default: a majority
        holds it and it is applied; no failure loses it) or "leader" (the leader's disk holds
        it: faster, but a leader crash can lose it, at most the leader's
        max_unreplicated_writes of them; the cursor then shows rowcount -1 and lastrowid None,
        and an error at apply goes unreported). A transaction's COMMIT always waits for the
        quorum. README, "Guarantees"."""
        return self._durability

    @durability.setter
    def durability(self, value: str) -> None:
        if value not in DURABILITY_LEVELS:
            raise ProgrammingError(f"durability must be one of {', '.join(DURABILITY_LEVELS)}")
        self._durability = value

    @property
    def timeout(self) -> float:
        """Seconds each operation may spend finding the leader and retrying (settable)."""
        return self._client.timeout

    @timeout.setter
    def timeout(self, value: float) -> None:
        self._client.timeout = _check_timeout(value)

    @property
    def in_transaction(self) -> bool:
        """True if an explicit transaction (BEGIN, SAVEPOINT) is open, the open transaction
        has uncommitted writes, or (legacy transaction control) an INSERT/UPDATE/DELETE/REPLACE
        opened the implicit transaction."""
        self._check_open()
        txn = self._txn
        return txn.explicit or txn.begun or bool(txn.writes) or bool(txn.pending)

    @property
    def last_index(self) -> int:
        """The highest log index this connection wrote or read. Pass it to another connection's
        cursor.min_index for causal reads across connections."""
        return self._client.last_index

    @property
    def client_id(self) -> str:
        return self._client.client_id

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise ProgrammingError("Cannot operate on a closed database.")

    # ------------------------------------------------------------------ PEP 249

    def cursor(self, factory: type[Cursor] = Cursor) -> Cursor:
        self._check_open()
        cur = factory(self)
        if not isinstance(cur, Cursor):
            raise TypeError("factory must return a raftsql.driver.Cursor")
        return cur

    def commit(self) -> None:
        """Apply the transaction as ONE log entry, exactly once, if every statement it ran
        still gives what it gave (rows read, rows changed, errors): the entry replays them at
        its place in the log on every node. Otherwise nothing is applied and SerializationError
        is raised. Nothing is sent for a transaction that ran nothing, or an implicit one that
        only read. If the entry fails (an SQL error) nothing is applied, the error is raised
        and the transaction is discarded. On Unavailable the transaction stays open (call
        commit() again); on OutcomeUnknown it is discarded and the error can be passed to
        resend()."""
        with self._lock:
            self._check_open()
            txn = self._txn
            if txn.doomed is not None:
                self._txn = _Transaction()
                raise _again(txn.doomed)
            if not txn.writes and not txn.pending and not (txn.explicit and txn.steps):
                self._txn = _Transaction()
                return
            # A pipelined write has no check: the application never saw what it did.
            check = {"last_ms": txn.last_ms or 0,
                     "checks": [st.check() for st in txn.steps] + [None] * len(txn.pending),
                     "controls": list(txn.controls), "txn": txn.txn_id}
            try:
                result = self._send([(st.sql, st.params) for st in txn.steps] + txn.pending,
                                    commit=check)
            except Unavailable:
                raise
            except BaseException:
                self._txn = _Transaction()
                raise
            self._txn = _Transaction()
            if result.get("error"):
                raise error_from_map(result["error"])
            _committed_rowids(txn, result)

    def rollback(self) -> None:
        """Discard the open transaction (nothing of it was applied)."""
        with self._lock:
            self._check_open()
            self._txn = _Transaction()

    def close(self) -> None:
        """Discard any open transaction and close the network connection. Idempotent, as
        sqlite3's; any other use of a closed connection raises ProgrammingError."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._txn = _Transaction()
            self._client.close()

    # ------------------------------------------------------------------ sqlite3's shortcuts

    def execute(self, sql: str, parameters: Any = (), /) -> Cursor:
        return self.cursor().execute(sql, parameters)

    def executemany(self, sql: str, seq_of_parameters: Iterable[Any], /) -> Cursor:
        return self.cursor().executemany(sql, seq_of_parameters)

    def executescript(self, sql_script: str, /) -> Cursor:
        return self.cursor().executescript(sql_script)

    def __enter__(self) -> Connection:
        self._check_open()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        """Commit on success, roll back on an exception; does not close (as sqlite3). With
        autocommit=True it does nothing (Python 3.12's sqlite3)."""
        if self._autocommit is True:
            return False
        if exc_type is None:
            try:
                self.commit()
            except BaseException:
                if not self._closed:
                    self.rollback()
                raise
        elif not self._closed:
            self.rollback()
        return False

    # ------------------------------------------------------------------ raftsql extensions

    @contextlib.contextmanager
    def pipeline(self) -> Iterator[Connection]:
        """Pipeline mode (psycopg's name and idea), for transactions that write without looking
        at what each write did. Inside the block, an INSERT, UPDATE, DELETE or REPLACE (without
        RETURNING) that joins a transaction is not sent: execute() returns at once, with
        rowcount -1 and no lastrowid, and the commit carries it, so a transfer of two reads and
        three writes costs three requests instead of six. Any other statement of the
        transaction (a read, DDL, a savepoint) first sends the queued writes, one by one, as
        without the block; so does leaving the block while the transaction is still open.

        What changes: a queued write's error is raised later (by the statement that sends it,
        by commit(), or when the block ends) and fails the whole transaction: nothing of it is
        applied (outside pipeline mode a failed statement leaves the transaction open, as in
        SQLite). Outside a transaction (autocommit) nothing changes. Nested blocks are one."""
        with self._lock:
            self._check_open()
            self._pipelines += 1
        ok = False
        try:
            yield self
            ok = True
        finally:
            with self._lock:
                self._pipelines -= 1
                if ok and not self._pipelines and not self._closed:
                    self._send_pending()

    def _send_pending(self) -> None:
        """Run the open transaction's queued writes, in order, as previews (pipeline mode).
        The first that fails fails the transaction: it is raised, and nothing is applied."""
        txn = self._txn
        while txn.pending and self._txn is txn:
            stmt = txn.pending[0]
            result = self._preview(stmt)  # if it raises (Unavailable), the write stays queued
            del txn.pending[0]
            err = result.get("error")
            if err:
                error = error_from_map(err)
                error.args = (f"{error.args[0] if error.args else error} (a pipelined write: "
                              f"{' '.join(stmt[0].split())[:80]}; the transaction fails)",)
                if self._txn is txn:
                    raise self._abort(error)
                raise error

    def resend(self, error: OutcomeUnknown) -> Cursor:
        """Resend a write whose outcome is unknown, with its original serial: it is applied at
        most once, and if it was applied its stored result comes back. Do it before any other
        write on this connection: the server keeps only each client's latest serial, so a
        resend older than a later write fails with InterfaceError (RAFTSQL_STALE_SERIAL)."""
        if not isinstance(error, OutcomeUnknown) or error.client_id != self._client.client_id:
            raise ProgrammingError("resend() takes an OutcomeUnknown raised by this connection")
        with self._lock:
            self._check_open()
            cur = self.cursor()
            try:
                result = self._send(error.statements, serial=error.serial, commit=error.commit)
            except Unavailable as e:
                # No node answered this time; the first attempt may still have been applied.
                # Unavailable ("nothing was applied, retry") would have an application send the
                # write afresh, under a new serial, and apply it twice.
                raise OutcomeUnknown(
                    f"the resend reached no node ({e}); the write's outcome is still unknown: "
                    f"resend it again", serial=error.serial, statements=error.statements,
                    client_id=error.client_id, commit=error.commit) from None
            cur._load(result, _batch_rowcount(result) if len(error.statements) > 1 else None)
            return cur

    def status(self) -> dict[str, Any]:
        """The status map of the node this connection talks to (role, term, indexes...)."""
        with self._lock:
            self._check_open()
            try:
                return self._client.status(min(3.0, self.timeout))
            except _client.Forbidden as e:
                raise PermissionDenied(str(e)) from None
            except _client.ClientError as e:
                raise Unavailable(str(e)) from None

    # ------------------------------------------------------------------ more of sqlite3's surface

    def interrupt(self) -> None:
        """As sqlite3: results that are still being read (their cursors hold rows not fetched
        yet, here or on the node) fail at their next fetch with OperationalError("interrupted").
        A request already sent is not called back: a node has no way to stop a statement for a
        client (its step limit stops runaway ones), and a write in the log is applied anyway.
        Callable from any thread."""
        self._check_open()
        self._interrupts += 1

    def getlimit(self, category: int, /) -> int:
        """sqlite3's getlimit: the limit every node's SQLite applies to every statement.
        Raises NotSupportedError while the nodes do not report their limits (see
        driver/DESIGN.md, "Server changes wanted"); a bad category raises ProgrammingError."""
        self._check_open()
        name = _limit_name(category)
        limits = (self.status() or {}).get("limits")
        if not isinstance(limits, dict) or name not in limits:
            raise NotSupportedError(f"getlimit: the nodes do not report {name}")
        return int(limits[name])

    def setlimit(self, category: int, limit: int, /) -> int:
        """Not supported: a limit must be the same on every node, for every client (a statement
        must give the same result everywhere), so one connection cannot change it."""
        self._check_open()
        _limit_name(category)
        raise NotSupportedError(
            "setlimit: the limits are the nodes' and must be equal on every node; "
            "a connection cannot change them")

    def backup(self, target: Any, *, pages: int = -1, progress: Callable | None = None,
               name: str = "main", sleep: float = 0.250) -> None:
        """As sqlite3's backup(): copy the replicated database into target, a local
        sqlite3.Connection. The copy is one node's database at an index that holds every write
        acknowledged before the call (a linearizable backup, as `raftsql backup`), without
        raftsql's own tables; pages, progress and sleep work as in sqlite3 (they pace the copy
        into target). It uses the backup requests, so it needs an admin certificate
        (PermissionDenied otherwise), and every node's audit trail records it."""
        import sqlite3

        if not isinstance(target, sqlite3.Connection):
            raise TypeError(
                f"backup() argument 'target' must be sqlite3.Connection, not {type(target).__name__}")
        self._check_open()
        if name != "main":
            raise OperationalError(f"unknown database {name}")
        with self._local_copy() as path:
            src = sqlite3.connect(path)
            try:
                src.backup(target, pages=pages, progress=progress, sleep=sleep)
            finally:
                src.close()

    def iterdump(self, *, filter: str | None = None) -> Iterator[str]:  # noqa: A002 - sqlite3's name
        """As sqlite3's iterdump(): the database as SQL text, statement by statement, from a
        consistent copy (see backup(): an admin certificate). filter: a LIKE pattern of the
        tables to dump (Python 3.13's argument)."""
        import sqlite3

        self._check_open()
        with self._local_copy() as path:
            src = sqlite3.connect(path)
            try:
                dump = src.iterdump(filter=filter) if filter is not None else src.iterdump()
                yield from dump
            finally:
                src.close()

    @contextlib.contextmanager
    def _local_copy(self) -> Iterator[str]:
        """A private temporary file holding the database, without raftsql's own tables."""
        fd, path = tempfile.mkstemp(prefix="raftsql-copy-", suffix=".db")
        os.close(fd)
        try:
            _download_database(self._client.hosts, self._client.context, path, self.timeout)
            _strip_internal_tables(path)
            yield path
        finally:
            for suffix in ("", "-journal", "-wal", "-shm"):
                with contextlib.suppress(OSError):
                    os.unlink(path + suffix)

    def _unsupported(self, what: str) -> NotSupportedError:
        self._check_open()
        return NotSupportedError(
            f"{what}: it would run in this process, while statements run on every node of the "
            "cluster (driver/DESIGN.md)")

    def create_function(self, name: str, narg: int, func: Any, *, deterministic: bool = False) -> None:
        raise self._unsupported("create_function")

    def create_aggregate(self, name: str, n_arg: int, aggregate_class: Any) -> None:
        raise self._unsupported("create_aggregate")

    def create_window_function(self, name: str, num_params: int, aggregate_class: Any, /) -> None:
        raise self._unsupported("create_window_function")

    def create_collation(self, name: str, callable: Any, /) -> None:  # noqa: A002 - sqlite3's name
        raise self._unsupported("create_collation")

    def set_authorizer(self, authorizer_callback: Any) -> None:
        if authorizer_callback is not None:
            raise self._unsupported("set_authorizer")

    def set_progress_handler(self, progress_handler: Any, n: int) -> None:
        if progress_handler is not None:
            raise self._unsupported("set_progress_handler")

    def set_trace_callback(self, trace_callback: Any) -> None:
        if trace_callback is not None:
            raise self._unsupported("set_trace_callback")

    def enable_load_extension(self, enabled: bool, /) -> None:
        raise self._unsupported("enable_load_extension")

    def load_extension(self, path: str, /, *, entrypoint: str | None = None) -> None:
        raise self._unsupported("load_extension")

    def blobopen(self, table: str, column: str, row: int, /, *, readonly: bool = False,
                 name: str = "main") -> Any:
        raise self._unsupported("blobopen")

    def serialize(self, *, name: str = "main") -> bytes:
        raise self._unsupported("serialize")

    def deserialize(self, data: bytes, /, *, name: str = "main") -> None:
        raise self._unsupported("deserialize")

    # ------------------------------------------------------------------ internals (Cursor)

    def _send(self, statements: list[Statement], *, consistency: str | None = None,
              min_index: int | None = None, serial: int | None = None,
              idempotent: bool = False, reads: bool = False,
              commit: dict[str, Any] | None = None, stream: bool = False,
              durability: str | None = None) -> dict[str, Any]:
        """A normal execute: one statement or an atomic batch (a transaction's commit with
        `commit`; a transaction's read before its first write with reads=True). stream=True:
        a read's rows may come in chunks (result["stream"] fetches the rest)."""
        client = self._client
        if serial is None:
            serial = client.next_serial()
        try:
            kw: dict[str, Any] = {}
            if reads:
                kw["reads"] = True
            if commit is not None:
                kw["commit"] = commit
            if stream:
                kw["stream"] = True
            if durability is not None and durability != "quorum" and not idempotent:
                kw["durability"] = durability
            return client.execute(statements, consistency=consistency or self._consistency,
                                  min_index=min_index, serial=serial, idempotent=idempotent, **kw)
        except _client.OutcomeUnknown as e:
            raise OutcomeUnknown(str(e), serial=e.serial, statements=list(statements),
                                 client_id=client.client_id, commit=commit) from None
        except _client.Unavailable as e:
            raise Unavailable(str(e)) from None
        except _client.Forbidden as e:
            raise PermissionDenied(str(e)) from None
        except _client.BadRequest as e:
            raise InterfaceError(f"the server refused the request: {e}") from None
        except (_client.TooManyCursors, _client.BadCertificate) as e:
            raise OperationalError(str(e)) from None
        except wire.FrameError as e:
            if commit is not None:
                raise DataError(
                    f"{e}. A transaction's {len(statements)} statements travel with its commit "
                    "as one request: commit in smaller transactions (or load in autocommit "
                    "mode)") from None
            raise DataError(str(e)) from None

    def _abort(self, error: Error) -> Error:
        """The open transaction failed as a whole: an implicit one is reset (the next statement
        starts a new one); an explicit one stays open but doomed until COMMIT or ROLLBACK, so
        its later statements cannot run outside it by accident."""
        if self._txn.explicit:
            self._txn = _Transaction(explicit=True, by_savepoint=self._txn.by_savepoint,
                                     savepoints=self._txn.savepoints, doomed=error)
        else:
            self._txn = _Transaction()
        return error

    def _preview(self, statement: Statement) -> dict[str, Any]:
        """One statement of the open transaction, run on its leader against the committed
        state plus the transaction's earlier writes, and recorded as a step."""
        txn = self._txn
        try:
            result, leader = self._client.execute_in_transaction(
                statement, txn.term, leader=txn.leader, txn_id=txn.txn_id, base=len(txn.writes),
                last_ms=txn.last_ms, stream=True)
        except _client.TxnAborted as e:
            raise self._abort(TransactionAborted(
                f"transaction aborted, nothing was applied; run it again: {e}")) from None
        except _client.Unavailable as e:
            raise Unavailable(str(e)) from None
        except _client.Forbidden as e:
            raise self._abort(PermissionDenied(str(e))) from None
        except _client.BadRequest as e:
            raise InterfaceError(f"the server refused the request: {e}") from None
        except (_client.TooManyCursors, _client.BadCertificate) as e:
            raise OperationalError(str(e)) from None
        except wire.FrameError as e:
            raise DataError(str(e)) from None
        err = result.get("error")
        if result.get("lost"):
            # The statement rolled the whole transaction back (ON CONFLICT ROLLBACK,
            # RAISE(ROLLBACK)): as in SQLite, no transaction is open any more.
            self._txn = _Transaction()
            return result
        if err and err.get("name") in _TXN_FATAL:
            raise self._abort(error_from_map(err))
        if txn.term is None:
            txn.term = result.get("term")
            txn.leader = leader
        if result.get("txn"):
            txn.txn_id = result["txn"]
        if result.get("time_ms") is not None:
            txn.last_ms = result["time_ms"]
        sql, params = statement
        if err and type(params) is _client.ManyParams:
            j = err.get("set")
            j = j if isinstance(j, int) and 0 <= j < len(params) else 0
            if j > 0:
                # sqlite3's executemany keeps the parameter sets before the failing one (the
                # node kept them too).
                done = (sql, _client.ManyParams(params[:j]))
                txn.writes.append(done)
                txn.steps.append(_Step(sql, done[1]))
            err["statement"] = j  # which parameter set failed
            txn.record((sql, params[j]), result)
            return result
        step = txn.record(statement, result)
        result["txn_step"] = step
        if (not err and not result.get("readonly")) or (err and err.get("kept_changes")):
            # A failed statement that kept some changes (INSERT OR FAIL) counts as a write:
            # the node keeps it among the transaction's writes too.
            txn.writes.append(statement)
            if result.get("lastrowid"):
                # The rowid a previewed INSERT reports is the one it got then; Cursor.lastrowid
                # makes it part of the commit check when it is looked at, so the commit applies
                # only if the committed entry assigns the same rowid.
                result["rowid_source"] = (txn, len(txn.steps) - 1)
        return result

    def _run_one(self, cursor: Cursor, sql: str, params: Any) -> dict[str, Any]:
        with self._lock:
            self._check_open()
            tuning = _sql.tuning_pragma(sql)
            if tuning is not None and not params:
                return _tuning_result(*tuning)
            try:
                control = _sql.transaction_control(sql)
            except _sql.MultipleStatements as e:
                raise ProgrammingError(str(e)) from None
            except ValueError as e:
                raise OperationalError(f'near "{e}": syntax error') from None
            if control is not None:
                if params:
                    raise ProgrammingError(
                        "Incorrect number of bindings supplied. The current statement uses 0, "
                        f"and there are {len(params)} supplied.")
                if control[0] not in ("BEGIN", "COMMIT", "ROLLBACK"):
                    self._send_pending()  # savepoints count the writes before them
                self._control(*control)
                return _empty_result()
            txn = self._txn
            if txn.doomed is not None:
                raise _again(txn.doomed)
            stmt = (sql, params)
            mode = self._mode()
            # Known before sending: a read applied nothing if its response is lost (Unavailable,
            # never OutcomeUnknown). Anything else may write; the server decides by preparing it.
            reads_only = _sql.is_read_only(sql)
            if not txn.explicit and mode == "legacy" and not self.in_transaction:
                if _sql.is_dml(sql):
                    # sqlite3 sends BEGIN before it; it stays open even if the statement fails.
                    txn.begun = True
                elif not reads_only:
                    # sqlite3 runs anything else (DDL, PRAGMA, WITH ... INSERT) outside a
                    # transaction: its own write. It ends the window of the reads before it,
                    # which were in no transaction either (and a DDL would make them conflict).
                    self._txn = _Transaction()
                    return self._send([stmt], consistency=cursor.consistency,
                                      min_index=cursor.min_index, stream=True,
                                      durability=cursor.durability or self._durability)
            if mode == "auto" and not txn.explicit:
                # Outside any transaction: its own write, or a read at the cursor's consistency.
                return self._send([stmt], consistency=cursor.consistency,
                                  min_index=cursor.min_index, idempotent=reads_only, stream=True,
                                  durability=cursor.durability or self._durability)
            if txn.unchecked is not None and not reads_only:
                raise OperationalError(txn.unchecked)
            if self._pipelines and _pipelinable(sql):
                txn.pending.append(stmt)
                return _empty_result()
            self._send_pending()
            if (not txn.explicit and not txn.writes and reads_only
                    and not txncheck.may_be_nondeterministic(sql)):
                # An implicit transaction's read before its first write: the normal read path
                # (any node, the cursor's consistency). If the transaction writes later, its
                # commit checks this read too. A read that may use random() or the clock runs
                # on the leader like the transaction's other statements, so that its commit
                # can reproduce them.
                result = self._send([stmt], consistency=cursor.consistency,
                                    min_index=cursor.min_index, idempotent=True, stream=True)
                if not (result.get("volatile") and not result.get("error")):
                    result["txn_step"] = txn.record(stmt, result)
                    _trim_reads_before_first_write(txn, mode == "pep249")
                    return result
                # It called random() or the clock through a view (the node saw it at prepare):
                # run it again on the leader, whose env the commit can reproduce.
                stream = result.get("stream")
                if stream is not None:
                    stream.close()
            return self._preview(stmt)

    def _control(self, kind: str, arg: str | None) -> None:
        """BEGIN, COMMIT, ROLLBACK, SAVEPOINT, RELEASE and ROLLBACK TO sent through execute(),
        with SQLite's rules (and messages); see driver/DESIGN.md."""
        txn = self._txn
        active = self.in_transaction
        # With nothing open, COMMIT, ROLLBACK and SAVEPOINT reach SQLite itself, except with
        # autocommit=False, where sqlite3 3.12 always has a transaction open.
        outside = self._mode() != "pep249"
        if kind == "BEGIN":
            if active:
                raise _sqlite_error("cannot start a transaction within a transaction")
            # All three modes are optimistic: none takes a lock (see driver/DESIGN.md).
            self._txn = _Transaction(explicit=True)
        elif kind == "COMMIT":
            if not active and outside:
                raise _sqlite_error("cannot commit - no transaction is active")
            self.commit()
        elif kind == "ROLLBACK":
            if not active and outside:
                raise _sqlite_error("cannot rollback - no transaction is active")
            self.rollback()
        elif kind == "SAVEPOINT":
            if not active:
                if outside:
                    self._txn = txn = _Transaction(explicit=True, by_savepoint=True)
                elif not txn.explicit:
                    txn.explicit = True  # sqlite3 (autocommit=False) is always in a transaction
            txn.controls.append((len(txn.steps), txncheck.SAVEPOINT, len(txn.savepoints)))
            txn.savepoints.append((arg, len(txn.writes)))
        else:  # RELEASE, ROLLBACK_TO
            keys = [_sql.savepoint_key(name) for name, _ in txn.savepoints]
            key = _sql.savepoint_key(arg)
            if key not in keys:
                raise _sqlite_error(f"no such savepoint: {arg}")
            pos = len(keys) - 1 - keys[::-1].index(key)
            if kind == "RELEASE":
                txn.controls.append((len(txn.steps), txncheck.RELEASE, pos))
                del txn.savepoints[pos:]
                if not txn.savepoints and txn.by_savepoint:
                    self.commit()
            else:
                # The steps stay: the commit replays them and rolls back to the savepoint at
                # the same place, so what they saw is checked where they saw it.
                txn.controls.append((len(txn.steps), txncheck.ROLLBACK_TO, pos))
                if txn.doomed is None:
                    del txn.writes[txn.savepoints[pos][1]:]
                del txn.savepoints[pos + 1:]

    def _run_many(self, cursor: Cursor, sql: str,
                  params_list: list[Any]) -> tuple[dict[str, Any], int]:
        with self._lock:
            self._check_open()
            txn = self._txn
            if txn.doomed is not None:
                raise _again(txn.doomed)
            if not params_list:
                return _empty_result(0), 0
            mode = self._mode()
            outside = mode == "auto" and not txn.explicit
            if mode == "legacy" and not self.in_transaction:
                if _sql.is_dml(sql):
                    txn.begun = True
                else:
                    self._txn = _Transaction()
                    outside = True
            if outside:
                # One "many" statement: the server prepares it once per node, not once per set.
                result = self._send([(sql, _client.ManyParams(params_list))],
                                    durability=cursor.durability or self._durability)
                err = result.get("error")
                if isinstance(err, dict) and isinstance(err.get("set"), int):
                    err["statement"] = err["set"]  # as for a batch: which parameter set failed
                return result, _batch_rowcount(result)
            if txn.unchecked is not None:
                raise OperationalError(txn.unchecked)
            self._check_transaction_size(sql, params_list)
            if self._pipelines and _pipelinable(sql):
                txn.pending.append((sql, _client.ManyParams(params_list)))
                return _empty_result(), -1
            self._send_pending()
            # One statement of the transaction, one round trip: the leader runs every set.
            result = self._preview((sql, _client.ManyParams(params_list)))
            if result.get("error"):
                return result, -1
            return result, max(0, int(result.get("rowcount", 0)))

    def _check_transaction_size(self, sql: str, params_list: list[Any]) -> None:
        """A transaction's statements are sent whole at commit, so they must fit in one request:
        refuse an executemany that cannot, before sending anything (else it would fail only at
        commit)."""
        import msgpack

        conn = getattr(self._client, "_conn", None)
        limit = getattr(conn, "max_request", None) or wire.DEFAULT_MAX_REQUEST_SIZE
        size = len(sql.encode()) + 8 + len(msgpack.packb(params_list))
        size += sum(len(st.sql.encode()) + 40 for st in self._txn.steps)
        size += sum(len(sql.encode()) + 40 for sql, _ in self._txn.pending)
        if size > limit:
            raise DataError(
                f"a transaction's writes are sent as one request, and these would take about "
                f"{size} bytes, over the node's limit of {limit} (max_request_size): commit in "
                "smaller transactions (an executemany of fewer rows each; in autocommit mode, "
                "too, one call is one request under the same limit)")

    def _run_script(self, cursor: Cursor, script: str) -> tuple[dict[str, Any], int | None]:
        """executescript. Legacy transaction control commits a pending transaction first, as
        sqlite3 does; then the script is one log entry. With autocommit=False, or with
        autocommit=True inside an explicit BEGIN, sqlite3 commits nothing first: the script's
        statements join the open transaction one by one (their BEGIN, COMMIT and savepoints
        included), as execute() would run them, and the first that fails stops the script."""
        with self._lock:
            self._check_open()
            if self._autocommit is not LEGACY_TRANSACTION_CONTROL and (
                    self._mode() == "pep249" or self.in_transaction):
                result = _empty_result()
                for statement in _sql.split_script(script):
                    stream = result.pop("stream", None)
                    if stream is not None:
                        stream.close()  # an earlier statement's rows: only the last one's are kept
                    result = self._run_one(cursor, statement, ())
                    if result.get("error"):
                        break  # the cursor raises it; the rest of the script does not run
                return result, None
            self.commit()
            statements = [s for s in _sql.split_script(script)
                          if not _sql.is_begin_or_commit(s) and _sql.tuning_pragma(s) is None]
            if not statements:
                return _empty_result(), None
            result = self._send([(s, []) for s in statements])
            return result, _batch_rowcount(result) if len(statements) > 1 else None


def _pipelinable(sql: str) -> bool:
    """A statement pipeline mode may queue: a plain write whose only outcome is a row count
    (no RETURNING, one statement; conservative: the words anywhere in the text count)."""
    return (_sql.is_dml(sql) and "RETURNING" not in sql.upper()
            and ";" not in sql.rstrip().rstrip(";"))


# Errors after which the open transaction cannot continue (nothing of it will be applied).
_TXN_FATAL = frozenset({protocol.SERIALIZATION, protocol.TXN_TIMEOUT})


def _check_autocommit(value: Any) -> bool | int:
    """True, False or LEGACY_TRANSACTION_CONTROL, else ValueError (Python 3.12's check: 1 and 0
    are not accepted)."""
    if value is True or value is False:
        return value
    if isinstance(value, int) and value == LEGACY_TRANSACTION_CONTROL:
        return LEGACY_TRANSACTION_CONTROL
    raise ValueError("autocommit must be True, False, or sqlite3.LEGACY_TRANSACTION_CONTROL")


def _check_isolation_level(value: Any) -> str | None:
    """None or one of "", DEFERRED, IMMEDIATE, EXCLUSIVE (any case; returned upper case), with
    the exceptions and messages of Python 3.11's sqlite3."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError("isolation_level must be str or None")
    if "\0" in value:
        raise ValueError("embedded null character")
    level = value.upper() if value.isascii() else value
    if level not in _ISOLATION_LEVELS:
        raise ValueError(
            "isolation_level string must be '', 'DEFERRED', 'IMMEDIATE', or 'EXCLUSIVE'")
    return level


def _sqlite_error(message: str, code: int = 1, name: str = "SQLITE_ERROR") -> Error:
    """An error the driver raises where SQLite would (transaction control), with SQLite's code
    and name as sqlite3 gives them."""
    return error_from_map({"code": code, "name": name, "message": message})


def _again(error: Error) -> Error:
    """A fresh exception of the same class and message (an exception object is raised once)."""
    if isinstance(error, OutcomeUnknown):  # never doomed with one; defensive
        return OperationalError(str(error))
    again = type(error)(f"the transaction failed earlier and must be rolled back: {error}")
    again.sqlite_errorcode = error.sqlite_errorcode
    again.sqlite_errorname = error.sqlite_errorname
    return again


# --------------------------------------------------------------------------- connect()


def _parse_hosts(hosts: Any) -> list[tuple[str, int]]:
    if isinstance(hosts, str):
        hosts = [h for h in hosts.split(",") if h.strip()]
    out = []
    for h in hosts:
        if isinstance(h, str):
            host, sep, port = h.strip().rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ProgrammingError(f"host {h!r} must be host:port")
            out.append((host.strip("[]"), int(port)))
        else:
            host, port = h
            out.append((str(host), int(port)))
    if not out:
        raise ProgrammingError("no hosts given")
    return out


def _parse_autocommit(value: Any) -> bool | int:
    if isinstance(value, int) and not isinstance(value, bool) and value == LEGACY_TRANSACTION_CONTROL:
        return LEGACY_TRANSACTION_CONTROL
    if isinstance(value, str) and value.strip().lower() in ("legacy", "-1"):
        return LEGACY_TRANSACTION_CONTROL
    return _parse_bool("autocommit", value)


def _parse_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ProgrammingError(f"{name} must be true or false, not {value!r}")


@dataclass
class Settings:
    """What connect() resolved from the DSN and its keyword arguments."""

    hosts: list[tuple[str, int]]
    cafile: str
    certfile: str
    keyfile: str | None
    timeout: float
    autocommit: bool | int
    consistency: str
    isolation_level: str | None = ""
    durability: str = "quorum"


def parse_settings(dsn: str | None = None, *, hosts: Any = None, certs: str | None = None,
                   cafile: str | None = None, certfile: str | None = None,
                   keyfile: str | None = None, timeout: float | None = None,
                   autocommit: bool | int | None = None, consistency: str | None = None,
                   isolation_level: str | None = "", durability: str | None = None) -> Settings:
    """Resolve connect()'s arguments (keyword arguments override the DSN's parameters).
    Raises ProgrammingError for anything malformed or missing; a bad isolation_level raises
    sqlite3's TypeError or ValueError."""
    level = _check_isolation_level(isolation_level)
    params: dict[str, str] = {}
    dsn_hosts: list[tuple[str, int]] = []
    if dsn is not None:
        try:
            parsed = DSN.parse(dsn)
        except ValueError as e:
            raise ProgrammingError(f"invalid DSN: {e}") from None
        unknown = set(parsed.params) - _DSN_PARAMS
        if unknown:
            raise ProgrammingError(f"unknown DSN parameter(s): {', '.join(sorted(unknown))}")
        params = parsed.params
        dsn_hosts = parsed.hosts
    host_list = _parse_hosts(hosts) if hosts is not None else dsn_hosts
    if not host_list:
        raise ProgrammingError("no hosts: pass a DSN or hosts=")

    certs = certs if certs is not None else params.get("certs")
    ca, cert, key = default_paths(certs) if certs else (None, None, None)
    ca = cafile or params.get("cafile") or ca
    cert = certfile or params.get("certfile") or cert
    key = keyfile or params.get("keyfile") or key
    if not ca or not cert:
        raise ProgrammingError("no certificates: add ?certs=DIR to the DSN, or pass "
                               "certs= or cafile= and certfile=")
    if timeout is not None:
        t = _check_timeout(timeout)
    else:
        raw = params.get("timeout", DEFAULT_TIMEOUT)
        try:
            t = _check_timeout(float(raw))
        except ValueError:
            raise ProgrammingError(f"timeout must be a number, not {raw!r}") from None
    # A keyword argument is checked as sqlite3 checks it (True, False or the LEGACY constant:
    # ValueError for 1, 0 or "yes"); the DSN's text is parsed.
    ac = (_check_autocommit(autocommit) if autocommit is not None
          else _parse_autocommit(params.get("autocommit", LEGACY_TRANSACTION_CONTROL)))
    consistency_level = consistency or params.get("consistency") or "linearizable"
    if consistency_level not in CONSISTENCY_LEVELS:
        raise ProgrammingError(f"consistency must be one of {', '.join(CONSISTENCY_LEVELS)}")
    durability_level = durability or params.get("durability") or "quorum"
    if durability_level not in DURABILITY_LEVELS:
        raise ProgrammingError(f"durability must be one of {', '.join(DURABILITY_LEVELS)}")
    return Settings(host_list, ca, cert, key, t, ac, consistency_level, level, durability_level)


def connect(dsn: str | None = None, *, hosts: Any = None, certs: str | None = None,
            cafile: str | None = None, certfile: str | None = None, keyfile: str | None = None,
            timeout: float | None = None, autocommit: bool | int | None = None,
            isolation_level: str | None = "", consistency: str | None = None,
            discover: bool = True, detect_types: int = 0,
            factory: type[Connection] = Connection, durability: str | None = None,
            check_same_thread: bool = True, cached_statements: int = 128,
            uri: bool = False) -> Connection:
    """Open a connection to a raftsql cluster.

    dsn: ``raftsql://host1:port1,host2:port2,host3:port3/?certs=DIR&consistency=linearizable
    &timeout=10`` (query parameters: certs, cafile, certfile, keyfile, timeout, autocommit,
    consistency, durability). Keyword arguments override the DSN. hosts: "h:p,h:p", or a list of "h:p" or
    (host, port). certs: a directory made by `raftsql certs init` (ca.crt, client.crt,
    client.key); cafile/certfile/keyfile override its files one by one. timeout (default 10):
    seconds one operation may spend finding the leader and retrying. autocommit (default
    LEGACY_TRANSACTION_CONTROL; DSN: true, false or legacy) and isolation_level (default "",
    None for autocommit), as in sqlite3: see Connection.autocommit and
    Connection.isolation_level. consistency (default linearizable): see
    Connection.consistency. durability (default quorum): see Connection.durability.
    discover (default True): remember the members the cluster names
    and try them once every configured host refused a connection (so the client survives the
    removal of every node in its DSN); False uses only the configured hosts (e.g. a proxy).

    check_same_thread, cached_statements and uri are sqlite3's and are accepted for code
    written for it (type-checked as sqlite3 does) but change nothing: a connection may be used
    from any thread (threadsafety 2: its transaction is then shared, as sqlite3 with
    check_same_thread=False), the nodes keep the prepared statements, and a DSN is a URI.

    No node is contacted yet: the first statement finds the leader. Bad arguments raise
    ProgrammingError (a bad isolation_level: sqlite3's TypeError or ValueError); unreadable or
    insecure certificate files raise OperationalError.
    """
    if type(cached_statements) is not int:
        raise TypeError(f"'{type(cached_statements).__name__}' object cannot be interpreted as "
                        "an integer")
    if cached_statements < 0:
        raise ValueError("cached_statements must be non-negative")
    for name, value in (("check_same_thread", check_same_thread), ("uri", uri)):
        try:
            bool(value)
        except Exception as e:  # noqa: BLE001 - sqlite3 raises whatever __bool__ raises
            raise TypeError(f"{name}: {e}") from e
    s = parse_settings(dsn, hosts=hosts, certs=certs, cafile=cafile, certfile=certfile,
                       keyfile=keyfile, timeout=timeout, autocommit=autocommit,
                       consistency=consistency, isolation_level=isolation_level,
                       durability=durability)
    try:
        context = client_context(s.cafile, s.certfile, s.keyfile)
    except (OSError, ssl.SSLError) as e:
        raise OperationalError(f"cannot load the TLS certificates: {e}") from e
    client = _client.Client(s.hosts, context, timeout=s.timeout, consistency=s.consistency,
                            discover=discover)
    return factory(client, autocommit=s.autocommit, isolation_level=s.isolation_level,
                   consistency=s.consistency, detect_types=detect_types,
                   durability=s.durability)


# --------------------------------------------------------------------------- helpers


def _check_timeout(value: Any) -> float:
    """sqlite3's rule (any real number: int, float, bool; else TypeError "must be real number,
    not str"); 0, negative or tiny values get MIN_TIMEOUT (see there); NaN is refused."""
    if not isinstance(value, int | float):
        raise TypeError(f"must be real number, not {type(value).__name__}")
    t = float(value)
    if t != t:
        raise ProgrammingError("timeout must be a number of seconds, not NaN")
    return max(t, MIN_TIMEOUT)


def _limit_name(category: Any) -> str:
    if not isinstance(category, int):
        raise TypeError(f"'{type(category).__name__}' object cannot be interpreted as an integer")
    for name, value in LIMITS.items():
        if value == category:
            return name
    raise ProgrammingError("'category' is out of bounds")


def _committed_rowids(txn: _Transaction, result: dict[str, Any]) -> None:
    """After a commit: cursors whose lastrowid came from a statement of the transaction get
    the rowid the committed entry assigned (the same one when they looked at it: see
    Cursor.lastrowid)."""
    results = result.get("results") or [result]  # one statement: its own result, no list
    for pos, ref in txn.rowid_cursors:
        cur = ref()
        if cur is None or cur._rowid_source is None or cur._rowid_source[0] is not txn:
            continue
        if cur._rowid_source[1] == pos and pos < len(results):
            rowid = results[pos].get("lastrowid") if isinstance(results[pos], dict) else None
            if rowid:
                cur._lastrowid = rowid
        cur._rowid_source = None


def _download_database(hosts: list[tuple[str, int]], context: Any, path: str,
                       timeout: float) -> None:
    """A linearizable copy of one node's database file into path (the backup_* requests of
    `raftsql backup`, checked against the node's sha256)."""
    import hashlib

    from raftsql.driver._conn import ConnectionLost, NodeConnection, NodeUnreachable

    deadline = time.monotonic() + max(timeout, 30.0)
    errors: list[str] = []
    attempt = 0
    while time.monotonic() < deadline:
        host, port = hosts[attempt % len(hosts)]
        attempt += 1
        remaining = max(1.0, deadline - time.monotonic())
        try:
            conn = NodeConnection(host, port, context, min(5.0, remaining))
        except NodeUnreachable as e:
            if e.forbidden:
                raise PermissionDenied(str(e)) from None
            errors.append(str(e))
            time.sleep(0.1)
            continue
        try:
            resp = conn.request({"op": "backup_begin", "linearizable": True,
                                 "timeout_ms": int(min(remaining, 30.0) * 1000)}, remaining)
            if not resp.get("ok"):
                err = resp.get("error") or {}
                if err.get("kind") == "FORBIDDEN":
                    raise PermissionDenied(str(err.get("message")))
                errors.append(f"{host}:{port}: {err.get('kind')}: {err.get('message')}")
                time.sleep(0.1)
                continue
            info = resp["result"]
            digest, offset, size = hashlib.sha256(), 0, int(info["size"])
            with open(path, "wb") as f:
                while offset < size:
                    r = conn.request({"op": "backup_read", "token": info["token"], "offset": offset,
                                      "length": int(info.get("chunk_max") or (1 << 20))},
                                     max(1.0, deadline - time.monotonic()))
                    data = (r.get("result") or {}).get("data") if r.get("ok") else None
                    if not isinstance(data, bytes) or not data:
                        raise ConnectionLost(f"the copy from {host}:{port} stopped at byte {offset}")
                    f.write(data)
                    digest.update(data)
                    offset += len(data)
            with contextlib.suppress(OSError):
                conn.request({"op": "backup_end", "token": info["token"]}, 5.0)
            if digest.hexdigest() != info["sha256"]:
                raise ConnectionLost(f"the copy from {host}:{port} is damaged (sha256 mismatch)")
            return
        except (ConnectionLost, NodeUnreachable) as e:
            if e.forbidden:
                raise PermissionDenied(str(e)) from None
            errors.append(str(e))
        finally:
            conn.close()
    raise Unavailable("no node could copy the database: " + "; ".join(errors[-3:]))


def _strip_internal_tables(path: str) -> None:
    """Remove raftsql's own tables (sqlite_raftsql_*, and _raftsql_* of older versions) from a
    local copy, so it holds what the application stored. SQLite refuses to DROP a table whose
    name starts with sqlite_, so their schema rows are deleted with writable_schema and VACUUM
    then rebuilds the file without their pages."""
    import sqlite3

    db = sqlite3.connect(path, isolation_level=None)
    try:
        internal = ("tbl_name LIKE 'sqlite~_raftsql~_%' ESCAPE '~' "
                    "OR tbl_name LIKE '~_raftsql~_%' ESCAPE '~'")
        if db.execute(f"SELECT count(*) FROM sqlite_master WHERE {internal}").fetchone()[0]:
            db.execute("PRAGMA writable_schema=ON")
            db.execute(f"DELETE FROM sqlite_master WHERE {internal}")
            db.execute("PRAGMA writable_schema=OFF")
            db.close()
            db = sqlite3.connect(path, isolation_level=None)
            db.execute("VACUUM")
        db.execute("PRAGMA journal_mode=DELETE")
    finally:
        db.close()

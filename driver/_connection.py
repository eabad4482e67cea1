"""connect() and Connection: settings, transactions, and the mapping of transport failures to
DB-API exceptions. The network work is _client.Client's (one per Connection: one client_id,
one serial sequence, one TLS connection at a time)."""

from __future__ import annotations

import ssl
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from raftsql import protocol, wire
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
# autocommit's third value (Python 3.12's sqlite3 constant, the same -1): transactions are
# controlled by isolation_level, as in sqlite3 before 3.12. The default.
LEGACY_TRANSACTION_CONTROL = -1
_ISOLATION_LEVELS = ("", "DEFERRED", "IMMEDIATE", "EXCLUSIVE")
_DSN_PARAMS = frozenset({"certs", "cafile", "certfile", "keyfile", "timeout", "autocommit", "consistency"})
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclass
class _Transaction:
    """The open transaction: implicit (autocommit=False) or explicit (BEGIN or SAVEPOINT sent
    through execute). See driver/DESIGN.md, "Transactions"."""

    writes: list[Statement] = field(default_factory=list)  # non-readonly statements, in order
    term: int | None = None  # the leader's term at the first previewed statement
    leader: str | None = None  # "host:port" of that leader; later previews go only there
    # The applied index the transaction's first statement saw: its snapshot. commit() asks the
    # log to apply the writes only if no table in `reads` was modified after it.
    start_index: int | None = None
    reads: set[str] = field(default_factory=set)  # tables read (lower case), for the check
    last_ms: int | None = None  # the leader's clock at the last previewed statement (idle timeout)
    explicit: bool = False  # opened by BEGIN or SAVEPOINT through execute()
    # Legacy transaction control: begun by an INSERT/UPDATE/DELETE/REPLACE (even one that failed,
    # as sqlite3's implicit BEGIN stays open); from then on every statement joins it.
    begun: bool = False
    by_savepoint: bool = False  # opened by SAVEPOINT: RELEASE of the outermost one commits
    savepoints: list[tuple[str, int]] = field(default_factory=list)  # (name, len(writes))
    # An explicit transaction that failed (serialization, leader change, idle): every statement
    # raises this again until COMMIT (raises it too) or ROLLBACK ends the transaction.
    doomed: Error | None = None


def _empty_result(rowcount: int = -1) -> dict[str, Any]:
    return {"columns": [], "decltypes": [], "rows": [], "rowcount": rowcount, "lastrowid": None,
            "index": 0, "error": None, "duplicate": False, "results": None}


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
                 isolation_level: str | None = "", consistency: str = "linearizable"):
        self._client = client
        # Serializes everything that touches the connection's state (threadsafety 2).
        self._lock = threading.RLock()
        self._closed = False
        self._autocommit = _check_autocommit(autocommit)
        self._isolation_level = _check_isolation_level(isolation_level)
        self._consistency = "linearizable"
        self.consistency = consistency
        self.row_factory = None
        # As sqlite3: what TEXT values become (str; bytes; or a callable given the UTF-8 bytes).
        # Applied when rows are fetched. With str, TEXT that is not valid UTF-8 raises
        # OperationalError("Could not decode to UTF-8 column ...").
        self.text_factory: Any = str
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
    def timeout(self) -> float:
        """Seconds each operation may spend finding the leader and retrying (settable)."""
        return self._client.timeout

    @timeout.setter
    def timeout(self, value: float) -> None:
        if not isinstance(value, int | float) or not value > 0:
            raise ProgrammingError("timeout must be a positive number of seconds")
        self._client.timeout = float(value)

    @property
    def in_transaction(self) -> bool:
        """True if an explicit transaction (BEGIN, SAVEPOINT) is open, the open transaction
        has uncommitted writes, or (legacy transaction control) an INSERT/UPDATE/DELETE/REPLACE
        opened the implicit transaction."""
        txn = self._txn
        return txn.explicit or txn.begun or bool(txn.writes)

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
        """Apply the transaction's writes as ONE log entry, exactly once, if nothing the
        transaction read was modified since its snapshot; otherwise nothing is applied and
        SerializationError is raised. Nothing to send for a transaction without writes. If the
        entry fails (an SQL error) nothing is applied, the error is raised and the transaction is
        discarded. On Unavailable the transaction stays open (call commit() again); on
        OutcomeUnknown it is discarded and the error can be passed to resend()."""
        with self._lock:
            self._check_open()
            txn = self._txn
            if txn.doomed is not None:
                self._txn = _Transaction()
                raise _again(txn.doomed)
            if not txn.writes:
                self._txn = _Transaction()
                return
            check = {"read_index": txn.start_index or 0, "reads": sorted(txn.reads),
                     "last_ms": txn.last_ms or 0}
            try:
                result = self._send(list(txn.writes), commit=check)
            except Unavailable:
                raise
            except BaseException:
                self._txn = _Transaction()
                raise
            self._txn = _Transaction()
            if result.get("error"):
                raise error_from_map(result["error"])

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
            result = self._send(error.statements, serial=error.serial, commit=error.commit)
            cur._load(result, _batch_rowcount(result) if len(error.statements) > 1 else None)
            return cur

    def status(self) -> dict[str, Any]:
        """The status map of the node this connection talks to (role, term, indexes...)."""
        with self._lock:
            self._check_open()
            try:
                return self._client.status(min(3.0, self.timeout))
            except _client.ClientError as e:
                raise Unavailable(str(e)) from None

    # ------------------------------------------------------------------ internals (Cursor)

    def _send(self, statements: list[Statement], *, consistency: str | None = None,
              min_index: int | None = None, serial: int | None = None,
              idempotent: bool = False, reads: bool = False,
              commit: dict[str, Any] | None = None, stream: bool = False) -> dict[str, Any]:
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
            return client.execute(statements, consistency=consistency or self._consistency,
                                  min_index=min_index, serial=serial, idempotent=idempotent, **kw)
        except _client.OutcomeUnknown as e:
            raise OutcomeUnknown(str(e), serial=e.serial, statements=list(statements),
                                 client_id=client.client_id, commit=commit) from None
        except _client.Unavailable as e:
            raise Unavailable(str(e)) from None
        except _client.BadRequest as e:
            raise InterfaceError(f"the server refused the request: {e}") from None
        except wire.FrameError as e:
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

    def _preview(self, statement: Statement, consistency: str | None = None) -> dict[str, Any]:
        """One statement of the open transaction, previewed on its leader."""
        txn = self._txn
        try:
            result, leader = self._client.execute_in_transaction(
                statement, txn.writes, txn.term, leader=txn.leader, start_index=txn.start_index,
                reads=sorted(txn.reads), last_ms=txn.last_ms,
                consistency=consistency or self._consistency, stream=True)
        except _client.TxnAborted as e:
            raise self._abort(TransactionAborted(
                f"transaction aborted, nothing was applied; run it again: {e}")) from None
        except _client.Unavailable as e:
            raise Unavailable(str(e)) from None
        except _client.BadRequest as e:
            raise InterfaceError(f"the server refused the request: {e}") from None
        except wire.FrameError as e:
            raise DataError(str(e)) from None
        err = result.get("error")
        if err and err.get("name") in _TXN_FATAL:
            raise self._abort(error_from_map(err))
        if txn.term is None:
            txn.term = result.get("term")
            txn.leader = leader
        if txn.start_index is None:
            txn.start_index = result.get("start_index", result.get("index"))
        txn.reads.update(result.get("reads") or ())
        if result.get("time_ms") is not None:
            txn.last_ms = result["time_ms"]
        if not err and not result.get("readonly"):
            txn.writes.append(statement)
        return result

    def _run_one(self, cursor: Cursor, sql: str, params: Any) -> dict[str, Any]:
        with self._lock:
            self._check_open()
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
                                      min_index=cursor.min_index, stream=True)
            if mode == "auto" and not txn.explicit:
                # Outside any transaction: its own write, or a read at the cursor's consistency.
                return self._send([stmt], consistency=cursor.consistency,
                                  min_index=cursor.min_index, idempotent=reads_only, stream=True)
            if not txn.explicit and not txn.writes and reads_only:
                # An implicit transaction's read before its first write: the normal read path
                # (any node, the cursor's consistency), collecting the tables it read.
                result = self._send([stmt], consistency=cursor.consistency,
                                    min_index=cursor.min_index, idempotent=True, reads=True,
                                    stream=True)
                if not result.get("error"):
                    txn.reads.update(result.get("reads") or ())
                    # The snapshot is the OLDEST one any of its reads saw (a "leader" read after
                    # a leader change may see an older one): the commit check then covers all.
                    index = int(result.get("index") or 0)
                    txn.start_index = index if txn.start_index is None else min(txn.start_index, index)
                return result
            return self._preview(stmt, cursor.consistency)

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
                raise OperationalError("cannot start a transaction within a transaction")
            # All three modes are optimistic: none takes a lock (see driver/DESIGN.md).
            self._txn = _Transaction(explicit=True)
        elif kind == "COMMIT":
            if not active and outside:
                raise OperationalError("cannot commit - no transaction is active")
            self.commit()
        elif kind == "ROLLBACK":
            if not active and outside:
                raise OperationalError("cannot rollback - no transaction is active")
            self.rollback()
        elif kind == "SAVEPOINT":
            if not active:
                if outside:
                    self._txn = txn = _Transaction(explicit=True, by_savepoint=True)
                elif not txn.explicit:
                    txn.explicit = True  # sqlite3 (autocommit=False) is always in a transaction
            txn.savepoints.append((arg, len(txn.writes)))
        else:  # RELEASE, ROLLBACK_TO
            keys = [_sql.savepoint_key(name) for name, _ in txn.savepoints]
            key = _sql.savepoint_key(arg)
            if key not in keys:
                raise OperationalError(f"no such savepoint: {arg}")
            pos = len(keys) - 1 - keys[::-1].index(key)
            if kind == "RELEASE":
                del txn.savepoints[pos:]
                if not txn.savepoints and txn.by_savepoint:
                    self.commit()
            else:
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
                result = self._send([(sql, _client.ManyParams(params_list))])
                err = result.get("error")
                if isinstance(err, dict) and isinstance(err.get("set"), int):
                    err["statement"] = err["set"]  # as for a batch: which parameter set failed
                return result, _batch_rowcount(result)
            total = 0
            result = _empty_result(0)
            for p in params_list:
                result = self._preview((sql, p))
                if result.get("error"):
                    return result, -1
                total += max(0, int(result.get("rowcount", 0)))
            return result, total

    def _run_script(self, script: str) -> tuple[dict[str, Any], int | None]:
        with self._lock:
            self._check_open()
            self.commit()
            statements = [s for s in _sql.split_script(script) if not _sql.is_begin_or_commit(s)]
            if not statements:
                return _empty_result(), None
            result = self._send([(s, []) for s in statements])
            return result, _batch_rowcount(result) if len(statements) > 1 else None


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


def parse_settings(dsn: str | None = None, *, hosts: Any = None, certs: str | None = None,
                   cafile: str | None = None, certfile: str | None = None,
                   keyfile: str | None = None, timeout: float | None = None,
                   autocommit: bool | int | None = None, consistency: str | None = None,
                   isolation_level: str | None = "") -> Settings:
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
    raw_timeout = timeout if timeout is not None else params.get("timeout", DEFAULT_TIMEOUT)
    try:
        t = float(raw_timeout)
    except (TypeError, ValueError):
        raise ProgrammingError(f"timeout must be a number, not {raw_timeout!r}") from None
    if not t > 0:
        raise ProgrammingError("timeout must be positive")
    ac = _parse_autocommit(autocommit if autocommit is not None
                           else params.get("autocommit", LEGACY_TRANSACTION_CONTROL))
    consistency_level = consistency or params.get("consistency") or "linearizable"
    if consistency_level not in CONSISTENCY_LEVELS:
        raise ProgrammingError(f"consistency must be one of {', '.join(CONSISTENCY_LEVELS)}")
    return Settings(host_list, ca, cert, key, t, ac, consistency_level, level)


def connect(dsn: str | None = None, *, hosts: Any = None, certs: str | None = None,
            cafile: str | None = None, certfile: str | None = None, keyfile: str | None = None,
            timeout: float | None = None, autocommit: bool | int | None = None,
            isolation_level: str | None = "", consistency: str | None = None,
            discover: bool = True, factory: type[Connection] = Connection) -> Connection:
    """Open a connection to a raftsql cluster.

    dsn: ``raftsql://host1:port1,host2:port2,host3:port3/?certs=DIR&consistency=linearizable
    &timeout=10`` (query parameters: certs, cafile, certfile, keyfile, timeout, autocommit,
    consistency). Keyword arguments override the DSN. hosts: "h:p,h:p", or a list of "h:p" or
    (host, port). certs: a directory made by `raftsql certs init` (ca.crt, client.crt,
    client.key); cafile/certfile/keyfile override its files one by one. timeout (default 10):
    seconds one operation may spend finding the leader and retrying. autocommit (default
    LEGACY_TRANSACTION_CONTROL; DSN: true, false or legacy) and isolation_level (default "",
    None for autocommit), as in sqlite3: see Connection.autocommit and
    Connection.isolation_level. consistency (default linearizable): see
    Connection.consistency. discover (default True): remember the members the cluster names
    and try them once every configured host refused a connection (so the client survives the
    removal of every node in its DSN); False uses only the configured hosts (e.g. a proxy).

    No node is contacted yet: the first statement finds the leader. Bad arguments raise
    ProgrammingError (a bad isolation_level: sqlite3's TypeError or ValueError); unreadable or
    insecure certificate files raise OperationalError.
    """
    s = parse_settings(dsn, hosts=hosts, certs=certs, cafile=cafile, certfile=certfile,
                       keyfile=keyfile, timeout=timeout, autocommit=autocommit,
                       consistency=consistency, isolation_level=isolation_level)
    try:
        context = client_context(s.cafile, s.certfile, s.keyfile)
    except (OSError, ssl.SSLError) as e:
        raise OperationalError(f"cannot load the TLS certificates: {e}") from e
    client = _client.Client(s.hosts, context, timeout=s.timeout, consistency=s.consistency,
                            discover=discover)
    return factory(client, autocommit=s.autocommit, isolation_level=s.isolation_level,
                   consistency=s.consistency)

"""The replicated state machine: committed log entries applied to SQLite (apsw), deterministically.

Every node applies the same entries in the same order, and each entry must leave every node's
database byte-for-byte equivalent and return the same Result. The pieces that make it so:

- time: an apsw.VFS subclass serves SQLite's clock ('now', CURRENT_*, column DEFAULTs) from the
  entry being applied (the leader's stamp, never decreasing; see _EntryClock);
- randomness: random() and randomblob() are replaced on the write connection by a PRNG seeded
  from (entry seed, statement number);
- limits: a runaway statement is stopped by a VM step budget (counted, not timed);
- sandbox: an authorizer refuses what would touch other files or per-connection state
  (ATTACH, load_extension, VACUUM, TEMP objects, most PRAGMAs, BEGIN/COMMIT...);
- exactly-once: the session table, the applied index and the statements commit in one SQLite
  transaction, so a crash never separates "executed" from "recorded".

See server/DESIGN-statemachine.md for the reasons behind each choice.
"""

from __future__ import annotations

import gc
import hashlib
import itertools
import logging
import math
import os
import random
import secrets
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import apsw
import msgpack

from raftsql.command import INT64_MAX, Command, CommandError, CommandKind, Many
from raftsql.sqltext import first_keyword, skip_blank

log = logging.getLogger(__name__)

# Julian day number of the unix epoch, in ms: what SQLite's xCurrentTimeInt64 returns at unix 0.
UNIX_EPOCH_JULIAN_MS = 210866760000000
# The progress handler runs every this many VM steps; the step budget is counted in these units.
PROGRESS_STEPS = 1000
DEFAULT_SESSION_TIMEOUT_MS = 6 * 3600 * 1000
DEFAULT_APPLY_VM_STEP_LIMIT = 100_000_000  # ~2 s of VM on a 2026 laptop core (~45M steps/s)
DEFAULT_QUERY_TIMEOUT_S = 10.0
SESSION_GC_INTERVAL_MS = 60_000
# Sessions expire by the session clock: leader time, except that one entry can move it forward
# by at most this much (and at most a quarter of the session timeout). A leader whose wall clock
# jumps ahead by hours therefore cannot expire every session at once (a resend across the jump
# would apply twice). The price: time with no entries at all does not count either.
SESSION_CLOCK_MAX_STEP_MS = 60_000
MAX_VALUE_BYTES = 100_000_000  # SQLITE_LIMIT_LENGTH on every connection
BUSY_TIMEOUT_MS = 5000

# Error names that are not SQLite result codes. The driver maps them to DB-API exceptions
# (see DESIGN-statemachine.md for the suggested mapping).
STALE_SERIAL = "RAFTSQL_STALE_SERIAL"
MAX_ROWID = "RAFTSQL_MAX_ROWID"
STEP_LIMIT = "RAFTSQL_STEP_LIMIT"
TIMEOUT = "RAFTSQL_TIMEOUT"
MULTIPLE_STATEMENTS = "RAFTSQL_MULTIPLE_STATEMENTS"
NOT_READONLY = "RAFTSQL_NOT_READONLY"
BINDINGS = "RAFTSQL_BINDINGS"
PROGRAMMING = "RAFTSQL_PROGRAMMING"
SERIALIZATION = "RAFTSQL_SERIALIZATION"  # a transaction's read set changed: nothing applied
TXN_TIMEOUT = "RAFTSQL_TXN_TIMEOUT"  # a transaction was idle too long: nothing applied
RESULT_TOO_BIG = "RAFTSQL_RESULT_TOO_BIG"  # a write's result over MAX_RESULT_BYTES: nothing applied
SQLITE_BUSY_SNAPSHOT = 517  # SQLite's own code for "your snapshot is no longer current"
SQLITE_ABORT = 4
# Idle transactions (no statement for this long, in leader time) cannot commit. Replicated
# behaviour: identical on every node (see DESIGN.md, "Serializable transactions").
DEFAULT_TXN_IDLE_TIMEOUT_MS = 60_000
# The name under which read and write sets record the schema (and the database header:
# user_version, application_id). Every non-empty read set implicitly includes it.
SCHEMA = "sqlite_schema"
_SCHEMA_NAMES = frozenset({"sqlite_master", "sqlite_schema", "sqlite_temp_master", "sqlite_temp_schema"})

SQLITE_ERROR = 1
SQLITE_READONLY = 8
SQLITE_INTERRUPT = 9
SQLITE_TOOBIG = 18
SQLITE_CONSTRAINT = 19
SQLITE_MISUSE = 21
SQLITE_AUTH = 23
SQLITE_RANGE = 25

# How apply treats a failing user statement, by SQLite result code (server/DESIGN.md, "What a
# statement can do to a node"). A statement's own failure is a result value, replicated like any
# other. Only a fault of this node's machine stops the node.
#
# Primary codes that describe this node's environment (its disk, its locks, its file system):
# replicating them as results would let nodes diverge, so apply stops with a message.
_MACHINE_CODES = frozenset(
    {
        apsw.SQLITE_PERM,
        apsw.SQLITE_BUSY,
        apsw.SQLITE_LOCKED,
        apsw.SQLITE_READONLY,
        apsw.SQLITE_IOERR,
        apsw.SQLITE_FULL,
        apsw.SQLITE_CANTOPEN,
        apsw.SQLITE_PROTOCOL,
        apsw.SQLITE_NOTADB,
    }
)
# Codes that mean either "this node's file is damaged" (or SQLite misbehaves) or "the statement
# made SQLite say so": apply checks its own database (PRAGMA quick_check) to tell which.
_SUSPECT_CODES = frozenset({apsw.SQLITE_CORRUPT, apsw.SQLITE_INTERNAL, apsw.SQLITE_MISUSE})
# Extended codes that a virtual table (fts3/4/5, rtree, geopoly) reports about its own content:
# deterministic, given the same database, so always a result value (issue: fts5's
# 'integrity-check' on an external-content table reports SQLITE_CORRUPT_VTAB).
_VTAB_CODES = frozenset(
    {apsw.SQLITE_CORRUPT_VTAB, apsw.SQLITE_LOCKED_VTAB, apsw.SQLITE_CONSTRAINT_VTAB}
)
# The largest result a write (or a transaction's preview) may produce: rows of RETURNING and of
# reads inside a batch, counted as they are fetched (deterministically: see _value_size). Larger
# results fail with SQLITE_TOOBIG and nothing is applied. The result is stored in the session row
# and sent in one frame, so it must stay far below SQLite's length limit and the frame limit.
# Reads outside transactions stream instead and have no such limit.
MAX_RESULT_BYTES = 16 * 1024 * 1024
# A node re-checks its own database file at most this often (a suspect error within this window
# after a clean check is taken as the statement's).
VERIFY_INTERVAL_S = 10.0

_vfs_ids = itertools.count(1)
_DML_KEYWORDS = frozenset({"INSERT", "UPDATE", "DELETE", "REPLACE"})


class StateMachineError(Exception):
    """Raised when the state machine cannot go on (I/O error, disk full, corrupt database,
    out-of-order apply): the node must stop rather than risk diverging."""


class CorruptEntryError(StateMachineError):
    """Raised when committed entry data does not decode as a Command: the log is corrupt."""


class DatabaseDamagedError(StateMachineError):
    """Raised when this node's own database file fails SQLite's check: the node must stop, and
    can be re-seeded from the leader (`raftsql node ... --reseed`)."""


class _NodeProblem(Exception):
    """A user statement failed with a code that may be about this node rather than the
    statement (see _SUSPECT_CODES, and SQLITE_NOMEM); apply_many decides which."""

    def __init__(self, error: dict[str, Any], memory: bool, cause: BaseException):
        super().__init__(error["message"])
        self.error = error
        self.memory = memory
        self.cause = cause
        self.index = 0


class SQLError(Exception):
    """Raised by validate() when a statement would be refused; carries the same error map as
    Result.error ({code, name, message} plus "statement", its position in the batch)."""

    def __init__(self, code: int, name: str, message: str, statement: int | None = None):
        super().__init__(f"{name}: {message}")
        self.code = code
        self.name = name
        self.message = message
        self.statement = statement

    @property
    def error(self) -> dict[str, Any]:
        err: dict[str, Any] = {"code": self.code, "name": self.name, "message": self.message}
        if self.statement is not None:
            err["statement"] = self.statement
        return err


def _error(code: int, name: str, message: str) -> dict[str, Any]:
    return {"code": code, "name": name, "message": message}


@dataclass
class Result:
    """The outcome of one write (a log entry) or one read, sent to the client as a plain map.

    For a write of one statement the fields describe that statement and results is None. For a
    write of several statements (an atomic batch) the top-level fields describe the last
    statement (like a DB-API cursor after the last execute) and results holds one Result per
    statement, in order (their index/error/duplicate/results are left at defaults). If any
    statement fails, nothing of the batch is kept: error is set (its "statement" key says which
    one failed), columns/rows are empty, rowcount is -1 and results is None.
    """

    columns: list[str] = field(default_factory=list)
    decltypes: list[str | None] = field(default_factory=list)
    rows: list[list[Any]] = field(default_factory=list)
    rowcount: int = -1  # changes() for INSERT/UPDATE/DELETE/REPLACE, -1 otherwise (as sqlite3)
    lastrowid: int | None = None  # last_insert_rowid(), reset to 0 at the start of every entry
    index: int = 0  # the entry's log index (writes) or the applied index the read saw (reads)
    error: dict[str, Any] | None = None  # {code: extended result code, name, message[, statement]}
    duplicate: bool = False  # a retried (client_id, serial): the stored result, not re-executed
    results: list[Result] | None = None
    # Reads only: [row, column] of TEXT values that are not valid UTF-8, sent as bytes (the
    # driver applies its text_factory, as sqlite3 does); None when there are none.
    bad_text: list[list[int]] | None = None
    # Reads only, never sent: the rest of the rows when there are more than one chunk.
    stream: ReadCursor | None = field(default=None, repr=False, compare=False)

    def to_wire(self) -> dict[str, Any]:
        out = {
            "columns": self.columns,
            "decltypes": self.decltypes,
            "rows": self.rows,
            "rowcount": self.rowcount,
            "lastrowid": self.lastrowid,
            "index": self.index,
            "error": self.error,
            "duplicate": self.duplicate,
            "results": None if self.results is None else [r.to_wire() for r in self.results],
        }
        if self.bad_text:
            out["bad_text"] = self.bad_text
        return out

    @classmethod
    def from_wire(cls, m: dict[str, Any]) -> Result:
        """Inverse of to_wire(); missing keys take their defaults. Raises ValueError on a shape
        that is not a Result."""
        if not isinstance(m, dict):
            raise ValueError(f"a Result must be a map, not {type(m).__name__}")
        try:
            results = m.get("results")
            return cls(
                columns=list(m.get("columns") or []),
                decltypes=list(m.get("decltypes") or []),
                rows=[list(r) for r in m.get("rows") or []],
                rowcount=int(m.get("rowcount", -1)),
                lastrowid=m.get("lastrowid"),
                index=int(m.get("index", 0)),
                error=dict(m["error"]) if m.get("error") is not None else None,
                duplicate=bool(m.get("duplicate", False)),
                results=None if results is None else [cls.from_wire(r) for r in results],
                bad_text=m.get("bad_text"),
            )
        except (TypeError, KeyError) as e:
            raise ValueError(f"malformed Result map: {e}") from None

    def encode(self) -> bytes:
        return msgpack.packb(self.to_wire(), use_bin_type=True)

    @classmethod
    def decode(cls, data: bytes) -> Result:
        return cls.from_wire(msgpack.unpackb(data, raw=False))


# ---------------------------------------------------------------------------------------------
# SQL text helpers


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


# ---------------------------------------------------------------------------------------------
# The sandbox

# raftsql's own tables (sqlite_raftsql_meta, ...). Users may read them, never write them.
_INTERNAL_PREFIX = "sqlite_raftsql_"
_INTERNAL_TABLES = ("meta", "sessions", "tables", "members")
# Their names before they moved under SQLite's reserved prefix; still reserved for user objects.
_LEGACY_PREFIX = "_raftsql_"

# Introspection pragmas: they read the schema and change nothing; their argument (a table name)
# arrives in the value slot, so any argument is fine.
_INTROSPECTION_PRAGMAS = frozenset(
    {
        "table_info",
        "table_xinfo",
        "table_list",
        "index_list",
        "index_info",
        "index_xinfo",
        "foreign_key_list",
        "foreign_key_check",
        "collation_list",
        "function_list",
        "module_list",
        "pragma_list",
        "integrity_check",
        "quick_check",
        "compile_options",
    }
)
# Settings that may be read but not changed (changing them is per connection, not replicated).
_READ_ONLY_SETTINGS = frozenset(
    {"foreign_keys", "recursive_triggers", "encoding", "schema_version", "auto_vacuum", "page_size"}
)
# Settings stored in the database header: transactional, replicated like any row.
_WRITABLE_SETTINGS = frozenset({"user_version", "application_id"})
_VTAB_MODULES = frozenset(
    {"fts3", "fts4", "fts5", "fts4aux", "fts5vocab", "rtree", "rtree_i32", "geopoly"}
)
# Virtual tables that expose the physical file (pages, offsets): not replicated state.
_PHYSICAL_TABLES = frozenset({"dbstat", "sqlite_dbpage"})

_A = apsw
_TEMP_ACTIONS = frozenset(
    {
        _A.SQLITE_CREATE_TEMP_INDEX,
        _A.SQLITE_CREATE_TEMP_TABLE,
        _A.SQLITE_CREATE_TEMP_TRIGGER,
        _A.SQLITE_CREATE_TEMP_VIEW,
        _A.SQLITE_DROP_TEMP_INDEX,
        _A.SQLITE_DROP_TEMP_TABLE,
        _A.SQLITE_DROP_TEMP_TRIGGER,
        _A.SQLITE_DROP_TEMP_VIEW,
    }
)
# Schema changes whose object name (arg3) or table (arg4) must not be an internal one.
_SCHEMA_ACTIONS = frozenset(
    {
        _A.SQLITE_CREATE_INDEX,
        _A.SQLITE_CREATE_TABLE,
        _A.SQLITE_CREATE_TRIGGER,
        _A.SQLITE_CREATE_VIEW,
        _A.SQLITE_DROP_INDEX,
        _A.SQLITE_DROP_TABLE,
        _A.SQLITE_DROP_TRIGGER,
        _A.SQLITE_DROP_VIEW,
        _A.SQLITE_ALTER_TABLE,
        _A.SQLITE_CREATE_VTABLE,
        _A.SQLITE_DROP_VTABLE,
    }
)
_ROW_WRITES = frozenset({_A.SQLITE_INSERT, _A.SQLITE_UPDATE, _A.SQLITE_DELETE})


def _is_internal(name: str | None) -> bool:
    if name is None:
        return False
    low = name.lower()
    return low.startswith(_INTERNAL_PREFIX) or low.startswith(_LEGACY_PREFIX)


def _refusal(
    write: bool, action: int, arg3: str | None, arg4: str | None, nested: bool = False
) -> str | None:
    """Why a user statement may not do `action`, or None if it may. `write` selects the rules of
    the apply path (and validate), which also refuse what is fine to read but not replicated.
    `nested`: the statement is being prepared while another one runs (FTS5's own statements)."""
    if action == _A.SQLITE_READ or action == _A.SQLITE_SELECT or action == _A.SQLITE_RECURSIVE:
        if write and arg3 in _PHYSICAL_TABLES:
            return f"{arg3} describes this node's file layout, which is not replicated"
        return None
    if action in _ROW_WRITES:
        if _is_internal(arg3):
            return f"table {arg3} is internal to raftsql and cannot be modified"
        # sqlite_sequence may be written, as in sqlite3 (DROP and RENAME of an AUTOINCREMENT
        # table write it, and so may a user); a statement that leaves a sequence at the
        # largest rowid fails instead (see _Guard.sequence_written).
        if arg3 in _PHYSICAL_TABLES:
            return f"{arg3} writes raw database pages"
        return None
    if action == _A.SQLITE_FUNCTION:
        name = (arg4 or "").lower()
        if name == "load_extension":
            return "load_extension() is not allowed"
        if write and name == "total_changes":
            return "total_changes() counts per connection and is not replicated; use changes()"
        return None
    if action == _A.SQLITE_PRAGMA:
        name = (arg3 or "").lower()
        if name in _INTROSPECTION_PRAGMAS or name in _WRITABLE_SETTINGS:
            return None
        if name in _READ_ONLY_SETTINGS:
            return None if arg4 is None else f"PRAGMA {name} cannot be changed"
        if name == "data_version" and arg4 is None and (nested or not write):
            # FTS5 reads it internally; its value is per connection, so a user's write may not.
            return None
        return f"PRAGMA {name} is not allowed"
    if action == _A.SQLITE_ATTACH:
        # VACUUM runs an internal ATTACH; validate/apply refuse VACUUM by keyword first.
        return "ATTACH is not allowed: a replicated database is a single file"
    if action == _A.SQLITE_DETACH:
        return "DETACH is not allowed"
    if action == _A.SQLITE_TRANSACTION or action == _A.SQLITE_SAVEPOINT:
        return (
            "transaction control (BEGIN, COMMIT, ROLLBACK, SAVEPOINT, RELEASE) is managed by "
            "raftsql: every write is already one atomic transaction"
        )
    if action in _TEMP_ACTIONS:
        return "TEMP objects are not allowed: they belong to one connection and are not replicated"
    if action in _SCHEMA_ACTIONS:
        if _is_internal(arg3) or _is_internal(arg4):
            return f"names starting with {_LEGACY_PREFIX} or {_INTERNAL_PREFIX} are reserved for raftsql"
        if action == _A.SQLITE_CREATE_VTABLE and (arg4 or "").lower() not in _VTAB_MODULES:
            return f"virtual table module {arg4} is not allowed"
        return None
    return None  # ANALYZE, REINDEX


class _Guard:
    """Per-connection sandbox state read by the authorizer. `internal` is set while the state
    machine runs its own statements (which carry a secret tag, so a user statement can never
    reuse one of them from apsw's statement cache without being authorized)."""

    __slots__ = (
        "write", "internal", "denied", "schema_change", "user_prepare", "reads", "writes",
        "sequence_written",
    )

    def __init__(self, write: bool):
        self.write = write
        self.internal = False
        self.denied: str | None = None
        self.schema_change = False
        # True from the start of a user statement's execute() until its exec trace (prepare
        # done); prepares outside that window are nested in a running statement (vtab internals).
        self.user_prepare = True
        # When not None, the tables user statements read / may write are added (lower case;
        # the schema as SCHEMA). The authorizer runs only at prepare, so statements whose sets
        # are collected must be prepared each time (can_cache=False, ~2 us per statement).
        self.reads: set[str] | None = None
        self.writes: set[str] | None = None
        # Set when a statement inserts or updates sqlite_sequence: apply then checks that no
        # sequence reached the largest rowid, where the next AUTOINCREMENT insert would fail
        # with SQLITE_FULL, an error apply must take for this node's disk being full.
        self.sequence_written = False

    def __call__(
        self, action: int, arg3: str | None, arg4: str | None, db: str | None, trig: str | None
    ) -> int:
        if self.internal:
            return apsw.SQLITE_OK
        if self.reads is not None or self.writes is not None:
            self._track(action, arg3, arg4)
        if action in _SCHEMA_ACTIONS:
            self.schema_change = True
        elif (action == _A.SQLITE_INSERT or action == _A.SQLITE_UPDATE) and arg3 == "sqlite_sequence":
            self.sequence_written = True
        reason = _refusal(self.write, action, arg3, arg4, not self.user_prepare)
        if reason is None:
            return apsw.SQLITE_OK
        if self.denied is None:
            self.denied = reason
        return apsw.SQLITE_DENY


    def _track(self, action: int, arg3: str | None, arg4: str | None) -> None:
        """Record what a statement reads and may write, statically (from its compiled program,
        trigger bodies and views included): deterministic, and a superset of what one run
        touches. Table granularity; see DESIGN.md, "Serializable transactions"."""
        if action == _A.SQLITE_READ:
            if self.reads is not None and arg3:
                self.reads.add(_tracked(arg3))
        elif action in _ROW_WRITES:
            if self.writes is not None and arg3:
                self.writes.add(_tracked(arg3))
        elif action == _A.SQLITE_PRAGMA:
            # A pragma reads the schema or the header; setting user_version/application_id
            # changes the header, which counts as the schema.
            if arg4 is None:
                if self.reads is not None:
                    self.reads.add(SCHEMA)
            elif self.writes is not None and (arg3 or "").lower() in _WRITABLE_SETTINGS:
                self.writes.add(SCHEMA)
        elif action in _SCHEMA_ACTIONS and self.writes is not None:
            self.writes.add(SCHEMA)


def _tracked(name: str) -> str:
    name = name.lower()
    return SCHEMA if name in _SCHEMA_NAMES else name


def _configure(conn: apsw.Connection, guard: _Guard) -> None:
    """Settings every connection shares, pinned rather than left to build defaults so that
    every node's SQLite behaves alike."""
    conn.set_busy_timeout(BUSY_TIMEOUT_MS)
    conn.enable_load_extension(False)
    for op, value in (
        (apsw.SQLITE_DBCONFIG_ENABLE_LOAD_EXTENSION, 0),
        (apsw.SQLITE_DBCONFIG_ENABLE_FTS3_TOKENIZER, 0),
        (apsw.SQLITE_DBCONFIG_DEFENSIVE, 1),
        (apsw.SQLITE_DBCONFIG_WRITABLE_SCHEMA, 0),
        (apsw.SQLITE_DBCONFIG_TRUSTED_SCHEMA, 1),
        (apsw.SQLITE_DBCONFIG_ENABLE_FKEY, 0),
        (apsw.SQLITE_DBCONFIG_ENABLE_TRIGGER, 1),
        (apsw.SQLITE_DBCONFIG_ENABLE_VIEW, 1),
        (apsw.SQLITE_DBCONFIG_DQS_DML, 1),
        (apsw.SQLITE_DBCONFIG_DQS_DDL, 1),
        (apsw.SQLITE_DBCONFIG_LEGACY_ALTER_TABLE, 0),
        (apsw.SQLITE_DBCONFIG_REVERSE_SCANORDER, 0),
        (apsw.SQLITE_DBCONFIG_ENABLE_QPSG, 0),
        (apsw.SQLITE_DBCONFIG_ENABLE_ATTACH_CREATE, 0),
        (apsw.SQLITE_DBCONFIG_ENABLE_ATTACH_WRITE, 0),
    ):
        conn.config(op, value)
    conn.limit(apsw.SQLITE_LIMIT_ATTACHED, 0)
    conn.limit(apsw.SQLITE_LIMIT_LENGTH, MAX_VALUE_BYTES)
    conn.pragma("recursive_triggers", 0)
    conn.pragma("automatic_index", 1)
    conn.authorizer = guard


def _ensure_utc() -> None:
    """SQLite's 'localtime' and 'utc' modifiers read the process time zone: pin it to UTC so
    that they give the same answer on every node."""
    if time.timezone != 0 or time.altzone != 0 or time.daylight:
        log.warning("setting TZ=UTC so that SQLite's 'localtime' is identical on every node")
        os.environ["TZ"] = "UTC"
        time.tzset()


class _EntryClock(apsw.VFS):
    """The default VFS with SQLite's clock replaced: 'now', CURRENT_TIME/DATE/TIMESTAMP and
    column DEFAULTs read now_ms, which apply sets to the entry's time. SQLite caches the time
    per statement, so this runs at most once per statement that asks."""

    def __init__(self, name: str, now_ms: int):
        self.now_ms = now_ms
        super().__init__(name, "")

    def xCurrentTimeInt64(self) -> int:  # noqa: N802 - SQLite's name
        return self.now_ms + UNIX_EPOCH_JULIAN_MS

    def xCurrentTime(self) -> float:  # noqa: N802
        return (self.now_ms + UNIX_EPOCH_JULIAN_MS) / 86400000.0


def _as_int(value: Any) -> int:
    """randomblob(N)'s N converted the way SQLite mostly does; identical on every node."""
    if type(value) is int:
        return value
    if type(value) is float:
        return int(value) if math.isfinite(value) else 0
    if type(value) is str:
        try:
            f = float(value.strip())
        except ValueError:
            return 0
        return int(f) if math.isfinite(f) else 0
    return 0


class _StatementFailed(Exception):
    def __init__(self, error: dict[str, Any]):
        self.error = error


class _TransactionLost(Exception):
    """A failing statement rolled back the whole transaction (an interrupted write, ON CONFLICT
    ROLLBACK, RAISE(ROLLBACK)); apply_many redoes the batch with this entry's result forced."""

    def __init__(self, index: int, result: Result):
        self.index = index
        self.result = result


@dataclass(frozen=True)
class MemberChange:
    """A committed membership change as the state machine records it: the member's advertised
    address (None: leave it as is), or its removal. Kept in `sqlite_raftsql_members`, so the address
    book travels inside snapshots and every node holds the same one at the same index."""

    node_id: str
    address: str | None = None
    removed: bool = False


@dataclass
class _Reader:
    conn: apsw.Connection
    guard: _Guard
    deadline: float = 0.0
    active: bool = False
    timed_out: bool = False
    traced: int = 0
    description: tuple = ()
    abort: dict[str, Any] | None = None
    statement: str = ""


class ReadCursor:
    """One read in progress on a reader connection: its rows, streamed in chunks from one
    SQLite read transaction (the snapshot at the Result's index), so neither the node nor the
    client ever holds a large result whole. Not thread-safe: one request at a time uses it
    (the client connection that owns it). close() ends the read transaction and returns the
    reader to the pool; a cursor left open holds back WAL checkpoints, so the client service
    closes idle ones."""

    def __init__(self, sm: StateMachine, reader: _Reader, max_row_bytes: int | None):
        self._sm = sm
        self._reader = reader
        self._max_row_bytes = max_row_bytes
        self._rows: Any = None  # the apsw cursor, an iterator of rows
        self._sent = 0  # rows handed out so far
        self._consumed = 0  # rows taken from the SQLite statement so far
        self.bad_text: list[list[int]] = []
        self._sql = ""
        self._params: Any = ()
        self._wrapped = False  # restarted with invalid UTF-8 text made visible (see _recover)
        self.index = 0
        self.error: dict[str, Any] | None = None
        self.closed = False
        self.last_used = time.monotonic()

    def start(self, sql: str, params: Any, reads: set[str] | None,
              start_index: int | None) -> Result:
        reader, sm = self._reader, self._sm
        conn, guard, tag = reader.conn, reader.guard, sm._tag
        reader.traced = 0
        reader.description = ()
        reader.abort = None
        reader.timed_out = False
        reader.deadline = time.monotonic() + sm.query_timeout_s
        guard.denied = None
        guard.internal = True
        try:
            conn.execute(tag + "BEGIN")
            self.index = conn.execute(
                tag + "SELECT applied_index FROM sqlite_raftsql_meta"
            ).fetchone()[0]
        finally:
            guard.internal = False
        guard.reads = reads
        self._sql, self._params = sql, params if params is not None else ()
        try:
            # Collecting a read set needs the authorizer, which runs only at prepare.
            self._rows = conn.cursor().execute(sql, self._params, can_cache=reads is None)
            if start_index is not None and reads:
                conflict = sm._modified_after(conn, guard, reads, start_index)
                if conflict is not None:
                    return Result(index=self.index, error=conflict)
        except Exception as e:  # noqa: BLE001 - a read's failure is always just its result
            if isinstance(e, UnicodeDecodeError) and self._recover():
                pass
            else:
                return Result(index=self.index, error=sm._read_error(reader, e))
        finally:
            guard.reads = None
            reader.active = False
        desc = reader.description
        return Result(
            columns=[d[0] for d in desc],
            decltypes=[d[1] for d in desc],
            rowcount=-1,
            lastrowid=None,
            index=self.index,
        )

    def fetch(self, max_bytes: int) -> tuple[list[list[Any]] | None, bool]:
        """The next rows, about max_bytes of them (at least one), and whether the read is
        done. (None, True) if it failed: the error is in .error. Text that is not valid UTF-8
        comes as bytes, with its (row, column) position listed in .bad_text (relative to
        this chunk)."""
        self.last_used = time.monotonic()
        self.bad_text: list[list[int]] = []
        reader, sm = self._reader, self._sm
        out: list[list[Any]] = []
        size = 0
        reader.deadline = time.monotonic() + sm.query_timeout_s
        reader.timed_out = False
        reader.active = True
        try:
            while True:
                if out and size >= max_bytes:
                    # Stop before reading another row: a chunk ends with the row that filled
                    # it, so at most one large row is held (never one read ahead).
                    self._sent += len(out)
                    return out, False
                got = self._next_row()
                if got is None:
                    return out, True
                row, bad = got
                n = sum(map(_value_size, row)) + 5
                if self._max_row_bytes is not None and n > self._max_row_bytes:
                    self.error = _error(
                        SQLITE_TOOBIG,
                        RESULT_TOO_BIG,
                        f"row {self._sent + len(out) + 1} of the result is about {n} bytes, "
                        f"more than one frame can carry ({self._max_row_bytes} bytes, the "
                        "node's max_frame_size); read its large values in pieces, e.g. with "
                        "substr(value, start, length)",
                    )
                    return None, True
                for c in bad:
                    self.bad_text.append([len(out), c])
                out.append(row)
                size += n
        except Exception as e:  # noqa: BLE001 - a read's failure is always just its result
            self.error = sm._read_error(reader, e)
            return None, True
        finally:
            reader.active = False

    def _next_row(self) -> tuple[list[Any], list[int]] | None:
        """The next row and the columns whose TEXT is not valid UTF-8 (sent as bytes)."""
        while True:
            try:
                row = next(self._rows, None)
                if row is not None:
                    self._consumed += 1
            except UnicodeDecodeError:
                if self._wrapped or not self._recover():
                    raise
                continue
            if row is None:
                return None
            if not self._wrapped:
                return list(row), []
            # Wrapped: (typeof, value) per column; text that does not decode stays bytes.
            out, bad = [], []
            for c in range(0, len(row), 2):
                value = row[c + 1]
                if row[c] == "text":
                    try:
                        value = value.decode("utf-8")
                    except UnicodeDecodeError:
                        bad.append(c // 2)
                out.append(value)
            return out, bad

    def _recover(self) -> bool:
        """A TEXT value that is not valid UTF-8 stopped the read (apsw cannot hand over its
        bytes). Run the statement again in the same read transaction, wrapped so that every
        TEXT value arrives as bytes with its type, and skip the rows already read: the client
        then decides, as sqlite3's text_factory does. Only a SELECT, VALUES or WITH statement
        can be wrapped; False otherwise (the read fails with sqlite3's decode error)."""
        reader = self._reader
        sql = reader.statement or self._sql
        if first_keyword(sql) not in ("SELECT", "VALUES", "WITH") or not reader.description:
            return False
        cols = len(reader.description)
        names = ", ".join(f"c{i}" for i in range(cols))
        picks = ", ".join(
            f"typeof(c{i}), CASE WHEN typeof(c{i}) = 'text' THEN CAST(c{i} AS BLOB) ELSE c{i} END"
            for i in range(cols)
        )
        wrapped = (
            f"WITH raftsql_text_q({names}) AS (\n{sql.rstrip().rstrip(';')}\n) "
            f"SELECT {picks} FROM raftsql_text_q"
        )
        description = reader.description
        reader.traced = 0
        try:
            rows = reader.conn.cursor().execute(wrapped, self._params, can_cache=False)
        except Exception:  # noqa: BLE001 - cannot wrap it: the plain decode error stands
            return False
        finally:
            reader.description = description
            reader.traced = 0
        skip = self._consumed
        for _ in range(skip):
            if next(rows, None) is None:
                break
        self._rows = rows
        self._wrapped = True
        return True

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        reader, sm = self._reader, self._sm
        reader.active = False
        guard = reader.guard
        guard.internal = True
        try:
            self._rows = None
            if reader.conn.in_transaction:
                reader.conn.execute(sm._tag + "COMMIT")
        except apsw.Error as e:  # a reader that cannot end its read: drop it
            log.warning("closing a read cursor failed: %s", e)
            reader.conn.close()
            return
        finally:
            guard.internal = False
        sm._checkin_reader(reader)


class StateMachine:
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
    ):
        if session_timeout_ms <= 0 or apply_vm_step_limit <= 0 or query_timeout_s <= 0:
            raise ValueError("timeouts and limits must be positive")
        if txn_idle_timeout_ms <= 0:
            raise ValueError("timeouts and limits must be positive")
        self.txn_idle_timeout_ms = txn_idle_timeout_ms
        _ensure_utc()
        self.path = os.fspath(path)
        self.session_timeout_ms = session_timeout_ms
        self.apply_vm_step_limit = apply_vm_step_limit
        self.query_timeout_s = query_timeout_s
        self._gc_interval_ms = min(SESSION_GC_INTERVAL_MS, session_timeout_ms)
        # At least four entries are needed to expire a session, however far the clock jumps.
        self._session_step_ms = max(1, min(SESSION_CLOCK_MAX_STEP_MS, session_timeout_ms // 4))
        self._max_progress_calls = -(-apply_vm_step_limit // PROGRESS_STEPS)

        self._lock = threading.RLock()  # the write connection and the mirrors below
        self._applied_cond = threading.Condition(threading.Lock())
        self._readers: list[_Reader] = []
        self._readers_lock = threading.Lock()
        self._validate_lock = threading.Lock()
        self._vreader: _Reader | None = None
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
        self._sql_table_touch = (
            "INSERT INTO sqlite_raftsql_tables(name, modified_index) VALUES(?,?) "
            "ON CONFLICT(name) DO UPDATE SET modified_index=excluded.modified_index"
        )
        self._sql_table_get = "SELECT modified_index FROM sqlite_raftsql_tables WHERE name=?"
        self._sql_plain_writes = (
            "SELECT 1 FROM sqlite_schema WHERE type='trigger' AND lower(tbl_name)=?1 "
            "UNION ALL SELECT 1 FROM pragma_foreign_key_list(?1) "
            "WHERE lower(\"table\")=?1 AND (on_delete NOT IN ('NO ACTION', 'RESTRICT') "
            "OR on_update NOT IN ('NO ACTION', 'RESTRICT')) LIMIT 1"
        )
        self._sql_member_put = (
            "INSERT INTO sqlite_raftsql_members(node_id, address) VALUES(?,?) "
            "ON CONFLICT(node_id) DO UPDATE SET address=excluded.address"
        )
        self._sql_member_del = "DELETE FROM sqlite_raftsql_members WHERE node_id=?"

        # Per-statement apply state, read by the callbacks below.
        self._seed = 0
        self._stmt_no = 0
        self._rng: random.Random | None = None
        self._budget_on = False
        self._progress_calls = 0
        self._step_limit_hit = False
        self._traced = 0
        self._description: tuple = ()
        self._dml = False
        self._abort: dict[str, Any] | None = None
        self._max_rowid_table: str | None = None
        self._result_budget = MAX_RESULT_BYTES
        self._verified_at = -VERIFY_INTERVAL_S  # monotonic time of the last clean quick_check

        vfs_name = f"raftsql-clock-{os.getpid()}-{next(_vfs_ids)}"
        self._vfs = _EntryClock(vfs_name, 0)
        self._guard = _Guard(write=True)
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
            raise _damaged(self.path, f"opening it failed: {type(e).__name__}: {e}", str(e)) from e
        except BaseException:
            self._conn.close()
            self._vfs.unregister()
            raise

    def _open_write_connection(self) -> None:
        conn = self._conn
        _configure(conn, self._guard)
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
            self._create_internal_tables()
        finally:
            conn.config(apsw.SQLITE_DBCONFIG_WRITABLE_SCHEMA, 0)
            conn.config(apsw.SQLITE_DBCONFIG_DEFENSIVE, 1)
        row = self._internal(
            "SELECT applied_index, time_ms, gc_ms, format, session_ms FROM sqlite_raftsql_meta"
        )[0]
        self._finish_open(row)

    def _create_internal_tables(self) -> None:
        self._internal("BEGIN IMMEDIATE")
        # Databases made before the rename keep these tables as _raftsql_*: upgrade, then
        # rename them in place. SQLite lets no one (raftsql included) alter or drop a sqlite_*
        # table, so a later format change adds tables instead. Every node renames its own file
        # when it opens it: upgrade all nodes together.
        legacy = {
            r[0] for r in self._internal(
                "SELECT name FROM sqlite_schema WHERE type='table' AND name IN "
                f"({', '.join(repr(f'{_LEGACY_PREFIX}{t}') for t in _INTERNAL_TABLES)})"
            )
        }
        if "_raftsql_meta" in legacy:
            cols = [r[1] for r in self._internal("PRAGMA table_info(_raftsql_meta)")]
            if "session_ms" not in cols:
                # Format 1 (no session clock): start the session clock at the entry time. Every
                # node must be upgraded at the same applied index (stop the cluster, upgrade all).
                self._internal("ALTER TABLE _raftsql_meta ADD COLUMN session_ms INTEGER NOT NULL DEFAULT 0")
                self._internal("UPDATE _raftsql_meta SET session_ms=time_ms, format=2")
        for name in sorted(legacy):
            self._internal(f"ALTER TABLE {name} RENAME TO sqlite{name}")
        self._internal(
            "CREATE TABLE IF NOT EXISTS sqlite_raftsql_meta("
            "id INTEGER PRIMARY KEY CHECK (id = 1), applied_index INTEGER NOT NULL, "
            "time_ms INTEGER NOT NULL, gc_ms INTEGER NOT NULL, format INTEGER NOT NULL, "
            "session_ms INTEGER NOT NULL)"
        )
        self._internal("INSERT OR IGNORE INTO sqlite_raftsql_meta VALUES(1, 0, 0, 0, 2, 0)")
        # WITHOUT ROWID and no index on last_ms: an upsert touches one b-tree page; the expiry
        # scan runs once per SESSION_GC_INTERVAL_MS of leader time.
        self._internal(
            "CREATE TABLE IF NOT EXISTS sqlite_raftsql_sessions("
            "client_id TEXT PRIMARY KEY, serial INTEGER NOT NULL, result BLOB NOT NULL, "
            "last_ms INTEGER NOT NULL) WITHOUT ROWID"
        )
        # The last log index whose entry wrote each table (lower-case name; the schema as
        # SCHEMA): what a transaction's commit checks its read set against.
        self._internal(
            "CREATE TABLE IF NOT EXISTS sqlite_raftsql_tables("
            "name TEXT PRIMARY KEY, modified_index INTEGER NOT NULL) WITHOUT ROWID"
        )
        # The cluster's address book, from the CONF_CHANGE entries (MemberChange).
        self._internal(
            "CREATE TABLE IF NOT EXISTS sqlite_raftsql_members("
            "node_id TEXT PRIMARY KEY, address TEXT NOT NULL) WITHOUT ROWID"
        )
        self._internal("COMMIT")

    def _finish_open(self, row: tuple) -> None:
        conn = self._conn
        self._session_ms = row[4]
        if row[3] != 2:
            raise StateMachineError(f"{self.path}: unknown raftsql format {row[3]}")
        self._applied_index, self._time_ms, self._gc_ms = row[0], row[1], row[2]
        self._vfs.now_ms = self._time_ms
        conn.create_scalar_function("random", self._random, 0)
        conn.create_scalar_function("randomblob", self._randomblob, 1)
        conn.set_progress_handler(self._progress, PROGRESS_STEPS)
        conn.set_update_hook(self._update_hook)
        self._cursor = conn.cursor()
        self._cursor.exec_trace = self._trace
        self._many_cursor = conn.cursor()
        self._many_cursor.exec_trace = self._trace_many
        self._fast_cursor = conn.cursor()

    # -- public state ---------------------------------------------------------------------

    @property
    def applied_index(self) -> int:
        """Index of the last entry applied (and committed to SQLite)."""
        return self._applied_index

    @property
    def last_time_ms(self) -> int:
        """The clock of the last applied entry. Entry time never goes backwards: an entry
        stamped earlier than this runs at this time (see DESIGN-statemachine.md)."""
        return self._time_ms

    def wait_applied(self, index: int, timeout_s: float | None = None) -> bool:
        """Block until applied_index >= index; False if timeout_s passed first."""
        with self._applied_cond:
            return self._applied_cond.wait_for(lambda: self._applied_index >= index, timeout_s)

    # -- apply ----------------------------------------------------------------------------

    def apply(self, index: int, data: bytes) -> Result | None:
        """Apply one committed entry. Returns None for a no-op (data == b"") or a replayed entry
        (index <= applied_index). Raises CorruptEntryError for data that is not a Command, and
        StateMachineError when the node cannot continue."""
        return self.apply_many([(index, data)])[0]

    def apply_many(self, entries: Iterable[tuple[int, bytes]]) -> list[Result | None]:
        """apply() for consecutive entries, in one SQLite transaction (one commit). An entry's
        data may also be its already-decoded Command (the leader's own proposals) or a
        MemberChange."""
        entries = list(entries)
        results: list[Result | None] = [None] * len(entries)
        with self._lock:
            self._check_open()
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
            forced: dict[int, Result] = {}
            retried_memory: set[int] = set()
            while True:
                try:
                    done = self._apply_batch(todo, forced)
                    break
                except _TransactionLost as lost:
                    forced[lost.index] = lost.result
                except _NodeProblem as problem:
                    # The batch was rolled back. Is it this node or the statement?
                    if problem.memory and problem.index not in retried_memory:
                        retried_memory.add(problem.index)
                        self._free_memory(problem)
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
            for pos, result in done:
                results[pos] = result
        with self._applied_cond:
            self._applied_cond.notify_all()
        return results

    def _free_memory(self, problem: _NodeProblem) -> None:
        log.warning(
            "entry %d: out of memory (%s); freeing caches and applying it again",
            problem.index, problem.cause,
        )
        gc.collect()
        apsw.release_memory(1 << 30)
        self._conn.cache_flush()

    def _verify_database(self, problem: _NodeProblem) -> None:
        """Raise DatabaseDamagedError unless this node's database passes SQLite's quick_check
        (a clean check is trusted for VERIFY_INTERVAL_S)."""
        now = time.monotonic()
        if now - self._verified_at < VERIFY_INTERVAL_S:
            return
        damage = self._damage()
        if damage is not None:
            raise _damaged(
                self.path,
                f"entry {problem.index} failed with {problem.error['name']} "
                f"({problem.error['message']})",
                damage,
            ) from problem.cause
        self._verified_at = now

    def _damage(self) -> str | None:
        """What PRAGMA quick_check finds wrong with this node's database, or None if nothing."""
        try:
            rows = self._internal("PRAGMA quick_check(20)")
        except apsw.Error as e:
            return f"{type(e).__name__}: {e}"
        if rows == [("ok",)]:
            return None
        return "; ".join(str(r[0]) for r in rows)

    def _apply_batch(
        self, todo: list[tuple[int, int, Command | None]], forced: dict[int, Result]
    ) -> list[tuple[int, Result | None]]:
        applied, time_ms, gc_ms = self._applied_index, self._time_ms, self._gc_ms
        session_ms = self._session_ms
        done: list[tuple[int, Result | None]] = []
        self._internal("BEGIN IMMEDIATE")
        try:
            for pos, index, cmd in todo:
                if isinstance(cmd, MemberChange):
                    if cmd.removed:
                        self._internal(self._sql_member_del, (cmd.node_id,))
                    elif cmd.address is not None:
                        self._internal(self._sql_member_put, (cmd.node_id, cmd.address))
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
        except (_TransactionLost, _NodeProblem):
            self._abandon()
            raise
        except StateMachineError:
            self._abandon()
            raise
        except apsw.Error as e:
            # One of raftsql's own statements failed (the meta row, a session row): never the
            # user's doing. Tell a damaged file from the rest of the machine.
            self._abandon()
            damage = self._damage() if _classify(e) == "suspect" else None
            if damage is not None:
                raise _damaged(self.path, f"apply failed: {type(e).__name__}: {e}", damage) from e
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

    def preview(
        self,
        writes: Sequence[tuple[str, Any]],
        statement: tuple[str, Any],
        *,
        start_index: int | None = None,
        reads: set[str] | None = None,
    ) -> tuple[Result, bool]:
        """Run an open transaction's earlier `writes`, then `statement`, against the applied
        state, in a SQLite transaction that is always rolled back. Returns the statement's
        Result and whether it was read-only. This is how a driver transaction reads its own
        uncommitted writes; the writes only become real when commit() replicates them as one
        entry. random() and 'now' here are previews: the committed entry is re-stamped.

        reads: if not None, the tables `statement` reads are added to it. start_index: if not
        None, the statement fails with RAFTSQL_SERIALIZATION when a table of `reads` (after
        adding the statement's) was modified after that index (the transaction's snapshot)."""
        with self._lock:
            self._check_open()
            applied = self._applied_index
            self._conn.set_last_insert_rowid(0)
            self._seed = secrets.randbits(63)
            self._vfs.now_ms = max(int(time.time() * 1000), self._time_ms)
            self._result_budget = MAX_RESULT_BYTES
            self._internal("BEGIN IMMEDIATE")
            try:
                for i, (sql, params) in enumerate([*writes, statement]):
                    self._stmt_no = i
                    self._rng = None
                    self._readonly = False
                    self._guard.reads = reads if i == len(writes) else None
                    try:
                        result = self._run_statement(sql, params)
                    except _NodeProblem as problem:
                        # Not replicated: report it; the commit, if any, is decided by apply.
                        return Result(index=applied, error=problem.error), False
                    except _StatementFailed as failed:
                        if i < len(writes):
                            failed.error["statement"] = i
                            failed.error["message"] = (
                                "an earlier statement of this transaction now fails: "
                                + failed.error["message"]
                            )
                        return Result(index=applied, error=failed.error), False
                    finally:
                        self._guard.reads = None
                if start_index is not None and reads:
                    conflict = self._modified_after(self._conn, self._guard, reads, start_index)
                    if conflict is not None:
                        return Result(index=applied, error=conflict), self._readonly
                result.index = applied
                return result, self._readonly
            finally:
                self._abandon()

    def _modified_after(
        self, conn: apsw.Connection, guard: _Guard, names: Iterable[str], read_index: int
    ) -> dict[str, Any] | None:
        """The serialization error if a table of `names` (or, when names is not empty, the
        schema) was modified by an entry after read_index, as seen by conn's snapshot."""
        names = set(names)
        if not names:
            return None
        outer, guard.internal = guard.internal, True
        try:
            for name in sorted(names | {SCHEMA}):
                row = conn.execute(self._tag + self._sql_table_get, (name,)).fetchone()
                if row is not None and row[0] > read_index:
                    what = "the schema" if name == SCHEMA else f"table {name}"
                    return _error(
                        SQLITE_BUSY_SNAPSHOT,
                        SERIALIZATION,
                        f"serialization failure: {what} was modified at log index {row[0]}, "
                        f"after this transaction's snapshot at index {read_index}; nothing "
                        "was applied: run the transaction again",
                    )
        finally:
            guard.internal = outer
        return None

    def _txn_refusal(self, index: int, cmd: Command, time_ms: int) -> Result | None:
        """For a TXN command (a transaction's commit): the error Result if it must not apply
        (idle too long, or its read set was modified after its snapshot), else None. Runs in
        the apply transaction, so every node decides the same; the session row stores it."""
        if cmd.kind is not CommandKind.TXN:
            return None
        if cmd.last_ms and time_ms - cmd.last_ms > self.txn_idle_timeout_ms:
            return Result(
                index=index,
                error=_error(
                    SQLITE_ABORT,
                    TXN_TIMEOUT,
                    f"the transaction was idle for more than {self.txn_idle_timeout_ms} ms; "
                    "nothing was applied: run it again",
                ),
            )
        conflict = self._modified_after(self._conn, self._guard, cmd.read_set, cmd.read_index)
        return None if conflict is None else Result(index=index, error=conflict)

    def _abandon(self) -> None:
        self._vfs.now_ms = self._time_ms
        self._budget_on = False
        if self._conn.in_transaction:
            try:
                self._internal("ROLLBACK")
            except apsw.Error as e:  # pragma: no cover - nothing more to do; the node stops
                log.error("rollback failed: %s", e)

    def _internal(self, sql: str, params: Sequence[Any] | None = None) -> list[tuple]:
        guard = self._guard
        outer, guard.internal = guard.internal, True
        try:
            return self._conn.execute(self._tag + sql, params).fetchall()
        finally:
            guard.internal = outer

    def _apply_command(
        self, index: int, cmd: Command, time_ms: int, session_ms: int, forced: Result | None
    ) -> Result:
        self._conn.set_last_insert_rowid(0)
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
                        error=_error(
                            SQLITE_ERROR,
                            STALE_SERIAL,
                            f"stale serial {cmd.serial} < latest {serial} "
                            f"for client {cmd.client_id}",
                        ),
                    )
        if forced is not None:
            result = forced
        else:
            result = self._txn_refusal(index, cmd, time_ms) or self._execute(index, cmd)
        if cmd.dedup:
            self._internal(
                self._sql_session_put, (cmd.client_id, cmd.serial, result.encode(), session_ms)
            )
        return result

    def _execute(self, index: int, cmd: Command) -> Result:
        conn = self._conn
        statements = cmd.statements
        self._seed = cmd.seed
        self._result_budget = MAX_RESULT_BYTES
        self._internal("SAVEPOINT raftsql_entry")
        per: list[Result] = []
        written: set[str] = set()
        self._guard.writes = written
        try:
            for i, (sql, params) in enumerate(statements):
                self._stmt_no = i
                self._rng = None
                try:
                    if type(params) is Many:
                        per.append(self._run_many(sql, params))
                    else:
                        per.append(self._run_statement(sql, params))
                except (_StatementFailed, _NodeProblem) as failed:
                    if len(statements) != 1:
                        failed.error["statement"] = i
                    if isinstance(failed, _NodeProblem):
                        failed.index = index
                    raise
        except _StatementFailed as failed:
            self._guard.writes = None
            result = Result(index=index, error=failed.error)
            if not conn.in_transaction:
                raise _TransactionLost(index, result) from None
            self._internal("ROLLBACK TO raftsql_entry")
            self._internal("RELEASE raftsql_entry")
            return result
        finally:
            self._guard.writes = None
        self._internal("RELEASE raftsql_entry")
        for name in sorted(written):
            self._internal(self._sql_table_touch, (name, index))
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

    def _run_statement(self, sql: str, params: Any) -> Result:
        conn = self._conn
        self._guard.denied = None
        self._guard.sequence_written = False
        self._guard.user_prepare = True
        self._traced = 0
        self._description = ()
        self._dml = False
        self._abort = None
        self._step_limit_hit = False
        self._max_rowid_table = None
        rows: list[list[Any]] = []
        try:
            # Never from apsw's statement cache: the authorizer (which records read and write
            # sets) runs only at prepare.
            cursor = self._cursor.execute(sql, params, can_cache=False)
            budget = self._result_budget
            for row in cursor:
                budget -= sum(map(_value_size, row)) + 5
                if budget < 0:
                    break
                rows.append(list(row))
            else:
                budget -= sum(4 * len(d[0]) + 4 * len(d[1] or "") + 10 for d in self._description)
        except Exception as e:  # noqa: BLE001 - mapped to a result or re-raised as fatal
            raise _StatementFailed(self._statement_error(e)) from None
        finally:
            self._budget_on = False
        if budget < 0:
            self._reset_apply_cursor()
            raise _StatementFailed(_result_too_big_error())
        self._result_budget = budget
        if self._guard.sequence_written:
            self._check_sequences()
        if self._max_rowid_table is not None:
            raise _StatementFailed(_max_rowid_error(self._max_rowid_table))
        desc = self._description
        return Result(
            columns=[d[0] for d in desc],
            decltypes=[d[1] for d in desc],
            rows=rows,
            rowcount=conn.changes() if self._dml else -1,
            lastrowid=conn.last_insert_rowid(),
        )

    def _run_many(self, sql: str, many: Many) -> Result:
        """A "many" statement: the first parameter set runs as a normal statement (all of its
        checks: one statement, not VACUUM, ...), the rest through executemany, prepared once.
        rowcount is the sum of the changes (as sqlite3's executemany); rows are discarded."""
        sets = many.sets
        entry_writes = self._guard.writes
        mine: set[str] = set()
        self._guard.writes = mine  # the tables this statement may write (triggers included)
        try:
            first = self._run_statement(sql, sets[0])
        except (_StatementFailed, _NodeProblem) as failed:
            failed.error["set"] = 0
            raise
        finally:
            if entry_writes is not None:
                entry_writes |= mine
            self._guard.writes = entry_writes
        if len(sets) == 1:
            first.rows, first.columns, first.decltypes = [], [], []
            return first
        conn = self._conn
        self._many_total = first.rowcount if self._dml else -1
        if self._dml and self._plain_writes(mine):
            rng_state = self._rng.getstate() if self._rng is not None else None
            total = self._run_many_untraced(sql, sets)
            if total is not None:
                if self._guard.sequence_written:
                    self._check_sequences()
                return Result(rowcount=self._many_total + total, lastrowid=conn.last_insert_rowid())
            self._rng = None  # redo with the tracer: the same random() values as the fast run
            if rng_state is not None:
                self._rng = random.Random()
                self._rng.setstate(rng_state)
        self._guard.denied = None
        self._guard.user_prepare = True
        self._many_set = 0
        try:
            for _ in self._many_cursor.executemany(sql, sets[1:]):
                pass
            if self._dml:
                self._many_total += conn.changes()
        except Exception as e:  # noqa: BLE001 - mapped to a result or re-raised as fatal
            try:
                error = self._statement_error(e)
            except _NodeProblem as problem:
                problem.error["set"] = self._many_set
                raise
            error["set"] = self._many_set
            raise _StatementFailed(error) from None
        finally:
            self._budget_on = False
        if self._max_rowid_table is not None:
            error = _max_rowid_error(self._max_rowid_table)
            error["set"] = self._many_set
            raise _StatementFailed(error)
        if self._guard.sequence_written:
            self._check_sequences()
        return Result(rowcount=self._many_total, lastrowid=conn.last_insert_rowid())

    def _check_sequences(self) -> None:
        rows = self._internal(
            "SELECT name FROM sqlite_sequence WHERE seq >= ? LIMIT 1", (INT64_MAX,)
        )
        if rows:
            raise _StatementFailed(
                _error(
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
        self._cursor.close(force=True)
        self._cursor = self._conn.cursor()
        self._cursor.exec_trace = self._trace

    def _plain_writes(self, tables: set[str]) -> bool:
        """True if every change a statement writing `tables` makes is one of its own rows: one
        table (a trigger or a foreign key action on another table would add it), with no
        trigger and no self-referencing foreign key action. Then total_changes() grows by
        exactly what changes() reports per run (REPLACE deletions count in neither)."""
        if len(tables) != 1:
            return False
        (name,) = tables
        if name == SCHEMA:
            return False
        return not self._internal(self._sql_plain_writes, (name,))

    def _run_many_untraced(self, sql: str, sets: tuple) -> int | None:
        """The fast path of a many statement (no exec tracer: about a quarter of its cost):
        sets[1:] in a savepoint, with one step budget for them all. Returns the summed
        changes, or None after rolling the savepoint back when anything went wrong (an
        error, the largest rowid): the caller then redoes them with the tracer, which stops
        at the right set and names it, identically on every node."""
        conn = self._conn
        guard = self._guard
        self._internal("SAVEPOINT raftsql_many")
        before = conn.total_changes()
        limit = self._max_progress_calls
        guard.denied = None
        guard.user_prepare = False  # prepared already (cached): nothing here is nested
        self._max_progress_calls = limit * (len(sets) - 1)
        self._progress_calls = 0
        self._budget_on = True
        failed = False
        try:
            for _ in self._fast_cursor.executemany(sql, sets[1:]):
                pass
        except Exception as e:  # noqa: BLE001 - any failure: redo traced, which maps the error
            if not conn.in_transaction:
                # OR ROLLBACK, or the step limit (an interrupt): the entry's transaction is
                # gone, so no redo; the batch is redone with this error (_TransactionLost).
                raise _StatementFailed(self._statement_error(e)) from None
            failed = True
        finally:
            self._budget_on = False
            self._max_progress_calls = limit
        if not failed and self._max_rowid_table is None:
            self._internal("RELEASE raftsql_many")
            return conn.total_changes() - before
        self._max_rowid_table = None
        self._step_limit_hit = False
        self._internal("ROLLBACK TO raftsql_many")
        self._internal("RELEASE raftsql_many")
        return None

    def _trace_many(self, cursor: apsw.Cursor, sql: str, bindings: Any) -> bool:
        """Exec tracer of the executemany cursor: once per parameter set after the first."""
        if self._max_rowid_table is not None:
            # The previous set stored the largest rowid: stop before a later set makes SQLite
            # pick a rowid with its own PRNG (the error names that previous set).
            self._abort = _max_rowid_error(self._max_rowid_table)
            return False
        self._many_set += 1
        if self._many_set > 1 and self._dml:
            self._many_total += self._conn.changes()  # of the previous set
        self._guard.user_prepare = False
        self._progress_calls = 0
        self._budget_on = True
        return True

    def _trace(self, cursor: apsw.Cursor, sql: str, bindings: Any) -> bool:
        """Exec tracer of the apply cursor: runs once per statement, before it steps."""
        if not cursor.has_vdbe:
            return True  # only comments or ';'
        self._traced += 1
        if self._traced > 1:
            self._abort = _error(
                SQLITE_ERROR, MULTIPLE_STATEMENTS, "You can only execute one statement at a time."
            )
            return False
        keyword = first_keyword(sql)
        if keyword == "VACUUM":
            self._abort = _error(
                SQLITE_AUTH, "SQLITE_AUTH", "not authorized: VACUUM is not allowed"
            )
            return False
        self._dml = keyword in _DML_KEYWORDS
        self._readonly = cursor.is_readonly
        self._guard.user_prepare = False
        self._description = cursor.get_description()
        self._progress_calls = 0
        self._budget_on = True
        return True

    def _update_hook(self, op: int, db: str, table: str, rowid: int) -> None:
        # A table holding the largest rowid makes SQLite choose later rowids with its own PRNG,
        # which cannot be seeded per entry: the statement that stores it fails instead.
        if rowid == INT64_MAX and self._budget_on and op != apsw.SQLITE_DELETE:
            self._max_rowid_table = table

    def _progress(self) -> bool:
        if not self._budget_on:
            return False
        self._progress_calls += 1
        if self._progress_calls > self._max_progress_calls:
            self._step_limit_hit = True
            return True
        return False

    def _statement_error(self, e: BaseException) -> dict[str, Any]:
        """The replicated error value for a failed user statement. Raises StateMachineError if
        the failure is about this node's machine (disk, locks), and _NodeProblem if it may be
        about the node or the statement (apply_many finds out which)."""
        if isinstance(e, apsw.ExecTraceAbort) and self._abort is not None:
            return self._abort
        if isinstance(e, apsw.InterruptError) and self._step_limit_hit:
            return _error(
                SQLITE_INTERRUPT,
                STEP_LIMIT,
                f"statement exceeded the step limit ({self.apply_vm_step_limit} VM steps)",
            )
        err = _common_error(e, self._guard)
        if err is not None:
            return err
        kind = _classify(e)
        code = getattr(e, "extendedresult", None) or getattr(e, "result", None) or SQLITE_ERROR
        if kind in ("suspect", "memory"):
            name = "SQLITE_NOMEM" if kind == "memory" else _code_name(code)
            raise _NodeProblem(
                _error(code if kind != "memory" else apsw.SQLITE_NOMEM, name,
                       str(e.args[0]) if e.args else str(e) or type(e).__name__),
                kind == "memory",
                e,
            )
        raise StateMachineError(
            f"apply failed on this node's machine: {type(e).__name__}: {e} "
            f"({_code_name(code)}). Fix the machine (disk space, permissions, file system) and "
            "restart the node: it re-applies the entry."
        ) from e

    def _random(self) -> int:
        rng = self._rng or self._new_rng()
        return rng.getrandbits(64) - (1 << 63)

    def _randomblob(self, n: Any) -> bytes:
        size = max(1, _as_int(n))
        if size > MAX_VALUE_BYTES:
            raise apsw.TooBigError("string or blob too big")
        return (self._rng or self._new_rng()).randbytes(size)

    def _new_rng(self) -> random.Random:
        # random.Random(int) is seeded identically on every platform and process (unlike hash()).
        self._rng = random.Random((self._seed << 32) | self._stmt_no)
        return self._rng

    # -- validate (leader, before proposing) ----------------------------------------------

    def validate(self, statements: Sequence[tuple[str, Any]]) -> list[bool]:
        """Prepare each (sql, params) without running it and return its read-only flag.

        Raises SQLError for what apply would refuse or fail to compile: syntax errors, unknown
        tables (unless an earlier statement of the batch changes the schema: then the check is
        left to apply), sandbox refusals, wrong bindings, several statements in one string."""
        self._check_open()
        flags: list[bool] = []
        with self._validate_lock:
            if self._vreader is None:
                self._vreader = self._open_reader(write_rules=True)
            reader = self._vreader
            reader.guard.schema_change = False
            # Preparing never checks the schema cookie, so this connection could still hold the
            # schema from before a CREATE TRIGGER (and call "DROP TRIGGER IF EXISTS" a no-op,
            # read-only). Reading a table does check it, and reloads the schema if it moved.
            reader.guard.internal = True
            try:
                reader.conn.execute(self._tag + "SELECT applied_index FROM sqlite_raftsql_meta").fetchall()
            finally:
                reader.guard.internal = False
            # An executemany batch repeats one statement with new values: preparing and binding
            # depend only on the text and the parameters' shape, so check each shape once.
            seen: dict[tuple, bool] = {}
            for i, item in enumerate(statements):
                if isinstance(item, str):
                    sql, params = item, ()
                else:
                    sql, params = item
                flag = True
                if type(params) is not Many:
                    group: Sequence[Any] = (params,)
                elif set(map(type, params.sets)) == {tuple}:
                    # One set per distinct length (C speed for 1,000 sets of one shape).
                    group = list({len(one): one for one in params.sets}.values())
                else:
                    group = params.sets
                for one in group:
                    if isinstance(one, dict):
                        shape: Any = tuple(sorted(one))
                    else:
                        shape = len(one) if one is not None else 0
                    key = (sql, shape)
                    if key not in seen:
                        try:
                            seen[key] = self._prepare_only(reader, sql, one)
                        except SQLError as e:
                            e.statement = i
                            raise
                    flag = flag and seen[key]
                flags.append(flag)
        return flags

    def _prepare_only(self, reader: _Reader, sql: str, params: Any) -> bool:
        seen: dict[str, Any] = {}

        def tracer(cursor: apsw.Cursor, first: str, bindings: Any) -> bool:
            if not cursor.has_vdbe:
                return True
            seen["sql"] = first
            seen["readonly"] = cursor.is_readonly
            return False  # abort: prepared and bound, never stepped

        guard = reader.guard
        schema_changed_before = guard.schema_change
        guard.denied = None
        cursor = reader.conn.cursor()
        cursor.exec_trace = tracer
        try:
            cursor.execute(sql, params if params is not None else (), can_cache=False)
        except apsw.ExecTraceAbort:
            pass
        except Exception as e:  # noqa: BLE001 - every failure becomes an SQLError or passes
            err = _common_error(e, guard) or _error(
                getattr(e, "extendedresult", None) or SQLITE_ERROR,
                apsw.mapping_result_codes.get(getattr(e, "result", None), "SQLITE_ERROR"),
                str(e.args[0]) if e.args else str(e),
            )
            msg = err["message"]
            if (
                schema_changed_before
                and err["name"] == "SQLITE_ERROR"
                and "syntax error" not in msg
                and "incomplete input" not in msg
                and "unrecognized token" not in msg
            ):
                # e.g. INSERT into a table created earlier in this batch: apply decides.
                return False
            raise SQLError(err["code"], err["name"], msg) from None
        if "sql" not in seen:
            return True  # only comments: a no-op
        first = seen["sql"]
        # The first statement's text is normally a prefix of sql; if blank pieces came first,
        # find where it ends.
        end = len(first) if sql.startswith(first) else sql.find(first) + len(first)
        if skip_blank(sql, end) < len(sql):
            raise SQLError(
                SQLITE_ERROR, MULTIPLE_STATEMENTS, "You can only execute one statement at a time."
            )
        if not seen["readonly"] and first_keyword(sql) == "VACUUM":
            raise SQLError(SQLITE_AUTH, "SQLITE_AUTH", "not authorized: VACUUM is not allowed")
        return bool(seen["readonly"])

    # -- reads --------------------------------------------------------------------------

    def query(
        self,
        sql: str,
        params: Any = (),
        *,
        at_index: int | None = None,
        reads: set[str] | None = None,
        start_index: int | None = None,
        max_bytes: int = MAX_RESULT_BYTES,
    ) -> Result:
        """Run one read-only statement on a read connection (WAL: concurrent with apply) and
        return all of its rows, at most max_bytes of them (else the error RAFTSQL_RESULT_TOO_BIG:
        larger results are read with open_query()).

        at_index: wait (up to query_timeout_s) until that index is applied. Result.index is the
        applied index of the snapshot the read saw. Errors are returned in Result.error, never
        raised. 'now' and random() here come from this node's clock and PRNG (not replicated).

        reads / start_index: as for preview() (a transaction's read served by a reader)."""
        result, cursor = self.open_query(
            sql, params, at_index=at_index, reads=reads, start_index=start_index,
            first_bytes=max_bytes, max_row_bytes=max_bytes,
        )
        if result.error is not None and result.error["name"] == RESULT_TOO_BIG:
            result.error = _read_too_big_error(max_bytes)
        if cursor is not None:
            cursor.close()
            return Result(index=result.index, error=_read_too_big_error(max_bytes))
        return result

    def stream_query(
        self,
        sql: str,
        params: Any = (),
        *,
        reads: set[str] | None = None,
        start_index: int | None = None,
        first_bytes: int = 1 << 20,
        max_row_bytes: int | None = None,
    ) -> Result:
        """open_query() with the cursor, if any, in Result.stream."""
        result, cursor = self.open_query(
            sql, params, reads=reads, start_index=start_index, first_bytes=first_bytes,
            max_row_bytes=max_row_bytes,
        )
        result.stream = cursor
        return result

    def open_query(
        self,
        sql: str,
        params: Any = (),
        *,
        at_index: int | None = None,
        reads: set[str] | None = None,
        start_index: int | None = None,
        first_bytes: int = 1 << 20,
        max_row_bytes: int | None = None,
    ) -> tuple[Result, ReadCursor | None]:
        """Start a read and return its first rows (about first_bytes of them) and, if more
        remain, a ReadCursor that streams the rest from the same snapshot (one SQLite read
        transaction, at Result.index) until it is exhausted or closed. Memory stays bounded
        by the chunk size, whatever the size of the result. max_row_bytes: a single row larger
        than this (it could not be sent in one frame) fails the read with a clear error."""
        self._check_open()
        if at_index is not None and not self.wait_applied(at_index, self.query_timeout_s):
            return Result(
                index=self._applied_index,
                error=_error(
                    SQLITE_INTERRUPT,
                    TIMEOUT,
                    f"index {at_index} was not applied within {self.query_timeout_s} s",
                ),
            ), None
        reader = self._checkout_reader()
        cursor = ReadCursor(self, reader, max_row_bytes)
        try:
            result = cursor.start(sql, params, reads, start_index)
            if result.error is None:
                result.rows, done = cursor.fetch(first_bytes)
                if result.rows is None:  # failed while fetching
                    result = Result(index=result.index, error=cursor.error)
                    done = True
                else:
                    result.bad_text = cursor.bad_text or None
            else:
                done = True
        except BaseException:
            cursor.close()
            raise
        if done:
            cursor.close()
            return result, None
        return result, cursor

    def _open_reader(self, *, write_rules: bool) -> _Reader:
        conn = apsw.Connection(self.path, flags=apsw.SQLITE_OPEN_READONLY)
        guard = _Guard(write=write_rules)
        _configure(conn, guard)
        reader = _Reader(conn, guard)

        def progress() -> bool:
            if reader.active and time.monotonic() > reader.deadline:
                reader.timed_out = True
                return True
            return False

        def tracer(cursor: apsw.Cursor, sql: str, bindings: Any) -> bool:
            if reader.guard.internal or not cursor.has_vdbe:
                return True
            reader.traced += 1
            if reader.traced > 1:
                reader.abort = _error(
                    SQLITE_ERROR,
                    MULTIPLE_STATEMENTS,
                    "You can only execute one statement at a time.",
                )
                return False
            if not cursor.is_readonly:
                reader.abort = _error(
                    SQLITE_READONLY,
                    NOT_READONLY,
                    "query() runs read-only statements; send writes through the log",
                )
                return False
            reader.description = cursor.get_description()
            reader.statement = sql
            reader.active = True
            return True

        conn.set_progress_handler(progress, PROGRESS_STEPS)
        conn.exec_trace = tracer
        return reader

    def _checkout_reader(self) -> _Reader:
        with self._readers_lock:
            if self._readers:
                return self._readers.pop()
        return self._open_reader(write_rules=False)

    def _checkin_reader(self, reader: _Reader) -> None:
        with self._readers_lock:
            if not self._closed:
                self._readers.append(reader)
                return
        reader.conn.close()

    def _read_error(self, reader: _Reader, e: BaseException) -> dict[str, Any]:
        if isinstance(e, apsw.ExecTraceAbort) and reader.abort is not None:
            return reader.abort
        if isinstance(e, apsw.InterruptError) and reader.timed_out:
            return _error(
                SQLITE_INTERRUPT, TIMEOUT, f"query exceeded the {self.query_timeout_s} s time limit"
            )
        err = _common_error(e, reader.guard)
        if err is None:  # environment errors are not replicated on the read path: report them
            code = getattr(e, "extendedresult", None) or SQLITE_ERROR
            err = _error(code, _code_name(code), f"{type(e).__name__}: {e}")
        return err

    # -- inspection -----------------------------------------------------------------------

    def members(self) -> dict[str, str]:
        """The replicated address book: node id -> advertised host:port."""
        with self._lock:
            self._check_open()
            return dict(self._internal("SELECT node_id, address FROM sqlite_raftsql_members"))

    def content_hash(self) -> str:
        """sha256 over the schema (without root pages) and every table's rows in key order,
        including raftsql's own tables: equal on two nodes at the same applied index."""
        with self._lock:
            self._check_open()
            h = hashlib.sha256()
            pack = msgpack.Packer(use_bin_type=True).pack
            conn, tag = self._conn, self._tag
            self._guard.internal = True
            try:
                for row in conn.execute(
                    tag + "SELECT type, name, tbl_name, sql FROM main.sqlite_schema "
                    "ORDER BY type, name"
                ):
                    h.update(pack(["schema", *row]))
                tables = conn.execute(
                    tag + "SELECT name, wr FROM pragma_table_list WHERE schema='main' "
                    "AND type IN ('table', 'shadow') AND name != 'sqlite_schema' ORDER BY name"
                ).fetchall()
                for name, without_rowid in tables:
                    h.update(pack(["table", name]))
                    for row in conn.execute(tag + self._dump_sql(name, bool(without_rowid))):
                        h.update(pack(row))
            finally:
                self._guard.internal = False
            return h.hexdigest()

    def _dump_sql(self, name: str, without_rowid: bool) -> str:
        q = _quote_ident(name)
        info = self._internal("SELECT name, pk FROM pragma_table_info(?)", (name,))
        # Every value as (type, bytes): TEXT that is not valid UTF-8 cannot come back as str.
        values = ", ".join(
            f"typeof({_quote_ident(c)}), CAST({_quote_ident(c)} AS BLOB)" for c, _ in info
        )
        if without_rowid:
            pk = [_quote_ident(c) for c, k in sorted(info, key=lambda r: r[1]) if k > 0]
            return f"SELECT {values} FROM {q} ORDER BY {', '.join(pk)}"
        names = {c.lower() for c, _ in info}
        for alias in ("rowid", "_rowid_", "oid"):
            if alias not in names:
                return f"SELECT {alias}, {values} FROM {q} ORDER BY {alias}"
        order = ", ".join(_quote_ident(c) for c, _ in info)
        return f"SELECT {values} FROM {q} ORDER BY {order}"

    # -- lifecycle ------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StateMachineError("the state machine is closed")

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            with self._readers_lock:
                readers, self._readers = self._readers, []
            with self._validate_lock:
                if self._vreader is not None:
                    readers.append(self._vreader)
                    self._vreader = None
            for reader in readers:
                reader.conn.close()
            self._conn.close()  # the last connection: checkpoints and removes the WAL
            self._vfs.unregister()

    def __enter__(self) -> StateMachine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _max_rowid_error(table: str) -> dict[str, Any]:
    return _error(
        SQLITE_CONSTRAINT,
        MAX_ROWID,
        f"rowid {INT64_MAX} in table {table} is reserved: past it "
        "SQLite picks rowids at random, which would differ between nodes",
    )


def _damaged(path: str, what: str, damage: str) -> DatabaseDamagedError:
    return DatabaseDamagedError(
        f"{what}, and this node's database {path} fails PRAGMA quick_check: {damage}. The file "
        "is damaged on this node (the other nodes have their own copies). Recover: restart "
        "this node with `raftsql node ... --reseed`, which moves the damaged database aside "
        "and fetches a fresh copy from the leader (README, Recovery)."
    )


def _read_too_big_error(limit: int) -> dict[str, Any]:
    return _error(
        SQLITE_TOOBIG,
        RESULT_TOO_BIG,
        f"result too big: more than {limit} bytes of rows where the whole result must be "
        "built at once; stream it instead (the driver streams the results of plain reads)",
    )


def _result_too_big_error() -> dict[str, Any]:
    return _error(
        SQLITE_TOOBIG,
        RESULT_TOO_BIG,
        f"result too big: a write's result (RETURNING rows, or rows of a read in the same "
        f"request or transaction) is limited to {MAX_RESULT_BYTES} bytes; nothing was "
        "applied. Return fewer or smaller rows, or read them with a SELECT of its own (reads "
        "stream, with no limit)",
    )


def _code_name(code: int) -> str:
    return (
        apsw.mapping_extended_result_codes.get(code)
        or apsw.mapping_result_codes.get(code & 0xFF)
        or "SQLITE_ERROR"
    )


def _common_error(e: BaseException, guard: _Guard) -> dict[str, Any] | None:
    """Map a statement failure to its error value; None if it is about the node (fatal)."""
    # A refused function surfaces as SQLITE_ERROR "not authorized to use function: ...".
    if isinstance(e, apsw.AuthError) or (
        guard.denied is not None and isinstance(e, apsw.SQLError) and "not authorized" in str(e)
    ):
        reason = guard.denied or "the statement was refused"
        return _error(SQLITE_AUTH, "SQLITE_AUTH", f"not authorized: {reason}")
    if isinstance(e, apsw.BindingsError):
        return _error(SQLITE_RANGE, BINDINGS, str(e.args[0]) if e.args else str(e))
    if isinstance(e, KeyError):  # apsw: a named parameter missing from the dict
        name = e.args[0] if e.args else "?"
        return _error(
            SQLITE_RANGE, BINDINGS, f"You did not supply a value for binding parameter :{name}."
        )
    if isinstance(e, apsw.TooBigError) and getattr(e, "result", None) is None:
        return _error(SQLITE_TOOBIG, "SQLITE_TOOBIG", "string or blob too big")
    if isinstance(e, UnicodeDecodeError):
        # sqlite3's wording; apsw cannot hand over the raw bytes of such a TEXT value here.
        return _error(
            SQLITE_ERROR,
            "SQLITE_ERROR",
            "Could not decode to UTF-8: a TEXT value is not valid UTF-8 "
            f"({e.reason} at byte {e.start})",
        )
    if isinstance(e, apsw.Error):
        if _classify(e) != "value":
            return None
        code = getattr(e, "extendedresult", None) or e.result
        return _error(code, _code_name(code), str(e.args[0]) if e.args else str(e))
    if isinstance(e, (ValueError, TypeError, OverflowError)):
        return _error(SQLITE_MISUSE, PROGRAMMING, f"{type(e).__name__}: {e}")
    return None


def _classify(e: BaseException) -> str:
    """"value" (the statement's own failure), "machine" (this node's disk, locks, files),
    "memory" (out of memory: maybe this node, maybe the statement) or "suspect" (a damaged
    file, or the statement made SQLite report one)."""
    if isinstance(e, MemoryError):
        return "memory"
    if not isinstance(e, apsw.Error):
        return "value"
    primary = getattr(e, "result", None)
    if primary is None:
        return "suspect"
    if (getattr(e, "extendedresult", None) or primary) in _VTAB_CODES:
        return "value"
    if primary == apsw.SQLITE_NOMEM:
        return "memory"
    if primary in _MACHINE_CODES:
        return "machine"
    if primary in _SUSPECT_CODES:
        return "suspect"
    return "value"


def _value_size(value: Any) -> int:
    """What one value counts against MAX_RESULT_BYTES: at least its msgpack size, computed
    the same way on every node (str by characters times 4, its UTF-8 bound)."""
    t = type(value)
    if t is bytes:
        return len(value) + 5
    if t is str:
        return 4 * len(value) + 5
    return 9

"""SQL errors as values, and the line between a statement's failure and this node's
(server/DESIGN.md, "What a statement can do to a node").

A statement's failure becomes a replicated error value (raftsql.protocol.sql_error); classify()
tells it apart from a fault of this node's machine, which stops the node.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import apsw

from raftsql.command import INT64_MAX
from raftsql.protocol import BINDINGS, MAX_ROWID, PROGRAMMING, RESULT_TOO_BIG, sql_error

if TYPE_CHECKING:
    from raftsql.server.sandbox import Guard

SQLITE_BUSY_SNAPSHOT = 517  # SQLite's own code for "your snapshot is no longer current"
SQLITE_ABORT = 4
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
# deterministic, given the same database, so always a result value (fts5's
# 'integrity-check' on an external-content table reports SQLITE_CORRUPT_VTAB).
_VTAB_CODES = frozenset(
    {apsw.SQLITE_CORRUPT_VTAB, apsw.SQLITE_LOCKED_VTAB, apsw.SQLITE_CONSTRAINT_VTAB}
)
# The largest result a write (or a transaction's preview) may produce: rows of RETURNING and of
# reads inside a batch, counted as they are fetched (deterministically: see value_size). Larger
# results fail with SQLITE_TOOBIG and nothing is applied. The result is stored in the session row
# and sent in one frame, so it must stay far below SQLite's length limit and the frame limit.
# Reads outside transactions stream instead and have no such limit.
MAX_RESULT_BYTES = 16 * 1024 * 1024
# A node re-checks its own database file at most this often (a suspect error within this window
# after a clean check is taken as the statement's).
VERIFY_INTERVAL_S = 10.0


class StateMachineError(Exception):
    """Raised when the state machine cannot go on (I/O error, disk full, corrupt database,
    out-of-order apply): the node must stop rather than risk diverging."""


class CorruptEntryError(StateMachineError):
    """Raised when committed entry data does not decode as a Command: the log is corrupt."""


class DatabaseDamagedError(StateMachineError):
    """Raised when this node's own database file fails SQLite's check: the node must stop, and
    can be re-seeded from the leader (`raftsql node ... --reseed`)."""


class NodeProblem(Exception):
    """A user statement failed with a code that may be about this node rather than the
    statement (see _SUSPECT_CODES, and SQLITE_NOMEM); apply_many decides which."""

    def __init__(self, error: dict[str, Any], memory: bool, cause: BaseException):
        super().__init__(error["message"])
        self.error = error
        self.memory = memory
        self.cause = cause
        self.index = 0


class StatementFailed(Exception):
    """Raised inside apply when a user statement failed; carries its replicated error value.
    by_sqlite: SQLite itself failed the statement while running it, and left the changes it
    keeps in that case (OR FAIL's rows before the failure, an executemany's earlier parameter
    sets); False for raftsql's own checks after a statement ran, whose changes must go."""

    def __init__(self, error: dict[str, Any], by_sqlite: bool = False):
        self.error = error
        self.by_sqlite = by_sqlite


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


def max_rowid_error(table: str) -> dict[str, Any]:
    return sql_error(
        SQLITE_CONSTRAINT,
        MAX_ROWID,
        f"rowid {INT64_MAX} in table {table} is reserved: past it "
        "SQLite picks rowids at random, which would differ between nodes",
    )


def damaged(path: str, what: str, damage: str) -> DatabaseDamagedError:
    return DatabaseDamagedError(
        f"{what}, and this node's database {path} fails PRAGMA quick_check: {damage}. The file "
        "is damaged on this node (the other nodes have their own copies). Recover: restart "
        "this node with `raftsql node ... --reseed`, which moves the damaged database aside "
        "and fetches a fresh copy from the leader (README, Recovery)."
    )


def read_too_big_error(limit: int) -> dict[str, Any]:
    busy = ""
    if limit < MAX_RESULT_BYTES:
        busy = (f" (the node's memory for results is taken by other reads now: a whole result "
                f"may hold {MAX_RESULT_BYTES} bytes when it is free)")
    return sql_error(
        SQLITE_TOOBIG,
        RESULT_TOO_BIG,
        f"result too big: more than {limit} bytes of rows where the whole result must be "
        f"built at once{busy}; stream it instead (the driver streams the results of plain reads)",
    )


def result_too_big_error() -> dict[str, Any]:
    return sql_error(
        SQLITE_TOOBIG,
        RESULT_TOO_BIG,
        f"result too big: a write's result (RETURNING rows, or rows of a read in the same "
        f"request or transaction) is limited to {MAX_RESULT_BYTES} bytes; nothing was "
        "applied. Return fewer or smaller rows, or read them with a SELECT of its own (reads "
        "stream, with no limit)",
    )


def code_name(code: int) -> str:
    return (
        apsw.mapping_extended_result_codes.get(code)
        or apsw.mapping_result_codes.get(code & 0xFF)
        or "SQLITE_ERROR"
    )


def common_error(e: BaseException, guard: Guard) -> dict[str, Any] | None:
    """Map a statement failure to its error value; None if it is about the node (fatal)."""
    # A refused function surfaces as SQLITE_ERROR "not authorized to use function: ...".
    if isinstance(e, apsw.AuthError) or (
        guard.denied is not None and isinstance(e, apsw.SQLError) and "not authorized" in str(e)
    ):
        reason = guard.denied or "the statement was refused"
        return sql_error(SQLITE_AUTH, "SQLITE_AUTH", f"not authorized: {reason}")
    if isinstance(e, apsw.BindingsError):
        return sql_error(SQLITE_RANGE, BINDINGS, str(e.args[0]) if e.args else str(e))
    if isinstance(e, KeyError):  # apsw: a named parameter missing from the dict
        name = e.args[0] if e.args else "?"
        return sql_error(
            SQLITE_RANGE, BINDINGS, f"You did not supply a value for binding parameter :{name}."
        )
    if isinstance(e, apsw.TooBigError) and getattr(e, "result", None) is None:
        return sql_error(SQLITE_TOOBIG, "SQLITE_TOOBIG", "string or blob too big")
    if isinstance(e, UnicodeDecodeError):
        # sqlite3's wording; apsw cannot hand over the raw bytes of such a TEXT value here.
        return sql_error(
            SQLITE_ERROR,
            "SQLITE_ERROR",
            "Could not decode to UTF-8: a TEXT value is not valid UTF-8 "
            f"({e.reason} at byte {e.start})",
        )
    if isinstance(e, apsw.Error):
        if classify(e) != "value":
            return None
        code = getattr(e, "extendedresult", None) or e.result
        return sql_error(code, code_name(code), str(e.args[0]) if e.args else str(e))
    if isinstance(e, (ValueError, TypeError, OverflowError)):
        return sql_error(SQLITE_MISUSE, PROGRAMMING, f"{type(e).__name__}: {e}")
    return None


def classify(e: BaseException) -> str:
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


def value_size(value: Any) -> int:
    """What one value counts against MAX_RESULT_BYTES: at least its msgpack size, computed
    the same way on every node (str by characters times 4, its UTF-8 bound)."""
    t = type(value)
    if t is bytes:
        return len(value) + 5
    if t is str:
        return 4 * len(value) + 5
    return 9



def free_memory(conn: apsw.Connection, problem: NodeProblem) -> None:
    """Before applying an entry again after it ran out of memory: free what can be freed."""
    import gc
    import logging

    logging.getLogger("raftsql.server.statemachine").warning(
        "entry %d: out of memory (%s); freeing caches and applying it again",
        problem.index, problem.cause,
    )
    gc.collect()
    apsw.release_memory(1 << 30)
    conn.cache_flush()


def find_damage(internal: Callable[..., list[Any]]) -> str | None:
    """What PRAGMA quick_check finds wrong with this node's database, or None if nothing.
    `internal` runs one of raftsql's own statements on the write connection."""
    try:
        rows = internal("PRAGMA quick_check(20)")
    except apsw.Error as e:
        return f"{type(e).__name__}: {e}"
    if rows == [("ok",)]:
        return None
    return "; ".join(str(r[0]) for r in rows)

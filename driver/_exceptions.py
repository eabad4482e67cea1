"""The exception tree of the sqlite3 module, the result-code constants and the mapping from a
server error map ({code, name, message[, statement]}) to an exception.

The mapping from SQLite's primary result code to an exception class is CPython's
(Modules/_sqlite/util.c, get_exception_class); raftsql's own error names (RAFTSQL_*, see
server/DESIGN.md) map to the class the sqlite3 module would raise for the same mistake.
"""

from __future__ import annotations

from typing import Any

from raftsql import protocol


class Warning(Exception):  # noqa: A001 - the DB-API name
    """Raised for important warnings (never raised by raftsql; exists for PEP 249)."""


class Error(Exception):
    """Base class of every exception the driver raises (but Warning)."""

    # Like sqlite3's: set on errors that came from SQLite (or from raftsql's SQL layer, whose
    # names start with RAFTSQL_); None on errors raised by the driver itself.
    sqlite_errorcode: int | None = None
    sqlite_errorname: str | None = None
    # For an error in a batch (executemany, executescript, commit): the 0-based position of the
    # statement that failed; None otherwise.
    statement: int | None = None
    # True when nothing was applied and running the whole transaction (or statement) again
    # is safe and may succeed: SerializationError, TransactionAborted, Unavailable.
    retryable: bool = False


class InterfaceError(Error):
    """Raised for misuse of the driver's interface or a protocol error (a driver bug)."""


class DatabaseError(Error):
    """Raised for errors related to the database."""


class DataError(DatabaseError):
    """Raised when a value is too big or out of range (SQLITE_TOOBIG)."""


class OperationalError(DatabaseError):
    """Raised for errors in the database's operation, not necessarily the programmer's fault:
    syntax errors and unknown tables (SQLITE_ERROR, as sqlite3), timeouts, no leader."""


class IntegrityError(DatabaseError):
    """Raised when a constraint fails (SQLITE_CONSTRAINT, SQLITE_MISMATCH)."""


class InternalError(DatabaseError):
    """Raised when SQLite reports an internal error (SQLITE_INTERNAL, SQLITE_NOTFOUND)."""


class ProgrammingError(DatabaseError):
    """Raised for programming errors: closed objects, several statements in one execute(),
    wrong number of bindings, unsupported parameter types."""


class NotSupportedError(DatabaseError):
    """Raised when an API the database does not support is used."""


# --------------------------------------------------------------------------- raftsql's own


class Unavailable(OperationalError):
    """Raised when no node served the request before the connection's timeout ran out, and
    nothing was applied (never sent, or refused before reaching the log): safe to retry."""

    retryable = True


class OutcomeUnknown(OperationalError):
    """Raised when a write was sent but no result came back before the timeout: it may or may
    not have been applied. Resend it only with the same serial (Connection.resend(error)), which
    applies it at most once and returns its stored result if it was applied."""

    def __init__(self, message: str, *, serial: int, statements: list, client_id: str,
                 commit: dict | None = None):
        super().__init__(message)
        self.serial = serial
        self.statements = statements
        self.client_id = client_id
        self.commit = commit  # a transaction's commit check, resent with it


class PermissionDenied(OperationalError):
    """Raised when the connection's certificate may not do this (its role: read, write or
    admin) or has been revoked: nothing was applied, and running it again will not help. The
    message names the certificate, its role and the operation."""


class TransactionAborted(OperationalError):
    """Raised when the leader changed during a transaction, or the transaction was idle longer
    than the idle timeout: nothing of it was applied; run it again from the start."""

    retryable = True


class SerializationError(OperationalError):
    """Raised when a transaction read something that another write changed before it could
    commit (a lost update prevented): nothing of it was applied; run it again from the start."""

    retryable = True


# --------------------------------------------------------------------------- result codes

# Primary and extended result codes, as exported by the sqlite3 module (SQLITE_OK ... ), so code
# written against sqlite3 can compare e.sqlite_errorcode with them.
RESULT_CODES: dict[str, int] = {
    "SQLITE_OK": 0,
    "SQLITE_OK_LOAD_PERMANENTLY": 256,
    "SQLITE_OK_SYMLINK": 512,
    "SQLITE_ERROR": 1,
    "SQLITE_ERROR_MISSING_COLLSEQ": 257,
    "SQLITE_ERROR_RETRY": 513,
    "SQLITE_ERROR_SNAPSHOT": 769,
    "SQLITE_INTERNAL": 2,
    "SQLITE_PERM": 3,
    "SQLITE_ABORT": 4,
    "SQLITE_ABORT_ROLLBACK": 516,
    "SQLITE_BUSY": 5,
    "SQLITE_BUSY_RECOVERY": 261,
    "SQLITE_BUSY_SNAPSHOT": 517,
    "SQLITE_BUSY_TIMEOUT": 773,
    "SQLITE_LOCKED": 6,
    "SQLITE_LOCKED_SHAREDCACHE": 262,
    "SQLITE_LOCKED_VTAB": 518,
    "SQLITE_NOMEM": 7,
    "SQLITE_READONLY": 8,
    "SQLITE_READONLY_RECOVERY": 264,
    "SQLITE_READONLY_CANTLOCK": 520,
    "SQLITE_READONLY_ROLLBACK": 776,
    "SQLITE_READONLY_DBMOVED": 1032,
    "SQLITE_READONLY_CANTINIT": 1288,
    "SQLITE_READONLY_DIRECTORY": 1544,
    "SQLITE_INTERRUPT": 9,
    "SQLITE_IOERR": 10,
    "SQLITE_IOERR_READ": 266,
    "SQLITE_IOERR_SHORT_READ": 522,
    "SQLITE_IOERR_WRITE": 778,
    "SQLITE_IOERR_FSYNC": 1034,
    "SQLITE_IOERR_DIR_FSYNC": 1290,
    "SQLITE_IOERR_TRUNCATE": 1546,
    "SQLITE_IOERR_FSTAT": 1802,
    "SQLITE_IOERR_UNLOCK": 2058,
    "SQLITE_IOERR_RDLOCK": 2314,
    "SQLITE_IOERR_DELETE": 2570,
    "SQLITE_IOERR_BLOCKED": 2826,
    "SQLITE_IOERR_NOMEM": 3082,
    "SQLITE_IOERR_ACCESS": 3338,
    "SQLITE_IOERR_CHECKRESERVEDLOCK": 3594,
    "SQLITE_IOERR_LOCK": 3850,
    "SQLITE_IOERR_CLOSE": 4106,
    "SQLITE_IOERR_DIR_CLOSE": 4362,
    "SQLITE_IOERR_SHMOPEN": 4618,
    "SQLITE_IOERR_SHMSIZE": 4874,
    "SQLITE_IOERR_SHMLOCK": 5130,
    "SQLITE_IOERR_SHMMAP": 5386,
    "SQLITE_IOERR_SEEK": 5642,
    "SQLITE_IOERR_DELETE_NOENT": 5898,
    "SQLITE_IOERR_MMAP": 6154,
    "SQLITE_IOERR_GETTEMPPATH": 6410,
    "SQLITE_IOERR_CONVPATH": 6666,
    "SQLITE_IOERR_VNODE": 6922,
    "SQLITE_IOERR_AUTH": 7178,
    "SQLITE_IOERR_BEGIN_ATOMIC": 7434,
    "SQLITE_IOERR_COMMIT_ATOMIC": 7690,
    "SQLITE_IOERR_ROLLBACK_ATOMIC": 7946,
    "SQLITE_IOERR_DATA": 8202,
    "SQLITE_IOERR_CORRUPTFS": 8458,
    "SQLITE_IOERR_IN_PAGE": 8714,
    "SQLITE_CORRUPT": 11,
    "SQLITE_CORRUPT_VTAB": 267,
    "SQLITE_CORRUPT_SEQUENCE": 523,
    "SQLITE_CORRUPT_INDEX": 779,
    "SQLITE_NOTFOUND": 12,
    "SQLITE_FULL": 13,
    "SQLITE_CANTOPEN": 14,
    "SQLITE_CANTOPEN_NOTEMPDIR": 270,
    "SQLITE_CANTOPEN_ISDIR": 526,
    "SQLITE_CANTOPEN_FULLPATH": 782,
    "SQLITE_CANTOPEN_CONVPATH": 1038,
    "SQLITE_CANTOPEN_DIRTYWAL": 1294,
    "SQLITE_CANTOPEN_SYMLINK": 1550,
    "SQLITE_PROTOCOL": 15,
    "SQLITE_EMPTY": 16,
    "SQLITE_SCHEMA": 17,
    "SQLITE_TOOBIG": 18,
    "SQLITE_CONSTRAINT": 19,
    "SQLITE_CONSTRAINT_CHECK": 275,
    "SQLITE_CONSTRAINT_COMMITHOOK": 531,
    "SQLITE_CONSTRAINT_FOREIGNKEY": 787,
    "SQLITE_CONSTRAINT_FUNCTION": 1043,
    "SQLITE_CONSTRAINT_NOTNULL": 1299,
    "SQLITE_CONSTRAINT_PRIMARYKEY": 1555,
    "SQLITE_CONSTRAINT_TRIGGER": 1811,
    "SQLITE_CONSTRAINT_UNIQUE": 2067,
    "SQLITE_CONSTRAINT_VTAB": 2323,
    "SQLITE_CONSTRAINT_ROWID": 2579,
    "SQLITE_CONSTRAINT_PINNED": 2835,
    "SQLITE_CONSTRAINT_DATATYPE": 3091,
    "SQLITE_MISMATCH": 20,
    "SQLITE_MISUSE": 21,
    "SQLITE_NOLFS": 22,
    "SQLITE_AUTH": 23,
    "SQLITE_AUTH_USER": 279,
    "SQLITE_FORMAT": 24,
    "SQLITE_RANGE": 25,
    "SQLITE_NOTADB": 26,
    "SQLITE_NOTICE": 27,
    "SQLITE_NOTICE_RECOVER_WAL": 283,
    "SQLITE_NOTICE_RECOVER_ROLLBACK": 539,
    "SQLITE_NOTICE_RBU": 795,
    "SQLITE_WARNING": 28,
    "SQLITE_WARNING_AUTOINDEX": 284,
    "SQLITE_ROW": 100,
    "SQLITE_DONE": 101,
}
globals().update(RESULT_CODES)
_CODE_NAMES = {code: name for name, code in RESULT_CODES.items()}

# CPython Modules/_sqlite/util.c: get_exception_class(primary result code). SQLITE_NOMEM raises
# MemoryError there; a remote node running out of memory is not this process's, so: Operational.
_BY_PRIMARY_CODE: dict[int, type[Error]] = {
    2: InternalError,  # SQLITE_INTERNAL
    12: InternalError,  # SQLITE_NOTFOUND
    1: OperationalError,  # SQLITE_ERROR
    3: OperationalError,  # SQLITE_PERM
    4: OperationalError,  # SQLITE_ABORT
    5: OperationalError,  # SQLITE_BUSY
    6: OperationalError,  # SQLITE_LOCKED
    7: OperationalError,  # SQLITE_NOMEM
    8: OperationalError,  # SQLITE_READONLY
    9: OperationalError,  # SQLITE_INTERRUPT
    10: OperationalError,  # SQLITE_IOERR
    13: OperationalError,  # SQLITE_FULL
    14: OperationalError,  # SQLITE_CANTOPEN
    15: OperationalError,  # SQLITE_PROTOCOL
    16: OperationalError,  # SQLITE_EMPTY
    17: OperationalError,  # SQLITE_SCHEMA
    11: DatabaseError,  # SQLITE_CORRUPT
    18: DataError,  # SQLITE_TOOBIG
    19: IntegrityError,  # SQLITE_CONSTRAINT
    20: IntegrityError,  # SQLITE_MISMATCH
    21: InterfaceError,  # SQLITE_MISUSE
    25: InterfaceError,  # SQLITE_RANGE
}

# raftsql's own error names (server/DESIGN.md, "Result"): the class sqlite3 raises for the same
# mistake, where there is one.
_BY_RAFTSQL_NAME: dict[str, type[Error]] = {
    protocol.MULTIPLE_STATEMENTS: ProgrammingError,  # sqlite3: same class and message
    protocol.BINDINGS: ProgrammingError,  # sqlite3: "Incorrect number of bindings supplied..."
    protocol.PROGRAMMING: ProgrammingError,  # e.g. a NUL character in the SQL
    protocol.NOT_READONLY: OperationalError,
    protocol.STEP_LIMIT: OperationalError,  # like SQLITE_INTERRUPT
    protocol.TIMEOUT: OperationalError,  # like SQLITE_INTERRUPT
    protocol.STALE_SERIAL: InterfaceError,  # the driver reused an old serial: a driver bug
    protocol.MAX_ROWID: IntegrityError,
    protocol.SERIALIZATION: SerializationError,  # like SQLITE_BUSY_SNAPSHOT
    protocol.TXN_TIMEOUT: TransactionAborted,
    protocol.RESULT_TOO_BIG: DataError,  # like SQLITE_TOOBIG
}


def exception_class(code: int | None, name: str | None = None) -> type[Error]:
    """The exception class for an error with this (extended) result code and name."""
    if name and name in _BY_RAFTSQL_NAME:
        return _BY_RAFTSQL_NAME[name]
    if code is None:
        return DatabaseError
    return _BY_PRIMARY_CODE.get(code & 0xFF, DatabaseError)


def error_from_map(err: dict[str, Any]) -> Error:
    """Build the exception for a Result's error map: {code, name, message[, statement][, set]}."""
    code = err.get("code")
    code = code if isinstance(code, int) else None
    name = err.get("name") or (_CODE_NAMES.get(code) if code is not None else None)
    message = err.get("message") or name or "unknown error"
    exc = exception_class(code, name)(message)
    exc.sqlite_errorcode = code
    exc.sqlite_errorname = name
    statement = err.get("statement")
    exc.statement = statement if isinstance(statement, int) else None
    parameter_set = err.get("set")  # executemany: which parameter set failed (0-based)
    exc.parameter_set = parameter_set if isinstance(parameter_set, int) else None
    return exc

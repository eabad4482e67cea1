"""raftsql.driver: a DB-API 2.0 (PEP 249) driver for raftsql, shaped like the sqlite3 module.

    import raftsql.driver as raftsql
    conn = raftsql.connect("raftsql://127.0.0.1:4001,127.0.0.1:4002/?certs=./certs")
    with conn:                                   # one transaction, committed exactly once
        conn.execute("INSERT INTO t (v) VALUES (?)", ("hello",))
    print(conn.execute("SELECT v FROM t").fetchall())

The driver finds the leader, follows redirects and retries with the same (client_id, serial),
so a write is applied at most once even when a leader dies mid-request. It needs only the
standard library and msgpack (it never imports apsw or cryptography). See driver/DESIGN.md.
"""

from raftsql.driver._connection import (
    CONSISTENCY_LEVELS,
    LEGACY_TRANSACTION_CONTROL,
    LIMITS,
    Connection,
    connect,
)
from raftsql.driver._cursor import Cursor
from raftsql.driver._exceptions import (
    RESULT_CODES,
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
    SerializationError,
    TransactionAborted,
    Unavailable,
    Warning,
)
from raftsql.driver._row import Row
from raftsql.driver._types import (
    BINARY,
    DATETIME,
    NUMBER,
    PARSE_COLNAMES,
    PARSE_DECLTYPES,
    ROWID,
    STRING,
    Binary,
    Date,
    DateFromTicks,
    PrepareProtocol,
    Time,
    TimeFromTicks,
    Timestamp,
    TimestampFromTicks,
    adapt,
    adapters,
    converters,
    register_adapter,
    register_converter,
)

apilevel = "2.0"
# 2: threads may share the module and connections (every Connection operation holds the
# connection's lock), but not cursors.
threadsafety = 2
# "?" placeholders; named ones (:name, @name, $name with a mapping) work too, as in sqlite3.
paramstyle = "qmark"

globals().update(RESULT_CODES)  # SQLITE_OK, SQLITE_CONSTRAINT_UNIQUE, ... as in sqlite3
globals().update(LIMITS)  # SQLITE_LIMIT_LENGTH, ... (Connection.getlimit), as in sqlite3


def complete_statement(statement: str) -> bool:
    """True if the string holds one or more complete SQL statements (sqlite3's, reused)."""
    import sqlite3

    return sqlite3.complete_statement(statement)


__all__ = [
    "BINARY",
    "CONSISTENCY_LEVELS",
    "DATETIME",
    "NUMBER",
    "ROWID",
    "STRING",
    "Binary",
    "Connection",
    "Cursor",
    "DataError",
    "DatabaseError",
    "Date",
    "DateFromTicks",
    "Error",
    "IntegrityError",
    "InterfaceError",
    "InternalError",
    "LEGACY_TRANSACTION_CONTROL",
    "NotSupportedError",
    "OperationalError",
    "OutcomeUnknown",
    "PARSE_COLNAMES",
    "PARSE_DECLTYPES",
    "PermissionDenied",
    "PrepareProtocol",
    "ProgrammingError",
    "Row",
    "SerializationError",
    "Time",
    "TimeFromTicks",
    "Timestamp",
    "TimestampFromTicks",
    "TransactionAborted",
    "Unavailable",
    "Warning",
    "adapt",
    "adapters",
    "apilevel",
    "complete_statement",
    "connect",
    "converters",
    "paramstyle",
    "register_adapter",
    "register_converter",
    "threadsafety",
]

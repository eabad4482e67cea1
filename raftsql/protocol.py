"""The client protocol shared by the node (server/clients.py) and the driver: what travels in
REQUEST and RESPONSE frames (raftsql/wire.py frames them).

Only the standard library and msgpack may be imported here: the driver ships this module.

- `ErrorKind`: why a request was not served ({"ok": false, "error": {"kind", ...}}), and what a
  client may do about it.
- SQL error names: `Result.error` is {"code": SQLite's extended result code, "name", "message"}
  plus "statement" (its position in a batch) and "set" (executemany); the names are SQLite's
  (SQLITE_CONSTRAINT_UNIQUE) or raftsql's own, listed here.
- `Result`: the outcome of one execute (a write, or a read's first chunk).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import msgpack


class ErrorKind(enum.StrEnum):
    """Why a request was not served. A str: it travels as its value ("NOT_LEADER")."""

    NOT_LEADER = "NOT_LEADER"  # not applied; resend anywhere (a leader hint where known)
    UNAVAILABLE = "UNAVAILABLE"  # not applied; resend later (transfer, shutdown, no quorum)
    OUTCOME_UNKNOWN = "OUTCOME_UNKNOWN"  # proposed, no result: resend only with the same serial
    TIMEOUT = "TIMEOUT"  # a read did not complete in time (reads are always safe to resend)
    TXN_ABORTED = "TXN_ABORTED"  # the leader changed during a transaction: nothing applied
    BAD_REQUEST = "BAD_REQUEST"  # the request itself is malformed: resending will not help
    TOO_MANY_CURSORS = "TOO_MANY_CURSORS"  # too many unfinished streamed results: close some


# raftsql's own SQL error names (the code is the closest SQLite result code; the driver maps
# names to DB-API exceptions in driver/_exceptions.py).
STALE_SERIAL = "RAFTSQL_STALE_SERIAL"  # an older serial than the client's latest: a driver bug
MAX_ROWID = "RAFTSQL_MAX_ROWID"  # storing rowid 2^63-1 (or a sequence at it)
STEP_LIMIT = "RAFTSQL_STEP_LIMIT"  # a write exceeded the VM step budget
TIMEOUT = "RAFTSQL_TIMEOUT"  # a read exceeded query_timeout_s, or at_index was not reached
MULTIPLE_STATEMENTS = "RAFTSQL_MULTIPLE_STATEMENTS"  # more than one statement in one string
NOT_READONLY = "RAFTSQL_NOT_READONLY"  # a write where only reads are served
BINDINGS = "RAFTSQL_BINDINGS"  # wrong number or names of parameters
PROGRAMMING = "RAFTSQL_PROGRAMMING"  # a value or text SQLite cannot take (e.g. NUL in the SQL)
SERIALIZATION = "RAFTSQL_SERIALIZATION"  # a transaction's read set changed: nothing applied
TXN_TIMEOUT = "RAFTSQL_TXN_TIMEOUT"  # a transaction was idle too long: nothing applied
RESULT_TOO_BIG = "RAFTSQL_RESULT_TOO_BIG"  # a result over its limit: nothing applied

RAFTSQL_ERROR_NAMES = frozenset(
    {
        STALE_SERIAL, MAX_ROWID, STEP_LIMIT, TIMEOUT, MULTIPLE_STATEMENTS, NOT_READONLY,
        BINDINGS, PROGRAMMING, SERIALIZATION, TXN_TIMEOUT, RESULT_TOO_BIG,
    }
)


def sql_error(code: int, name: str, message: str) -> dict[str, Any]:
    """An SQL error value, as Result.error carries it."""
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
    # Reads only, on the node, never sent: what streams the rest of the rows (a ReadCursor).
    stream: Any = field(default=None, repr=False, compare=False)

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

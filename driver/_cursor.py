"""Cursor: runs statements through its Connection and holds one result set.

A result set arrives whole (the server returns every row of a statement in one response), so
fetch* only walk a list. Cursors are not thread-safe (PEP 249 threadsafety 2: threads may share
connections, not cursors).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from raftsql.driver import _sql
from raftsql.driver._exceptions import ProgrammingError, error_from_map
from raftsql.driver._types import adapt_params

if TYPE_CHECKING:
    from raftsql.driver._connection import Connection

_CONSISTENCY = ("linearizable", "leader", "stale")


class Cursor:
    """A DB-API cursor. Extensions over sqlite3's:

    consistency  None (use the connection's) or "linearizable" | "leader" | "stale": the read
                 consistency of this cursor's reads that do not run inside a transaction
    min_index    None or a log index: stale reads wait until the node has applied it (for
                 causality across connections: set it to another connection's last_index); the
                 connection's own last_index is always included (read-your-writes)
    """

    def __init__(self, connection: Connection, /):
        self.connection = connection
        self.arraysize = 1
        self.row_factory = connection.row_factory
        self.min_index: int | None = None
        self._consistency: str | None = None
        self._closed = False
        self.lastrowid: int | None = None
        self._reset()

    # ------------------------------------------------------------------ attributes

    @property
    def consistency(self) -> str | None:
        return self._consistency

    @consistency.setter
    def consistency(self, value: str | None) -> None:
        if value is not None and value not in _CONSISTENCY:
            raise ProgrammingError(f"consistency must be one of {', '.join(_CONSISTENCY)} or None")
        self._consistency = value

    def _reset(self) -> None:
        self.description: tuple | None = None
        self.rowcount = -1
        self._rows: list[tuple] = []
        self._pos = 0
        self._result: dict[str, Any] | None = None  # the last raw Result map (tests look at it)

    def _check(self) -> None:
        if self._closed:
            raise ProgrammingError("Cannot operate on a closed cursor.")
        self.connection._check_open()

    # ------------------------------------------------------------------ execute*

    def execute(self, sql: str, parameters: Any = (), /) -> Cursor:
        """Run one statement: its own replicated write (or a read), or part of the connection's
        transaction, as the connection's autocommit and isolation_level say (as in sqlite3)."""
        self._check()
        if not isinstance(sql, str):
            raise TypeError(f"execute() argument 1 must be str, not {type(sql).__name__}")
        self._reset()
        params = adapt_params(parameters)
        self._load(self.connection._run_one(self, sql, params))
        return self

    def executemany(self, sql: str, seq_of_parameters: Iterable[Any], /) -> Cursor:
        """Run one DML statement once per parameter set. Outside a transaction (autocommit) all
        of them are ONE atomic log entry (all applied or none); otherwise they join the
        transaction. rowcount is the sum of the changes."""
        self._check()
        if not isinstance(sql, str):
            raise TypeError(f"executemany() argument 1 must be str, not {type(sql).__name__}")
        self._reset()
        if _sql.is_read_only(sql):
            raise ProgrammingError("executemany() can only execute DML statements.")
        params = [adapt_params(p) for p in seq_of_parameters]
        result, rowcount = self.connection._run_many(self, sql, params)
        self._load(result, rowcount)
        return self

    def executescript(self, sql_script: str, /) -> Cursor:
        """Commit any pending transaction (as sqlite3), then run the script's statements as ONE
        atomic log entry. BEGIN/COMMIT/END statements are dropped (the script is already one
        transaction); other transaction control is refused by the server."""
        self._check()
        if not isinstance(sql_script, str):
            raise TypeError("script argument must be unicode.")
        self._reset()
        result, rowcount = self.connection._run_script(sql_script)
        self._load(result, rowcount)
        return self

    def _load(self, result: dict[str, Any], rowcount: int | None = None) -> None:
        self._result = result
        err = result.get("error")
        if err:
            raise error_from_map(err)
        columns = result.get("columns") or []
        decltypes = result.get("decltypes") or []
        if columns:
            self.description = tuple(
                (name, decltypes[i] if i < len(decltypes) else None, None, None, None, None, None)
                for i, name in enumerate(columns)
            )
        self._rows = [tuple(r) for r in result.get("rows") or ()]
        self.rowcount = rowcount if rowcount is not None else int(result.get("rowcount", -1))
        if result.get("lastrowid"):
            # Every log entry starts with last_insert_rowid() = 0, so 0 means "this statement
            # inserted nothing": keep the previous value, as sqlite3's connection-level one.
            self.lastrowid = result["lastrowid"]

    # ------------------------------------------------------------------ fetch*

    def _result_set(self) -> list[tuple]:
        # No result set (nothing executed yet, or a statement without rows) is an empty one,
        # as in sqlite3: fetchone() returns None, fetchall() and fetchmany() [].
        self._check()
        return self._rows

    def _make(self, row: tuple) -> Any:
        rf = self.row_factory
        return rf(self, row) if rf is not None else row

    def fetchone(self) -> Any:
        rows = self._result_set()
        if self._pos >= len(rows):
            return None
        row = rows[self._pos]
        self._pos += 1
        return self._make(row)

    def fetchmany(self, size: int | None = None) -> list[Any]:
        rows = self._result_set()
        n = self.arraysize if size is None else size
        if n < 0:
            n = len(rows)
        chunk = rows[self._pos : self._pos + n]
        self._pos += len(chunk)
        return [self._make(r) for r in chunk]

    def fetchall(self) -> list[Any]:
        rows = self._result_set()
        chunk = rows[self._pos :]
        self._pos = len(rows)
        return [self._make(r) for r in chunk]

    def __iter__(self) -> Cursor:
        return self

    def __next__(self) -> Any:
        self._check()
        if self._pos >= len(self._rows):
            raise StopIteration
        row = self._rows[self._pos]
        self._pos += 1
        return self._make(row)

    # ------------------------------------------------------------------ the rest of PEP 249

    def setinputsizes(self, sizes: Any, /) -> None:
        """Does nothing (as sqlite3): values are sent as they are."""

    def setoutputsize(self, size: Any, column: Any = None, /) -> None:
        """Does nothing (as sqlite3): values come back whole."""

    def close(self) -> None:
        """Close the cursor; using it afterwards raises ProgrammingError. Idempotent."""
        self._closed = True
        self._rows = []
